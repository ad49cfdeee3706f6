#pragma once
// The parts of the data-set readers, one file format each: what the fuzz targets (fuzz/) drive. Internal to the
// library. Every error is a DataError whose message names the file.
#include <largebatch/data/dataset.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace largebatch {
namespace data {
namespace detail {

// An IDX file of unsigned bytes with `dims` dimensions (3: images, 1: labels), raw or gzip; shape receives them.
std::vector<uint8_t> read_idx_file(const std::string& path, int dims, std::vector<uint32_t>& shape);
// Appends the records of one CIFAR binary file; label_bytes 1 (CIFAR-10) or 2 (CIFAR-100).
void read_cifar_file(const std::string& path, int label_bytes, std::vector<uint8_t>& pixels,
                     std::vector<int64_t>& labels);
// Decodes a 64x64 JPEG (Tiny-ImageNet) into planar RGB, out: 3 x 64 x 64 bytes.
void decode_tiny_image(const std::string& path, uint8_t* out);
// Tiny-ImageNet's wnids.txt: the class ids in line order.
std::vector<std::string> parse_wnids(const std::vector<uint8_t>& bytes, const std::string& path);
// Tiny-ImageNet's val/val_annotations.txt: (file, class index) per line.
std::vector<std::pair<std::string, int64_t>> parse_val_annotations(const std::vector<uint8_t>& bytes,
                                                                   const std::string& path,
                                                                   const std::vector<std::string>& wnids,
                                                                   const std::string& wnids_path);

}  // namespace detail
}  // namespace data
}  // namespace largebatch
