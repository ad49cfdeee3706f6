#pragma once
// Scratch paths for tests: unique under the temporary directory, removed when the object goes.
#include <filesystem>
#include <fstream>
#include <random>
#include <string>

namespace largebatch_test {

struct ScratchDir {
  explicit ScratchDir(const std::string& name) {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("largebatch_" + name + "_" + std::to_string(rd()));
    std::filesystem::remove_all(path);
  }
  ~ScratchDir() { std::filesystem::remove_all(path); }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::filesystem::path path;
};

// A file holding text, with the given extension.
struct ScratchFile {
  ScratchFile(const std::string& text, const std::string& extension) {
    std::random_device rd;
    path = std::filesystem::temp_directory_path() / ("largebatch_file_" + std::to_string(rd()) + extension);
    std::ofstream(path) << text;
  }
  ~ScratchFile() { std::filesystem::remove(path); }
  ScratchFile(const ScratchFile&) = delete;
  ScratchFile& operator=(const ScratchFile&) = delete;
  std::filesystem::path path;
};

}  // namespace largebatch_test
