#pragma once
// The input pipeline: worker threads assemble and augment whole batches from uint8 images into
// normalised float tensors, prefetching ahead so that training does not wait for data.
// Deterministic: the order depends only on (seed, epoch), each sample's augmentation only on
// (seed, epoch, position in the epoch), never on thread timing.
#include <largebatch/data/dataset.h>

#include <torch/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace largebatch {
namespace data {

struct AugmentOptions {
  bool random_crop = false;       // pad by crop_padding (zeros) and crop back to the original size
  int64_t crop_padding = 4;
  bool horizontal_flip = false;   // with probability 1/2
  double max_rotation_deg = 0;    // uniform in [-max, max], bilinear, zero fill
  bool normalize = true;          // (x / 255 - mean) / std with the data set's mean and std
};

// Named augmentation presets shared by every command: "none", "flip", "crop-flip" (pad-4 crop + flip) and
// "paper" (crop + flip + rotation up to 15 degrees, as in the paper's code); "auto" picks crop-flip for the
// colour data sets (CIFAR, Tiny-ImageNet) and none otherwise. Throws std::invalid_argument on other names.
AugmentOptions augment_preset(const std::string& name, const std::string& data_set = "");

// Mixup and CutMix with timm's semantics (timm.data.Mixup, mode "batch"): each batch draws lambda ~ Beta(a, a) and
// mixes every image with its partner, the image at the mirrored position of the global batch (timm's flip of the
// batch): mixup blends the two, CutMix pastes a box of the partner covering about 1 - lambda of the image (lambda is
// then the exact kept area). With both alphas set, a batch is CutMix with probability switch_prob, else mixup.
// The draws depend only on (seed, epoch, batch index), and each partner is loaded and augmented by the rank that
// needs it, so batches are the same for any worker count and rank split.
struct MixOptions {
  double mixup_alpha = 0;   // 0: off
  double cutmix_alpha = 0;  // 0: off
  double switch_prob = 0.5;
  bool enabled() const { return mixup_alpha > 0 || cutmix_alpha > 0; }
};

struct LoaderOptions {
  int64_t batch_size = 256;
  bool shuffle = true;
  bool drop_last = false;
  uint64_t seed = 0;
  int64_t workers = 1;            // assembling threads
  int64_t prefetch = 2;           // batches assembled ahead
  AugmentOptions augment;
  MixOptions mix;
  // Data parallelism: this loader yields only the shard of each batch that belongs to rank of world.
  int64_t rank = 0;
  int64_t world = 1;
};

struct Batch {
  torch::Tensor images;  // float [b, C, H, W]
  torch::Tensor labels;  // int64 [b]
  int64_t index = 0;     // batch number within the epoch
  int64_t global_size = 0;  // images in the whole (global) batch, over all ranks
  int64_t offset = 0;       // first row of this rank's shard within the global batch
  // Mixup / CutMix: each image's partner label and the weight of its own label (the loss is
  // lambda CE(labels) + (1 - lambda) CE(mix_labels)); mix_labels undefined and mix_lambda 1 when off.
  torch::Tensor mix_labels;
  double mix_lambda = 1;
  bool cutmix = false;  // which of the two this batch drew
};

class BatchLoader {
 public:
  BatchLoader(const ImageDataset& data, LoaderOptions options);
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Begins an epoch (stopping any unfinished one) at batch first_batch (a run resumed within an epoch; batches
  // depend only on (seed, epoch, index), so the rest of the epoch is what it would have been) and prefetches it.
  void start_epoch(int64_t epoch, int64_t first_batch = 0);
  // Next batch of the epoch in order; false once the epoch is exhausted.
  bool next(Batch& batch);
  int64_t batches_per_epoch() const;
  // The epoch's sample order (a permutation of [0, N) when shuffling).
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  const LoaderOptions& options() const { return options_; }
  // Seconds the consumer spent waiting in next() since construction.
  double wait_seconds() const { return wait_seconds_; }

 private:
  Batch assemble(int64_t epoch, int64_t index, const std::vector<int64_t>& order) const;
  void stop_workers();
  void worker_loop(int64_t epoch);

  const ImageDataset& data_;
  LoaderOptions options_;
  std::vector<int64_t> order_;
  int64_t epoch_ = -1;
  int64_t next_to_assemble_ = 0;
  int64_t next_to_return_ = 0;
  std::map<int64_t, Batch> ready_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
  double wait_seconds_ = 0;
};

}  // namespace data
}  // namespace largebatch
