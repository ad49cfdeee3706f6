#pragma once
// The main() of the Google Benchmark programs. Threads: LARGEBATCH_THREADS, or every core (LibTorch's own
// default can be 1 in a program that never sets it).
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <thread>

inline int largebatch_benchmark_main(int argc, char** argv) {
  const char* env = std::getenv("LARGEBATCH_THREADS");
  const int threads = env && *env ? std::atoi(env) : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  torch::set_num_threads(threads);
  benchmark::AddCustomContext("intra-op threads", std::to_string(torch::get_num_threads()));
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
