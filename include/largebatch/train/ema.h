#pragma once
// An exponential moving average of a module's weights and BatchNorm buffers (timm's ModelEmaV2):
// after every optimizer step, e <- decay e + (1 - decay) w for every floating tensor; integer buffers (BatchNorm's
// batch counters) are copied. swap() exchanges the averages with the module's own tensors, so that the same
// module evaluates or saves the average, and swap() again puts the trained weights back.
#include <torch/nn/module.h>
#include <torch/types.h>

#include <string>
#include <vector>

namespace largebatch {
namespace train {

class WeightAverage {
 public:
  // The average starts at the module's current tensors.
  WeightAverage(torch::nn::Module& module, double decay);
  void update();
  void swap();
  double decay() const { return decay_; }
  // The averaged tensors, in the module's order of parameters then buffers, with their names.
  const std::vector<torch::Tensor>& tensors() const { return average_; }
  const std::vector<std::string>& names() const { return names_; }
  // Replaces the averages (a checkpoint's); std::invalid_argument naming the first that does not fit.
  void load(const std::vector<torch::Tensor>& tensors);

 private:
  std::vector<torch::Tensor> live_;     // the module's parameters and buffers
  std::vector<torch::Tensor> average_;
  std::vector<std::string> names_;
  double decay_;
};

}  // namespace train
}  // namespace largebatch
