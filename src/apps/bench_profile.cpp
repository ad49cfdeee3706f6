// `largebatch bench profile`: where one training step's time goes, by phase (data, forward, loss, backward,
// optimizer) and by layer type (convolution, BatchNorm, pooling, activations, linear layers, loss), with the
// convolutions' arithmetic rate against the dense rate of the same run; the convolution backward pass is
// replayed layer by layer to split it into input and weight gradients.
//
// Operations are timed through LibTorch's RecordFunction callbacks: an operation of the training thread counts
// when no other one encloses it (so nothing is counted twice), a backward node under the layer type of the forward
// operation that made it (matched by autograd sequence number). Time in a phase outside any operation is the
// framework's own (dispatch, the autograd engine, allocation).
#include "bench_support.h"
#include "commands.h"

#include <largebatch/core/runtime.h>
#include <largebatch/data/dataset.h>
#include <largebatch/data/pipeline.h>
#include <largebatch/models/winograd_conv.h>
#include <largebatch/optim/factory.h>
#include <largebatch/train/barlow_twins.h>
#include <largebatch/train/precision.h>
#include <largebatch/train/self_supervised.h>

#include <ATen/SequenceNumber.h>
#include <ATen/record_function.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <map>
#include <thread>
#include <unordered_map>

namespace largebatch {
namespace apps {

namespace {

using json = nlohmann::json;
bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

// The layer type of a forward operation, from its name.
std::string layer_type(const std::string& name) {
  if (contains(name, "conv")) return "convolution";
  if (contains(name, "batch_norm")) return "BatchNorm";
  if (contains(name, "pool")) return "pooling";
  if (contains(name, "relu") || contains(name, "threshold") || contains(name, "gelu") || contains(name, "sigmoid"))
    return "activation";
  if (contains(name, "linear") || contains(name, "addmm") || contains(name, "matmul") || name == "aten::mm")
    return "linear";
  if (contains(name, "empty") || contains(name, "zeros") || contains(name, "ones")) return "allocation";
  return "other (adds, copies, views)";
}

// Everything the callbacks see, reached through one object: RecordFunction takes plain functions. Only the
// stepping thread's operations reach it (below), so it needs no lock.
struct Profile {
  std::string phase;  // set by the benchmark between phases, read by the callbacks
  std::map<std::string, double> seconds;  // "layer type forward|backward" -> time
  std::unordered_map<uint64_t, std::string> type_of_sequence;  // autograd sequence number -> layer type
};
Profile profile;
thread_local int depth = 0;
// The thread that runs the steps: the loader's workers run operations too, at the same time, and do not count.
std::thread::id stepping_thread;

struct Started : at::ObserverContext {
  Clock::time_point t0;
  uint64_t first_sequence = 0;
  bool outermost = false;
  bool ignored = false;  // the engine's wrapper of a node, or another thread's operation
};

// The autograd engine wraps each backward node in a range of this name; the node inside is what counts.
bool engine_wrapper(const at::RecordFunction& fn) {
  return std::strncmp(fn.name(), "autograd::engine::evaluate_function", 35) == 0;
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  auto started = std::make_unique<Started>();
  started->ignored = engine_wrapper(fn) || std::this_thread::get_id() != stepping_thread;
  if (started->ignored) return started;
  started->outermost = depth++ == 0;
  if (started->outermost) {
    started->first_sequence = at::sequence_number::peek();
    started->t0 = Clock::now();
  }
  return started;
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* context) {
  auto* started = static_cast<Started*>(context);
  if (started->ignored) return;
  --depth;
  if (!started->outermost) return;
  const double s = seconds_since(started->t0);
  const std::string name = fn.name();
  std::string key;
  if (fn.scope() == at::RecordScope::BACKWARD_FUNCTION) {
    const auto found = profile.type_of_sequence.find(static_cast<uint64_t>(fn.seqNr()));
    if (contains(name, "AccumulateGrad")) key = "gradient accumulation";
    else key = (found != profile.type_of_sequence.end() ? found->second : layer_type(name)) + " backward";
  } else if (profile.phase == "backward") {
    key = "gradient accumulation";  // sums of gradients that reach a node by several paths
  } else {
    const std::string type = profile.phase == "model forward" ? layer_type(name) : profile.phase;
    // The autograd nodes this operation made took the sequence numbers from first_sequence on.
    for (uint64_t q = started->first_sequence; q < at::sequence_number::peek(); ++q) profile.type_of_sequence[q] = type;
    key = profile.phase == "model forward" ? type + " forward" : type;
  }
  profile.seconds[key] += s;
}

// One 2-D convolution of the model: its arguments as aten::conv2d received them.
struct ConvCall {
  std::vector<int64_t> input, weight, stride, padding, dilation;
  int64_t groups = 1;
  bool input_grad = true;  // the input needs a gradient (not the network's input)
  bool operator<(const ConvCall& o) const {
    return std::tie(input, weight, stride, padding, dilation, groups, input_grad) <
           std::tie(o.input, o.weight, o.stride, o.padding, o.dilation, o.groups, o.input_grad);
  }
};
std::map<ConvCall, int64_t> conv_calls;  // filled by the shape pass: how often each appears per step

std::vector<int64_t> int_list(const c10::IValue& v) { return v.isIntList() ? v.toIntVector() : std::vector<int64_t>{}; }

std::unique_ptr<at::ObserverContext> on_conv_start(const at::RecordFunction& fn) {
  if (depth++ != 0 || std::string(fn.name()) != "aten::conv2d") return nullptr;
  const auto inputs = fn.inputs();
  if (inputs.size() < 7 || !inputs[0].isTensor() || !inputs[1].isTensor()) return nullptr;
  ConvCall c;
  c.input = inputs[0].toTensor().sizes().vec();
  c.weight = inputs[1].toTensor().sizes().vec();
  c.input_grad = inputs[0].toTensor().requires_grad();
  c.stride = int_list(inputs[3]);
  c.padding = int_list(inputs[4]);
  c.dilation = int_list(inputs[5]);
  c.groups = inputs[6].isInt() ? inputs[6].toInt() : 1;
  if (c.stride.size() == 2 && c.padding.size() == 2 && c.dilation.size() == 2) conv_calls[c] += 1;
  return nullptr;
}
void on_conv_end(const at::RecordFunction&, at::ObserverContext*) { --depth; }

// Multiply-adds of one convolution's forward pass, taps on the zero padding left out (as the dense rate).
double conv_macs(const ConvCall& c) {
  double taps = 1;
  for (int d = 0; d < 2; ++d) {
    const int64_t in = c.input[2 + d], k = c.weight[2 + d];
    const int64_t out = (in + 2 * c.padding[d] - c.dilation[d] * (k - 1) - 1) / c.stride[d] + 1;
    int64_t joined = 0;
    for (int64_t o = 0; o < out; ++o)
      for (int64_t t = 0; t < k; ++t) {
        const int64_t i = o * c.stride[d] - c.padding[d] + t * c.dilation[d];
        joined += i >= 0 && i < in;
      }
    taps *= static_cast<double>(joined);
  }
  return static_cast<double>(c.input[0]) * c.weight[0] * c.weight[1] * taps;
}

std::string fixed(double value, int decimals) {
  char text[64];
  std::snprintf(text, sizeof text, "%.*f", decimals, value);
  return text;
}

std::string shape_text(const std::vector<int64_t>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? "x" : "") + std::to_string(v[i]);
  return s;
}

// One step's phases: everything the benchmark runs, so that the profile can time each one.
struct Step {
  std::function<void()> data, zero_grad, step;
  std::function<torch::Tensor()> forward;                    // the model on this step's batch
  std::function<torch::Tensor(const torch::Tensor&)> loss;  // the loss of the forward's output
  std::shared_ptr<torch::nn::Module> model;
};

struct Args {
  std::string model = "resnet20", task = "classification", optimizer = "lars", data = "fashion-mnist", data_dir,
              projector = "1024-1024-1024", json_out, precision = "fp32";
  int64_t batch = 512, steps = 5, warmup = 2, threads = 0, replays = 5;
  bool cpu_kernels = true, channels_last = false;
};

Step make_step(const Args& a, const data::ImageDataset& images) {
  auto mo = bench_model(a.model);
  mo.in_channels = images.channels();
  mo.image_size = images.height();
  auto backbone = models::make_model(mo);
  backbone->set_cpu_kernels(a.cpu_kernels);
  backbone->set_channels_last(a.channels_last);
  Step s;
  data::LoaderOptions lo;
  lo.batch_size = a.batch;
  lo.drop_last = true;
  lo.augment = data::augment_preset(a.task == "classification" ? "paper" : "none", a.data);
  auto loader = std::make_shared<data::BatchLoader>(images, lo);
  auto batch = std::make_shared<data::Batch>();
  auto epoch = std::make_shared<int64_t>(0);
  loader->start_epoch(0);
  auto next_batch = [loader, batch, epoch] {
    if (!loader->next(*batch)) {
      loader->start_epoch(++*epoch);
      loader->next(*batch);
    }
  };
  std::shared_ptr<torch::optim::Optimizer> opt;
  if (a.task == "classification") {
    backbone->train();
    s.model = backbone;
    opt = std::shared_ptr<torch::optim::Optimizer>(
        optim::make_optimizer({a.optimizer, a.optimizer == "lamb" ? 0.01 : 1.0, a.batch, {}}, backbone->named_parameters()));
    s.data = next_batch;
    s.forward = [backbone, batch] { return backbone->forward(batch->images); };
    s.loss = [batch](const torch::Tensor& logits) {
      return torch::nn::functional::cross_entropy(logits.to(torch::kFloat), batch->labels);
    };
  } else {
    train::BarlowTwinsNet net(backbone, train::parse_projector(a.projector));
    net->train();
    s.model = net.ptr();
    opt = std::shared_ptr<torch::optim::Optimizer>(
        optim::make_optimizer({a.optimizer, a.optimizer == "lamb" ? 0.01 : 1.0, a.batch, {}}, net->trainable()));
    auto views = std::make_shared<std::pair<torch::Tensor, torch::Tensor>>();
    // The data work pretrain does on the training thread: the batch, then its two augmented views.
    s.data = [next_batch, batch, views, epoch] {
      next_batch();
      const uint64_t seed = static_cast<uint64_t>(*epoch * 100003 + batch->index);
      views->first = train::barlow_twins_view(batch->images, 0, seed, batch->images.size(0), 0);
      views->second = train::barlow_twins_view(batch->images, 1, seed, batch->images.size(0), 0);
    };
    auto z2 = std::make_shared<torch::Tensor>();
    s.forward = [net, views, z2]() mutable {
      *z2 = net->forward(views->second);
      return net->forward(views->first);
    };
    s.loss = [z2](const torch::Tensor& z1) {
      return train::barlow_twins_loss(z1.to(torch::kFloat), z2->to(torch::kFloat), 0.005);
    };
  }
  s.zero_grad = [opt] { opt->zero_grad(); };
  s.step = [opt] { opt->step(); };
  return s;
}

struct Row {
  std::string what;
  double seconds = 0;  // per step
  double flops = 0;    // per step, where counted
};

}  // namespace

Runner add_bench_profile_command(CLI::App& bench) {
  auto* cmd = bench.add_subcommand(
      "profile", "Where one training step's time goes: phases and layer types (convolution forward, input and "
                 "weight gradients, BatchNorm, pooling, activations, loss, optimizer, data) against the dense rate");
  auto a = std::make_shared<Args>();
  cmd->add_option("--model", a->model, "cnn or resnet20 (the studies' models), resnet18")
      ->capture_default_str()
      ->check(CLI::IsMember({"cnn", "resnet20", "resnet18", "mlp"}));
  cmd->add_option("--task", a->task, "classification (train's step) or barlow-twins (pretrain's step)")
      ->capture_default_str()
      ->check(CLI::IsMember({"classification", "barlow-twins"}));
  cmd->add_option("--optimizer", a->optimizer, "lars, tvlars or lamb")
      ->capture_default_str()
      ->check(CLI::IsMember({"lars", "tvlars", "lamb"}));
  cmd->add_option("--data", a->data, "Data set whose batches the step trains on")->capture_default_str();
  cmd->add_option("--data-dir", a->data_dir, "Directory of the data set");
  cmd->add_option("--batch-size", a->batch, "Batch size")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--steps", a->steps, "Profiled steps (times are per step)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--warmup", a->warmup, "Unprofiled steps first")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--projector", a->projector, "Projector layer sizes (barlow-twins)")->capture_default_str();
  cmd->add_option("--replays", a->replays, "Timed replays of each convolution (median)")->capture_default_str()->check(CLI::PositiveNumber);
  cmd->add_option("--cpu-kernels", a->cpu_kernels, "largebatch's CPU kernels (as train --cpu-kernels)")->capture_default_str();
  cmd->add_flag("--channels-last", a->channels_last, "Channels-last activations (as train --channels-last)");
  cmd->add_option("--precision", a->precision, "fp32, or bf16: the forward pass under bfloat16 autocast (as train --precision)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp32", "bf16"}));
  cmd->add_option("--threads", a->threads, "Intra-op threads (0: all cores)")->capture_default_str()->check(CLI::NonNegativeNumber);
  cmd->add_option("--json", a->json_out, "Also write the profile to this JSON file");
  return [cmd, a]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      if (a->task == "barlow-twins") (void)train::parse_projector(a->projector);
      const int threads = resolve_threads(a->threads);
      torch::set_num_threads(threads);
      const auto split = data::load_dataset(a->data, a->data_dir);
      const bool bf16 = a->precision == "bf16";
      std::printf("largebatch bench profile: %s, %s step, batch %lld, %s, %s, %d thread(s), %lld steps after %lld; %s\n%s\n",
                  a->model.c_str(), a->task.c_str(), static_cast<long long>(a->batch), a->optimizer.c_str(),
                  a->precision.c_str(), threads,
                  static_cast<long long>(a->steps), static_cast<long long>(a->warmup), runtime_summary().c_str(),
                  cache_summary().c_str());
      const DenseRate roof = dense_rate(bf16);
      std::printf("Dense arithmetic in this run: matrix multiply %.1f GFLOP/s, 3x3 convolution %.1f GFLOP/s",
                  roof.matmul / 1e9, roof.convolution / 1e9);
      if (bf16) std::printf(", 3x3 convolution in bf16 %.1f GFLOP/s (rates are against the best)", roof.convolution_bf16 / 1e9);
      std::printf("\n");
      Step s = make_step(*a, split.train);
      auto run = [&](bool timed, std::map<std::string, double>* phases) {
        auto phase = [&](const char* name, const std::function<void()>& work) {
          profile.phase = name;
          const auto t0 = Clock::now();
          work();
          if (timed) (*phases)[name] += seconds_since(t0);
        };
        torch::Tensor out, loss;
        phase("data", s.data);
        phase("zero_grad", s.zero_grad);
        phase("model forward", [&] {
          const train::AutocastGuard autocast(bf16, torch::kCPU);
          out = s.forward();
        });
        phase("loss", [&] { loss = s.loss(out); });
        phase("backward", [&] { loss.backward(); });
        phase("optimizer", s.step);
        (void)loss.item<double>();
      };

      // The convolutions' shapes, from one forward pass through aten::conv2d (the model's own kernels off).
      {
        auto* classifier = dynamic_cast<models::ClassifierImpl*>(s.model.get());
        if (!classifier) classifier = dynamic_cast<train::BarlowTwinsNetImpl&>(*s.model).backbone.get();
        classifier->set_cpu_kernels(false);
        s.data();
        auto handle = at::addGlobalCallback(at::RecordFunctionCallback(on_conv_start, on_conv_end).needsInputs(true));
        { (void)s.forward(); }
        at::removeCallback(handle);
        classifier->set_cpu_kernels(a->cpu_kernels);
      }

      for (int64_t i = 0; i < a->warmup; ++i) run(false, nullptr);
      std::map<std::string, double> phases;
      profile.seconds.clear();
      stepping_thread = std::this_thread::get_id();
      auto handle = at::addGlobalCallback(at::RecordFunctionCallback(on_start, on_end));
      const auto t0 = Clock::now();
      for (int64_t i = 0; i < a->steps; ++i) run(true, &phases);
      const double step_s = seconds_since(t0) / static_cast<double>(a->steps);
      at::removeCallback(handle);
      const double per = 1.0 / static_cast<double>(a->steps);

      // The convolutions replayed alone: forward, input gradient, weight gradient, each the median of --replays.
      torch::NoGradGuard no_grad;
      double conv_forward_macs = 0, conv_input_macs = 0, conv_weight_macs = 0;
      double replay_forward = 0, replay_input = 0, replay_weight = 0;
      json per_shape = json::array();
      std::printf("\nEach convolution replayed alone (median of %lld), ms per step (calls per step x time):\n\n"
                  "| input | weight | stride | algorithm | calls | forward ms | GFLOP/s | input grad ms | GFLOP/s | weight "
                  "grad ms | GFLOP/s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
                  static_cast<long long>(a->replays));
      for (const auto& call : conv_calls) {
        const ConvCall& c = call.first;  // a named reference: lambdas below capture it
        const double n = static_cast<double>(call.second);  // calls per step
        // Under bf16 autocast the convolutions LibTorch runs are bfloat16 ones: replayed so. The cnn's fused first
        // layer (float32 there too) is replayed as LibTorch's convolution, as in float32.
        const auto dtype = bf16 ? torch::kBFloat16 : torch::kFloat;
        const auto x = torch::randn(c.input).to(dtype), w = torch::randn(c.weight).to(dtype);
        auto y = torch::conv2d(x, w, {}, c.stride, c.padding, c.dilation, c.groups);
        const auto dy = torch::randn_like(y);
        auto time_of = [&](const std::function<void()>& work) {
          work();
          std::vector<double> t;
          for (int64_t r = 0; r < a->replays; ++r) {
            const auto r0 = Clock::now();
            work();
            t.push_back(seconds_since(r0));
          }
          return median(t);
        };
        // The model's own kernels take 3x3 stride-1 convolutions of these shapes to Winograd (models.h): replayed so.
        const std::vector<int64_t> kernel(c.weight.begin() + std::min<size_t>(2, c.weight.size()), c.weight.end());
        const bool winograd = a->cpu_kernels && !bf16 &&
                              models::winograd_conv3x3_geometry(kernel, c.stride, c.padding, c.dilation, c.groups) &&
                              models::winograd_conv3x3_takes(x, w, {});
        const double fwd = time_of([&] {
          y = winograd ? models::winograd_conv3x3(x, w, {}) : torch::conv2d(x, w, {}, c.stride, c.padding, c.dilation, c.groups);
        });
        std::pair<torch::Tensor, torch::Tensor> input_graph, weight_graph;  // (what the gradient is for, output)
        auto backward = [&](bool input, bool weight) {
          if (!winograd) {
            (void)at::convolution_backward(dy, x, w, c10::nullopt, c.stride, c.padding, c.dilation, false, {0, 0},
                                           c.groups, {input, weight, false});
            return;
          }
          // The backward pass of a forward pass kept from before the timing (retain_graph), so only it is timed.
          torch::AutoGradMode grad_mode(true);
          auto& graph = input ? input_graph : weight_graph;
          if (!graph.first.defined()) {
            graph.first = (input ? x : w).detach().requires_grad_(true);
            graph.second = input ? models::winograd_conv3x3(graph.first, w, {}) : models::winograd_conv3x3(x, graph.first, {});
          }
          (void)torch::autograd::grad({graph.second}, {graph.first}, {dy}, /*retain_graph=*/true);
        };
        const double in = c.input_grad ? time_of([&] { backward(true, false); }) : 0.0;
        const double wt = time_of([&] { backward(false, true); });
        const double macs = conv_macs(c);
        conv_forward_macs += n * macs;
        conv_input_macs += c.input_grad ? n * macs : 0;
        conv_weight_macs += n * macs;
        replay_forward += n * fwd;
        replay_input += n * in;
        replay_weight += n * wt;
        auto rate = [&](double seconds) { return seconds > 0 ? 2 * macs / seconds / 1e9 : 0.0; };
        std::printf("| %s | %s | %lld | %s | %.0f | %.2f | %.1f | %s | %s | %.2f | %.1f |\n", shape_text(c.input).c_str(),
                    shape_text(c.weight).c_str(), static_cast<long long>(c.stride[0]), winograd ? "winograd" : "direct",
                    n, n * fwd * 1e3, rate(fwd),
                    c.input_grad ? fixed(n * in * 1e3, 2).c_str() : "-", c.input_grad ? fixed(rate(in), 1).c_str() : "-",
                    n * wt * 1e3, rate(wt));
        per_shape.push_back({{"input", c.input}, {"weight", c.weight}, {"stride", c.stride}, {"calls", n},
                             {"forward_s", fwd}, {"input_grad_s", in}, {"weight_grad_s", wt}, {"macs", macs},
                             {"algorithm", winograd ? "winograd" : "direct"}});
      }

      // The table: phases, and within them the layer types.
      std::vector<Row> rows;
      auto op = [&](const std::string& key) { return profile.seconds.count(key) ? profile.seconds[key] * per : 0.0; };
      auto sum_ops = [&](const std::function<bool(const std::string&)>& which) {
        double total = 0;
        for (const auto& [key, seconds] : profile.seconds)
          if (which(key)) total += seconds * per;
        return total;
      };
      auto ends_with = [](const std::string& t, const std::string& tail) {
        return t.size() >= tail.size() && t.compare(t.size() - tail.size(), tail.size(), tail) == 0;
      };
      // Barlow Twins: the batch and its two augmented views, as pretrain makes them on the training thread.
      rows.push_back({"data on the training thread", phases["data"] * per, 0});
      rows.push_back({"zero_grad", phases["zero_grad"] * per, 0});
      const double forward_phase = phases["model forward"] * per, backward_phase = phases["backward"] * per;
      rows.push_back({"forward pass", forward_phase, 0});
      for (const char* type : {"convolution", "BatchNorm", "pooling", "activation", "linear", "allocation",
                               "other (adds, copies, views)"}) {
        const double t = op(std::string(type) + " forward");
        const double flops = std::string(type) == "convolution" ? 2 * conv_forward_macs : 0.0;
        if (t > 0) rows.push_back({std::string("  ") + type, t, flops});
      }
      const double forward_ops = sum_ops([&](const std::string& k) { return ends_with(k, " forward"); });
      rows.push_back({"  framework (dispatch, allocation)", std::max(0.0, forward_phase - forward_ops), 0});
      rows.push_back({"loss forward", phases["loss"] * per, 0});
      rows.push_back({"backward pass", backward_phase, 0});
      for (const char* type : {"convolution", "BatchNorm", "pooling", "activation", "linear", "loss", "allocation",
                               "other (adds, copies, views)"}) {
        const double t = op(std::string(type) + " backward");
        const double flops =
            std::string(type) == "convolution" ? 2 * (conv_input_macs + conv_weight_macs) : 0.0;
        if (t > 0) rows.push_back({std::string("  ") + type, t, flops});
      }
      const double accumulate = op("gradient accumulation");
      if (accumulate > 0) rows.push_back({"  gradient accumulation", accumulate, 0});
      const double backward_ops =
          sum_ops([&](const std::string& k) { return ends_with(k, " backward") || k == "gradient accumulation"; });
      rows.push_back({"  autograd engine and framework", std::max(0.0, backward_phase - backward_ops), 0});
      rows.push_back({"optimizer step", phases["optimizer"] * per, 0});
      double phases_total = 0;
      for (const auto& [name, seconds] : phases) phases_total += seconds * per;
      rows.push_back({"between phases", std::max(0.0, step_s - phases_total), 0});

      std::printf("\nOne step: %.1f ms (%.0f images/s) with the profiler on; convolutions %.2f GFLOP per step "
                  "(forward %.2f, input gradients %.2f, weight gradients %.2f)\n\n"
                  "| phase / layer type | ms per step | share of the step | GFLOP/s | of dense |\n"
                  "| --- | --- | --- | --- | --- |\n",
                  step_s * 1e3, static_cast<double>(a->batch) / step_s,
                  2 * (conv_forward_macs + conv_input_macs + conv_weight_macs) / 1e9,
                  2 * conv_forward_macs / 1e9, 2 * conv_input_macs / 1e9,
                  2 * conv_weight_macs / 1e9);
      json out_rows = json::array();
      std::string phase;  // the row a layer type's row belongs to
      for (const auto& r : rows) {
        const bool inner = r.what.rfind("  ", 0) == 0;
        if (!inner) phase = r.what;
        const double rate = r.flops > 0 && r.seconds > 0 ? r.flops / r.seconds : 0.0;
        std::printf("| %s | %.2f | %.1f %% | %s | %s |\n", r.what.c_str(), r.seconds * 1e3, 100 * r.seconds / step_s,
                    rate > 0 ? fixed(rate / 1e9, 1).c_str() : "", rate > 0 ? (fixed(100 * rate / roof.best(), 0) + " %").c_str() : "");
        out_rows.push_back({{"phase", phase}, {"what", inner ? r.what.substr(2) : r.what}, {"seconds", r.seconds},
                            {"flops", r.flops}});
      }
      const double replay_total = (replay_forward + replay_input + replay_weight);
      std::printf("\nThe convolutions replayed alone, per step: forward %.2f ms, input gradients %.2f ms, weight "
                  "gradients %.2f ms (%.0f %% of the step, at %.0f %% of the dense rate)\n",
                  replay_forward * 1e3, replay_input * 1e3, replay_weight * 1e3,
                  100 * replay_total / step_s,
                  replay_total > 0 ? 100 * 2 * (conv_forward_macs + conv_input_macs + conv_weight_macs) /
                                         replay_total / roof.best()
                                   : 0.0);
      if (!a->json_out.empty()) {
        json out = {{"model", a->model},           {"task", a->task}, {"cpu_kernels", a->cpu_kernels},
                    {"precision", a->precision},
                    {"batch_size", a->batch},      {"threads", threads},
                    {"step_s", step_s},            {"dense_flops_per_s", roof.best()},
                    {"rows", out_rows},            {"convolutions", per_shape},
                    {"machine", cache_summary()}, {"runtime", runtime_summary()}};
        std::ofstream(a->json_out) << out.dump(2) << "\n";
      }
      return 0;
    } catch (const data::DataError& e) {
      std::fprintf(stderr, "largebatch bench profile: %s\n", e.what());
      return kExitBadInput;
    } catch (const train::OptionError& e) {
      std::fprintf(stderr, "largebatch bench profile: %s\n", e.worded("--").c_str());
      return kExitBadInput;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch bench profile: %s\n", e.what());
      return kExitBadInput;
    }
  };
}

}  // namespace apps
}  // namespace largebatch
