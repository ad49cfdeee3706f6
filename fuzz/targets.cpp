#include "targets.h"

#include "../src/data/readers.h"
#include "../src/train/run_support.h"

#include <largebatch/optim/layerwise.h>
#include <largebatch/report/sweep.h>
#include <largebatch/train/checkpoint.h>
#include <largebatch/train/self_supervised.h>
#include <largebatch/train/trainer.h>

#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdio>
#include <jpeglib.h>  // after <cstdio>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;

namespace largebatch {
namespace fuzz {
namespace {

// An in-memory file the readers open by path (/proc/self/fd/N): no disk, nothing to clean up.
class MemoryFile {
 public:
  MemoryFile() {
    fd_ = ::memfd_create("largebatch-fuzz", MFD_CLOEXEC);
    if (fd_ < 0) throw std::runtime_error("memfd_create failed");
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemoryFile() { ::close(fd_); }
  const std::string& hold(const uint8_t* data, size_t size) {
    if (::ftruncate(fd_, 0) != 0) throw std::runtime_error("ftruncate failed");
    size_t done = 0;
    while (done < size) {
      const ssize_t n = ::pwrite(fd_, data + done, size - done, static_cast<off_t>(done));
      if (n <= 0) throw std::runtime_error("pwrite failed");
      done += static_cast<size_t>(n);
    }
    return path_;
  }
  const std::string& hold(const std::string& bytes) {
    return hold(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  }

 private:
  int fd_ = -1;
  std::string path_;
};

// LARGEBATCH_FUZZ_VERBOSE=1 (for largebatch_fuzz_replay): print why each refused input was refused.
void rejected(const std::exception& e) {
  static const bool verbose = std::getenv("LARGEBATCH_FUZZ_VERBOSE") != nullptr;
  if (verbose) std::fprintf(stderr, "  refused: %s\n", e.what());
}

MemoryFile& scratch_file() {
  static MemoryFile file;
  return file;
}

// What a checkpoint is restored into: a small module and the layer-wise optimizer with its state.
struct Restorable : torch::nn::Module {
  Restorable() {
    fc = register_module("fc", torch::nn::Linear(4, 3));
    bn = register_module("bn", torch::nn::BatchNorm1d(3));
  }
  torch::nn::Linear fc{nullptr};
  torch::nn::BatchNorm1d bn{nullptr};
};

struct CheckpointSubject {
  std::shared_ptr<Restorable> module = std::make_shared<Restorable>();
  optim::LayerwiseOptimizer optimizer{module->named_parameters(), optim::LayerwiseOptions(0.1)};
  CheckpointSubject() {
    // One step so that the optimizer has state to save (momentum buffers, step counts).
    module->zero_grad();
    module->bn->forward(module->fc->forward(torch::ones({2, 4}))).sum().backward();
    optimizer.step();
  }
};

std::string checkpoint_bytes() {
  CheckpointSubject s;
  const fs::path dir = fs::temp_directory_path() / ("largebatch-fuzz-seed-" + std::to_string(::getpid()));
  fs::create_directories(dir);
  train::detail::save_checkpoint(dir / "checkpoint.pt", *s.module, s.optimizer, nlohmann::json{{"epoch", 1}, {"step", 1}});
  std::ifstream in(dir / "checkpoint.pt", std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  fs::remove_all(dir);
  return bytes;
}

int restore(const std::string& path) {
  CheckpointSubject s;
  try {
    train::detail::load_checkpoint(path, *s.module, s.optimizer, torch::kCPU);
  } catch (const train::UsageError& e) {
    rejected(e);
  }
  torch::serialize::InputArchive archive;  // the other reader of checkpoints: --backbone, compare
  try {
    train::load_archive(path, archive);
  } catch (const train::CheckpointError& e) {
    rejected(e);
  }
  return 0;
}

}  // namespace

int idx(const uint8_t* data, size_t size) {
  const std::string& path = scratch_file().hold(data, size);
  for (int dims : {3, 1}) {
    std::vector<uint32_t> shape;
    try {
      data::detail::read_idx_file(path, dims, shape);
    } catch (const data::DataError& e) {
      rejected(e);
    }
  }
  return 0;
}

int cifar(const uint8_t* data, size_t size) {
  const std::string& path = scratch_file().hold(data, size);
  for (int label_bytes : {1, 2}) {
    std::vector<uint8_t> pixels;
    std::vector<int64_t> labels;
    try {
      data::detail::read_cifar_file(path, label_bytes, pixels, labels);
    } catch (const data::DataError& e) {
      rejected(e);
    }
  }
  return 0;
}

int tiny_jpeg(const uint8_t* data, size_t size) {
  const std::string& path = scratch_file().hold(data, size);
  std::vector<uint8_t> out(3 * 64 * 64);
  try {
    data::detail::decode_tiny_image(path, out.data());
  } catch (const data::DataError& e) {
    rejected(e);
  }
  return 0;
}

int tiny_annotations(const uint8_t* data, size_t size) {
  const uint8_t* nul = static_cast<const uint8_t*>(std::memchr(data, 0, size));
  const size_t split = nul ? static_cast<size_t>(nul - data) : size;
  const std::vector<uint8_t> wnids_bytes(data, data + split);
  const std::vector<uint8_t> ann_bytes(nul ? nul + 1 : data + size, data + size);
  try {
    const auto wnids = data::detail::parse_wnids(wnids_bytes, "wnids.txt");
    data::detail::parse_val_annotations(ann_bytes, "val_annotations.txt", wnids, "wnids.txt");
  } catch (const data::DataError& e) {
    rejected(e);
  }
  return 0;
}

namespace {

template <class Config>
void read_config(const std::string& text) {
  try {
    Config::from_json(text, "config.json").validate();
  } catch (const train::UsageError& e) {  // the CLI reports both as bad input (exit 2)
    rejected(e);
  } catch (const std::invalid_argument& e) {
    rejected(e);
  }
}

}  // namespace

int train_config(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  read_config<train::TrainConfig>(text);
  read_config<train::PretrainConfig>(text);
  read_config<train::LinearEvalConfig>(text);
  return 0;
}

int grid(const uint8_t* data, size_t size) {
  const std::string& path = scratch_file().hold(data, size);
  try {
    report::read_grid(path);
  } catch (const std::invalid_argument& e) {
    rejected(e);
  }
  return 0;
}

int checkpoint(const uint8_t* data, size_t size) { return restore(scratch_file().hold(data, size)); }

int checkpoint_payload(const uint8_t* data, size_t size) {
  return restore(scratch_file().hold(train::detail::seal_checkpoint(std::string(reinterpret_cast<const char*>(data), size))));
}

const std::vector<TargetInfo>& targets() {
  static const std::vector<TargetInfo> list = {
      {"idx", idx, "IDX images and labels files (MNIST layout), raw or gzip"},
      {"cifar", cifar, "CIFAR-10 / CIFAR-100 binary record files"},
      {"tiny_jpeg", tiny_jpeg, "a Tiny-ImageNet JPEG image"},
      {"tiny_annotations", tiny_annotations, "Tiny-ImageNet wnids.txt, a NUL byte, val_annotations.txt"},
      {"train_config", train_config, "config.json of train, pretrain and linear-eval"},
      {"grid", grid, "sweep grid files, JSON or TOML"},
      {"checkpoint", checkpoint, "checkpoint.pt as read by --resume, --backbone and compare"},
      {"checkpoint_payload", checkpoint_payload, "the LibTorch archive inside a checkpoint whose CRC is valid"},
  };
  return list;
}

const TargetInfo* find_target(const std::string& name) {
  for (const auto& t : targets())
    if (name == t.name) return &t;
  return nullptr;
}

// ---- seed corpora -----------------------------------------------------------------------------------

namespace {

void put(const fs::path& path, const std::string& bytes) {
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

std::string be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}

std::string gzip(const std::string& raw) {
  z_stream z{};
  deflateInit2(&z, 9, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);  // +16: gzip wrapper
  std::string out(deflateBound(&z, raw.size()) + 32, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(raw.data()));
  z.avail_in = static_cast<uInt>(raw.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  deflate(&z, Z_FINISH);
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

std::string jpeg(int width, int height, bool gray) {
  jpeg_compress_struct c;
  jpeg_error_mgr err;
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buffer, &size);
  c.image_width = static_cast<JDIMENSION>(width);
  c.image_height = static_cast<JDIMENSION>(height);
  c.input_components = gray ? 1 : 3;
  c.in_color_space = gray ? JCS_GRAYSCALE : JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 75, TRUE);
  jpeg_start_compress(&c, TRUE);
  std::vector<unsigned char> row(static_cast<size_t>(width * c.input_components));
  while (c.next_scanline < c.image_height) {
    for (size_t i = 0; i < row.size(); ++i) row[i] = static_cast<unsigned char>((i * 7 + c.next_scanline * 13) & 0xff);
    JSAMPROW rows[1] = {row.data()};
    jpeg_write_scanlines(&c, rows, 1);
  }
  jpeg_finish_compress(&c);
  std::string out(reinterpret_cast<char*>(buffer), size);
  jpeg_destroy_compress(&c);
  std::free(buffer);
  return out;
}

}  // namespace

void write_seeds(const std::string& root) {
  const fs::path dir(root);
  // IDX: 3 images of 4x5, and their labels; raw and gzip.
  std::string images = be32(0x803) + be32(3) + be32(4) + be32(5), labels = be32(0x801) + be32(3);
  for (int i = 0; i < 3 * 4 * 5; ++i) images.push_back(static_cast<char>(i * 4));
  labels += std::string("\x01\x07\x09", 3);
  put(dir / "idx" / "seed-images", images);
  put(dir / "idx" / "seed-images.gz", gzip(images));
  put(dir / "idx" / "seed-labels", labels);
  put(dir / "idx" / "seed-labels.gz", gzip(labels));
  // CIFAR: two CIFAR-10 records, two CIFAR-100 records.
  std::string cifar10, cifar100;
  for (int r = 0; r < 2; ++r) {
    cifar10.push_back(static_cast<char>(3 + r));
    cifar100 += std::string{static_cast<char>(7), static_cast<char>(42 + r)};
    for (int p = 0; p < 3072; ++p) {
      cifar10.push_back(static_cast<char>((p + r) & 0xff));
      cifar100.push_back(static_cast<char>((p * 3 + r) & 0xff));
    }
  }
  put(dir / "cifar" / "seed-cifar10", cifar10);
  put(dir / "cifar" / "seed-cifar100", cifar100);
  // JPEG: 64x64 colour and grey (accepted), 32x32 (refused: wrong size).
  put(dir / "tiny_jpeg" / "seed-rgb", jpeg(64, 64, false));
  put(dir / "tiny_jpeg" / "seed-gray", jpeg(64, 64, true));
  put(dir / "tiny_jpeg" / "seed-small", jpeg(32, 32, false));
  // wnids.txt NUL val_annotations.txt
  put(dir / "tiny_annotations" / "seed",
      std::string("n01443537\nn01629819\n", 20) + std::string(1, '\0') +
          "val_0.JPEG\tn01443537\t0\t32\t44\t62\nval_1.JPEG\tn01629819\t52\t5\t64\t50\n");
  // config.json as each command writes it, and a short hand-written one.
  put(dir / "train_config" / "seed-train", train::TrainConfig{}.to_json());
  put(dir / "train_config" / "seed-pretrain", train::PretrainConfig{}.to_json());
  put(dir / "train_config" / "seed-linear-eval", train::LinearEvalConfig{}.to_json());
  put(dir / "train_config" / "seed-short",
      R"({"data": "synthetic", "optimizer": "tvlars", "opt": ["lambda=0.001"], "batch-size": 512, "epochs": 2})");
  // Grids in both formats.
  put(dir / "grid" / "seed-json",
      R"({"command": "train", "fixed": {"data": "synthetic", "epochs": 2},
  "axes": {"optimizer": ["lars", "tvlars"], "batch-size": [256, 1024],
           "lr": [{"label": "small", "lr": 0.1, "opt": ["lambda=0.001"]}, {"lr": 1.0}]}})");
  put(dir / "grid" / "seed-toml",
      "command = \"pretrain\"\n[fixed]\ndata = \"synthetic\"\nepochs = 2\n"
      "[axes]\noptimizer = [\"lars\", \"lamb\"]\nseed = [0, 1]\n"
      "lr = [{ label = \"a\", lr = 0.5, opt = [\"eta=0.001\"] }, 1.0]\n");
  // A checkpoint of the restorable module, and its payload alone.
  const std::string sealed = checkpoint_bytes();
  put(dir / "checkpoint" / "seed", sealed);
  const auto [offset, size] = train::detail::unseal_checkpoint(sealed, "seed");
  put(dir / "checkpoint_payload" / "seed", sealed.substr(offset, size));
}

}  // namespace fuzz
}  // namespace largebatch
