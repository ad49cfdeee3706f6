#pragma once
// Image classifiers: torchvision-layout ResNet-18/34/50 (ImageNet or CIFAR stem), EfficientNet-B0, and
// CPU-sized models (CIFAR-style ResNet-20, a compact CNN). Parameter names follow torchvision
// ("layer1.0.conv1.weight", "fc.weight") so masks and telemetry read the same as in PyTorch.
#include <torch/nn/module.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/options/batchnorm.h>
#include <torch/types.h>

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace largebatch {
namespace models {

// Sum of a tensor over the ranks of a data-parallel job, differentiable (see dist::all_reduce_sum_differentiable).
using CrossRankSum = std::function<torch::Tensor(const torch::Tensor&)>;

// BatchNorm2d with the parameters, buffers, names and eval/train behaviour of torch::nn::BatchNorm2d, whose
// training-mode statistics can span every rank: with a CrossRankSum set, mean and variance are those of the
// global batch (two passes: mean, then centred squares, each summed over ranks) and gradients flow through
// the sums. Without one it computes exactly what torch::nn::BatchNorm2d does. Every model of the zoo uses it.
// (A separate module rather than a subclass: LibTorch does not export BatchNormImplBase's vtable entries.)
class SyncableBatchNorm2dImpl : public torch::nn::Cloneable<SyncableBatchNorm2dImpl> {
 public:
  explicit SyncableBatchNorm2dImpl(int64_t num_features)
      : SyncableBatchNorm2dImpl(torch::nn::BatchNormOptions(num_features)) {}
  explicit SyncableBatchNorm2dImpl(const torch::nn::BatchNormOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  torch::Tensor forward(const torch::Tensor& input);
  void set_cross_rank_sum(CrossRankSum sum) { cross_rank_sum_ = std::move(sum); }
  bool synchronised() const { return static_cast<bool>(cross_rank_sum_); }

  torch::nn::BatchNormOptions options;
  torch::Tensor weight, bias, running_mean, running_var, num_batches_tracked;
  // largebatch's CPU kernels in training (ClassifierImpl::set_cpu_kernels): batch statistics of maps of 2 to 4
  // pixels over an [N*H*W, C] view (LibTorch 1.13's NCHW kernel loops over a handful of pixels per image there),
  // and for other dense NCHW maps a forward and backward of its own (LibTorch's statistics run a scalar Welford
  // loop). The same statistics, summed in another order.
  bool small_map_kernels = true;
  // Ghost BatchNorm (MLPerf's "BN span"): in training, statistics over consecutive groups of this many images
  // of the batch (the last one may be smaller), each group normalised as batch_norm normalises it alone; the
  // running statistics move once per batch, by the mean over groups of their means and unbiased variances.
  // 0, or a batch no larger than a group: the whole batch.
  int64_t group_size = 0;

 private:
  torch::Tensor ghost_forward(const torch::Tensor& input, double momentum, bool track);
  CrossRankSum cross_rank_sum_;
};
TORCH_MODULE(SyncableBatchNorm2d);

// Sets sum on every SyncableBatchNorm2d of module (an empty function restores per-rank statistics); returns
// how many there are.
int64_t synchronise_batchnorm(torch::nn::Module& module, const CrossRankSum& sum);

// A 2-D convolution (parameters, options and checkpoints those of torch::nn::Conv2d) that, on CPU maps so
// small that most of a convolution's products would fall on zero padding (ResNet's last stages at 32x32
// inputs: 3x3 kernels over 2x2 and 1x1 maps), computes the same sums as one matrix product of the flattened
// input with the kernel unrolled over (output pixel, input pixel) pairs; autograd's backward scatters the
// unrolled kernel's gradient back into the taps. The sums differ from conv2d's only in order and in the exact
// zero products left out. 3x3 convolutions of stride 1 with at least 32 input and 64 output channels over larger
// maps go to oneDNN's Winograd kernels where the CPU has them (winograd_conv.h; LARGEBATCH_WINOGRAD=0 leaves
// those to conv2d). Off: every map goes to conv2d. clone() (LibTorch's Cloneable<Conv2dImpl>) returns a
// plain Conv2dImpl, which computes the same with conv2d.
class ConvImpl : public torch::nn::Conv2dImpl {
 public:
  using torch::nn::Conv2dImpl::Conv2dImpl;
  torch::Tensor forward(const torch::Tensor& input);
  // Whether forward(input) takes the matrix-product path.
  bool unrolls(const torch::Tensor& input) const;
  // Whether forward(input) takes oneDNN's Winograd convolution (winograd_conv.h: 3x3, stride 1, padding 1,
  // C_in >= 32 and C_out >= 64, on CPUs with AVX-512).
  bool winograd(const torch::Tensor& input) const;
  bool small_map_kernels = true;
  // Off: the Winograd path alone is left out (conv2d takes those maps), the matrix-product one stays.
  bool winograd_kernels = true;

 private:
  struct UnrolledIndex {
    torch::Tensor index;    // into the flattened weight, for every (out, output pixel, in, input pixel)
    bool unjoined = false;  // some pair is joined by no tap: it reads a zero after the weight
  };
  std::map<std::pair<int64_t, int64_t>, UnrolledIndex> unrolled_index_;  // per map size (h, w)
  std::mutex unrolled_index_mutex_;
};
TORCH_MODULE(Conv);

// A classifier = a feature extractor + a linear head. Self-supervised training uses features() alone.
class ClassifierImpl : public torch::nn::Module {
 public:
  virtual torch::Tensor features(const torch::Tensor& images) = 0;  // [B, feature_dim]
  virtual torch::Tensor forward(const torch::Tensor& images) = 0;   // logits [B, num_classes]
  virtual int64_t feature_dim() const = 0;
  // Name of the submodule that maps features to logits ("fc", "classifier"): its parameters are those a
  // self-supervised backbone leaves out.
  virtual std::string head_name() const { return "fc"; }

  // Channels-last (NHWC) activations on the CPU for the convolutional models: oneDNN's convolutions run faster
  // on them (the compact CNN's training step up to 1.1x, docs/PERFORMANCE.md). Off by default: the convolutions then
  // sum in another order, so a data-parallel run no longer matches the single-process one to float rounding.
  // Weights, gradients, optimizer state and checkpoints keep LibTorch's default layout either way.
  void set_channels_last(bool on) { channels_last_ = on; }
  bool channels_last() const { return channels_last_; }
  // largebatch's CPU kernels where LibTorch 1.13's are slow (on by default): max pooling (pooling.h; the same
  // bits), convolutions over maps of a few pixels (2x2, 1x1; ResNet's last stages at 32x32 inputs) as matrix
  // products (ConvImpl) and BatchNorm over maps of 2-4 pixels as over an [N*H*W, C] view
  // (SyncableBatchNorm2dImpl) and the compact CNN's first convolution fused with its pooling (conv_pool.h;
  // LARGEBATCH_FUSED_FIRST_LAYER=0 leaves that one out), the same arithmetic summed in another order; and
  // Winograd 3x3 convolutions (winograd_conv.h; LARGEBATCH_WINOGRAD=0 leaves those out), other arithmetic. Training is faster
  // (docs/PERFORMANCE.md). Off: LibTorch's max_pool2d, conv2d and batch_norm everywhere.
  void set_cpu_kernels(bool on);
  bool cpu_kernels() const { return cpu_kernels_; }
  // Ghost BatchNorm over groups of this many images in every BatchNorm layer (SyncableBatchNorm2dImpl::
  // group_size; 0: the whole batch). Returns how many layers it set.
  int64_t set_bn_group_size(int64_t images);

 protected:
  // The input as the first convolution should read it.
  torch::Tensor input_layout(const torch::Tensor& x) const;

 private:
  bool channels_last_ = false;
  bool cpu_kernels_ = true;
};

// The parameters of features() alone, i.e. all but the head's (names as in named_parameters()).
std::vector<std::pair<std::string, torch::Tensor>> backbone_parameters(ClassifierImpl& model);
using Classifier = std::shared_ptr<ClassifierImpl>;

struct ModelOptions {
  std::string name = "cnn";   // see model_names()
  int64_t num_classes = 10;
  int64_t in_channels = 1;
  int64_t image_size = 28;    // height = width
  std::string init = "default";  // see init_names()
  uint64_t seed = 0;
  bool channels_last = false;    // see ClassifierImpl::set_channels_last
  bool cpu_kernels = true;       // see ClassifierImpl::set_cpu_kernels
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
