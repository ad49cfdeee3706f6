#pragma once
// A model's first convolution and the 2x2 max pooling after it, as one operation for CPU training:
// max_pool2d(conv2d(x, weight, bias, stride 1, padding 1), 2, 2) for a 3x3 kernel over an input that needs no
// gradient (the images). Apart, LibTorch's convolution runs at a fraction of the dense rate on one input channel
// and writes the full-resolution map, which the pooling reads again and whose gradient the backward pass writes and
// reads again; fused, the full-resolution map exists one row at a time in cache, the backward pass keeps one
// byte per output (which of its four taps won) and computes the weight and bias gradients from it and the input.
//
// Semantics: the convolution sums, for each output, the bias and then the taps in (input channel, row, column)
// order in float, so its values can differ from LibTorch's convolution by float rounding (which also decides
// near-ties of the pooling); the pooling is ATen's (taps row by row, a value replaces the maximum when greater
// or NaN, ties keep the first). The gradients sum over fixed chunks of images in float (16 lanes per plane,
// added group after group) and the chunks in order in double: the same bits on any thread count and on every
// instruction set (separate multiplications and additions, no fused multiply-add). A second derivative
// (create_graph) goes through LibTorch's convolution and a gather at the kept maxima.
#include <torch/types.h>

#include <string>
#include <vector>

namespace largebatch {
namespace models {

// Whether conv3x3_max_pool2 takes this input: x a contiguous 4-D float CPU tensor [N, C_in, H, W] (H, W >= 2)
// that needs no gradient, weight a contiguous float [C_out, C_in, 3, 3] with C_in <= 16 and no forward-mode
// tangent, bias undefined or float [C_out]. CPU autocast does not change it: it computes in float all the same (the
// compact CNN rounds its output to autocast's type, docs/TRAINING.md).
bool conv3x3_max_pool2_takes(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias);

// max_pool2d(conv2d(x, weight, bias, /*stride=*/1, /*padding=*/1), 2, 2), differentiable in weight and bias.
// Requires conv3x3_max_pool2_takes(x, weight, bias). output_type kBFloat16: the same float maxima rounded as
// Tensor::to(kBFloat16) rounds them (the same bits as that cast after the float result, in one pass), and the
// gradient comes back in bfloat16 and is widened exactly, as the cast's backward widens it.
torch::Tensor conv3x3_max_pool2(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                torch::ScalarType output_type = torch::kFloat);

// The kernels are compiled once per instruction set and the widest this CPU runs is used; every set gives the same
// bits. The sets this CPU runs (narrowest first: "baseline", then "avx2", "avx512" where present), the one in use
// (the environment variable LARGEBATCH_CONV_POOL_SIMD, read at the first call, picks another), and a choice of
// another (std::invalid_argument names one this CPU does not run), for tests and measurements.
std::vector<std::string> conv3x3_max_pool2_instruction_sets();
std::string conv3x3_max_pool2_instruction_set();
void use_conv3x3_max_pool2_instruction_set(const std::string& name);

}  // namespace models
}  // namespace largebatch
