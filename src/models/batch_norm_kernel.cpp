#include "batch_norm_kernel.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <ATen/ops/native_batch_norm_backward.h>
#include <torch/autograd.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace largebatch {
namespace models {

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kLanes = 8;

inline double lanes_total(const double* lane) {
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

// Mean and sum of squared deviations of channel c, in one pass: sums of d = x - k and d^2 in double lanes,
// planes in order, shifted by the channel's first value k so that a mean far from zero loses no precision.
template <typename T>
void channel_moments(const T* x, int64_t n, int64_t channels, int64_t plane, int64_t c, double* mean, double* var_sum) {
  const double shift = static_cast<double>(x[c * plane]);
  double sum[kLanes] = {}, square[kLanes] = {};
  for (int64_t b = 0; b < n; ++b) {
    const T* p = x + (b * channels + c) * plane;
    int64_t i = 0;
    for (; i + kLanes <= plane; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const double d = static_cast<double>(p[i + j]) - shift;
        sum[j] += d;
        square[j] += d * d;
      }
    for (int j = 0; i < plane; ++i, ++j) {
      const double d = static_cast<double>(p[i]) - shift;
      sum[j] += d;
      square[j] += d * d;
    }
  }
  const double count = static_cast<double>(n * plane), s = lanes_total(sum);
  *mean = shift + s / count;
  *var_sum = std::max(0.0, lanes_total(square) - s * s / count);
}

// y = x alpha + beta per channel (LibTorch's form of (x - mean) invstd w + b).
template <typename T>
void normalise(const T* x, T* y, int64_t n, int64_t channels, int64_t plane, const std::vector<double>& mean,
               const std::vector<double>& invstd, const T* w, const T* bias) {
  at::parallel_for(0, n * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      const int64_t c = q % channels;
      const double a = invstd[c] * static_cast<double>(w[c]);
      const T alpha = static_cast<T>(a), beta = static_cast<T>(static_cast<double>(bias[c]) - mean[c] * a);
      const T* p = x + q * plane;
      T* o = y + q * plane;
#pragma omp simd
      for (int64_t i = 0; i < plane; ++i) o[i] = p[i] * alpha + beta;
    }
  });
}

// The running statistics a forward pass moves (undefined when none): outside autograd's inputs, which must be
// defined tensors.
struct RunningStats {
  torch::Tensor mean, var;
};

template <typename T>
torch::Tensor forward_as(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
                         const RunningStats& running, double momentum, double eps, torch::Tensor* mean_out,
                         torch::Tensor* invstd_out) {
  const int64_t n = input.size(0), channels = input.size(1), plane = input.size(2) * input.size(3);
  const T* x = input.data_ptr<T>();
  std::vector<double> mean(channels), var_sum(channels), invstd(channels);
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) channel_moments(x, n, channels, plane, c, &mean[c], &var_sum[c]);
  });
  const double count = static_cast<double>(n * plane);
  for (int64_t c = 0; c < channels; ++c) invstd[c] = 1.0 / std::sqrt(var_sum[c] / count + eps);
  auto output = torch::empty_like(input, torch::MemoryFormat::Contiguous);
  normalise(x, output.data_ptr<T>(), n, channels, plane, mean, invstd, weight.data_ptr<T>(), bias.data_ptr<T>());
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  *mean_out = torch::from_blob(mean.data(), {channels}, f64).clone();
  *invstd_out = torch::from_blob(invstd.data(), {channels}, f64).clone();
  if (running.mean.defined() && running.var.defined()) {
    torch::NoGradGuard no_grad;
    const auto unbiased = torch::from_blob(var_sum.data(), {channels}, f64) / (count - 1);
    running.mean.mul_(1 - momentum).add_(mean_out->to(running.mean.scalar_type()), momentum);
    running.var.mul_(1 - momentum).add_(unbiased.to(running.var.scalar_type()), momentum);
  }
  return output;
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& input, const torch::Tensor& weight,
                               const torch::Tensor& bias, const RunningStats* running, double momentum, double eps) {
    torch::Tensor mean, invstd;
    const auto output = input.scalar_type() == torch::kDouble
                            ? forward_as<double>(input, weight, bias, *running, momentum, eps, &mean, &invstd)
                            : forward_as<float>(input, weight, bias, *running, momentum, eps, &mean, &invstd);
    ctx->save_for_backward({input, weight, mean, invstd});
    ctx->saved_data["eps"] = eps;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const auto &input = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    const auto grad = grad_outputs[0].contiguous();
    variable_list grads;
    if (torch::GradMode::is_enabled()) {
      // create_graph: the same formulas through differentiable operations (the statistics recomputed from the
      // input, as they depend on it), for a second derivative.
      const std::vector<int64_t> shape{1, input.size(1), 1, 1};
      const auto m = input.mean({0, 2, 3}, true);
      const auto s = torch::rsqrt((input - m).pow(2).mean({0, 2, 3}, true) + ctx->saved_data["eps"].toDouble());
      const auto xhat = (input - m) * s;
      const auto grad_bias = grad.sum({0, 2, 3}), grad_weight = (grad * xhat).sum({0, 2, 3});
      const double count = static_cast<double>(input.numel() / input.size(1));
      const auto grad_input = (grad - grad_bias.view(shape) / count - xhat * grad_weight.view(shape) / count) * s *
                              weight.view(shape);
      grads = {grad_input, grad_weight, grad_bias};
    } else {
      // LibTorch's backward kernel is as fast as the memory traffic allows: given this forward's statistics.
      const auto type = input.scalar_type();
      const auto [grad_input, grad_weight, grad_bias] = at::native_batch_norm_backward(
          grad, input, weight, {}, {}, mean.to(type), invstd.to(type), /*train=*/true,
          ctx->saved_data["eps"].toDouble(), {ctx->needs_input_grad(0), true, true});
      grads = {grad_input, grad_weight, grad_bias};
    }
    return {grads[0], grads[1], grads[2], torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

bool batch_norm_kernel_takes(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias) {
  if (input.dim() != 4 || !input.device().is_cpu() || !input.is_contiguous() || input.layout() != torch::kStrided)
    return false;
  const auto type = input.scalar_type();
  if (type != torch::kFloat && type != torch::kDouble) return false;
  if (!weight.defined() || !bias.defined() || weight.scalar_type() != type || bias.scalar_type() != type ||
      !weight.is_contiguous() || !bias.is_contiguous() || weight.numel() != input.size(1) ||
      bias.numel() != input.size(1) || !weight.device().is_cpu() || !bias.device().is_cpu())
    return false;
  return input.size(1) > 0 && input.numel() / input.size(1) > 1;  // one value per channel: batch_norm's error
}

torch::Tensor batch_norm_training(const torch::Tensor& input, const torch::Tensor& weight, const torch::Tensor& bias,
                                  const torch::Tensor& running_mean, const torch::Tensor& running_var,
                                  double momentum, double eps) {
  RECORD_FUNCTION("largebatch::batch_norm", std::vector<c10::IValue>{});  // named in profiles
  const RunningStats running{running_mean, running_var};
  return BatchNormFunction::apply(input, weight, bias, &running, momentum, eps);
}

}  // namespace models
}  // namespace largebatch
