// The batch loader: deterministic order and augmentation, assembled by worker threads.
//
// Determinism: the epoch order depends only on (seed, epoch); each sample's augmentation only on
// (seed, epoch, its position in the epoch order). Which thread assembles a batch, how many threads
// there are, and which rank of a data-parallel world asks for it change nothing.
#include <largebatch/data/pipeline.h>

#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace largebatch {
namespace data {

namespace {

constexpr double kPi = 3.14159265358979323846;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

uint64_t mix(uint64_t a, uint64_t b) { return splitmix64(a ^ splitmix64(b ^ 0x6A09E667F3BCC909ull)); }

// Small portable generator (splitmix64 stream).
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ull;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), unbiased (rejection).
  uint64_t below(uint64_t n) {
    const uint64_t threshold = (0 - n) % n;
    for (;;) {
      const uint64_t r = next();
      if (r >= threshold) return r % n;
    }
  }
  // Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
};

uint64_t order_seed(uint64_t seed, int64_t epoch) { return mix(mix(seed, 0x0123456789ABCDEFull), static_cast<uint64_t>(epoch)); }

uint64_t mix_seed(uint64_t seed, int64_t epoch, int64_t index) {
  return mix(mix(mix(seed, 0x5DEECE66D1234567ull), static_cast<uint64_t>(epoch)), static_cast<uint64_t>(index));
}

// Standard normal (Box-Muller) and Gamma(shape, 1) (Marsaglia and Tsang; shape < 1 through shape + 1), from the
// portable generator: the same draws on every platform.
double normal(Rng& rng) {
  const double u1 = 1.0 - rng.uniform(), u2 = rng.uniform();
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * kPi * u2);
}

double gamma_draw(Rng& rng, double shape) {
  if (shape < 1) return gamma_draw(rng, shape + 1) * std::pow(1.0 - rng.uniform(), 1.0 / shape);
  const double d = shape - 1.0 / 3.0, c = 1.0 / std::sqrt(9.0 * d);
  for (;;) {
    double x, v;
    do {
      x = normal(rng);
      v = 1.0 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = 1.0 - rng.uniform();
    if (std::log(u) < 0.5 * x * x + d - d * v + d * std::log(v)) return d * v;
  }
}

double beta_draw(Rng& rng, double alpha) {
  const double a = gamma_draw(rng, alpha), b = gamma_draw(rng, alpha);
  return a + b > 0 ? a / (a + b) : 0.5;
}

// One batch's mixing: lambda and, for CutMix, the box [y0, y1) x [x0, x1) taken from the partner.
struct MixDraw {
  bool cutmix = false;
  double lambda = 1;
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;
};

MixDraw draw_mix(const MixOptions& o, uint64_t seed, int64_t H, int64_t W) {
  Rng rng(seed);
  MixDraw m;
  m.cutmix = o.cutmix_alpha > 0 && (o.mixup_alpha <= 0 || rng.uniform() < o.switch_prob);
  m.lambda = beta_draw(rng, m.cutmix ? o.cutmix_alpha : o.mixup_alpha);
  if (m.cutmix) {  // timm's rand_bbox, then the kept area as lambda (correct_lam)
    const double cut = std::sqrt(1.0 - m.lambda);
    const int64_t cut_h = static_cast<int64_t>(static_cast<double>(H) * cut);
    const int64_t cut_w = static_cast<int64_t>(static_cast<double>(W) * cut);
    const int64_t cy = static_cast<int64_t>(rng.below(static_cast<uint64_t>(H)));
    const int64_t cx = static_cast<int64_t>(rng.below(static_cast<uint64_t>(W)));
    m.y0 = std::clamp<int64_t>(cy - cut_h / 2, 0, H);
    m.y1 = std::clamp<int64_t>(cy + cut_h / 2, 0, H);
    m.x0 = std::clamp<int64_t>(cx - cut_w / 2, 0, W);
    m.x1 = std::clamp<int64_t>(cx + cut_w / 2, 0, W);
    m.lambda = 1.0 - static_cast<double>((m.y1 - m.y0) * (m.x1 - m.x0)) / static_cast<double>(H * W);
  }
  return m;
}

uint64_t sample_seed(uint64_t seed, int64_t epoch, int64_t position) {
  return mix(mix(mix(seed, 0xFEDCBA9876543210ull), static_cast<uint64_t>(epoch)), static_cast<uint64_t>(position));
}

// One sample's geometric transform: crop offset (source = output + offset), flip, rotation.
struct Transform {
  int64_t ox = 0, oy = 0;
  bool flip = false;
  double angle_deg = 0;
};

Transform draw_transform(const AugmentOptions& a, uint64_t seed) {
  Rng rng(seed);
  // Always four draws in the same order, so that switching one augmentation on or off does not
  // change what the others do.
  const uint64_t rx = rng.next(), ry = rng.next(), rf = rng.next();
  const double ur = rng.uniform();
  Transform t;
  if (a.random_crop && a.crop_padding > 0) {
    const uint64_t span = static_cast<uint64_t>(2 * a.crop_padding + 1);
    t.ox = static_cast<int64_t>(rx % span) - a.crop_padding;
    t.oy = static_cast<int64_t>(ry % span) - a.crop_padding;
  }
  t.flip = a.horizontal_flip && (rf >> 63) != 0;
  if (a.max_rotation_deg > 0) t.angle_deg = (2.0 * ur - 1.0) * a.max_rotation_deg;
  return t;
}

// Per-channel affine map of a pixel value v in [0, 255] to the output: v * scale + shift, and a lookup
// table of the same for integer values (exactly v / 255.0f when not normalising).
struct Normaliser {
  std::vector<float> scale, shift, lut;  // lut: channels x 256
};

Normaliser make_normaliser(const ImageDataset& d, const AugmentOptions& a) {
  const int64_t c = d.channels();
  Normaliser n;
  n.scale.resize(static_cast<size_t>(c));
  n.shift.resize(static_cast<size_t>(c));
  n.lut.resize(static_cast<size_t>(c * 256));
  for (int64_t ch = 0; ch < c; ++ch) {
    const size_t k = static_cast<size_t>(ch);
    const float mean = a.normalize ? d.mean[d.mean.size() == 1 ? 0 : k] : 0.0f;
    const float sd = a.normalize ? d.std[d.std.size() == 1 ? 0 : k] : 1.0f;
    n.scale[k] = 1.0f / (255.0f * sd);
    n.shift[k] = -mean / sd;
    for (int v = 0; v < 256; ++v) {
      const float x = static_cast<float>(v) / 255.0f;
      n.lut[k * 256 + static_cast<size_t>(v)] = a.normalize ? (x - mean) / sd : x;
    }
  }
  return n;
}

// Writes one augmented, normalised sample. src: uint8 [C, H, W]; dst: float [C, H, W].
// The output pixel (x, y) is the rotation (about the image centre) of the flipped crop F, where
// F(u, v) = src((flip ? W-1-u : u) + ox, v + oy), zero outside the source and outside F.
// tables: scratch space reused between samples (the rotation's row and column maps).
void transform_sample(const uint8_t* src, float* dst, int64_t C, int64_t H, int64_t W, const Transform& t,
                      const Normaliser& norm, std::vector<int64_t>& tables) {
  const int64_t hw = H * W;
  if (t.angle_deg == 0) {
    // Integer mapping: one table lookup per pixel.
    for (int64_t c = 0; c < C; ++c) {
      const uint8_t* s = src + c * hw;
      float* d = dst + c * hw;
      const float* lut = norm.lut.data() + c * 256;
      const float zero = lut[0];
      // Valid x: 0 <= sx < W with sx = x + ox (no flip) or W-1-x + ox (flip).
      const int64_t x_lo = std::max<int64_t>(0, t.flip ? t.ox : -t.ox);
      const int64_t x_hi = std::min<int64_t>(W, t.flip ? W + t.ox : W - t.ox);
      for (int64_t y = 0; y < H; ++y) {
        float* drow = d + y * W;
        const int64_t sy = y + t.oy;
        if (sy < 0 || sy >= H || x_lo >= x_hi) {
          std::fill(drow, drow + W, zero);
          continue;
        }
        const uint8_t* srow = s + sy * W;
        for (int64_t x = 0; x < x_lo; ++x) drow[x] = zero;
        if (t.flip) {
          const int64_t right = W - 1 + t.ox;
          for (int64_t x = x_lo; x < x_hi; ++x) drow[x] = lut[srow[right - x]];
        } else {
          for (int64_t x = x_lo; x < x_hi; ++x) drow[x] = lut[srow[x + t.ox]];
        }
        for (int64_t x = x_hi; x < W; ++x) drow[x] = zero;
      }
    }
    return;
  }
  // Rotation by angle (counter-clockwise as seen on screen, y pointing down), bilinear, zero fill.
  // Output (x, y) samples F at q = centre + R(angle) ((x, y) - centre); F's columns and rows map to
  // source columns and row offsets through small tables (-1: zero), indexed from -1 to W (or H).
  const double a = t.angle_deg * kPi / 180.0;
  const double cs = std::cos(a), sn = std::sin(a);
  const double cx = 0.5 * static_cast<double>(W - 1), cy = 0.5 * static_cast<double>(H - 1);
  tables.resize(static_cast<size_t>(W + H + 4));
  int64_t* col = tables.data() + 1;        // col[u], u in [-1, W]
  int64_t* row = tables.data() + W + 3;    // row[v], v in [-1, H]
  for (int64_t u = -1; u <= W; ++u) {
    const int64_t sx = (t.flip ? W - 1 - u : u) + t.ox;
    col[u] = (u >= 0 && u < W && sx >= 0 && sx < W) ? sx : -1;
  }
  for (int64_t v = -1; v <= H; ++v) {
    const int64_t sy = v + t.oy;
    row[v] = (v >= 0 && v < H && sy >= 0 && sy < H) ? sy * W : -1;
  }
  auto at = [&](int64_t u, int64_t v) -> int64_t { return (col[u] < 0 || row[v] < 0) ? -1 : row[v] + col[u]; };
  for (int64_t y = 0; y < H; ++y) {
    const double dy = static_cast<double>(y) - cy;
    // q for x = 0, then q += (cs, sn) per step in x.
    double qx = cx - cs * cx - sn * dy;
    double qy = cy - sn * cx + cs * dy;
    for (int64_t x = 0; x < W; ++x, qx += cs, qy += sn) {
      const int64_t o = y * W + x;
      if (!(qx > -1.0 && qy > -1.0 && qx < static_cast<double>(W) && qy < static_cast<double>(H))) {
        for (int64_t c = 0; c < C; ++c) dst[c * hw + o] = norm.shift[static_cast<size_t>(c)];
        continue;
      }
      const double fx0 = std::floor(qx), fy0 = std::floor(qy);
      const int64_t x0 = static_cast<int64_t>(fx0), y0 = static_cast<int64_t>(fy0);
      const float fx = static_cast<float>(qx - fx0), fy = static_cast<float>(qy - fy0);
      const float w[4] = {(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy};
      const int64_t idx[4] = {at(x0, y0), at(x0 + 1, y0), at(x0, y0 + 1), at(x0 + 1, y0 + 1)};
      for (int64_t c = 0; c < C; ++c) {
        const uint8_t* s = src + c * hw;
        float v = 0;
        for (int k = 0; k < 4; ++k)
          if (idx[k] >= 0) v += w[k] * static_cast<float>(s[idx[k]]);
        dst[c * hw + o] = v * norm.scale[static_cast<size_t>(c)] + norm.shift[static_cast<size_t>(c)];
      }
    }
  }
}

void check_data(const ImageDataset& d, const AugmentOptions& a, const char* where) {
  auto bad = [&](const std::string& what) {
    throw std::invalid_argument(std::string(where) + ": data set \"" + d.name + "\": " + what);
  };
  if (!d.images.defined() || d.images.dim() != 4) bad("images must be a [N, C, H, W] tensor");
  if (d.images.scalar_type() != torch::kUInt8) bad("images must be uint8");
  if (!d.images.is_contiguous()) bad("images must be contiguous");
  if (!d.labels.defined() || d.labels.dim() != 1 || d.labels.scalar_type() != torch::kInt64 || !d.labels.is_contiguous())
    bad("labels must be a contiguous int64 [N] tensor");
  if (d.labels.size(0) != d.images.size(0))
    bad(std::to_string(d.images.size(0)) + " images but " + std::to_string(d.labels.size(0)) + " labels");
  if (d.num_classes < 1) bad("num_classes " + std::to_string(d.num_classes) + " must be >= 1");
  if (a.normalize) {
    const size_t c = static_cast<size_t>(d.images.size(1));
    if ((d.mean.size() != c && d.mean.size() != 1) || (d.std.size() != c && d.std.size() != 1))
      bad("mean/std have " + std::to_string(d.mean.size()) + "/" + std::to_string(d.std.size()) +
          " entries for " + std::to_string(c) + " channels");
    for (float s : d.std)
      if (!(s > 0)) bad("std " + std::to_string(s) + " must be > 0");
  }
}

}  // namespace

BatchLoader::BatchLoader(const ImageDataset& data, LoaderOptions options) : data_(data), options_(std::move(options)) {
  const auto& o = options_;
  if (o.batch_size < 1) throw std::invalid_argument("BatchLoader: batch_size " + std::to_string(o.batch_size) + " must be >= 1");
  if (o.world < 1) throw std::invalid_argument("BatchLoader: world " + std::to_string(o.world) + " must be >= 1");
  if (o.rank < 0 || o.rank >= o.world)
    throw std::invalid_argument("BatchLoader: rank " + std::to_string(o.rank) + " must be in [0, world " +
                                std::to_string(o.world) + ")");
  if (o.batch_size % o.world != 0)
    throw std::invalid_argument("BatchLoader: batch_size " + std::to_string(o.batch_size) +
                                " is not divisible by world " + std::to_string(o.world));
  if (o.workers < 0) throw std::invalid_argument("BatchLoader: workers " + std::to_string(o.workers) + " must be >= 0");
  if (o.prefetch < 0) throw std::invalid_argument("BatchLoader: prefetch " + std::to_string(o.prefetch) + " must be >= 0");
  if (o.augment.crop_padding < 0)
    throw std::invalid_argument("BatchLoader: crop_padding " + std::to_string(o.augment.crop_padding) + " must be >= 0");
  if (!(o.augment.max_rotation_deg >= 0) || !std::isfinite(o.augment.max_rotation_deg))
    throw std::invalid_argument("BatchLoader: max_rotation_deg " + std::to_string(o.augment.max_rotation_deg) +
                                " must be finite and >= 0");
  check_data(data_, o.augment, "BatchLoader");
}

BatchLoader::~BatchLoader() { stop_workers(); }

int64_t BatchLoader::batches_per_epoch() const {
  const int64_t n = data_.size(), b = options_.batch_size;
  return options_.drop_last ? n / b : (n + b - 1) / b;
}

std::vector<int64_t> BatchLoader::epoch_order(int64_t epoch) const {
  const int64_t n = data_.size();
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  if (options_.shuffle) {
    Rng rng(order_seed(options_.seed, epoch));
    for (int64_t i = n - 1; i > 0; --i) {
      const int64_t j = static_cast<int64_t>(rng.below(static_cast<uint64_t>(i + 1)));
      std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
    }
  }
  return order;
}

Batch BatchLoader::assemble(int64_t epoch, int64_t index, const std::vector<int64_t>& order) const {
  // Re-checked per batch: the data set is held by reference and may have been changed since.
  check_data(data_, options_.augment, "BatchLoader::assemble");
  const int64_t n = data_.size();
  if (static_cast<int64_t>(order.size()) != n)
    throw std::logic_error("BatchLoader::assemble: the data set has " + std::to_string(n) +
                           " samples but the epoch order " + std::to_string(order.size()));
  const int64_t b = options_.batch_size, world = options_.world, rank = options_.rank;
  const int64_t start = index * b;
  if (index < 0 || start >= n)
    throw std::out_of_range("BatchLoader::assemble: batch " + std::to_string(index) + " out of range [0, " +
                            std::to_string(batches_per_epoch()) + ")");
  const int64_t global = std::min(b, n - start);
  // This rank's contiguous shard of the global batch; a partial batch is split as evenly as possible.
  const int64_t base = global / world, extra = global % world;
  const int64_t count = base + (rank < extra ? 1 : 0);
  const int64_t offset = rank * base + std::min(rank, extra);

  const int64_t C = data_.channels(), H = data_.height(), W = data_.width(), chw = C * H * W;
  Batch batch;
  batch.index = index;
  batch.global_size = global;
  batch.offset = offset;
  batch.images = torch::empty({count, C, H, W}, torch::kFloat32);
  batch.labels = torch::empty({count}, torch::kInt64);
  const Normaliser norm = make_normaliser(data_, options_.augment);
  const uint8_t* src = data_.images.data_ptr<uint8_t>();
  const int64_t* labels = data_.labels.data_ptr<int64_t>();
  float* out = count > 0 ? batch.images.data_ptr<float>() : nullptr;
  int64_t* out_labels = count > 0 ? batch.labels.data_ptr<int64_t>() : nullptr;
  std::vector<int64_t> tables;
  // The sample at a position of the epoch order, its label checked.
  auto sample_at = [&](int64_t position, int64_t* label) {
    const int64_t sample = order[static_cast<size_t>(position)];
    if (sample < 0 || sample >= n) throw std::logic_error("BatchLoader::assemble: sample index out of range");
    *label = labels[sample];
    if (*label < 0 || *label >= data_.num_classes)
      throw std::out_of_range("BatchLoader: data set \"" + data_.name + "\": label " + std::to_string(*label) +
                              " of sample " + std::to_string(sample) + " out of range [0, " +
                              std::to_string(data_.num_classes) + ")");
    return sample;
  };
  const bool mixing = options_.mix.enabled() && count > 0;
  MixDraw m;
  std::vector<float> partner;
  int64_t* out_mix = nullptr;
  if (mixing) {
    m = draw_mix(options_.mix, mix_seed(options_.seed, epoch, index), H, W);
    batch.mix_lambda = m.lambda;
    batch.cutmix = m.cutmix;
    batch.mix_labels = torch::empty({count}, torch::kInt64);
    out_mix = batch.mix_labels.data_ptr<int64_t>();
    partner.resize(static_cast<size_t>(chw));
  }
  for (int64_t j = 0; j < count; ++j) {
    const int64_t position = start + offset + j;
    int64_t label = 0;
    const int64_t sample = sample_at(position, &label);
    out_labels[j] = label;
    float* image = out + j * chw;
    const Transform t = draw_transform(options_.augment, sample_seed(options_.seed, epoch, position));
    transform_sample(src + sample * chw, image, C, H, W, t, norm, tables);
    if (!mixing) continue;
    // The partner: the mirrored position of the global batch, augmented as it is where it stands.
    const int64_t partner_position = start + (global - 1 - (position - start));
    int64_t partner_label = 0;
    const int64_t partner_sample = sample_at(partner_position, &partner_label);
    out_mix[j] = partner_label;
    const Transform pt = draw_transform(options_.augment, sample_seed(options_.seed, epoch, partner_position));
    transform_sample(src + partner_sample * chw, partner.data(), C, H, W, pt, norm, tables);
    if (m.cutmix) {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t y = m.y0; y < m.y1; ++y)
          std::memcpy(image + (c * H + y) * W + m.x0, partner.data() + (c * H + y) * W + m.x0,
                      static_cast<size_t>(m.x1 - m.x0) * sizeof(float));
    } else {
      const float keep = static_cast<float>(m.lambda), take = static_cast<float>(1.0 - m.lambda);
      for (int64_t k = 0; k < chw; ++k) image[k] = image[k] * keep + partner[static_cast<size_t>(k)] * take;
    }
  }
  return batch;
}

void BatchLoader::stop_workers() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_)
    if (t.joinable()) t.join();
  workers_.clear();
  std::lock_guard<std::mutex> lock(mutex_);
  stopping_ = false;
  ready_.clear();
}

void BatchLoader::start_epoch(int64_t epoch, int64_t first_batch) {
  stop_workers();
  if (first_batch < 0 || first_batch > batches_per_epoch())
    throw std::invalid_argument("BatchLoader::start_epoch: first batch " + std::to_string(first_batch) +
                                " outside the epoch's " + std::to_string(batches_per_epoch()) + " batches");
  order_ = epoch_order(epoch);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    epoch_ = epoch;
    next_to_assemble_ = first_batch;
    next_to_return_ = first_batch;
  }
  const int64_t threads = std::min(options_.workers, batches_per_epoch() - first_batch);
  for (int64_t i = 0; i < threads; ++i) workers_.emplace_back(&BatchLoader::worker_loop, this, epoch);
}

void BatchLoader::worker_loop(int64_t epoch) {
  const int64_t total = batches_per_epoch();
  // Batches [next_to_return_, next_to_return_ + window) may be assembled: the one the consumer
  // waits for next and up to `prefetch` beyond the one it holds.
  const int64_t window = std::max<int64_t>(options_.prefetch, 1);
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    cv_.wait(lock, [&] {
      return stopping_ || next_to_assemble_ >= total || next_to_assemble_ < next_to_return_ + window;
    });
    if (stopping_ || next_to_assemble_ >= total) return;
    const int64_t index = next_to_assemble_++;
    lock.unlock();
    Batch batch;
    try {
      batch = assemble(epoch, index, order_);
    } catch (...) {
      // Left undefined: next() assembles this batch again on the consumer's thread, which throws the
      // same exception there (assemble depends only on its arguments and the data set).
      batch = Batch{};
      batch.index = index;
    }
    lock.lock();
    ready_[index] = std::move(batch);
    cv_.notify_all();
  }
}

bool BatchLoader::next(Batch& batch) {
  if (epoch_ < 0) throw std::logic_error("BatchLoader::next: call start_epoch() first");
  if (next_to_return_ >= batches_per_epoch()) return false;
  const int64_t index = next_to_return_;
  const auto t0 = std::chrono::steady_clock::now();
  auto waited = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  // Assembles on the caller's thread; the time counts as waiting, also when it throws.
  auto assemble_here = [&] {
    try {
      return assemble(epoch_, index, order_);
    } catch (...) {
      wait_seconds_ += waited();
      throw;
    }
  };
  if (workers_.empty()) {  // workers == 0: assemble on the caller's thread
    Batch b = assemble_here();
    wait_seconds_ += waited();
    std::lock_guard<std::mutex> lock(mutex_);
    ++next_to_return_;
    batch = std::move(b);
    return true;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [&] { return ready_.count(index) > 0; });
  auto it = ready_.find(index);
  if (!it->second.images.defined()) {
    // The worker failed on this batch: rethrow its exception here. It stays pending, so that a
    // retry fails the same way.
    lock.unlock();
    Batch b = assemble_here();
    lock.lock();
    it = ready_.find(index);
    it->second = std::move(b);
  }
  batch = std::move(it->second);
  ready_.erase(it);
  ++next_to_return_;
  wait_seconds_ += waited();
  lock.unlock();
  cv_.notify_all();
  return true;
}

AugmentOptions augment_preset(const std::string& name, const std::string& data_set) {
  std::string preset = name;
  if (preset == "auto")
    preset = (data_set == "cifar10" || data_set == "cifar100" || data_set == "tiny-imagenet") ? "crop-flip" : "none";
  if (preset != "none" && preset != "flip" && preset != "crop-flip" && preset != "paper")
    throw std::invalid_argument("augmentation '" + name + "' is not auto, none, flip, crop-flip or paper");
  AugmentOptions a;
  a.random_crop = preset == "crop-flip" || preset == "paper";
  a.horizontal_flip = preset != "none";
  a.max_rotation_deg = preset == "paper" ? 15.0 : 0.0;
  return a;
}

}  // namespace data
}  // namespace largebatch
