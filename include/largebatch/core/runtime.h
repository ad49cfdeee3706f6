#pragma once
// Facts about the running process: version, which BLAS and allocator are loaded, threads.
#include <cstdint>
#include <string>

namespace largebatch {

std::string version();
// Path of the BLAS library mapped into this process ("" if none is loaded yet).
std::string loaded_blas();
// True when tcmalloc is the process's allocator.
bool tcmalloc_loaded();
// Memory bandwidth in bytes/s by STREAM's triad (a = b + s c over three arrays of `elements` doubles, 24
// bytes counted per element as STREAM does), best of `repeats`, with LibTorch's intra-op threads.
double stream_triad_bandwidth(int64_t elements = int64_t{1} << 24, int repeats = 5);
// One-line summary: version, LibTorch version, BLAS, allocator, threads, CUDA availability.
std::string runtime_summary();

}  // namespace largebatch
