#pragma once
// 2-D max pooling for CPU training. LibTorch 1.13's max_pool2d_with_indices (what autograd runs when the input
// needs a gradient) walks NCHW maps one output at a time with 64-bit index arithmetic: 12x slower than a copy of
// its input (the compact CNN's first pooling at batch 1024, forward: 59 ms against 5 ms). This kernel walks each
// map row by row, four outputs at a time (SSE2), and keeps 32-bit window positions instead of the input and
// 64-bit indices for the backward pass (docs/PERFORMANCE.md). Its bfloat16 version (the compact CNN under bf16
// autocast, where LibTorch's pooling is slower still) compares the same values widened to float.
//
// Semantics are ATen's, to the bit: within a window the taps are visited row by row, a value replaces the
// running maximum when it is greater or NaN (ties keep the first, NaN propagates, the last NaN wins), an all
// -inf window reports its first tap; the backward pass zeroes each input map and adds every output's gradient
// to its maximum's position in output order (overlapping windows sum as ATen sums them).
#include <torch/types.h>

namespace largebatch {
namespace models {

struct MaxPool2dGeometry {
  int64_t kernel_h, kernel_w, stride_h, stride_w, padding_h, padding_w;
};

// Whether max_pool2d(input, geometry, true) runs largebatch's kernel: a 4-D contiguous (NCHW) float, double or bfloat16 CPU
// tensor that autograd will differentiate in reverse mode (grad mode on, input requiring grad, no forward-mode
// tangent), padding at most half the kernel, non-empty maps and output, maps of fewer than 2^31 pixels. Anything else goes to torch::max_pool2d, which refuses
// what it refuses.
bool max_pool2d_takes_own_kernel(const torch::Tensor& input, const MaxPool2dGeometry& geometry);

// torch::max_pool2d(input, {kernel_h, kernel_w}, {stride_h, stride_w}, {padding_h, padding_w}) (dilation 1, floor
// mode), through largebatch's kernel where max_pool2d_takes_own_kernel says so and own_kernel is true. The result
// is differentiable; a second derivative (create_graph) goes through scatter_add.
torch::Tensor max_pool2d(const torch::Tensor& input, const MaxPool2dGeometry& geometry, bool own_kernel = true);

// Square kernel, stride and padding.
inline torch::Tensor max_pool2d(const torch::Tensor& input, int64_t kernel, int64_t stride, int64_t padding,
                                bool own_kernel = true) {
  return max_pool2d(input, MaxPool2dGeometry{kernel, kernel, stride, stride, padding, padding}, own_kernel);
}

}  // namespace models
}  // namespace largebatch
