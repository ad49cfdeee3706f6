#pragma once
// Barlow Twins (Zbontar et al., 2021): the loss and the two asymmetric augmented views.
#include <largebatch/dist/dist.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/layerwise.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>

#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace largebatch {
namespace train {

// loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2, where C = z1n^T z2n / N, z1n and z2n are the
// embeddings [n, D] batch-normalised (no affine; biased variance, eps 1e-5) with the statistics of the
// global batch of N = sum over ranks of n images, and C is summed over ranks. Every rank gets the same
// loss; with comm == nullptr the batch is the global one. Gradients flow through every cross-rank sum,
// so averaging the ranks' gradients gives the gradient of this loss (the trainer's GradientAverager).
// terms, when given, receives the two sums (detached, unweighted) for logging without a host sync.
struct BarlowTwinsTerms {
  torch::Tensor on_diagonal, off_diagonal;
};
torch::Tensor barlow_twins_loss(const torch::Tensor& z1, const torch::Tensor& z2, double lambda = 0.005,
                                dist::Communicator* comm = nullptr, BarlowTwinsTerms* terms = nullptr);

// The two views' augmentation of Barlow Twins (view 0 / view 1): random resized crop (scale 0.08..1, ratio
// 3/4..4/3) with horizontal flip (p 0.5); colour jitter with p 0.8 (brightness 0.4, contrast 0.4,
// saturation 0.2, hue 0.1); grayscale p 0.2; Gaussian blur p 1.0 / 0.1 (sigma 0.1..2, kernel about a
// tenth of the image, odd); solarisation p 0.0 / 0.2 (threshold 0.5). On single-channel images saturation,
// hue and grayscale have nothing to act on and are skipped. Input: float images in [0, 1], [n, C, H, W];
// output the same shape, in [0, 1], not normalised.
struct ViewOptions {
  double min_scale = 0.08;
  double jitter_p = 0.8, brightness = 0.4, contrast = 0.4, saturation = 0.2, hue = 0.1;
  double grayscale_p = 0.2;
  double blur_p[2] = {1.0, 0.1};
  double solarize_p[2] = {0.0, 0.2};
};

// Draws every random choice from a generator seeded by (seed, view) for the whole global batch and applies
// those of rows [offset, offset + n) to images, so a rank's shard gets exactly the augmentation the same
// images get in a single-process run.
torch::Tensor barlow_twins_view(const torch::Tensor& images, int view, uint64_t seed, int64_t global_batch,
                                int64_t offset, const ViewOptions& options = {});

// Barlow Twins' projector: Linear (no bias) - BatchNorm - ReLU for every layer but the last, which is a bare
// Linear. BatchNorm is the zoo's SyncableBatchNorm2d on [n, C, 1, 1], so --sync-bn reaches it too.
class ProjectorImpl : public torch::nn::Module {
 public:
  ProjectorImpl(int64_t in, const std::vector<int64_t>& sizes);
  torch::Tensor forward(torch::Tensor x);

 private:
  std::vector<torch::nn::Linear> linears_;
  std::vector<models::SyncableBatchNorm2d> norms_;
};
TORCH_MODULE(Projector);

// The pre-training network: a zoo backbone's features, then the projector.
class BarlowTwinsNetImpl : public torch::nn::Module {
 public:
  BarlowTwinsNetImpl(models::Classifier backbone, const std::vector<int64_t>& projector_sizes);
  torch::Tensor forward(const torch::Tensor& x);
  // What the optimizer trains: everything but the backbone's classifier head.
  optim::NamedParameters trainable();
  models::Classifier backbone;
  Projector projector;
};
TORCH_MODULE(BarlowTwinsNet);

}  // namespace train
}  // namespace largebatch
