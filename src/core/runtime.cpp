#include <largebatch/core/runtime.h>
#include <largebatch/optim/layerwise.h>
#include <largebatch/version.h>

#include <torch/torch.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

namespace largebatch {

std::string version() { return LARGEBATCH_VERSION; }

namespace {
// First mapped file of this process whose path contains `needle`.
std::string mapped_library(const std::string& needle) {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    if (path.find(needle) != std::string::npos) return path;
  }
  return "";
}
}  // namespace

std::string loaded_blas() {
  // Touch BLAS once so that a lazily loaded library shows up in the map.
  torch::NoGradGuard guard;
  (void)torch::mm(torch::ones({2, 2}), torch::ones({2, 2}));
  std::string path = mapped_library("openblas");
  if (path.empty()) path = mapped_library("libblas");
  if (path.empty()) path = mapped_library("mkl");
  return path;
}

bool tcmalloc_loaded() { return !mapped_library("libtcmalloc").empty(); }

namespace {
// The fused step's instruction set, or why there is none (a bad LARGEBATCH_STEP_SIMD must not stop --version).
std::string fused_step_set() {
  try {
    return optim::fused_step_instruction_set() + " in blocks of " +
           std::to_string(optim::fused_step_block_bytes() >> 10) + " KiB per thread";
  } catch (const std::exception& e) {
    return std::string("unavailable (") + e.what() + ")";
  }
}
}  // namespace

std::string runtime_summary() {
  std::ostringstream os;
  std::string blas = loaded_blas();
  os << "largebatch " << version() << " | LibTorch " << TORCH_VERSION << " | BLAS "
     << (blas.empty() ? "none loaded" : blas) << " | allocator " << (tcmalloc_loaded() ? "tcmalloc" : "system malloc")
     << " | intra-op threads " << torch::get_num_threads() << " of " << std::thread::hardware_concurrency()
     << " cores (train sets --threads) | fused step " << fused_step_set() << " | CUDA "
     << (torch::cuda::is_available() ? std::to_string(torch::cuda::device_count()) + " device(s)" : "unavailable");
  return os.str();
}

}  // namespace largebatch

namespace largebatch {

double stream_triad_bandwidth(int64_t elements, int repeats) {
  // Two implementations of a = b + 3 c, best of both: a plain parallel loop and LibTorch's vectorised add.
  // The higher figure makes the stricter bound.
  std::vector<double> a(static_cast<size_t>(elements)), b(a.size(), 1.0), c(a.size(), 2.0);
  double* pa = a.data();
  const double* pb = b.data();
  const double* pc = c.data();
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  torch::Tensor ta = torch::from_blob(pa, {elements}, opts), tb = torch::from_blob(b.data(), {elements}, opts),
                tc = torch::from_blob(c.data(), {elements}, opts);
  auto loop = [&] {
    at::parallel_for(0, elements, int64_t{1} << 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) pa[i] = pb[i] + 3.0 * pc[i];
    });
  };
  auto library = [&] { at::add_out(ta, tb, tc, 3.0); };
  loop();  // first touch: pages mapped outside the timing
  double best = 0;
  for (int r = 0; r < std::max(1, repeats); ++r) {
    for (int which = 0; which < 2; ++which) {
      const auto t0 = std::chrono::steady_clock::now();
      which ? library() : loop();
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      best = std::max(best, 3.0 * sizeof(double) * static_cast<double>(elements) / s);
    }
  }
  return best;
}

}  // namespace largebatch
