# Read by CTest each time it starts (the tests directory's TEST_INCLUDE_FILES), not when CMake configures: one
# test per golden case in $GOLDEN_DIR (default: the repository's tests/golden), so that a GOLDEN_DIR with other
# cases runs exactly those, with no rebuild or reconfigure. Set by the generated wrapper: GOLDEN_PROGRAM,
# GOLDEN_DEFAULT_DIR, GOLDEN_VERIFY_SCRIPT, GOLDEN_CMAKE.
cmake_policy(VERSION 3.18)
if(DEFINED ENV{GOLDEN_DIR} AND NOT "$ENV{GOLDEN_DIR}" STREQUAL "")
  set(golden_dir "$ENV{GOLDEN_DIR}")
  if(NOT IS_ABSOLUTE "${golden_dir}")
    set(golden_dir "$ENV{PWD}/${golden_dir}")  # as the user typed it, relative to where ctest was started
  endif()
  set(golden_default FALSE)
else()
  set(golden_dir "${GOLDEN_DEFAULT_DIR}")
  set(golden_default TRUE)
endif()

# The repository's copy must match its checksum list; the cases read from it wait for that check.
add_test(golden.checksums "${GOLDEN_CMAKE}" "-DDIR=${GOLDEN_DEFAULT_DIR}" -P "${GOLDEN_VERIFY_SCRIPT}")
set_tests_properties(golden.checksums PROPERTIES FIXTURES_SETUP golden_copy)

# Fails when the directory holds no case (or does not exist), naming it.
add_test(golden.directory "${GOLDEN_PROGRAM}" --gtest_filter=GoldenDirectory.*)
set_tests_properties(golden.directory PROPERTIES ENVIRONMENT "GOLDEN_DIR=${golden_dir}")

file(GLOB golden_cases LIST_DIRECTORIES FALSE "${golden_dir}/*.json")
list(SORT golden_cases)
foreach(case IN LISTS golden_cases)
  get_filename_component(stem "${case}" NAME_WE)
  add_test("golden.${stem}" "${GOLDEN_PROGRAM}" "--gtest_filter=Golden/GoldenCase.*:GoldenDirectory.*")
  set_tests_properties("golden.${stem}" PROPERTIES ENVIRONMENT "GOLDEN_DIR=${golden_dir};GOLDEN_CASE=${case}"
                       LABELS golden)
  if(golden_default)
    set_tests_properties("golden.${stem}" PROPERTIES FIXTURES_REQUIRED golden_copy)
  endif()
endforeach()
