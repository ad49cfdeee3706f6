// Train a small classifier with TVLARS through largebatch's public headers.
// A synthetic, linearly separable task keeps it self-contained; swap in any data loader.
#include <largebatch/largebatch.h>
#include <torch/torch.h>

#include <iostream>

int main(int argc, char** argv) {
  namespace lo = largebatch::optim;
  torch::manual_seed(0);
  auto model = torch::nn::Sequential(torch::nn::Linear(20, 64), torch::nn::ReLU(), torch::nn::Linear(64, 4));
  const auto x = torch::randn({4096, 20});
  const auto y = x.narrow(1, 0, 4).argmax(1);  // the label is the largest of the first four features

  const double lr = argc > 1 ? std::stod(argv[1]) : 5.0;  // LARS-family learning rates are large
  const int64_t batch = 1024, epochs = 30, steps_per_epoch = x.size(0) / batch;
  lo::TVLARS optimizer(model->named_parameters(), lo::preset_options("tvlars:paper", lr, batch));
  lo::LrSchedule schedule({lo::ScheduleKind::kWarmupCosine, lr, lo::LrScaling::kNone, batch, 256,
                           /*warmup_steps=*/2 * steps_per_epoch, /*total_steps=*/epochs * steps_per_epoch, 0.001});
  int64_t step = 0;
  float loss_value = 0;
  for (int64_t epoch = 0; epoch < epochs; ++epoch) {
    const auto order = torch::randperm(x.size(0));
    for (int64_t b = 0; b < steps_per_epoch; ++b, ++step) {
      const auto idx = order.narrow(0, b * batch, batch);
      lo::set_learning_rate(optimizer, schedule.at(step));
      optimizer.zero_grad();
      auto loss = torch::nn::functional::cross_entropy(model->forward(x.index_select(0, idx)), y.index_select(0, idx));
      loss.backward();
      optimizer.step();
      loss_value = loss.item<float>();
    }
  }
  const double accuracy = model->forward(x).argmax(1).eq(y).to(torch::kFloat).mean().item<double>();
  std::cout << "final loss " << loss_value << ", train accuracy " << accuracy << "\n";
  return accuracy > 0.9 ? 0 : 1;
}
