#pragma once
// Facts about the running process: version, which BLAS and allocator are loaded, threads.
#include <string>

namespace largebatch {

std::string version();
// Path of the BLAS library mapped into this process ("" if none is loaded yet).
std::string loaded_blas();
// True when tcmalloc is the process's allocator.
bool tcmalloc_loaded();
// One-line summary: version, LibTorch version, BLAS, allocator, threads, CUDA availability.
std::string runtime_summary();

}  // namespace largebatch
