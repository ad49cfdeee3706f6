#include <largebatch/models/winograd_conv.h>

#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/torch.h>

#include <array>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>

#ifdef LARGEBATCH_WITH_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>
#endif

#include "env_switch.h"

namespace largebatch {
namespace models {

namespace {

// LARGEBATCH_WINOGRAD=0 switches this kernel alone off (env_switch.h).
bool winograd_wanted() {
  static const bool wanted = env_switch_on("LARGEBATCH_WINOGRAD");
  return wanted;
}

#ifdef LARGEBATCH_WITH_ONEDNN

using Tag = dnnl::memory::format_tag;
using DataType = dnnl::memory::data_type;
using Args = std::unordered_map<int, dnnl::memory>;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive with its scratchpad size: every primitive here has a user scratchpad, allocated per call, so
// that calls from several threads never share one (oneDNN's own is shared between primitives).
struct Step {
  dnnl::primitive primitive;
  dnnl::memory::desc scratchpad;
};

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

Step reorder_step(const dnnl::memory::desc& from, const dnnl::memory::desc& to) {
  const dnnl::reorder::primitive_desc pd(cpu_engine(), from, cpu_engine(), to, user_scratchpad());
  return {dnnl::reorder(pd), pd.scratchpad_desc()};
}

// Everything one shape needs, built once: the three convolutions in oneDNN's blocked layouts and the reorders
// between those and LibTorch's NCHW / OIHW tensors.
struct Plan {
  dnnl::memory::desc plain_src, plain_dst, plain_weights, plain_bias;
  dnnl::memory::desc src, dst, weights;      // forward
  dnnl::memory::desc bd_diff_dst, bd_weights, bd_diff_src;  // input gradient
  dnnl::memory::desc bw_src, bw_diff_dst, bw_diff_weights, bw_diff_bias;  // weight gradient
  Step forward, backward_data, backward_weights;
  Step src_in, weights_in, dst_out;
  Step diff_dst_in_bd, bd_weights_in, diff_src_out;
  Step diff_dst_in_bw, src_in_bw, diff_weights_out, diff_bias_out;
};

using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, bool>;  // N, C_in, C_out, H, W, bias

bool is_winograd(const char* impl) { return std::string(impl).find("wino") != std::string::npos; }

// nullptr where oneDNN has no Winograd kernel for the shape on this CPU.
std::shared_ptr<const Plan> build_plan(const ShapeKey& key) {
  const auto [n, c, k, h, w, has_bias] = key;
  auto plan = std::make_shared<Plan>();
  const dnnl::memory::dims src{n, c, h, w}, weights{k, c, 3, 3}, dst{n, k, h, w}, bias{k};
  const dnnl::memory::dims strides{1, 1}, padding{1, 1};
  plan->plain_src = {src, DataType::f32, Tag::nchw};
  plan->plain_dst = {dst, DataType::f32, Tag::nchw};
  plan->plain_weights = {weights, DataType::f32, Tag::oihw};
  plan->plain_bias = {bias, DataType::f32, Tag::x};
  const dnnl::memory::desc any_src(src, DataType::f32, Tag::any), any_weights(weights, DataType::f32, Tag::any),
      any_dst(dst, DataType::f32, Tag::any), any_bias(bias, DataType::f32, Tag::any), no_bias;
  const auto attr = user_scratchpad();
  const auto algorithm = dnnl::algorithm::convolution_winograd;
  try {
    const dnnl::convolution_forward::primitive_desc fwd(
        dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algorithm, any_src, any_weights,
                                        has_bias ? any_bias : no_bias, any_dst, strides, padding, padding),
        attr, cpu_engine());
    const dnnl::convolution_backward_data::primitive_desc bd(
        dnnl::convolution_backward_data::desc(algorithm, any_src, any_weights, any_dst, strides, padding, padding),
        attr, cpu_engine(), fwd);
    const dnnl::convolution_backward_weights::primitive_desc bw(
        dnnl::convolution_backward_weights::desc(algorithm, any_src, any_weights, has_bias ? any_bias : no_bias,
                                                 any_dst, strides, padding, padding),
        attr, cpu_engine(), fwd);
    if (!is_winograd(fwd.impl_info_str()) || !is_winograd(bd.impl_info_str()) || !is_winograd(bw.impl_info_str()))
      return nullptr;
    plan->src = fwd.src_desc();
    plan->dst = fwd.dst_desc();
    plan->weights = fwd.weights_desc();
    plan->bd_diff_dst = bd.diff_dst_desc();
    plan->bd_weights = bd.weights_desc();
    plan->bd_diff_src = bd.diff_src_desc();
    plan->bw_src = bw.src_desc();
    plan->bw_diff_dst = bw.diff_dst_desc();
    plan->bw_diff_weights = bw.diff_weights_desc();
    if (has_bias) plan->bw_diff_bias = bw.diff_bias_desc();
    plan->forward = {dnnl::convolution_forward(fwd), fwd.scratchpad_desc()};
    plan->backward_data = {dnnl::convolution_backward_data(bd), bd.scratchpad_desc()};
    plan->backward_weights = {dnnl::convolution_backward_weights(bw), bw.scratchpad_desc()};
    plan->src_in = reorder_step(plan->plain_src, plan->src);
    plan->weights_in = reorder_step(plan->plain_weights, plan->weights);
    plan->dst_out = reorder_step(plan->dst, plan->plain_dst);
    plan->diff_dst_in_bd = reorder_step(plan->plain_dst, plan->bd_diff_dst);
    plan->bd_weights_in = reorder_step(plan->plain_weights, plan->bd_weights);
    plan->diff_src_out = reorder_step(plan->bd_diff_src, plan->plain_src);
    plan->diff_dst_in_bw = reorder_step(plan->plain_dst, plan->bw_diff_dst);
    plan->src_in_bw = reorder_step(plan->src, plan->bw_src);
    plan->diff_weights_out = reorder_step(plan->bw_diff_weights, plan->plain_weights);
    if (has_bias) plan->diff_bias_out = reorder_step(plan->bw_diff_bias, plan->plain_bias);
  } catch (const dnnl::error&) {
    return nullptr;  // no Winograd kernel here (no AVX-512, or a shape it does not take)
  }
  return plan;
}

std::shared_ptr<const Plan> plan_for(const ShapeKey& key) {
  static std::mutex mutex;
  static std::map<ShapeKey, std::shared_ptr<const Plan>> plans;  // nullptr: not available
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, build_plan(key)).first;
  return it->second;
}

ShapeKey key_of(const torch::Tensor& x, const torch::Tensor& weight, bool has_bias) {
  return {x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3), has_bias};
}

// A LibTorch-owned buffer for a oneDNN layout, so that the caching allocator serves it.
torch::Tensor buffer_for(const dnnl::memory::desc& desc) {
  return torch::empty({static_cast<int64_t>(desc.get_size())}, torch::TensorOptions().dtype(torch::kUInt8));
}

// The buffers that live only during one call (blocked outputs and gradients, scratchpads) are kept per thread
// and grown to the largest size asked: fresh buffers of tens of megabytes per call cost page faults
// (docs/PERFORMANCE.md). Calls on one thread run one at a time, so one buffer per role suffices.
enum class Slot { scratchpad, dst, weights, diff_dst, diff_src, diff_dst_bw, src_bw, diff_weights, diff_bias, count };

torch::Tensor workspace(Slot slot, const dnnl::memory::desc& desc) {
  thread_local std::array<torch::Tensor, static_cast<size_t>(Slot::count)> buffers;
  auto& buffer = buffers[static_cast<size_t>(slot)];
  if (!buffer.defined() || buffer.numel() < static_cast<int64_t>(desc.get_size())) buffer = buffer_for(desc);
  return buffer;
}

dnnl::memory view(const dnnl::memory::desc& desc, const torch::Tensor& t) {
  return dnnl::memory(desc, cpu_engine(), t.data_ptr());
}

void run(const Step& step, dnnl::stream& stream, Args args) {
  torch::Tensor scratchpad;
  if (step.scratchpad.get_size() > 0) {
    scratchpad = workspace(Slot::scratchpad, step.scratchpad);
    args.emplace(DNNL_ARG_SCRATCHPAD, view(step.scratchpad, scratchpad));
  }
  step.primitive.execute(stream, args);
  stream.wait();
}

void reorder(const Step& step, dnnl::stream& stream, const dnnl::memory& from, const dnnl::memory& to) {
  run(step, stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
}

// `from` in layout `have`, wanted in layout `want`: itself where they agree, else reordered into the thread's
// buffer for `slot`.
torch::Tensor in_layout(const Step& step, dnnl::stream& stream, const dnnl::memory::desc& have, const torch::Tensor& from,
                        const dnnl::memory::desc& want, Slot slot) {
  if (have == want) return from;
  auto to = workspace(slot, want);
  reorder(step, stream, view(have, from), view(want, to));
  return to;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class WinogradConvFunction : public torch::autograd::Function<WinogradConvFunction> {
 public:
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& bias) {
    // No bias comes as an empty tensor: autograd's inputs must be defined.
    const bool has_bias = bias.numel() > 0;
    const auto plan = plan_for(key_of(x, weight, has_bias));
    TORCH_CHECK(plan, "winograd_conv3x3: no Winograd kernel for this shape");
    dnnl::stream stream(cpu_engine());
    auto x_blocked = buffer_for(plan->src);
    reorder(plan->src_in, stream, view(plan->plain_src, x), view(plan->src, x_blocked));
    auto weights = workspace(Slot::weights, plan->weights);
    reorder(plan->weights_in, stream, view(plan->plain_weights, weight), view(plan->weights, weights));
    auto y_blocked = workspace(Slot::dst, plan->dst);
    Args args{{DNNL_ARG_SRC, view(plan->src, x_blocked)},
              {DNNL_ARG_WEIGHTS, view(plan->weights, weights)},
              {DNNL_ARG_DST, view(plan->dst, y_blocked)}};
    torch::Tensor bias_in;
    if (has_bias) {
      bias_in = bias.contiguous();
      args.emplace(DNNL_ARG_BIAS, view(plan->plain_bias, bias_in));
    }
    run(plan->forward, stream, std::move(args));
    auto y = torch::empty({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options());
    reorder(plan->dst_out, stream, view(plan->dst, y_blocked), view(plan->plain_dst, y));
    ctx->saved_data["has_bias"] = has_bias;
    ctx->save_for_backward({x, weight, bias, x_blocked});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const torch::Tensor &x = saved[0], &weight = saved[1], &x_blocked = saved[3];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const torch::Tensor bias = has_bias ? saved[2] : torch::Tensor();
    const bool want_x = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1),
               want_b = has_bias && ctx->needs_input_grad(2);
    const auto grad = grad_outputs[0].contiguous();
    if (torch::GradMode::is_enabled()) {
      // create_graph: LibTorch's convolution, differentiated by autograd.
      const auto y = torch::nn::functional::conv2d(
          x, weight, torch::nn::functional::Conv2dFuncOptions().bias(bias).stride(1).padding(1));
      std::vector<torch::Tensor> wrt;
      if (want_x) wrt.push_back(x);
      if (want_w) wrt.push_back(weight);
      if (want_b) wrt.push_back(bias);
      if (wrt.empty()) return {torch::Tensor(), torch::Tensor(), torch::Tensor()};
      const auto grads = torch::autograd::grad({y}, wrt, {grad}, /*retain_graph=*/true, /*create_graph=*/true);
      size_t i = 0;
      torch::Tensor gx = want_x ? grads[i++] : torch::Tensor();
      torch::Tensor gw = want_w ? grads[i++] : torch::Tensor();
      torch::Tensor gb = want_b ? grads[i++] : torch::Tensor();
      return {gx, gw, gb};
    }
    const auto plan = plan_for(key_of(x, weight, has_bias));
    TORCH_CHECK(plan, "winograd_conv3x3: no Winograd kernel for this shape");
    dnnl::stream stream(cpu_engine());
    torch::Tensor grad_x, grad_w, grad_b;
    torch::Tensor diff_dst_bd;
    if (want_x) {
      diff_dst_bd = workspace(Slot::diff_dst, plan->bd_diff_dst);
      reorder(plan->diff_dst_in_bd, stream, view(plan->plain_dst, grad), view(plan->bd_diff_dst, diff_dst_bd));
      auto weights = workspace(Slot::weights, plan->bd_weights);
      reorder(plan->bd_weights_in, stream, view(plan->plain_weights, weight), view(plan->bd_weights, weights));
      auto diff_src = workspace(Slot::diff_src, plan->bd_diff_src);
      run(plan->backward_data, stream,
          {{DNNL_ARG_DIFF_DST, view(plan->bd_diff_dst, diff_dst_bd)},
           {DNNL_ARG_WEIGHTS, view(plan->bd_weights, weights)},
           {DNNL_ARG_DIFF_SRC, view(plan->bd_diff_src, diff_src)}});
      grad_x = torch::empty(x.sizes(), x.options());
      reorder(plan->diff_src_out, stream, view(plan->bd_diff_src, diff_src), view(plan->plain_src, grad_x));
    }
    if (want_w || want_b) {
      torch::Tensor diff_dst_bw;
      if (diff_dst_bd.defined() && plan->bd_diff_dst == plan->bw_diff_dst) {
        diff_dst_bw = diff_dst_bd;
      } else {
        diff_dst_bw = workspace(Slot::diff_dst_bw, plan->bw_diff_dst);
        reorder(plan->diff_dst_in_bw, stream, view(plan->plain_dst, grad), view(plan->bw_diff_dst, diff_dst_bw));
      }
      const auto src = in_layout(plan->src_in_bw, stream, plan->src, x_blocked, plan->bw_src, Slot::src_bw);
      auto diff_weights = workspace(Slot::diff_weights, plan->bw_diff_weights);
      Args args{{DNNL_ARG_SRC, view(plan->bw_src, src)},
                {DNNL_ARG_DIFF_DST, view(plan->bw_diff_dst, diff_dst_bw)},
                {DNNL_ARG_DIFF_WEIGHTS, view(plan->bw_diff_weights, diff_weights)}};
      torch::Tensor diff_bias;
      if (has_bias) {
        diff_bias = workspace(Slot::diff_bias, plan->bw_diff_bias);
        args.emplace(DNNL_ARG_DIFF_BIAS, view(plan->bw_diff_bias, diff_bias));
      }
      run(plan->backward_weights, stream, std::move(args));
      if (want_w) {
        grad_w = torch::empty(weight.sizes(), weight.options());
        reorder(plan->diff_weights_out, stream, view(plan->bw_diff_weights, diff_weights),
                view(plan->plain_weights, grad_w));
      }
      if (want_b) {
        grad_b = torch::empty(bias.sizes(), bias.options());
        reorder(plan->diff_bias_out, stream, view(plan->bw_diff_bias, diff_bias), view(plan->plain_bias, grad_b));
      }
    }
    return {grad_x, grad_w, grad_b};
  }
};

#endif  // LARGEBATCH_WITH_ONEDNN

}  // namespace

bool winograd_conv3x3_geometry(c10::IntArrayRef kernel, c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups) {
  const auto all = [](c10::IntArrayRef values, int64_t wanted) {
    return values.size() == 2 && values[0] == wanted && values[1] == wanted;
  };
  return groups == 1 && all(kernel, 3) && all(stride, 1) && all(padding, 1) && all(dilation, 1);
}

bool winograd_conv3x3_takes(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  const auto is_cpu_float = [](const torch::Tensor& t) {
    return t.defined() && t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.layout() == torch::kStrided;
  };
  if (!is_cpu_float(x) || x.dim() != 4 || !x.is_contiguous() || x.size(0) < 1 || x.size(2) < 1 || x.size(3) < 1 ||
      x._fw_grad(/*level=*/0).defined())
    return false;
  if (!is_cpu_float(weight) || weight.dim() != 4 || !weight.is_contiguous() || weight.size(1) != x.size(1) ||
      weight.size(1) < 32 || weight.size(0) < 64 || weight.size(2) != 3 || weight.size(3) != 3 ||
      weight._fw_grad(/*level=*/0).defined())
    return false;
  if (bias.defined() && (!is_cpu_float(bias) || bias.dim() != 1 || bias.size(0) != weight.size(0) ||
                         bias._fw_grad(/*level=*/0).defined()))
    return false;
  if (at::autocast::is_cpu_enabled() || !winograd_wanted()) return false;
#ifdef LARGEBATCH_WITH_ONEDNN
  return plan_for(key_of(x, weight, bias.defined())) != nullptr;
#else
  return false;
#endif
}

torch::Tensor winograd_conv3x3(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias) {
  TORCH_CHECK(winograd_conv3x3_takes(x, weight, bias), "winograd_conv3x3: input or parameters it does not take");
#ifdef LARGEBATCH_WITH_ONEDNN
  RECORD_FUNCTION("largebatch::winograd_conv3x3", std::vector<c10::IValue>{});  // named in profiles
  return WinogradConvFunction::apply(x, weight, bias.defined() ? bias : torch::empty({0}, weight.options()));
#else
  return torch::Tensor();  // unreachable: takes() is false without oneDNN
#endif
}

}  // namespace models
}  // namespace largebatch
