// A first 3x3 convolution fused with the 2x2 max pooling after it (include/largebatch/models/conv_pool.h says
// what and why).
#include "largebatch/models/conv_pool.h"

#include "../core/instruction_sets.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/nn/functional/conv.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace largebatch {
namespace models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Images per chunk of the backward pass: the chunks, not the threads, fix the summation order.
constexpr int64_t kChunk = 16;

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

// One instruction set's per-image kernels (conv_pool_kernels.inc says what they compute).
struct Kernels {
  const char* name;
  void (*forward_image)(const float* image, const float* weight, const float* bias, const Shape& s, float* out,
                        uint16_t* out_bf16, uint8_t* winner);
  void (*backward_image)(const float* image, const float* grad, const uint16_t* grad_bf16, const uint8_t* winner,
                         const Shape& s, float* weight_lanes, float* bias_lanes);
};

// The kernels once per instruction set, each under its target pragma (so that its vector types are its
// registers' width from the start), chosen at run time: the binary stays portable. Other compilers get the
// baseline alone.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LARGEBATCH_CONV_POOL_X86 1
#pragma GCC push_options
#pragma GCC target("avx512f")
namespace avx512 {
constexpr int kWidth = 16;
constexpr const char* kName = "avx512";
#include "conv_pool_kernels.inc"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
constexpr int kWidth = 8;
constexpr const char* kName = "avx2";
#include "conv_pool_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
constexpr int kWidth = 4;
constexpr const char* kName = "baseline";
#include "conv_pool_kernels.inc"
}  // namespace baseline

// The sets this CPU runs, narrowest first; the widest, or LARGEBATCH_CONV_POOL_SIMD's choice (read at the first
// call).
core::InstructionSets<Kernels>& instruction_sets() {
  static core::InstructionSets<Kernels> sets(
      [] {
        std::vector<const Kernels*> v{&baseline::kernels};
#ifdef LARGEBATCH_CONV_POOL_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2")) v.push_back(&avx2::kernels);
        if (__builtin_cpu_supports("avx512f")) v.push_back(&avx512::kernels);
#endif
        return v;
      }(),
      "LARGEBATCH_CONV_POOL_SIMD");
  return sets;
}
const Kernels& active_kernels() { return instruction_sets().active(); }

// out: float, or bfloat16 (the maxima rounded as Tensor::to rounds them).
void forward_all(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, const Shape& s,
                 torch::Tensor& out, torch::Tensor& winner) {
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  float* op = bf16 ? nullptr : out.data_ptr<float>();
  uint16_t* hp = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  uint8_t* kp = winner.data_ptr<uint8_t>();
  const int64_t in_image = s.in_channels * s.height * s.width, out_image = s.out_channels * s.plane();
  const Kernels& kernels = active_kernels();
  at::parallel_for(0, x.size(0), 4, [&](int64_t begin, int64_t end) {
    std::vector<float> image(static_cast<size_t>(s.image_floats()));
    std::vector<float> padded(static_cast<size_t>(s.padded_floats()));
    for (int64_t n = begin; n < end; ++n) {
      shift_planes(xp + n * in_image, s, image.data(), padded.data());
      kernels.forward_image(image.data(), wp, bp, s, op ? op + n * out_image : nullptr,
                            hp ? hp + n * out_image : nullptr, kp + n * out_image);
    }
  });
}

// Weight and bias gradients (grad float or bfloat16): per chunk of kChunk images, float lanes, added up in double
// in lane order; the chunks' sums then added in chunk order.
void backward_all(const torch::Tensor& x, const torch::Tensor& grad, const torch::Tensor& winner, const Shape& s,
                  torch::Tensor& grad_weight, torch::Tensor* grad_bias) {
  const float* xp = x.data_ptr<float>();
  const bool bf16 = grad.scalar_type() == torch::kBFloat16;
  const float* gp = bf16 ? nullptr : grad.data_ptr<float>();
  const uint16_t* hp = bf16 ? reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>()) : nullptr;
  const uint8_t* kp = winner.data_ptr<uint8_t>();
  const int64_t n = x.size(0), chunks = (n + kChunk - 1) / kChunk;
  const int64_t in_image = s.in_channels * s.height * s.width, out_image = s.out_channels * s.plane();
  const int64_t taps = s.out_channels * s.in_channels * 9, sums = taps + s.out_channels;
  std::vector<double> partial(static_cast<size_t>(chunks * sums));
  const Kernels& kernels = active_kernels();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> image(static_cast<size_t>(s.image_floats())), lanes(static_cast<size_t>(sums * kLanes));
    std::vector<float> padded(static_cast<size_t>(s.padded_floats()));
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      std::fill(lanes.begin(), lanes.end(), 0.f);
      for (int64_t i = chunk * kChunk; i < std::min(n, (chunk + 1) * kChunk); ++i) {
        shift_planes(xp + i * in_image, s, image.data(), padded.data());
        kernels.backward_image(image.data(), gp ? gp + i * out_image : nullptr, hp ? hp + i * out_image : nullptr,
                               kp + i * out_image, s, lanes.data(), lanes.data() + taps * kLanes);
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
                               const torch::Tensor& bias, torch::ScalarType output_type) {
    const Shape s = shape_of(x, weight);
    auto out = torch::empty({x.size(0), s.out_channels, s.pooled_h, s.pooled_w}, x.options().dtype(output_type));
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
      const auto grads = torch::autograd::grad({pooled}, wrt, {grad.to(torch::kFloat)}, /*retain_graph=*/true,
                                               /*create_graph=*/true);
      return {torch::Tensor(), grads[0], has_bias ? grads[1] : torch::Tensor(), torch::Tensor()};
    }
    const Shape s = shape_of(x, weight);
    auto grad_weight = torch::empty(weight.sizes(), weight.options());
    torch::Tensor grad_bias = has_bias ? torch::empty(bias.sizes(), bias.options()) : torch::Tensor();
    backward_all(x, grad, winner, s, grad_weight, has_bias ? &grad_bias : nullptr);
    return {torch::Tensor(), grad_weight, grad_bias, torch::Tensor()};
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

std::vector<std::string> conv3x3_max_pool2_instruction_sets() { return instruction_sets().names(); }

std::string conv3x3_max_pool2_instruction_set() { return active_kernels().name; }

void use_conv3x3_max_pool2_instruction_set(const std::string& name) {
  instruction_sets().use(name, "use_conv3x3_max_pool2_instruction_set");
}

torch::Tensor conv3x3_max_pool2(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                torch::ScalarType output_type) {
  TORCH_CHECK(conv3x3_max_pool2_takes(x, weight, bias), "conv3x3_max_pool2: input or parameters it does not take");
  TORCH_CHECK(output_type == torch::kFloat || output_type == torch::kBFloat16,
              "conv3x3_max_pool2: output type ", output_type, " is not float or bfloat16");
  RECORD_FUNCTION("largebatch::conv3x3_max_pool2", std::vector<c10::IValue>{});  // named in profiles
  return ConvMaxPoolFunction::apply(x, weight, bias.defined() ? bias : torch::empty({0}, weight.options()),
                                    output_type);
}

}  // namespace models
}  // namespace largebatch
