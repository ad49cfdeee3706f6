// A first 3x3 convolution fused with the 2x2 max pooling after it (include/largebatch/models/conv_pool.h says
// what and why).
#include "largebatch/models/conv_pool.h"

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
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

struct Shape {
  int64_t in_channels, height, width, out_channels, pooled_h, pooled_w;
  // One image's zero-padded input, each padded row split into its even and odd columns (pooled_w + 1 each):
  // the taps of an output pair (even column, odd column) then read contiguous runs of pooled_w values.
  int64_t half() const { return pooled_w + 1; }
  int64_t padded_rows() const { return height + 2; }
  int64_t image_floats() const { return in_channels * padded_rows() * 2 * half(); }
};

Shape shape_of(const torch::Tensor& x, const torch::Tensor& weight) {
  return {x.size(1), x.size(2), x.size(3), weight.size(0), x.size(2) / 2, x.size(3) / 2};
}

// The even-column half of padded row r of channel ci (the odd half follows it).
inline float* even_half(float* image, const Shape& s, int64_t ci, int64_t r) {
  return image + (ci * s.padded_rows() + r) * 2 * s.half();
}

void split_padded(const float* x, const Shape& s, float* image) {
  std::fill(image, image + s.image_floats(), 0.f);
  for (int64_t ci = 0; ci < s.in_channels; ++ci)
    for (int64_t y = 0; y < s.height; ++y) {
      float* even = even_half(image, s, ci, y + 1);
      float* odd = even + s.half();
      const float* row = x + (ci * s.height + y) * s.width;
      // Input column w sits at padded column w + 1.
      for (int64_t w = 0; w < s.width && (w + 1) / 2 < s.half(); ++w) ((w + 1) % 2 == 0 ? even : odd)[(w + 1) / 2] = row[w];
    }
}

// One image: for each output channel and pooled row, the convolution's four outputs of every 2x2 window (row
// 2ph and 2ph+1, even and odd column), each the bias and then the taps in (input channel, row, column) order,
// and their maximum in ATen's order.
LARGEBATCH_CLONES
void forward_image(const float* image, const float* weight, const float* bias, const Shape& s, float* out,
                   uint8_t* winner, float* rows) {
  const int64_t pw_n = s.pooled_w, half = s.half();
  float* a = rows;             // row 2ph, even columns
  float* b = rows + pw_n;      // row 2ph, odd columns
  float* c = rows + 2 * pw_n;  // row 2ph+1, even columns
  float* d = rows + 3 * pw_n;  // row 2ph+1, odd columns
  for (int64_t co = 0; co < s.out_channels; ++co) {
    const float* w9 = weight + co * s.in_channels * 9;
    const float start = bias ? bias[co] : 0.f;
    for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
      for (int64_t i = 0; i < pw_n; ++i) a[i] = b[i] = c[i] = d[i] = start;
      for (int64_t ci = 0; ci < s.in_channels; ++ci)
        for (int64_t ky = 0; ky < 3; ++ky) {
          // Output row y reads padded rows y .. y+2; output column x padded columns x .. x+2.
          const float* e0 = image + (ci * s.padded_rows() + 2 * ph + ky) * 2 * half;
          const float* o0 = e0 + half;
          const float* e1 = e0 + 2 * half;
          const float* o1 = e1 + half;
          const float k0 = w9[ci * 9 + ky * 3], k1 = w9[ci * 9 + ky * 3 + 1], k2 = w9[ci * 9 + ky * 3 + 2];
          for (int64_t i = 0; i < pw_n; ++i) {
            a[i] = a[i] + k0 * e0[i];
            b[i] = b[i] + k0 * o0[i];
            c[i] = c[i] + k0 * e1[i];
            d[i] = d[i] + k0 * o1[i];
          }
          for (int64_t i = 0; i < pw_n; ++i) {
            a[i] = a[i] + k1 * o0[i];
            b[i] = b[i] + k1 * e0[i + 1];
            c[i] = c[i] + k1 * o1[i];
            d[i] = d[i] + k1 * e1[i + 1];
          }
          for (int64_t i = 0; i < pw_n; ++i) {
            a[i] = a[i] + k2 * e0[i + 1];
            b[i] = b[i] + k2 * o0[i + 1];
            c[i] = c[i] + k2 * e1[i + 1];
            d[i] = d[i] + k2 * o1[i + 1];
          }
        }
      float* m_row = out + (co * s.pooled_h + ph) * pw_n;
      uint8_t* k_row = winner + (co * s.pooled_h + ph) * pw_n;
      for (int64_t i = 0; i < pw_n; ++i) {
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
        m_row[i] = m;
        k_row[i] = static_cast<uint8_t>(k);
      }
    }
  }
}

// One image's contribution to the per-lane sums: for every pooled output, its gradient times the input under
// each tap at its window's winner, lane i summing pooled column i.
LARGEBATCH_CLONES
void backward_image(const float* image, const float* grad, const uint8_t* winner, const Shape& s, float* weight_lanes,
                    float* bias_lanes) {
  const int64_t pw_n = s.pooled_w, half = s.half();
  for (int64_t co = 0; co < s.out_channels; ++co)
    for (int64_t ph = 0; ph < s.pooled_h; ++ph) {
      const float* g = grad + (co * s.pooled_h + ph) * pw_n;
      const uint8_t* k = winner + (co * s.pooled_h + ph) * pw_n;
      float* bl = bias_lanes + co * pw_n;
      for (int64_t i = 0; i < pw_n; ++i) bl[i] = bl[i] + g[i];
      for (int64_t ci = 0; ci < s.in_channels; ++ci)
        for (int64_t ky = 0; ky < 3; ++ky) {
          const float* e0 = image + (ci * s.padded_rows() + 2 * ph + ky) * 2 * half;
          const float* o0 = e0 + half;
          const float* e1 = e0 + 2 * half;
          const float* o1 = e1 + half;
          float* t0 = weight_lanes + ((co * s.in_channels + ci) * 9 + ky * 3) * pw_n;
          float* t1 = t0 + pw_n;
          float* t2 = t1 + pw_n;
          // Winner 0: row 2ph, column 2pw; 1: row 2ph, column 2pw+1; 2 and 3: row 2ph+1.
          for (int64_t i = 0; i < pw_n; ++i) {
            const int32_t q = k[i];
            const float v0 = q == 0 ? e0[i] : q == 1 ? o0[i] : q == 2 ? e1[i] : o1[i];
            const float v1 = q == 0 ? o0[i] : q == 1 ? e0[i + 1] : q == 2 ? o1[i] : e1[i + 1];
            const float v2 = q == 0 ? e0[i + 1] : q == 1 ? o0[i + 1] : q == 2 ? e1[i + 1] : o1[i + 1];
            t0[i] = t0[i] + g[i] * v0;
            t1[i] = t1[i] + g[i] * v1;
            t2[i] = t2[i] + g[i] * v2;
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
  const int64_t in_image = s.in_channels * s.height * s.width, out_image = s.out_channels * s.pooled_h * s.pooled_w;
  at::parallel_for(0, x.size(0), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> image(static_cast<size_t>(s.image_floats())), rows(static_cast<size_t>(4 * s.pooled_w));
    for (int64_t n = begin; n < end; ++n) {
      split_padded(xp + n * in_image, s, image.data());
      forward_image(image.data(), wp, bp, s, op + n * out_image, kp + n * out_image, rows.data());
    }
  });
}

// Weight and bias gradients: per chunk of kChunk images, float lanes over the pooled columns, added up in
// double in lane order; the chunks' sums then added in chunk order.
void backward_all(const torch::Tensor& x, const torch::Tensor& grad, const torch::Tensor& winner, const Shape& s,
                  torch::Tensor& grad_weight, torch::Tensor* grad_bias) {
  const float* xp = x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  const uint8_t* kp = winner.data_ptr<uint8_t>();
  const int64_t n = x.size(0), chunks = (n + kChunk - 1) / kChunk;
  const int64_t in_image = s.in_channels * s.height * s.width, out_image = s.out_channels * s.pooled_h * s.pooled_w;
  const int64_t taps = s.out_channels * s.in_channels * 9, sums = taps + s.out_channels;
  std::vector<double> partial(static_cast<size_t>(chunks * sums));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> image(static_cast<size_t>(s.image_floats()));
    std::vector<float> lanes(static_cast<size_t>(sums * s.pooled_w));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(lanes.begin(), lanes.end(), 0.f);
      for (int64_t i = chunk * kChunk; i < std::min(n, (chunk + 1) * kChunk); ++i) {
        split_padded(xp + i * in_image, s, image.data());
        backward_image(image.data(), gp + i * out_image, kp + i * out_image, s, lanes.data(),
                       lanes.data() + taps * s.pooled_w);
      }
      double* p = partial.data() + chunk * sums;
      for (int64_t j = 0; j < sums; ++j) {
        double total = 0;
        for (int64_t i = 0; i < s.pooled_w; ++i) total += lanes[static_cast<size_t>(j * s.pooled_w + i)];
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
  return !at::autocast::is_cpu_enabled();
}

torch::Tensor conv3x3_max_pool2(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(conv3x3_max_pool2_takes(x, weight, bias), "conv3x3_max_pool2: input or parameters it does not take");
  RECORD_FUNCTION("largebatch::conv3x3_max_pool2", std::vector<c10::IValue>{});  // named in profiles
  return ConvMaxPoolFunction::apply(x, weight, bias.defined() ? bias : torch::empty({0}, weight.options()));
}

}  // namespace models
}  // namespace largebatch
