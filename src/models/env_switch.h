#pragma once
// The environment switches of single kernels (LARGEBATCH_FUSED_FIRST_LAYER, LARGEBATCH_WINOGRAD): on unless set
// to 0, so that a study begun before a kernel existed can finish with the arithmetic it began with.
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace largebatch {
namespace models {

// Unset, empty or "1": true; "0": false; anything else is refused, naming the variable.
inline bool env_switch_on(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0' || std::string(v) == "1") return true;
  if (std::string(v) == "0") return false;
  throw std::invalid_argument(std::string(name) + ": '" + v + "' is neither 0 nor 1");
}

}  // namespace models
}  // namespace largebatch
