#include "step_kernels.h"
#include "step_simd.h"
#include "../core/instruction_sets.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>

namespace largebatch {
namespace optim {
namespace detail {

// ================================================================ per-tensor LibTorch operations

torch::Tensor tensor_ops_step(const StepEntry& e, bool record) {
  const LayerwiseOptions& o = *e.options;
  LayerwiseParamState& st = *e.state;
  const torch::Tensor& p = e.param;
  const double lr = e.lr;

  // Stage 0: the global pre-normalisation.
  torch::Tensor g = e.grad;
  if (e.grad_divisor_tensor.defined()) g = g / e.grad_divisor_tensor;
  else if (e.grad_divisor != 1) g = g / e.grad_divisor;

  // Stage 1: direction.
  torch::Tensor u;
  if (o.direction() == Direction::kAdam) {
    if (!st.exp_avg().defined()) {
      st.exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
      st.exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
    }
    auto& m = st.exp_avg();
    auto& v = st.exp_avg_sq();
    m.mul_(o.beta1()).add_(g, 1 - o.beta1());
    v.mul_(o.beta2()).addcmul_(g, g, 1 - o.beta2());
    if (o.bias_correction()) {
      const double bc1 = 1 - std::pow(o.beta1(), static_cast<double>(e.t + 1));
      const double bc2 = 1 - std::pow(o.beta2(), static_cast<double>(e.t + 1));
      u = (m / bc1).div_((v / bc2).sqrt_().add_(o.eps()));
    } else {
      u = m / v.sqrt().add_(o.eps());
    }
  } else {
    u = g;
  }

  // Stage 2: weight decay, in the direction or (decoupled) on the weight first.
  const bool decay = st.decay() && o.weight_decay() != 0;
  const bool coupled = decay && !o.decoupled_decay();
  if (decay && o.decoupled_decay()) p.mul_(1 - lr * o.weight_decay());
  torch::Tensor d = coupled ? u.add(p, o.weight_decay()) : u;

  // Stage 3: trust ratio (adapted tensors only).
  torch::Tensor recorded;
  if (e.adapt) {
    const torch::Tensor w_norm = p.norm();
    const bool exact = o.trust_denominator() == TrustDenominator::kExact;
    const torch::Tensor d_norm = exact ? d.norm() : u.norm();
    const torch::Tensor denominator = trust_denominator(d_norm, d_norm, w_norm, coupled, o);
    const bool need_g = record || o.zero_guard() == ZeroGuard::kGradient;
    const torch::Tensor g_norm = need_g ? g.norm() : torch::Tensor();
    const torch::Tensor r = trust_ratio(w_norm, denominator, g_norm, o, e.phi, lr);
    if (o.guarded_update() == GuardedUpdate::kRawGradient)
      d = torch::where(guard_passes(w_norm, denominator, g_norm, o), d.mul(r), u);
    else
      d = d.mul(r);
    if (record) recorded = torch::stack({w_norm, denominator, r, g_norm}).to(torch::kDouble);
  }

  // Stage 4: heavy-ball momentum (LARS), then stage 5: learning rate.
  if (o.direction() == Direction::kMomentum && o.momentum() != 0) {
    if (!st.momentum_buffer().defined()) {
      st.momentum_buffer(d.clone(torch::MemoryFormat::Preserve));  // mu_0 = 0 * m + d
    } else {
      st.momentum_buffer().mul_(o.momentum()).add_(d);
    }
    const torch::Tensor& mu = st.momentum_buffer();
    if (o.nesterov())
      p.add_(d.add(mu, o.momentum()), -lr);
    else
      p.add_(mu, -lr);
  } else {
    p.add_(d, -lr);
  }
  return recorded;
}

// ================================================================ the fused CPU kernel

namespace {

bool dense_like(const torch::Tensor& x, const torch::Tensor& p) {
  return x.defined() && x.device().is_cpu() && x.layout() == torch::kStrided && x.scalar_type() == p.scalar_type() &&
         x.sizes() == p.sizes() && x.is_contiguous();
}

// Elements per unit of work: large enough to amortise scheduling, small enough to share one large tensor
// between threads. Fixed (not derived from the thread count) so that sums do not depend on it.
constexpr int64_t kChunk = int64_t{1} << 13;

// The blocks' budget per thread (fused_step_block_bytes): 0 until the first step reads the caches or the
// environment, and after use_fused_step_block_bytes(0).
std::atomic<int64_t> chosen_block_bytes{0};

int64_t block_bytes_from_caches() {
  const CpuCaches c = cpu_caches();
  if (c.l2_bytes <= 0) return int64_t{512} << 10;
  return std::max<int64_t>(int64_t{64} << 10, c.l2_bytes / std::max(1, c.l2_shared_by) / 2);
}

int64_t active_block_bytes() {
  int64_t bytes = chosen_block_bytes.load();
  if (bytes > 0) return bytes;
  const char* env = std::getenv("LARGEBATCH_STEP_BLOCK_BYTES");
  bytes = (env && *env) ? parse_byte_count(env, "LARGEBATCH_STEP_BLOCK_BYTES") : block_bytes_from_caches();
  if (bytes <= 0) throw std::invalid_argument("LARGEBATCH_STEP_BLOCK_BYTES: must be positive");
  chosen_block_bytes.store(bytes);
  return bytes;
}

struct Chunk {
  size_t entry;
  int64_t begin, end;
};

using simd::Plan;
using simd::Sums;

// The variants this build has that this CPU can run, narrowest first.
std::vector<const simd::Kernels*> runnable_kernels() {
  std::vector<const simd::Kernels*> found{&simd::baseline_kernels};
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // libgcc's checks also ask the OS whether it saves the wider registers (XGETBV)
#ifdef LARGEBATCH_SIMD_AVX2
  if (__builtin_cpu_supports("avx2")) found.push_back(&simd::avx2_kernels);
#endif
#ifdef LARGEBATCH_SIMD_AVX512
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw"))
    found.push_back(&simd::avx512_kernels);
#endif
#endif
  return found;
}

// The widest this CPU runs, or LARGEBATCH_STEP_SIMD's choice (checked when the first fused step is set up).
core::InstructionSets<simd::Kernels>& instruction_sets() {
  static core::InstructionSets<simd::Kernels> sets(runnable_kernels(), "LARGEBATCH_STEP_SIMD");
  return sets;
}
const simd::Kernels& active_kernels() { return instruction_sets().active(); }

Sums first_pass(const simd::Kernels& k, const Plan<float>& p, int64_t b, int64_t e) {
  return k.first_pass_float(p, b, e);
}
Sums first_pass(const simd::Kernels& k, const Plan<double>& p, int64_t b, int64_t e) {
  return k.first_pass_double(p, b, e);
}
void second_pass(const simd::Kernels& k, const Plan<float>& p, int64_t b, int64_t e) { k.second_pass_float(p, b, e); }
void second_pass(const simd::Kernels& k, const Plan<double>& p, int64_t b, int64_t e) { k.second_pass_double(p, b, e); }

template <typename T>
Plan<T> plan_of(const StepEntry& e) {
  const LayerwiseOptions& o = *e.options;
  LayerwiseParamState& st = *e.state;
  Plan<T> p{};
  p.bc1 = p.bc2 = 1;
  p.ratio = 1;
  p.w = e.param.data_ptr<T>();
  p.g = e.grad.data_ptr<T>();
  p.n = e.param.numel();
  p.adam = o.direction() == Direction::kAdam;
  p.adapt = e.adapt;
  const bool decay = st.decay() && o.weight_decay() != 0;
  p.decay = !decay ? simd::kNoDecay : (o.decoupled_decay() ? simd::kDecoupledDecay : simd::kCoupledDecay);
  p.wd = static_cast<T>(o.weight_decay());
  p.keep = static_cast<T>(1 - e.lr * o.weight_decay());
  p.neg_lr = static_cast<T>(-e.lr);
  p.scaled = e.grad_divisor != 1;
  p.grad_divisor = static_cast<T>(e.grad_divisor);
  if (p.adam) {
    if (!st.exp_avg().defined()) {
      st.exp_avg(torch::zeros_like(e.param, torch::MemoryFormat::Contiguous));
      st.exp_avg_sq(torch::zeros_like(e.param, torch::MemoryFormat::Contiguous));
    }
    p.m = st.exp_avg().data_ptr<T>();
    p.v = st.exp_avg_sq().data_ptr<T>();
    p.beta1 = static_cast<T>(o.beta1());
    p.one_minus_beta1 = static_cast<T>(1 - o.beta1());
    p.beta2 = static_cast<T>(o.beta2());
    p.one_minus_beta2 = static_cast<T>(1 - o.beta2());
    p.eps = static_cast<T>(o.eps());
    if (o.bias_correction()) {
      p.bc1 = static_cast<T>(1 - std::pow(o.beta1(), static_cast<double>(e.t + 1)));
      p.bc2 = static_cast<T>(1 - std::pow(o.beta2(), static_cast<double>(e.t + 1)));
    }
  } else if (o.momentum() != 0) {
    p.momentum = true;
    p.nesterov = o.nesterov();
    p.mom = static_cast<T>(o.momentum());
    if (!st.momentum_buffer().defined()) {
      st.momentum_buffer(torch::empty_like(e.param, torch::MemoryFormat::Contiguous));
      p.first = true;
    }
    p.mu = st.momentum_buffer().data_ptr<T>();
  }
  return p;
}

template <typename T>
int64_t footprint(const Plan<T>& p) {
  const int arrays = 2 + (p.momentum ? 1 : 0) + (p.adam ? 2 : 0);
  return arrays * p.n * static_cast<int64_t>(sizeof(T));
}

// Plans [begin, end) cut into chunks: those of pass 1 (adapted tensors: norms; LAMB tensors: moments) with
// pass 1's partial sums, and those of pass 2 (every tensor).
struct Block {
  size_t begin = 0, end = 0;
  std::vector<Chunk> first, second;
  std::vector<Sums> partial;
};

// The ratios of a block's adapted tensors from pass 1's sums, added in chunk order.
template <typename T>
void form_ratios(const std::vector<StepEntry>& entries, const std::vector<size_t>& which, std::vector<Plan<T>>& plans,
                 const Block& block, std::vector<LayerNorms>* norms) {
  std::vector<Sums> total(block.end - block.begin, Sums{0, 0, 0, 0});
  for (size_t c = 0; c < block.first.size(); ++c) {
    Sums& s = total[block.first[c].entry - block.begin];
    s.w += block.partial[c].w;
    s.d += block.partial[c].d;
    s.u += block.partial[c].u;
    s.g += block.partial[c].g;
  }
  for (size_t k = block.begin; k < block.end; ++k) {
    if (!plans[k].adapt) continue;
    const Sums& sums = total[k - block.begin];
    const StepEntry& e = entries[which[k]];
    const LayerwiseOptions& o = *e.options;
    const double w_norm = std::sqrt(sums.w), g_norm = std::sqrt(sums.g);
    const bool coupled = plans[k].decay == simd::kCoupledDecay;
    const double denominator = trust_denominator(std::sqrt(sums.u), std::sqrt(sums.d), w_norm, coupled, o);
    const double r = trust_ratio(w_norm, denominator, g_norm, o, e.phi, e.lr);
    plans[k].ratio = static_cast<T>(r);
    // apex's LARC: a guarded tensor steps with its plain gradient (pass 2 then adds no wd w).
    if (o.guarded_update() == GuardedUpdate::kRawGradient && coupled && !guard_passes(w_norm, denominator, g_norm, o))
      plans[k].decay = simd::kNoDecay;
    if (norms) (*norms)[which[k]] = LayerNorms{w_norm, denominator, static_cast<double>(plans[k].ratio), g_norm};
  }
}

// Steps the entries whose element type is T.
template <typename T>
void fused_step_of(const std::vector<StepEntry>& entries, const std::vector<size_t>& which,
                   std::vector<LayerNorms>* norms) {
  const simd::Kernels& kernels = active_kernels();
  std::vector<Plan<T>> plans;
  plans.reserve(which.size());
  for (size_t i : which) plans.push_back(plan_of<T>(entries[i]));

  // Blocks of whole tensors whose w, g and state fit the cache budget: pass 2 of a block follows its pass 1
  // while the block is still cached, so memory sees each element about once.
  const int threads = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  const int64_t budget = active_block_bytes() * threads;
  std::vector<Block> blocks;
  for (size_t begin = 0; begin < plans.size();) {
    Block b;
    b.begin = b.end = begin;
    int64_t bytes = 0;
    do {
      bytes += footprint(plans[b.end]);
      ++b.end;
    } while (b.end < plans.size() && bytes + footprint(plans[b.end]) <= budget);
    for (size_t k = b.begin; k < b.end; ++k)
      for (int64_t c = 0; c < plans[k].n; c += kChunk) {
        const Chunk chunk{k, c, std::min(plans[k].n, c + kChunk)};
        if (plans[k].adapt || plans[k].adam) b.first.push_back(chunk);
        b.second.push_back(chunk);
      }
    b.partial.resize(b.first.size());
    begin = b.end;
    blocks.push_back(std::move(b));
  }

  // One team of threads for the whole step: a parallel region per pass would start and stop the team twice per
  // block, hundreds of times per step. Per block: pass 1 (the loop's barrier), the ratios on one thread (the
  // single's barrier), then pass 2 with no barrier after it, as the next block's pass 1 touches other tensors.
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
#endif
  {
    for (Block& block : blocks) {
      const int64_t n_first = static_cast<int64_t>(block.first.size());
      const int64_t n_second = static_cast<int64_t>(block.second.size());
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
      for (int64_t c = 0; c < n_first; ++c)
        block.partial[c] = first_pass(kernels, plans[block.first[c].entry], block.first[c].begin, block.first[c].end);
#ifdef _OPENMP
#pragma omp single
#endif
      form_ratios(entries, which, plans, block, norms);
#ifdef _OPENMP
#pragma omp for schedule(static) nowait
#endif
      for (int64_t c = 0; c < n_second; ++c)
        second_pass(kernels, plans[block.second[c].entry], block.second[c].begin, block.second[c].end);
    }
  }

  // Written through raw pointers: bump the version counters as in-place operations would, so autograd still
  // refuses a graph that saved one of these tensors before the step.
  for (size_t i : which) {
    const StepEntry& e = entries[i];
    e.param.unsafeGetTensorImpl()->bump_version();
    for (const torch::Tensor* t : {&e.state->momentum_buffer(), &e.state->exp_avg(), &e.state->exp_avg_sq()})
      if (t->defined()) t->unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

std::string why_not_fusable(const StepEntry& e) {
  const torch::Tensor& p = e.param;
  if (!p.device().is_cpu()) return "on " + p.device().str();
  if (p.layout() != torch::kStrided) return "not a dense tensor";
  if (p.scalar_type() != torch::kFloat && p.scalar_type() != torch::kDouble)
    return std::string("element type ") + c10::toString(p.scalar_type());
  if (!p.is_contiguous()) return "not contiguous";
  if (!dense_like(e.grad, p)) return "its gradient is not a dense contiguous CPU tensor of the same type and shape";
  if (e.grad.is_alias_of(p)) return "its gradient shares memory with it";
  const LayerwiseParamState& st = *e.state;
  for (const torch::Tensor* s : {&st.momentum_buffer(), &st.exp_avg(), &st.exp_avg_sq()})
    if (s->defined() && !dense_like(*s, p)) return "its optimizer state is not dense contiguous CPU memory like it";
  return "";
}

double fused_gradient_squares(const std::vector<StepEntry>& entries) {
  const simd::Kernels& kernels = active_kernels();
  std::vector<Chunk> chunks;
  for (size_t k = 0; k < entries.size(); ++k)
    for (int64_t b = 0, n = entries[k].grad.numel(); b < n; b += kChunk) chunks.push_back(Chunk{k, b, std::min(n, b + kChunk)});
  std::vector<double> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const torch::Tensor& g = entries[chunks[c].entry].grad;
      partial[c] = g.scalar_type() == torch::kFloat
                       ? kernels.squares_float(g.data_ptr<float>(), chunks[c].begin, chunks[c].end)
                       : kernels.squares_double(g.data_ptr<double>(), chunks[c].begin, chunks[c].end);
    }
  });
  double total = 0;
  for (double x : partial) total += x;
  return total;
}

void fused_step(const std::vector<StepEntry>& entries, std::vector<LayerNorms>* norms) {
  if (norms) norms->assign(entries.size(), LayerNorms{});
  std::vector<size_t> floats, doubles;
  for (size_t i = 0; i < entries.size(); ++i)
    (entries[i].param.scalar_type() == torch::kFloat ? floats : doubles).push_back(i);
  if (!floats.empty()) fused_step_of<float>(entries, floats, norms);
  if (!doubles.empty()) fused_step_of<double>(entries, doubles, norms);
}

}  // namespace detail

std::vector<std::string> fused_step_instruction_sets() { return detail::instruction_sets().names(); }

std::string fused_step_instruction_set() { return detail::active_kernels().name; }

void use_fused_step_instruction_set(const std::string& name) {
  detail::instruction_sets().use(name, "use_fused_step_instruction_set");
}

int64_t fused_step_block_bytes() { return detail::active_block_bytes(); }

void use_fused_step_block_bytes(int64_t bytes) {
  if (bytes < 0)
    throw std::invalid_argument("use_fused_step_block_bytes: " + std::to_string(bytes) + " is negative");
  detail::chosen_block_bytes.store(bytes);
}

}  // namespace optim
}  // namespace largebatch
