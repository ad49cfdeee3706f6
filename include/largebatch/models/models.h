#pragma once
// Image classifiers: torchvision-layout ResNet-18/34/50 (ImageNet or CIFAR stem), EfficientNet-B0, and
// CPU-sized models (CIFAR-style ResNet-20, a compact CNN). Parameter names follow torchvision
// ("layer1.0.conv1.weight", "fc.weight") so masks and telemetry read the same as in PyTorch.
#include <torch/nn/module.h>
#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

namespace largebatch {
namespace models {

// A classifier = a feature extractor + a linear head. Self-supervised training uses features() alone.
class ClassifierImpl : public torch::nn::Module {
 public:
  virtual torch::Tensor features(const torch::Tensor& images) = 0;  // [B, feature_dim]
  virtual torch::Tensor forward(const torch::Tensor& images) = 0;   // logits [B, num_classes]
  virtual int64_t feature_dim() const = 0;
};
using Classifier = std::shared_ptr<ClassifierImpl>;

struct ModelOptions {
  std::string name = "cnn";   // see model_names()
  int64_t num_classes = 10;
  int64_t in_channels = 1;
  int64_t image_size = 28;    // height = width
  std::string init = "default";  // see init_names()
  uint64_t seed = 0;
};

// resnet18, resnet34, resnet50 (ImageNet stem), resnet18-cifar, resnet34-cifar, resnet50-cifar (3x3 stem,
// no max-pool), efficientnet-b0, resnet20 (CIFAR ResNet of He et al.), cnn (compact CNN for 28x28/32x32),
// mlp (two layers, no BatchNorm).
const std::vector<std::string>& model_names();
// default (each model's own: torchvision's for the ResNets), xavier-uniform, xavier-normal, kaiming-uniform,
// kaiming-normal. Non-default methods re-initialise every conv and linear weight and zero their biases.
const std::vector<std::string>& init_names();

// Builds the model; std::invalid_argument names the bad field (unknown name or init, bad sizes).
Classifier make_model(const ModelOptions& options);
// Re-initialises conv and linear weights of any module by name of method.
void apply_init(torch::nn::Module& module, const std::string& method);
int64_t parameter_count(const torch::nn::Module& module);

}  // namespace models
}  // namespace largebatch
