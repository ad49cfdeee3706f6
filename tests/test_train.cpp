// Models, initialisation, and the trainer: end-to-end runs on synthetic data, resume equivalence,
// micro-batch equivalence, divergence handling and bad input.
#include <largebatch/largebatch.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "scratch.h"

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <optional>
#include <filesystem>
#include <fstream>
#include <condition_variable>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
namespace lm = largebatch::models;
namespace lt = largebatch::train;

namespace {

using largebatch_test::ScratchDir;

// ------------------------------------------------------------------ models

TEST(Models, EveryModelBuildsAndClassifies) {
  for (const auto& name : lm::model_names()) {
    SCOPED_TRACE(name);
    lm::ModelOptions o;
    o.name = name;
    o.in_channels = 3;
    o.image_size = 32;
    o.num_classes = 7;
    auto model = lm::make_model(o);
    model->eval();
    torch::NoGradGuard no_grad;
    const auto logits = model->forward(torch::randn({2, 3, 32, 32}));
    EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, 7}));
    EXPECT_EQ(model->features(torch::randn({2, 3, 32, 32})).size(1), model->feature_dim());
  }
}

TEST(Models, TorchvisionLayoutAndSizes) {
  lm::ModelOptions o;
  o.name = "resnet18";
  o.in_channels = 3;
  o.image_size = 32;
  o.num_classes = 1000;
  auto r18 = lm::make_model(o);
  const auto params = r18->named_parameters();
  EXPECT_TRUE(params.contains("layer1.0.conv1.weight"));
  EXPECT_TRUE(params.contains("layer2.0.downsample.0.weight"));
  EXPECT_TRUE(params.contains("fc.weight"));
  EXPECT_EQ(lm::parameter_count(*r18), 11689512);  // torchvision resnet18
  o.name = "resnet50";
  EXPECT_EQ(lm::parameter_count(*lm::make_model(o)), 25557032);  // torchvision resnet50
  o.name = "efficientnet-b0";
  EXPECT_EQ(lm::parameter_count(*lm::make_model(o)), 5288548);  // torchvision efficientnet_b0
  o.name = "resnet20";
  o.num_classes = 10;
  EXPECT_NEAR(static_cast<double>(lm::parameter_count(*lm::make_model(o))), 0.27e6, 0.03e6);
}

double weight_std(const std::string& init) {
  lm::ModelOptions o;
  o.name = "cnn";
  o.init = init;
  return lm::make_model(o)->named_parameters()["conv2.weight"].std().item<double>();
}

TEST(Models, InitReallyChangesWeightStatistics) {
  // conv2: 32 -> 64 channels, 3x3: fan_in = 288, fan_out = 576.
  const double fan_in = 288, fan_out = 576;
  EXPECT_NEAR(weight_std("default"), std::sqrt(2.0 / fan_out), 0.1 * std::sqrt(2.0 / fan_out));
  EXPECT_NEAR(weight_std("kaiming-normal"), std::sqrt(2.0 / fan_in), 0.1 * std::sqrt(2.0 / fan_in));
  EXPECT_NEAR(weight_std("kaiming-uniform"), std::sqrt(2.0 / fan_in), 0.1 * std::sqrt(2.0 / fan_in));
  EXPECT_NEAR(weight_std("xavier-normal"), std::sqrt(2.0 / (fan_in + fan_out)), 0.1 * std::sqrt(2.0 / (fan_in + fan_out)));
  EXPECT_NEAR(weight_std("xavier-uniform"), std::sqrt(2.0 / (fan_in + fan_out)), 0.1 * std::sqrt(2.0 / (fan_in + fan_out)));
  // Uniform methods stay inside their bound; normal ones do not.
  lm::ModelOptions o;
  o.name = "cnn";
  o.init = "xavier-uniform";
  const double bound = std::sqrt(6.0 / (fan_in + fan_out));
  EXPECT_LE(lm::make_model(o)->named_parameters()["conv2.weight"].abs().max().item<double>(), bound);
  o.init = "kaiming-normal";
  const auto params = lm::make_model(o)->named_parameters();
  EXPECT_GT(params["conv2.weight"].abs().max().item<double>(), std::sqrt(6.0 / fan_in));
  EXPECT_EQ(params["fc.bias"].abs().max().item<double>(), 0.0);  // biases zeroed
}

// The synchronised path of SyncableBatchNorm2d with an identity "sum over ranks" (one rank) must compute
// what LibTorch's batch_norm computes: output, gradients of input, weight and bias, running statistics.
// Gives b a's affine parameters, runs both in training mode on one input and upstream gradient, and expects
// the same outputs, gradients and running statistics (to 1e-12 in double, 2e-5 in float).
struct BatchNormRun {
  torch::Tensor x, x2, y;  // the inputs of a and b, a's output
  double tol;
};
BatchNormRun expect_same_batchnorm(lm::SyncableBatchNorm2d& a, lm::SyncableBatchNorm2d& b,
                                   const std::vector<int64_t>& shape, torch::ScalarType dtype) {
  {
    torch::NoGradGuard g;
    a->weight.uniform_(0.5, 1.5);
    a->bias.uniform_(-0.5, 0.5);
    b->weight.copy_(a->weight);
    b->bias.copy_(a->bias);
  }
  a->to(dtype);
  b->to(dtype);
  auto x = (torch::randn(shape, dtype) * 3 + 1).requires_grad_(true);
  auto x2 = x.detach().clone().requires_grad_(true);
  auto upstream = torch::randn(shape, dtype);
  auto y1 = a->forward(x), y2 = b->forward(x2);
  (y1 * upstream).sum().backward();
  (y2 * upstream).sum().backward();
  const double tol = dtype == torch::kFloat64 ? 1e-12 : 2e-5;
  EXPECT_TRUE(torch::allclose(y1, y2, tol, tol)) << dtype;
  EXPECT_TRUE(torch::allclose(x.grad(), x2.grad(), tol, tol)) << (x.grad() - x2.grad()).abs().max();
  EXPECT_TRUE(torch::allclose(a->weight.grad(), b->weight.grad(), tol, tol));
  EXPECT_TRUE(torch::allclose(a->bias.grad(), b->bias.grad(), tol, tol));
  EXPECT_TRUE(torch::allclose(a->running_mean, b->running_mean, tol, tol));
  EXPECT_TRUE(torch::allclose(a->running_var, b->running_var, tol, tol));
  EXPECT_EQ(a->num_batches_tracked.item<int64_t>(), b->num_batches_tracked.item<int64_t>());
  return {x, x2, y1, tol};
}

TEST(Models, SyncBatchNormPathMatchesLibTorchBatchNorm) {
  torch::manual_seed(3);
  for (auto dtype : {torch::kFloat64, torch::kFloat32}) {
    lm::SyncableBatchNorm2d native(6), synced(6);
    synced->set_cross_rank_sum([](const torch::Tensor& t) { return t.clone(); });
    expect_same_batchnorm(native, synced, {8, 6, 5, 5}, dtype);
    EXPECT_TRUE(synced->synchronised());
  }
  // Every model's BatchNorms can be synchronised (the CNN has two).
  auto model = lm::make_model({});
  EXPECT_EQ(lm::synchronise_batchnorm(*model, [](const torch::Tensor& t) { return t; }), 2);
}

TEST(Models, SmallMapConvolutionsComputeWhatConv2dComputes) {
  struct Case {
    int64_t height, width, kernel, stride;
    bool bias, unrolled;
  };
  // ResNet's last stages at 32x32 (3x3 over 2x2 and 1x1, the 2x2 -> 1x1 stride 2), a 1x1 kernel, a bias, a 2x3
  // map (8 of its 36 pixel pairs joined by no tap: they read the appended zero); 4x4 maps and a 2x2 -> 1x1
  // downsampling 1x1 convolution (1 of 4 pairs joined) stay with conv2d.
  const std::vector<Case> cases = {{1, 1, 3, 1, false, true},  {2, 2, 3, 1, false, true}, {2, 2, 3, 2, false, true},
                                   {2, 2, 3, 1, true, true},   {1, 1, 1, 1, true, true},  {2, 3, 3, 1, true, true},
                                   {2, 2, 1, 2, false, false}, {4, 4, 3, 1, false, false}, {4, 4, 3, 2, false, false}};
  for (const auto dtype : {torch::kFloat64, torch::kFloat32}) {
    for (const auto& c : cases) {
      SCOPED_TRACE(std::to_string(c.height) + "x" + std::to_string(c.width) + " kernel " + std::to_string(c.kernel) + " stride " +
                   std::to_string(c.stride) + (dtype == torch::kFloat64 ? " double" : " float"));
      torch::manual_seed(11);
      lm::Conv conv(torch::nn::Conv2dOptions(5, 7, c.kernel).stride(c.stride).padding(c.kernel / 2).bias(c.bias));
      conv->to(dtype);
      auto x = torch::randn({6, 5, c.height, c.width}, dtype).requires_grad_(true);
      EXPECT_EQ(conv->unrolls(x), c.unrolled);
      auto y = conv->forward(x);
      const auto bias = c.bias ? conv->bias : torch::Tensor();
      auto x2 = x.detach().clone().requires_grad_(true);
      auto w2 = conv->weight.detach().clone().requires_grad_(true);
      auto b2 = c.bias ? conv->bias.detach().clone().requires_grad_(true) : torch::Tensor();
      auto reference = torch::conv2d(x2, w2, b2, c.stride, c.kernel / 2);
      ASSERT_EQ(y.sizes(), reference.sizes());
      EXPECT_TRUE(y.is_contiguous());
      auto upstream = torch::randn(reference.sizes(), dtype);
      (y * upstream).sum().backward();
      (reference * upstream).sum().backward();
      const double tol = dtype == torch::kFloat64 ? 1e-12 : 1e-5;
      EXPECT_TRUE(torch::allclose(y, reference, tol, tol)) << (y - reference).abs().max();
      EXPECT_TRUE(torch::allclose(x.grad(), x2.grad(), tol, tol)) << (x.grad() - x2.grad()).abs().max();
      EXPECT_TRUE(torch::allclose(conv->weight.grad(), w2.grad(), tol, tol)) << (conv->weight.grad() - w2.grad()).abs().max();
      if (c.bias) EXPECT_TRUE(torch::allclose(conv->bias.grad(), b2.grad(), tol, tol));
    }
  }
  // Off, channels-last input, groups, dilation, other padding modes, padding given as kSame/kValid: conv2d.
  lm::Conv conv(torch::nn::Conv2dOptions(4, 4, 3).padding(1));
  const auto small = torch::randn({2, 4, 2, 2});
  EXPECT_TRUE(conv->unrolls(small));
  EXPECT_FALSE(conv->unrolls(small.contiguous(torch::MemoryFormat::ChannelsLast)));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(4, 4, 3).padding(1).groups(2))->unrolls(small));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(4, 4, 3).padding(2).dilation(2))->unrolls(small));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(4, 4, 3).padding(1).padding_mode(torch::kCircular))->unrolls(small));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(4, 4, 3).padding(torch::kSame))->unrolls(small));
  conv->small_map_kernels = false;
  EXPECT_FALSE(conv->unrolls(small));
  conv->small_map_kernels = true;
  // What conv2d refuses is refused the same way (not computed): a wrong channel count, a kernel larger than the
  // padded map. The module still works afterwards.
  EXPECT_FALSE(conv->unrolls(torch::randn({2, 3, 2, 2})));
  EXPECT_THROW(conv->forward(torch::randn({2, 3, 2, 2})), c10::Error);
  lm::Conv unpadded(torch::nn::Conv2dOptions(4, 4, 3).stride(2));
  EXPECT_FALSE(unpadded->unrolls(small));
  EXPECT_THROW(unpadded->forward(small), c10::Error);
  EXPECT_EQ(conv->forward(small).sizes(), (std::vector<int64_t>{2, 4, 2, 2}));
}

TEST(Models, SmallMapBatchNormComputesWhatBatchNormComputes) {
  for (const auto dtype : {torch::kFloat64, torch::kFloat32}) {
    for (const auto& shape : std::vector<std::vector<int64_t>>{{8, 6, 2, 2}, {8, 6, 1, 2}, {8, 6, 1, 3}, {8, 6, 1, 1}}) {
      torch::manual_seed(5);
      lm::SyncableBatchNorm2d fast(6), library(6);
      library->small_map_kernels = false;
      const BatchNormRun run = expect_same_batchnorm(fast, library, shape, dtype);
      EXPECT_TRUE(run.y.is_contiguous());
      fast->eval();
      library->eval();
      EXPECT_TRUE(torch::allclose(fast->forward(run.x), library->forward(run.x2), run.tol, run.tol));
    }
  }
}

// One training step's loss (first) and every parameter's gradient, with largebatch's CPU kernels on or off.
std::vector<torch::Tensor> loss_and_gradients(lm::ClassifierImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                                              bool cpu_kernels) {
  model.set_cpu_kernels(cpu_kernels);
  model.zero_grad();
  auto loss = torch::nn::functional::cross_entropy(model.forward(x), y);
  loss.backward();
  std::vector<torch::Tensor> tensors{loss.detach().clone()};
  for (const auto& p : model.parameters()) tensors.push_back(p.grad().clone());
  return tensors;
}

TEST(Models, SmallMapKernelsTrainResNet18AsLibTorchsKernelsDo) {
  // One model, both ways: same loss and gradients to float rounding (in double: to 1e-10).
  for (const auto dtype : {torch::kFloat64, torch::kFloat32}) {
    lm::ModelOptions o;
    o.name = "resnet18";
    o.in_channels = 3;
    o.image_size = 32;
    auto model = lm::make_model(o);
    EXPECT_TRUE(model->cpu_kernels());
    model->to(dtype);
    model->train();
    torch::manual_seed(2);
    const auto x = torch::randn({8, 3, 32, 32}, dtype);
    const auto y = torch::randint(0, 10, {8}, torch::kLong);
    const auto fast = loss_and_gradients(*model, x, y, true);
    const auto library = loss_and_gradients(*model, x, y, false);
    const double tol = dtype == torch::kFloat64 ? 1e-10 : 2e-4;
    const double library_loss = library[0].item<double>();
    EXPECT_NEAR(fast[0].item<double>(), library_loss, tol * std::abs(library_loss));
    for (size_t k = 1; k < fast.size(); ++k) {
      const double scale = library[k].abs().max().item<double>() + 1e-12;
      EXPECT_LE((fast[k] - library[k]).abs().max().item<double>(), tol * scale) << "parameter " << k - 1;
    }
  }
}

// The bits of a float or double tensor as integers: equal bits, NaNs and signed zeros included.
torch::Tensor bits(const torch::Tensor& t) {
  return t.contiguous().view(t.scalar_type() == torch::kDouble ? torch::kInt64 : torch::kInt32);
}

TEST(Models, OwnMaxPoolComputesWhatMaxPool2dComputesToTheBit) {
  struct Case {
    lm::MaxPool2dGeometry g;
    std::vector<int64_t> shape;
  };
  // 2x2/2 (the compact CNN; rows of >= 4 outputs take the 4-wide path, shorter rows and odd sizes the scalar one),
  // 3x3/2 pad 1 (ResNet's stem), stride 1 and 3, non-square geometry, outputs on both sides of the padding.
  const std::vector<Case> cases = {
      {{2, 2, 2, 2, 0, 0}, {3, 5, 28, 28}}, {{2, 2, 2, 2, 0, 0}, {2, 3, 14, 14}}, {{2, 2, 2, 2, 0, 0}, {2, 3, 7, 9}},
      {{2, 2, 2, 2, 0, 0}, {2, 2, 5, 6}},   {{3, 3, 2, 2, 1, 1}, {2, 4, 16, 16}}, {{3, 3, 2, 2, 1, 1}, {2, 3, 9, 13}},
      {{3, 3, 1, 1, 1, 1}, {2, 3, 8, 11}},  {{2, 2, 1, 1, 0, 0}, {2, 3, 6, 10}},  {{3, 3, 3, 3, 0, 0}, {2, 3, 14, 20}},
      {{3, 2, 2, 1, 1, 0}, {2, 3, 10, 12}}, {{5, 5, 3, 3, 2, 2}, {2, 2, 17, 23}}, {{3, 3, 2, 2, 1, 1}, {1, 2, 2, 2}},
      {{1, 1, 1, 1, 0, 0}, {2, 2, 3, 5}},   {{2, 2, 3, 3, 0, 0}, {2, 3, 11, 13}}, {{3, 3, 2, 2, 0, 1}, {2, 3, 9, 12}},
      {{5, 3, 1, 1, 2, 1}, {2, 2, 9, 10}},
      // Many planes: several parallel chunks (about 32 K input elements each).
      {{2, 2, 2, 2, 0, 0}, {2, 64, 28, 28}}, {{3, 3, 2, 2, 1, 1}, {2, 200, 16, 16}}};
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const Case& c : cases) {
      SCOPED_TRACE(::testing::Message() << c.shape << " kernel " << c.g.kernel_h << "x" << c.g.kernel_w << " stride "
                                        << c.g.stride_h << "x" << c.g.stride_w << " padding " << c.g.padding_h << "x"
                                        << c.g.padding_w << " " << dtype);
      // Few distinct values (many ties, +0 against -0), some NaN, +inf and -inf; the last plane all -inf.
      auto x = torch::randint(-3, 4, c.shape, torch::TensorOptions().dtype(dtype));
      x.masked_fill_(torch::rand(c.shape) < 0.3, -0.0);
      x.masked_fill_(torch::rand(c.shape) < 0.05, std::numeric_limits<double>::quiet_NaN());
      x.masked_fill_(torch::rand(c.shape) < 0.05, std::numeric_limits<double>::infinity());
      x.masked_fill_(torch::rand(c.shape) < 0.05, -std::numeric_limits<double>::infinity());
      x[c.shape[0] - 1][c.shape[1] - 1].fill_(-std::numeric_limits<double>::infinity());
      auto own_x = x.clone().requires_grad_(true), library_x = x.clone().requires_grad_(true);
      ASSERT_TRUE(lm::max_pool2d_takes_own_kernel(own_x, c.g));
      const auto own = lm::max_pool2d(own_x, c.g, true);
      const auto library = lm::max_pool2d(library_x, c.g, false);
      EXPECT_EQ(own.sizes(), library.sizes());
      EXPECT_TRUE(torch::equal(bits(own), bits(library)));
      // Output gradients (1) with signed zeros among them: ATen sums them into a zeroed map, so -0 arrives as +0;
      // (2) of wide-ranging magnitudes, whose sums (overlapping windows) depend on their order; (3) not contiguous.
      const auto options = torch::TensorOptions().dtype(dtype);
      auto signed_zeros = torch::randint(-2, 3, own.sizes(), options).mul_(0.5);
      signed_zeros.masked_fill_(signed_zeros == 0, -0.0);
      const auto magnitudes = torch::randn(own.sizes(), options) * torch::exp(4 * torch::randn(own.sizes(), options));
      const auto transposed = torch::randn({own.size(0), own.size(1), own.size(3), own.size(2)}, options).transpose(2, 3);
      for (const auto& grad : {signed_zeros, magnitudes, transposed}) {
        const auto own_grad = torch::autograd::grad({own}, {own_x}, {grad}, /*retain_graph=*/true)[0];
        const auto library_grad = torch::autograd::grad({library}, {library_x}, {grad}, /*retain_graph=*/true)[0];
        EXPECT_TRUE(torch::equal(bits(own_grad), bits(library_grad)));
      }
      const auto& grad = magnitudes;
      // A second derivative (create_graph) through the differentiable path: d(sum(v * dx))/d(grad).
      auto g1 = grad.clone().requires_grad_(true), g2 = grad.clone().requires_grad_(true);
      const auto v = torch::randn(c.shape, torch::TensorOptions().dtype(dtype));
      const auto own_dx = torch::autograd::grad({lm::max_pool2d(own_x, c.g, true)}, {own_x}, {g1}, true, true)[0];
      const auto library_dx = torch::autograd::grad({lm::max_pool2d(library_x, c.g, false)}, {library_x}, {g2}, true, true)[0];
      EXPECT_TRUE(torch::equal(own_dx, library_dx));
      (own_dx * v).sum().backward();
      (library_dx * v).sum().backward();
      EXPECT_TRUE(torch::equal(bits(g1.grad()), bits(g2.grad())));
    }
  }
  // What the kernel leaves to torch::max_pool2d: no gradient wanted, channels-last, half precision, a geometry
  // ATen refuses (padding beyond half the kernel, a kernel larger than the padded map), an empty batch, 3-D input.
  const lm::MaxPool2dGeometry g{2, 2, 2, 2, 0, 0};
  const auto x = torch::randn({2, 3, 8, 8}).requires_grad_(true);
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(x.detach(), g));
  {
    torch::NoGradGuard no_grad;
    EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(x, g));
  }
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(x.contiguous(torch::MemoryFormat::ChannelsLast), g));
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(x.to(torch::kHalf).detach().requires_grad_(true), g));
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(x, {3, 3, 2, 2, 2, 2}));
  EXPECT_THROW(lm::max_pool2d(x, {3, 3, 2, 2, 2, 2}), c10::Error);  // refused as torch::max_pool2d refuses it
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(x, {9, 9, 1, 1, 0, 0}));
  EXPECT_THROW(lm::max_pool2d(x, {9, 9, 1, 1, 0, 0}), c10::Error);
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(torch::randn({0, 3, 8, 8}).requires_grad_(true), g));
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(torch::randn({3, 8, 8}).requires_grad_(true), g));
  const auto empty_map = torch::randn({1, 1, 0, 8}).requires_grad_(true);  // padding would give it an output
  EXPECT_FALSE(lm::max_pool2d_takes_own_kernel(empty_map, {2, 2, 1, 1, 1, 1}));
  EXPECT_THROW(lm::max_pool2d(empty_map, {2, 2, 1, 1, 1, 1}), c10::Error);
}

TEST(Models, CpuKernelsTrainTheCompactCnnToTheSameBits) {
  // The compact CNN's maps never get small (28 -> 14 -> 7): only max pooling differs, and it gives the same bits.
  auto model = lm::make_model(lm::ModelOptions{});
  model->train();
  torch::manual_seed(4);
  const auto x = torch::randn({16, 1, 28, 28});
  const auto y = torch::randint(0, 10, {16}, torch::kLong);
  const auto own = loss_and_gradients(*model, x, y, true), library = loss_and_gradients(*model, x, y, false);
  for (size_t k = 0; k < own.size(); ++k) EXPECT_TRUE(torch::equal(bits(own[k]), bits(library[k]))) << "tensor " << k;
}

TEST(Models, BadOptionsAreNamed) {
  lm::ModelOptions o;
  o.name = "vgg16";
  EXPECT_THROW(lm::make_model(o), std::invalid_argument);
  o.name = "cnn";
  o.init = "orthogonal";
  try {
    lm::make_model(o);
    ADD_FAILURE();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("init"), std::string::npos);
  }
}

// ------------------------------------------------------------------ trainer

lt::TrainConfig small_run(const fs::path& out) {
  lt::TrainConfig c;
  c.data = "synthetic";
  c.synthetic_size = 512;
  c.model = "cnn";
  c.batch_size = 128;
  c.epochs = 3;
  c.threads = 1;
  c.loader_workers = 1;
  c.progress = "none";
  c.plots = false;
  c.out = out.string();
  return c;
}

lm::Classifier load_model(const fs::path& path, const std::string& name = "cnn") {
  lm::ModelOptions o;
  o.name = name;
  auto model = lm::make_model(o);
  torch::serialize::InputArchive archive;
  archive.load_from(path.string());
  model->load(archive);
  return model;
}

TEST(Trainer, ShortRunOnSyntheticDataLearnsAndWritesEveryOutput) {
  ScratchDir dir("run");
  auto c = small_run(dir.path);
  c.optimizer = "tvlars";
  c.lr = 1.0;
  c.batch_size = 64;
  c.epochs = 4;
  c.telemetry_every = 2;
  c.plots = true;
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "completed");
  ASSERT_EQ(s.history.size(), 4u);
  EXPECT_LT(s.history.back().train_loss, 0.5 * s.history.front().train_loss);
  EXPECT_GT(s.final_test_top1, 0.9);  // 10 classes: chance is 0.1
  for (const char* f : {"config.json", "metrics.csv", "summary.json", "checkpoint.pt", "model.pt", "telemetry.csv"})
    EXPECT_TRUE(fs::exists(dir.path / f)) << f;
  std::ifstream metrics(dir.path / "metrics.csv");
  std::string line;
  int rows = -1;
  while (std::getline(metrics, line)) ++rows;
  EXPECT_EQ(rows, 4);
  std::ifstream summary(dir.path / "summary.json");
  const auto j = nlohmann::json::parse(summary);
  EXPECT_EQ(j["status"], "completed");
  EXPECT_EQ(j["best_test_top1"].get<double>(), s.best_test_top1);
  // Plots: one line per layer from inline data blocks (interleaved CSV rows would break filtered lines).
  if (largebatch::report::gnuplot_available()) {
    for (const char* f : {"curves.png", "loss.png", "trust_ratios.png"}) EXPECT_GT(fs::file_size(dir.path / f), 1000u) << f;
    std::ifstream gp(dir.path / "trust_ratios.gp");
    std::stringstream script;
    script << gp.rdbuf();
    EXPECT_NE(script.str().find("$L3 << EOD"), std::string::npos);  // conv1, conv2, fc1, fc: four layers
    EXPECT_NE(script.str().find("title 'fc1.weight'"), std::string::npos);
  }
  // The saved config reloads to the same configuration.
  std::ifstream cfg(dir.path / "config.json");
  std::stringstream ss;
  ss << cfg.rdbuf();
  EXPECT_EQ(lt::TrainConfig::from_json(ss.str(), "config.json").to_json(), c.to_json());
  // The CPU kernels' switch, under its name and under the one configs written before max pooling joined carry.
  EXPECT_TRUE(c.cpu_kernels);
  EXPECT_FALSE(lt::TrainConfig::from_json(R"({"cpu-kernels": false})", "config.json").cpu_kernels);
  EXPECT_FALSE(lt::TrainConfig::from_json(R"({"small-map-kernels": false})", "config.json").cpu_kernels);
  EXPECT_NE(c.to_json().find("\"cpu-kernels\": true"), std::string::npos);
}

// An engine preset named explicitly runs with exactly its values, and summary.json records what ran.
TEST(Trainer, AnExplicitPresetRunsWithItsOwnValuesAndTheRunRecordsThem) {
  // One epoch of the mlp (4 steps); summary.json's optimizer_resolved.
  auto resolved_by = [](const std::string& optimizer) {
    ScratchDir dir("preset");
    auto c = small_run(dir.path);
    c.model = "mlp";
    c.optimizer = optimizer;
    c.epochs = 1;
    EXPECT_EQ(lt::run_training(c).status, "completed");
    std::ifstream summary(dir.path / "summary.json");
    return nlohmann::json::parse(summary).at("optimizer_resolved");
  };
  const auto j = resolved_by("tvlars:paper");
  EXPECT_EQ(j.at("recipe"), "tvlars:paper");
  EXPECT_EQ(j.at("builds"), "tvlars:paper");
  EXPECT_DOUBLE_EQ(j.at("lr").get<double>(), 2.0);
  EXPECT_EQ(j.at("schedule"), "constant");
  EXPECT_EQ(j.at("total_steps"), 4);  // 512 images / 128
  EXPECT_TRUE(j.at("options").empty());
  const std::string engine = j.at("engine");
  EXPECT_NE(engine.find("eta=0.001 "), std::string::npos) << engine;
  EXPECT_NE(engine.find("lambda=0.001"), std::string::npos) << engine;
  // The trainer's own recipe says what it changed.
  const auto t = resolved_by("tvlars");
  EXPECT_EQ(t.at("builds"), "tvlars:reference");
  EXPECT_EQ(t.at("options").at("eta"), "0.002");
  EXPECT_EQ(t.at("options").at("lambda"), "0.5");  // 2 / T, T = 4 steps
}

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(ValidationSplit, HoldsOutAFixedDisjointSetWhateverTheSeed) {
  namespace ld = largebatch::data;
  ld::ImageDataset d;
  d.name = "rows";
  const int64_t n = 1000;
  d.images = torch::arange(n, torch::kLong).remainder(256).to(torch::kUInt8).view({n, 1, 1, 1}).repeat({1, 1, 2, 2});
  d.labels = torch::arange(n, torch::kLong);  // each image's label is its row
  d.num_classes = n;
  d.mean = {0.5f};
  d.std = {0.25f};
  const auto a = ld::hold_out(d, 100), b = ld::hold_out(d, 100);
  ASSERT_EQ(a.validation.size(), 100);
  ASSERT_EQ(a.train.size(), 900);
  EXPECT_TRUE(torch::equal(a.validation.labels, b.validation.labels));  // the same images every time
  const auto all = std::get<0>(torch::cat({a.train.labels, a.validation.labels}).sort());
  EXPECT_TRUE(torch::equal(all, torch::arange(n, torch::kLong)));  // disjoint, and nothing lost
  EXPECT_TRUE(torch::equal(a.validation.labels, std::get<0>(a.validation.labels.sort())));  // order kept
  EXPECT_TRUE(torch::equal(a.validation.images.flatten(1).select(1, 0),
                           a.validation.labels.remainder(256).to(torch::kUInt8)));  // images travel with labels
  EXPECT_EQ(a.train.mean, d.mean);
  // Spread over the set, not its head or tail.
  EXPECT_LT(a.validation.labels.min().item<int64_t>(), 100);
  EXPECT_GT(a.validation.labels.max().item<int64_t>(), 900);
  EXPECT_THROW(ld::hold_out(d, 0), std::invalid_argument);
  EXPECT_THROW(ld::hold_out(d, n), std::invalid_argument);
}

TEST(ValidationSplit, TrainRecordsValidationAndSelectsOnIt) {
  ScratchDir dir("val");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.optimizer = "lamb";
  c.val_split = 128;
  c.epochs = 3;
  const auto s = lt::run_training(c);
  ASSERT_EQ(s.status, "completed");
  std::ifstream metrics(dir.path / "metrics.csv");
  std::string header, row;
  std::getline(metrics, header);
  EXPECT_NE(header.find(",val_loss,val_top1,val_top5"), std::string::npos) << header;
  std::getline(metrics, row);
  EXPECT_EQ(row.find(",,"), std::string::npos) << "empty validation fields: " << row;
  double best_val = -1;
  int64_t best_epoch = 0;
  for (const auto& r : s.history) {
    ASSERT_TRUE(std::isfinite(r.val_top1));
    if (r.val_top1 > best_val) best_val = r.val_top1, best_epoch = r.epoch;
  }
  EXPECT_EQ(s.selected_epoch, best_epoch);
  EXPECT_DOUBLE_EQ(s.selected_test_top1, s.history[static_cast<size_t>(best_epoch - 1)].test_top1);
  std::ifstream summary(dir.path / "summary.json");
  const auto j = nlohmann::json::parse(summary);
  EXPECT_EQ(j.at("val_split"), 128);
  EXPECT_EQ(j.at("selected_epoch"), best_epoch);
  // A resume must hold out the same images.
  auto other = c;
  other.val_split = 64;
  other.epochs = 4;
  other.resume = true;
  try {
    lt::run_training(other);
    ADD_FAILURE() << "a resume with another --val-split ran";
  } catch (const lt::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--val-split"), std::string::npos) << e.what();
  }
  // More than the training set: named.
  ScratchDir too_many("val-too-many");
  auto big = small_run(too_many.path);
  big.val_split = 512;
  try {
    lt::run_training(big);
    ADD_FAILURE() << "--val-split 512 of 512 images ran";
  } catch (const lt::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("--val-split"), std::string::npos) << e.what();
  }
}

// `train --data synthetic --model mlp --optimizer tvlars:paper --epochs 1 --val-split 256`, then the same run
// built from its config.json alone: the same bits.
TEST(Trainer, ARunRebuiltFromItsConfigJsonAloneIsBitIdentical) {
  ScratchDir first("from-config-a"), second("from-config-b");
  lt::TrainConfig c;
  c.data = "synthetic";
  c.model = "mlp";
  c.optimizer = "tvlars:paper";
  c.epochs = 1;
  c.val_split = 256;
  c.threads = 1;
  c.progress = "none";
  c.plots = false;
  c.out = first.path.string();
  ASSERT_EQ(lt::run_training(c).status, "completed");
  auto again = lt::TrainConfig::from_json(file_bytes(first.path / "config.json"), "config.json");
  again.out = second.path.string();
  ASSERT_EQ(lt::run_training(again).status, "completed");
  EXPECT_EQ(file_bytes(first.path / "model.pt"), file_bytes(second.path / "model.pt"));
  auto metrics = [](const fs::path& p) {  // without the time columns
    std::ifstream in(p);
    std::string line, kept;
    while (std::getline(in, line)) {
      std::stringstream ss(line);
      std::string field;
      for (int i = 0; i < 9 && std::getline(ss, field, ','); ++i) kept += field + ",";
      kept += "\n";
    }
    return kept;
  };
  EXPECT_EQ(metrics(first.path / "metrics.csv"), metrics(second.path / "metrics.csv"));
  const auto j = nlohmann::json::parse(file_bytes(first.path / "summary.json"));
  EXPECT_NE(j.at("optimizer_resolved").at("engine").get<std::string>().find("eta=0.001 "), std::string::npos);
  EXPECT_DOUBLE_EQ(j.at("optimizer_resolved").at("lr").get<double>(), 2.0);
  const auto recorded = nlohmann::json::parse(file_bytes(first.path / "config.json"));
  EXPECT_EQ(recorded.at("val-split"), 256);
  EXPECT_DOUBLE_EQ(recorded.at("lr").get<double>(), 2.0);  // the lr used, not "the recipe's"
}

TEST(Trainer, ResumeEqualsAnUninterruptedRun) {
  ScratchDir straight("straight"), split("split");
  auto a = small_run(straight.path);
  a.optimizer = "lamb";
  a.augment = "paper";  // augmentation randomness must continue identically too
  lt::run_training(a);

  auto b = small_run(split.path);
  b.optimizer = "lamb";
  b.augment = "paper";
  b.epochs = 1;
  lt::run_training(b);
  b.epochs = 3;
  b.resume = true;
  const auto s = lt::run_training(b);
  EXPECT_EQ(s.history.size(), 3u);

  auto ma = load_model(straight.path / "model.pt"), mb = load_model(split.path / "model.pt");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  const auto ba = ma->named_buffers(), bb = mb->named_buffers();
  for (const auto& item : ba) EXPECT_TRUE(torch::equal(item.value(), bb[item.key()])) << item.key();
}

void expect_same_weights(const fs::path& a_dir, const fs::path& b_dir) {
  auto ma = load_model(a_dir / "model.pt"), mb = load_model(b_dir / "model.pt");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  const auto ba = ma->named_buffers(), bb = mb->named_buffers();
  for (const auto& item : ba) EXPECT_TRUE(torch::equal(item.value(), bb[item.key()])) << item.key();
}

void expect_same_history(const lt::TrainSummary& a, const lt::TrainSummary& b) {
  ASSERT_EQ(a.history.size(), b.history.size());
  for (size_t i = 0; i < a.history.size(); ++i) {  // every figure but the timings
    EXPECT_EQ(a.history[i].step, b.history[i].step);
    EXPECT_EQ(a.history[i].lr, b.history[i].lr);
    EXPECT_EQ(a.history[i].train_loss, b.history[i].train_loss) << "epoch " << i + 1;
    EXPECT_EQ(a.history[i].train_acc, b.history[i].train_acc) << "epoch " << i + 1;
    EXPECT_EQ(a.history[i].test_loss, b.history[i].test_loss) << "epoch " << i + 1;
    EXPECT_EQ(a.history[i].test_top1, b.history[i].test_top1) << "epoch " << i + 1;
  }
}

// --checkpoint-every N writes checkpoints within epochs; a run that dies after one (as a SIGKILL leaves it)
// resumes from it, in the middle of an epoch, and ends exactly as an uninterrupted run: weights, and every
// epoch's metrics (the resumed epoch's sums are carried in the checkpoint).
TEST(Trainer, ResumeWithinAnEpochEqualsAnUninterruptedRun) {
  ScratchDir straight("straight-within"), crashed("crashed-within");
  auto a = small_run(straight.path);  // 3 epochs of 4 steps
  a.optimizer = "lamb";
  a.augment = "paper";
  a.telemetry_every = 1;
  const auto sa = lt::run_training(a);

  auto b = a;
  b.out = crashed.path.string();
  b.checkpoint_every = 3;
  b.crash_after_step = 6;  // dies after its 7th step: the last checkpoint is the one after step 6 (epoch 2, batch 2)
  EXPECT_THROW(lt::run_training(b), lt::SimulatedCrash);
  EXPECT_FALSE(fs::exists(crashed.path / "model.pt"));
  {
    torch::serialize::InputArchive archive;
    lt::load_archive(crashed.path / "checkpoint.pt", archive);
    c10::IValue meta;
    archive.read("meta", meta);
    const auto j = nlohmann::json::parse(meta.toStringRef());
    EXPECT_EQ(j.at("step"), 6);
    EXPECT_EQ(j.at("epoch"), 1);
    EXPECT_EQ(j.at("within_epoch").at("batch"), 2);
  }
  b.crash_after_step = -1;
  b.resume = true;
  const auto sb = lt::run_training(b);
  expect_same_weights(straight.path, crashed.path);
  expect_same_history(sa, sb);
  // telemetry.csv holds each step once, as the uninterrupted run's.
  auto rows = [](const fs::path& p) {
    std::ifstream in(p);
    std::string line;
    int64_t n = 0;
    while (std::getline(in, line)) ++n;
    return n;
  };
  EXPECT_EQ(rows(straight.path / "telemetry.csv"), rows(crashed.path / "telemetry.csv"));
}

// A stop request (Ctrl-C, SIGTERM) writes a checkpoint at the step the run stops after, wherever that falls,
// so the resumed run repeats no step and still ends exactly as an uninterrupted run.
TEST(Trainer, StopRequestCheckpointsWhereItStops) {
  ScratchDir straight("straight-stop"), stopped("stopped");
  auto a = small_run(straight.path);
  a.epochs = 4;
  const auto sa = lt::run_training(a);

  auto b = a;
  b.out = stopped.path.string();
  std::atomic<bool> done{false};
  std::thread stopper([&] {  // asks to stop as soon as the first checkpoint exists (early in epoch 2 of 4)
    while (!done && !fs::exists(stopped.path / "checkpoint.pt")) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    lt::request_stop();
  });
  const auto first = lt::run_training(b);
  done = true;
  stopper.join();
  ASSERT_EQ(first.status, "interrupted") << "the run ended before the stop request; make it longer";
  torch::serialize::InputArchive archive;
  lt::load_archive(stopped.path / "checkpoint.pt", archive);
  c10::IValue meta;
  archive.read("meta", meta);
  EXPECT_EQ(nlohmann::json::parse(meta.toStringRef()).at("step"), first.steps) << "the checkpoint is not where it stopped";
  b.resume = true;
  const auto sb = lt::run_training(b);
  expect_same_weights(straight.path, stopped.path);
  expect_same_history(sa, sb);
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// A resume refuses a truncated, damaged or foreign checkpoint with a message naming the file and the defect,
// before LibTorch reads it; the intact file still resumes.
TEST(Checkpoint, TruncatedDamagedAndForeignFilesAreRefused) {
  ScratchDir dir("damaged");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.epochs = 1;
  lt::run_training(c);
  const fs::path ckpt = dir.path / "checkpoint.pt";
  const std::string good = read_bytes(ckpt);
  ASSERT_EQ(good.compare(0, 22, "largebatch-checkpoint\n"), 0);
  c.resume = true;
  c.epochs = 2;
  auto refused = [&](const std::string& bytes, const std::string& why) {
    write_bytes(ckpt, bytes);
    try {
      lt::run_training(c);
      ADD_FAILURE() << "resumed from a checkpoint that is " << why;
    } catch (const lt::UsageError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(ckpt.string()), std::string::npos) << m;
      EXPECT_NE(m.find(why), std::string::npos) << m;
    }
  };
  refused(good.substr(0, good.size() / 2), "truncated");
  refused(good.substr(0, 30), "truncated");
  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x10;
  refused(flipped, "damaged: CRC-32");
  refused(good + "x", "trailing data");
  refused(good.substr(38), "bare LibTorch archive");  // the payload alone: a zip without our header
  refused("hello", "not a largebatch checkpoint");
  std::string version = good;
  version[22] = 9;
  refused(version, "format version 9");

  write_bytes(ckpt, good);
  EXPECT_EQ(lt::run_training(c).history.size(), 2u);
  // Every reader takes both kinds of file: the verified checkpoint and the bare model.pt.
  torch::serialize::InputArchive a, b;
  lt::load_archive(ckpt, a);
  lt::load_archive(dir.path / "model.pt", b);
  torch::serialize::InputArchive model_part;
  EXPECT_TRUE(a.try_read("model", model_part));
  EXPECT_THROW(lt::load_archive(dir.path / "config.json", b), lt::CheckpointError);
  // A finished run that lost its checkpoint is not started again over its results.
  fs::remove(ckpt);
  try {
    lt::run_training(c);
    ADD_FAILURE() << "resumed a completed run without a checkpoint";
  } catch (const lt::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("holds a completed run's results but no checkpoint.pt"), std::string::npos)
        << e.what();
  }
}

TEST(Trainer, MicroBatchesEqualOneBigBatchWithoutBatchNorm) {
  ScratchDir whole("whole"), micro("micro");
  auto a = small_run(whole.path);
  a.model = "mlp";
  a.optimizer = "lars";
  a.lr = 2.0;
  a.epochs = 2;
  lt::run_training(a);
  auto b = a;
  b.out = micro.path.string();
  b.micro_batch = 32;
  lt::run_training(b);
  auto ma = load_model(whole.path / "model.pt", "mlp"), mb = load_model(micro.path / "model.pt", "mlp");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) {
    EXPECT_TRUE(torch::allclose(item.value(), pb[item.key()], 1e-4, 1e-6)) << item.key();
  }
}

TEST(Trainer, DivergenceStopsAndNamesTheStepAndLayer) {
  ScratchDir dir("diverge");
  auto c = small_run(dir.path);
  c.optimizer = "lars";
  c.lr = 1e30;
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "diverged");
  EXPECT_NE(s.message.find("non-finite loss"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("at step"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("largest trust ratio"), std::string::npos) << s.message;
  std::ifstream summary(dir.path / "summary.json");
  EXPECT_EQ(nlohmann::json::parse(summary)["status"], "diverged");
}

// --on-nonfinite: a NaN gradient (injected after the all-reduce, as an overflow leaves it) stops the run naming
// the step and layer, or is skipped without any state change.
TEST(OnNonfinite, StopNamesTheStepAndTheLayer) {
  ScratchDir dir("nonfinite-stop");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.optimizer = "lars";
  c.inject_nonfinite_gradient_at = {2};
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "diverged");
  EXPECT_NE(s.message.find("non-finite gradient in fc1.weight at step 2"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("--on-nonfinite skip"), std::string::npos) << s.message;
  std::ifstream summary(dir.path / "summary.json");
  EXPECT_EQ(nlohmann::json::parse(summary)["status"], "diverged");
  EXPECT_FALSE(fs::exists(dir.path / "model.pt"));  // nothing presented as a finished model
}

TEST(OnNonfinite, SkippedStepsChangeNothing) {
  // mlp (no BatchNorm buffers), constant lr: skipping every step of epoch 2 must leave exactly the weights of
  // a run that stopped after epoch 1, and the optimizer must have taken only epoch 1's steps.
  ScratchDir one("nonfinite-one"), skipped("nonfinite-skip");
  auto a = small_run(one.path);
  a.model = "mlp";
  a.optimizer = "lars";
  a.epochs = 1;
  lt::run_training(a);
  auto b = a;
  b.out = skipped.path.string();
  b.epochs = 2;
  b.on_nonfinite = "skip";
  b.inject_nonfinite_gradient_at = {4, 5, 6, 7};  // 512 images / 128 = 4 steps per epoch
  const auto s = lt::run_training(b);
  EXPECT_EQ(s.status, "completed") << s.message;
  EXPECT_EQ(s.skipped_steps, 4);
  EXPECT_EQ(s.steps, 8);
  auto ma = load_model(one.path / "model.pt", "mlp"), mb = load_model(skipped.path / "model.pt", "mlp");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  std::ifstream summary(skipped.path / "summary.json");
  EXPECT_EQ(nlohmann::json::parse(summary)["skipped_steps"], 4);
  // The count survives a resume (it is kept in the checkpoint).
  b.epochs = 3;
  b.resume = true;
  b.inject_nonfinite_gradient_at = {9};
  const auto r = lt::run_training(b);
  EXPECT_EQ(r.status, "completed") << r.message;
  EXPECT_EQ(r.skipped_steps, 5);
}

TEST(OnNonfinite, SkippingCannotHideARunThatCannotRecover) {
  ScratchDir dir("nonfinite-limit");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.optimizer = "lars";
  c.on_nonfinite = "skip";
  c.skip_limit = 3;
  c.inject_nonfinite_gradient_at = {1, 2, 3, 4, 5};
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "diverged");
  EXPECT_EQ(s.skipped_steps, 2);
  EXPECT_NE(s.message.find("3 steps skipped in a row (--skip-limit 3)"), std::string::npos) << s.message;

  // An absurd learning rate: the losses after the first step are not finite, every step would be skipped.
  ScratchDir absurd("nonfinite-absurd");
  auto d = small_run(absurd.path);
  d.model = "mlp";
  d.optimizer = "lars";
  d.lr = 1e30;
  d.on_nonfinite = "skip";
  d.skip_limit = 5;  // the run has 12 steps
  const auto t = lt::run_training(d);
  EXPECT_EQ(t.status, "diverged") << t.message;
  EXPECT_FALSE(fs::exists(absurd.path / "model.pt"));

  // The count of steps skipped in a row runs across epochs, and across a resume at an epoch's end: skips at the
  // last step of epoch 1 and the first of epoch 2 reach --skip-limit 2 whether or not the run was resumed between.
  ScratchDir across("nonfinite-across");
  auto e = small_run(across.path);  // 4 steps per epoch
  e.model = "mlp";
  e.on_nonfinite = "skip";
  e.skip_limit = 2;
  e.inject_nonfinite_gradient_at = {3, 4};
  EXPECT_EQ(lt::run_training(e).status, "diverged");
  ScratchDir resumed("nonfinite-resumed");
  auto f = e;
  f.out = resumed.path.string();
  f.epochs = 1;
  ASSERT_EQ(lt::run_training(f).status, "completed");
  f.epochs = 3;
  f.resume = true;
  const auto u = lt::run_training(f);
  EXPECT_EQ(u.status, "diverged") << u.message;
  EXPECT_NE(u.message.find("2 steps skipped in a row"), std::string::npos) << u.message;
}

TEST(Trainer, BadInputIsAUsageErrorNamingTheFlag) {
  ScratchDir dir("bad");
  auto expect_usage = [&](lt::TrainConfig c, const std::string& needle) {
    try {
      lt::run_training(c);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const lt::UsageError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto c = small_run(dir.path);
  auto bad = c;
  bad.micro_batch = 100;
  expect_usage(bad, "--micro-batch 100 does not divide --batch-size 128");
  bad = c;
  bad.model = "vgg";
  expect_usage(bad, "--model");
  bad = c;
  bad.optimizer = "adamax";
  expect_usage(bad, "--optimizer");
  bad = c;
  bad.optimizer_options["momentun"] = "0.9";
  expect_usage(bad, "momentun");
  {  // --resume with nothing to resume from starts from the beginning (a retry loop can always pass it)
    ScratchDir fresh("resume-fresh");
    auto r = small_run(fresh.path);
    r.epochs = 1;
    r.resume = true;
    EXPECT_EQ(lt::run_training(r).history.size(), 1u);
  }
  bad = c;
  bad.device = "cuda";
  if (!torch::cuda::is_available()) expect_usage(bad, "--device cuda");
  // An existing run is never overwritten.
  lt::run_training(c);
  expect_usage(c, "already holds a run");
  bad = c;
  bad.resume = true;
  bad.batch_size = 64;
  expect_usage(bad, "--batch-size differs");
}

}  // namespace

// ---- data-parallel launch environment -----------------------------------------------------------------

namespace {
// Sets variables for one test and restores the previous environment afterwards.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const char* name : kAll) {
      const char* v = std::getenv(name);
      saved_.emplace_back(name, v ? std::optional<std::string>(v) : std::nullopt);
      unsetenv(name);
    }
    for (const auto& [k, v] : vars) setenv(k, v, 1);
  }
  ~ScopedEnv() {
    for (const auto& [k, v] : saved_) {
      if (v) setenv(k.c_str(), v->c_str(), 1);
      else unsetenv(k.c_str());
    }
  }

 private:
  static constexpr const char* kAll[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                         "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                                         "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"};
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

void expect_env_error(std::initializer_list<std::pair<const char*, const char*>> vars, const std::string& needle) {
  ScopedEnv env(vars);
  try {
    largebatch::dist::launch_env_from_environment();
    ADD_FAILURE() << "accepted; expected an error naming " << needle;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(LaunchEnv, TorchrunOpenMpiSlurmAndNone) {
  {
    ScopedEnv env({});
    const auto e = largebatch::dist::launch_env_from_environment();
    EXPECT_EQ(e.world, 1);
    EXPECT_FALSE(e.distributed());
    EXPECT_EQ(e.source, "none");
  }
  {
    ScopedEnv env({{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}, {"MASTER_ADDR", "10.0.0.7"},
                   {"MASTER_PORT", "29611"}, {"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "9"}});
    const auto e = largebatch::dist::launch_env_from_environment();  // torchrun's variables win
    EXPECT_EQ(e.source, "torchrun");
    EXPECT_EQ(e.rank, 3);
    EXPECT_EQ(e.world, 8);
    EXPECT_EQ(e.local_rank, 1);
    EXPECT_EQ(e.master_addr, "10.0.0.7");
    EXPECT_EQ(e.master_port, 29611);
  }
  {
    ScopedEnv env({{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}});
    const auto e = largebatch::dist::launch_env_from_environment();
    EXPECT_EQ(e.source, "openmpi");
    EXPECT_EQ(e.rank, 2);
    EXPECT_EQ(e.world, 4);
    EXPECT_EQ(e.local_rank, 0);
    EXPECT_EQ(e.master_port, 29500);
  }
  {
    ScopedEnv env({{"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"}});
    const auto e = largebatch::dist::launch_env_from_environment();
    EXPECT_EQ(e.source, "slurm");
    EXPECT_EQ(e.rank, 1);
    EXPECT_EQ(e.local_rank, 1);  // no SLURM_LOCALID: the global rank
    EXPECT_TRUE(e.distributed());
  }
}

TEST(LaunchEnv, MalformedValuesNameTheVariable) {
  expect_env_error({{"RANK", "x"}, {"WORLD_SIZE", "2"}}, "RANK='x'");
  expect_env_error({{"RANK", "0"}}, "WORLD_SIZE is missing");
  expect_env_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}}, "RANK=2 is not below WORLD_SIZE=2");
  expect_env_error({{"RANK", "0"}, {"WORLD_SIZE", "0"}}, "WORLD_SIZE='0'");
  expect_env_error({{"MASTER_PORT", "70000"}}, "MASTER_PORT=70000");
  expect_env_error({{"MASTER_PORT", "80a"}}, "MASTER_PORT='80a'");
  expect_env_error({{"SLURM_NTASKS", "2"}}, "SLURM_PROCID is missing");
}

// ---- Barlow Twins ---------------------------------------------------------------------------------------

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
