#include "run_support.h"

#include <largebatch/optim/factory.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <limits>
#include <cstdarg>
#include <cstdio>
#include <cstring>
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

namespace {

std::string errno_text() { return std::strerror(errno); }

// Writes all of bytes to fd; false (errno set) on any failure, a short write included.
bool write_all(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

void write_atomically(const fs::path& path, const std::string& text) {
  // Temporary file, fsync, rename, fsync of the directory: a kill or a power cut at any moment leaves the old
  // file or the new one, never half of one; a failed write (full disk) removes the temporary file and names it.
  const fs::path tmp = path.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot write " + tmp.string() + ": " + errno_text());
  const bool written = write_all(fd, text.data(), text.size()) && ::fsync(fd) == 0;
  const int write_errno = errno;
  if (::close(fd) != 0 || !written) {
    const std::string why = written ? errno_text() : std::strerror(write_errno);
    ::unlink(tmp.c_str());
    std::error_code ec;
    throw std::runtime_error("cannot write " + tmp.string() + ": " + why + " (" + path.string() +
                             (fs::exists(path, ec) ? " is unchanged)" : " was not written)"));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(tmp.c_str());
    throw std::runtime_error("cannot rename " + tmp.string() + " to " + path.string() + ": " + why);
  }
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  const int dir_fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);  // makes the rename itself durable; best effort (some file systems refuse it)
    ::close(dir_fd);
  }
}

torch::Device parse_device(const std::string& name) {
  if (name == "cpu") return torch::kCPU;
  if (!torch::cuda::is_available()) throw OptionError("device", name + ": CUDA is not available in this build or machine");
  try {
    torch::Device d(name);
    if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count()))
      throw OptionError("device", name + ": only " + std::to_string(torch::cuda::device_count()) + " CUDA device(s)");
    return d;
  } catch (const c10::Error&) {
    throw OptionError("device", ": cannot parse '" + name + "'");
  }
}

void set_threads(int64_t n) {
  torch::set_num_threads(n > 0 ? static_cast<int>(n) : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
}

json resolved_optimizer_json(const optim::ResolvedRecipe& recipe, const torch::optim::Optimizer& optimizer,
                             int64_t warmup_steps, int64_t total_steps) {
  json j{{"recipe", recipe.recipe},
         {"builds", recipe.optimizer},
         {"lr", recipe.lr},
         {"schedule", recipe.schedule},
         {"warmup_steps", warmup_steps},
         {"total_steps", total_steps},
         {"options", recipe.options}};
  if (const auto* layerwise = dynamic_cast<const optim::LayerwiseOptimizer*>(&optimizer))
    j["engine"] = static_cast<const optim::LayerwiseOptions&>(layerwise->param_groups()[0].options()).describe();
  return j;
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

bool prepare_output_dir(const fs::path& out, bool resume, bool lead, Reporter* reporter,
                        const std::function<void(const std::string&)>& check_resumed) {
  const fs::path checkpoint = out / "checkpoint.pt";
  bool resuming = false;
  if (resume) {
    std::ifstream saved(out / "config.json");
    if (saved && check_resumed) {
      std::stringstream ss;
      ss << saved.rdbuf();
      check_resumed(ss.str());
    }
    // No checkpoint yet (the run was stopped in its first epoch, or never started): start from the beginning,
    // so that a retry loop can always pass --resume.
    resuming = fs::exists(checkpoint);
    if (!resuming) {  // a run that finished (completed or diverged) and lost its checkpoint is not redone over
      std::string status;
      try {
        std::ifstream in(out / "summary.json");
        if (in) status = json::parse(in).value("status", "");
      } catch (const std::exception&) {
      }
      if (status == "completed" || status == "diverged")
        throw OptionError("resume", ": " + out.string() + " holds a " + status + " run's results but no checkpoint.pt to resume "
              "from; choose another {out}", {"out"});
    }
    if (!resuming && lead && reporter)
      reporter->warning(reporter->option("resume") + ": no checkpoint in " + out.string() + " yet, starting from the beginning");
  } else if (fs::exists(out / "metrics.csv") || fs::exists(checkpoint)) {
    throw OptionError("out", out.string() + " already holds a run; {resume} it or choose another {out}", {"resume", "out"});
  }
  if (lead) {
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec) throw OptionError("out", ": cannot create " + out.string() + ": " + ec.message());
    // Try it (access() says yes to root even where nothing can be written, /proc say).
    const fs::path probe = out / ".largebatch-write-test";
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) throw OptionError("out", ": cannot write in " + out.string() + ": " + std::strerror(errno));
    ::close(fd);
    ::unlink(probe.c_str());
  }
  return resuming;
}

json within_epoch_of(const json& meta, int64_t steps_per_epoch, const fs::path& checkpoint) {
  const json within = meta.value("within_epoch", json::object());
  const int64_t batch = within.value("batch", int64_t{0});
  if (batch < 0 || batch > steps_per_epoch)
    throw OptionError("resume", ": checkpoint " + checkpoint.string() + " was taken after batch " + std::to_string(batch) +
          " of an epoch that now has " + std::to_string(steps_per_epoch) + " (data set or {drop-last} changed?)", {"drop-last"});
  return within;
}

void require_same_resume_point(dist::Communicator* comm, bool resuming, int64_t step, const fs::path& out) {
  if (!comm) return;
  auto sums = torch::tensor({resuming ? 1.0 : 0.0, static_cast<double>(step)}, torch::kFloat64);
  dist::guarded(*comm, [&] { comm->all_reduce_sum(sums); });
  const double world = static_cast<double>(comm->world());
  if (sums[0].item<double>() != (resuming ? world : 0.0) || sums[1].item<double>() != world * static_cast<double>(step))
    throw OptionError("resume", ": the ranks do not agree on where to resume (this rank: " +
          (resuming ? "step " + std::to_string(step) : std::string("no checkpoint")) + " in " + out.string() +
          "); every rank must see the same {out} (a shared file system)", {"out"});
}

void append_line(const fs::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::app | std::ios::binary);
  file << text;
  file.flush();
  if (!file) throw std::runtime_error("cannot append to " + path.string() + ": " + std::strerror(errno));
}



std::atomic<bool>& stop_flag() {
  static std::atomic<bool> flag{false};
  return flag;
}

void open_csv_log(std::ofstream& file, const fs::path& path, const std::string& header, bool resume,
                  int64_t keep_below, const std::string& option) {
  // An empty file is one an interrupted run created before its header reached the disk: it holds no rows.
  if (resume && fs::exists(path) && fs::file_size(path) > 0) {
    std::ifstream in(path);
    std::string line, kept;
    std::getline(in, line);
    if (line != header)
      throw OptionError("resume", ": " + path.string() + " has the columns \"" + line + "\", this version writes \"" + header +
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
    // The header lands whole before any row, so that the file never exists without it.
    try {
      write_atomically(path, header + "\n");
    } catch (const std::runtime_error& e) {
      throw OptionError(option, std::string(": ") + e.what());
    }
    file.open(path, std::ios::app);
  }
  if (!file) throw OptionError(option, ": cannot write " + path.string());
}

void open_telemetry(std::ofstream& file, const fs::path& path, bool resume, int64_t step) {
  open_csv_log(file, path, "step,layer,weight_norm,update_norm,grad_norm,trust_ratio,effective_lr,lr,phi", resume,
               step, "telemetry-every");
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

int64_t replica_mismatches(torch::nn::Module& module, dist::Communicator& comm) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> flat;
  for (const auto& p : module.parameters()) flat.push_back(p.detach().reshape(-1));
  const torch::Tensor mine = torch::cat(flat);
  std::vector<torch::Tensor> reference{mine.clone()};
  dist::guarded(comm, [&] { comm.broadcast(reference, 0); });
  auto mismatches = reference[0].ne(mine).sum().to(torch::kFloat64).reshape({1});
  dist::guarded(comm, [&] { comm.all_reduce_sum(mismatches); });
  return static_cast<int64_t>(mismatches.item<double>());
}

std::string format(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  va_list again;
  va_copy(again, args);
  const int n = std::vsnprintf(nullptr, 0, fmt, args);
  va_end(args);
  std::string out(n > 0 ? static_cast<size_t>(n) : 0, '\0');
  if (n > 0) std::vsnprintf(out.data(), out.size() + 1, fmt, again);
  va_end(again);
  return out;
}

}  // namespace detail
}  // namespace train
}  // namespace largebatch
