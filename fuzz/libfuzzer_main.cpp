// One libFuzzer program per target: LARGEBATCH_FUZZ_TARGET names the function of fuzz/targets.h.
#include "targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  return largebatch::fuzz::LARGEBATCH_FUZZ_TARGET(data, size);
}
