// Barlow Twins loss and views. See include/largebatch/train/barlow_twins.h.
#include <largebatch/train/barlow_twins.h>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <stdexcept>

namespace largebatch {
namespace train {

namespace {

namespace F = torch::nn::functional;

torch::Tensor sum_over_ranks(const torch::Tensor& t, dist::Communicator* comm) {
  return comm ? dist::all_reduce_sum_differentiable(t, *comm) : t;
}

// Batch normalisation without affine parameters over the global batch of count rows.
torch::Tensor normalise_over_ranks(const torch::Tensor& z, double count, dist::Communicator* comm) {
  const auto mean = sum_over_ranks(z.sum(0), comm) / count;
  const auto centred = z - mean;
  const auto var = sum_over_ranks(centred.pow(2).sum(0), comm) / count;
  return centred * torch::rsqrt(var + 1e-5);
}

// ITU-R 601 luma, the grayscale of torchvision.
torch::Tensor luma(const torch::Tensor& rgb) {
  return (0.299 * rgb.select(1, 0) + 0.587 * rgb.select(1, 1) + 0.114 * rgb.select(1, 2)).unsqueeze(1);
}

torch::Tensor rows(const torch::Tensor& t, int64_t offset, int64_t n) { return t.narrow(0, offset, n); }

torch::Tensor as_image_mask(const torch::Tensor& m) { return m.view({-1, 1, 1, 1}); }

}  // namespace

torch::Tensor barlow_twins_loss(const torch::Tensor& z1, const torch::Tensor& z2, double lambda,
                                dist::Communicator* comm, BarlowTwinsTerms* terms) {
  if (z1.dim() != 2 || z1.sizes() != z2.sizes())
    throw std::invalid_argument("barlow_twins_loss: embeddings must be two [n, D] tensors of the same shape");
  double count = static_cast<double>(z1.size(0));
  if (comm) {
    auto n = torch::full({1}, count, torch::kFloat64);
    dist::guarded(*comm, [&] { comm->all_reduce_sum(n); });
    count = n.item<double>();
  }
  if (count < 2) throw std::invalid_argument("barlow_twins_loss: needs a global batch of at least 2 images");
  const auto a = normalise_over_ranks(z1, count, comm);
  const auto b = normalise_over_ranks(z2, count, comm);
  const auto c = sum_over_ranks(a.t().mm(b), comm) / count;
  const auto diagonal = c.diagonal();
  const auto on_diagonal = (1 - diagonal).pow(2).sum();
  const auto off_diagonal = c.pow(2).sum() - diagonal.pow(2).sum();
  if (terms) {
    terms->on_diagonal = on_diagonal.detach();
    terms->off_diagonal = off_diagonal.detach();
  }
  return on_diagonal + lambda * off_diagonal;
}

torch::Tensor barlow_twins_view(const torch::Tensor& images, int view, uint64_t seed, int64_t global_batch,
                                int64_t offset, const ViewOptions& o) {
  if (view != 0 && view != 1) throw std::invalid_argument("barlow_twins_view: view must be 0 or 1");
  if (images.dim() != 4) throw std::invalid_argument("barlow_twins_view: images must be [n, C, H, W]");
  const int64_t n = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  if (offset < 0 || offset + n > global_batch)
    throw std::invalid_argument("barlow_twins_view: rows [offset, offset + n) outside the global batch");
  if (n == 0) return images;
  // Every draw is made for the whole global batch in a fixed order, then this shard's rows are taken.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 2 + static_cast<uint64_t>(view) + 1);
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto uniform = [&](double lo, double hi) {
    return rows(torch::rand({global_batch}, gen, f64) * (hi - lo) + lo, offset, n);
  };
  auto chance = [&](double p) { return rows(torch::rand({global_batch}, gen, f64) < p, offset, n); };

  // Random resized crop + flip as one affine sampling grid (normalised coordinates, bilinear).
  const auto area = uniform(o.min_scale, 1.0);
  const auto log_ratio = uniform(std::log(3.0 / 4.0), std::log(4.0 / 3.0));
  const auto crop_w = torch::sqrt(area * torch::exp(log_ratio)).clamp_max(1.0);
  const auto crop_h = torch::sqrt(area / torch::exp(log_ratio)).clamp_max(1.0);
  const auto centre_x = (uniform(-1, 1) * (1 - crop_w));
  const auto centre_y = (uniform(-1, 1) * (1 - crop_h));
  const auto flip = torch::where(chance(0.5), -1.0, 1.0);
  auto theta = torch::zeros({n, 2, 3}, f64);
  theta.select(1, 0).select(1, 0).copy_(crop_w * flip);
  theta.select(1, 0).select(1, 2).copy_(centre_x);
  theta.select(1, 1).select(1, 1).copy_(crop_h);
  theta.select(1, 1).select(1, 2).copy_(centre_y);
  const auto x0 = images.to(torch::kFloat32);
  const auto grid = F::affine_grid(theta.to(torch::kFloat32), {n, channels, height, width}, false);
  auto x = F::grid_sample(x0, grid, F::GridSampleFuncOptions().mode(torch::kBilinear).padding_mode(torch::kBorder)
                                        .align_corners(false));

  // Colour jitter (brightness, contrast, then saturation and hue for colour images).
  const auto jitter = as_image_mask(chance(o.jitter_p)).to(torch::kFloat32);
  const auto brightness = as_image_mask(uniform(1 - o.brightness, 1 + o.brightness)).to(torch::kFloat32);
  const auto contrast = as_image_mask(uniform(1 - o.contrast, 1 + o.contrast)).to(torch::kFloat32);
  const auto saturation = as_image_mask(uniform(1 - o.saturation, 1 + o.saturation)).to(torch::kFloat32);
  const auto hue = uniform(-o.hue, o.hue).to(torch::kFloat32);
  auto jittered = (x * brightness).clamp(0, 1);
  const auto gray_mean = (channels == 3 ? luma(jittered) : jittered.mean(1, true)).mean({2, 3}, true);
  jittered = ((jittered - gray_mean) * contrast + gray_mean).clamp(0, 1);
  if (channels == 3) {
    const auto gray = luma(jittered);
    jittered = (gray + (jittered - gray) * saturation).clamp(0, 1);
    // Hue: a rotation of the chroma plane in YIQ space by 2 pi hue.
    const auto angle = hue * static_cast<float>(2 * M_PI);
    const auto cos_a = torch::cos(angle).view({-1, 1, 1}), sin_a = torch::sin(angle).view({-1, 1, 1});
    const auto r = jittered.select(1, 0), g = jittered.select(1, 1), bl = jittered.select(1, 2);
    const auto y = 0.299 * r + 0.587 * g + 0.114 * bl;
    const auto i = 0.596 * r - 0.274 * g - 0.322 * bl;
    const auto q = 0.211 * r - 0.523 * g + 0.312 * bl;
    const auto i2 = i * cos_a - q * sin_a, q2 = i * sin_a + q * cos_a;
    jittered = torch::stack({y + 0.956 * i2 + 0.621 * q2, y - 0.272 * i2 - 0.647 * q2, y - 1.106 * i2 + 1.703 * q2}, 1)
                   .clamp(0, 1);
  }
  x = jitter * jittered + (1 - jitter) * x;

  // Grayscale (colour images only; the draw is made anyway so the sequence is the same for every data set).
  const auto to_gray = as_image_mask(chance(o.grayscale_p)).to(torch::kFloat32);
  if (channels == 3) x = to_gray * luma(x).expand_as(x) + (1 - to_gray) * x;

  // Gaussian blur, separable, reflect padding; kernel about a tenth of the image (23 at 224 as in the paper).
  const auto blur = as_image_mask(chance(o.blur_p[view])).to(torch::kFloat32);
  const auto sigma = uniform(0.1, 2.0).to(torch::kFloat32);
  int64_t k = std::max<int64_t>(3, static_cast<int64_t>(std::lround(0.1 * static_cast<double>(std::min(height, width)))));
  if (k % 2 == 0) ++k;
  const int64_t half = k / 2;
  if (half < height && half < width) {
    const auto t = torch::arange(-half, half + 1, torch::kFloat32).view({1, k});
    auto kernel = torch::exp(-t.pow(2) / (2 * sigma.view({-1, 1}).pow(2)));
    kernel = kernel / kernel.sum(1, true);                                 // [n, k]
    kernel = kernel.repeat_interleave(channels, 0);                        // [n*C, k]
    auto planes = x.reshape({1, n * channels, height, width});
    planes = F::pad(planes, F::PadFuncOptions({half, half, half, half}).mode(torch::kReflect));
    planes = F::conv2d(planes, kernel.view({n * channels, 1, 1, k}), F::Conv2dFuncOptions().groups(n * channels));
    planes = F::conv2d(planes, kernel.view({n * channels, 1, k, 1}), F::Conv2dFuncOptions().groups(n * channels));
    x = blur * planes.view({n, channels, height, width}) + (1 - blur) * x;
  }

  // Solarisation.
  const auto solarize = as_image_mask(chance(o.solarize_p[view]));
  x = torch::where(solarize & (x >= 0.5), 1 - x, x);
  return x.clamp(0, 1);
}

// ------------------------------------------------------------------ the pre-training network

ProjectorImpl::ProjectorImpl(int64_t in, const std::vector<int64_t>& sizes) {
  for (size_t i = 0; i < sizes.size(); ++i) {
    linears_.push_back(register_module("linear" + std::to_string(i),
                                       torch::nn::Linear(torch::nn::LinearOptions(in, sizes[i]).bias(false))));
    if (i + 1 < sizes.size())
      norms_.push_back(register_module("bn" + std::to_string(i), models::SyncableBatchNorm2d(sizes[i])));
    in = sizes[i];
  }
}

torch::Tensor ProjectorImpl::forward(torch::Tensor x) {
  for (size_t i = 0; i < linears_.size(); ++i) {
    x = linears_[i](x);
    if (i < norms_.size()) x = torch::relu(norms_[i](x.view({x.size(0), x.size(1), 1, 1})).view({x.size(0), -1}));
  }
  return x;
}

BarlowTwinsNetImpl::BarlowTwinsNetImpl(models::Classifier backbone_, const std::vector<int64_t>& sizes)
    : backbone(register_module("backbone", std::move(backbone_))),
      projector(register_module("projector", Projector(backbone->feature_dim(), sizes))) {}

torch::Tensor BarlowTwinsNetImpl::forward(const torch::Tensor& x) { return projector(backbone->features(x)); }

optim::NamedParameters BarlowTwinsNetImpl::trainable() {
  optim::NamedParameters out;
  for (auto& kv : models::backbone_parameters(*backbone)) out.insert("backbone." + kv.first, kv.second);
  for (const auto& kv : projector->named_parameters()) out.insert("projector." + kv.key(), kv.value());
  return out;
}

}  // namespace train
}  // namespace largebatch
