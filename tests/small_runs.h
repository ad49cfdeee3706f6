#pragma once
// Small runs of each command on synthetic data, for tests: one thread, no progress, no plots.
#include <largebatch/train/self_supervised.h>
#include <largebatch/train/trainer.h>

#include <filesystem>
#include <string>

namespace largebatch_test {

// 512 images, batch 128 (4 steps per epoch), 3 epochs of the compact CNN.
inline largebatch::train::TrainConfig small_run(const std::filesystem::path& out) {
  largebatch::train::TrainConfig c;
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

// 256 images, batch 64 (4 steps per epoch), 3 epochs, projector 64-64.
inline largebatch::train::PretrainConfig small_pretrain(const std::filesystem::path& out) {
  largebatch::train::PretrainConfig c;
  c.data = "synthetic";
  c.synthetic_size = 256;
  c.batch_size = 64;
  c.epochs = 3;
  c.projector = "64-64";
  c.threads = 1;
  c.loader_workers = 1;
  c.progress = "none";
  c.plots = false;
  c.out = out.string();
  return c;
}

// 256 images, batch 64 (4 steps per epoch), 3 epochs.
inline largebatch::train::LinearEvalConfig small_linear_eval(const std::filesystem::path& out,
                                                             const std::string& backbone) {
  largebatch::train::LinearEvalConfig c;
  c.backbone = backbone;
  c.data = "synthetic";
  c.synthetic_size = 256;
  c.batch_size = 64;
  c.epochs = 3;
  c.threads = 1;
  c.progress = "none";
  c.plots = false;
  c.out = out.string();
  return c;
}

}  // namespace largebatch_test
