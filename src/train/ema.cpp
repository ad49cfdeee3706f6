#include <largebatch/train/ema.h>

#include <torch/torch.h>

#include <stdexcept>

namespace largebatch {
namespace train {

WeightAverage::WeightAverage(torch::nn::Module& module, double decay) : decay_(decay) {
  if (!(decay >= 0 && decay < 1)) throw std::invalid_argument("ema decay " + std::to_string(decay) + " is not in [0, 1)");
  torch::NoGradGuard no_grad;
  for (const auto& item : module.named_parameters()) {
    names_.push_back(item.key());
    live_.push_back(item.value());
  }
  for (const auto& item : module.named_buffers()) {
    names_.push_back(item.key());
    live_.push_back(item.value());
  }
  for (const auto& t : live_) average_.push_back(t.detach().clone());
}

void WeightAverage::update() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < live_.size(); ++i) {
    if (torch::isFloatingType(live_[i].scalar_type()))
      average_[i].mul_(decay_).add_(live_[i], 1 - decay_);
    else
      average_[i].copy_(live_[i]);
  }
}

void WeightAverage::swap() {
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < live_.size(); ++i) {
    const torch::Tensor held = live_[i].clone();
    live_[i].copy_(average_[i]);
    average_[i].copy_(held);
  }
}

void WeightAverage::load(const std::vector<torch::Tensor>& tensors) {
  if (tensors.size() != average_.size())
    throw std::invalid_argument(std::to_string(tensors.size()) + " averaged tensors, the model has " +
                                std::to_string(average_.size()));
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].sizes() != average_[i].sizes() || tensors[i].scalar_type() != average_[i].scalar_type())
      throw std::invalid_argument("the average of " + names_[i] + " does not fit it");
    average_[i].copy_(tensors[i]);
  }
}

}  // namespace train
}  // namespace largebatch
