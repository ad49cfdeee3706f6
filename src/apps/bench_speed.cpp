// `largebatch bench step`: the optimizer step against per-tensor LibTorch operations, the Python reference and
// the memory-bandwidth bound; `largebatch bench train`: training images/s against PyTorch Python. Each figure
// is measured in the same run as its baseline (these machines are noisy).
#include "commands.h"
#include "bench_support.h"

#include <largebatch/core/runtime.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/layerwise.h>
#include <largebatch/report/plot.h>
#include <largebatch/train/barlow_twins.h>
#include <largebatch/train/precision.h>
#include <largebatch/train/self_supervised.h>
#include <largebatch/train/trainer.h>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <unistd.h>

namespace largebatch {
namespace apps {

namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
std::string byte_text(int64_t bytes) {
  char text[32];
  if (bytes >= (int64_t{1} << 20) && bytes % (int64_t{1} << 20) == 0)
    std::snprintf(text, sizeof text, "%lld MiB", static_cast<long long>(bytes >> 20));
  else if (bytes >= 1024 && bytes % 1024 == 0)
    std::snprintf(text, sizeof text, "%lld KiB", static_cast<long long>(bytes >> 10));
  else
    std::snprintf(text, sizeof text, "%lld B", static_cast<long long>(bytes));
  return text;
}


// ---- the Python reference (scripts/reference_bench.py through Debian's python3-torch)

// Debian's python3-torch is built for the system interpreter, which a pyenv or venv `python3` on PATH hides.
std::string default_python() { return fs::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3"; }

struct Python {
  std::string interpreter = default_python();
  std::string script;  // "" = not found
  bool enabled = true;
};

std::string find_reference_script(const std::string& given) {
  if (!given.empty()) {
    if (!fs::exists(given)) throw std::invalid_argument("--reference: no such file " + given);
    return given;
  }
  if (const char* env = std::getenv("LARGEBATCH_REFERENCE_BENCH"); env && *env) return env;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  std::vector<fs::path> candidates;
  if (!ec) candidates.push_back(exe.parent_path() / ".." / "share" / "largebatch" / "reference_bench.py");
  candidates.push_back(fs::path(LARGEBATCH_SOURCE_DIR) / "scripts" / "reference_bench.py");
  for (const auto& c : candidates)
    if (fs::exists(c)) return c.string();
  return "";
}

// The allocator this process uses, for the Python side too (same allocator, same machine).
std::string tcmalloc_path() {
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const auto pos = line.find('/');
    if (pos != std::string::npos && line.find("libtcmalloc", pos) != std::string::npos) return line.substr(pos);
  }
  return "";
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Runs the reference with `arguments`; returns its last line as JSON, or null with *why set.
json run_python(const Python& py, const std::string& arguments, std::string* why) {
  if (!py.enabled) {
    *why = "disabled (--no-python)";
    return nullptr;
  }
  if (py.script.empty()) {
    *why = "scripts/reference_bench.py not found (--reference)";
    return nullptr;
  }
  std::string command;
  const std::string preload = tcmalloc_path();
  if (!preload.empty()) command += "LD_PRELOAD=" + shell_quote(preload) + " ";
  command += shell_quote(py.interpreter) + " " + shell_quote(py.script) + " " + arguments + " 2>&1";
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) {
    *why = "cannot start " + py.interpreter;
    return nullptr;
  }
  std::string output, last;
  char buffer[4096];
  while (fgets(buffer, sizeof buffer, pipe)) output += buffer;
  const int status = pclose(pipe);
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);)
    if (!line.empty()) last = line;
  if (status != 0) {
    *why = py.interpreter + " failed (is python3-torch installed?): " + last;
    return nullptr;
  }
  try {
    return json::parse(last);
  } catch (const json::exception&) {
    *why = "unexpected output from the reference: " + last;
    return nullptr;
  }
}

std::string cell(double value, const char* format) {
  if (!(value > 0)) return "n/a";
  char text[64];
  std::snprintf(text, sizeof text, format, value);
  return text;
}

}  // namespace

int resolve_threads(int64_t threads) {
  return threads > 0 ? static_cast<int>(threads) : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string cache_summary() {
  std::string model;
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; model.empty() && std::getline(cpuinfo, line);)
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos)
      model = line.substr(line.find(':') + 2);
  const auto c = optim::cpu_caches();
  std::ostringstream os;
  os << "CPU " << (model.empty() ? "unknown" : model) << " | caches (" << c.source << "): L1d "
     << byte_text(c.l1d_bytes) << ", L2 " << byte_text(c.l2_bytes) << " per " << c.l2_shared_by << " CPU(s), L3 "
     << byte_text(c.l3_bytes) << " per " << c.l3_shared_by << " CPU(s)";
  return os.str();
}

models::ModelOptions bench_model(const std::string& name) {
  models::ModelOptions mo;
  mo.name = name;
  mo.num_classes = 10;
  // The studies' Fashion-MNIST images for the models they train; CIFAR's for ResNet-18.
  const bool small = name == "cnn" || name == "mlp" || name == "resnet20";
  mo.in_channels = small ? 1 : 3;
  mo.image_size = small ? 28 : 32;
  return mo;
}

DenseRate dense_rate(bool bf16) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(0);
  auto best_of = [](int repeats, double flops, const std::function<void()>& work) {
    work();  // first touch, kernel selection
    double best = 0;
    for (int r = 0; r < repeats; ++r) {
      const auto t0 = Clock::now();
      work();
      best = std::max(best, flops / seconds_since(t0));
    }
    return best;
  };
  DenseRate rate;
  const int64_t n = 2048;
  const auto a = torch::randn({n, n}), b = torch::randn({n, n});
  rate.matmul = best_of(5, 2.0 * n * n * n, [&] { (void)torch::mm(a, b); });
  const int64_t batch = 64, channels = 256, side = 16;
  const auto x = torch::randn({batch, channels, side, side}), w = torch::randn({channels, channels, 3, 3});
  const double taps = (3.0 * side - 2) * (3.0 * side - 2);  // those not on the zero padding
  rate.convolution = best_of(5, 2.0 * batch * channels * channels * taps, [&] { (void)torch::conv2d(x, w, {}, 1, 1); });
  if (bf16) {
    const auto xb = x.to(torch::kBFloat16), wb = w.to(torch::kBFloat16);
    rate.convolution_bf16 =
        best_of(5, 2.0 * batch * channels * channels * taps, [&] { (void)torch::conv2d(xb, wb, {}, 1, 1); });
  }
  return rate;
}

namespace {

// --threads and the Python reference's options, common to bench step and bench train.
void add_common_options(CLI::App* cmd, int64_t& threads, Python& py, std::string& reference) {
  cmd->add_option("--threads", threads, "Intra-op threads for both sides (0: all cores)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--python", py.interpreter, "Python with torch for the reference")->capture_default_str();
  cmd->add_option("--reference", reference, "Path of scripts/reference_bench.py (found by default)");
  cmd->add_flag("--no-python", [&py](int64_t) { py.enabled = false; }, "Do not run the Python reference");
}

// Sets the thread count for this process (the Python side gets the same) and finds the reference script.
int start_bench(int64_t threads_flag, Python& py, const std::string& reference) {
  const int threads = resolve_threads(threads_flag);
  torch::set_num_threads(threads);
  py.script = find_reference_script(reference);
  return threads;
}

}  // namespace

Runner add_bench_step_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand(
      "step", "Optimizer step: fused kernel vs per-tensor LibTorch ops vs the Python reference vs the bandwidth bound");
  struct Args {
    std::vector<std::string> models{"resnet18", "resnet50"}, optimizers{"lars", "tvlars", "lamb"}, instruction_sets,
        block_sizes;
    int64_t repeats = 20, threads = 0;
    std::string reference, json_out;
    Python py;
  };
  auto a = std::make_shared<Args>();
  cmd->add_option("--models", a->models, "Models whose parameter sets are stepped")->capture_default_str()->delimiter(',');
  cmd->add_option("--optimizers", a->optimizers, "Layer-wise presets")
      ->capture_default_str()
      ->delimiter(',')
      ->check(CLI::IsMember({"lars", "tvlars", "lamb"}));
  cmd->add_option("--repeats", a->repeats, "Timed steps per measurement (median)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--json", a->json_out, "Also write the measurements to this JSON file");
  cmd->add_option("--instruction-sets", a->instruction_sets,
                  "Also time the fused step with each of these instruction sets (all: every one this CPU runs)")
      ->delimiter(',');
  cmd->add_option("--block-bytes", a->block_sizes,
                  "Also time the fused step with each of these block budgets per thread (e.g. 256K,1M,4M; the "
                  "default comes from the L2 cache, LARGEBATCH_STEP_BLOCK_BYTES overrides it)")
      ->delimiter(',');
  add_common_options(cmd, a->threads, a->py, a->reference);

  return [cmd, a]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      const std::string default_set = optim::fused_step_instruction_set();
      if (a->instruction_sets == std::vector<std::string>{"all"})
        a->instruction_sets = optim::fused_step_instruction_sets();
      const auto runnable = optim::fused_step_instruction_sets();
      std::string runnable_list;
      for (const auto& name : runnable) runnable_list += name + ", ";
      for (const auto& name : a->instruction_sets)  // unknown names fail before timing
        if (std::find(runnable.begin(), runnable.end(), name) == runnable.end())
          throw std::invalid_argument("--instruction-sets: '" + name + "' is not one this build runs on this CPU (" +
                                      runnable_list + "or all)");
      std::vector<int64_t> block_sizes;
      for (const auto& text : a->block_sizes) {
        block_sizes.push_back(optim::parse_byte_count(text, "--block-bytes"));
        if (block_sizes.back() <= 0) throw std::invalid_argument("--block-bytes: '" + text + "' is not positive");
      }
      const int threads = start_bench(a->threads, a->py, a->reference);
      for (const auto& m : a->models) models::make_model(bench_model(m));  // bad names fail before timing
      const int64_t default_block = optim::fused_step_block_bytes();
      std::printf("largebatch bench step: %d thread(s), median of %lld steps; %s\n%s\n", threads,
                  static_cast<long long>(a->repeats), runtime_summary().c_str(), cache_summary().c_str());
      const double bandwidth_before = stream_triad_bandwidth();
      std::printf("STREAM triad: %.1f GB/s\n", bandwidth_before / 1e9);
      json results = json::array();
      std::vector<std::string> rows;
      for (const auto& model_name : a->models) {
        auto model = models::make_model(bench_model(model_name));
        const auto named = model->named_parameters();
        json shapes = json::array();
        for (const auto& item : named) shapes.push_back(item.value().sizes().vec());
        char shapes_file[] = "/tmp/largebatch-shapes-XXXXXX";
        const int fd = mkstemp(shapes_file);
        if (fd < 0) throw std::runtime_error("cannot create a temporary file in /tmp");
        close(fd);
        // Removed however this block ends (an exception included).
        const std::unique_ptr<char, void (*)(char*)> remove_later(shapes_file, [](char* f) { std::remove(f); });
        std::ofstream(shapes_file) << shapes.dump();
        for (const auto& opt_name : a->optimizers) {
          // Same parameters and gradients for both kernels; fresh optimizer state each.
          auto time_kernel = [&](optim::StepKernel kernel, int64_t* traffic) {
            torch::manual_seed(0);
            optim::NamedParameters params;
            for (const auto& item : named) {
              auto p = torch::randn(item.value().sizes()) * 0.05;
              p.mutable_grad() = torch::randn(item.value().sizes()) * 0.01;
              params.insert(item.key(), p);
            }
            const double lr = opt_name == "lamb" ? 0.01 : 1.0;
            auto opt = optim::make_optimizer({opt_name, lr, 4096, {}}, params);
            auto& layerwise = dynamic_cast<optim::LayerwiseOptimizer&>(*opt);
            layerwise.set_kernel(kernel);
            for (int i = 0; i < 2; ++i) layerwise.step();  // state allocated, caches warm
            std::vector<double> times;
            for (int64_t i = 0; i < a->repeats; ++i) {
              const auto t0 = Clock::now();
              layerwise.step();
              times.push_back(seconds_since(t0));
            }
            *traffic = layerwise.step_memory_traffic();
            return median(times);
          };
          int64_t traffic = 0;
          const double fused = time_kernel(optim::StepKernel::kFused, &traffic);
          const double ops = time_kernel(optim::StepKernel::kTensorOps, &traffic);
          json by_set = json::object();
          for (const auto& name : a->instruction_sets) {
            optim::use_fused_step_instruction_set(name);
            by_set[name] = time_kernel(optim::StepKernel::kFused, &traffic);
          }
          optim::use_fused_step_instruction_set(default_set);
          json by_block = json::object();
          for (const int64_t bytes : block_sizes) {
            optim::use_fused_step_block_bytes(bytes);
            by_block[std::to_string(bytes)] = time_kernel(optim::StepKernel::kFused, &traffic);
          }
          optim::use_fused_step_block_bytes(default_block);
          std::string why;
          const json py = run_python(a->py,
                                     "step --shapes " + shell_quote(shapes_file) + " --optimizer " + opt_name +
                                         " --repeats " + std::to_string(a->repeats) + " --threads " +
                                         std::to_string(threads),
                                     &why);
          const double python = py.is_null() ? 0.0 : py.at("median_s").get<double>();
          if (py.is_null()) std::fprintf(stderr, "Python reference skipped: %s\n", why.c_str());
          int64_t count = 0;
          for (const auto& item : named) count += item.value().numel();
          results.push_back({{"model", model_name}, {"optimizer", opt_name}, {"parameters", count},
                             {"fused_s", fused}, {"tensor_ops_s", ops}, {"python_s", python},
                             {"bytes", traffic}, {"fused_s_by_instruction_set", by_set},
                             {"fused_s_by_block_bytes", by_block}});
        }
      }
      const double bandwidth_after = stream_triad_bandwidth();
      const double bandwidth = std::max(bandwidth_before, bandwidth_after);  // the faster: the stricter bound
      std::printf("STREAM triad again: %.1f GB/s; the bound uses %.1f GB/s\n\n", bandwidth_after / 1e9,
                  bandwidth / 1e9);
      std::printf("| model | optimizer | parameters | fused ms | tensor ops ms | Python ms | bound ms | fused / bound |"
                  " tensor ops / fused | Python / fused | Python / bound |\n"
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
      for (auto& r : results) {
        const double fused = r["fused_s"], ops = r["tensor_ops_s"], python = r["python_s"];
        const double bound = static_cast<double>(r["bytes"].get<int64_t>()) / bandwidth;
        r["bound_s"] = bound;
        std::printf("| %s | %s | %.2fM | %.2f | %.2f | %s | %.2f | %.2f | %.2f | %s | %s |\n",
                    r["model"].get<std::string>().c_str(), r["optimizer"].get<std::string>().c_str(),
                    r["parameters"].get<int64_t>() / 1e6, fused * 1e3, ops * 1e3, cell(python * 1e3, "%.2f").c_str(),
                    bound * 1e3, fused / bound, ops / fused, cell(python / fused, "%.2f").c_str(),
                    cell(python / bound, "%.2f").c_str());
      }
      if (!a->instruction_sets.empty()) {
        std::printf("\nThe fused step (ms) by instruction set (the default: %s; every one gives the same bits)\n\n| model "
                    "| optimizer |", default_set.c_str());
        for (const auto& name : a->instruction_sets) std::printf(" %s | / bound |", name.c_str());
        std::printf("\n| --- | --- |");
        for (size_t k = 0; k < a->instruction_sets.size(); ++k) std::printf(" --- | --- |");
        std::printf("\n");
        for (const auto& r : results) {
          std::printf("| %s | %s |", r["model"].get<std::string>().c_str(), r["optimizer"].get<std::string>().c_str());
          for (const auto& name : a->instruction_sets) {
            const double t = r["fused_s_by_instruction_set"][name];
            std::printf(" %.2f | %.2f |", t * 1e3, t / r["bound_s"].get<double>());
          }
          std::printf("\n");
        }
      }
      if (!block_sizes.empty()) {
        std::printf("\nThe fused step (ms) by block budget per thread (the default: %s; every one gives the same "
                    "bits)\n\n| model | optimizer |", byte_text(default_block).c_str());
        for (const int64_t bytes : block_sizes) std::printf(" %s | / bound |", byte_text(bytes).c_str());
        std::printf("\n| --- | --- |");
        for (size_t k = 0; k < block_sizes.size(); ++k) std::printf(" --- | --- |");
        std::printf("\n");
        for (const auto& r : results) {
          std::printf("| %s | %s |", r["model"].get<std::string>().c_str(), r["optimizer"].get<std::string>().c_str());
          for (const int64_t bytes : block_sizes) {
            const double t = r["fused_s_by_block_bytes"][std::to_string(bytes)];
            std::printf(" %.2f | %.2f |", t * 1e3, t / r["bound_s"].get<double>());
          }
          std::printf("\n");
        }
      }
      if (!a->json_out.empty()) {
        const auto caches = optim::cpu_caches();
        json out = {{"threads", threads},
                    {"cpu_caches", {{"l1d_bytes", caches.l1d_bytes}, {"l2_bytes", caches.l2_bytes},
                                    {"l2_shared_by", caches.l2_shared_by}, {"l3_bytes", caches.l3_bytes},
                                    {"l3_shared_by", caches.l3_shared_by}, {"source", caches.source}}},
                    {"fused_step_block_bytes", default_block},
                    {"stream_triad_bytes_per_s", bandwidth},
                    {"fused_step_instruction_set", default_set},
                    {"results", results}};
        std::ofstream(a->json_out) << out.dump(2) << "\n";
      }
      return 0;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch bench step: %s\n", e.what());
      return kExitBadInput;
    }
  };
}

namespace {

// The options bench train and bench pretrain share.
struct SpeedArgs {
  std::string model, optimizer = "lars", precision = "fp32", reference, out;
  std::vector<int64_t> batches{512};
  int64_t steps = 5, warmup = 2, threads = 0;
  bool channels_last = false, cpu_kernels = true;
  Python py;
};

void add_speed_options(CLI::App* cmd, SpeedArgs& a, const std::string& what) {
  cmd->add_option("--optimizer", a.optimizer, "lars, tvlars or lamb (the Python side uses its reference)")
      ->capture_default_str()
      ->check(CLI::IsMember({"lars", "tvlars", "lamb"}));
  cmd->add_option("--batch-sizes", a.batches, "Batch sizes measured")->capture_default_str()->delimiter(',')->check(CLI::PositiveNumber);
  cmd->add_option("--steps", a.steps, "Timed steps per measurement (median)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", a.warmup, "Untimed steps first")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_flag("--channels-last", a.channels_last,
                "Channels-last activations on both sides (as train --channels-last; Python's .to(memory_format=))");
  cmd->add_option("--cpu-kernels,--small-map-kernels", a.cpu_kernels,
                  "largebatch's CPU kernels: max pooling, 1x1 and 2x2 maps, BatchNorm, the cnn's fused first layer unless LARGEBATCH_FUSED_FIRST_LAYER=0, "
                  "Winograd 3x3 convolutions unless LARGEBATCH_WINOGRAD=0 (as train "
                  "--cpu-kernels; Python runs "
                  "LibTorch's)")
      ->capture_default_str();
  cmd->add_option("--precision", a.precision,
                  "fp32, or bf16: the forward pass under bfloat16 autocast on both sides (" + what + " --precision)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--out", a.out, "Write bench_" + what + ".csv and bench_" + what +
                                      ".png (step time and images/s against batch size) here");
  add_common_options(cmd, a.threads, a.py, a.reference);
}

// What differs between the benchmarks: the step of one batch size, and the Python reference's arguments.
struct SpeedBench {
  std::string what;   // "train" or "pretrain": the command and the output names
  std::string title;  // after "largebatch bench <what>: "
  std::function<std::function<void()>(int64_t batch)> make_step;
  std::function<std::string(int64_t batch)> python_arguments;
};

// Median step time of ours and of the Python reference for every batch size, in the same run, with the
// training arithmetic against the dense rate measured first; a table, and with --out a CSV and a plot.
int run_speed_bench(const SpeedArgs& a, const SpeedBench& bench) {
  try {
    Python py = a.py;
    const int threads = start_bench(a.threads, py, a.reference);
    std::printf("largebatch bench %s: %s%s%s, %s, %s, %d thread(s), median of %lld steps after %lld; %s\n",
                bench.what.c_str(), bench.title.c_str(), a.channels_last ? " (channels-last)" : "",
                a.cpu_kernels ? "" : " (LibTorch's kernels)", a.optimizer.c_str(), a.precision.c_str(), threads,
                static_cast<long long>(a.steps), static_cast<long long>(a.warmup), runtime_summary().c_str());
    const DenseRate roof = dense_rate(a.precision == "bf16");
    std::printf("Dense arithmetic in this run: matrix multiply %.1f GFLOP/s, 3x3 convolution %.1f GFLOP/s",
                roof.matmul / 1e9, roof.convolution / 1e9);
    if (roof.convolution_bf16 > 0)
      std::printf(", 3x3 convolution in bf16 %.1f GFLOP/s (the rates below are against the best of the three)",
                  roof.convolution_bf16 / 1e9);
    std::printf("\n");
    std::printf("| batch | largebatch step ms | largebatch img/s | Python step ms | Python img/s | ratio |"
                " largebatch GFLOP/s (of dense) | Python GFLOP/s (of dense) |\n"
                "| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    std::ostringstream csv;
    csv << "batch_size,largebatch_step_s,largebatch_img_per_s,python_step_s,python_img_per_s,ratio,"
           "train_flops_per_image,dense_flops_per_s\n";
    for (int64_t batch : a.batches) {
      const auto one_step = bench.make_step(batch);
      for (int64_t i = 0; i < a.warmup; ++i) one_step();
      std::vector<double> times;
      for (int64_t i = 0; i < a.steps; ++i) {
        const auto t0 = Clock::now();
        one_step();
        times.push_back(seconds_since(t0));
      }
      const double ours = median(times);
      std::string why;
      const json result =
          run_python(py,
                     bench.python_arguments(batch) + " --optimizer " + a.optimizer + " --batch-size " +
                         std::to_string(batch) + " --steps " + std::to_string(a.steps) + " --warmup " +
                         std::to_string(a.warmup) + " --threads " + std::to_string(threads) +
                         (a.channels_last ? " --channels-last" : "") + " --precision " + a.precision,
                     &why);
      const double python = result.is_null() ? 0.0 : result.at("median_s").get<double>();
      if (result.is_null()) std::fprintf(stderr, "Python reference skipped: %s\n", why.c_str());
      const double ratio = python > 0 ? python / ours : 0.0;
      // Training arithmetic per image: the multiply-adds of the forward pass, the weight gradients and the
      // input gradients (counted by the Python side, padding taps left out), 2 FLOP each.
      const double flops = result.is_null() ? 0.0 : 2.0 * result.value("train_macs_per_image", 0.0);
      auto rate = [&](double step_s) {
        if (flops <= 0 || step_s <= 0) return std::string("n/a");
        char text[64];
        const double r = flops * static_cast<double>(batch) / step_s;
        std::snprintf(text, sizeof text, "%.1f (%.0f %%)", r / 1e9, 100.0 * r / roof.best());
        return std::string(text);
      };
      std::printf("| %lld | %.1f | %.0f | %s | %s | %s | %s | %s |\n", static_cast<long long>(batch), ours * 1e3,
                  batch / ours, cell(python * 1e3, "%.1f").c_str(), cell(python > 0 ? batch / python : 0, "%.0f").c_str(),
                  cell(ratio, "%.2f").c_str(), rate(ours).c_str(), rate(python).c_str());
      std::fflush(stdout);
      csv << batch << "," << ours << "," << batch / ours << "," << python << ","
          << (python > 0 ? batch / python : 0.0) << "," << ratio << "," << flops << "," << roof.best() << "\n";
    }
    if (!a.out.empty()) {
      fs::create_directories(a.out);
      const std::string csv_path = (fs::path(a.out) / ("bench_" + bench.what + ".csv")).string();
      std::ofstream(csv_path) << csv.str();
      report::PlotSpec spec;
      spec.png = (fs::path(a.out) / ("bench_" + bench.what + ".png")).string();
      spec.title = bench.what + " speed, " + bench.title + ", " + a.optimizer + ", " + a.precision + ", " +
                   std::to_string(threads) + " thread(s)";
      spec.x_label = "batch size";
      spec.y_label = "images/s";
      spec.y2_label = "step time (s)";
      spec.log_x = true;
      spec.series = {{csv_path, "batch_size", "largebatch_img_per_s", "largebatch images/s", false},
                     {csv_path, "batch_size", "python_img_per_s", "PyTorch Python images/s", false},
                     {csv_path, "batch_size", "largebatch_step_s", "largebatch step time", true},
                     {csv_path, "batch_size", "python_step_s", "PyTorch Python step time", true}};
      std::string error;
      if (!report::plot(spec, &error)) std::fprintf(stderr, "no plot: %s\n", error.c_str());
      std::printf("wrote %s and %s\n", csv_path.c_str(), spec.png.c_str());
    }
    return 0;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "largebatch bench %s: %s\n", bench.what.c_str(), e.what());
    return kExitBadInput;
  }
}

double bench_lr(const std::string& optimizer) { return optimizer == "lamb" ? 0.01 : 1.0; }

std::string number_text(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.17g", v);
  return text;
}

}  // namespace

Runner add_bench_train_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand("train", "Training images/s against PyTorch Python on the same model, batch, "
                                            "threads and optimizer (synthetic batch in memory)");
  auto a = std::make_shared<SpeedArgs>();
  a->model = "resnet18";
  cmd->add_option("--model", a->model, "resnet18 (torchvision layout, 3x32x32 inputs); resnet20 (CIFAR layout), cnn or "
                                       "mlp (1x28x28, as the Fashion-MNIST studies)")
      ->capture_default_str()
      ->check(CLI::IsMember({"resnet18", "resnet20", "cnn", "mlp"}));
  add_speed_options(cmd, *a, "train");
  return [cmd, a]() -> int {
    if (!cmd->parsed()) return -1;
    SpeedBench b;
    b.what = "train";
    b.title = a->model;
    b.python_arguments = [a](int64_t) { return "train --model " + a->model; };
    b.make_step = [a](int64_t batch) -> std::function<void()> {
      const auto mo = bench_model(a->model);
      auto model = models::make_model(mo);
      model->set_channels_last(a->channels_last);
      model->set_cpu_kernels(a->cpu_kernels);
      model->train();
      auto opt = std::shared_ptr<torch::optim::Optimizer>(
          optim::make_optimizer({a->optimizer, bench_lr(a->optimizer), batch, {}}, model->named_parameters()));
      torch::manual_seed(0);
      const auto x = torch::randn({batch, mo.in_channels, mo.image_size, mo.image_size});
      const auto y = torch::randint(0, 10, {batch}, torch::kLong);
      return [a, model, opt, x, y] {
        opt->zero_grad();
        torch::Tensor logits;
        {
          const train::AutocastGuard autocast(a->precision == "bf16", torch::kCPU);
          logits = model->forward(x);
        }
        auto loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat), y);
        loss.backward();
        opt->step();
        (void)loss.item<double>();  // the trainer reads the loss once per step too
      };
    };
    return run_speed_bench(*a, b);
  };
}

Runner add_bench_pretrain_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand(
      "pretrain", "The Barlow Twins step (backbone and projector on two views, the loss, backward, optimizer) in "
                  "images/s against PyTorch Python doing the same (views drawn once, in memory; the augmentation "
                  "is data work and not in it)");
  auto a = std::make_shared<SpeedArgs>();
  a->model = "resnet20";
  auto projector = std::make_shared<std::string>("1024-1024-1024");
  auto lambda = std::make_shared<double>(0.005);
  cmd->add_option("--model", a->model, "Backbone: resnet20 or cnn (1x28x28, as the Fashion-MNIST studies)")
      ->capture_default_str()
      ->check(CLI::IsMember({"resnet20", "cnn"}));
  cmd->add_option("--projector", *projector, "Projector layer sizes (pretrain --projector)")->capture_default_str();
  cmd->add_option("--lambda", *lambda, "Weight of the off-diagonal term (pretrain --lambda)")->capture_default_str();
  add_speed_options(cmd, *a, "pretrain");
  return [cmd, a, projector, lambda]() -> int {
    if (!cmd->parsed()) return -1;
    std::vector<int64_t> sizes;
    try {
      sizes = train::parse_projector(*projector);
    } catch (const train::OptionError& e) {
      std::fprintf(stderr, "largebatch bench pretrain: %s\n", e.worded("--").c_str());
      return kExitBadInput;
    }
    SpeedBench b;
    b.what = "pretrain";
    b.title = "Barlow Twins, " + a->model + " + projector " + *projector;
    b.python_arguments = [a, projector, lambda](int64_t) {
      return "pretrain --model " + a->model + " --projector " + *projector + " --lambda " + number_text(*lambda);
    };
    b.make_step = [a, sizes, lambda](int64_t batch) -> std::function<void()> {
      auto mo = bench_model(a->model);
      auto backbone = models::make_model(mo);
      backbone->set_channels_last(a->channels_last);
      backbone->set_cpu_kernels(a->cpu_kernels);
      train::BarlowTwinsNet net(backbone, sizes);
      net->train();
      auto opt = std::shared_ptr<torch::optim::Optimizer>(
          optim::make_optimizer({a->optimizer, bench_lr(a->optimizer), batch, {}}, net->trainable()));
      torch::manual_seed(0);
      const auto v1 = torch::randn({batch, mo.in_channels, mo.image_size, mo.image_size});
      const auto v2 = torch::randn({batch, mo.in_channels, mo.image_size, mo.image_size});
      const double l = *lambda;
      return [a, net, opt, v1, v2, l]() mutable {
        opt->zero_grad();
        torch::Tensor z1, z2;
        {
          const train::AutocastGuard autocast(a->precision == "bf16", torch::kCPU);
          z1 = net->forward(v1);
          z2 = net->forward(v2);
        }
        auto loss = train::barlow_twins_loss(z1.to(torch::kFloat), z2.to(torch::kFloat), l);
        loss.backward();
        opt->step();
        (void)loss.item<double>();
      };
    };
    return run_speed_bench(*a, b);
  };
}

}  // namespace apps
}  // namespace largebatch
