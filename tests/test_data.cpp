// Tests of the data set readers (IDX, CIFAR, Tiny-ImageNet, synthetic) and the batch loader.
#include <largebatch/data/dataset.h>
#include <largebatch/data/pipeline.h>

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <random>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

#include <jpeglib.h>  // after <cstdio>

namespace fs = std::filesystem;
using namespace largebatch::data;

namespace {

// ---- files ---------------------------------------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    static std::atomic<int> counter{0};
    std::random_device rd;
    path_ = fs::temp_directory_path() /
            ("largebatch_data_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" +
             std::to_string(rd()));
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string str() const { return path_.string(); }

 private:
  fs::path path_;
};

using Bytes = std::vector<uint8_t>;

void write_file(const std::string& path, const Bytes& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

Bytes read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_gzip(const std::string& path, const Bytes& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (!bytes.empty()) {
    ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  }
  ASSERT_EQ(gzclose(f), Z_OK);
}

void put_be32(Bytes& b, uint32_t v) {
  b.push_back(static_cast<uint8_t>(v >> 24));
  b.push_back(static_cast<uint8_t>(v >> 16));
  b.push_back(static_cast<uint8_t>(v >> 8));
  b.push_back(static_cast<uint8_t>(v));
}

// IDX images: pixel (i, y, x) = (i * 7 + y * w + x) % 256.
uint8_t idx_pixel(int64_t i, int64_t y, int64_t x, int64_t w) { return static_cast<uint8_t>((i * 7 + y * w + x) % 256); }

Bytes idx_images(uint32_t n, uint32_t h, uint32_t w, uint32_t magic = 0x803) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, n);
  put_be32(b, h);
  put_be32(b, w);
  for (uint32_t i = 0; i < n; ++i)
    for (uint32_t y = 0; y < h; ++y)
      for (uint32_t x = 0; x < w; ++x) b.push_back(idx_pixel(i, y, x, w));
  return b;
}

Bytes idx_labels(const std::vector<uint8_t>& labels, uint32_t magic = 0x801) {
  Bytes b;
  put_be32(b, magic);
  put_be32(b, static_cast<uint32_t>(labels.size()));
  b.insert(b.end(), labels.begin(), labels.end());
  return b;
}

std::vector<uint8_t> some_labels(size_t n, int classes = 10) {
  std::vector<uint8_t> l(n);
  for (size_t i = 0; i < n; ++i) l[i] = static_cast<uint8_t>((i * 3 + 1) % static_cast<size_t>(classes));
  return l;
}

// Runs f, which must throw a DataError whose message contains every one of `parts`.
void expect_data_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no DataError thrown; expected one mentioning " << *parts.begin();
  } catch (const DataError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "message: " << msg << "\nmissing: " << p;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected DataError, got another exception: " << e.what();
  }
}

// ---- JPEG writing --------------------------------------------------------------------------------

// Writes interleaved pixels (components 1 or 3) as a JPEG with libjpeg's compressor.
void write_jpeg(const std::string& path, int w, int h, int components, const Bytes& pixels) {
  fs::create_directories(fs::path(path).parent_path());
  std::FILE* f = std::fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  jpeg_stdio_dest(&c, f);
  c.image_width = static_cast<JDIMENSION>(w);
  c.image_height = static_cast<JDIMENSION>(h);
  c.input_components = components;
  c.in_color_space = components == 1 ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 100, TRUE);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(pixels.data() + static_cast<size_t>(c.next_scanline) * w * components);
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(f);
}

struct Rgb {
  uint8_t r, g, b;
};

// 64x64 RGB: left half `left`, right half `right`.
void write_two_colour_jpeg(const std::string& path, Rgb left, Rgb right, int size = 64) {
  Bytes px;
  for (int y = 0; y < size; ++y)
    for (int x = 0; x < size; ++x) {
      const Rgb c = x < size / 2 ? left : right;
      px.push_back(c.r);
      px.push_back(c.g);
      px.push_back(c.b);
    }
  write_jpeg(path, size, size, 3, px);
}

void write_gray_jpeg(const std::string& path, uint8_t value) {
  write_jpeg(path, 64, 64, 1, Bytes(64 * 64, value));
}

// ---- loader helpers --------------------------------------------------------------------------------

// A small data set with distinct images: pixel values from a fixed generator.
ImageDataset toy_dataset(int64_t n, int64_t c, int64_t h, int64_t w, uint64_t seed = 1, int64_t classes = 10) {
  ImageDataset d;
  d.name = "toy/train";
  d.images = torch::empty({n, c, h, w}, torch::kUInt8);
  d.labels = torch::empty({n}, torch::kInt64);
  std::mt19937_64 rng(seed);
  uint8_t* p = d.images.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n * c * h * w; ++i) p[i] = static_cast<uint8_t>(rng() & 0xff);
  for (int64_t i = 0; i < n; ++i) d.labels[i] = i % classes;
  d.num_classes = classes;
  d.mean.assign(static_cast<size_t>(c), 0.5f);
  d.std.assign(static_cast<size_t>(c), 0.25f);
  if (c == 3) {
    d.mean = {0.4f, 0.5f, 0.6f};
    d.std = {0.2f, 0.25f, 0.3f};
  }
  return d;
}

std::vector<Batch> whole_epoch(BatchLoader& loader, int64_t epoch) {
  loader.start_epoch(epoch);
  std::vector<Batch> out;
  Batch b;
  while (loader.next(b)) out.push_back(b);
  return out;
}

LoaderOptions plain_options(int64_t batch_size) {
  LoaderOptions o;
  o.batch_size = batch_size;
  o.shuffle = false;
  o.augment.normalize = false;
  return o;
}

AugmentOptions all_augmentation() {
  AugmentOptions a;
  a.random_crop = true;
  a.crop_padding = 3;
  a.horizontal_flip = true;
  a.max_rotation_deg = 20;
  a.normalize = true;
  return a;
}

}  // namespace

// =====================================================================================================
// IDX
// =====================================================================================================

TEST(IdxTest, ReadsRawAndGzipDetectedByContent) {
  TempDir dir;
  const Bytes images = idx_images(6, 3, 4);
  const std::vector<uint8_t> labels = some_labels(6);
  // Raw content in a file named .gz, gzip content in a file without .gz: detection is by content.
  write_file(dir.file("raw-images.gz"), images);
  write_gzip(dir.file("gz-labels"), idx_labels(labels));
  const ImageDataset d = read_idx(dir.file("raw-images.gz"), dir.file("gz-labels"), "mnist/train");
  ASSERT_EQ(d.images.sizes(), (std::vector<int64_t>{6, 1, 3, 4}));
  EXPECT_EQ(d.images.scalar_type(), torch::kUInt8);
  EXPECT_TRUE(d.images.is_contiguous());
  EXPECT_EQ(d.labels.scalar_type(), torch::kInt64);
  EXPECT_EQ(d.name, "mnist/train");
  EXPECT_EQ(d.num_classes, 10);
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_EQ(d.labels[i].item<int64_t>(), labels[static_cast<size_t>(i)]);
    for (int64_t y = 0; y < 3; ++y)
      for (int64_t x = 0; x < 4; ++x) EXPECT_EQ(d.images[i][0][y][x].item<int>(), idx_pixel(i, y, x, 4));
  }
  ASSERT_EQ(d.mean.size(), 1u);
  EXPECT_FLOAT_EQ(d.mean[0], 0.1307f);
  EXPECT_FLOAT_EQ(d.std[0], 0.3081f);

  // The same data both gzip-compressed: identical result; an unknown name gets computed statistics.
  write_gzip(dir.file("images2"), images);
  write_file(dir.file("labels2"), idx_labels(labels));
  const ImageDataset g = read_idx(dir.file("images2"), dir.file("labels2"), "toy/train");
  EXPECT_TRUE(torch::equal(g.images, d.images));
  EXPECT_TRUE(torch::equal(g.labels, d.labels));
  const auto x = d.images.to(torch::kFloat64) / 255.0;
  EXPECT_NEAR(g.mean[0], x.mean().item<double>(), 1e-5);
  EXPECT_NEAR(g.std[0], x.std(/*unbiased=*/false).item<double>(), 1e-5);
}

TEST(IdxTest, LoadsMnistDirectoryWithMixedCompression) {
  TempDir dir;
  write_file(dir.file("train-images-idx3-ubyte"), idx_images(5, 28, 28));
  write_gzip(dir.file("train-labels-idx1-ubyte.gz"), idx_labels(some_labels(5)));
  write_gzip(dir.file("t10k-images-idx3-ubyte.gz"), idx_images(3, 28, 28));
  write_file(dir.file("t10k-labels-idx1-ubyte"), idx_labels(some_labels(3)));
  const DatasetSplit s = load_mnist_dir(dir.str(), "fashion-mnist");
  EXPECT_EQ(s.train.size(), 5);
  EXPECT_EQ(s.test.size(), 3);
  EXPECT_EQ(s.train.name, "fashion-mnist/train");
  EXPECT_EQ(s.test.name, "fashion-mnist/test");
  EXPECT_FLOAT_EQ(s.train.mean[0], 0.2860f);
  EXPECT_FLOAT_EQ(s.test.std[0], 0.3530f);
  EXPECT_EQ(s.test.images[2][0][27][27].item<int>(), idx_pixel(2, 27, 27, 28));

  // Through load_dataset as well.
  const DatasetSplit t = load_dataset("mnist", dir.str());
  EXPECT_EQ(t.train.name, "mnist/train");
  EXPECT_FLOAT_EQ(t.train.mean[0], 0.1307f);
  EXPECT_TRUE(torch::equal(t.train.images, s.train.images));
}

TEST(IdxTest, BadMagicNumbers) {
  TempDir dir;
  write_file(dir.file("img"), idx_images(2, 2, 2, 0x804));
  write_file(dir.file("lab"), idx_labels(some_labels(2)));
  expect_data_error([&] { read_idx(dir.file("img"), dir.file("lab"), "t"); },
                    {dir.file("img"), "magic number 0x00000804, expected 0x00000803"});
  // Labels given where images are expected and vice versa.
  write_file(dir.file("img"), idx_images(2, 2, 2));
  expect_data_error([&] { read_idx(dir.file("lab"), dir.file("lab"), "t"); },
                    {dir.file("lab"), "magic number 0x00000801, expected 0x00000803"});
  expect_data_error([&] { read_idx(dir.file("img"), dir.file("img"), "t"); },
                    {dir.file("img"), "magic number 0x00000803, expected 0x00000801"});
  // Not an IDX file at all (gzip-compressed text).
  write_gzip(dir.file("text.gz"), Bytes{'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd'});
  expect_data_error([&] { read_idx(dir.file("text.gz"), dir.file("lab"), "t"); },
                    {dir.file("text.gz"), "magic number 0x68656c6c"});
}

TEST(IdxTest, TruncatedAndTrailingData) {
  TempDir dir;
  write_file(dir.file("lab"), idx_labels(some_labels(10000)));
  // The header promises 10000 images of 28x28 (7840016 bytes); the file holds 100.
  Bytes images = idx_images(10000, 28, 28);
  write_file(dir.file("img"), Bytes(images.begin(), images.begin() + 100));
  expect_data_error([&] { read_idx(dir.file("img"), dir.file("lab"), "t"); },
                    {dir.file("img"), "truncated: expected 7840016 bytes, found 100"});
  // The same inside gzip.
  write_gzip(dir.file("img.gz"), Bytes(images.begin(), images.begin() + 100));
  expect_data_error([&] { read_idx(dir.file("img.gz"), dir.file("lab"), "t"); },
                    {dir.file("img.gz"), "truncated: expected 7840016 bytes, found 100"});
  // Only part of the header.
  write_file(dir.file("short"), Bytes(images.begin(), images.begin() + 10));
  expect_data_error([&] { read_idx(dir.file("short"), dir.file("lab"), "t"); }, {dir.file("short"), "truncated"});
  // Labels truncated by one byte.
  Bytes labels = idx_labels(some_labels(10000));
  labels.pop_back();
  write_file(dir.file("lab-short"), labels);
  write_file(dir.file("img"), images);
  expect_data_error([&] { read_idx(dir.file("img"), dir.file("lab-short"), "t"); },
                    {dir.file("lab-short"), "truncated: expected 10008 bytes, found 10007"});
  // Trailing garbage after the promised bytes.
  images.push_back(1);
  images.push_back(2);
  write_gzip(dir.file("img-long.gz"), images);
  expect_data_error([&] { read_idx(dir.file("img-long.gz"), dir.file("lab"), "t"); },
                    {dir.file("img-long.gz"), "trailing data: expected 7840016 bytes, found 7840018"});
}

TEST(IdxTest, CorruptGzipStream) {
  TempDir dir;
  write_gzip(dir.file("full.gz"), idx_images(200, 28, 28));
  const Bytes gz = read_bytes(dir.file("full.gz"));
  ASSERT_GT(gz.size(), 100u);
  write_file(dir.file("cut.gz"), Bytes(gz.begin(), gz.begin() + static_cast<std::ptrdiff_t>(gz.size() / 2)));
  write_file(dir.file("lab"), idx_labels(some_labels(200)));
  // Cut in the middle of the compressed stream: an error naming the file, never a short data set.
  expect_data_error([&] { read_idx(dir.file("cut.gz"), dir.file("lab"), "t"); }, {dir.file("cut.gz")});
}

TEST(IdxTest, CountMismatchAndLabelRange) {
  TempDir dir;
  write_file(dir.file("img"), idx_images(8, 2, 2));
  write_file(dir.file("lab7"), idx_labels(some_labels(7)));
  expect_data_error([&] { read_idx(dir.file("img"), dir.file("lab7"), "t"); },
                    {dir.file("img"), dir.file("lab7"), "8 images", "7 labels", "count mismatch"});
  std::vector<uint8_t> labels = some_labels(8);
  labels[5] = 12;
  write_file(dir.file("lab"), idx_labels(labels));
  expect_data_error([&] { read_idx(dir.file("img"), dir.file("lab"), "t"); },
                    {dir.file("lab"), "label 12 out of range [0, 10) at record 5"});
  // With more classes the same labels are fine.
  EXPECT_EQ(read_idx(dir.file("img"), dir.file("lab"), "t", 13).labels[5].item<int64_t>(), 12);
}

TEST(IdxTest, MissingFilesAndDirectories) {
  TempDir dir;
  const std::string missing = dir.file("no-such-dir");
  expect_data_error([&] { load_mnist_dir(missing, "mnist"); }, {missing, "not found"});
  expect_data_error([&] { load_dataset("fashion-mnist", missing); }, {missing});
  write_file(dir.file("train-images-idx3-ubyte"), idx_images(2, 2, 2));
  write_file(dir.file("train-labels-idx1-ubyte"), idx_labels(some_labels(2)));
  write_file(dir.file("t10k-images-idx3-ubyte"), idx_images(2, 2, 2));
  expect_data_error([&] { load_mnist_dir(dir.str(), "mnist"); }, {dir.file("t10k-labels-idx1-ubyte"), "not found"});
  expect_data_error([&] { read_idx(dir.file("nope"), dir.file("train-labels-idx1-ubyte"), "t"); },
                    {dir.file("nope"), "not found"});
}

TEST(IdxTest, RealFashionMnistWhenInstalled) {
  const std::string dir = default_data_dir("fashion-mnist");
  EXPECT_EQ(dir, "/usr/share/datasets/fashion-mnist");
  if (!fs::exists(fs::path(dir) / "train-images-idx3-ubyte.gz") && !fs::exists(fs::path(dir) / "train-images-idx3-ubyte"))
    GTEST_SKIP() << "Fashion-MNIST is not installed in " << dir;
  const auto t0 = std::chrono::steady_clock::now();
  const DatasetSplit s = load_dataset("fashion-mnist", "");
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ info     ] Fashion-MNIST loaded in %.2f s\n", secs);
  ASSERT_EQ(s.train.images.sizes(), (std::vector<int64_t>{60000, 1, 28, 28}));
  ASSERT_EQ(s.test.images.sizes(), (std::vector<int64_t>{10000, 1, 28, 28}));
  EXPECT_EQ(s.train.num_classes, 10);
  EXPECT_EQ(s.train.name, "fashion-mnist/train");
  EXPECT_EQ(s.test.name, "fashion-mnist/test");
  // Balanced classes 0..9: 6000 per class in train, 1000 in test.
  const auto train_counts = torch::bincount(s.train.labels);
  const auto test_counts = torch::bincount(s.test.labels);
  ASSERT_EQ(train_counts.size(0), 10);
  ASSERT_EQ(test_counts.size(0), 10);
  EXPECT_TRUE(torch::equal(train_counts, torch::full({10}, 6000, torch::kInt64)));
  EXPECT_TRUE(torch::equal(test_counts, torch::full({10}, 1000, torch::kInt64)));
  // The published statistics match the data.
  const auto x = s.train.images.to(torch::kFloat64) / 255.0;
  EXPECT_NEAR(x.mean().item<double>(), 0.2860, 5e-4);
  EXPECT_NEAR(x.std(false).item<double>(), 0.3530, 5e-4);
  EXPECT_FLOAT_EQ(s.train.mean[0], 0.2860f);
}

// =====================================================================================================
// CIFAR
// =====================================================================================================

namespace {
// Pixel c, y, x of record r of file f: distinct-ish values.
uint8_t cifar_pixel(int f, int r, int c, int y, int x) { return static_cast<uint8_t>((f * 31 + r * 17 + c * 85 + y * 3 + x) % 256); }

Bytes cifar_records(int f, const std::vector<std::vector<uint8_t>>& label_bytes) {
  Bytes b;
  for (size_t r = 0; r < label_bytes.size(); ++r) {
    b.insert(b.end(), label_bytes[r].begin(), label_bytes[r].end());
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < 32; ++y)
        for (int x = 0; x < 32; ++x) b.push_back(cifar_pixel(f, static_cast<int>(r), c, y, x));
  }
  return b;
}

void write_cifar10(const TempDir& dir) {
  for (int f = 1; f <= 5; ++f)
    write_file(dir.file("data_batch_" + std::to_string(f) + ".bin"),
               cifar_records(f, {{static_cast<uint8_t>(f)}, {static_cast<uint8_t>(9 - f)}}));
  write_file(dir.file("test_batch.bin"), cifar_records(0, {{3}, {0}, {9}}));
}
}  // namespace

TEST(CifarTest, Cifar10ReadsPlanesAndLabels) {
  TempDir dir;
  write_cifar10(dir);
  const DatasetSplit s = load_cifar10(dir.str());
  ASSERT_EQ(s.train.images.sizes(), (std::vector<int64_t>{10, 3, 32, 32}));
  ASSERT_EQ(s.test.images.sizes(), (std::vector<int64_t>{3, 3, 32, 32}));
  EXPECT_EQ(s.train.num_classes, 10);
  EXPECT_EQ(s.train.name, "cifar10/train");
  EXPECT_EQ(s.test.name, "cifar10/test");
  // Files in order 1..5, two records each.
  for (int f = 1; f <= 5; ++f) {
    EXPECT_EQ(s.train.labels[2 * (f - 1)].item<int64_t>(), f);
    EXPECT_EQ(s.train.labels[2 * (f - 1) + 1].item<int64_t>(), 9 - f);
  }
  const auto img = s.train.images[7];  // file 4, record 1
  for (int c = 0; c < 3; ++c)
    for (int y : {0, 5, 31})
      for (int x : {0, 17, 31}) EXPECT_EQ(img[c][y][x].item<int>(), cifar_pixel(4, 1, c, y, x));
  EXPECT_TRUE(torch::equal(s.test.labels, torch::tensor({3, 0, 9}, torch::kInt64)));
  EXPECT_EQ(s.test.images[2][1][4][9].item<int>(), cifar_pixel(0, 2, 1, 4, 9));
  EXPECT_EQ(s.train.mean, (std::vector<float>{0.4914f, 0.4822f, 0.4465f}));
  EXPECT_EQ(s.test.std, (std::vector<float>{0.2470f, 0.2435f, 0.2616f}));
  EXPECT_EQ(load_dataset("cifar10", dir.str()).train.size(), 10);
}

TEST(CifarTest, Cifar10Errors) {
  TempDir dir;
  write_cifar10(dir);
  // A size that is not a multiple of the record.
  Bytes b = cifar_records(2, {{1}, {2}});
  b.push_back(0);
  write_file(dir.file("data_batch_2.bin"), b);
  expect_data_error([&] { load_cifar10(dir.str()); },
                    {dir.file("data_batch_2.bin"), "size 6147 bytes is not a multiple of the 3073-byte record"});
  // Label out of range.
  write_file(dir.file("data_batch_2.bin"), cifar_records(2, {{1}, {12}}));
  expect_data_error([&] { load_cifar10(dir.str()); },
                    {dir.file("data_batch_2.bin"), "label 12 out of range [0, 10) at record 1"});
  // Empty file.
  write_file(dir.file("data_batch_2.bin"), Bytes{});
  expect_data_error([&] { load_cifar10(dir.str()); }, {dir.file("data_batch_2.bin"), "empty"});
  // Missing file and missing directory.
  write_cifar10(dir);
  fs::remove(dir.file("test_batch.bin"));
  expect_data_error([&] { load_cifar10(dir.str()); }, {dir.file("test_batch.bin"), "not found"});
  expect_data_error([&] { load_cifar10(dir.file("absent")); }, {dir.file("absent"), "not found"});
}

TEST(CifarTest, Cifar100UsesFineLabels) {
  TempDir dir;
  write_file(dir.file("train.bin"), cifar_records(1, {{3, 99}, {19, 0}, {0, 42}}));
  write_file(dir.file("test.bin"), cifar_records(2, {{7, 55}}));
  const DatasetSplit s = load_cifar100(dir.str());
  EXPECT_EQ(s.train.num_classes, 100);
  EXPECT_TRUE(torch::equal(s.train.labels, torch::tensor({99, 0, 42}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(s.test.labels, torch::tensor({55}, torch::kInt64)));
  EXPECT_EQ(s.train.images[2][2][31][0].item<int>(), cifar_pixel(1, 2, 2, 31, 0));
  EXPECT_EQ(s.test.name, "cifar100/test");
  EXPECT_EQ(s.train.mean, (std::vector<float>{0.5071f, 0.4865f, 0.4409f}));

  write_file(dir.file("train.bin"), cifar_records(1, {{3, 99}, {19, 100}}));
  expect_data_error([&] { load_cifar100(dir.str()); },
                    {dir.file("train.bin"), "fine label 100 out of range [0, 100) at record 1"});
  write_file(dir.file("train.bin"), cifar_records(1, {{20, 1}}));
  expect_data_error([&] { load_cifar100(dir.str()); },
                    {dir.file("train.bin"), "coarse label 20 out of range [0, 20) at record 0"});
  // A CIFAR-10 file (3073-byte records) is not CIFAR-100.
  write_file(dir.file("test.bin"), cifar_records(1, {{1}}));
  write_file(dir.file("train.bin"), cifar_records(1, {{3, 99}}));
  expect_data_error([&] { load_cifar100(dir.str()); }, {dir.file("test.bin"), "3074-byte record"});
}

// =====================================================================================================
// Tiny-ImageNet
// =====================================================================================================

namespace {
const Rgb kRed{220, 20, 20}, kBlue{20, 30, 210}, kGreen{30, 200, 40}, kWhite{250, 250, 250};

// Three classes; class 1 has a grayscale image. Training files are written in non-sorted order.
void write_tiny(const TempDir& dir) {
  write_file(dir.file("wnids.txt"), Bytes{'n', '0', '1', '\n', 'n', '0', '2', '\r', '\n', 'n', '0', '3', '\n'});
  write_two_colour_jpeg(dir.file("train/n01/images/n01_1.JPEG"), kBlue, kRed);
  write_two_colour_jpeg(dir.file("train/n01/images/n01_0.JPEG"), kRed, kBlue);
  write_gray_jpeg(dir.file("train/n02/images/n02_0.JPEG"), 77);
  write_two_colour_jpeg(dir.file("train/n02/images/n02_1.JPEG"), kGreen, kGreen);
  write_two_colour_jpeg(dir.file("train/n03/images/n03_0.JPEG"), kWhite, kRed);
  write_file(dir.file("train/n03/n03_boxes.txt"), Bytes{'x'});  // not an image: ignored
  write_two_colour_jpeg(dir.file("val/images/val_0.JPEG"), kGreen, kWhite);
  write_gray_jpeg(dir.file("val/images/val_1.JPEG"), 200);
  const std::string ann = "val_0.JPEG\tn03\t0\t0\t63\t63\nval_1.JPEG\tn01\t1\t2\t30\t40\n";
  write_file(dir.file("val/val_annotations.txt"), Bytes(ann.begin(), ann.end()));
}

void expect_colour(const torch::Tensor& img, int y, int x, Rgb c, int tol = 6) {
  EXPECT_NEAR(img[0][y][x].item<int>(), c.r, tol) << "at " << y << "," << x;
  EXPECT_NEAR(img[1][y][x].item<int>(), c.g, tol) << "at " << y << "," << x;
  EXPECT_NEAR(img[2][y][x].item<int>(), c.b, tol) << "at " << y << "," << x;
}
}  // namespace

TEST(TinyImageNetTest, ReadsJpegTreeInSortedOrder) {
  TempDir dir;
  write_tiny(dir);
  const DatasetSplit s = load_tiny_imagenet(dir.str());
  ASSERT_EQ(s.train.images.sizes(), (std::vector<int64_t>{5, 3, 64, 64}));
  ASSERT_EQ(s.test.images.sizes(), (std::vector<int64_t>{2, 3, 64, 64}));
  EXPECT_EQ(s.train.num_classes, 3);
  EXPECT_EQ(s.train.name, "tiny-imagenet/train");
  EXPECT_EQ(s.test.name, "tiny-imagenet/test");
  EXPECT_TRUE(torch::equal(s.train.labels, torch::tensor({0, 0, 1, 1, 2}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(s.test.labels, torch::tensor({2, 0}, torch::kInt64)));
  // n01_0 (red | blue) sorts before n01_1 (blue | red): planar RGB, x to the right.
  expect_colour(s.train.images[0], 10, 5, kRed);
  expect_colour(s.train.images[0], 50, 58, kBlue);
  expect_colour(s.train.images[1], 10, 5, kBlue);
  expect_colour(s.train.images[1], 50, 58, kRed);
  // Grayscale becomes three equal channels.
  const auto gray = s.train.images[2];
  EXPECT_TRUE(torch::equal(gray[0], gray[1]));
  EXPECT_TRUE(torch::equal(gray[0], gray[2]));
  EXPECT_NEAR(gray[0][30][30].item<int>(), 77, 2);
  expect_colour(s.train.images[4], 32, 2, kWhite);
  expect_colour(s.test.images[0], 3, 60, kWhite);
  EXPECT_NEAR(s.test.images[1][1][63][0].item<int>(), 200, 2);
  EXPECT_EQ(s.train.mean, (std::vector<float>{0.4802f, 0.4481f, 0.3975f}));
  EXPECT_EQ(load_dataset("tiny-imagenet", dir.str()).test.size(), 2);
}

TEST(TinyImageNetTest, CorruptJpegIsADataError) {
  TempDir dir;
  write_tiny(dir);
  const std::string bad = dir.file("train/n02/images/n02_1.JPEG");
  write_file(bad, Bytes{'n', 'o', 't', ' ', 'a', ' ', 'j', 'p', 'e', 'g', 0, 1, 2, 3, 4, 5});
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {bad, "corrupt JPEG", "Not a JPEG file"});
  // A valid header followed by garbage, and a file cut short.
  write_two_colour_jpeg(bad, kRed, kGreen);
  Bytes good = read_bytes(bad);
  Bytes garbled(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(good.size() / 3));
  for (int i = 0; i < 500; ++i) garbled.push_back(static_cast<uint8_t>(i * 37 + 11));
  write_file(bad, garbled);
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {bad, "corrupt JPEG"});
  write_file(bad, Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(good.size() / 2)));
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {bad, "corrupt JPEG"});
}

TEST(TinyImageNetTest, WrongSizeUnknownWnidAndMissingParts) {
  TempDir dir;
  write_tiny(dir);
  const std::string small = dir.file("val/images/val_1.JPEG");
  write_two_colour_jpeg(small, kRed, kGreen, 32);
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {small, "image is 32x32, expected 64x64"});
  write_gray_jpeg(small, 3);

  const std::string ann_path = dir.file("val/val_annotations.txt");
  const std::string ann = "val_0.JPEG\tn03\t0\t0\t63\t63\nval_1.JPEG\tn99\t1\t2\t30\t40\n";
  write_file(ann_path, Bytes(ann.begin(), ann.end()));
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {ann_path, "unknown wnid n99 at line 2"});
  const std::string ann2 = "val_0.JPEG\tn03\t0\t0\t63\t63\nval_7.JPEG\tn01\t1\t2\t30\t40\n";
  write_file(ann_path, Bytes(ann2.begin(), ann2.end()));
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {dir.file("val/images/val_7.JPEG"), "not found"});

  fs::remove_all(dir.file("train/n02"));
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {dir.file("train/n02/images"), "not found"});
  fs::remove(dir.file("wnids.txt"));
  expect_data_error([&] { load_tiny_imagenet(dir.str()); }, {dir.file("wnids.txt"), "not found"});
  expect_data_error([&] { load_tiny_imagenet(dir.file("missing")); }, {dir.file("missing"), "not found"});
}

// =====================================================================================================
// Synthetic and dispatch
// =====================================================================================================

TEST(SyntheticTest, DeterministicInSeed) {
  SyntheticOptions o;
  o.train_size = 300;
  o.test_size = 100;
  o.seed = 5;
  const DatasetSplit a = make_synthetic(o), b = make_synthetic(o);
  o.seed = 6;
  const DatasetSplit c = make_synthetic(o);
  ASSERT_EQ(a.train.images.sizes(), (std::vector<int64_t>{300, 1, 28, 28}));
  ASSERT_EQ(a.test.images.sizes(), (std::vector<int64_t>{100, 1, 28, 28}));
  EXPECT_TRUE(torch::equal(a.train.images, b.train.images));
  EXPECT_TRUE(torch::equal(a.test.labels, b.test.labels));
  EXPECT_FALSE(torch::equal(a.train.images, c.train.images));
  EXPECT_GE(a.train.labels.min().item<int64_t>(), 0);
  EXPECT_LT(a.train.labels.max().item<int64_t>(), 10);
  EXPECT_EQ(torch::bincount(a.train.labels).size(0), 10);  // every class present
  EXPECT_EQ(a.train.name, "synthetic/train");
  // Statistics computed from the training images.
  const auto x = a.train.images.to(torch::kFloat64) / 255.0;
  EXPECT_NEAR(a.train.mean[0], x.mean().item<double>(), 1e-5);
  EXPECT_NEAR(a.train.std[0], x.std(false).item<double>(), 1e-5);
  EXPECT_EQ(a.test.mean, a.train.mean);
  // load_dataset passes the seed.
  const DatasetSplit d = load_dataset("synthetic", "", 5);
  o.seed = 5;
  o.train_size = 2048;
  o.test_size = 512;
  EXPECT_TRUE(torch::equal(d.train.images, make_synthetic(o).train.images));
}

TEST(SyntheticTest, LearnableByALinearModel) {
  SyntheticOptions o;
  o.channels = 3;
  o.height = 16;
  o.width = 16;
  o.seed = 11;
  const DatasetSplit s = make_synthetic(o);
  // Nearest class mean (a linear classifier) trained on train, evaluated on test.
  const auto xtr = s.train.images.reshape({s.train.size(), -1}).to(torch::kFloat32) / 255.0;
  const auto xte = s.test.images.reshape({s.test.size(), -1}).to(torch::kFloat32) / 255.0;
  auto means = torch::zeros({10, xtr.size(1)});
  for (int64_t k = 0; k < 10; ++k) means[k] = xtr.index({s.train.labels == k}).mean(0);
  const auto scores = xte.matmul(means.t()) - 0.5 * (means * means).sum(1);
  const double acc = (scores.argmax(1) == s.test.labels).to(torch::kFloat64).mean().item<double>();
  std::printf("[ info     ] synthetic nearest-mean test accuracy %.3f (chance 0.1)\n", acc);
  EXPECT_GT(acc, 0.5);
}

TEST(PipelineTest, LoadDatasetDispatchAndErrors) {
  EXPECT_EQ(dataset_names(),
            (std::vector<std::string>{"fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet", "synthetic"}));
  expect_data_error([] { load_dataset("imagenet-21k", "/tmp"); },
                    {"imagenet-21k", "fashion-mnist", "mnist", "cifar10", "cifar100", "tiny-imagenet", "synthetic"});
  EXPECT_EQ(default_data_dir("cifar10"), "");
  expect_data_error([] { load_dataset("cifar10", ""); }, {"cifar10", "no data directory"});
  TempDir dir;
  expect_data_error([&] { load_dataset("cifar100", dir.file("nothing")); }, {dir.file("nothing")});
  expect_data_error([&] { load_dataset("tiny-imagenet", dir.file("nothing")); }, {dir.file("nothing")});
  EXPECT_EQ(load_dataset("synthetic", "").train.size(), 2048);
}

TEST(PipelineTest, AugmentPresetsByName) {
  const AugmentOptions none = augment_preset("none");
  EXPECT_FALSE(none.random_crop || none.horizontal_flip || none.max_rotation_deg != 0);
  const AugmentOptions flip = augment_preset("flip");
  EXPECT_TRUE(flip.horizontal_flip && !flip.random_crop);
  const AugmentOptions crop_flip = augment_preset("crop-flip");
  EXPECT_TRUE(crop_flip.horizontal_flip && crop_flip.random_crop && crop_flip.max_rotation_deg == 0);
  EXPECT_EQ(augment_preset("paper").max_rotation_deg, 15.0);
  EXPECT_TRUE(augment_preset("auto", "cifar10").random_crop);
  EXPECT_TRUE(augment_preset("auto", "tiny-imagenet").random_crop);
  EXPECT_FALSE(augment_preset("auto", "fashion-mnist").horizontal_flip);
  try {
    augment_preset("mixup");
    ADD_FAILURE() << "unknown preset accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("mixup"), std::string::npos);
  }
}

// =====================================================================================================
// Loader
// =====================================================================================================

TEST(LoaderTest, BatchCountsWithAndWithoutDropLast) {
  const ImageDataset d = toy_dataset(10, 1, 4, 4);
  LoaderOptions o = plain_options(4);
  for (int64_t workers : {0, 1, 2}) {
    o.workers = workers;
    o.drop_last = false;
    BatchLoader keep(d, o);
    EXPECT_EQ(keep.batches_per_epoch(), 3);
    auto batches = whole_epoch(keep, 0);
    ASSERT_EQ(batches.size(), 3u);
    EXPECT_EQ(batches[0].images.size(0), 4);
    EXPECT_EQ(batches[2].images.size(0), 2);
    EXPECT_EQ(batches[2].index, 2);
    Batch extra;
    EXPECT_FALSE(keep.next(extra));
    o.drop_last = true;
    BatchLoader drop(d, o);
    EXPECT_EQ(drop.batches_per_epoch(), 2);
    batches = whole_epoch(drop, 0);
    ASSERT_EQ(batches.size(), 2u);
    EXPECT_EQ(batches[1].images.size(0), 4);
  }
  // An exact multiple: no partial batch either way.
  const ImageDataset e = toy_dataset(8, 1, 4, 4);
  o.drop_last = false;
  EXPECT_EQ(BatchLoader(e, o).batches_per_epoch(), 2);
}

TEST(LoaderTest, IdentityWithoutAugmentationIsExactlyPixelsOver255) {
  const ImageDataset d = toy_dataset(23, 3, 5, 7);
  LoaderOptions o = plain_options(8);
  BatchLoader loader(d, o);
  const auto batches = whole_epoch(loader, 0);
  ASSERT_EQ(batches.size(), 3u);
  const auto all = torch::cat({batches[0].images, batches[1].images, batches[2].images});
  EXPECT_EQ(all.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(all.is_contiguous());
  EXPECT_TRUE(torch::equal(all, d.images.to(torch::kFloat32) / 255));
  EXPECT_TRUE(torch::equal(torch::cat({batches[0].labels, batches[1].labels, batches[2].labels}), d.labels));
  EXPECT_EQ(batches[0].labels.scalar_type(), torch::kInt64);

  // Normalised: (x / 255 - mean) / std per channel.
  o.augment.normalize = true;
  BatchLoader norm(d, o);
  const auto nb = whole_epoch(norm, 0);
  const auto got = torch::cat({nb[0].images, nb[1].images, nb[2].images});
  const auto mean = torch::tensor(d.mean).view({1, 3, 1, 1});
  const auto sd = torch::tensor(d.std).view({1, 3, 1, 1});
  EXPECT_TRUE(torch::allclose(got, (d.images.to(torch::kFloat32) / 255 - mean) / sd, 1e-5, 1e-5));
}

TEST(LoaderTest, EpochOrderIsAPermutationDeterminedBySeedAndEpoch) {
  const ImageDataset d = toy_dataset(100, 1, 2, 2);
  LoaderOptions o = plain_options(16);
  o.shuffle = true;
  o.seed = 42;
  BatchLoader a(d, o), b(d, o);
  const auto e0 = a.epoch_order(0), e1 = a.epoch_order(1);
  std::vector<int64_t> sorted = e0;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 100; ++i) EXPECT_EQ(sorted[static_cast<size_t>(i)], i);
  EXPECT_EQ(e0, a.epoch_order(0));
  EXPECT_EQ(e0, b.epoch_order(0));
  EXPECT_EQ(e1, b.epoch_order(1));
  EXPECT_NE(e0, e1);
  std::vector<int64_t> identity(100);
  for (int64_t i = 0; i < 100; ++i) identity[static_cast<size_t>(i)] = i;
  EXPECT_NE(e0, identity);
  o.seed = 43;
  EXPECT_NE(BatchLoader(d, o).epoch_order(0), e0);
  o.shuffle = false;
  EXPECT_EQ(BatchLoader(d, o).epoch_order(3), identity);

  // Batches follow the order.
  const auto batches = whole_epoch(a, 1);
  for (size_t k = 0; k < batches.size(); ++k)
    for (int64_t j = 0; j < batches[k].labels.size(0); ++j) {
      const int64_t sample = e1[k * 16 + static_cast<size_t>(j)];
      EXPECT_EQ(batches[k].labels[j].item<int64_t>(), d.labels[sample].item<int64_t>());
      EXPECT_TRUE(torch::equal(batches[k].images[j], d.images[sample].to(torch::kFloat32) / 255));
    }
}

TEST(LoaderTest, IdenticalAcrossWorkerCounts) {
  const ImageDataset d = toy_dataset(70, 3, 12, 12);
  LoaderOptions o;
  o.batch_size = 16;
  o.seed = 9;
  o.augment = all_augmentation();
  std::vector<std::vector<Batch>> runs;
  for (int64_t workers : {0, 1, 3}) {
    o.workers = workers;
    o.prefetch = workers == 3 ? 4 : 2;
    BatchLoader loader(d, o);
    runs.push_back(whole_epoch(loader, 2));
  }
  for (size_t r = 1; r < runs.size(); ++r) {
    ASSERT_EQ(runs[r].size(), runs[0].size());
    for (size_t k = 0; k < runs[0].size(); ++k) {
      EXPECT_EQ(runs[r][k].index, static_cast<int64_t>(k));
      EXPECT_TRUE(torch::equal(runs[r][k].images, runs[0][k].images)) << "run " << r << " batch " << k;
      EXPECT_TRUE(torch::equal(runs[r][k].labels, runs[0][k].labels));
    }
  }
  // Augmentation differs between epochs (same loader, next epoch).
  o.workers = 1;
  BatchLoader loader(d, o);
  const auto e3 = whole_epoch(loader, 3);
  EXPECT_FALSE(torch::equal(e3[0].images, runs[0][0].images));
}

TEST(LoaderTest, ShardsOfWorldConcatenateToTheGlobalBatch) {
  const ImageDataset d = toy_dataset(37, 1, 10, 10);
  LoaderOptions o;
  o.batch_size = 8;
  o.seed = 3;
  o.augment = all_augmentation();
  BatchLoader global(d, o);
  const auto g = whole_epoch(global, 1);
  ASSERT_EQ(g.size(), 5u);  // 4 full + 5 left
  for (int64_t world : {2, 4}) {
    std::vector<std::vector<Batch>> shards;
    for (int64_t rank = 0; rank < world; ++rank) {
      LoaderOptions r = o;
      r.world = world;
      r.rank = rank;
      r.workers = 1 + rank % 2;
      BatchLoader loader(d, r);
      EXPECT_EQ(loader.batches_per_epoch(), 5);
      shards.push_back(whole_epoch(loader, 1));
      ASSERT_EQ(shards.back().size(), 5u);
    }
    for (size_t k = 0; k < 5; ++k) {
      std::vector<torch::Tensor> images, labels;
      for (int64_t rank = 0; rank < world; ++rank) {
        images.push_back(shards[static_cast<size_t>(rank)][k].images);
        labels.push_back(shards[static_cast<size_t>(rank)][k].labels);
      }
      EXPECT_TRUE(torch::equal(torch::cat(images), g[k].images)) << "world " << world << " batch " << k;
      EXPECT_TRUE(torch::equal(torch::cat(labels), g[k].labels));
    }
    // The last, partial batch of 5 is split as evenly as possible, first shards bigger.
    if (world == 2) {
      EXPECT_EQ(shards[0][4].images.size(0), 3);
      EXPECT_EQ(shards[1][4].images.size(0), 2);
      EXPECT_EQ(shards[1][0].images.size(0), 4);
    } else {
      EXPECT_EQ(shards[0][4].images.size(0), 2);
      for (int64_t rank = 1; rank < 4; ++rank) EXPECT_EQ(shards[static_cast<size_t>(rank)][4].images.size(0), 1);
    }
  }
}

// Mixup and CutMix (timm's semantics): each image mixed with the image at the mirrored position of the global
// batch, lambda the weight of its own label; the same for any worker count and any rank split.
TEST(LoaderTest, MixupAndCutmixFollowTheirFormulasForAnyWorkersAndRanks) {
  const ImageDataset d = toy_dataset(37, 3, 10, 10);
  LoaderOptions plain;
  plain.batch_size = 8;
  plain.seed = 5;
  plain.augment.horizontal_flip = true;  // per-image augmentation, without the zero fill that makes equal pixels
  BatchLoader unmixed_loader(d, plain);
  const auto unmixed = whole_epoch(unmixed_loader, 1);
  int cutmix_batches = 0, mixup_batches = 0;
  for (const auto& [mixup, cutmix] : std::vector<std::pair<double, double>>{{0.2, 0}, {0, 1.0}, {0.4, 1.0}}) {
    SCOPED_TRACE("mixup " + std::to_string(mixup) + " cutmix " + std::to_string(cutmix));
    LoaderOptions o = plain;
    o.mix.mixup_alpha = mixup;
    o.mix.cutmix_alpha = cutmix;
    std::vector<std::vector<Batch>> runs;
    for (int64_t workers : {1, 2}) {
      o.workers = workers;
      BatchLoader loader(d, o);
      runs.push_back(whole_epoch(loader, 1));
    }
    const auto& g = runs[0];
    ASSERT_EQ(g.size(), unmixed.size());
    for (size_t k = 0; k < g.size(); ++k) {
      const Batch& b = g[k];
      EXPECT_TRUE(torch::equal(b.images, runs[1][k].images)) << "1 and 2 workers differ at batch " << k;
      EXPECT_EQ(b.mix_lambda, runs[1][k].mix_lambda);
      ASSERT_TRUE(b.mix_labels.defined());
      EXPECT_GE(b.mix_lambda, 0.0);
      EXPECT_LE(b.mix_lambda, 1.0);
      EXPECT_TRUE(torch::equal(b.labels, unmixed[k].labels));
      EXPECT_TRUE(torch::equal(b.mix_labels, unmixed[k].labels.flip(0))) << "the partner is the mirrored image";
      const auto own = unmixed[k].images, partner = unmixed[k].images.flip(0);
      if (b.cutmix) {
        ++cutmix_batches;
        EXPECT_GT(cutmix, 0);
        // Every pixel is its own or its partner's, and the partner's cover 1 - lambda of the image.
        const auto from_partner = b.images.eq(partner).logical_and(b.images.ne(own));
        EXPECT_TRUE(b.images.eq(own).logical_or(b.images.eq(partner)).all().item<bool>());
        const auto box = from_partner.any(0).any(0);  // [H, W] where any image took the partner's pixel
        EXPECT_NEAR(box.sum().item<int64_t>() / 100.0, 1 - b.mix_lambda, 1e-12) << "lambda is the kept area";
      } else {
        ++mixup_batches;
        EXPECT_GT(mixup, 0);
        const auto expected = own * static_cast<float>(b.mix_lambda) + partner * static_cast<float>(1 - b.mix_lambda);
        EXPECT_TRUE(torch::allclose(b.images, expected, 1e-6, 1e-6)) << "batch " << k;
      }
    }
    // Two ranks: their shards concatenate to the global batch, mixing included.
    std::vector<std::vector<Batch>> shards;
    for (int64_t rank = 0; rank < 2; ++rank) {
      LoaderOptions r = o;
      r.world = 2;
      r.rank = rank;
      BatchLoader loader(d, r);
      shards.push_back(whole_epoch(loader, 1));
    }
    for (size_t k = 0; k < g.size(); ++k) {
      EXPECT_TRUE(torch::equal(torch::cat({shards[0][k].images, shards[1][k].images}), g[k].images)) << k;
      EXPECT_TRUE(torch::equal(torch::cat({shards[0][k].mix_labels, shards[1][k].mix_labels}), g[k].mix_labels));
      EXPECT_EQ(shards[1][k].mix_lambda, g[k].mix_lambda);
    }
    // Another epoch draws other lambdas.
    BatchLoader again(d, o);
    EXPECT_NE(whole_epoch(again, 2)[0].mix_lambda, g[0].mix_lambda);
  }
  EXPECT_GT(cutmix_batches, 0);
  EXPECT_GT(mixup_batches, 0);
}

TEST(LoaderTest, InvalidOptionsThrow) {
  const ImageDataset d = toy_dataset(10, 1, 4, 4);
  LoaderOptions o = plain_options(10);
  o.world = 3;
  try {
    BatchLoader loader(d, o);
    ADD_FAILURE() << "batch 10 with world 3 accepted";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("batch_size 10"), std::string::npos) << msg;
    EXPECT_NE(msg.find("world 3"), std::string::npos) << msg;
  }
  o = plain_options(0);
  EXPECT_THROW(BatchLoader(d, o), std::invalid_argument);
  o = plain_options(4);
  o.world = 2;
  o.rank = 2;
  EXPECT_THROW(BatchLoader(d, o), std::invalid_argument);
  o = plain_options(4);
  o.augment.normalize = true;
  ImageDataset bad = d;
  bad.mean = {0.1f, 0.2f};
  EXPECT_THROW(BatchLoader(bad, o), std::invalid_argument);
  bad = d;
  bad.images = d.images.to(torch::kFloat32);
  EXPECT_THROW(BatchLoader(bad, o), std::invalid_argument);
  // next() before start_epoch().
  BatchLoader loader(d, plain_options(4));
  Batch b;
  EXPECT_THROW(loader.next(b), std::logic_error);
}

TEST(LoaderTest, HorizontalFlipMirrorsAboutHalfTheImages) {
  const ImageDataset d = toy_dataset(400, 2, 5, 6);
  LoaderOptions o = plain_options(64);
  o.augment.horizontal_flip = true;
  o.workers = 2;
  BatchLoader loader(d, o);
  const auto batches = whole_epoch(loader, 0);
  const auto x = d.images.to(torch::kFloat32) / 255;
  int flipped = 0, position = 0;
  for (const auto& b : batches)
    for (int64_t j = 0; j < b.images.size(0); ++j, ++position) {
      const auto plain = x[position];
      const auto mirror = plain.flip({2});  // [C, H, W]: mirror along x
      const bool is_plain = torch::equal(b.images[j], plain);
      const bool is_mirror = torch::equal(b.images[j], mirror);
      EXPECT_TRUE(is_plain || is_mirror) << "sample " << position << " is neither the image nor its mirror";
      flipped += is_mirror ? 1 : 0;
    }
  EXPECT_EQ(position, 400);
  EXPECT_GT(flipped, 150);
  EXPECT_LT(flipped, 250);
}

TEST(LoaderTest, RandomCropShiftsWithZeroPadding) {
  // Each pixel holds a distinct value 1 + y * 10 + x, so the shift of every output can be recovered.
  const int64_t n = 500, h = 10, w = 10, pad = 3;
  ImageDataset d = toy_dataset(n, 1, h, w);
  for (int64_t y = 0; y < h; ++y)
    for (int64_t x = 0; x < w; ++x) d.images.select(2, y).select(2, x).fill_(1 + y * w + x);
  LoaderOptions o = plain_options(100);
  o.augment.random_crop = true;
  o.augment.crop_padding = pad;
  BatchLoader loader(d, o);
  const auto batches = whole_epoch(loader, 0);
  std::set<std::pair<int64_t, int64_t>> shifts;
  for (const auto& b : batches)
    for (int64_t j = 0; j < b.images.size(0); ++j) {
      const auto out_t = (b.images[j][0] * 255).round().to(torch::kInt64).contiguous();
      const auto out = out_t.accessor<int64_t, 2>();
      int matches = 0;
      for (int64_t dy = -pad; dy <= pad; ++dy)
        for (int64_t dx = -pad; dx <= pad; ++dx) {
          bool ok = true;
          for (int64_t y = 0; y < h && ok; ++y)
            for (int64_t x = 0; x < w && ok; ++x) {
              const int64_t sy = y + dy, sx = x + dx;
              const int64_t expect = (sy >= 0 && sy < h && sx >= 0 && sx < w) ? 1 + sy * w + sx : 0;
              ok = out[y][x] == expect;
            }
          if (ok) {
            ++matches;
            shifts.insert({dy, dx});
          }
        }
      EXPECT_EQ(matches, 1) << "output is not a zero-padded shift of the input";
    }
  // Every shift in [-3, 3]^2 is possible; nearly all of the 49 show up in 500 samples.
  EXPECT_GE(shifts.size(), 40u);
  EXPECT_TRUE(shifts.count({-pad, -pad}) + shifts.count({pad, pad}) + shifts.count({pad, -pad}) +
              shifts.count({-pad, pad}) >= 1);  // the extreme shifts are reached
}

TEST(LoaderTest, RotationIsRigidAboutTheCentre) {
  // A 31x31 image, centre (15, 15), with one bright pixel 10 to the right of the centre. After a rotation
  // by a, the output's brightness centroid lies at distance 10 from the centre at angle a.
  const int64_t n = 200, s = 31;
  ImageDataset d = toy_dataset(n, 1, s, s);
  d.images.zero_();
  d.images.select(2, 15).select(2, 25).fill_(255);
  LoaderOptions o = plain_options(50);
  o.augment.max_rotation_deg = 30;
  o.workers = 2;
  BatchLoader loader(d, o);
  const auto batches = whole_epoch(loader, 0);
  const auto grid = torch::arange(s, torch::kFloat64);
  double lo = 1e9, hi = -1e9;
  int rotated = 0;
  for (const auto& b : batches)
    for (int64_t j = 0; j < b.images.size(0); ++j) {
      const auto img = b.images[j][0].to(torch::kFloat64);
      const double mass = img.sum().item<double>();
      ASSERT_GT(mass, 0.5);
      const double cx = (img.sum(0) * grid).sum().item<double>() / mass - 15;
      const double cy = (img.sum(1) * grid).sum().item<double>() / mass - 15;
      EXPECT_NEAR(std::hypot(cx, cy), 10.0, 0.35);
      const double angle = std::atan2(-cy, cx) * 180 / 3.14159265358979323846;  // counter-clockwise on screen (y down)
      EXPECT_LE(std::abs(angle), 31.5);
      lo = std::min(lo, angle);
      hi = std::max(hi, angle);
      rotated += std::abs(angle) > 1 ? 1 : 0;
      EXPECT_GE(img.min().item<double>(), 0.0);
    }
  EXPECT_LT(lo, -20);
  EXPECT_GT(hi, 20);
  EXPECT_GT(rotated, 150);

  // A uniform image stays uniform inside the inscribed circle; the centre pixel is exact; corners are
  // zero-filled when the rotation is large enough.
  d.images.fill_(200);
  BatchLoader flat(d, o);
  const auto fb = whole_epoch(flat, 0);
  int zero_corners = 0;
  for (const auto& b : fb)
    for (int64_t j = 0; j < b.images.size(0); ++j) {
      const auto img_t = b.images[j][0].contiguous();
      const auto img = img_t.accessor<float, 2>();
      EXPECT_FLOAT_EQ(img[15][15], 200.0f / 255.0f);
      for (int64_t y = 0; y < s; ++y)
        for (int64_t x = 0; x < s; ++x)
          if (std::hypot(x - 15.0, y - 15.0) <= 13.5) {
            ASSERT_NEAR(img[y][x], 200.0f / 255.0f, 1e-5);
          }
      zero_corners += img[0][0] == 0.0f ? 1 : 0;
    }
  EXPECT_GT(zero_corners, 100);
}

TEST(LoaderTest, WorkerExceptionIsRethrownFromNext) {
  ImageDataset d = toy_dataset(40, 1, 4, 4);
  LoaderOptions o = plain_options(8);
  o.workers = 3;
  o.prefetch = 3;
  {
    BatchLoader loader(d, o);
    d.labels[21] = 99;  // corrupted after construction (before any worker runs): found in batch 2
    loader.start_epoch(0);
    Batch b;
    ASSERT_TRUE(loader.next(b));
    ASSERT_TRUE(loader.next(b));
    EXPECT_EQ(b.index, 1);
    for (int attempt = 0; attempt < 2; ++attempt) {
      try {
        loader.next(b);
        ADD_FAILURE() << "the worker's failure was not reported";
      } catch (const std::out_of_range& e) {
        EXPECT_NE(std::string(e.what()).find("label 99"), std::string::npos) << e.what();
      }
    }
  }  // destroyed with the epoch unfinished: joins its workers
  d.labels[21] = 1;
  BatchLoader loader(d, o);
  EXPECT_EQ(whole_epoch(loader, 1).size(), 5u);
  loader.start_epoch(2);
  Batch b;
  ASSERT_TRUE(loader.next(b));  // destroyed mid-epoch again
}

TEST(LoaderTest, RestartingAnEpochMidway) {
  const ImageDataset d = toy_dataset(100, 1, 8, 8);
  LoaderOptions o;
  o.batch_size = 10;
  o.augment = all_augmentation();
  o.workers = 2;
  o.prefetch = 3;
  BatchLoader reference(d, o);
  const auto e0 = whole_epoch(reference, 0);
  const auto e1 = whole_epoch(reference, 1);
  BatchLoader loader(d, o);
  loader.start_epoch(0);
  Batch b;
  ASSERT_TRUE(loader.next(b));
  ASSERT_TRUE(loader.next(b));
  EXPECT_TRUE(torch::equal(b.images, e0[1].images));
  // Abandon epoch 0 after two batches, run epoch 1 fully, then epoch 0 again from the start.
  const auto again1 = whole_epoch(loader, 1);
  ASSERT_EQ(again1.size(), e1.size());
  for (size_t k = 0; k < e1.size(); ++k) EXPECT_TRUE(torch::equal(again1[k].images, e1[k].images));
  loader.start_epoch(0);
  for (size_t k = 0; k < 3; ++k) {
    ASSERT_TRUE(loader.next(b));
    EXPECT_EQ(b.index, static_cast<int64_t>(k));
    EXPECT_TRUE(torch::equal(b.images, e0[k].images));
  }
  loader.start_epoch(0);  // restart before finishing, many times in a row
  loader.start_epoch(0);
  EXPECT_EQ(whole_epoch(loader, 0).size(), 10u);
  EXPECT_GE(loader.wait_seconds(), 0.0);
}

TEST(PipelineTest, ThroughputFashionMnistSize) {
  SyntheticOptions so;
  so.train_size = 30000;
  so.test_size = 0;
  const DatasetSplit s = make_synthetic(so);
  LoaderOptions o;
  o.batch_size = 256;
  o.augment.random_crop = true;
  o.augment.crop_padding = 4;
  o.augment.horizontal_flip = true;
  o.augment.max_rotation_deg = 15;
  o.prefetch = 4;
  for (int64_t workers : {0, 1, 2}) {
    o.workers = workers;
    BatchLoader loader(s.train, o);
    const auto t0 = std::chrono::steady_clock::now();
    const std::clock_t c0 = std::clock();
    loader.start_epoch(0);
    Batch b;
    int64_t images = 0;
    double checksum = 0;
    while (loader.next(b)) {
      images += b.images.size(0);
      checksum += b.images[0][0][14][14].item<float>();
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;  // all threads of the process
    EXPECT_EQ(images, 30000);
    EXPECT_TRUE(std::isfinite(checksum));
    std::printf(
        "[ info     ] pipeline 28x28 crop+flip+rotate, %ld worker(s)%s: %.0f images/s (%.3f s wall, %.3f s cpu, "
        "consumer waited %.3f s)\n",
        static_cast<long>(workers), workers == 0 ? " (in the caller)" : "", images / secs, secs, cpu,
        loader.wait_seconds());
  }
}
