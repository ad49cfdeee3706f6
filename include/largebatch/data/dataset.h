#pragma once
// Image classification data sets held in memory as uint8, and their on-disk readers.
// Every reader error is a DataError whose message names the file and what is wrong with it.
#include <torch/types.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace largebatch {
namespace data {

class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ImageDataset {
  std::string name;       // "fashion-mnist/train", ...
  torch::Tensor images;   // uint8 [N, C, H, W], contiguous
  torch::Tensor labels;   // int64 [N], each in [0, num_classes)
  int64_t num_classes = 0;
  std::vector<float> mean;  // per-channel normalisation (of pixel / 255)
  std::vector<float> std;

  int64_t size() const { return images.defined() ? images.size(0) : 0; }
  int64_t channels() const { return images.size(1); }
  int64_t height() const { return images.size(2); }
  int64_t width() const { return images.size(3); }
};

struct DatasetSplit {
  ImageDataset train;
  ImageDataset test;
};

// Names accepted by load_dataset: fashion-mnist, mnist, cifar10, cifar100, tiny-imagenet, synthetic.
const std::vector<std::string>& dataset_names();
// Where the data set lives when --data-dir is not given ("" when there is no default):
// fashion-mnist -> /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist).
std::string default_data_dir(const std::string& name);

// IDX files (MNIST layout), raw or gzip-compressed (chosen by the file's first bytes, not its name).
ImageDataset read_idx(const std::string& images_path, const std::string& labels_path, const std::string& name,
                      int64_t num_classes = 10);
// MNIST / Fashion-MNIST directory: {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz].
DatasetSplit load_mnist_dir(const std::string& dir, const std::string& name);
// CIFAR-10 binary: data_batch_1..5.bin, test_batch.bin (1 label byte + 3072 pixel bytes per record).
DatasetSplit load_cifar10(const std::string& dir);
// CIFAR-100 binary: train.bin, test.bin (coarse byte, fine byte + 3072 pixel bytes); fine labels are used.
DatasetSplit load_cifar100(const std::string& dir);
// Tiny-ImageNet: wnids.txt, train/<wnid>/images/*.JPEG, val/val_annotations.txt + val/images/*.JPEG (64x64 RGB).
DatasetSplit load_tiny_imagenet(const std::string& dir);

struct SyntheticOptions {
  int64_t train_size = 2048;
  int64_t test_size = 512;
  int64_t num_classes = 10;
  int64_t channels = 1;
  int64_t height = 28;
  int64_t width = 28;
  uint64_t seed = 0;
};
// Learnable synthetic images: each class has a fixed random template; samples are noisy copies.
DatasetSplit make_synthetic(const SyntheticOptions& options);

// Dispatch by name; dir "" means default_data_dir(name). Throws DataError (unknown name included).
DatasetSplit load_dataset(const std::string& name, const std::string& dir, uint64_t seed = 0);

// A training set less `n` images held out for validation, and those images. The choice is fixed: a
// permutation drawn from a constant seed by the library's own generator, so that runs of any seed, world size
// or LibTorch version hold out the same images and compare on them. Both parts keep the set's normalisation
// and the images' order. std::invalid_argument unless 0 < n < train.size().
struct HeldOutSplit {
  ImageDataset train;
  ImageDataset validation;
};
HeldOutSplit hold_out(const ImageDataset& train, int64_t n);

}  // namespace data
}  // namespace largebatch
