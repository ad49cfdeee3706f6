// A first 3x3 convolution fused with the 2x2 max pooling after it (include/largebatch/models/conv_pool.h says
// what and why).
#include "largebatch/models/conv_pool.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/nn/functional/conv.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace largebatch {
namespace models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Images per chunk of the backward pass: the chunks, not the threads, fix the summation order.
constexpr int64_t kChunk = 16;

// Vectorised where the compiler can (the loops below are written for it); the baseline build stays portable.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LARGEBATCH_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LARGEBATCH_CLONES
#endif

constexpr int64_t kLanes = 16;  // the backward pass's per-lane sums: element i of a plane adds to lane i % 16

struct Shape {
  int64_t in_channels, height, width, out_channels, pooled_h, pooled_w;
  int64_t plane() const { return pooled_h * pooled_w; }
  // Planes padded to whole groups of lanes (the tail is zero).
  int64_t stride() const { return (plane() + kLanes - 1) / kLanes * kLanes; }
  // One image's input as 16 shifted planes per input channel: shifted(ci, r, v)[ph * pooled_w + pw] is the
  // zero-padded input at row 2 ph + r, column 2 pw + v (r, v in 0..3). Output (2ph + dy, 2pw + dx) under tap
  // (ky, kx) reads shifted(ci, ky + dy, kx + dx): every tap of every window position is one contiguous stream.
  int64_t image_floats() const { return in_channels * 16 * stride(); }
  int64_t padded_floats() const { return in_channels * (height + 3) * (width + 3); }
};

Shape shape_of(const torch::Tensor& x, const torch::Tensor& weight) {
  return {x.size(1), x.size(2), x.size(3), weight.size(0), x.size(2) / 2, x.size(3) / 2};
}

// padded: (height + 3) x (width + 3) floats of scratch per input channel.
void shift_planes(const float* x, const Shape& s, float* image, float* padded) {
  const int64_t pw_n = s.pooled_w, rows = s.height + 3, cols = s.width + 3;
  for (int64_t ci = 0; ci < s.in_channels; ++ci) {
    float* pad = padded + ci * rows * cols;
    std::fill(pad, pad + rows * cols, 0.f);
    for (int64_t y = 0; y < s.height; ++y)
      std::copy(x + (ci * s.height + y) * s.width, x + (ci * s.height + y + 1) * s.width, pad + (y + 1) * cols + 1);
    for (int64_t r = 0; r < 4; ++r)
      for (int64_t v = 0; v < 4; ++v) {
        float* plane = image + (ci * 16 + r * 4 + v) * s.stride();
        for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
          const float* src = pad + (2 * ph + r) * cols + v;
          for (int64_t pw = 0; pw < pw_n; ++pw) plane[ph * pw_n + pw] = src[2 * pw];
        }
        std::fill(plane + s.plane(), plane + s.stride(), 0.f);
      }
  }
}

inline const float* shifted(const float* image, const Shape& s, int64_t ci, int64_t r, int64_t v) {
  return image + (ci * 16 + r * 4 + v) * s.stride();
}

// One image: per output channel, the convolution at the four positions of every 2x2 window, each the bias and
// then the taps in (input channel, row, column) order, and their maximum in ATen's order.
LARGEBATCH_CLONES
void forward_image(const float* image, const float* weight, const float* bias, const Shape& s, float* out,
                   uint8_t* winner, float* rows) {
  const int64_t n = s.stride();
  float* __restrict a = rows;          // window position (0, 0)
  float* __restrict b = rows + n;      // (0, 1)
  float* __restrict c = rows + 2 * n;  // (1, 0)
  float* __restrict d = rows + 3 * n;  // (1, 1)
  for (int64_t co = 0; co < s.out_channels; ++co) {
    const float* w9 = weight + co * s.in_channels * 9;
    const float start = bias ? bias[co] : 0.f;
    // One group of lanes at a time, its four sums kept in registers through all taps.
    for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
      float sa[kLanes], sb[kLanes], sc[kLanes], sd[kLanes];
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) sa[j] = sb[j] = sc[j] = sd[j] = start;
      for (int64_t ci = 0; ci < s.in_channels; ++ci)
        for (int64_t ky = 0; ky < 3; ++ky)
          for (int64_t kx = 0; kx < 3; ++kx) {
            const float k = w9[ci * 9 + ky * 3 + kx];
            const float* __restrict p00 = shifted(image, s, ci, ky, kx) + i0;
            const float* __restrict p01 = shifted(image, s, ci, ky, kx + 1) + i0;
            const float* __restrict p10 = shifted(image, s, ci, ky + 1, kx) + i0;
            const float* __restrict p11 = shifted(image, s, ci, ky + 1, kx + 1) + i0;
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              sa[j] = sa[j] + k * p00[j];
              sb[j] = sb[j] + k * p01[j];
              sc[j] = sc[j] + k * p10[j];
              sd[j] = sd[j] + k * p11[j];
            }
          }
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        a[i0 + j] = sa[j];
        b[i0 + j] = sb[j];
        c[i0 + j] = sc[j];
        d[i0 + j] = sd[j];
      }
    }
    float* __restrict m_out = out + co * s.plane();
    uint8_t* __restrict k_out = winner + co * s.plane();
#pragma omp simd
    for (int64_t i = 0; i < s.plane(); ++i) {
      // ATen's order: the first tap, then each later one that is greater or NaN.
      float m = a[i];
      int32_t k = 0;
      bool take = b[i] > m || b[i] != b[i];
      m = take ? b[i] : m;
      k = take ? 1 : k;
      take = c[i] > m || c[i] != c[i];
      m = take ? c[i] : m;
      k = take ? 2 : k;
      take = d[i] > m || d[i] != d[i];
      m = take ? d[i] : m;
      k = take ? 3 : k;
      m_out[i] = m;
      k_out[i] = static_cast<uint8_t>(k);
    }
  }
}

// One image's contribution to the per-lane sums: every pooled output's gradient times the input under each tap
// at its window's winner. grad_plane and winner_plane: one output channel's plane, padded (zero gradients).
LARGEBATCH_CLONES
void backward_image(const float* image, const float* grad, const uint8_t* winner, const Shape& s, float* weight_lanes,
                    float* bias_lanes, float* grad_plane, int32_t* winner_plane) {
  const int64_t n = s.stride();
  for (int64_t co = 0; co < s.out_channels; ++co) {
    std::copy(grad + co * s.plane(), grad + (co + 1) * s.plane(), grad_plane);
    for (int64_t i = 0; i < s.plane(); ++i) winner_plane[i] = winner[co * s.plane() + i];
    const float* __restrict g = grad_plane;
    const int32_t* __restrict q = winner_plane;
    float* __restrict bl = bias_lanes + co * kLanes;
    for (int64_t i0 = 0; i0 < n; i0 += kLanes)
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) bl[j] = bl[j] + g[i0 + j];
    for (int64_t ci = 0; ci < s.in_channels; ++ci)
      for (int64_t ky = 0; ky < 3; ++ky)
        for (int64_t kx = 0; kx < 3; ++kx) {
          const float* __restrict p00 = shifted(image, s, ci, ky, kx);
          const float* __restrict p01 = shifted(image, s, ci, ky, kx + 1);
          const float* __restrict p10 = shifted(image, s, ci, ky + 1, kx);
          const float* __restrict p11 = shifted(image, s, ci, ky + 1, kx + 1);
          float* __restrict t = weight_lanes + ((co * s.in_channels + ci) * 9 + ky * 3 + kx) * kLanes;
          for (int64_t i0 = 0; i0 < n; i0 += kLanes)
#pragma omp simd
            for (int64_t j = 0; j < kLanes; ++j) {
              const int64_t i = i0 + j;
              const float v = q[i] == 0 ? p00[i] : q[i] == 1 ? p01[i] : q[i] == 2 ? p10[i] : p11[i];
              t[j] = t[j] + g[i] * v;
            }
        }
  }
}

void forward_all(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, const Shape& s,
                 torch::Tensor& out, torch::Tensor& winner) {
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  uint8_t* kp = winner.data_ptr<uint8_t>();
  const int64_t in_image = s.in_channels * s.height * s.width, out_image = s.out_channels * s.plane();
  at::parallel_for(0, x.size(0), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> image(static_cast<size_t>(s.image_floats())), rows(static_cast<size_t>(4 * s.stride()));
    std::vector<float> padded(static_cast<size_t>(s.padded_floats()));
    for (int64_t n = begin; n < end; ++n) {
      shift_planes(xp + n * in_image, s, image.data(), padded.data());
      forward_image(image.data(), wp, bp, s, op + n * out_image, kp + n * out_image, rows.data());
    }
  });
}

// Weight and bias gradients: per chunk of kChunk images, float lanes, added up in double in lane order; the
// chunks' sums then added in chunk order.
void backward_all(const torch::Tensor& x, const torch::Tensor& grad, const torch::Tensor& winner, const Shape& s,
                  torch::Tensor& grad_weight, torch::Tensor* grad_bias) {
  const float* xp = x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const uint8_t* kp = winner.data_ptr<uint8_t>();
  const int64_t n = x.size(0), chunks = (n + kChunk - 1) / kChunk;
  const int64_t in_image = s.in_channels * s.height * s.width, out_image = s.out_channels * s.plane();
  const int64_t taps = s.out_channels * s.in_channels * 9, sums = taps + s.out_channels;
  std::vector<double> partial(static_cast<size_t>(chunks * sums));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> image(static_cast<size_t>(s.image_floats())), lanes(static_cast<size_t>(sums * kLanes));
    std::vector<float> padded(static_cast<size_t>(s.padded_floats()));
    std::vector<float> grad_plane(static_cast<size_t>(s.stride()), 0.f);
    std::vector<int32_t> winner_plane(static_cast<size_t>(s.stride()), 0);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(lanes.begin(), lanes.end(), 0.f);
      for (int64_t i = chunk * kChunk; i < std::min(n, (chunk + 1) * kChunk); ++i) {
        shift_planes(xp + i * in_image, s, image.data(), padded.data());
        backward_image(image.data(), gp + i * out_image, kp + i * out_image, s, lanes.data(),
                       lanes.data() + taps * kLanes, grad_plane.data(), winner_plane.data());
      }
      double* p = partial.data() + chunk * sums;
      for (int64_t j = 0; j < sums; ++j) {
        double total = 0;
        for (int64_t i = 0; i < kLanes; ++i) total += lanes[static_cast<size_t>(j * kLanes + i)];
        p[j] = total;
      }
    }
  });
  std::vector<double> total(static_cast<size_t>(sums), 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t j = 0; j < sums; ++j) total[static_cast<size_t>(j)] += partial[static_cast<size_t>(chunk * sums + j)];
  float* gw = grad_weight.data_ptr<float>();
  for (int64_t j = 0; j < taps; ++j) gw[j] = static_cast<float>(total[static_cast<size_t>(j)]);
  if (grad_bias) {
    float* gb = grad_bias->data_ptr<float>();
    for (int64_t j = 0; j < s.out_channels; ++j) gb[j] = static_cast<float>(total[static_cast<size_t>(taps + j)]);
  }
}

class ConvMaxPoolFunction : public torch::autograd::Function<ConvMaxPoolFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& bias) {
    const Shape s = shape_of(x, weight);
    auto out = torch::empty({x.size(0), s.out_channels, s.pooled_h, s.pooled_w}, x.options());
    auto winner = torch::empty(out.sizes(), x.options().dtype(torch::kUInt8));
    // No bias comes as an empty tensor: autograd's inputs must be defined.
    const bool has_bias = bias.numel() > 0;
    forward_all(x, weight.contiguous(), has_bias ? bias : torch::Tensor(), s, out, winner);
    ctx->saved_data["has_bias"] = has_bias;
    ctx->save_for_backward({x, weight, bias, winner});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &weight = saved[1], &winner = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const torch::Tensor bias = has_bias ? saved[2] : torch::Tensor();
    const auto grad = grad_outputs[0].contiguous();
    if (torch::GradMode::is_enabled()) {
      // create_graph: LibTorch's convolution, read at this pass's winners, differentiated by autograd.
      const int64_t w = x.size(3);
      const auto ph = torch::arange(winner.size(2), winner.options().dtype(torch::kLong)).view({1, 1, -1, 1});
      const auto pw = torch::arange(winner.size(3), winner.options().dtype(torch::kLong)).view({1, 1, 1, -1});
      const auto q = winner.to(torch::kLong);
      const auto index = (2 * ph + q.div(2, "floor")) * w + 2 * pw + q.remainder(2);
      const auto full = torch::nn::functional::conv2d(
          x, weight, torch::nn::functional::Conv2dFuncOptions().bias(bias).stride(1).padding(1));
      const auto pooled = full.flatten(2).gather(2, index.flatten(2)).view(grad.sizes());
      std::vector<torch::Tensor> wrt{weight};
      if (has_bias) wrt.push_back(bias);
      const auto grads = torch::autograd::grad({pooled}, wrt, {grad}, /*retain_graph=*/true, /*create_graph=*/true);
      return {torch::Tensor(), grads[0], has_bias ? grads[1] : torch::Tensor()};
    }
    const Shape s = shape_of(x, weight);
    auto grad_weight = torch::empty(weight.sizes(), weight.options());
    torch::Tensor grad_bias = has_bias ? torch::empty(bias.sizes(), bias.options()) : torch::Tensor();
    backward_all(x, grad, winner, s, grad_weight, has_bias ? &grad_bias : nullptr);
    return {torch::Tensor(), grad_weight, grad_bias};
  }
};

}  // namespace

bool conv3x3_max_pool2_takes(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  const auto is_cpu_float = [](const torch::Tensor& t) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.layout() == torch::kStrided;
  };
  if (!is_cpu_float(x) || x.dim() != 4 || !x.is_contiguous() || x.requires_grad() || x.size(0) < 1 ||
      x.size(2) < 2 || x.size(3) < 2)
    return false;
  if (!is_cpu_float(weight) || weight.dim() != 4 || !weight.is_contiguous() || weight.size(0) < 1 ||
      weight.size(1) != x.size(1) || weight.size(1) > 16 || weight.size(2) != 3 || weight.size(3) != 3 ||
      weight._fw_grad(/*level=*/0).defined())
    return false;
  if (bias.defined() && (!is_cpu_float(bias) || bias.dim() != 1 || bias.size(0) != weight.size(0) ||
                         !bias.is_contiguous() || bias._fw_grad(/*level=*/0).defined()))
    return false;
  return true;
}

torch::Tensor conv3x3_max_pool2(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(conv3x3_max_pool2_takes(x, weight, bias), "conv3x3_max_pool2: input or parameters it does not take");
  RECORD_FUNCTION("largebatch::conv3x3_max_pool2", std::vector<c10::IValue>{});  // named in profiles
  return ConvMaxPoolFunction::apply(x, weight, bias.defined() ? bias : torch::empty({0}, weight.options()));
}

}  // namespace models
}  // namespace largebatch
