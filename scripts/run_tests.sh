#!/usr/bin/env bash
# Runs the test suite of a build directory with CTest, then lists every check that was skipped (each shell
# test's "SKIP reason" lines and GoogleTest's skipped tests), with the test it belongs to, and counts them.
# The exit code is CTest's: a suite with no test at all is a failure (--no-tests=error).
# Usage: scripts/run_tests.sh BUILD_DIR [ctest options...]
set -u
build=$1
shift
cd "$build" || { echo "run_tests: no build directory $build" >&2; exit 2; }
ctest --no-tests=error --output-on-failure "$@"
rc=$?
log=Testing/Temporary/LastTest.log
if [ -f "$log" ]; then
  awk '
    /^[0-9]+\/[0-9]+ Test: / { test = $3 }
    /^SKIP / { sub(/^SKIP /, ""); lines[++n] = test ": " $0 }
    /^\[  SKIPPED \] [A-Za-z0-9_\/.]+$/ { lines[++n] = test ": GoogleTest " $4 " skipped (reason in its output)" }
    END {
      printf "skipped checks: %d\n", n
      for (i = 1; i <= n; i++) print "  SKIP " lines[i]
    }' "$log"
fi
exit "$rc"
