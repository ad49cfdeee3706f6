// Power iteration on Hessian-vector products. See include/largebatch/train/sharpness.h.
#include <largebatch/train/sharpness.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

namespace largebatch {
namespace train {

namespace {

double dot(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  torch::Tensor sum = torch::zeros({}, torch::kFloat64);
  for (size_t i = 0; i < a.size(); ++i) sum = sum + (a[i].to(torch::kFloat64) * b[i].to(torch::kFloat64)).sum().cpu();
  return sum.item<double>();
}

void scale(std::vector<torch::Tensor>& v, double factor) {
  for (auto& t : v) t.mul_(factor);
}

}  // namespace

SharpnessEstimate top_hessian_eigenvalue(const std::function<torch::Tensor()>& loss_fn,
                                         const std::vector<torch::Tensor>& params, const SharpnessOptions& o) {
  if (params.empty()) throw std::invalid_argument("top_hessian_eigenvalue: no parameters");
  if (o.max_iterations <= 0) throw std::invalid_argument("top_hessian_eigenvalue: max_iterations must be > 0");
  for (const auto& p : params)
    if (!p.requires_grad()) throw std::invalid_argument("top_hessian_eigenvalue: every parameter must require grad");
  torch::AutoGradMode enable_grad(true);
  const torch::Tensor loss = loss_fn();
  if (loss.numel() != 1) throw std::invalid_argument("top_hessian_eigenvalue: the loss must be a scalar");
  const auto grads = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/true, /*create_graph=*/true,
                                           /*allow_unused=*/true);
  // Starting vector: standard normal from its own generator, so the estimate is reproducible.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed + 0x5ca1ab1eULL);
  std::vector<torch::Tensor> v;
  for (const auto& p : params)
    v.push_back(torch::randn(p.sizes(), gen, torch::TensorOptions().dtype(torch::kFloat32)).to(p.options()));
  scale(v, 1.0 / std::sqrt(dot(v, v)));

  SharpnessEstimate e;
  double previous = 0;
  for (int64_t k = 0; k < o.max_iterations; ++k) {
    torch::Tensor gv = torch::zeros({}, params[0].options());
    for (size_t i = 0; i < params.size(); ++i)
      if (grads[i].defined()) gv = gv + (grads[i] * v[i]).sum();
    std::vector<torch::Tensor> hv = torch::autograd::grad({gv}, params, {}, /*retain_graph=*/true,
                                                          /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < hv.size(); ++i)
      if (!hv[i].defined()) hv[i] = torch::zeros_like(params[i]);
    e.eigenvalue = dot(v, hv);  // Rayleigh quotient v^T H v with |v| = 1
    e.iterations = k + 1;
    const double norm = std::sqrt(dot(hv, hv));
    if (norm == 0) {  // H v = 0: v is in the null space; the estimate is 0
      e.converged = true;
      break;
    }
    for (size_t i = 0; i < v.size(); ++i) v[i] = hv[i].detach() / norm;
    if (k > 0 && std::abs(e.eigenvalue - previous) <= o.relative_tolerance * std::abs(e.eigenvalue)) {
      e.converged = true;
      break;
    }
    previous = e.eigenvalue;
  }
  return e;
}

}  // namespace train
}  // namespace largebatch
