#include "run_support.h"

#include <largebatch/optim/factory.h>

#include <unistd.h>

#include <algorithm>
#include <limits>
#include <cstdarg>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
using nlohmann::json;

namespace largebatch {
namespace train {
namespace detail {

bool one_of(const std::string& value, std::initializer_list<const char*> options) {
  for (const char* o : options)
    if (value == o) return true;
  return false;
}

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

void set_threads(int64_t n) {
  torch::set_num_threads(n > 0 ? static_cast<int>(n) : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

bool is_layerwise(const std::string& optimizer) {
  return optim::resolve_optimizer_name(optimizer).find(':') != std::string::npos;
}

data::DatasetSplit load_data(const std::string& name, const std::string& dir, int64_t synthetic_size, uint64_t seed) {
  if (name == "synthetic") {
    data::SyntheticOptions so;
    so.train_size = synthetic_size;
    so.test_size = std::max<int64_t>(synthetic_size / 4, 64);
    so.seed = seed;
    return data::make_synthetic(so);
  }
  return data::load_dataset(name, dir, seed);
}

models::Classifier make_classifier(const std::string& name, const data::ImageDataset& d, const std::string& init,
                                   uint64_t seed, int64_t num_classes) {
  models::ModelOptions mo;
  mo.name = name;
  mo.num_classes = num_classes;
  mo.in_channels = d.channels();
  mo.image_size = d.height();
  mo.init = init;
  mo.seed = seed;
  return models::make_model(mo);
}

std::shared_ptr<dist::Communicator> connect_ranks(const dist::LaunchEnv& env, torch::Device device, double timeout,
                                                  bool sync_bn, torch::nn::Module& module,
                                                  models::CrossRankSum* cross_rank_sum) {
  dist::CommunicatorOptions co;
  co.timeout = std::chrono::milliseconds(std::llround(timeout * 1000));
  auto comm = dist::Communicator::connect(env, device, co);
  if (sync_bn) {
    dist::Communicator* c = comm.get();
    const models::CrossRankSum sum = [c](const torch::Tensor& t) { return dist::all_reduce_sum_differentiable(t, *c); };
    models::synchronise_batchnorm(module, sum);
    if (cross_rank_sum) *cross_rank_sum = sum;
  }
  return comm;
}

void prepare_output_dir(const fs::path& out, bool resume, bool lead,
                        const std::function<void(const std::string&)>& check_resumed) {
  const fs::path checkpoint = out / "checkpoint.pt";
  if (resume) {
    if (!fs::exists(checkpoint)) usage("--resume: no checkpoint at " + checkpoint.string());
    std::ifstream saved(out / "config.json");
    if (saved && check_resumed) {
      std::stringstream ss;
      ss << saved.rdbuf();
      check_resumed(ss.str());
    }
  } else if (fs::exists(out / "metrics.csv") || fs::exists(checkpoint)) {
    usage("--out " + out.string() + " already holds a run; pass --resume to continue it or choose another --out");
  }
  if (lead) {
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec) usage("--out: cannot create " + out.string() + ": " + ec.message());
  }
}

void save_checkpoint(const fs::path& path, torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                     const json& meta) {
  torch::serialize::OutputArchive root;
  torch::serialize::OutputArchive model_archive, optimizer_archive;
  module.save(model_archive);
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

json load_checkpoint(const fs::path& path, torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                     torch::Device device) {
  torch::serialize::InputArchive root;
  try {
    root.load_from(path.string(), device);
  } catch (const c10::Error& e) {
    usage("--resume: cannot read checkpoint " + path.string() + " (damaged or not a largebatch checkpoint)");
  }
  c10::IValue meta;
  torch::Tensor rng;
  try {
    torch::serialize::InputArchive model_archive, optimizer_archive;
    root.read("model", model_archive);
    root.read("optimizer", optimizer_archive);
    module.load(model_archive);
    optimizer.load(optimizer_archive);
    root.read("meta", meta);
    root.read("rng_cpu", rng);
  } catch (const c10::Error& e) {
    usage("--resume: checkpoint " + path.string() + " does not match this run's model or optimizer");
  }
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng.cpu());
  }
  return json::parse(meta.toStringRef());
}

void save_module(const fs::path& path, torch::nn::Module& module) {
  torch::serialize::OutputArchive archive;
  module.save(archive);
  const std::string tmp = path.string() + ".tmp";
  archive.save_to(tmp);
  fs::rename(tmp, path);
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
  // JSON has no NaN: nlohmann writes it as null (an epoch whose every step was skipped has no train loss).
  auto number = [&](const char* key) {
    const json& v = j.at(key);
    return v.is_null() ? std::numeric_limits<double>::quiet_NaN() : v.get<double>();
  };
  EpochRecord r;
  r.epoch = j.at("epoch");
  r.step = j.at("step");
  r.lr = number("lr");
  r.phi = number("phi");
  r.train_loss = number("train_loss");
  r.train_acc = number("train_acc");
  r.test_loss = number("test_loss");
  r.test_top1 = number("test_top1");
  r.test_top5 = number("test_top5");
  r.epoch_seconds = number("epoch_seconds");
  r.images_per_second = number("img_per_s");
  r.data_wait_seconds = number("data_wait_s");
  r.compute_seconds = j.value("compute_s", 0.0);
  r.allreduce_seconds = j.value("allreduce_s", 0.0);
  r.optimizer_seconds = j.value("optimizer_s", 0.0);
  return r;
}

std::atomic<bool>& stop_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

void open_csv_log(std::ofstream& file, const fs::path& path, const std::string& header, bool resume,
                  int64_t keep_below, const std::string& flag) {
  if (resume && fs::exists(path)) {
    std::ifstream in(path);
    std::string line, kept;
    std::getline(in, line);
    if (line != header)
      usage("--resume: " + path.string() + " has the columns \"" + line + "\", this version writes \"" + header +
            "\"; move the file away to resume");
    kept = line + "\n";
    while (std::getline(in, line)) {
      try {
        if (std::stoll(line.substr(0, line.find(','))) < keep_below) kept += line + "\n";
      } catch (const std::exception&) {
        // a torn last line of an interrupted run: dropped
      }
    }
    write_atomically(path, kept);
    file.open(path, std::ios::app);
  } else {
    file.open(path, std::ios::trunc);
    file << header << "\n";
  }
  if (!file) usage(flag + ": cannot write " + path.string());
}

void open_telemetry(std::ofstream& file, const fs::path& path, bool resume, int64_t step) {
  open_csv_log(file, path, "step,layer,weight_norm,update_norm,grad_norm,trust_ratio,effective_lr,lr,phi", resume,
               step, "--telemetry-every");
}

void write_telemetry(std::ofstream& file, int64_t step, const optim::StepTelemetry& t) {
  for (const auto& l : t.layers)
    file << step << "," << l.name << "," << l.weight_norm << "," << l.update_norm << "," << l.grad_norm << ","
         << l.trust_ratio << ","
         << l.effective_lr << "," << t.lr << "," << t.phi << "\n";
}

namespace {
// Name of the first tensor with a NaN or infinity, "" when all are finite (one host read for all).
std::string first_nonfinite(const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  std::vector<torch::Tensor> finite;
  for (const auto& t : tensors) finite.push_back(torch::isfinite(t.second).all());
  if (finite.empty()) return "";
  const torch::Tensor host = torch::stack(finite).cpu();
  const bool* ok = host.data_ptr<bool>();
  for (size_t i = 0; i < tensors.size(); ++i)
    if (!ok[i]) return tensors[i].first;
  return "";
}
}  // namespace

std::string first_nonfinite_gradient(torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> grads;
  for (const auto& item : module.named_parameters())
    if (item.value().grad().defined()) grads.emplace_back(item.key(), item.value().grad());
  return first_nonfinite(grads);
}

std::string first_nonfinite_parameter(torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> params;
  for (const auto& item : module.named_parameters()) params.emplace_back(item.key(), item.value());
  return first_nonfinite(params);
}

std::string largest_trust_ratio(const optim::LayerwiseOptimizer* optimizer) {
  if (!optimizer || optimizer->last_telemetry().layers.empty()) return "";
  const auto& layers = optimizer->last_telemetry().layers;
  const auto worst = std::max_element(layers.begin(), layers.end(), [](const auto& a, const auto& b) {
    return !(a.trust_ratio >= b.trust_ratio);  // NaN counts as the largest
  });
  std::ostringstream msg;
  msg << "; largest trust ratio at step " << optimizer->last_telemetry().step << ": " << worst->name
      << " (r = " << worst->trust_ratio << ", lr*r = " << worst->effective_lr << ")";
  return msg.str();
}

int64_t replica_mismatches(torch::nn::Module& module, dist::Communicator& comm, bool lead) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> flat;
  for (const auto& p : module.parameters()) flat.push_back(p.detach().reshape(-1));
  const torch::Tensor mine = torch::cat(flat);
  std::vector<torch::Tensor> reference{mine.clone()};
  dist::guarded(comm, [&] { comm.broadcast(reference, 0); });
  auto mismatches = reference[0].ne(mine).sum().to(torch::kFloat64).reshape({1});
  dist::guarded(comm, [&] { comm.all_reduce_sum(mismatches); });
  const auto count = static_cast<int64_t>(mismatches.item<double>());
  if (count != 0 && lead)
    std::fprintf(stderr, "warning: %lld parameter elements differ between ranks at the end of the run\n",
                 static_cast<long long>(count));
  return count;
}

Progress::Progress(const std::string& mode, int64_t epochs, int64_t steps_per_epoch)
    : epochs_(epochs), steps_(steps_per_epoch) {
  bar_ = mode == "bar" || (mode == "auto" && isatty(fileno(stderr)));
  quiet_ = mode == "none";
}

void Progress::step(int64_t epoch, int64_t index, const std::string& fields) {
  if (!bar_) return;
  const int width = 30;
  const int filled = static_cast<int>(width * (index + 1) / std::max<int64_t>(1, steps_));
  std::fprintf(stderr, "\repoch %lld/%lld [%s%s] %lld/%lld %s   ", static_cast<long long>(epoch + 1),
               static_cast<long long>(epochs_), std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), static_cast<long long>(index + 1),
               static_cast<long long>(steps_), fields.c_str());
  std::fflush(stderr);
}

void Progress::epoch_line(const std::string& line) {
  if (quiet_) return;
  if (bar_) std::fprintf(stderr, "\r%120s\r", "");
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  return buf;
}

}  // namespace detail
}  // namespace train
}  // namespace largebatch
