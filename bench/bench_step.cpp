// Google Benchmark of the optimizer step: fused CPU kernel against per-tensor LibTorch operations on the
// parameter sets of ResNet-18 and ResNet-50, and a STREAM triad for the bandwidth in the same run.
//   build/bench_step --benchmark_counters_tabular=true        (LARGEBATCH_THREADS=1 for one thread)
// bytes_per_second is the traffic a step must move (LayerwiseOptimizer::step_memory_traffic) over its time:
// compare it with the triad's.
#include <largebatch/largebatch.h>

#include <benchmark/benchmark.h>
#include "bench_main.h"
#include <torch/torch.h>

#include <algorithm>
#include <string>
#include <vector>

namespace lo = largebatch::optim;

namespace {

lo::NamedParameters parameters_of(const std::string& model) {
  largebatch::models::ModelOptions mo;
  mo.name = model;
  mo.in_channels = 3;
  mo.image_size = 32;
  auto net = largebatch::models::make_model(mo);
  torch::manual_seed(0);
  lo::NamedParameters params;
  for (const auto& item : net->named_parameters()) {
    auto p = torch::randn(item.value().sizes()) * 0.05;
    p.mutable_grad() = torch::randn(item.value().sizes()) * 0.01;
    params.insert(item.key(), p);
  }
  return params;
}

void step(benchmark::State& state, const std::string& model, const std::string& optimizer, lo::StepKernel kernel) {
  auto params = parameters_of(model);
  auto opt = lo::make_optimizer({optimizer, optimizer == "lamb" ? 0.01 : 1.0, 4096, {}}, params);
  auto& layerwise = dynamic_cast<lo::LayerwiseOptimizer&>(*opt);
  layerwise.set_kernel(kernel);
  layerwise.step();
  for (auto _ : state) layerwise.step();
  state.SetBytesProcessed(state.iterations() * layerwise.step_memory_traffic());
}

void triad(benchmark::State& state) {
  for (auto _ : state) {
    const double bytes_per_s = largebatch::stream_triad_bandwidth(int64_t{1} << 24, 1);
    state.counters["triad_GBps"] = bytes_per_s / 1e9;
  }
}

}  // namespace

BENCHMARK(triad)->Unit(benchmark::kMillisecond)->Iterations(5);
#define LB_STEP(model, opt)                                                                                     \
  BENCHMARK_CAPTURE(step, model##_##opt##_fused, #model, #opt, lo::StepKernel::kFused)->Unit(benchmark::kMillisecond); \
  BENCHMARK_CAPTURE(step, model##_##opt##_tensor_ops, #model, #opt, lo::StepKernel::kTensorOps)->Unit(benchmark::kMillisecond);
LB_STEP(resnet18, lars)
LB_STEP(resnet18, tvlars)
LB_STEP(resnet18, lamb)
LB_STEP(resnet50, lars)
LB_STEP(resnet50, lamb)

int main(int argc, char** argv) { return largebatch_benchmark_main(argc, argv); }
