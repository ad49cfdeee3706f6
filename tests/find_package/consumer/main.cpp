// An outside project: one LARS step through the installed headers and library.
#include <largebatch/largebatch.h>
#include <torch/torch.h>

#include <iostream>

int main() {
  auto w = torch::ones({4, 4}, torch::requires_grad());
  largebatch::optim::LARS opt(std::vector<torch::Tensor>{w}, largebatch::optim::LayerwiseOptions::lars(1.0));
  w.sum().backward();
  opt.step();
  const bool moved = w.detach().lt(1).all().item<bool>();
  std::cout << "consumer: " << (moved ? "ok" : "weights did not move") << " (largebatch " << largebatch::version()
            << ")\n";
  return moved ? 0 : 1;
}
