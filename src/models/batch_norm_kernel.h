#pragma once
// BatchNorm in training mode for dense NCHW float/double CPU maps (private to the models): LibTorch 1.13's CPU
// forward gathers the statistics with a scalar Welford loop per channel, slower than the memory traffic
// (docs/PERFORMANCE.md). The forward here makes one pass for the statistics (shifted sums in double, in a fixed
// order per channel, so the result does not depend on the thread count) and one elementwise pass; the backward
// is LibTorch's kernel given those statistics. The same formulas as LibTorch's, summed in another order.
#include <torch/types.h>

namespace largebatch {
namespace models {

// Whether the kernel takes this call: CPU, contiguous NCHW, float or double alike for input, weight and bias
// (both defined or both not), more than one value per channel.
bool batch_norm_kernel_takes(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias);

// torch::batch_norm(input, weight, bias, running_mean, running_var, /*training=*/true, momentum, eps), with
// autograd; running statistics (when defined) move by momentum towards the batch mean and unbiased variance.
torch::Tensor batch_norm_training(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
                                  const torch::Tensor& running_mean, const torch::Tensor& running_var,
                                  double momentum, double eps);

}  // namespace models
}  // namespace largebatch
