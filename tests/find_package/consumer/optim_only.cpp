// An outside project that links largebatch::optim alone: a LARS optimizer built by name (the factory and its
// recipes) takes one step on one tensor.
#include <largebatch/optim/factory.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto w = torch::ones({4, 4}, torch::requires_grad());
  largebatch::optim::NamedParameters params;
  params.insert("w", w);
  largebatch::optim::OptimizerSpec spec;
  spec.name = "lars";
  spec.lr = 1.0;
  const auto opt = largebatch::optim::make_optimizer(spec, params);
  w.sum().backward();
  opt->step();
  const bool moved = w.detach().lt(1).all().item<bool>();
  std::cout << "optim_only: " << (moved ? "ok" : "weights did not move") << "\n";
  return moved ? 0 : 1;
}
