#include <largebatch/train/trainer.h>

#include <largebatch/data/pipeline.h>
#include <largebatch/dist/dist.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/report/plot.h>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;

namespace largebatch {
namespace train {

namespace {

std::atomic<bool> g_stop_requested{false};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] void usage(const std::string& message) { throw UsageError(message); }

bool one_of(const std::string& v, std::initializer_list<const char*> options) {
  for (const char* o : options)
    if (v == o) return true;
  return false;
}

bool is_layerwise(const std::string& optimizer) {
  return lo::resolve_optimizer_name(optimizer).find(':') != std::string::npos;
}

// Writes text to path atomically: a crash leaves either the old file or the new one, never half of one.
void write_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw std::runtime_error("cannot write " + tmp.string());
    out << text;
    out.flush();
    if (!out) throw std::runtime_error("write failed: " + tmp.string());
  }
  fs::rename(tmp, path);
}

}  // namespace

void request_stop() { g_stop_requested = true; }

// ------------------------------------------------------------------ config

std::string TrainConfig::to_json() const {
  json j;
  j["data"] = data;
  j["data-dir"] = data_dir;
  j["augment"] = augment;
  j["drop-last"] = drop_last;
  j["loader-workers"] = loader_workers;
  j["synthetic-size"] = synthetic_size;
  j["model"] = model;
  j["init"] = init;
  j["optimizer"] = optimizer;
  std::vector<std::string> opts;
  for (const auto& kv : optimizer_options) opts.push_back(kv.first + "=" + kv.second);
  j["opt"] = opts;
  j["lr"] = lr;
  j["weight-decay"] = weight_decay;
  j["schedule"] = schedule;
  j["warmup-epochs"] = warmup_epochs;
  j["lr-scaling"] = lr_scaling;
  j["final-ratio"] = final_ratio;
  j["batch-size"] = batch_size;
  j["micro-batch"] = micro_batch;
  j["eval-batch-size"] = eval_batch_size;
  j["epochs"] = epochs;
  j["seed"] = seed;
  j["threads"] = threads;
  j["device"] = device;
  j["out"] = out;
  j["telemetry-every"] = telemetry_every;
  j["progress"] = progress;
  j["plots"] = plots;
  j["sync-bn"] = sync_bn;
  j["dist-timeout"] = dist_timeout;
  j["bucket-mb"] = bucket_mb;
  return j.dump(2) + "\n";
}

TrainConfig TrainConfig::from_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    usage(source + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object()) usage(source + ": expected a JSON object");
  TrainConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    auto str = [&]() {
      if (!v.is_string()) usage(source + ": '" + k + "' must be a string");
      return v.get<std::string>();
    };
    auto num = [&]() {
      if (!v.is_number()) usage(source + ": '" + k + "' must be a number");
      return v.get<double>();
    };
    auto integer = [&]() {
      if (!v.is_number_integer()) usage(source + ": '" + k + "' must be an integer");
      return v.get<int64_t>();
    };
    auto boolean = [&]() {
      if (!v.is_boolean()) usage(source + ": '" + k + "' must be true or false");
      return v.get<bool>();
    };
    if (k == "data") c.data = str();
    else if (k == "data-dir") c.data_dir = str();
    else if (k == "augment") c.augment = str();
    else if (k == "drop-last") c.drop_last = boolean();
    else if (k == "loader-workers") c.loader_workers = integer();
    else if (k == "synthetic-size") c.synthetic_size = integer();
    else if (k == "model") c.model = str();
    else if (k == "init") c.init = str();
    else if (k == "optimizer") c.optimizer = str();
    else if (k == "opt") {
      if (!v.is_array()) usage(source + ": 'opt' must be an array of \"key=value\" strings");
      for (const auto& item : v) {
        if (!item.is_string()) usage(source + ": 'opt' must be an array of \"key=value\" strings");
        for (const auto& kv : lo::parse_overrides(item.get<std::string>())) c.optimizer_options[kv.first] = kv.second;
      }
    } else if (k == "lr") c.lr = num();
    else if (k == "weight-decay") c.weight_decay = num();
    else if (k == "schedule") c.schedule = str();
    else if (k == "warmup-epochs") c.warmup_epochs = num();
    else if (k == "lr-scaling") c.lr_scaling = str();
    else if (k == "final-ratio") c.final_ratio = num();
    else if (k == "batch-size") c.batch_size = integer();
    else if (k == "micro-batch") c.micro_batch = integer();
    else if (k == "eval-batch-size") c.eval_batch_size = integer();
    else if (k == "epochs") c.epochs = integer();
    else if (k == "seed") c.seed = static_cast<uint64_t>(integer());
    else if (k == "threads") c.threads = integer();
    else if (k == "device") c.device = str();
    else if (k == "out") c.out = str();
    else if (k == "telemetry-every") c.telemetry_every = integer();
    else if (k == "progress") c.progress = str();
    else if (k == "plots") c.plots = boolean();
    else if (k == "sync-bn") c.sync_bn = boolean();
    else if (k == "dist-timeout") c.dist_timeout = num();
    else if (k == "bucket-mb") c.bucket_mb = num();
    else usage(source + ": unknown key '" + k + "'");
  }
  return c;
}

void TrainConfig::validate() const {
  const auto& datasets = data::dataset_names();
  if (std::find(datasets.begin(), datasets.end(), data) == datasets.end()) {
    std::string known;
    for (const auto& d : datasets) known += (known.empty() ? "" : ", ") + d;
    usage("--data: unknown data set '" + data + "' (known: " + known + ")");
  }
  const auto& models = models::model_names();
  if (std::find(models.begin(), models.end(), model) == models.end())
    usage("--model: unknown model '" + model + "'");
  const auto& inits = models::init_names();
  if (std::find(inits.begin(), inits.end(), init) == inits.end()) usage("--init: unknown method '" + init + "'");
  try {
    lo::resolve_optimizer_name(optimizer);
  } catch (const std::invalid_argument& e) {
    usage(std::string("--optimizer: ") + e.what());
  }
  if (!one_of(augment, {"auto", "none", "flip", "crop-flip", "paper"}))
    usage("--augment: '" + augment + "' is not auto, none, flip, crop-flip or paper");
  if (!one_of(schedule, {"auto", "constant", "cosine", "warmup-cosine"}))
    usage("--schedule: '" + schedule + "' is not auto, constant, cosine or warmup-cosine");
  if (!one_of(lr_scaling, {"none", "linear", "sqrt"})) usage("--lr-scaling: '" + lr_scaling + "' is not none, linear or sqrt");
  if (!one_of(progress, {"auto", "bar", "lines", "none"})) usage("--progress: '" + progress + "' is not auto, bar, lines or none");
  if (batch_size <= 0) usage("--batch-size must be > 0, got " + std::to_string(batch_size));
  if (epochs <= 0) usage("--epochs must be > 0, got " + std::to_string(epochs));
  if (micro_batch < 0) usage("--micro-batch must be >= 0, got " + std::to_string(micro_batch));
  if (micro_batch > batch_size)
    usage("--micro-batch " + std::to_string(micro_batch) + " is larger than --batch-size " + std::to_string(batch_size));
  if (micro_batch > 0 && batch_size % micro_batch != 0)
    usage("--micro-batch " + std::to_string(micro_batch) + " does not divide --batch-size " + std::to_string(batch_size));
  if (eval_batch_size <= 0) usage("--eval-batch-size must be > 0");
  if (loader_workers <= 0) usage("--loader-workers must be > 0");
  if (synthetic_size <= 0) usage("--synthetic-size must be > 0");
  if (threads < 0) usage("--threads must be >= 0");
  if (telemetry_every < 0) usage("--telemetry-every must be >= 0");
  if (lr != -1 && !(lr >= 0 && std::isfinite(lr))) usage("--lr must be finite and >= 0");
  if (weight_decay != -1 && !(weight_decay >= 0 && std::isfinite(weight_decay))) usage("--weight-decay must be >= 0");
  if (!(warmup_epochs >= 0)) usage("--warmup-epochs must be >= 0");
  if (!(final_ratio >= 0 && final_ratio <= 1)) usage("--final-ratio must be in [0, 1]");
  if (out.empty()) usage("--out must not be empty");
  if (!(dist_timeout > 0 && std::isfinite(dist_timeout))) usage("--dist-timeout must be > 0 seconds");
  if (!(bucket_mb > 0 && std::isfinite(bucket_mb))) usage("--bucket-mb must be > 0");
  if (!(device == "cpu" || device.rfind("cuda", 0) == 0)) usage("--device: '" + device + "' is not cpu or cuda[:N]");
}

// Trust coefficient the trainer gives LARS and TVLARS unless --opt eta is set (pairs with default_lr's 2).
const char* const kTrainerLarsEta = "0.002";

double default_lr(const std::string& optimizer, int64_t batch_size) {
  const std::string name = lo::resolve_optimizer_name(optimizer);
  const double scale = static_cast<double>(batch_size) / 256.0;
  // LARS family: the trust ratio sets each layer's scale (lr * eta); the 1-D tensors (BatchNorm, biases) take
  // plain SGD at lr itself. For the default CNN on Fashion-MNIST at B = 4096, lr 2 with eta 2e-3 (see
  // kTrainerLarsEta) beat lr 1, 3, 4, 5, 8 with eta 1e-3: same layer-wise steps, calmer 1-D tensors.
  if (name.rfind("lars", 0) == 0 || name.rfind("tvlars", 0) == 0) return 2.0;
  if (name.rfind("lamb", 0) == 0) return 0.01;
  // SGD: the square-root rule. ResNet recipes' linear 0.1 B/256 (1.6 at B = 4096) blew up the default CNN.
  if (name == "sgd") return 0.1 * std::sqrt(scale);
  if (name == "rmsprop") return 1e-3;
  if (name == "adagrad") return 0.05;
  return 1e-3 * std::sqrt(scale);  // adam, adamw
}

// ------------------------------------------------------------------ training

namespace {

struct Resolved {
  double lr;
  std::string schedule;
  std::map<std::string, std::string> optimizer_options;
  data::AugmentOptions augment;
};

Resolved resolve(const TrainConfig& c) {
  Resolved r;
  r.lr = c.lr >= 0 ? c.lr : default_lr(c.optimizer, c.batch_size);
  const std::string name = lo::resolve_optimizer_name(c.optimizer);
  const std::string raw = c.optimizer;
  if (c.schedule != "auto") r.schedule = c.schedule;
  else if (raw.rfind("wa-", 0) == 0) r.schedule = "warmup-cosine";
  else if (!is_layerwise(raw)) r.schedule = "warmup-cosine";
  else r.schedule = "constant";
  r.optimizer_options = c.optimizer_options;
  if (name == "sgd" && !r.optimizer_options.count("momentum")) r.optimizer_options["momentum"] = "0.9";
  if (!is_layerwise(raw) && !r.optimizer_options.count("weight_decay") && name != "adam")
    r.optimizer_options["weight_decay"] = name == "adamw" ? "0.05" : "5e-4";
  if (!is_layerwise(raw) && !r.optimizer_options.count("decay_mask")) r.optimizer_options["decay_mask"] = "ndim<=1";
  if (c.weight_decay >= 0) r.optimizer_options["weight_decay"] = std::to_string(c.weight_decay);
  // The trainer's tuned trust coefficient for LARS / TVLARS (the presets keep the papers' 1e-3); --opt eta wins.
  if ((name.rfind("lars", 0) == 0 || name.rfind("tvlars", 0) == 0) && !r.optimizer_options.count("eta"))
    r.optimizer_options["eta"] = kTrainerLarsEta;
  r.augment = data::augment_preset(c.augment, c.data);  // the name was checked by validate()
  return r;
}

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (!torch::cuda::is_available()) usage("--device " + name + ": CUDA is not available in this build or machine");
  try {
    torch::Device d(name);
    if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count()))
      usage("--device " + name + ": only " + std::to_string(torch::cuda::device_count()) + " CUDA device(s)");
    return d;
  } catch (const c10::Error&) {
    usage("--device: cannot parse '" + name + "'");
  }
}

struct Evaluation {
  double loss = 0, top1 = 0, top5 = 0;
};

// Sums over this rank's shard of the test set: loss, top-1 hits, top-5 hits, images.
struct EvaluationSums {
  double loss_sum = 0, correct1 = 0, correct5 = 0, n = 0;
};

EvaluationSums evaluate_shard(models::ClassifierImpl& model, const data::ImageDataset& test, int64_t batch_size,
                              torch::Device device, int64_t rank, int64_t world) {
  torch::NoGradGuard no_grad;
  model.eval();
  data::LoaderOptions lo_opts;
  lo_opts.shuffle = false;
  lo_opts.workers = 1;
  // Every rank takes its shard of every evaluation batch (the global batch rounded up to a multiple of world).
  lo_opts.batch_size = (batch_size + world - 1) / world * world;
  lo_opts.rank = rank;
  lo_opts.world = world;
  data::BatchLoader loader(test, lo_opts);
  loader.start_epoch(0);
  data::Batch batch;
  double loss_sum = 0;
  int64_t correct1 = 0, correct5 = 0, n = 0;
  const int64_t k = std::min<int64_t>(5, test.num_classes);
  while (loader.next(batch)) {
    if (batch.labels.size(0) == 0) continue;
    auto x = batch.images.to(device), y = batch.labels.to(device);
    auto logits = model.forward(x);
    loss_sum += torch::nn::functional::cross_entropy(
                    logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
    auto topk = std::get<1>(logits.topk(k, 1));
    auto hits = topk.eq(y.unsqueeze(1));
    correct1 += hits.select(1, 0).sum().item<int64_t>();
    correct5 += hits.any(1).sum().item<int64_t>();
    n += y.size(0);
  }
  model.train();
  return {loss_sum, static_cast<double>(correct1), static_cast<double>(correct5), static_cast<double>(n)};
}

// The whole test set's metrics: each rank evaluates its shard and the sums are added over ranks, so every
// test image counts exactly once.
Evaluation evaluate(models::ClassifierImpl& model, const data::ImageDataset& test, int64_t batch_size,
                    torch::Device device, dist::Communicator* comm) {
  const int64_t rank = comm ? comm->rank() : 0, world = comm ? comm->world() : 1;
  EvaluationSums s = evaluate_shard(model, test, batch_size, device, rank, world);
  if (comm) {
    auto t = torch::tensor({s.loss_sum, s.correct1, s.correct5, s.n}, torch::kFloat64);
    dist::guarded(*comm, [&] { comm->all_reduce_sum(t); });
    s = {t[0].item<double>(), t[1].item<double>(), t[2].item<double>(), t[3].item<double>()};
  }
  Evaluation e;
  e.loss = s.loss_sum / s.n;
  e.top1 = s.correct1 / s.n;
  e.top5 = s.correct5 / s.n;
  return e;
}

std::string metrics_header() {
  return "epoch,step,lr,phi,train_loss,train_acc,test_loss,test_top1,test_top5,epoch_seconds,img_per_s,data_wait_s,"
         "compute_s,allreduce_s,optimizer_s\n";
}

std::string metrics_row(const EpochRecord& r) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%lld,%lld,%.9g,%.9g,%.6f,%.6f,%.6f,%.6f,%.6f,%.3f,%.1f,%.3f,%.3f,%.3f,%.3f\n",
                static_cast<long long>(r.epoch), static_cast<long long>(r.step), r.lr, r.phi, r.train_loss,
                r.train_acc, r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds, r.images_per_second,
                r.data_wait_seconds, r.compute_seconds, r.allreduce_seconds, r.optimizer_seconds);
  return buf;
}

json record_json(const EpochRecord& r) {
  return json{{"epoch", r.epoch}, {"step", r.step}, {"lr", r.lr}, {"phi", r.phi}, {"train_loss", r.train_loss},
              {"train_acc", r.train_acc}, {"test_loss", r.test_loss}, {"test_top1", r.test_top1},
              {"test_top5", r.test_top5}, {"epoch_seconds", r.epoch_seconds},
              {"img_per_s", r.images_per_second}, {"data_wait_s", r.data_wait_seconds},
              {"compute_s", r.compute_seconds}, {"allreduce_s", r.allreduce_seconds},
              {"optimizer_s", r.optimizer_seconds}};
}

EpochRecord record_from(const json& j) {
  EpochRecord r;
  r.epoch = j.at("epoch");
  r.step = j.at("step");
  r.lr = j.at("lr");
  r.phi = j.at("phi");
  r.train_loss = j.at("train_loss");
  r.train_acc = j.at("train_acc");
  r.test_loss = j.at("test_loss");
  r.test_top1 = j.at("test_top1");
  r.test_top5 = j.at("test_top5");
  r.epoch_seconds = j.at("epoch_seconds");
  r.images_per_second = j.at("img_per_s");
  r.data_wait_seconds = j.at("data_wait_s");
  r.compute_seconds = j.value("compute_s", 0.0);
  r.allreduce_seconds = j.value("allreduce_s", 0.0);
  r.optimizer_seconds = j.value("optimizer_s", 0.0);
  return r;
}

void write_summary(const fs::path& out, const TrainSummary& s, const TrainConfig& c) {
  json j{{"status", s.status},
         {"message", s.message},
         {"epochs_done", s.epochs_done},
         {"steps", s.steps},
         {"final_test_top1", s.final_test_top1},
         {"best_test_top1", s.best_test_top1},
         {"best_epoch", s.best_epoch},
         {"wall_seconds", s.wall_seconds},
         {"optimizer", c.optimizer},
         {"model", c.model},
         {"data", c.data},
         {"batch_size", c.batch_size},
         {"world_size", s.world_size},
         {"replica_mismatches", s.replica_mismatches}};
  write_atomically(out / "summary.json", j.dump(2) + "\n");
}

// The checkpoint: model, optimizer state (with its options and masks), RNG state and the run's history.
void save_checkpoint(const fs::path& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                     const json& meta) {
  torch::serialize::OutputArchive root;
  torch::serialize::OutputArchive model_archive, optimizer_archive;
  model.save(model_archive);
  optimizer.save(optimizer_archive);
  root.write("model", model_archive);
  root.write("optimizer", optimizer_archive);
  root.write("meta", c10::IValue(meta.dump()));
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    root.write("rng_cpu", gen.get_state());
  }
  const std::string tmp = path.string() + ".tmp";
  root.save_to(tmp);
  fs::rename(tmp, path);
}

json load_checkpoint(const fs::path& path, torch::nn::Module& model, torch::optim::Optimizer& optimizer,
                     torch::Device device) {
  torch::serialize::InputArchive root;
  try {
    root.load_from(path.string(), device);
  } catch (const c10::Error& e) {
    usage("--resume: cannot read checkpoint " + path.string() + " (damaged or not a largebatch checkpoint)");
  }
  torch::serialize::InputArchive model_archive, optimizer_archive;
  root.read("model", model_archive);
  root.read("optimizer", optimizer_archive);
  model.load(model_archive);
  optimizer.load(optimizer_archive);
  c10::IValue meta;
  root.read("meta", meta);
  torch::Tensor rng;
  root.read("rng_cpu", rng);
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng.cpu());
  }
  return json::parse(meta.toStringRef());
}

class Progress {
 public:
  Progress(const std::string& mode, int64_t epochs, int64_t steps_per_epoch)
      : epochs_(epochs), steps_(steps_per_epoch) {
    bar_ = mode == "bar" || (mode == "auto" && isatty(fileno(stderr)));
    quiet_ = mode == "none";
  }
  void step(int64_t epoch, int64_t index, double loss, double acc, double img_s) {
    if (!bar_) return;
    const int width = 30;
    const int filled = static_cast<int>(width * (index + 1) / std::max<int64_t>(1, steps_));
    std::fprintf(stderr, "\repoch %lld/%lld [%s%s] %lld/%lld loss %.4f acc %.4f %.0f img/s   ",
                 static_cast<long long>(epoch + 1), static_cast<long long>(epochs_),
                 std::string(filled, '#').c_str(), std::string(width - filled, '.').c_str(),
                 static_cast<long long>(index + 1), static_cast<long long>(steps_), loss, acc, img_s);
    std::fflush(stderr);
  }
  void epoch(const EpochRecord& r, int64_t epochs) {
    if (quiet_) return;
    if (bar_) std::fprintf(stderr, "\r%120s\r", "");
    std::printf("epoch %3lld/%lld  step %6lld  lr %.4g  phi %.4f  train loss %.4f acc %.4f  test loss %.4f "
                "top1 %.4f top5 %.4f  %.1fs %.0f img/s\n",
                static_cast<long long>(r.epoch), static_cast<long long>(epochs), static_cast<long long>(r.step), r.lr,
                r.phi, r.train_loss, r.train_acc, r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds,
                r.images_per_second);
    std::fflush(stdout);
  }

 private:
  int64_t epochs_, steps_;
  bool bar_ = false, quiet_ = false;
};

}  // namespace

TrainSummary run_training(const TrainConfig& config) {
  const auto t_start = Clock::now();
  config.validate();
  const Resolved resolved = resolve(config);
  if (resolved.schedule == "warmup-cosine" && config.warmup_epochs > static_cast<double>(config.epochs)) {
    std::ostringstream msg;
    msg << "--warmup-epochs " << config.warmup_epochs << " is longer than --epochs " << config.epochs
        << " (the " << config.optimizer << " schedule is warmup-cosine)";
    usage(msg.str());
  }
  torch::set_num_threads(config.threads > 0 ? static_cast<int>(config.threads)
                                            : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  const torch::Device device = parse_device(config.device);
  const fs::path out(config.out);

  // Data parallelism: the launcher's environment says where this process sits; --batch-size is global.
  dist::LaunchEnv env;
  try {
    env = dist::launch_env_from_environment();
  } catch (const std::invalid_argument& e) {
    usage(e.what());
  }
  const int64_t world = env.world;
  const bool lead = env.rank == 0;  // only rank 0 writes files and shows progress
  if (config.batch_size % world != 0)
    usage("--batch-size " + std::to_string(config.batch_size) + " is not divisible by the world size " +
          std::to_string(world) + " (WORLD_SIZE)");
  const int64_t local_batch = config.batch_size / world;
  if (config.micro_batch > 0 && local_batch % config.micro_batch != 0)
    usage("--micro-batch " + std::to_string(config.micro_batch) + " does not divide the per-rank batch " +
          std::to_string(local_batch) + " (--batch-size / WORLD_SIZE)");
  const fs::path checkpoint_path = out / "checkpoint.pt";

  // Never overwrite a previous run's results; resuming needs its checkpoint.
  std::error_code ec;
  if (config.resume) {
    if (!fs::exists(checkpoint_path)) usage("--resume: no checkpoint at " + checkpoint_path.string());
    std::ifstream saved_config(out / "config.json");
    if (saved_config) {
      std::stringstream ss;
      ss << saved_config.rdbuf();
      const TrainConfig before = TrainConfig::from_json(ss.str(), (out / "config.json").string());
      auto same = [&](const std::string& flag, const auto& a, const auto& b) {
        if (a != b) usage("--resume: " + flag + " differs from the checkpointed run in " + out.string());
      };
      same("--data", config.data, before.data);
      same("--model", config.model, before.model);
      same("--optimizer", config.optimizer, before.optimizer);
      same("--batch-size", config.batch_size, before.batch_size);
      same("--seed", config.seed, before.seed);
    }
  } else if (fs::exists(out / "metrics.csv") || fs::exists(checkpoint_path)) {
    usage("--out " + out.string() + " already holds a run; pass --resume to continue it or choose another --out");
  }
  if (lead) {
    fs::create_directories(out, ec);
    if (ec) usage("--out: cannot create " + out.string() + ": " + ec.message());
  }

  // Data, model, optimizer, schedule.
  data::DatasetSplit split;
  if (config.data == "synthetic") {
    data::SyntheticOptions so;
    so.train_size = config.synthetic_size;
    so.test_size = std::max<int64_t>(config.synthetic_size / 4, 64);
    so.seed = config.seed;
    split = data::make_synthetic(so);
  } else {
    split = data::load_dataset(config.data, config.data_dir, config.seed);
  }
  const auto& train_set = split.train;
  models::ModelOptions mo;
  mo.name = config.model;
  mo.num_classes = train_set.num_classes;
  mo.in_channels = train_set.channels();
  mo.image_size = train_set.height();
  mo.init = config.init;
  mo.seed = config.seed;
  auto model = models::make_model(mo);
  model->to(device);

  std::shared_ptr<dist::Communicator> comm;
  if (env.distributed()) {
    dist::CommunicatorOptions co;
    co.timeout = std::chrono::milliseconds(std::llround(config.dist_timeout * 1000));
    comm = dist::Communicator::connect(env, device, co);
    if (config.sync_bn) {
      dist::Communicator* c = comm.get();
      models::synchronise_batchnorm(*model, [c](const torch::Tensor& t) {
        return dist::all_reduce_sum_differentiable(t, *c);
      });
    }
  }

  data::LoaderOptions loader_options;
  loader_options.batch_size = config.batch_size;
  loader_options.shuffle = true;
  loader_options.drop_last = config.drop_last;
  loader_options.seed = config.seed;
  loader_options.workers = config.loader_workers;
  loader_options.prefetch = 2;
  loader_options.augment = resolved.augment;
  loader_options.rank = env.rank;
  loader_options.world = world;
  data::BatchLoader loader(train_set, loader_options);
  const int64_t steps_per_epoch = loader.batches_per_epoch();
  if (steps_per_epoch == 0) usage("--batch-size " + std::to_string(config.batch_size) + " with --drop-last leaves no batch");
  const int64_t total_steps = config.epochs * steps_per_epoch;
  const int64_t last_batch = train_set.size() % config.batch_size;
  if (world > 1 && !config.drop_last && last_batch > 0 && last_batch < world)
    usage("the last batch of an epoch has " + std::to_string(last_batch) + " image(s), fewer than the " +
          std::to_string(world) + " ranks; pass --drop-last or change --batch-size");

  std::unique_ptr<torch::optim::Optimizer> optimizer;
  try {
    auto options = resolved.optimizer_options;
    // TVLARS's phi_t is the only schedule: unless --opt lambda is given, lambda = 2 / T makes phi fall from
    // about 0.9 to about 0.13 over the run (T = total steps), whatever the batch size and epochs. (3 / T was
    // 0.2-0.3 points worse at the end on the default CNN / Fashion-MNIST / B = 4096.)
    if (lo::resolve_optimizer_name(config.optimizer).rfind("tvlars", 0) == 0 && !options.count("lambda")) {
      std::ostringstream lambda;
      lambda << std::setprecision(6) << 2.0 / static_cast<double>(total_steps);
      options["lambda"] = lambda.str();
    }
    optimizer = lo::make_optimizer({config.optimizer, resolved.lr, config.batch_size, options},
                                   model->named_parameters());
  } catch (const std::invalid_argument& e) {
    usage(std::string("--opt: ") + e.what());
  }
  auto* layerwise = dynamic_cast<lo::LayerwiseOptimizer*>(optimizer.get());
  // The trainer keeps the last step's trust ratios to name the culprit layer if the loss diverges.
  if (layerwise) layerwise->set_telemetry(true);


  lo::ScheduleOptions so;
  so.kind = lo::parse_schedule_kind(resolved.schedule);
  so.lr = resolved.lr;
  so.scaling = lo::parse_lr_scaling(config.lr_scaling);
  so.batch_size = config.batch_size;
  so.warmup_steps = so.kind == lo::ScheduleKind::kWarmupCosine
                        ? std::min<int64_t>(total_steps, std::llround(config.warmup_epochs * steps_per_epoch))
                        : 0;
  so.total_steps = total_steps;
  so.final_ratio = config.final_ratio;
  const lo::LrSchedule schedule(so);
  const c10::optional<lo::TimeVarying> tv =
      layerwise ? static_cast<const lo::LayerwiseOptions&>(layerwise->param_groups()[0].options()).time_varying()
                : c10::nullopt;

  TrainSummary summary;
  int64_t start_epoch = 0, step = 0;
  if (config.resume) {
    const json meta = load_checkpoint(checkpoint_path, *model, *optimizer, device);
    start_epoch = meta.at("epoch");
    step = meta.at("step");
    for (const auto& r : meta.at("history")) summary.history.push_back(record_from(r));
    // Rewrite metrics.csv from the checkpoint: rows of epochs after it (if any) are dropped.
    if (lead) {
      std::string rows = metrics_header();
      for (const auto& r : summary.history) rows += metrics_row(r);
      write_atomically(out / "metrics.csv", rows);
      std::printf("resumed %s at epoch %lld (step %lld)\n", out.string().c_str(),
                  static_cast<long long>(start_epoch), static_cast<long long>(step));
    }
  } else if (lead) {
    write_atomically(out / "metrics.csv", metrics_header());
  }
  if (lead) write_atomically(out / "config.json", config.to_json());
  // Every rank starts from rank 0's parameters and buffers (fresh or resumed), then gradients are averaged
  // in buckets that overlap backward.
  std::unique_ptr<dist::GradientAverager> averager;
  if (comm) {
    dist::broadcast_module(*model, *comm);
    std::vector<torch::Tensor> trainable;
    for (auto& p : model->parameters())
      if (p.requires_grad()) trainable.push_back(p);
    averager = std::make_unique<dist::GradientAverager>(trainable, comm,
                                                        std::llround(config.bucket_mb * 1024 * 1024));
  }

  std::ofstream telemetry;
  if (config.telemetry_every > 0 && lead) {
    const fs::path tpath = out / "telemetry.csv";
    if (config.resume && fs::exists(tpath)) {
      // Keep only rows of steps the checkpoint covers.
      std::ifstream in(tpath);
      std::string line, kept;
      std::getline(in, line);
      kept = line + "\n";
      while (std::getline(in, line)) {
        if (std::stoll(line.substr(0, line.find(','))) < step) kept += line + "\n";
      }
      write_atomically(tpath, kept);
      telemetry.open(tpath, std::ios::app);
    } else {
      telemetry.open(tpath, std::ios::trunc);
      telemetry << "step,layer,weight_norm,update_norm,trust_ratio,effective_lr,lr,phi\n";
    }
    if (!telemetry) usage("--telemetry-every: cannot write " + tpath.string());
    if (!layerwise) std::printf("note: --telemetry-every records layer-wise optimizers only; %s has no trust ratio\n",
                                config.optimizer.c_str());
  }

  if (lead) std::printf("largebatch train: %s (%lld train / %lld test) | %s (%lld parameters) | %s lr %.4g (%s schedule) | "
              "batch %lld%s | %lld epochs x %lld steps | %s\n",
              config.data.c_str(), static_cast<long long>(train_set.size()),
              static_cast<long long>(split.test.size()), config.model.c_str(),
              static_cast<long long>(models::parameter_count(*model)), config.optimizer.c_str(), resolved.lr,
              resolved.schedule.c_str(), static_cast<long long>(config.batch_size),
              config.micro_batch > 0 ? (" (micro-batches of " + std::to_string(config.micro_batch) + ")").c_str() : "",
              static_cast<long long>(config.epochs), static_cast<long long>(steps_per_epoch), out.string().c_str());
  if (lead && comm)
    std::printf("data parallel: %lld ranks over %s (launch: %s), %lld images per rank and step, %s BatchNorm, "
                "%lld gradient buckets\n",
                static_cast<long long>(world), comm->backend().c_str(), env.source.c_str(),
                static_cast<long long>(local_batch), config.sync_bn ? "synchronised" : "per-rank",
                static_cast<long long>(averager->bucket_count()));
  if (lead && layerwise) std::printf("optimizer options: %s\n", static_cast<const lo::LayerwiseOptions&>(layerwise->param_groups()[0].options()).describe().c_str());
  std::fflush(stdout);

  Progress progress(lead ? config.progress : "none", config.epochs, steps_per_epoch);
  g_stop_requested = false;
  summary.status = "completed";
  for (const auto& r : summary.history) {
    if (r.test_top1 > summary.best_test_top1) {
      summary.best_test_top1 = r.test_top1;
      summary.best_epoch = r.epoch;
    }
  }

  model->train();
  for (int64_t epoch = start_epoch; epoch < config.epochs; ++epoch) {
    const auto t_epoch = Clock::now();
    const double wait_before = loader.wait_seconds();
    loader.start_epoch(epoch);
    data::Batch batch;
    double loss_sum = 0;
    int64_t correct = 0, seen = 0, index = 0;
    double lr_t = 0, phi_t = 1;
    double compute_s = 0, allreduce_s = 0, optimizer_s = 0;
    while (loader.next(batch)) {
      lr_t = schedule.at(step);
      phi_t = tv ? lo::tv_phi(*tv, step) : 1.0;
      lo::set_learning_rate(*optimizer, lr_t);
      auto t_phase = Clock::now();
      if (averager) averager->zero_grad();
      else optimizer->zero_grad();
      const int64_t b = batch.labels.size(0);  // this rank's shard
      // The step's global batch (the last one of an epoch may be partial).
      const int64_t global_b = std::min(config.batch_size, train_set.size() - batch.index * config.batch_size);
      const int64_t micro = config.micro_batch > 0 ? config.micro_batch : b;
      double local_loss_sum = 0;
      int64_t local_correct = 0;
      // Gradient accumulation: each micro-batch's summed loss is divided by the global batch (times the world
      // size, which the all-reduce average divides out), so the gradient is the mean over the global batch
      // whatever the shard sizes. BatchNorm statistics are per micro-batch (and per rank unless --sync-bn).
      for (int64_t start = 0; start < b; start += micro) {
        const int64_t len = std::min(micro, b - start);
        auto x = batch.images.narrow(0, start, len).to(device);
        auto y = batch.labels.narrow(0, start, len).to(device);
        if (averager) averager->set_last_backward(start + len >= b);
        auto logits = model->forward(x);
        auto loss_sum_t = torch::nn::functional::cross_entropy(
            logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
        (loss_sum_t / (static_cast<double>(global_b) / static_cast<double>(world))).backward();
        local_loss_sum += loss_sum_t.item<double>();
        local_correct += logits.argmax(1).eq(y).sum().item<int64_t>();
      }
      compute_s += seconds_since(t_phase);
      t_phase = Clock::now();
      // Loss, accuracy and a stop request are agreed by every rank, so all of them take the same decisions.
      double batch_loss = local_loss_sum / static_cast<double>(global_b);
      int64_t batch_correct = local_correct;
      bool stop_now = g_stop_requested;
      if (comm) {
        averager->finish();
        auto agreed = torch::tensor({local_loss_sum, static_cast<double>(local_correct), stop_now ? 1.0 : 0.0},
                                    torch::kFloat64);
        dist::guarded(*comm, [&] { comm->all_reduce_sum(agreed); });
        batch_loss = agreed[0].item<double>() / static_cast<double>(global_b);
        batch_correct = static_cast<int64_t>(std::llround(agreed[1].item<double>()));
        stop_now = agreed[2].item<double>() > 0;
      }
      allreduce_s += seconds_since(t_phase);
      if (!std::isfinite(batch_loss)) {
        std::ostringstream msg;
        msg << "non-finite loss (" << batch_loss << ") at step " << step << " (epoch " << epoch + 1 << ")";
        if (layerwise && !layerwise->last_telemetry().layers.empty()) {
          const auto& layers = layerwise->last_telemetry().layers;
          const auto worst = std::max_element(layers.begin(), layers.end(), [](const auto& a, const auto& b2) {
            return !(a.trust_ratio >= b2.trust_ratio);  // NaN counts as the largest
          });
          msg << "; largest trust ratio at step " << layerwise->last_telemetry().step << ": " << worst->name
              << " (r = " << worst->trust_ratio << ", lr*r = " << worst->effective_lr << ")";
        }
        msg << "; the last good checkpoint is " << (fs::exists(checkpoint_path) ? checkpoint_path.string() : "none");
        summary.status = "diverged";
        summary.message = msg.str();
        break;
      }
      t_phase = Clock::now();
      optimizer->step();
      optimizer_s += seconds_since(t_phase);
      if (telemetry.is_open() && layerwise && step % config.telemetry_every == 0) {
        const auto& t = layerwise->last_telemetry();
        for (const auto& l : t.layers)
          telemetry << step << "," << l.name << "," << l.weight_norm << "," << l.update_norm << "," << l.trust_ratio
                    << "," << l.effective_lr << "," << t.lr << "," << t.phi << "\n";
      }
      ++step;
      loss_sum += batch_loss * static_cast<double>(global_b);
      correct += batch_correct;
      seen += global_b;
      progress.step(epoch, index++, loss_sum / static_cast<double>(seen),
                    static_cast<double>(correct) / static_cast<double>(seen),
                    static_cast<double>(seen) / seconds_since(t_epoch));
      if (stop_now) {
        summary.status = "interrupted";
        summary.message = "stopped by a signal at step " + std::to_string(step) + "; resume from " +
                          (fs::exists(checkpoint_path) ? checkpoint_path.string() : "the start (no checkpoint yet)");
        break;
      }
    }
    if (summary.status != "completed") break;
    if (telemetry.is_open()) telemetry.flush();
    const double train_seconds = seconds_since(t_epoch);

    // Without --sync-bn each rank's BatchNorm running statistics saw only its shards: evaluate (and save)
    // rank 0's, as DistributedDataParallel does by broadcasting buffers.
    if (comm) dist::broadcast_buffers(*model, *comm);
    const Evaluation ev = evaluate(*model, split.test, config.eval_batch_size, device, comm.get());
    EpochRecord r;
    r.epoch = epoch + 1;
    r.step = step;
    r.lr = lr_t;
    r.phi = phi_t;
    r.train_loss = loss_sum / static_cast<double>(seen);
    r.train_acc = static_cast<double>(correct) / static_cast<double>(seen);
    r.test_loss = ev.loss;
    r.test_top1 = ev.top1;
    r.test_top5 = ev.top5;
    r.epoch_seconds = seconds_since(t_epoch);
    r.images_per_second = static_cast<double>(seen) / train_seconds;
    r.data_wait_seconds = loader.wait_seconds() - wait_before;
    r.compute_seconds = compute_s;
    r.allreduce_seconds = allreduce_s;
    r.optimizer_seconds = optimizer_s;
    summary.history.push_back(r);
    if (r.test_top1 > summary.best_test_top1) {
      summary.best_test_top1 = r.test_top1;
      summary.best_epoch = r.epoch;
    }

    // Checkpoint first, then the metrics row: the CSV never runs ahead of what can be resumed.
    json meta{{"epoch", epoch + 1}, {"step", step}, {"history", json::array()}};
    for (const auto& h : summary.history) meta["history"].push_back(record_json(h));
    if (lead) {
      save_checkpoint(checkpoint_path, *model, *optimizer, meta);
      std::ofstream metrics(out / "metrics.csv", std::ios::app);
      metrics << metrics_row(r);
    }
    progress.epoch(r, config.epochs);
  }

  summary.steps = step;
  summary.epochs_done = summary.history.empty() ? 0 : summary.history.back().epoch;
  summary.final_test_top1 = summary.history.empty() ? 0 : summary.history.back().test_top1;
  summary.wall_seconds = seconds_since(t_start);
  summary.world_size = world;
  summary.rank = env.rank;
  if (comm) {
    // Replicas must be bit-identical: every rank compares its parameters with rank 0's. The final barrier keeps
    // rank 0 (host of the rendezvous store) alive until everyone is done with collectives.
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> flat;
    for (const auto& p : model->parameters()) flat.push_back(p.detach().reshape(-1));
    const torch::Tensor mine = torch::cat(flat);
    std::vector<torch::Tensor> reference{mine.clone()};
    dist::guarded(*comm, [&] { comm->broadcast(reference, 0); });
    auto mismatches = reference[0].ne(mine).sum().to(torch::kFloat64).reshape({1});
    dist::guarded(*comm, [&] { comm->all_reduce_sum(mismatches); });
    summary.replica_mismatches = static_cast<int64_t>(mismatches.item<double>());
    if (summary.replica_mismatches != 0 && lead)
      std::fprintf(stderr, "warning: %lld parameter elements differ between ranks at the end of the run\n",
                   static_cast<long long>(summary.replica_mismatches));
    dist::guarded(*comm, [&] { comm->barrier(); });
  }
  if (!lead) return summary;
  if (summary.status == "completed") {
    torch::serialize::OutputArchive archive;
    model->save(archive);
    archive.save_to((out / "model.pt").string() + ".tmp");
    fs::rename((out / "model.pt").string() + ".tmp", out / "model.pt");
  }
  write_summary(out, summary, config);
  if (config.plots) {
    telemetry.close();
    const auto made = report::plot_run(out.string());
    if (made.empty() && !report::gnuplot_available() && config.progress != "none")
      std::printf("note: gnuplot is not installed; plots skipped (CSV files are complete)\n");
  }
  return summary;
}

}  // namespace train
}  // namespace largebatch
