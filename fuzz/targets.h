#pragma once
// The fuzz targets: one function per reader or parser of outside input. Each takes arbitrary bytes and must
// either accept them or throw the error type its reader documents (which it catches); anything else (a crash,
// another exception, a sanitizer report, a hang) is a bug. Built two ways: as libFuzzer programs
// (fuzz/libfuzzer_main.cpp, clang) and into largebatch_fuzz_replay (any compiler), which runs the seed
// corpora and every crash ever found as part of the test suite.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace largebatch {
namespace fuzz {

using Target = int (*)(const uint8_t* data, size_t size);

struct TargetInfo {
  const char* name;
  Target run;
  const char* what;
};

int idx(const uint8_t* data, size_t size);                   // IDX images and labels, raw or gzip
int cifar(const uint8_t* data, size_t size);                 // CIFAR-10 and CIFAR-100 binary records
int tiny_jpeg(const uint8_t* data, size_t size);             // a Tiny-ImageNet JPEG
int tiny_annotations(const uint8_t* data, size_t size);      // wnids.txt NUL val_annotations.txt
int train_config(const uint8_t* data, size_t size);          // train / pretrain / linear-eval config.json
int grid(const uint8_t* data, size_t size);                  // sweep grid, JSON or TOML
int checkpoint(const uint8_t* data, size_t size);            // checkpoint.pt as found on disk
int checkpoint_payload(const uint8_t* data, size_t size);    // the archive inside a checkpoint with a valid CRC

const std::vector<TargetInfo>& targets();
const TargetInfo* find_target(const std::string& name);

// Writes small valid inputs for every target to dir/<target>/seed-*: the seed corpora in fuzz/corpus.
void write_seeds(const std::string& dir);

}  // namespace fuzz
}  // namespace largebatch
