#pragma once
// Reading what largebatch writes. checkpoint.pt (train, pretrain, linear-eval) is a LibTorch archive behind a
// header that lets a reader refuse a truncated or damaged file before LibTorch reads a byte of it:
//   "largebatch-checkpoint\n" (22 bytes), format version (u32), payload size (u64), CRC-32 of the payload (u32),
//   all little-endian, then the payload: an archive with "model", "optimizer", "meta" (JSON text) and "rng_cpu".
// model.pt and backbone.pt are bare LibTorch archives (torch::load reads them).
#include <torch/serialize/input-archive.h>

#include <filesystem>
#include <stdexcept>

namespace largebatch {
namespace train {

// A file that is not a readable largebatch checkpoint or LibTorch archive; the message names the file and
// what is wrong (truncated, CRC mismatch, foreign format, unsupported version).
class CheckpointError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Reads a checkpoint (its size and CRC-32 verified first) or a bare LibTorch archive into archive.
void load_archive(const std::filesystem::path& path, torch::serialize::InputArchive& archive,
                  torch::Device device = torch::kCPU);

}  // namespace train
}  // namespace largebatch
