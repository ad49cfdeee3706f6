#pragma once
// The option names apply_overrides() (factory.h) accepts, for front ends that must tell an option of the engine
// from a key of their own (the Python package's param groups carry schedulers' bookkeeping beside them).
#include <string>
#include <vector>

namespace largebatch {
namespace optim {

// In the order the error for an unknown option lists them.
const std::vector<std::string>& override_keys();

}  // namespace optim
}  // namespace largebatch
