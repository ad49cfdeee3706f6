// Models: every architecture, initialisation, synchronised batch norm, and largebatch's CPU kernels (small-map
// convolutions and batch norm, max pooling, the fused first convolution) against LibTorch's.
#include <largebatch/models/conv_pool.h>
#include <largebatch/models/models.h>
#include <largebatch/models/pooling.h>
#include <largebatch/models/winograd_conv.h>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <iostream>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace lm = largebatch::models;

namespace {

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
    native->small_map_kernels = false;  // LibTorch's batch_norm itself
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

// largebatch's BatchNorm kernel (dense NCHW maps in training) against LibTorch's batch_norm: outputs, the
// gradients of input, weight and bias, running statistics (momentum and cumulative average), a second
// derivative; the same bits for any thread count.
TEST(Models, OwnBatchNormComputesWhatBatchNormComputes) {
  const std::vector<std::vector<int64_t>> shapes{{8, 6, 5, 5}, {4, 3, 28, 28}, {16, 4, 1, 1}, {3, 5, 7, 9}, {2, 6, 17, 1}};
  for (const auto dtype : {torch::kFloat64, torch::kFloat32}) {
    for (const auto& shape : shapes) {
      for (const bool cumulative : {false, true}) {
        SCOPED_TRACE(std::to_string(shape[2]) + "x" + std::to_string(shape[3]) + (cumulative ? " cumulative" : ""));
        torch::manual_seed(6);
        auto options = torch::nn::BatchNormOptions(6).momentum(cumulative ? c10::optional<double>() : 0.1);
        lm::SyncableBatchNorm2d own(options.num_features(shape[1])), library(options.num_features(shape[1]));
        library->small_map_kernels = false;
        const BatchNormRun run = expect_same_batchnorm(own, library, shape, dtype);
        ASSERT_TRUE(run.y.grad_fn());
        EXPECT_NE(run.y.grad_fn()->name().find("BatchNormFunction"), std::string::npos) << run.y.grad_fn()->name();
        // A second step moves the running statistics again the same way.
        (void)own->forward(run.x.detach());
        (void)library->forward(run.x2.detach());
        EXPECT_TRUE(torch::allclose(own->running_mean, library->running_mean, run.tol, run.tol));
        EXPECT_TRUE(torch::allclose(own->running_var, library->running_var, run.tol, run.tol));
      }
    }
  }
  // Without running statistics (track_running_stats false; ghost BatchNorm's groups), and ghost BatchNorm itself.
  for (const bool ghost : {false, true}) {
    SCOPED_TRACE(ghost ? "ghost groups of 4" : "no running statistics");
    torch::manual_seed(7);
    auto options = torch::nn::BatchNormOptions(3).track_running_stats(ghost);
    lm::SyncableBatchNorm2d own(options), library(options);
    library->small_map_kernels = false;
    own->group_size = library->group_size = ghost ? 4 : 0;
    const auto x = torch::randn({10, 3, 5, 5}, torch::kFloat64).requires_grad_(true);
    const auto x2 = x.detach().clone().requires_grad_(true);
    own->to(torch::kFloat64);
    library->to(torch::kFloat64);
    const auto y = own->forward(x), y2 = library->forward(x2);
    EXPECT_TRUE(torch::allclose(y, y2, 1e-12, 1e-12));
    (y * y).sum().backward();
    (y2 * y2).sum().backward();
    EXPECT_TRUE(torch::allclose(x.grad(), x2.grad(), 1e-12, 1e-12));
    if (ghost) EXPECT_TRUE(torch::allclose(own->running_var, library->running_var, 1e-12, 1e-12));
  }
  // A second derivative (create_graph) through both.
  torch::manual_seed(8);
  lm::SyncableBatchNorm2d own(4), library(4);
  library->small_map_kernels = false;
  own->to(torch::kFloat64);
  library->to(torch::kFloat64);
  const auto x = torch::randn({5, 4, 3, 3}, torch::kFloat64).requires_grad_(true);
  const auto x2 = x.detach().clone().requires_grad_(true);
  const auto up = torch::randn({5, 4, 3, 3}, torch::kFloat64);
  const auto g1 = torch::autograd::grad({(own->forward(x) * up).sum()}, {x}, {}, true, true)[0];
  const auto g2 = torch::autograd::grad({(library->forward(x2) * up).sum()}, {x2}, {}, true, true)[0];
  (g1 * g1).sum().backward();
  (g2 * g2).sum().backward();
  EXPECT_TRUE(torch::allclose(x.grad(), x2.grad(), 1e-10, 1e-10)) << (x.grad() - x2.grad()).abs().max();
  // Thread counts do not change a bit.
  const int before = torch::get_num_threads();
  std::vector<torch::Tensor> runs[2];
  for (int threads : {1, 2}) {
    torch::set_num_threads(threads);
    torch::manual_seed(9);
    lm::SyncableBatchNorm2d bn(32);
    const auto input = torch::randn({64, 32, 14, 14}).requires_grad_(true);
    const auto y = bn->forward(input);
    (y * torch::randn_like(y)).sum().backward();
    runs[threads - 1] = {y.detach(), input.grad(), bn->weight.grad(), bn->bias.grad(), bn->running_var};
  }
  torch::set_num_threads(before);
  for (size_t k = 0; k < runs[0].size(); ++k) EXPECT_TRUE(torch::equal(runs[0][k], runs[1][k])) << "tensor " << k;
}

// Ghost BatchNorm: each group of the batch normalised exactly as LibTorch's batch_norm normalises it alone
// (groups 4, 4 and a last of 2), gradients flowing through, and the running statistics moved once by the mean
// over groups of their means and unbiased variances.
TEST(Models, GhostBatchNormNormalisesEachGroupAsBatchNormDoes) {
  torch::manual_seed(11);
  lm::SyncableBatchNorm2d ghost(3);
  ghost->group_size = 4;
  ghost->small_map_kernels = false;  // each group through LibTorch's batch_norm, to compare bits
  ghost->train();
  {
    torch::NoGradGuard no_grad;
    ghost->weight.uniform_(0.5, 1.5);
    ghost->bias.uniform_(-0.5, 0.5);
  }
  const auto x = (torch::randn({10, 3, 5, 5}, torch::kFloat64) * 2 + 1).requires_grad_(true);
  const auto before_mean = ghost->running_mean.clone(), before_var = ghost->running_var.clone();
  const auto y = ghost->forward(x.to(torch::kFloat32));
  const auto groups = x.detach().to(torch::kFloat32).split(4, 0);
  ASSERT_EQ(groups.size(), 3u);
  torch::Tensor means, variances;
  for (size_t k = 0; k < groups.size(); ++k) {
    const auto expected = torch::batch_norm(groups[k], ghost->weight, ghost->bias, {}, {}, true, 0.0, 1e-5, false);
    EXPECT_TRUE(torch::equal(y.narrow(0, static_cast<int64_t>(4 * k), groups[k].size(0)), expected)) << "group " << k;
    const auto g = groups[k].to(torch::kFloat64);
    means = k == 0 ? g.mean({0, 2, 3}) : means + g.mean({0, 2, 3});
    variances = k == 0 ? g.var({0, 2, 3}, true) : variances + g.var({0, 2, 3}, true);
  }
  const double m = 0.1;  // BatchNormOptions' default momentum
  EXPECT_TRUE(torch::allclose(ghost->running_mean, (before_mean * (1 - m) + m * means / 3).to(torch::kFloat32), 1e-6, 1e-7));
  EXPECT_TRUE(torch::allclose(ghost->running_var, (before_var * (1 - m) + m * variances / 3).to(torch::kFloat32), 1e-6, 1e-7));
  y.sum().backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
  // A whole-batch BatchNorm differs; a group as large as the batch is the whole batch.
  lm::SyncableBatchNorm2d whole(3);
  whole->train();
  EXPECT_FALSE(torch::allclose(whole->forward(x.detach().to(torch::kFloat32)), y.detach()));
  // Evaluation uses the running statistics, as BatchNorm does.
  ghost->eval();
  const auto e = ghost->forward(x.detach().to(torch::kFloat32));
  EXPECT_TRUE(torch::allclose(e, torch::batch_norm(x.detach().to(torch::kFloat32), ghost->weight, ghost->bias,
                                                   ghost->running_mean, ghost->running_var, false, 0.1, 1e-5, false)));
}

// One training step's loss (first) and every parameter's gradient, with largebatch's CPU kernels on or off.
std::vector<torch::Tensor> loss_and_gradients(lm::ClassifierImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                                              bool cpu_kernels, bool inexact_kernels = true) {
  model.set_cpu_kernels(cpu_kernels);
  if (!inexact_kernels)  // BatchNorm's kernel and the Winograd convolutions: other sums, other bits
    for (auto& module : model.modules()) {
      if (auto* bn = module->as<lm::SyncableBatchNorm2dImpl>()) bn->small_map_kernels = false;
      if (auto* conv = module->as<lm::ConvImpl>()) conv->winograd_kernels = false;
    }
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

// The bits of a floating-point tensor as integers: equal bits, NaNs and signed zeros included.
torch::Tensor bits(const torch::Tensor& t) {
  const auto type = t.scalar_type();
  return t.contiguous().view(type == torch::kDouble ? torch::kInt64 : type == torch::kBFloat16 ? torch::kInt16 : torch::kInt32);
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
  // bfloat16: what the compact CNN pools under bf16 autocast.
  for (const auto dtype : {torch::kFloat32, torch::kFloat64, torch::kBFloat16}) {
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
      // (2) of wide-ranging magnitudes, whose sums (overlapping windows) depend on their order; (3) not contiguous;
      const auto options = torch::TensorOptions().dtype(dtype);
      auto signed_zeros = torch::randint(-2, 3, own.sizes(), options).mul_(0.5);
      signed_zeros.masked_fill_(signed_zeros == 0, -0.0);
      const auto magnitudes = torch::randn(own.sizes(), options) * torch::exp(4 * torch::randn(own.sizes(), options));
      const auto transposed = torch::randn({own.size(0), own.size(1), own.size(3), own.size(2)}, options).transpose(2, 3);
      // (4) with NaNs, whose bits the sums keep (bfloat16: c10's conversion makes every NaN 0x7FC0).
      const auto with_nan = magnitudes.masked_fill(torch::rand(own.sizes()) < 0.05, std::numeric_limits<double>::quiet_NaN());
      for (const auto& grad : {signed_zeros, magnitudes, transposed, with_nan}) {
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

// What the fused first convolution is checked against: LibTorch's convolution and max pooling.
torch::Tensor library_conv_pool(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b) {
  namespace F = torch::nn::functional;
  return torch::max_pool2d(F::conv2d(x, w, F::Conv2dFuncOptions().bias(b).stride(1).padding(1)), 2, 2);
}

struct ConvPoolCase {
  std::vector<int64_t> input;
  int64_t out_channels;
  bool bias;
};

// The compact CNN's first layer (a batch that is no multiple of the backward pass's 16-image chunks), several
// input channels with a bias, odd and tiny maps (floor pooling leaves the last row and column out).
const std::vector<ConvPoolCase> kConvPoolCases = {
    {{37, 1, 28, 28}, 32, false}, {{5, 3, 9, 7}, 6, true}, {{2, 2, 2, 2}, 3, true}, {{20, 1, 6, 5}, 4, false},
    {{3, 16, 4, 10}, 2, true}};

TEST(Models, FusedFirstConvolutionComputesWhatConvolutionAndPoolingComputeToTheBit) {
  // Small integers everywhere: every sum is exact in float in any order, so the fused operation must give
  // LibTorch's values, winners (ties are frequent: the first tap keeps them) and gradients exactly.
  for (const auto& c : kConvPoolCases) {
    SCOPED_TRACE(::testing::Message() << c.input << " -> " << c.out_channels << (c.bias ? " with bias" : ""));
    torch::manual_seed(7);
    const auto x = torch::randint(-2, 3, c.input, torch::kFloat);
    const auto w0 = torch::randint(-1, 2, {c.out_channels, c.input[1], 3, 3}, torch::kFloat);
    const auto b0 = c.bias ? torch::randint(-2, 3, {c.out_channels}, torch::kFloat) : torch::Tensor();
    auto own_w = w0.clone().requires_grad_(true), lib_w = w0.clone().requires_grad_(true);
    auto own_b = c.bias ? b0.clone().requires_grad_(true) : torch::Tensor();
    auto lib_b = c.bias ? b0.clone().requires_grad_(true) : torch::Tensor();
    ASSERT_TRUE(lm::conv3x3_max_pool2_takes(x, own_w, own_b));
    const auto own = lm::conv3x3_max_pool2(x, own_w, own_b);
    const auto library = library_conv_pool(x, lib_w, lib_b);
    ASSERT_EQ(own.sizes(), library.sizes());
    EXPECT_TRUE(torch::equal(own, library));
    const auto grad = torch::randint(-3, 4, own.sizes(), torch::kFloat);
    std::vector<torch::Tensor> own_wrt{own_w}, lib_wrt{lib_w};
    if (c.bias) {
      own_wrt.push_back(own_b);
      lib_wrt.push_back(lib_b);
    }
    const auto own_grads = torch::autograd::grad({own}, own_wrt, {grad}, /*retain_graph=*/true);
    const auto lib_grads = torch::autograd::grad({library}, lib_wrt, {grad}, /*retain_graph=*/true);
    for (size_t k = 0; k < own_grads.size(); ++k) EXPECT_TRUE(torch::equal(own_grads[k], lib_grads[k])) << "gradient " << k;
    // A second derivative (create_graph, as sharpness estimates need): d/dw of v . d(sum(s * y^2))/dw.
    const auto s = torch::randint(-2, 3, own.sizes(), torch::kFloat), v = torch::randint(-1, 2, w0.sizes(), torch::kFloat);
    const auto own_g = torch::autograd::grad({(s * lm::conv3x3_max_pool2(x, own_w, own_b).pow(2)).sum()}, {own_w}, {},
                                             true, true)[0];
    const auto lib_g = torch::autograd::grad({(s * library_conv_pool(x, lib_w, lib_b).pow(2)).sum()}, {lib_w}, {},
                                             true, true)[0];
    EXPECT_TRUE(torch::equal(own_g, lib_g));
    const auto own_hv = torch::autograd::grad({(own_g * v).sum()}, {own_w})[0];
    const auto lib_hv = torch::autograd::grad({(lib_g * v).sum()}, {lib_w})[0];
    EXPECT_TRUE(torch::equal(own_hv, lib_hv));
  }
}

TEST(Models, FusedFirstConvolutionAgreesToFloatRoundingAndDoesNotDependOnThreads) {
  for (const auto& c : kConvPoolCases) {
    SCOPED_TRACE(::testing::Message() << c.input << " -> " << c.out_channels);
    torch::manual_seed(8);
    const auto x = torch::randn(c.input);
    auto w = (0.3 * torch::randn({c.out_channels, c.input[1], 3, 3})).requires_grad_(true);
    auto b = c.bias ? torch::randn({c.out_channels}).requires_grad_(true) : torch::Tensor();
    std::vector<torch::Tensor> wrt{w};
    if (c.bias) wrt.push_back(b);
    const auto own = lm::conv3x3_max_pool2(x, w, b);
    const auto library = library_conv_pool(x, w, b);
    const double scale = library.abs().max().item<double>();
    EXPECT_LE((own - library).abs().max().item<double>(), 1e-6 * scale);
    const auto grad = torch::randn(own.sizes());
    const auto fast = torch::autograd::grad({own}, wrt, {grad}, /*retain_graph=*/true);
    // The differentiable path (LibTorch's convolution read at the same winners): the same sums in another order.
    const auto reference = torch::autograd::grad({own}, wrt, {grad}, /*retain_graph=*/true, /*create_graph=*/true);
    for (size_t k = 0; k < fast.size(); ++k) {
      const double g_scale = reference[k].abs().max().item<double>() + 1e-12;
      EXPECT_LE((fast[k] - reference[k].detach()).abs().max().item<double>(), 1e-5 * g_scale) << "gradient " << k;
    }
    // The same bits on one thread as on several (fixed chunks of images, summed in order).
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const auto one_out = lm::conv3x3_max_pool2(x, w, b);
    const auto one = torch::autograd::grad({one_out}, wrt, {grad});
    at::set_num_threads(threads);
    EXPECT_TRUE(torch::equal(bits(one_out), bits(own)));
    for (size_t k = 0; k < fast.size(); ++k) EXPECT_TRUE(torch::equal(bits(one[k]), bits(fast[k]))) << "gradient " << k;
  }
  // NaN in the input reaches the same outputs as through LibTorch's convolution and pooling.
  auto x = torch::randn({3, 1, 8, 8});
  x[1][0][3][4] = std::numeric_limits<float>::quiet_NaN();
  const auto w = torch::randn({4, 1, 3, 3});
  EXPECT_TRUE(torch::equal(torch::isnan(lm::conv3x3_max_pool2(x, w, torch::Tensor())),
                           torch::isnan(library_conv_pool(x, w, torch::Tensor()))));
}

TEST(Models, FusedFirstConvolutionLeavesWhatItDoesNotTakeToLibTorch) {
  const auto x = torch::randn({2, 3, 8, 8});
  const auto w = torch::randn({4, 3, 3, 3}), b = torch::randn({4});
  EXPECT_TRUE(lm::conv3x3_max_pool2_takes(x, w, b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(x.clone().requires_grad_(true), w, b));  // not the model's input
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(x.to(torch::kDouble), w.to(torch::kDouble), b.to(torch::kDouble)));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(x.contiguous(torch::MemoryFormat::ChannelsLast), w, b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(x, torch::randn({4, 3, 5, 5}), b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(x, torch::randn({4, 2, 3, 3}), b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(x, w, torch::randn({5})));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(torch::randn({2, 17, 8, 8}), torch::randn({4, 17, 3, 3}), b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(torch::randn({2, 3, 1, 8}), w, b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(torch::randn({0, 3, 8, 8}), w, b));
  EXPECT_FALSE(lm::conv3x3_max_pool2_takes(torch::randn({3, 8, 8}), w, b));
  {
    // Under autocast it takes the input all the same and computes in float: the same bits as without.
    const auto outside = lm::conv3x3_max_pool2(x, w, b);
    at::autocast::set_cpu_enabled(true);
    EXPECT_TRUE(lm::conv3x3_max_pool2_takes(x, w, b));
    const auto inside = lm::conv3x3_max_pool2(x, w, b);
    at::autocast::set_cpu_enabled(false);
    EXPECT_EQ(inside.scalar_type(), torch::kFloat);
    EXPECT_TRUE(torch::equal(bits(inside), bits(outside)));
  }
  EXPECT_THROW(lm::conv3x3_max_pool2(x, torch::randn({4, 3, 5, 5}), b), c10::Error);
}

// Inputs with what rounding and the pooling's order must get right: NaN, both infinities, exact ties (zero
// weights make every position of a window equal), and values that round up to bfloat16's next exponent.
torch::Tensor awkward_conv_pool_input(const std::vector<int64_t>& shape) {
  auto x = torch::randn(shape);
  const auto flat = x.view({-1});
  const int64_t n = flat.numel();
  flat[n / 3] = std::numeric_limits<float>::quiet_NaN();
  flat[n / 2] = std::numeric_limits<float>::infinity();
  flat[n - 1] = -std::numeric_limits<float>::infinity();
  flat.slice(0, 0, std::min<int64_t>(n / 7, 64)).fill_(1.0f + 255.5f / 65536);  // halfway between two bfloat16s
  return x;
}

// Outputs (float and bfloat16), winners' effect and gradients of the fused layer for one case, on the instruction
// set in use.
std::vector<torch::Tensor> conv_pool_results(const ConvPoolCase& c, uint64_t seed) {
  torch::manual_seed(seed);
  const auto x = awkward_conv_pool_input(c.input);
  auto w = (0.3 * torch::randn({c.out_channels, c.input[1], 3, 3})).requires_grad_(true);
  w.detach()[0].zero_();  // ties in every window of the first output channel
  auto b = c.bias ? torch::randn({c.out_channels}).requires_grad_(true) : torch::Tensor();
  std::vector<torch::Tensor> wrt{w};
  if (c.bias) wrt.push_back(b);
  std::vector<torch::Tensor> results;
  for (const auto type : {torch::kFloat, torch::kBFloat16}) {
    const auto y = lm::conv3x3_max_pool2(x, w, b, type);
    const auto grad = torch::randn(y.sizes()).to(type);
    results.push_back(y.detach());
    for (const auto& g : torch::autograd::grad({y}, wrt, {grad})) results.push_back(g);
  }
  return results;
}

TEST(Models, FusedFirstConvolutionGivesTheSameBitsOnEveryInstructionSet) {
  const auto sets = lm::conv3x3_max_pool2_instruction_sets();
  ASSERT_FALSE(sets.empty());
  EXPECT_EQ(sets.front(), "baseline");
  const std::string before = lm::conv3x3_max_pool2_instruction_set();
  if (!std::getenv("LARGEBATCH_CONV_POOL_SIMD")) EXPECT_EQ(before, sets.back()) << "the widest set this CPU runs is the default";
  std::cout << "instruction sets:";
  for (const auto& name : sets) std::cout << " " << name;
  std::cout << std::endl;
  if (sets.size() == 1) std::cout << "SKIP: this CPU runs the baseline alone; nothing to compare it with" << std::endl;
  for (size_t k = 0; k < kConvPoolCases.size(); ++k) {
    const auto& c = kConvPoolCases[k];
    SCOPED_TRACE(::testing::Message() << c.input << " -> " << c.out_channels);
    lm::use_conv3x3_max_pool2_instruction_set("baseline");
    const auto reference = conv_pool_results(c, 20 + k);
    for (size_t i = 1; i < sets.size(); ++i) {
      lm::use_conv3x3_max_pool2_instruction_set(sets[i]);
      const auto other = conv_pool_results(c, 20 + k);
      ASSERT_EQ(other.size(), reference.size());
      for (size_t t = 0; t < other.size(); ++t)
        EXPECT_TRUE(torch::equal(bits(other[t]), bits(reference[t]))) << sets[i] << ", result " << t;
    }
  }
  lm::use_conv3x3_max_pool2_instruction_set(before);
  EXPECT_EQ(lm::conv3x3_max_pool2_instruction_set(), before);
  EXPECT_THROW(lm::use_conv3x3_max_pool2_instruction_set("sse9"), std::invalid_argument);
}

TEST(Models, FusedFirstConvolutionInBfloat16IsItsFloatResultCast) {
  // A bfloat16 output is the float result rounded as Tensor::to rounds it (NaN, infinities, halfway values
  // included), and a bfloat16 gradient gives the float path's gradients for that gradient widened.
  for (size_t k = 0; k < kConvPoolCases.size(); ++k) {
    const auto& c = kConvPoolCases[k];
    SCOPED_TRACE(::testing::Message() << c.input << " -> " << c.out_channels);
    torch::manual_seed(40 + k);
    const auto x = awkward_conv_pool_input(c.input);
    auto w = (0.3 * torch::randn({c.out_channels, c.input[1], 3, 3})).requires_grad_(true);
    auto b = c.bias ? torch::randn({c.out_channels}).requires_grad_(true) : torch::Tensor();
    std::vector<torch::Tensor> wrt{w};
    if (c.bias) wrt.push_back(b);
    const auto y32 = lm::conv3x3_max_pool2(x, w, b);
    const auto y16 = lm::conv3x3_max_pool2(x, w, b, torch::kBFloat16);
    ASSERT_EQ(y16.scalar_type(), torch::kBFloat16);
    EXPECT_TRUE(torch::equal(bits(y16), bits(y32.to(torch::kBFloat16))));
    EXPECT_TRUE(torch::isnan(y16).any().item<bool>()) << "the case exercises NaN";
    const auto grad16 = torch::randn(y16.sizes()).to(torch::kBFloat16);
    const auto from16 = torch::autograd::grad({y16}, wrt, {grad16});
    const auto from32 = torch::autograd::grad({y32}, wrt, {grad16.to(torch::kFloat)});
    for (size_t t = 0; t < from16.size(); ++t) {
      EXPECT_EQ(from16[t].scalar_type(), torch::kFloat);
      EXPECT_TRUE(torch::equal(bits(from16[t]), bits(from32[t]))) << "gradient " << t;
    }
    // A second derivative through the bfloat16 output: that of the float path given the widened gradient.
    const auto s16 = torch::randn(y16.sizes());
    const auto g16 = torch::autograd::grad({(s16 * lm::conv3x3_max_pool2(x, w, b, torch::kBFloat16).to(torch::kFloat)).sum()},
                                           {w}, {}, true, true)[0];
    const auto g32 = torch::autograd::grad(
        {(s16 * lm::conv3x3_max_pool2(x, w, b).to(torch::kBFloat16).to(torch::kFloat)).sum()}, {w}, {}, true, true)[0];
    EXPECT_TRUE(torch::equal(bits(g16.detach()), bits(g32.detach())));
    EXPECT_TRUE(g16.requires_grad());
  }
  const auto x = torch::randn({2, 1, 8, 8});
  EXPECT_THROW(lm::conv3x3_max_pool2(x, torch::randn({4, 1, 3, 3}), torch::Tensor(), torch::kHalf), c10::Error);
}

// oneDNN's Winograd kernels exist on CPUs with AVX-512 and in builds with oneDNN (LARGEBATCH_WITH_ONEDNN).
bool winograd_available() {
  return lm::winograd_conv3x3_takes(torch::zeros({1, 32, 8, 8}), torch::zeros({64, 32, 3, 3}), torch::Tensor());
}

struct WinogradCase {
  std::vector<int64_t> input;
  int64_t out_channels;
  bool bias;
};
// The compact CNN's second convolution, ResNet-20's last stage, one image, an odd map smaller than one tile,
// more output channels than input ones.
const std::vector<WinogradCase> kWinogradCases = {{{8, 32, 14, 14}, 64, false}, {{4, 64, 8, 8}, 64, true},
                                                  {{1, 32, 14, 14}, 64, true},  {{3, 32, 5, 7}, 64, false},
                                                  {{2, 48, 9, 9}, 96, true}};

// conv2d(x, w, b, 1, 1) and its gradients for the upstream gradient `grad`: {y, dx, dw, db}.
std::vector<torch::Tensor> conv_and_gradients(bool winograd, const torch::Tensor& x, const torch::Tensor& w,
                                              const torch::Tensor& b, const torch::Tensor& grad) {
  auto xg = x.detach().clone().requires_grad_(true), wg = w.detach().clone().requires_grad_(true);
  auto bg = b.defined() ? b.detach().clone().requires_grad_(true) : torch::Tensor();
  const auto y = winograd ? lm::winograd_conv3x3(xg, wg, bg) : torch::conv2d(xg, wg, bg, 1, 1);
  (y * grad).sum().backward();
  return {y.detach(), xg.grad(), wg.grad(), bg.defined() ? bg.grad() : torch::Tensor()};
}

TEST(Models, WinogradConvolutionAgreesWithConv2dWithinItsBoundAndRepeatsItsBits) {
  if (!winograd_available()) GTEST_SKIP() << "SKIP: no oneDNN Winograd kernel here (a CPU without AVX-512, or a build without oneDNN)";
  // Against conv2d in double: the Winograd transforms scale and subtract, so its float error is a few times
  // conv2d's own in float; the bound is 5e-6 of the largest value (measured: at most 1.8e-6, conv2d 1.4e-6).
  const char* names[] = {"output", "input gradient", "weight gradient", "bias gradient"};
  for (const auto& c : kWinogradCases) {
    SCOPED_TRACE(::testing::Message() << c.input << " -> " << c.out_channels << (c.bias ? " with bias" : ""));
    torch::manual_seed(9);
    const auto x = torch::randn(c.input);
    const auto w = torch::randn({c.out_channels, c.input[1], 3, 3}) / std::sqrt(9.0 * c.input[1]);
    const auto b = c.bias ? torch::randn({c.out_channels}) : torch::Tensor();
    const auto grad = torch::randn({c.input[0], c.out_channels, c.input[2], c.input[3]});
    ASSERT_TRUE(lm::winograd_conv3x3_takes(x, w, b));
    const auto own = conv_and_gradients(true, x, w, b, grad);
    const auto single = conv_and_gradients(false, x, w, b, grad);
    const auto exact = conv_and_gradients(false, x.to(torch::kDouble), w.to(torch::kDouble),
                                          c.bias ? b.to(torch::kDouble) : b, grad.to(torch::kDouble));
    for (size_t k = 0; k < own.size(); ++k) {
      if (!own[k].defined()) continue;
      ASSERT_EQ(own[k].sizes(), exact[k].sizes()) << names[k];
      EXPECT_EQ(own[k].scalar_type(), torch::kFloat) << names[k];
      EXPECT_TRUE(own[k].is_contiguous()) << names[k];
      const double scale = exact[k].abs().max().item<double>();
      const double error = (own[k].to(torch::kDouble) - exact[k]).abs().max().item<double>() / scale;
      const double conv2d_error = (single[k].to(torch::kDouble) - exact[k]).abs().max().item<double>() / scale;
      EXPECT_LE(error, 5e-6) << names[k] << " (conv2d in float: " << conv2d_error << ")";
      std::cout << "[ winograd ] " << c.input << " -> " << c.out_channels << " " << names[k] << ": relative error "
                << error << ", conv2d in float " << conv2d_error << "\n";
    }
    // An image's output and input gradient do not depend on the batch it is in.
    if (c.input[0] > 1) {
      const auto alone = conv_and_gradients(true, x.slice(0, 0, 1).contiguous(), w, b, grad.slice(0, 0, 1).contiguous());
      EXPECT_TRUE(torch::equal(bits(alone[0]), bits(own[0].slice(0, 0, 1)))) << "output of image 0 alone";
      EXPECT_TRUE(torch::equal(bits(alone[1]), bits(own[1].slice(0, 0, 1)))) << "input gradient of image 0 alone";
    }
    // The same bits on every call with the same shape and thread count.
    const auto again = conv_and_gradients(true, x, w, b, grad);
    for (size_t k = 0; k < own.size(); ++k)
      if (own[k].defined()) EXPECT_TRUE(torch::equal(bits(own[k]), bits(again[k]))) << names[k];
    const int threads = at::get_num_threads();
    at::set_num_threads(1);
    const auto one = conv_and_gradients(true, x, w, b, grad);
    at::set_num_threads(2);
    const auto two = conv_and_gradients(true, x, w, b, grad);
    at::set_num_threads(threads);
    for (size_t k = 0; k < own.size(); ++k)
      if (own[k].defined())
        std::cout << "[ winograd ] " << names[k] << " 1 thread vs 2: "
                  << (torch::equal(bits(two[k]), bits(one[k])) ? "same bits" : "differ") << "\n";
  }
}

TEST(Models, WinogradConvolutionKeepsEachGraphsInputWhileOthersRun) {
  if (!winograd_available()) GTEST_SKIP() << "SKIP: no oneDNN Winograd kernel here (a CPU without AVX-512, or a build without oneDNN)";
  // Each forward pass keeps its own blocked input for the weight gradient: graphs alive at once (and a larger
  // shape in between, with the per-thread temporaries grown for it) each give the gradient of their own input.
  torch::manual_seed(6);
  const auto w = torch::randn({64, 32, 3, 3}) / 17.0;
  auto weight_grad = [&](const torch::Tensor& x, const torch::Tensor& g) {
    auto wg = w.clone().requires_grad_(true);
    return torch::autograd::grad({lm::winograd_conv3x3(x, wg, {})}, {wg}, {g})[0];
  };
  std::vector<torch::Tensor> xs, gs, alone;
  for (int k = 0; k < 3; ++k) {
    xs.push_back(torch::randn({4, 32, 6, 6}));
    gs.push_back(torch::randn({4, 64, 6, 6}));
    alone.push_back(weight_grad(xs[k], gs[k]));
  }
  std::vector<torch::Tensor> weights, outputs;
  for (int k = 0; k < 3; ++k) {
    weights.push_back(w.clone().requires_grad_(true));
    outputs.push_back(lm::winograd_conv3x3(xs[k], weights[k], {}));
  }
  const auto bigger = weight_grad(torch::randn({8, 32, 9, 9}), torch::randn({8, 64, 9, 9}));
  EXPECT_EQ(bigger.sizes(), w.sizes());
  for (int k = 2; k >= 0; --k) {
    const auto g = torch::autograd::grad({outputs[k]}, {weights[k]}, {gs[k]})[0];
    EXPECT_TRUE(torch::equal(bits(g), bits(alone[k]))) << "graph " << k;
  }
  for (int k = 0; k < 3; ++k) EXPECT_TRUE(torch::equal(bits(weight_grad(xs[k], gs[k])), bits(alone[k]))) << "again " << k;
}

TEST(Models, WinogradConvolutionSecondDerivativeIsLibTorchs) {
  if (!winograd_available()) GTEST_SKIP() << "SKIP: no oneDNN Winograd kernel here (a CPU without AVX-512, or a build without oneDNN)";
  // create_graph (sharpness estimates): the gradient is conv2d's, so the Hessian-vector product is too.
  torch::manual_seed(3);
  const auto x = torch::randn({2, 32, 6, 6});
  auto w = (torch::randn({64, 32, 3, 3}) / 17.0).requires_grad_(true);
  auto b = torch::randn({64}).requires_grad_(true);
  const auto s = torch::randn({2, 64, 6, 6});
  const auto v = torch::randn(w.sizes());
  auto hv = [&](bool winograd) {
    const auto y = winograd ? lm::winograd_conv3x3(x, w, b) : torch::conv2d(x, w, b, 1, 1);
    const auto g = torch::autograd::grad({(s * y.pow(2)).sum()}, {w}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
    return std::make_pair(g.detach(), torch::autograd::grad({(g * v).sum()}, {w})[0]);
  };
  const auto [own_g, own_hv] = hv(true);
  const auto [lib_g, lib_hv] = hv(false);
  // y itself comes from the Winograd forward pass: float rounding apart from conv2d's.
  EXPECT_LE((own_g - lib_g).abs().max().item<double>(), 1e-4 * lib_g.abs().max().item<double>());
  EXPECT_LE((own_hv - lib_hv).abs().max().item<double>(), 1e-4 * lib_hv.abs().max().item<double>());
}

TEST(Models, WinogradConvolutionLeavesWhatItDoesNotTakeToConv2d) {
  const auto x = torch::randn({2, 32, 8, 8});
  const auto w = torch::randn({64, 32, 3, 3}), b = torch::randn({64});
  const bool available = winograd_available();
  EXPECT_EQ(lm::winograd_conv3x3_takes(x, w, b), available);
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x.to(torch::kDouble), w.to(torch::kDouble), b.to(torch::kDouble)));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x.contiguous(torch::MemoryFormat::ChannelsLast), w, b));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x.transpose(2, 3), w, b));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x, torch::randn({64, 32, 5, 5}), b));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x, torch::randn({64, 16, 3, 3}), b));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(torch::randn({2, 16, 8, 8}), torch::randn({64, 16, 3, 3}), b));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x, torch::randn({32, 32, 3, 3}), torch::randn({32})));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(x, w, torch::randn({63})));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(torch::randn({0, 32, 8, 8}), w, b));
  EXPECT_FALSE(lm::winograd_conv3x3_takes(torch::randn({32, 8, 8}), w, b));
  {
    at::autocast::set_cpu_enabled(true);  // autocast decides the convolution's precision: LibTorch's path
    EXPECT_FALSE(lm::winograd_conv3x3_takes(x, w, b));
    at::autocast::set_cpu_enabled(false);
  }
  EXPECT_THROW(lm::winograd_conv3x3(x.to(torch::kDouble), w.to(torch::kDouble), b.to(torch::kDouble)), c10::Error);
  // The module: 3x3 stride 1 padding 1 alone; off with its switch and with the CPU kernels.
  lm::Conv conv(torch::nn::Conv2dOptions(32, 64, 3).padding(1));
  EXPECT_EQ(conv->winograd(x), available);
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 3).padding(1).stride(2))->winograd(x));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 3))->winograd(x));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 3).padding(2).dilation(2))->winograd(x));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 3).padding(1).groups(2))->winograd(x));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 3).padding(1).padding_mode(torch::kReflect))->winograd(x));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 3).padding(torch::kSame))->winograd(x));
  EXPECT_FALSE(lm::Conv(torch::nn::Conv2dOptions(32, 64, 1))->winograd(x));
  conv->winograd_kernels = false;
  EXPECT_FALSE(conv->winograd(x));
  conv->winograd_kernels = true;
  conv->small_map_kernels = false;
  EXPECT_FALSE(conv->winograd(x));
  // A wrong channel count is refused by conv2d as before, not computed.
  conv->small_map_kernels = true;
  EXPECT_THROW(conv->forward(torch::randn({2, 31, 8, 8})), c10::Error);
  EXPECT_EQ(conv->forward(x).sizes(), (std::vector<int64_t>{2, 64, 8, 8}));
}

TEST(Models, CpuKernelsTrainTheCompactCnnToTheSameBits) {
  // The compact CNN's maps never get small (28 -> 14 -> 7): with the BatchNorm kernel and the Winograd
  // convolution off, only max pooling differs, and it gives the same bits. With them on: the same loss and
  // gradients to float rounding.
  auto model = lm::make_model(lm::ModelOptions{});
  model->train();
  torch::manual_seed(4);
  const auto x = torch::randn({16, 1, 28, 28});
  const auto y = torch::randint(0, 10, {16}, torch::kLong);
  // An input that needs a gradient keeps the first convolution apart from its pooling (conv_pool.h).
  const auto xg = x.detach().requires_grad_(true);
  const auto pooling_only = loss_and_gradients(*model, xg, y, true, false), library = loss_and_gradients(*model, xg, y, false);
  for (size_t k = 0; k < library.size(); ++k)
    EXPECT_TRUE(torch::equal(bits(pooling_only[k]), bits(library[k]))) << "tensor " << k;
  const auto own = loss_and_gradients(*model, x, y, true);  // fused first convolution, BatchNorm's kernel, Winograd
  EXPECT_NEAR(own[0].item<double>(), library[0].item<double>(), 1e-5 * library[0].item<double>());
  for (size_t k = 1; k < own.size(); ++k) {
    const double scale = library[k].abs().max().item<double>() + 1e-12;
    EXPECT_LE((own[k] - library[k]).abs().max().item<double>(), 2e-4 * scale) << "parameter " << k - 1;
  }
}

// Calls of one named operation (RECORD_FUNCTION) on this thread while it lives.
class OperationCounter {
 public:
  explicit OperationCounter(const char* name) {
    name_ = name;
    count_ = 0;
    handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(
        [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
          if (std::string(fn.name()) == name_) ++count_;
          return nullptr;
        }));
  }
  ~OperationCounter() { at::removeCallback(handle_); }
  int count() const { return count_; }

 private:
  static inline const char* name_ = nullptr;
  static inline int count_ = 0;
  at::CallbackHandle handle_;
};

TEST(Models, CompactCnnUnderBf16AutocastFusesItsFirstLayerInFloat) {
  // Under bf16 autocast the fused first layer still computes in float and its output is rounded to bfloat16 for
  // the layers after it; LibTorch's path runs that convolution in bfloat16. Both against the float32 step.
  auto model = lm::make_model(lm::ModelOptions{});
  model->train();
  torch::manual_seed(5);
  const auto x = torch::randn({16, 1, 28, 28});
  const auto y = torch::randint(0, 10, {16}, torch::kLong);
  const bool was = at::autocast::is_cpu_enabled();
  const auto was_dtype = at::autocast::get_autocast_cpu_dtype();
  at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
  at::autocast::set_cpu_enabled(true);
  std::vector<torch::Tensor> own, library;
  int fused_calls = 0, library_fused_calls = 0;
  {
    OperationCounter counter("largebatch::conv3x3_max_pool2");
    own = loss_and_gradients(*model, x, y, true);
    fused_calls = counter.count();
  }
  {
    OperationCounter counter("largebatch::conv3x3_max_pool2");
    library = loss_and_gradients(*model, x, y, false);
    library_fused_calls = counter.count();
  }
  at::autocast::clear_cache();
  at::autocast::set_cpu_enabled(was);
  at::autocast::set_autocast_cpu_dtype(was_dtype);
  EXPECT_EQ(fused_calls, 1);
  EXPECT_EQ(library_fused_calls, 0);
  const auto reference = loss_and_gradients(*model, x, y, false);  // float32, no autocast
  for (size_t k = 0; k < own.size(); ++k) {
    EXPECT_EQ(own[k].scalar_type(), torch::kFloat) << "tensor " << k;
    auto distance = [&](const torch::Tensor& t) {
      return ((t - reference[k]).norm() / (reference[k].norm() + 1e-30)).item<double>();
    };
    const double fused = distance(own[k]), bf16 = distance(library[k]);
    std::printf("tensor %zu: relative distance from float32, fused %.3g, LibTorch's bf16 %.3g\n", k, fused, bf16);
    // One bfloat16 rounding fewer (the first layer's inputs): as close to float32 as LibTorch's bf16 path at least,
    // with a margin for other machines' kernels; a broken first layer would be off by its whole gradient.
    EXPECT_LE(fused, 1.25 * bf16) << "tensor " << k;
  }
  EXPECT_LE(std::abs(own[0].item<double>() - reference[0].item<double>()), 1e-3 * reference[0].item<double>());
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

}  // namespace
