#pragma once
// The choice among one kernel family's instruction-set variants (private to the libraries): the fused optimizer
// step's (optim/step_kernels.cpp) and the fused first layer's (models/conv_pool.cpp). Kernels is a struct with a
// `const char* name`; the variants this CPU runs are given narrowest first. The widest is used unless an
// environment variable, read at the first use, or use() picks another; an unknown name is a std::invalid_argument
// naming who asked and the variants there are.
#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace largebatch {
namespace core {

template <typename Kernels>
class InstructionSets {
 public:
  InstructionSets(std::vector<const Kernels*> runnable, std::string variable)
      : runnable_(std::move(runnable)), variable_(std::move(variable)) {}

  const std::vector<const Kernels*>& runnable() const { return runnable_; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const Kernels* k : runnable_) out.emplace_back(k->name);
    return out;
  }

  const Kernels& active() {
    const Kernels* k = chosen_.load();
    if (k) return *k;
    const char* env = std::getenv(variable_.c_str());
    k = (env && *env) ? named(env, variable_) : runnable_.back();
    chosen_.store(k);
    return *k;
  }

  void use(const std::string& name, const std::string& asked_by) { chosen_.store(named(name, asked_by)); }

 private:
  const Kernels* named(const std::string& name, const std::string& asked_by) const {
    std::string names;
    for (const Kernels* k : runnable_) {
      if (name == k->name) return k;
      names += names.empty() ? k->name : std::string(", ") + k->name;
    }
    throw std::invalid_argument(asked_by + ": unknown or unavailable instruction set '" + name +
                                "' (this build on this CPU: " + names + ")");
  }

  const std::vector<const Kernels*> runnable_;
  const std::string variable_;
  std::atomic<const Kernels*> chosen_{nullptr};
};

}  // namespace core
}  // namespace largebatch
