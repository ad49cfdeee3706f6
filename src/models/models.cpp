#include <largebatch/models/models.h>
#include <largebatch/models/conv_pool.h>
#include <cstdlib>
#include <largebatch/models/pooling.h>
#include <largebatch/models/winograd_conv.h>

#include "batch_norm_kernel.h"
#include "env_switch.h"

#include <ATen/autocast_mode.h>
#include <ATen/record_function.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace largebatch {
namespace models {

namespace nn = torch::nn;

namespace {

Conv conv(int64_t in, int64_t out, int64_t k, int64_t stride = 1, int64_t groups = 1, bool bias = false) {
  return Conv(nn::Conv2dOptions(in, out, k).stride(stride).padding(k / 2).groups(groups).bias(bias));
}

// torchvision's ResNet initialisation: kaiming_normal (fan_out, relu) for convs, BN = (1, 0).
void torchvision_resnet_init(nn::Module& m) {
  for (auto& module : m.modules(/*include_self=*/false)) {
    if (auto* c = module->as<nn::Conv2d>()) {
      nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
    } else if (auto* bn = module->as<SyncableBatchNorm2dImpl>()) {
      nn::init::ones_(bn->weight);
      nn::init::zeros_(bn->bias);
    }
  }
}

// ------------------------------------------------------------------ ResNet

struct BlockImpl : nn::Module {
  BlockImpl(int64_t in, int64_t planes, int64_t stride, bool bottleneck) : bottleneck(bottleneck) {
    const int64_t out = bottleneck ? planes * 4 : planes;
    if (bottleneck) {
      conv1 = register_module("conv1", conv(in, planes, 1));
      bn1 = register_module("bn1", SyncableBatchNorm2d(planes));
      conv2 = register_module("conv2", conv(planes, planes, 3, stride));
      bn2 = register_module("bn2", SyncableBatchNorm2d(planes));
      conv3 = register_module("conv3", conv(planes, out, 1));
      bn3 = register_module("bn3", SyncableBatchNorm2d(out));
    } else {
      conv1 = register_module("conv1", conv(in, planes, 3, stride));
      bn1 = register_module("bn1", SyncableBatchNorm2d(planes));
      conv2 = register_module("conv2", conv(planes, planes, 3));
      bn2 = register_module("bn2", SyncableBatchNorm2d(planes));
    }
    if (stride != 1 || in != out) {
      downsample = register_module("downsample", nn::Sequential(conv(in, out, 1, stride), SyncableBatchNorm2d(out)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    torch::Tensor y = torch::relu(bn1(conv1(x)));
    y = bn2(conv2(y));
    if (bottleneck) y = bn3(conv3(torch::relu(y)));
    return torch::relu(y + (downsample ? downsample->forward(x) : x));
  }
  bool bottleneck;
  Conv conv1{nullptr}, conv2{nullptr}, conv3{nullptr};
  SyncableBatchNorm2d bn1{nullptr}, bn2{nullptr}, bn3{nullptr};
  nn::Sequential downsample{nullptr};
};
TORCH_MODULE(Block);

class ResNet : public ClassifierImpl {
 public:
  // stages: blocks per stage; widths: planes per stage; imagenet_stem: 7x7/2 conv + 3x3/2 max-pool.
  ResNet(const std::vector<int64_t>& stages, const std::vector<int64_t>& widths, bool bottleneck,
         bool imagenet_stem, int64_t in_channels, int64_t num_classes)
      : imagenet_stem_(imagenet_stem) {
    const int64_t stem = widths[0];
    conv1 = register_module("conv1", imagenet_stem ? Conv(nn::Conv2dOptions(in_channels, stem, 7).stride(2).padding(3).bias(false))
                                                   : conv(in_channels, stem, 3));
    bn1 = register_module("bn1", SyncableBatchNorm2d(stem));
    int64_t in = stem;
    for (size_t s = 0; s < stages.size(); ++s) {
      nn::Sequential layer;
      for (int64_t b = 0; b < stages[s]; ++b) {
        const int64_t stride = (b == 0 && s > 0) ? 2 : 1;
        layer->push_back(Block(in, widths[s], stride, bottleneck));
        in = bottleneck ? widths[s] * 4 : widths[s];
      }
      layers_.push_back(register_module("layer" + std::to_string(s + 1), layer));
    }
    feature_dim_ = in;
    fc = register_module("fc", nn::Linear(in, num_classes));
    torchvision_resnet_init(*this);
  }
  torch::Tensor features(const torch::Tensor& x) override {
    torch::Tensor y = torch::relu(bn1(conv1(input_layout(x))));
    if (imagenet_stem_) y = models::max_pool2d(y, 3, 2, 1, cpu_kernels());
    for (auto& layer : layers_) y = layer->forward(y);
    return torch::adaptive_avg_pool2d(y, {1, 1}).flatten(1);
  }
  torch::Tensor forward(const torch::Tensor& x) override { return fc(features(x)); }
  int64_t feature_dim() const override { return feature_dim_; }

 private:
  bool imagenet_stem_;
  int64_t feature_dim_ = 0;
  Conv conv1{nullptr};
  SyncableBatchNorm2d bn1{nullptr};
  std::vector<nn::Sequential> layers_;
  nn::Linear fc{nullptr};
};

// ------------------------------------------------------------------ compact CNN

// Two conv-max-pool-BN-ReLU stages (32, 64 channels) and a 128-unit hidden layer: sized for 2 CPU cores
// (about 9 MFLOP per 28x28 image forward). Pooling before BatchNorm and ReLU makes those memory-bound
// passes work on a quarter of the pixels, which doubles training speed on CPU.
class CompactCNN : public ClassifierImpl {
 public:
  CompactCNN(int64_t in_channels, int64_t image_size, int64_t num_classes) {
    conv1 = register_module("conv1", conv(in_channels, 32, 3));
    bn1 = register_module("bn1", SyncableBatchNorm2d(32));
    conv2 = register_module("conv2", conv(32, 64, 3));
    bn2 = register_module("bn2", SyncableBatchNorm2d(64));
    const int64_t side = image_size / 4;
    fc1 = register_module("fc1", nn::Linear(64 * side * side, 128));
    fc = register_module("fc", nn::Linear(128, num_classes));
    torchvision_resnet_init(*this);
  }
  torch::Tensor features(const torch::Tensor& x) override {
    auto y = torch::relu(bn1(first_convolution_pooled(x)));
    y = torch::relu(bn2(models::max_pool2d(conv2(y), 2, 2, 0, cpu_kernels())));
    return torch::relu(fc1(y.flatten(1)));
  }
  torch::Tensor forward(const torch::Tensor& x) override { return fc(features(x)); }
  int64_t feature_dim() const override { return 128; }

 private:
  // max_pool2d(conv1(x), 2), fused (conv_pool.h) where the CPU kernels are on and the images need no gradient.
  // Under autocast it computes in float and its output is rounded to autocast's type, for the layers after it.
  // LARGEBATCH_FUSED_FIRST_LAYER=0 switches this kernel alone off (env_switch.h).
  static bool fused_first_layer_wanted() {
    static const bool wanted = env_switch_on("LARGEBATCH_FUSED_FIRST_LAYER");
    return wanted;
  }
  torch::Tensor first_convolution_pooled(const torch::Tensor& x) {
    const torch::Tensor bias = conv1->options.bias() ? conv1->bias : torch::Tensor();
    if (fused_first_layer_wanted() && cpu_kernels() && !channels_last() && conv3x3_max_pool2_takes(x, conv1->weight, bias)) {
      if (!at::autocast::is_cpu_enabled()) return conv3x3_max_pool2(x, conv1->weight, bias);
      const auto type = at::autocast::get_autocast_cpu_dtype();
      if (type == torch::kBFloat16) return conv3x3_max_pool2(x, conv1->weight, bias, type);  // rounded as it writes
      return conv3x3_max_pool2(x, conv1->weight, bias).to(type);
    }
    return models::max_pool2d(conv1(input_layout(x)), 2, 2, 0, cpu_kernels());
  }
  Conv conv1{nullptr}, conv2{nullptr};
  SyncableBatchNorm2d bn1{nullptr}, bn2{nullptr};
  nn::Linear fc1{nullptr}, fc{nullptr};
};

// A two-layer perceptron without BatchNorm: the model for which gradient accumulation over
// micro-batches equals one big batch exactly (up to summation order).
class MLP : public ClassifierImpl {
 public:
  MLP(int64_t in_features, int64_t num_classes) {
    fc1 = register_module("fc1", nn::Linear(in_features, 256));
    fc = register_module("fc", nn::Linear(256, num_classes));
  }
  torch::Tensor features(const torch::Tensor& x) override { return torch::relu(fc1(x.flatten(1))); }
  torch::Tensor forward(const torch::Tensor& x) override { return fc(features(x)); }
  int64_t feature_dim() const override { return 256; }

 private:
  nn::Linear fc1{nullptr}, fc{nullptr};
};

// ------------------------------------------------------------------ EfficientNet-B0

// A Sequential with a plain Tensor forward, so Sequentials can nest (torchvision's layout nests them).
struct StackImpl : nn::SequentialImpl {
  using nn::SequentialImpl::SequentialImpl;
  torch::Tensor forward(torch::Tensor x) { return nn::SequentialImpl::forward(x); }
};
TORCH_MODULE(Stack);

struct SqueezeExcitationImpl : nn::Module {
  SqueezeExcitationImpl(int64_t channels, int64_t squeeze) {
    fc1 = register_module("fc1", nn::Conv2d(nn::Conv2dOptions(channels, squeeze, 1)));
    fc2 = register_module("fc2", nn::Conv2d(nn::Conv2dOptions(squeeze, channels, 1)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto s = torch::adaptive_avg_pool2d(x, {1, 1});
    s = torch::sigmoid(fc2(torch::silu(fc1(s))));
    return x * s;
  }
  nn::Conv2d fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(SqueezeExcitation);

struct MBConvImpl : nn::Module {
  MBConvImpl(int64_t in, int64_t out, int64_t expand, int64_t kernel, int64_t stride)
      : residual(stride == 1 && in == out) {
    const int64_t hidden = in * expand;
    block = register_module("block", nn::Sequential());
    if (expand != 1) block->push_back(Stack(conv(in, hidden, 1), SyncableBatchNorm2d(hidden), nn::SiLU()));
    block->push_back(Stack(conv(hidden, hidden, kernel, stride, hidden), SyncableBatchNorm2d(hidden), nn::SiLU()));
    block->push_back(SqueezeExcitation(hidden, std::max<int64_t>(1, in / 4)));
    block->push_back(Stack(conv(hidden, out, 1), SyncableBatchNorm2d(out)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = block->forward(x);
    return residual ? y + x : y;
  }
  bool residual;
  nn::Sequential block{nullptr};
};
TORCH_MODULE(MBConv);

class EfficientNetB0 : public ClassifierImpl {
 public:
  EfficientNetB0(int64_t in_channels, int64_t num_classes) {
    struct Stage { int64_t expand, channels, repeats, stride, kernel; };
    const std::vector<Stage> stages = {{1, 16, 1, 1, 3}, {6, 24, 2, 2, 3}, {6, 40, 2, 2, 5}, {6, 80, 3, 2, 3},
                                       {6, 112, 3, 1, 5}, {6, 192, 4, 2, 5}, {6, 320, 1, 1, 3}};
    features_ = register_module("features", nn::Sequential());
    features_->push_back(Stack(conv(in_channels, 32, 3, 2), SyncableBatchNorm2d(32), nn::SiLU()));
    int64_t in = 32;
    for (const auto& s : stages) {
      Stack stage;
      for (int64_t r = 0; r < s.repeats; ++r) {
        stage->push_back(MBConv(in, s.channels, s.expand, s.kernel, r == 0 ? s.stride : 1));
        in = s.channels;
      }
      features_->push_back(stage);
    }
    features_->push_back(Stack(conv(in, 1280, 1), SyncableBatchNorm2d(1280), nn::SiLU()));
    classifier = register_module("classifier", nn::Sequential(nn::Dropout(0.2), nn::Linear(1280, num_classes)));
    // torchvision: kaiming_normal fan_out for convs, uniform(+-1/sqrt(out)) for the linear layer.
    for (auto& module : modules(false)) {
      if (auto* c = module->as<nn::Conv2d>()) {
        nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut);
        if (c->bias.defined()) nn::init::zeros_(c->bias);
      } else if (auto* l = module->as<nn::Linear>()) {
        const double range = 1.0 / std::sqrt(static_cast<double>(l->weight.size(0)));
        nn::init::uniform_(l->weight, -range, range);
        nn::init::zeros_(l->bias);
      }
    }
  }
  torch::Tensor features(const torch::Tensor& x) override {
    return torch::adaptive_avg_pool2d(features_->forward(input_layout(x)), {1, 1}).flatten(1);
  }
  torch::Tensor forward(const torch::Tensor& x) override { return classifier->forward(features(x)); }
  int64_t feature_dim() const override { return 1280; }
  std::string head_name() const override { return "classifier"; }

 private:
  nn::Sequential features_{nullptr};
  nn::Sequential classifier{nullptr};
};

[[noreturn]] void bad(const std::string& field, const std::string& value, const std::string& rule) {
  throw std::invalid_argument("invalid model option " + field + " = '" + value + "': " + rule);
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace

const std::vector<std::string>& model_names() {
  static const std::vector<std::string> names = {"cnn", "mlp", "resnet20", "resnet18", "resnet34", "resnet50",
                                                 "resnet18-cifar", "resnet34-cifar", "resnet50-cifar",
                                                 "efficientnet-b0"};
  return names;
}

const std::vector<std::string>& init_names() {
  static const std::vector<std::string> names = {"default", "xavier-uniform", "xavier-normal", "kaiming-uniform",
                                                 "kaiming-normal"};
  return names;
}

void apply_init(nn::Module& module, const std::string& method) {
  if (std::find(init_names().begin(), init_names().end(), method) == init_names().end())
    bad("init", method, "expected one of " + join(init_names()));
  if (method == "default") return;
  torch::NoGradGuard no_grad;
  auto init_weight = [&](torch::Tensor& w) {
    if (method == "xavier-uniform") nn::init::xavier_uniform_(w);
    else if (method == "xavier-normal") nn::init::xavier_normal_(w);
    else if (method == "kaiming-uniform") nn::init::kaiming_uniform_(w, 0.0, torch::kFanIn, torch::kReLU);
    else nn::init::kaiming_normal_(w, 0.0, torch::kFanIn, torch::kReLU);
  };
  for (auto& m : module.modules(/*include_self=*/true)) {
    if (auto* c = m->as<nn::Conv2d>()) {
      init_weight(c->weight);
      if (c->bias.defined()) nn::init::zeros_(c->bias);
    } else if (auto* l = m->as<nn::Linear>()) {
      init_weight(l->weight);
      if (l->bias.defined()) nn::init::zeros_(l->bias);
    }
  }
}

Classifier make_model(const ModelOptions& o) {
  if (o.num_classes < 2) bad("num_classes", std::to_string(o.num_classes), "must be >= 2");
  if (o.in_channels < 1) bad("in_channels", std::to_string(o.in_channels), "must be >= 1");
  if (o.image_size < 8) bad("image_size", std::to_string(o.image_size), "must be >= 8");
  torch::manual_seed(o.seed);
  Classifier model;
  const std::string& n = o.name;
  const std::vector<int64_t> widths = {64, 128, 256, 512};
  if (n == "cnn") model = std::make_shared<CompactCNN>(o.in_channels, o.image_size, o.num_classes);
  else if (n == "mlp") model = std::make_shared<MLP>(o.in_channels * o.image_size * o.image_size, o.num_classes);
  else if (n == "resnet20") model = std::make_shared<ResNet>(std::vector<int64_t>{3, 3, 3}, std::vector<int64_t>{16, 32, 64}, false, false, o.in_channels, o.num_classes);
  else if (n == "resnet18" || n == "resnet18-cifar") model = std::make_shared<ResNet>(std::vector<int64_t>{2, 2, 2, 2}, widths, false, n == "resnet18", o.in_channels, o.num_classes);
  else if (n == "resnet34" || n == "resnet34-cifar") model = std::make_shared<ResNet>(std::vector<int64_t>{3, 4, 6, 3}, widths, false, n == "resnet34", o.in_channels, o.num_classes);
  else if (n == "resnet50" || n == "resnet50-cifar") model = std::make_shared<ResNet>(std::vector<int64_t>{3, 4, 6, 3}, widths, true, n == "resnet50", o.in_channels, o.num_classes);
  else if (n == "efficientnet-b0") model = std::make_shared<EfficientNetB0>(o.in_channels, o.num_classes);
  else bad("model", n, "expected one of " + join(model_names()));
  apply_init(*model, o.init);
  model->set_channels_last(o.channels_last);
  model->set_cpu_kernels(o.cpu_kernels);
  return model;
}

// ------------------------------------------------------------------ convolutions on small maps

namespace {

// Which kernel tap joins output pixel o to input pixel i along one axis, or -1.
int64_t tap_between(int64_t o, int64_t i, int64_t stride, int64_t padding, int64_t kernel) {
  const int64_t tap = i - (o * stride - padding);
  return (tap >= 0 && tap < kernel) ? tap : -1;
}

}  // namespace

bool ConvImpl::unrolls(const torch::Tensor& x) const {
  const auto& o = options;
  // Anything unusual (wrong channel count, a kernel larger than the padded map, ...) goes to conv2d, which
  // checks and reports it.
  if (!small_map_kernels || x.dim() != 4 || !x.device().is_cpu() || !x.is_contiguous() || o.groups() != 1 ||
      x.size(1) != weight.size(1) || x.scalar_type() != weight.scalar_type())
    return false;
  if (!c10::get_if<torch::enumtype::kZeros>(&o.padding_mode()) || !c10::get_if<torch::ExpandingArray<2>>(&o.padding()))
    return false;
  const auto& padding = c10::get<torch::ExpandingArray<2>>(o.padding());
  for (int d = 0; d < 2; ++d)
    if ((*o.dilation())[d] != 1) return false;
  const int64_t h = x.size(2), w = x.size(3), kh = (*o.kernel_size())[0], kw = (*o.kernel_size())[1];
  if (h == 0 || w == 0 || h + 2 * (*padding)[0] < kh || w + 2 * (*padding)[1] < kw) return false;
  const int64_t oh = (h + 2 * (*padding)[0] - kh) / (*o.stride())[0] + 1, ow = (w + 2 * (*padding)[1] - kw) / (*o.stride())[1] + 1;
  // Worth it when at least half of the (output pixel, input pixel) pairs are joined by a tap and the unrolled
  // kernel is at most 4 times the kernel: maps of a few pixels (ResNets at 32x32: 2x2 and 1x1).
  int64_t joined = 0;
  for (int64_t oy = 0; oy < oh; ++oy)
    for (int64_t iy = 0; iy < h; ++iy)
      if (tap_between(oy, iy, (*o.stride())[0], (*padding)[0], kh) >= 0)
        for (int64_t ox = 0; ox < ow; ++ox)
          for (int64_t ix = 0; ix < w; ++ix) joined += tap_between(ox, ix, (*o.stride())[1], (*padding)[1], kw) >= 0;
  const int64_t pairs = oh * ow * h * w;
  return 2 * joined >= pairs && pairs <= 4 * kh * kw;
}

bool ConvImpl::winograd(const torch::Tensor& x) const {
  const auto& o = options;
  if (!small_map_kernels || !winograd_kernels || !c10::get_if<torch::enumtype::kZeros>(&o.padding_mode()) ||
      !c10::get_if<torch::ExpandingArray<2>>(&o.padding()))
    return false;
  const auto& padding = c10::get<torch::ExpandingArray<2>>(o.padding());
  return winograd_conv3x3_geometry(*o.kernel_size(), *o.stride(), *padding, *o.dilation(), o.groups()) &&
         winograd_conv3x3_takes(x, weight, o.bias() ? bias : torch::Tensor());
}

torch::Tensor ConvImpl::forward(const torch::Tensor& x) {
  if (!unrolls(x)) {
    if (winograd(x)) return winograd_conv3x3(x, weight, options.bias() ? bias : torch::Tensor());
    return nn::Conv2dImpl::forward(x);
  }
  RECORD_FUNCTION("largebatch::small_map_conv2d", std::vector<c10::IValue>{});  // named in profiles
  const auto& o = options;
  const auto& padding = c10::get<torch::ExpandingArray<2>>(o.padding());
  const int64_t n = x.size(0), in = weight.size(1), h = x.size(2), w = x.size(3);
  const int64_t kh = (*o.kernel_size())[0], kw = (*o.kernel_size())[1], out = weight.size(0);
  const int64_t oh = (h + 2 * (*padding)[0] - kh) / (*o.stride())[0] + 1, ow = (w + 2 * (*padding)[1] - kw) / (*o.stride())[1] + 1;
  // One gather builds the unrolled kernel [out * output pixels, in * input pixels] (rows and columns in the
  // order of NCHW's flattened maps) from the flattened weight; a pair no tap joins reads a zero appended at
  // its end. The index depends on the map size only: kept per size.
  std::lock_guard<std::mutex> lock(unrolled_index_mutex_);  // forward from several threads
  auto& unrolled_index = unrolled_index_[{h, w}];
  if (!unrolled_index.index.defined()) {
    const int64_t zero = out * in * kh * kw;
    std::vector<int64_t> flat;
    flat.reserve(static_cast<size_t>(out * oh * ow * in * h * w));
    for (int64_t co = 0; co < out; ++co)
      for (int64_t oy = 0; oy < oh; ++oy)
        for (int64_t ox = 0; ox < ow; ++ox)
          for (int64_t ci = 0; ci < in; ++ci)
            for (int64_t iy = 0; iy < h; ++iy)
              for (int64_t ix = 0; ix < w; ++ix) {
                const int64_t ty = tap_between(oy, iy, (*o.stride())[0], (*padding)[0], kh);
                const int64_t tx = tap_between(ox, ix, (*o.stride())[1], (*padding)[1], kw);
                const bool joined = ty >= 0 && tx >= 0;
                unrolled_index.unjoined = unrolled_index.unjoined || !joined;
                flat.push_back(joined ? ((co * in + ci) * kh + ty) * kw + tx : zero);
              }
    unrolled_index.index = torch::tensor(flat, torch::kLong);
  }
  torch::Tensor taps = weight.reshape({-1});
  if (unrolled_index.unjoined) taps = torch::cat({taps, torch::zeros({1}, taps.options())});
  const torch::Tensor unrolled = taps.index_select(0, unrolled_index.index).view({out * oh * ow, in * h * w});
  torch::Tensor y = torch::mm(x.reshape({n, in * h * w}), unrolled.t());
  if (bias.defined()) y = y + bias.repeat_interleave(oh * ow);
  return y.view({n, out, oh, ow});
}

void ClassifierImpl::set_cpu_kernels(bool on) {
  cpu_kernels_ = on;
  for (auto& module : modules(/*include_self=*/false)) {
    if (auto* c = module->as<ConvImpl>()) c->small_map_kernels = c->winograd_kernels = on;
    if (auto* bn = module->as<SyncableBatchNorm2dImpl>()) bn->small_map_kernels = on;
  }
}

int64_t ClassifierImpl::set_bn_group_size(int64_t images) {
  int64_t layers = 0;
  for (auto& module : modules(/*include_self=*/false))
    if (auto* bn = module->as<SyncableBatchNorm2dImpl>()) {
      bn->group_size = images;
      ++layers;
    }
  return layers;
}

// to() rather than contiguous(): with one channel both layouts have the same strides and contiguous() keeps
// NCHW's, which the convolution then reads as NCHW; to() restrides (as Python's .to(memory_format=) does).
torch::Tensor ClassifierImpl::input_layout(const torch::Tensor& x) const {
  if (!channels_last_ || x.dim() != 4 || !x.device().is_cpu()) return x;
  return x.to(x.options(), /*non_blocking=*/false, /*copy=*/false, torch::MemoryFormat::ChannelsLast);
}

std::vector<std::pair<std::string, torch::Tensor>> backbone_parameters(ClassifierImpl& model) {
  const std::string head = model.head_name() + ".";
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model.named_parameters())
    if (item.key().rfind(head, 0) != 0) out.emplace_back(item.key(), item.value());
  return out;
}

int64_t parameter_count(const nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

SyncableBatchNorm2dImpl::SyncableBatchNorm2dImpl(const torch::nn::BatchNormOptions& options) : options(options) {
  reset();
}

void SyncableBatchNorm2dImpl::reset() {
  const int64_t c = options.num_features();
  if (options.affine()) {
    weight = register_parameter("weight", torch::ones({c}));
    bias = register_parameter("bias", torch::zeros({c}));
  }
  if (options.track_running_stats()) {
    running_mean = register_buffer("running_mean", torch::zeros({c}));
    running_var = register_buffer("running_var", torch::ones({c}));
    num_batches_tracked = register_buffer("num_batches_tracked", torch::tensor(0, torch::kLong));
  }
}

void SyncableBatchNorm2dImpl::pretty_print(std::ostream& stream) const {
  stream << "largebatch::SyncableBatchNorm2d(" << options.num_features() << ", eps=" << options.eps()
         << ", momentum=" << (options.momentum() ? std::to_string(*options.momentum()) : std::string("None"))
         << ", affine=" << options.affine() << ", track_running_stats=" << options.track_running_stats()
         << ", synchronised=" << synchronised() << ")";
}

torch::Tensor SyncableBatchNorm2dImpl::ghost_forward(const torch::Tensor& input, double momentum, bool track) {
  std::vector<torch::Tensor> out;
  torch::Tensor means, variances;
  int64_t groups = 0;
  for (const auto& group : input.split(group_size, 0)) {
    out.push_back(small_map_kernels && batch_norm_kernel_takes(group, weight, bias)
                      ? batch_norm_training(group, weight, bias, {}, {}, 0.0, options.eps())
                      : torch::batch_norm(group, weight, bias, /*running_mean=*/{}, /*running_var=*/{},
                                          /*training=*/true, 0.0, options.eps(), at::globalContext().userEnabledCuDNN()));
    if (!track) continue;
    torch::NoGradGuard no_grad;
    const auto x = group.detach().to(torch::kFloat64);
    const auto mean = x.mean({0, 2, 3}), var = x.var({0, 2, 3}, /*unbiased=*/true);
    means = groups == 0 ? mean : means + mean;
    variances = groups == 0 ? var : variances + var;
    ++groups;
  }
  if (track) {
    torch::NoGradGuard no_grad;
    running_mean.mul_(1 - momentum).add_((means / groups).to(running_mean.scalar_type()), momentum);
    running_var.mul_(1 - momentum).add_((variances / groups).to(running_var.scalar_type()), momentum);
  }
  return torch::cat(out, 0);
}

torch::Tensor SyncableBatchNorm2dImpl::forward(const torch::Tensor& input) {
  TORCH_CHECK(input.dim() == 4, "SyncableBatchNorm2d: expected a 4-D input, got ", input.dim(), "-D");
  const bool track = options.track_running_stats() && is_training();
  double momentum = options.momentum() ? *options.momentum() : 0.0;
  if (track) {
    torch::NoGradGuard no_grad;
    num_batches_tracked += 1;
    if (!options.momentum()) momentum = 1.0 / static_cast<double>(num_batches_tracked.item<int64_t>());
  }
  if (is_training() && !cross_rank_sum_ && group_size > 0 && input.size(0) > group_size)
    return ghost_forward(input, momentum, track);
  const int64_t pixels = input.size(2) * input.size(3);
  if (is_training() && !cross_rank_sum_ && small_map_kernels && pixels >= 2 && pixels <= 4 && input.device().is_cpu() &&
      input.is_contiguous()) {
    RECORD_FUNCTION("largebatch::small_map_batch_norm", std::vector<c10::IValue>{});  // named in profiles
    const int64_t n = input.size(0), channels = input.size(1);
    const auto rows = input.view({n, channels, pixels}).transpose(1, 2).reshape({n * pixels, channels});
    const auto out = torch::batch_norm(rows, weight, bias, running_mean, running_var, /*training=*/true, momentum,
                                       options.eps(), /*cudnn_enabled=*/false);
    return out.view({n, pixels, channels}).transpose(1, 2).contiguous().view(input.sizes());  // NCHW again
  }
  if (is_training() && !cross_rank_sum_ && small_map_kernels && batch_norm_kernel_takes(input, weight, bias))
    return batch_norm_training(input, weight, bias, running_mean, running_var, momentum, options.eps());
  if (!is_training() || !cross_rank_sum_) {
    // torch::nn::BatchNorm2d's computation (batch statistics in training, running ones in eval).
    return torch::batch_norm(input, weight, bias, running_mean, running_var,
                             is_training() || !options.track_running_stats(), momentum, options.eps(),
                             at::globalContext().userEnabledCuDNN());
  }
  const int64_t channels = input.size(1);
  const auto shape = std::vector<int64_t>{1, channels, 1, 1};
  // Reductions in double on CPU (float on CUDA), as LibTorch's own batch norm kernels accumulate: in float the
  // sums over N*H*W elements drift from the single-rank result by ~1e-4 relative within one step.
  const auto acc = input.is_cuda() ? torch::kFloat32 : torch::kFloat64;
  const auto x = input.to(acc);
  const double local_count = channels ? static_cast<double>(input.numel() / channels) : 0.0;
  // Pass 1: global mean (the element count rides along in the same sum).
  auto sums = cross_rank_sum_(torch::cat({x.sum({0, 2, 3}), torch::full({1}, local_count, x.options())}));
  const auto count = sums.narrow(0, channels, 1).detach();
  const auto mean = sums.narrow(0, 0, channels) / count;
  const auto centred = x - mean.view(shape);
  // Pass 2: biased variance of the global batch.
  const auto var = cross_rank_sum_(centred.pow(2).sum({0, 2, 3})) / count;
  auto normalised = centred * torch::rsqrt(var + options.eps()).view(shape);
  if (options.affine()) normalised = normalised * weight.to(acc).view(shape) + bias.to(acc).view(shape);
  auto out = normalised.to(input.scalar_type());
  if (track) {
    torch::NoGradGuard no_grad;
    running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.scalar_type()), momentum);
    running_var.mul_(1 - momentum)
        .add_((var.detach() * (count / (count - 1).clamp_min(1))).to(running_var.scalar_type()), momentum);
  }
  return out;
}

int64_t synchronise_batchnorm(torch::nn::Module& module, const CrossRankSum& sum) {
  int64_t count = 0;
  for (auto& m : module.modules()) {
    if (auto* bn = m->as<SyncableBatchNorm2dImpl>()) {
      bn->set_cross_rank_sum(sum);
      ++count;
    }
  }
  return count;
}

}  // namespace models
}  // namespace largebatch
