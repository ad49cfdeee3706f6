// Barlow Twins: the loss against a loop-by-loop reference, across two ranks, and its augmented views.
#include <largebatch/dist/dist.h>
#include <largebatch/train/barlow_twins.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace lt = largebatch::train;

namespace {

// Two "ranks" as two threads of this process: all_reduce_sum meets the other thread and adds.
class ThreadPairCommunicator : public largebatch::dist::Communicator {
 public:
  struct Shared {
    std::mutex mutex;
    std::condition_variable cv;
    torch::Tensor slot[2];
    int64_t arrived = 0, generation = 0;
    torch::Tensor result;
  };
  ThreadPairCommunicator(int64_t rank, std::shared_ptr<Shared> shared) : shared_(std::move(shared)) {
    rank_ = rank;
    world_ = 2;
    backend_ = "threads";
  }
  void all_reduce_sum(torch::Tensor& t) override {
    std::unique_lock<std::mutex> lock(shared_->mutex);
    const int64_t gen = shared_->generation;
    shared_->slot[rank_] = t.clone();
    if (++shared_->arrived == 2) {
      shared_->result = shared_->slot[0] + shared_->slot[1];
      shared_->arrived = 0;
      ++shared_->generation;
      shared_->cv.notify_all();
    } else {
      shared_->cv.wait(lock, [&] { return shared_->generation != gen; });
    }
    t.copy_(shared_->result);
  }
  std::function<void()> all_reduce_sum_async(torch::Tensor t) override {
    all_reduce_sum(t);
    return [] {};
  }
  void broadcast(std::vector<torch::Tensor>&, int64_t) override { throw std::logic_error("unused"); }
  void barrier() override {}
  [[noreturn]] void raise_peer_error(const std::exception& e) override { throw; }

 private:
  std::shared_ptr<Shared> shared_;
};

// The loss written out element by element, in double.
double barlow_twins_by_loops(const torch::Tensor& z1, const torch::Tensor& z2, double lambda) {
  const auto a = z1.to(torch::kFloat64), b = z2.to(torch::kFloat64);
  const int64_t n = a.size(0), d = a.size(1);
  auto normalise = [&](const torch::Tensor& z) {
    std::vector<std::vector<double>> out(n, std::vector<double>(d));
    for (int64_t j = 0; j < d; ++j) {
      double mean = 0, var = 0;
      for (int64_t i = 0; i < n; ++i) mean += z[i][j].item<double>() / n;
      for (int64_t i = 0; i < n; ++i) var += std::pow(z[i][j].item<double>() - mean, 2) / n;
      for (int64_t i = 0; i < n; ++i) out[i][j] = (z[i][j].item<double>() - mean) / std::sqrt(var + 1e-5);
    }
    return out;
  };
  const auto na = normalise(a), nb = normalise(b);
  double loss = 0;
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < d; ++j) {
      double c = 0;
      for (int64_t k = 0; k < n; ++k) c += na[k][i] * nb[k][j] / n;
      loss += i == j ? (1 - c) * (1 - c) : lambda * c * c;
    }
  return loss;
}

}  // namespace

TEST(BarlowTwins, LossOnAHandCheckedExample) {
  // z1 rows (1, 1), (-1, -1); z2 rows (1, -1), (-1, 1): normalised entries are +-1/s with s^2 = 1 + 1e-5, so
  // C = [[1, -1], [1, -1]] / s^2 and loss = (1 - 1/s^2)^2 + (1 + 1/s^2)^2 + lambda (1/s^4 + 1/s^4).
  const auto z1 = torch::tensor({{1.0, 1.0}, {-1.0, -1.0}}, torch::kFloat64);
  const auto z2 = torch::tensor({{1.0, -1.0}, {-1.0, 1.0}}, torch::kFloat64);
  const double s2 = 1 + 1e-5, lambda = 0.005;
  const double expected = std::pow(1 - 1 / s2, 2) + std::pow(1 + 1 / s2, 2) + lambda * 2 / (s2 * s2);
  EXPECT_NEAR(largebatch::train::barlow_twins_loss(z1, z2, lambda).item<double>(), expected, 1e-12);
  EXPECT_NEAR(expected, 4.01, 1e-3);
  // Random embeddings against the element-by-element formula.
  torch::manual_seed(11);
  const auto a = torch::randn({16, 5}, torch::kFloat64), b = torch::randn({16, 5}, torch::kFloat64) + a;
  EXPECT_NEAR(largebatch::train::barlow_twins_loss(a, b, 0.005).item<double>(), barlow_twins_by_loops(a, b, 0.005), 1e-10);
  EXPECT_THROW(largebatch::train::barlow_twins_loss(a, b.narrow(1, 0, 4)), std::invalid_argument);
}

TEST(BarlowTwins, TwoRanksEqualOneRankWithTheSameGlobalBatch) {
  torch::manual_seed(5);
  const auto z1 = torch::randn({8, 6}, torch::kFloat64), z2 = torch::randn({8, 6}, torch::kFloat64) * 0.5 + z1;
  auto full1 = z1.clone().requires_grad_(true), full2 = z2.clone().requires_grad_(true);
  const auto full_loss = largebatch::train::barlow_twins_loss(full1, full2);
  full_loss.backward();
  auto shared = std::make_shared<ThreadPairCommunicator::Shared>();
  double losses[2];
  torch::Tensor grads1[2], grads2[2];
  std::vector<std::thread> ranks;
  for (int64_t r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      ThreadPairCommunicator comm(r, shared);
      auto a = z1.narrow(0, 4 * r, 4).clone().requires_grad_(true);
      auto b = z2.narrow(0, 4 * r, 4).clone().requires_grad_(true);
      auto loss = largebatch::train::barlow_twins_loss(a, b, 0.005, &comm);
      loss.backward();
      losses[r] = loss.item<double>();
      grads1[r] = a.grad();
      grads2[r] = b.grad();
    });
  }
  for (auto& t : ranks) t.join();
  for (int64_t r = 0; r < 2; ++r) {
    EXPECT_NEAR(losses[r], full_loss.item<double>(), 1e-12);
    // Each rank's gradient is world x the loss's gradient for its rows, so averaging over ranks (as the
    // gradient all-reduce does for parameters) gives the single-process gradient.
    EXPECT_TRUE(torch::allclose(grads1[r] / 2, full1.grad().narrow(0, 4 * r, 4), 1e-10, 1e-12));
    EXPECT_TRUE(torch::allclose(grads2[r] / 2, full2.grad().narrow(0, 4 * r, 4), 1e-10, 1e-12));
  }
}

TEST(BarlowTwins, ViewsAreDeterministicShardableAndInRange) {
  namespace lt = largebatch::train;
  for (int64_t channels : {1, 3}) {
    torch::manual_seed(2);
    const auto images = torch::rand({6, channels, 32, 32});
    const auto v0 = lt::barlow_twins_view(images, 0, 42, 6, 0);
    const auto v1 = lt::barlow_twins_view(images, 1, 42, 6, 0);
    EXPECT_EQ(v0.sizes(), images.sizes());
    EXPECT_GE(v0.min().item<float>(), 0.0f);
    EXPECT_LE(v0.max().item<float>(), 1.0f);
    EXPECT_TRUE(torch::equal(v0, lt::barlow_twins_view(images, 0, 42, 6, 0)));  // same seed, same views
    EXPECT_FALSE(torch::allclose(v0, v1));                                       // the two views differ
    EXPECT_FALSE(torch::allclose(v0, lt::barlow_twins_view(images, 0, 43, 6, 0)));
    // A shard (rows 2..4 of the global batch) gets exactly what those rows get in the whole batch.
    const auto shard = lt::barlow_twins_view(images.narrow(0, 2, 3), 1, 42, 6, 2);
    EXPECT_TRUE(torch::allclose(shard, v1.narrow(0, 2, 3), 1e-6, 1e-6));
  }
  // Solarisation with p = 1 and nothing else maps a bright flat image to its complement.
  lt::ViewOptions only_solarize;
  only_solarize.min_scale = 1.0;
  only_solarize.jitter_p = 0;
  only_solarize.grayscale_p = 0;
  only_solarize.blur_p[1] = 0;
  only_solarize.solarize_p[1] = 1;
  const auto bright = torch::full({2, 1, 16, 16}, 0.8f);
  EXPECT_TRUE(torch::allclose(lt::barlow_twins_view(bright, 1, 1, 2, 0, only_solarize), torch::full_like(bright, 0.2f),
                              1e-5, 1e-5));
  EXPECT_THROW(lt::barlow_twins_view(bright, 2, 1, 2, 0), std::invalid_argument);
  EXPECT_THROW(lt::barlow_twins_view(bright, 0, 1, 2, 1), std::invalid_argument);
}
