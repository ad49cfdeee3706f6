#pragma once
// What the bench commands share (bench_speed.cpp defines these): the machine's dense rate, the models as the
// benchmarks build them, and the facts a figure depends on.
#include <largebatch/models/models.h>

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace largebatch {
namespace apps {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// --threads: the value given, or every core for 0.
int resolve_threads(int64_t threads);

// The best rate of dense arithmetic this machine gives LibTorch right now, in FLOP/s: a matrix multiply
// (BLAS) and a 3x3 convolution forward (oneDNN where LibTorch has it), the better of the two. Training cannot
// run much faster than this however its work is organised.
struct DenseRate {
  double matmul = 0, convolution = 0;
  double convolution_bf16 = 0;  // the same convolution in bfloat16, when asked for (0 otherwise)
  double best() const {
    const double fp32 = matmul > convolution ? matmul : convolution;
    return convolution_bf16 > fp32 ? convolution_bf16 : fp32;
  }
};
// With bf16, also the bfloat16 convolution: a bf16 step's rate is then measured against the better of all.
DenseRate dense_rate(bool bf16 = false);

// A zoo model as the benchmarks train it: the studies' 1x28x28 images for cnn, mlp and resnet20, CIFAR's
// 3x32x32 for resnet18; 10 classes.
models::ModelOptions bench_model(const std::string& name);

// "CPU <model> | caches (...): L1d ..., L2 ... per ... CPU(s), L3 ...": what the fused step sizes its blocks from
// (runtime_summary() names the block size it chose).
std::string cache_summary();

double median(std::vector<double> values);

}  // namespace apps
}  // namespace largebatch
