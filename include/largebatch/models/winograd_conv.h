#pragma once
// A 3x3 convolution (stride 1, padding 1, no dilation, one group) by oneDNN's Winograd F(4x4, 3x3) kernels for
// CPU training: forward pass, input gradient and weight gradient each take about 2.25x fewer multiplications
// than the direct convolution LibTorch 1.13 asks oneDNN for. oneDNN is the library LibTorch itself calls;
// largebatch links it directly where it was built with it (LARGEBATCH_WITH_ONEDNN: Debian's libdnnl-dev).
//
// Semantics: the sums of conv2d computed through the Winograd transforms, so the values differ from conv2d's by
// more than float rounding of the same products (the transforms scale and subtract; the tests state the
// bound). The same bits on every call with the same shape and thread count; an image's output and input gradient
// do not depend on the rest of its batch. A second derivative (create_graph) goes through LibTorch's conv2d.
//
// Memory: each thread that calls it keeps the temporaries of its largest call (blocked output and gradients,
// oneDNN's scratchpad; about 2.5x the layer's output) for later calls.
#include <torch/types.h>

namespace largebatch {
namespace models {

// Whether a convolution with these parameters is one winograd_conv3x3 computes: a 3x3 kernel, stride 1,
// padding 1, dilation 1, one group (each list per spatial dimension).
bool winograd_conv3x3_geometry(c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups);

// Whether winograd_conv3x3 takes this input: x a contiguous 4-D float CPU tensor [N, C_in, H, W], weight a
// contiguous float [C_out, C_in, 3, 3] with C_in >= 32 and C_out >= 64 (where the transforms pay for themselves
// on the CPUs measured, docs/PERFORMANCE.md), bias undefined or float [C_out], no forward-mode tangents, CPU
// autocast off, LARGEBATCH_WINOGRAD not 0, and oneDNN's Winograd kernel available for this shape on this CPU
// (AVX-512; elsewhere false).
bool winograd_conv3x3_takes(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias);

// conv2d(x, weight, bias, /*stride=*/1, /*padding=*/1), differentiable in x, weight and bias.
// Requires winograd_conv3x3_takes(x, weight, bias).
torch::Tensor winograd_conv3x3(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias);

}  // namespace models
}  // namespace largebatch
