// Google Benchmark of largebatch's CPU kernels (ClassifierImpl::set_cpu_kernels) against LibTorch's, forward
// and backward of one layer (input and parameter gradients), at the shapes where the training benchmark meets them:
//   build/bench_kernels --benchmark_counters_tabular=true        (LARGEBATCH_THREADS=1 for one thread)
// - max pooling: the compact CNN's two 2x2 pools at batch 1024, ResNet's 3x3/2 stem pool at 32x32 inputs,
//   batch 512 (models/pooling.h);
// - small maps: a 3x3 convolution over 2x2 and 1x1 maps and BatchNorm over 2x2 maps, ResNet-18's third and
//   fourth stages at 32x32 inputs, batch 256 (ConvImpl, SyncableBatchNorm2dImpl);
// - the compact CNN's first convolution and pooling fused, at batch 1024 (models/conv_pool.h), in float and as
//   bf16 autocast's layers see it.
// Each pair ("own" and "libtorch") runs the same module or call with the kernels on and off.
#include <largebatch/largebatch.h>

#include <benchmark/benchmark.h>
#include "bench_main.h"
#include <torch/torch.h>

#include <algorithm>
#include <string>
#include <vector>

namespace lm = largebatch::models;

namespace {

// Forward and backward through f(x) with a fixed output gradient: the gradients of x and of the layer's
// parameters, as training computes them.
template <typename F>
void forward_backward(benchmark::State& state, const std::vector<int64_t>& shape, F f,
                      std::vector<torch::Tensor> parameters = {}) {
  torch::manual_seed(0);
  const auto x = torch::randn(shape).requires_grad_(true);
  const auto grad = torch::randn_like(f(x));
  parameters.insert(parameters.begin(), x);
  for (auto _ : state) {
    auto y = f(x);
    auto grads = torch::autograd::grad({y}, parameters, {grad});
    benchmark::DoNotOptimize(grads.back().data_ptr());
  }
}

void max_pool(benchmark::State& state, std::vector<int64_t> shape, int64_t kernel, int64_t stride, int64_t padding,
              bool own) {
  forward_backward(state, shape, [&](const torch::Tensor& x) { return lm::max_pool2d(x, kernel, stride, padding, own); });
  // Bytes a pooling pass must move at the least: read the input, write the output (forward), read the output
  // gradient, write the input gradient (backward).
  const int64_t in = shape[0] * shape[1] * shape[2] * shape[3];
  const int64_t out = shape[0] * shape[1] * ((shape[2] + 2 * padding - kernel) / stride + 1) *
                      ((shape[3] + 2 * padding - kernel) / stride + 1);
  state.SetBytesProcessed(state.iterations() * int64_t{4} * 2 * (in + out));
}

// The compact CNN's first layer: its convolution (1 -> 32 channels, 3x3 over 28x28) and 2x2 max pooling, fused
// (models/conv_pool.h) or as LibTorch's convolution and largebatch's pooling; the images need no gradient.
void first_conv_pool(benchmark::State& state, int64_t batch, bool own) {
  torch::manual_seed(0);
  const auto x = torch::randn({batch, 1, 28, 28});
  const auto w = (0.3 * torch::randn({32, 1, 3, 3})).requires_grad_(true);
  const auto f = [&] {
    return own ? lm::conv3x3_max_pool2(x, w, torch::Tensor())
               : lm::max_pool2d(torch::conv2d(x, w, {}, 1, 1), 2, 2, 0, true);
  };
  const auto grad = torch::randn_like(f());
  for (auto _ : state) {
    auto grads = torch::autograd::grad({f()}, {w}, {grad});
    benchmark::DoNotOptimize(grads.back().data_ptr());
  }
}

// The same layer as the layers after it see it under bf16 autocast: fused with a bfloat16 output (own), fused with
// a float output cast afterwards (own_cast), or LibTorch's bfloat16 convolution and max pooling (libtorch); the
// output's gradient comes in bfloat16.
enum class Bf16FirstLayer { own, own_cast, libtorch };
void first_conv_pool_bf16(benchmark::State& state, int64_t batch, Bf16FirstLayer how) {
  torch::manual_seed(0);
  const auto x = torch::randn({batch, 1, 28, 28});
  const auto w = (0.3 * torch::randn({32, 1, 3, 3})).requires_grad_(true);
  const auto f = [&] {
    if (how == Bf16FirstLayer::own) return lm::conv3x3_max_pool2(x, w, torch::Tensor(), torch::kBFloat16);
    if (how == Bf16FirstLayer::own_cast) return lm::conv3x3_max_pool2(x, w, torch::Tensor()).to(torch::kBFloat16);
    return torch::max_pool2d(torch::conv2d(x.to(torch::kBFloat16), w.to(torch::kBFloat16), {}, 1, 1), 2, 2);
  };
  const auto grad = torch::randn_like(f());
  for (auto _ : state) {
    auto grads = torch::autograd::grad({f()}, {w}, {grad});
    benchmark::DoNotOptimize(grads.back().data_ptr());
  }
}

void small_map_conv(benchmark::State& state, int64_t batch, int64_t channels, int64_t side, bool own) {
  lm::Conv conv(torch::nn::Conv2dOptions(channels, channels, 3).padding(1).bias(false));
  conv->small_map_kernels = own;
  forward_backward(state, {batch, channels, side, side}, [&](const torch::Tensor& x) { return conv->forward(x); },
                   conv->parameters());
}

void small_map_batchnorm(benchmark::State& state, int64_t batch, int64_t channels, int64_t side, bool own) {
  lm::SyncableBatchNorm2d bn(channels);
  bn->small_map_kernels = own;
  forward_backward(state, {batch, channels, side, side}, [&](const torch::Tensor& x) { return bn->forward(x); },
                   bn->parameters());
}

}  // namespace

#define LB_PAIR(function, name, ...)                                                                          \
  BENCHMARK_CAPTURE(function, name##_own, __VA_ARGS__, true)->Unit(benchmark::kMillisecond)->UseRealTime();   \
  BENCHMARK_CAPTURE(function, name##_libtorch, __VA_ARGS__, false)->Unit(benchmark::kMillisecond)->UseRealTime();
LB_PAIR(first_conv_pool, cnn_conv1_pool1_b1024, 1024)
BENCHMARK_CAPTURE(first_conv_pool_bf16, cnn_conv1_pool1_b1024_own, 1024, Bf16FirstLayer::own)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(first_conv_pool_bf16, cnn_conv1_pool1_b1024_own_cast, 1024, Bf16FirstLayer::own_cast)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(first_conv_pool_bf16, cnn_conv1_pool1_b1024_libtorch, 1024, Bf16FirstLayer::libtorch)
    ->Unit(benchmark::kMillisecond)->UseRealTime();
LB_PAIR(max_pool, cnn_pool1_b1024, std::vector<int64_t>{1024, 32, 28, 28}, 2, 2, 0)
LB_PAIR(max_pool, cnn_pool2_b1024, std::vector<int64_t>{1024, 64, 14, 14}, 2, 2, 0)
LB_PAIR(max_pool, resnet_stem_pool_b512, std::vector<int64_t>{512, 64, 16, 16}, 3, 2, 1)
LB_PAIR(small_map_conv, resnet18_layer3_2x2_b256, 256, 256, 2)
LB_PAIR(small_map_conv, resnet18_layer4_1x1_b256, 256, 512, 1)
LB_PAIR(small_map_batchnorm, resnet18_layer3_2x2_b256, 256, 256, 2)

int main(int argc, char** argv) { return largebatch_benchmark_main(argc, argv); }
