#include "step_kernels.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>

namespace largebatch {
namespace optim {
namespace detail {

// ================================================================ per-tensor LibTorch operations

torch::Tensor tensor_ops_step(const StepEntry& e, bool record) {
  const LayerwiseOptions& o = *e.options;
  LayerwiseParamState& st = *e.state;
  const torch::Tensor& p = e.param;
  const torch::Tensor& g = e.grad;
  const double lr = o.lr();

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

  // Stage 2: weight decay.
  const bool decay = st.decay() && o.weight_decay() != 0;
  torch::Tensor d = decay ? u.add(p, o.weight_decay()) : u;

  // Stage 3: trust ratio (adapted tensors only).
  torch::Tensor recorded;
  if (st.adapt()) {
    const torch::Tensor w_norm = p.norm();
    const bool exact = o.trust_denominator() == TrustDenominator::kExact;
    const torch::Tensor d_norm = exact ? d.norm() : u.norm();
    const torch::Tensor denominator = trust_denominator(d_norm, d_norm, w_norm, decay, o);
    const torch::Tensor r = trust_ratio(w_norm, denominator, o, e.phi, lr);
    d = d.mul(r);
    if (record) recorded = torch::stack({w_norm, denominator, r, g.norm()}).to(torch::kDouble);
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
constexpr int64_t kChunk = int64_t{1} << 15;

struct Chunk {
  size_t entry;
  int64_t begin, end;
};

// One tensor's pointers and coefficients, in its element type.
template <typename T>
struct Plan {
  T* w = nullptr;
  const T* g = nullptr;
  T* mu = nullptr;  // momentum buffer (kMomentum with momentum != 0)
  T* m = nullptr;   // Adam moments (kAdam)
  T* v = nullptr;
  int64_t n = 0;
  bool adam = false, adapt = false, decay = false, momentum = false, first = false, nesterov = false;
  T wd = 0, beta1 = 0, one_minus_beta1 = 0, beta2 = 0, one_minus_beta2 = 0, bc1 = 1, bc2 = 1, eps = 0;
  T mom = 0, neg_lr = 0;
  T ratio = 1;
};

// Sums over one chunk: |w|^2, |d|^2, |u|^2, |g|^2.
struct Sums {
  double w = 0, d = 0, u = 0, g = 0;
};

// s = m^ / (sqrt(v^) + eps); without bias correction bc1 = bc2 = 1, and dividing by 1 is exact: one branch-free
// form for both.
template <typename T>
inline T adam_direction(const Plan<T>& p, T m, T v) {
  return (m / p.bc1) / (std::sqrt(v / p.bc2) + p.eps);
}

// Pass 1, LARS family: norms only (reads w and g).
template <typename T, bool kDecay>
Sums momentum_norms(const Plan<T>& p, int64_t b, int64_t e) {
  double sw = 0, sd = 0, sg = 0;
  const T* __restrict w = p.w;
  const T* __restrict g = p.g;
  const T wd = p.wd;
#pragma omp simd reduction(+ : sw, sd, sg)
  for (int64_t i = b; i < e; ++i) {
    const T wi = w[i], gi = g[i];
    const T di = kDecay ? gi + wd * wi : gi;
    sw += static_cast<double>(wi) * wi;
    sd += static_cast<double>(di) * di;
    sg += static_cast<double>(gi) * gi;
  }
  return Sums{sw, sd, sg, sg};
}

// Pass 1, LAMB family: moments updated in place; norms when the tensor is adapted.
template <typename T, bool kDecay, bool kAdapt>
Sums adam_moments(const Plan<T>& p, int64_t b, int64_t e) {
  double sw = 0, sd = 0, su = 0, sg = 0;
  T* __restrict m = p.m;
  T* __restrict v = p.v;
  const T* __restrict w = p.w;
  const T* __restrict g = p.g;
#pragma omp simd reduction(+ : sw, sd, su, sg)
  for (int64_t i = b; i < e; ++i) {
    const T gi = g[i];
    const T mi = m[i] * p.beta1 + p.one_minus_beta1 * gi;
    const T vi = v[i] * p.beta2 + p.one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    if (kAdapt) {
      const T wi = w[i];
      const T ui = adam_direction(p, mi, vi);
      const T di = kDecay ? ui + p.wd * wi : ui;
      sw += static_cast<double>(wi) * wi;
      sd += static_cast<double>(di) * di;
      su += static_cast<double>(ui) * ui;
      sg += static_cast<double>(gi) * gi;
    }
  }
  return Sums{sw, sd, su, sg};
}

// Pass 2, LARS family: d = (g + wd w) r; mu = momentum mu + d; w -= lr mu (or the Nesterov form).
template <typename T, bool kDecay>
void momentum_update(const Plan<T>& p, int64_t b, int64_t e) {
  T* __restrict w = p.w;
  const T* __restrict g = p.g;
  T* __restrict mu = p.mu;
  const T wd = p.wd, r = p.ratio, mom = p.mom, neg_lr = p.neg_lr;
  if (!p.momentum) {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const T di = (kDecay ? g[i] + wd * w[i] : g[i]) * r;
      w[i] = w[i] + neg_lr * di;
    }
  } else if (p.first) {  // mu_0 = d
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const T di = (kDecay ? g[i] + wd * w[i] : g[i]) * r;
      mu[i] = di;
      w[i] = w[i] + neg_lr * (p.nesterov ? di + mom * di : di);
    }
  } else {
#pragma omp simd
    for (int64_t i = b; i < e; ++i) {
      const T di = (kDecay ? g[i] + wd * w[i] : g[i]) * r;
      const T mi = mu[i] * mom + di;
      mu[i] = mi;
      w[i] = w[i] + neg_lr * (p.nesterov ? di + mom * mi : mi);
    }
  }
}

// Pass 2, LAMB family: w -= lr r (s + wd w), s from the moments pass 1 wrote.
template <typename T, bool kDecay>
void adam_update(const Plan<T>& p, int64_t b, int64_t e) {
  T* __restrict w = p.w;
  const T* __restrict m = p.m;
  const T* __restrict v = p.v;
  const T wd = p.wd, r = p.ratio, neg_lr = p.neg_lr;
#pragma omp simd
  for (int64_t i = b; i < e; ++i) {
    const T ui = adam_direction(p, m[i], v[i]);
    const T di = (kDecay ? ui + wd * w[i] : ui) * r;
    w[i] = w[i] + neg_lr * di;
  }
}

template <typename T>
Sums first_pass(const Plan<T>& p, int64_t b, int64_t e) {
  if (p.adam) {
    if (p.adapt) return p.decay ? adam_moments<T, true, true>(p, b, e) : adam_moments<T, false, true>(p, b, e);
    return p.decay ? adam_moments<T, true, false>(p, b, e) : adam_moments<T, false, false>(p, b, e);
  }
  return p.decay ? momentum_norms<T, true>(p, b, e) : momentum_norms<T, false>(p, b, e);
}

template <typename T>
void second_pass(const Plan<T>& p, int64_t b, int64_t e) {
  if (p.adam)
    p.decay ? adam_update<T, true>(p, b, e) : adam_update<T, false>(p, b, e);
  else
    p.decay ? momentum_update<T, true>(p, b, e) : momentum_update<T, false>(p, b, e);
}

template <typename T>
Plan<T> plan_of(const StepEntry& e) {
  const LayerwiseOptions& o = *e.options;
  LayerwiseParamState& st = *e.state;
  Plan<T> p;
  p.w = e.param.data_ptr<T>();
  p.g = e.grad.data_ptr<T>();
  p.n = e.param.numel();
  p.adam = o.direction() == Direction::kAdam;
  p.adapt = st.adapt();
  p.decay = st.decay() && o.weight_decay() != 0;
  p.wd = static_cast<T>(o.weight_decay());
  p.neg_lr = static_cast<T>(-o.lr());
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

// Steps the entries whose element type is T.
template <typename T>
void fused_step_of(const std::vector<StepEntry>& entries, const std::vector<size_t>& which,
                   std::vector<LayerNorms>* norms) {
  std::vector<Plan<T>> plans;
  plans.reserve(which.size());
  for (size_t i : which) plans.push_back(plan_of<T>(entries[i]));

  // Pass 1 runs over adapted tensors (norms) and LAMB tensors (moments).
  std::vector<Chunk> first, second;
  for (size_t k = 0; k < plans.size(); ++k) {
    for (int64_t b = 0; b < plans[k].n; b += kChunk) {
      const Chunk c{k, b, std::min(plans[k].n, b + kChunk)};
      if (plans[k].adapt || plans[k].adam) first.push_back(c);
      second.push_back(c);
    }
  }
  std::vector<Sums> partial(first.size());
  at::parallel_for(0, static_cast<int64_t>(first.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) partial[c] = first_pass(plans[first[c].entry], first[c].begin, first[c].end);
  });

  // Norms in chunk order, then each ratio on the host.
  std::vector<Sums> total(plans.size());
  for (size_t c = 0; c < first.size(); ++c) {
    Sums& s = total[first[c].entry];
    s.w += partial[c].w;
    s.d += partial[c].d;
    s.u += partial[c].u;
    s.g += partial[c].g;
  }
  for (size_t k = 0; k < plans.size(); ++k) {
    if (!plans[k].adapt) continue;
    const StepEntry& e = entries[which[k]];
    const LayerwiseOptions& o = *e.options;
    const double w_norm = std::sqrt(total[k].w);
    const double denominator =
        trust_denominator(std::sqrt(total[k].u), std::sqrt(total[k].d), w_norm, plans[k].decay, o);
    const double r = trust_ratio(w_norm, denominator, o, e.phi, o.lr());
    plans[k].ratio = static_cast<T>(r);
    if (norms) (*norms)[which[k]] = LayerNorms{w_norm, denominator, static_cast<double>(plans[k].ratio), std::sqrt(total[k].g)};
  }

  at::parallel_for(0, static_cast<int64_t>(second.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) second_pass(plans[second[c].entry], second[c].begin, second[c].end);
  });

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

void fused_step(const std::vector<StepEntry>& entries, std::vector<LayerNorms>* norms) {
  if (norms) norms->assign(entries.size(), LayerNorms{});
  std::vector<size_t> floats, doubles;
  for (size_t i = 0; i < entries.size(); ++i)
    (entries[i].param.scalar_type() == torch::kFloat ? floats : doubles).push_back(i);
  if (!floats.empty()) fused_step_of<float>(entries, floats, norms);
  if (!doubles.empty()) fused_step_of<double>(entries, doubles, norms);
}

}  // namespace detail
}  // namespace optim
}  // namespace largebatch
