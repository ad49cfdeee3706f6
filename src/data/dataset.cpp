// Readers for the image classification data sets (IDX, CIFAR binary, Tiny-ImageNet JPEG) and the
// synthetic data set. Everything is read into uint8 [N, C, H, W] tensors; every error is a DataError
// whose message starts with the offending path.
#include <largebatch/data/dataset.h>

#include "readers.h"

#include <torch/torch.h>

#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include <jpeglib.h>  // after <cstdio>: it uses FILE and size_t
#include <jerror.h>

namespace largebatch {
namespace data {

namespace fs = std::filesystem;

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) { throw DataError(path + ": " + what); }

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

std::string range_error(const std::string& what, int64_t value, int64_t limit, int64_t record) {
  return what + " " + std::to_string(value) + " out of range [0, " + std::to_string(limit) + ") at record " +
         std::to_string(record);
}

void require_directory(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) fail(dir, fs::exists(dir, ec) ? "not a directory" : "data directory not found");
}

// --- normalisation statistics --------------------------------------------------------------------

struct Stats {
  std::vector<float> mean, std;
};

const std::unordered_map<std::string, Stats>& known_stats() {
  static const std::unordered_map<std::string, Stats> stats = {
      {"fashion-mnist", {{0.2860f}, {0.3530f}}},
      {"mnist", {{0.1307f}, {0.3081f}}},
      {"cifar10", {{0.4914f, 0.4822f, 0.4465f}, {0.2470f, 0.2435f, 0.2616f}}},
      {"cifar100", {{0.5071f, 0.4865f, 0.4409f}, {0.2673f, 0.2564f, 0.2762f}}},
      {"tiny-imagenet", {{0.4802f, 0.4481f, 0.3975f}, {0.2770f, 0.2691f, 0.2821f}}},
  };
  return stats;
}

// Per-channel mean and standard deviation of pixel / 255 over all images.
Stats compute_stats(const torch::Tensor& images) {
  const int64_t n = images.size(0), c = images.size(1), hw = images.size(2) * images.size(3);
  const uint8_t* p = images.data_ptr<uint8_t>();
  Stats s;
  for (int64_t ch = 0; ch < c; ++ch) {
    uint64_t hist[256] = {};
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t* q = p + (i * c + ch) * hw;
      for (int64_t k = 0; k < hw; ++k) ++hist[q[k]];
    }
    double count = 0, sum = 0, sum2 = 0;
    for (int v = 0; v < 256; ++v) {
      const double x = v / 255.0;
      count += static_cast<double>(hist[v]);
      sum += static_cast<double>(hist[v]) * x;
      sum2 += static_cast<double>(hist[v]) * x * x;
    }
    const double mean = count > 0 ? sum / count : 0.0;
    const double var = count > 0 ? std::max(0.0, sum2 / count - mean * mean) : 0.0;
    s.mean.push_back(static_cast<float>(mean));
    s.std.push_back(static_cast<float>(var > 0 ? std::sqrt(var) : 1.0));
  }
  return s;
}

void set_stats(ImageDataset& d, const std::string& base, const torch::Tensor& stats_source) {
  const auto& known = known_stats();
  auto it = known.find(base);
  if (it != known.end() && static_cast<int64_t>(it->second.mean.size()) == d.channels()) {
    d.mean = it->second.mean;
    d.std = it->second.std;
  } else {
    Stats s = compute_stats(stats_source);
    d.mean = s.mean;
    d.std = s.std;
  }
}

// --- IDX -------------------------------------------------------------------------------------------

// Reads raw or gzip files through zlib (gzread passes non-gzip files through unchanged).
class GzFile {
 public:
  explicit GzFile(const std::string& path) : path_(path) {
    std::error_code ec;
    if (!fs::exists(path, ec)) fail(path, "file not found");
    if (fs::is_directory(path, ec)) fail(path, "is a directory, expected a file");
    // Remember how it is stored, by its first bytes (the gzip magic 1f 8b), for messages.
    if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
      unsigned char magic[2] = {0, 0};
      gzip_ = std::fread(magic, 1, 2, f) == 2 && magic[0] == 0x1f && magic[1] == 0x8b;
      std::fclose(f);
    } else {
      fail(path, std::string("cannot open: ") + std::strerror(errno));
    }
    file_ = gzopen(path.c_str(), "rb");
    if (!file_) fail(path, std::string("cannot open: ") + std::strerror(errno));
    gzbuffer(file_, 1 << 17);
  }
  ~GzFile() {
    if (file_) gzclose(file_);
  }
  GzFile(const GzFile&) = delete;
  GzFile& operator=(const GzFile&) = delete;

  // Reads up to n bytes; fewer only at the end of the data. Throws on a damaged gzip stream.
  uint64_t read(void* buffer, uint64_t n) {
    uint64_t done = 0;
    auto* out = static_cast<unsigned char*>(buffer);
    while (done < n) {
      const unsigned chunk = static_cast<unsigned>(std::min<uint64_t>(n - done, 1u << 30));
      const int got = gzread(file_, out + done, chunk);
      if (got < 0) damaged();
      done += static_cast<uint64_t>(got);
      if (static_cast<unsigned>(got) < chunk) {
        int err = Z_OK;
        gzerror(file_, &err);
        if (err != Z_OK && err != Z_STREAM_END) damaged();
        break;
      }
    }
    return done;
  }

  // Counts the bytes left (used to report trailing data).
  uint64_t skip_rest() {
    std::vector<unsigned char> buf(1 << 16);
    uint64_t total = 0;
    for (;;) {
      const uint64_t got = read(buf.data(), buf.size());
      total += got;
      if (got < buf.size()) return total;
    }
  }

  bool gzip() const { return gzip_; }

 private:
  [[noreturn]] void damaged() {
    int err = Z_OK;
    const char* msg = gzerror(file_, &err);
    fail(path_, std::string(gzip_ ? "corrupt gzip data: " : "read error: ") + (msg ? msg : "unknown error"));
  }

  std::string path_;
  gzFile file_ = nullptr;
  bool gzip_ = false;
};

uint32_t big_endian(const unsigned char* b) {
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

// Reads an IDX file of unsigned bytes with `dims` dimensions; returns the dimensions and the data.
std::vector<uint8_t> read_idx_file(const std::string& path, int dims, std::vector<uint32_t>& shape) {
  GzFile file(path);
  const uint64_t header_bytes = 4 + 4 * static_cast<uint64_t>(dims);
  unsigned char header[16];
  const uint64_t got_header = file.read(header, 4);
  const std::string what = dims == 3 ? "images" : "labels";
  if (got_header < 4)
    fail(path, "truncated: expected at least " + std::to_string(header_bytes) + " bytes, found " +
                   std::to_string(got_header));
  const uint32_t magic = big_endian(header);
  const uint32_t expected_magic = 0x00000800u | static_cast<uint32_t>(dims);
  if (magic != expected_magic) {
    std::string detail;
    if ((magic & 0xffffff00u) == 0x00000800u)
      detail = " (" + std::to_string(magic & 0xffu) + " dimensions, expected " + std::to_string(dims) + ")";
    else if ((magic >> 8) != 0x08u)
      detail = " (not an unsigned-byte IDX " + what + " file)";
    fail(path, "magic number " + hex32(magic) + ", expected " + hex32(expected_magic) + detail);
  }
  const uint64_t got_dims = file.read(header + 4, 4 * static_cast<uint64_t>(dims));
  if (got_dims < 4 * static_cast<uint64_t>(dims))
    fail(path, "truncated: expected at least " + std::to_string(header_bytes) + " bytes, found " +
                   std::to_string(4 + got_dims));
  shape.clear();
  uint64_t payload = 1;
  for (int d = 0; d < dims; ++d) {
    const uint32_t v = big_endian(header + 4 + 4 * d);
    if (d > 0 && (v == 0 || v > 65536))
      fail(path, "dimension " + std::to_string(d) + " is " + std::to_string(v) + ", expected 1..65536");
    shape.push_back(v);
    payload *= v;  // at most 2^32 * 2^16 * 2^16 = 2^64 would overflow: bounded below
    if (payload > (uint64_t{1} << 40)) fail(path, "header promises an implausible " + std::to_string(payload) + "+ bytes");
  }
  const uint64_t expected = header_bytes + payload;
  std::vector<uint8_t> data;
  // Grow as the data arrives (doubling, from 64 KiB), so that a lying header cannot force a huge allocation.
  uint64_t have = 0;
  while (have < payload) {
    const uint64_t chunk = std::min<uint64_t>({payload - have, std::max<uint64_t>(have, uint64_t{1} << 16), uint64_t{1} << 24});
    data.resize(static_cast<size_t>(have + chunk));
    const uint64_t got = file.read(data.data() + have, chunk);
    have += got;
    if (got < chunk)
      fail(path, "truncated: expected " + std::to_string(expected) + " bytes, found " +
                     std::to_string(header_bytes + have));
  }
  const uint64_t extra = file.skip_rest();
  if (extra > 0)
    fail(path, "trailing data: expected " + std::to_string(expected) + " bytes, found " +
                   std::to_string(expected + extra));
  return data;
}

// Finds base or base.gz in dir.
std::string find_idx(const std::string& dir, const std::string& base) {
  std::error_code ec;
  const fs::path raw = fs::path(dir) / base;
  if (fs::is_regular_file(raw, ec)) return raw.string();
  const fs::path gz = fs::path(dir) / (base + ".gz");
  if (fs::is_regular_file(gz, ec)) return gz.string();
  fail(raw.string(), "file not found (nor " + gz.string() + ")");
}

std::string base_name(const std::string& name) {
  const auto slash = name.find('/');
  return slash == std::string::npos ? name : name.substr(0, slash);
}

// --- whole files -----------------------------------------------------------------------------------

std::vector<uint8_t> read_file(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) fail(path, "file not found");
  if (fs::is_directory(path, ec)) fail(path, "is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path, std::string("cannot open: ") + std::strerror(errno));
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  if (size < 0) fail(path, "cannot determine the file size");
  in.seekg(0, std::ios::beg);
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size)) fail(path, "read error");
  return bytes;
}

// --- CIFAR -----------------------------------------------------------------------------------------

constexpr int64_t kCifarPixels = 3 * 32 * 32;

// Appends the records of one CIFAR binary file. label_bytes = 1 (CIFAR-10) or 2 (CIFAR-100, coarse + fine).
void read_cifar_file(const std::string& path, int label_bytes, std::vector<uint8_t>& pixels,
                     std::vector<int64_t>& labels) {
  const std::vector<uint8_t> bytes = read_file(path);
  const int64_t record = label_bytes + kCifarPixels;
  const int64_t size = static_cast<int64_t>(bytes.size());
  if (size == 0) fail(path, "empty file, expected records of " + std::to_string(record) + " bytes");
  if (size % record != 0)
    fail(path, "size " + std::to_string(size) + " bytes is not a multiple of the " + std::to_string(record) +
                   "-byte record (" + std::to_string(size / record) + " records + " + std::to_string(size % record) +
                   " bytes)");
  const int64_t n = size / record;
  const size_t old_pixels = pixels.size();
  pixels.resize(old_pixels + static_cast<size_t>(n * kCifarPixels));
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* r = bytes.data() + i * record;
    int64_t label = r[0];
    if (label_bytes == 2) {
      if (r[0] >= 20) fail(path, range_error("coarse label", r[0], 20, i));
      label = r[1];
      if (label >= 100) fail(path, range_error("fine label", label, 100, i));
    } else if (label >= 10) {
      fail(path, range_error("label", label, 10, i));
    }
    labels.push_back(label);
    std::memcpy(pixels.data() + old_pixels + i * kCifarPixels, r + label_bytes, kCifarPixels);
  }
}

ImageDataset make_dataset(const std::string& name, const std::vector<uint8_t>& pixels,
                          const std::vector<int64_t>& labels, int64_t c, int64_t h, int64_t w, int64_t classes) {
  ImageDataset d;
  d.name = name;
  const int64_t n = static_cast<int64_t>(labels.size());
  d.images = torch::empty({n, c, h, w}, torch::kUInt8);
  if (!pixels.empty()) std::memcpy(d.images.data_ptr<uint8_t>(), pixels.data(), pixels.size());
  d.labels = torch::empty({n}, torch::kInt64);
  if (n > 0) std::memcpy(d.labels.data_ptr<int64_t>(), labels.data(), labels.size() * sizeof(int64_t));
  d.num_classes = classes;
  return d;
}

DatasetSplit load_cifar(const std::string& dir, const std::string& name, const std::vector<std::string>& train_files,
                        const std::string& test_file, int label_bytes, int64_t classes) {
  require_directory(dir);
  DatasetSplit split;
  std::vector<uint8_t> pixels;
  std::vector<int64_t> labels;
  for (const auto& f : train_files) read_cifar_file((fs::path(dir) / f).string(), label_bytes, pixels, labels);
  split.train = make_dataset(name + "/train", pixels, labels, 3, 32, 32, classes);
  pixels.clear();
  labels.clear();
  read_cifar_file((fs::path(dir) / test_file).string(), label_bytes, pixels, labels);
  split.test = make_dataset(name + "/test", pixels, labels, 3, 32, 32, classes);
  set_stats(split.train, name, split.train.images);
  set_stats(split.test, name, split.train.images);
  return split;
}

// --- JPEG ------------------------------------------------------------------------------------------

constexpr int kTinySize = 64;

struct JpegErrorManager {
  jpeg_error_mgr pub;  // first member: libjpeg sees a jpeg_error_mgr*
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

extern "C" void jpeg_error_exit_longjmp(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// Corrupt-data warnings (level -1) are errors here: a damaged file must not become a grey image.
extern "C" void jpeg_emit_message_strict(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0) jpeg_error_exit_longjmp(cinfo);
}

enum class JpegResult { ok, error, bad_size };

// Decodes a JPEG of exactly 64x64 into planar RGB (out: 3 x 64 x 64). Plain C style: nothing with a
// destructor lives between setjmp and longjmp.
JpegResult decode_jpeg_64(const unsigned char* data, size_t size, uint8_t* out, int* width, int* height,
                          char* message) {
  jpeg_decompress_struct cinfo;
  JpegErrorManager err;
  cinfo.err = jpeg_std_error(&err.pub);
  err.pub.error_exit = jpeg_error_exit_longjmp;
  err.pub.emit_message = jpeg_emit_message_strict;
  err.message[0] = '\0';
  if (setjmp(err.jump)) {
    std::snprintf(message, JMSG_LENGTH_MAX, "%s", err.message);
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::error;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&cinfo, TRUE);
  *width = static_cast<int>(cinfo.image_width);
  *height = static_cast<int>(cinfo.image_height);
  if (cinfo.image_width != kTinySize || cinfo.image_height != kTinySize) {
    jpeg_destroy_decompress(&cinfo);
    return JpegResult::bad_size;
  }
  const bool gray = cinfo.jpeg_color_space == JCS_GRAYSCALE;
  cinfo.out_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_start_decompress(&cinfo);
  unsigned char row[kTinySize * 3];
  const int comps = cinfo.output_components;
  constexpr int plane = kTinySize * kTinySize;
  while (cinfo.output_scanline < cinfo.output_height) {
    const int y = static_cast<int>(cinfo.output_scanline);
    JSAMPROW rows[1] = {row};
    jpeg_read_scanlines(&cinfo, rows, 1);
    uint8_t* r = out + y * kTinySize;
    if (comps == 1) {
      for (int x = 0; x < kTinySize; ++x) r[x] = r[plane + x] = r[2 * plane + x] = row[x];
    } else {
      for (int x = 0; x < kTinySize; ++x) {
        r[x] = row[3 * x];
        r[plane + x] = row[3 * x + 1];
        r[2 * plane + x] = row[3 * x + 2];
      }
    }
  }
  jpeg_finish_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return JpegResult::ok;
}

void decode_tiny_image(const std::string& path, uint8_t* out) {
  const std::vector<uint8_t> bytes = read_file(path);
  if (bytes.empty()) fail(path, "empty file, expected a JPEG image");
  char message[JMSG_LENGTH_MAX] = {};
  int width = 0, height = 0;
  switch (decode_jpeg_64(bytes.data(), bytes.size(), out, &width, &height, message)) {
    case JpegResult::ok:
      return;
    case JpegResult::bad_size:
      fail(path, "image is " + std::to_string(width) + "x" + std::to_string(height) + ", expected 64x64");
    case JpegResult::error:
      fail(path, std::string("corrupt JPEG: ") + message);
  }
}

// Decodes all files in parallel. Deterministic: the reported error is the one of the first bad file.
void decode_all(const std::vector<std::string>& files, uint8_t* out) {
  const int64_t n = static_cast<int64_t>(files.size());
  const int64_t per_image = 3 * kTinySize * kTinySize;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> first_error{n};
  std::mutex error_mutex;
  std::string error_message;
  auto work = [&] {
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= n || i >= first_error.load()) return;
      try {
        decode_tiny_image(files[static_cast<size_t>(i)], out + i * per_image);
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (i < first_error.load()) {
          first_error.store(i);
          error_message = e.what();
        }
      }
    }
  };
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const int64_t threads = std::min<int64_t>({static_cast<int64_t>(hw), 16, (n + 255) / 256});
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (first_error.load() < n) throw DataError(error_message);
}

bool is_jpeg_name(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return ext == ".jpeg" || ext == ".jpg";
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// --- synthetic ---------------------------------------------------------------------------------------

// Portable random numbers (std::*_distribution differ between standard libraries).
constexpr double kTwoPi = 6.283185307179586476925286766559;

struct PortableRng {
  std::mt19937_64 engine;
  explicit PortableRng(uint64_t seed) : engine(seed) {}
  double uniform() { return static_cast<double>(engine() >> 11) * (1.0 / 9007199254740992.0); }
  double normal() {
    if (has_spare) {
      has_spare = false;
      return spare;
    }
    double u1 = uniform();
    while (u1 <= 0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare = r * std::sin(kTwoPi * u2);
    has_spare = true;
    return r * std::cos(kTwoPi * u2);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(uniform() * static_cast<double>(n)) % n; }
  bool has_spare = false;
  double spare = 0;
};

}  // namespace

// --- the readers' parts, for the fuzz targets (src/data/readers.h) -------------------------------------

namespace detail {

std::vector<uint8_t> read_idx_file(const std::string& path, int dims, std::vector<uint32_t>& shape) {
  return largebatch::data::read_idx_file(path, dims, shape);
}

void read_cifar_file(const std::string& path, int label_bytes, std::vector<uint8_t>& pixels,
                     std::vector<int64_t>& labels) {
  largebatch::data::read_cifar_file(path, label_bytes, pixels, labels);
}

void decode_tiny_image(const std::string& path, uint8_t* out) { largebatch::data::decode_tiny_image(path, out); }

std::vector<std::string> parse_wnids(const std::vector<uint8_t>& bytes, const std::string& path) {
  std::vector<std::string> wnids;
  std::unordered_set<std::string> seen;
  std::istringstream in(std::string(bytes.begin(), bytes.end()));
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    const std::string id = trim(line);
    if (id.empty()) continue;
    if (!seen.insert(id).second) fail(path, "duplicate wnid " + id + " at line " + std::to_string(line_no));
    wnids.push_back(id);
  }
  if (wnids.empty()) fail(path, "no wnids listed");
  return wnids;
}

std::vector<std::pair<std::string, int64_t>> parse_val_annotations(const std::vector<uint8_t>& bytes,
                                                                   const std::string& path,
                                                                   const std::vector<std::string>& wnids,
                                                                   const std::string& wnids_path) {
  std::unordered_map<std::string, int64_t> class_of;
  for (size_t k = 0; k < wnids.size(); ++k) class_of[wnids[k]] = static_cast<int64_t>(k);
  std::vector<std::pair<std::string, int64_t>> entries;
  std::istringstream in(std::string(bytes.begin(), bytes.end()));
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (trim(line).empty()) continue;
    std::vector<std::string> fields;
    std::stringstream ls(line);
    std::string field;
    while (std::getline(ls, field, '\t')) fields.push_back(trim(field));
    if (fields.size() < 2 || fields[0].empty())
      fail(path, "line " + std::to_string(line_no) + ": expected <file>\\t<wnid>\\t<box>, found \"" + trim(line) + "\"");
    auto it = class_of.find(fields[1]);
    if (it == class_of.end())
      fail(path, "unknown wnid " + fields[1] + " at line " + std::to_string(line_no) + " (not in " + wnids_path + ")");
    entries.emplace_back(fields[0], it->second);
  }
  if (entries.empty()) fail(path, "no validation images listed");
  return entries;
}

}  // namespace detail

// --- public API --------------------------------------------------------------------------------------

const std::vector<std::string>& dataset_names() {
  static const std::vector<std::string> names = {"fashion-mnist", "mnist",         "cifar10",
                                                 "cifar100",      "tiny-imagenet", "synthetic"};
  return names;
}

std::string default_data_dir(const std::string& name) {
  if (name == "fashion-mnist") return "/usr/share/datasets/fashion-mnist";
  return "";
}

ImageDataset read_idx(const std::string& images_path, const std::string& labels_path, const std::string& name,
                      int64_t num_classes) {
  if (num_classes < 1 || num_classes > 256)
    throw DataError(images_path + ": num_classes " + std::to_string(num_classes) + " must be in [1, 256]");
  std::vector<uint32_t> image_shape, label_shape;
  std::vector<uint8_t> pixels = read_idx_file(images_path, 3, image_shape);
  std::vector<uint8_t> label_bytes = read_idx_file(labels_path, 1, label_shape);
  if (image_shape[0] != label_shape[0])
    throw DataError(images_path + " holds " + std::to_string(image_shape[0]) + " images but " + labels_path +
                    " holds " + std::to_string(label_shape[0]) + " labels (count mismatch)");
  const int64_t n = image_shape[0], h = image_shape[1], w = image_shape[2];
  std::vector<int64_t> labels(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = label_bytes[static_cast<size_t>(i)];
    if (l >= num_classes) fail(labels_path, range_error("label", l, num_classes, i));
    labels[static_cast<size_t>(i)] = l;
  }
  ImageDataset d = make_dataset(name, pixels, labels, 1, h, w, num_classes);
  set_stats(d, base_name(name), d.images);
  return d;
}

DatasetSplit load_mnist_dir(const std::string& dir, const std::string& name) {
  require_directory(dir);
  const std::string train_images = find_idx(dir, "train-images-idx3-ubyte");
  const std::string train_labels = find_idx(dir, "train-labels-idx1-ubyte");
  const std::string test_images = find_idx(dir, "t10k-images-idx3-ubyte");
  const std::string test_labels = find_idx(dir, "t10k-labels-idx1-ubyte");
  DatasetSplit split;
  split.train = read_idx(train_images, train_labels, name + "/train", 10);
  split.test = read_idx(test_images, test_labels, name + "/test", 10);
  // Unknown names: the test set is normalised with the training set's statistics.
  if (!known_stats().count(name)) {
    split.test.mean = split.train.mean;
    split.test.std = split.train.std;
  }
  return split;
}

DatasetSplit load_cifar10(const std::string& dir) {
  return load_cifar(dir, "cifar10",
                    {"data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"},
                    "test_batch.bin", 1, 10);
}

DatasetSplit load_cifar100(const std::string& dir) { return load_cifar(dir, "cifar100", {"train.bin"}, "test.bin", 2, 100); }

DatasetSplit load_tiny_imagenet(const std::string& dir) {
  require_directory(dir);
  const fs::path root(dir);
  // Classes: wnids.txt, one per line, index = line order.
  const std::string wnids_path = (root / "wnids.txt").string();
  const std::vector<std::string> wnids = detail::parse_wnids(read_file(wnids_path), wnids_path);
  // Training images: train/<wnid>/images/*.JPEG, file names sorted.
  std::vector<std::string> train_files;
  std::vector<int64_t> train_labels;
  for (size_t k = 0; k < wnids.size(); ++k) {
    const fs::path images_dir = root / "train" / wnids[k] / "images";
    require_directory(images_dir.string());
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(images_dir))
      if (entry.is_regular_file() && is_jpeg_name(entry.path())) names.push_back(entry.path().filename().string());
    if (names.empty()) fail(images_dir.string(), "no JPEG images for class " + wnids[k]);
    std::sort(names.begin(), names.end());
    for (const auto& nm : names) {
      train_files.push_back((images_dir / nm).string());
      train_labels.push_back(static_cast<int64_t>(k));
    }
  }
  // Validation images: val/val_annotations.txt lines "file<TAB>wnid<TAB>x0 y0 x1 y1", in file order.
  const std::string ann_path = (root / "val" / "val_annotations.txt").string();
  std::vector<std::string> val_files;
  std::vector<int64_t> val_labels;
  for (const auto& [file, label] : detail::parse_val_annotations(read_file(ann_path), ann_path, wnids, wnids_path)) {
    val_files.push_back((root / "val" / "images" / file).string());
    val_labels.push_back(label);
  }
  const int64_t classes = static_cast<int64_t>(wnids.size());
  DatasetSplit split;
  std::vector<uint8_t> none;
  split.train = make_dataset("tiny-imagenet/train", none, train_labels, 3, kTinySize, kTinySize, classes);
  decode_all(train_files, split.train.images.data_ptr<uint8_t>());
  split.test = make_dataset("tiny-imagenet/test", none, val_labels, 3, kTinySize, kTinySize, classes);
  decode_all(val_files, split.test.images.data_ptr<uint8_t>());
  set_stats(split.train, "tiny-imagenet", split.train.images);
  set_stats(split.test, "tiny-imagenet", split.train.images);
  return split;
}

DatasetSplit make_synthetic(const SyntheticOptions& o) {
  if (o.train_size < 0 || o.test_size < 0 || o.num_classes < 1 || o.channels < 1 || o.height < 1 || o.width < 1)
    throw DataError("synthetic: invalid options (sizes must be >= 0, classes/channels/height/width >= 1)");
  const int64_t pixels = o.channels * o.height * o.width;
  PortableRng rng(o.seed * 0x9E3779B97F4A7C15ull + 0x5851F42D4C957F2Dull);
  // Class templates in [0, 1]: blocky 4x4 cells so that crops and small rotations keep them recognisable.
  std::vector<float> templates(static_cast<size_t>(o.num_classes * pixels));
  const int64_t cells_h = (o.height + 3) / 4, cells_w = (o.width + 3) / 4;
  for (int64_t k = 0; k < o.num_classes; ++k)
    for (int64_t c = 0; c < o.channels; ++c) {
      std::vector<float> cells(static_cast<size_t>(cells_h * cells_w));
      for (auto& v : cells) v = static_cast<float>(rng.uniform());
      for (int64_t y = 0; y < o.height; ++y)
        for (int64_t x = 0; x < o.width; ++x)
          templates[static_cast<size_t>(((k * o.channels + c) * o.height + y) * o.width + x)] =
              cells[static_cast<size_t>((y / 4) * cells_w + x / 4)];
    }
  auto make = [&](int64_t n, const std::string& name) {
    std::vector<uint8_t> data(static_cast<size_t>(n * pixels));
    std::vector<int64_t> labels(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t k = rng.below(o.num_classes);
      labels[static_cast<size_t>(i)] = k;
      const float* t = templates.data() + k * pixels;
      uint8_t* out = data.data() + i * pixels;
      for (int64_t p = 0; p < pixels; ++p) {
        const double v = 40.0 + 170.0 * t[p] + 45.0 * rng.normal();
        out[p] = static_cast<uint8_t>(std::lround(std::min(255.0, std::max(0.0, v))));
      }
    }
    return make_dataset(name, data, labels, o.channels, o.height, o.width, o.num_classes);
  };
  DatasetSplit split;
  split.train = make(o.train_size, "synthetic/train");
  split.test = make(o.test_size, "synthetic/test");
  const Stats s = compute_stats(o.train_size > 0 ? split.train.images : split.test.images);
  split.train.mean = split.test.mean = s.mean;
  split.train.std = split.test.std = s.std;
  return split;
}

DatasetSplit load_dataset(const std::string& name, const std::string& dir, uint64_t seed) {
  if (name == "synthetic") {
    SyntheticOptions o;
    o.seed = seed;
    return make_synthetic(o);
  }
  const auto& names = dataset_names();
  if (std::find(names.begin(), names.end(), name) == names.end()) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "" : ", ") + n;
    throw DataError("unknown data set \"" + name + "\"; known data sets: " + list);
  }
  const std::string path = dir.empty() ? default_data_dir(name) : dir;
  if (path.empty())
    throw DataError("no data directory given for " + name + " and it has no default location (pass --data-dir)");
  if (name == "fashion-mnist" || name == "mnist") return load_mnist_dir(path, name);
  if (name == "cifar10") return load_cifar10(path);
  if (name == "cifar100") return load_cifar100(path);
  return load_tiny_imagenet(path);
}

HeldOutSplit hold_out(const ImageDataset& train, int64_t n) {
  const int64_t size = train.size();
  if (n <= 0 || n >= size)
    throw std::invalid_argument("cannot hold out " + std::to_string(n) + " of the " + std::to_string(size) +
                                " training images of " + train.name + " (need 0 < n < " + std::to_string(size) + ")");
  // Fisher-Yates over splitmix64 draws: the same images on every platform and library version.
  std::vector<int64_t> order(static_cast<size_t>(size));
  for (int64_t i = 0; i < size; ++i) order[static_cast<size_t>(i)] = i;
  uint64_t state = 0x76616c6964617465ULL;  // constant: the split never depends on the run's seed
  auto next = [&state]() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  for (int64_t i = size - 1; i > 0; --i)
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(next() % static_cast<uint64_t>(i + 1))]);
  std::vector<int64_t> held(order.begin(), order.begin() + n), kept(order.begin() + n, order.end());
  std::sort(held.begin(), held.end());
  std::sort(kept.begin(), kept.end());
  auto part = [&](const std::vector<int64_t>& rows, const std::string& name) {
    ImageDataset d = train;
    const auto index = torch::tensor(rows, torch::kLong);
    d.name = name;
    d.images = train.images.index_select(0, index).contiguous();
    d.labels = train.labels.index_select(0, index).contiguous();
    return d;
  };
  return {part(kept, train.name + " less validation"), part(held, train.name + " validation")};
}

}  // namespace data
}  // namespace largebatch
