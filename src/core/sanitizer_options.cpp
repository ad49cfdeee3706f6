// Linked into every program of a sanitizer build (LARGEBATCH_SANITIZE / LARGEBATCH_FUZZ): the sanitizers read
// these defaults at start-up, so tests, fuzzers and the CLI fail on any report however they are started.
// ASAN_OPTIONS / UBSAN_OPTIONS / LSAN_OPTIONS in the environment still override them.
extern "C" {

const char* __asan_default_options() {
  return "halt_on_error=1:detect_leaks=1:strict_string_checks=1:detect_stack_use_after_return=1:"
         "check_initialization_order=1";
}

const char* __ubsan_default_options() { return "halt_on_error=1:print_stacktrace=1"; }

const char* __lsan_default_options() { return "suppressions=" LARGEBATCH_LSAN_SUPPRESSIONS ":print_suppressions=0"; }

}  // extern "C"
