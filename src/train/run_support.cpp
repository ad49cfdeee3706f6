#include "run_support.h"

#include <largebatch/optim/factory.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

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

// Declared by the sanitizers' runtime when one is linked (weak: null otherwise).
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

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

bool prepare_output_dir(const fs::path& out, bool resume, bool lead,
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
        usage("--resume: " + out.string() + " holds a " + status + " run's results but no checkpoint.pt to resume "
              "from; choose another --out");
    }
    if (!resuming && lead)
      std::fprintf(stderr, "largebatch: --resume: no checkpoint in %s yet, starting from the beginning\n",
                   out.string().c_str());
  } else if (fs::exists(out / "metrics.csv") || fs::exists(checkpoint)) {
    usage("--out " + out.string() + " already holds a run; pass --resume to continue it or choose another --out");
  }
  if (lead) {
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec) usage("--out: cannot create " + out.string() + ": " + ec.message());
    // Try it (access() says yes to root even where nothing can be written, /proc say).
    const fs::path probe = out / ".largebatch-write-test";
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) usage("--out: cannot write in " + out.string() + ": " + std::strerror(errno));
    ::close(fd);
    ::unlink(probe.c_str());
  }
  return resuming;
}

json within_epoch_of(const json& meta, int64_t steps_per_epoch, const fs::path& checkpoint) {
  const json within = meta.value("within_epoch", json::object());
  const int64_t batch = within.value("batch", int64_t{0});
  if (batch < 0 || batch > steps_per_epoch)
    usage("--resume: checkpoint " + checkpoint.string() + " was taken after batch " + std::to_string(batch) +
          " of an epoch that now has " + std::to_string(steps_per_epoch) + " (data set or --drop-last changed?)");
  return within;
}

void print_resumed(const fs::path& out, int64_t epoch, const json& within_epoch, int64_t step) {
  if (within_epoch.contains("batch"))
    std::printf("resumed %s in epoch %lld after its batch %lld (step %lld)\n", out.string().c_str(),
                static_cast<long long>(epoch + 1), static_cast<long long>(within_epoch.at("batch").get<int64_t>()),
                static_cast<long long>(step));
  else
    std::printf("resumed %s at epoch %lld (step %lld)\n", out.string().c_str(), static_cast<long long>(epoch),
                static_cast<long long>(step));
}

void require_same_resume_point(dist::Communicator* comm, bool resuming, int64_t step, const fs::path& out) {
  if (!comm) return;
  auto sums = torch::tensor({resuming ? 1.0 : 0.0, static_cast<double>(step)}, torch::kFloat64);
  dist::guarded(*comm, [&] { comm->all_reduce_sum(sums); });
  const double world = static_cast<double>(comm->world());
  if (sums[0].item<double>() != (resuming ? world : 0.0) || sums[1].item<double>() != world * static_cast<double>(step))
    usage("--resume: the ranks do not agree on where to resume (this rank: " +
          (resuming ? "step " + std::to_string(step) : std::string("no checkpoint")) + " in " + out.string() +
          "); every rank must see the same --out (a shared file system)");
}

void append_line(const fs::path& path, const std::string& text) {
  std::ofstream file(path, std::ios::app | std::ios::binary);
  file << text;
  file.flush();
  if (!file) throw std::runtime_error("cannot append to " + path.string() + ": " + std::strerror(errno));
}

// --- the checkpoint container ----------------------------------------------------------------------

namespace {

constexpr char kCheckpointMagic[] = "largebatch-checkpoint\n";  // 22 bytes: `head -1 checkpoint.pt` says what it is
constexpr size_t kMagicBytes = sizeof(kCheckpointMagic) - 1;
constexpr uint32_t kCheckpointVersion = 1;
constexpr size_t kHeaderBytes = kMagicBytes + 4 + 8 + 4;  // magic, version, payload size, CRC-32

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}
uint64_t get_le(const std::string& in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t{static_cast<unsigned char>(in[at + i])} << (8 * i);
  return v;
}

uint32_t crc32_of(const char* data, size_t size) {
  uLong crc = crc32(0L, Z_NULL, 0);
  while (size > 0) {  // zlib takes uInt lengths
    const uInt chunk = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data), chunk);
    data += chunk;
    size -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

std::string first_line(const std::string& text) {
  const auto b = text.find_first_not_of(" \n");
  if (b == std::string::npos) return "";
  return text.substr(b, text.find('\n', b) - b);
}

std::string hex8(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "%08x", v);
  return buf;
}

std::string read_whole_file(const fs::path& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw CheckpointError(what + " " + path.string() + ": cannot open: " + std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw CheckpointError(what + " " + path.string() + ": read error");
  return bytes;
}

}  // namespace

std::string seal_checkpoint(const std::string& payload) {
  std::string out(kCheckpointMagic, kMagicBytes);
  out.reserve(kHeaderBytes + payload.size());
  put_le(out, kCheckpointVersion, 4);
  put_le(out, payload.size(), 8);
  put_le(out, crc32_of(payload.data(), payload.size()), 4);
  out += payload;
  return out;
}

bool is_sealed_checkpoint(const std::string& bytes) {
  return bytes.size() >= kMagicBytes && bytes.compare(0, kMagicBytes, kCheckpointMagic) == 0;
}

std::pair<size_t, size_t> unseal_checkpoint(const std::string& bytes, const std::string& path) {
  const std::string where = "checkpoint " + path + ": ";
  if (!is_sealed_checkpoint(bytes)) {
    if (bytes.compare(0, 4, "PK\x03\x04") == 0)
      throw CheckpointError(where + "a bare LibTorch archive without the largebatch header and checksum (written "
                            "by largebatch 0.1 before checksums, or by another program); it cannot be verified");
    throw CheckpointError(where + "not a largebatch checkpoint (no \"largebatch-checkpoint\" header)");
  }
  if (bytes.size() < kHeaderBytes)
    throw CheckpointError(where + "truncated: " + std::to_string(bytes.size()) + " bytes, the header alone is " +
                          std::to_string(kHeaderBytes));
  const uint64_t version = get_le(bytes, kMagicBytes, 4);
  if (version != kCheckpointVersion)
    throw CheckpointError(where + "format version " + std::to_string(version) + ", this largebatch reads version " +
                          std::to_string(kCheckpointVersion));
  const uint64_t size = get_le(bytes, kMagicBytes + 4, 8);
  const uint64_t have = bytes.size() - kHeaderBytes;
  if (size != have)
    throw CheckpointError(where + (have < size ? "truncated" : "trailing data") + ": the header promises " +
                          std::to_string(size) + " bytes of payload, the file holds " + std::to_string(have));
  const uint32_t stored = static_cast<uint32_t>(get_le(bytes, kMagicBytes + 12, 4));
  const uint32_t computed = crc32_of(bytes.data() + kHeaderBytes, static_cast<size_t>(size));
  if (stored != computed)
    throw CheckpointError(where + "damaged: CRC-32 " + hex8(computed) + " of the payload, the header says " +
                          hex8(stored));
  return {kHeaderBytes, static_cast<size_t>(size)};
}

// LibTorch 1.13's archive reader can crash rather than throw on a crafted archive (fuzz_checkpoint_payload found
// SIGSEGV and aborts in its TorchScript type parser, which the unpickler runs on type names read from the file).
// So it first reads the bytes in a child process: a crash there becomes a CheckpointError here. The child only
// parses and exits; a child that does not finish within a minute (a lock held across fork) is killed and the
// read goes ahead in this process, as it would have without the probe.
void read_archive_guarded(const char* data, size_t size, torch::Device device, torch::serialize::InputArchive& archive,
                          const std::string& what) {
  std::fflush(nullptr);
  const pid_t child = ::fork();
  if (child == 0) {
    const int null_fd = ::open("/dev/null", O_WRONLY);
    if (null_fd >= 0) ::dup2(null_fd, 2);  // the crash is reported by the parent, in one line
    // A crash here must end this child plainly: no handler of the parent's (a sanitizer's report and death
    // callback, libFuzzer's crash file) may take it for the parent's own.
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(nullptr);
    for (int s : {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT}) ::signal(s, SIG_DFL);
    int code = 0;
    try {
      torch::serialize::InputArchive probe;
      probe.load_from(data, size, torch::kCPU);
    } catch (...) {
      code = 3;  // a clean refusal: the parent's own read below throws it again, with its message
    }
    ::_exit(code);
  }
  if (child > 0) {
    int status = 0;
    pid_t done = 0;
    for (int waited_ms = 0; waited_ms < 60000; waited_ms += 5) {
      done = ::waitpid(child, &status, WNOHANG);
      if (done != 0) break;
      ::usleep(5000);
    }
    if (done == 0) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
    } else if (done == child) {
      // SIGKILL comes from outside (the OOM killer, the child holding a second copy): no verdict, read here.
      const bool crashed = (WIFSIGNALED(status) && WTERMSIG(status) != SIGKILL) ||
                           (WIFEXITED(status) && WEXITSTATUS(status) != 0 && WEXITSTATUS(status) != 3);
      if (crashed)
        throw CheckpointError(what + "LibTorch crashes reading it (" +
                              (WIFSIGNALED(status) ? std::string(strsignal(WTERMSIG(status)))
                                                   : "exit " + std::to_string(WEXITSTATUS(status))) +
                              "): the archive is malformed or crafted");
    }
  }
  try {
    archive.load_from(data, size, device);
  } catch (const std::exception& e) {  // c10::Error, torch::jit::ErrorReport, ...
    throw CheckpointError(what + "LibTorch cannot read it (" + first_line(e.what()) + ")");
  }
}

// A sealed checkpoint's bytes: verified (CheckpointError naming path), then read.
void read_sealed_archive(const std::string& bytes, const fs::path& path, torch::Device device,
                         torch::serialize::InputArchive& archive) {
  const auto [offset, size] = unseal_checkpoint(bytes, path.string());
  read_archive_guarded(bytes.data() + offset, size, device, archive,
                       "checkpoint " + path.string() + ": the checksum matches, but ");
}

}  // namespace detail

void load_archive(const fs::path& path, torch::serialize::InputArchive& archive, torch::Device device) {
  const std::string bytes = detail::read_whole_file(path, "file");
  if (detail::is_sealed_checkpoint(bytes)) {
    detail::read_sealed_archive(bytes, path, device, archive);
    return;
  }
  detail::read_archive_guarded(bytes.data(), bytes.size(), device, archive,
                               path.string() + ": not a largebatch checkpoint nor a LibTorch archive: ");
}

namespace detail {

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
  std::ostringstream payload;
  root.save_to(payload);
  write_atomically(path, seal_checkpoint(payload.str()));
}

json load_checkpoint(const fs::path& path, torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                     torch::Device device) {
  torch::serialize::InputArchive root;
  try {
    read_sealed_archive(read_whole_file(path, "checkpoint"), path, device, root);  // a bare archive is refused
  } catch (const CheckpointError& e) {
    usage(std::string("--resume: ") + e.what());
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
  } catch (const std::exception& e) {  // c10::Error, torch::jit::ErrorReport, ...
    usage("--resume: checkpoint " + path.string() + " does not match this run's model or optimizer");
  }
  json parsed;
  try {
    if (!meta.isString()) throw std::runtime_error("not a string");
    parsed = json::parse(meta.toStringRef());
    if (!parsed.is_object()) throw std::runtime_error("not an object");
  } catch (const std::exception& e) {
    usage("--resume: checkpoint " + path.string() + ": its meta record is not a JSON object");
  }
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    try {
      gen.set_state(rng.cpu());
    } catch (const std::exception& e) {  // c10::Error, torch::jit::ErrorReport, ...
      usage("--resume: checkpoint " + path.string() + ": its random-number state is not a CPU generator state");
    }
  }
  return parsed;
}

void save_module(const fs::path& path, torch::nn::Module& module) {
  torch::serialize::OutputArchive archive;
  module.save(archive);
  std::ostringstream bytes;
  archive.save_to(bytes);
  write_atomically(path, bytes.str());
}

std::string metrics_header() {
  return "epoch,step,lr,phi,train_loss,train_acc,test_loss,test_top1,test_top5,epoch_seconds,img_per_s,data_wait_s,"
         "compute_s,allreduce_s,optimizer_s,val_loss,val_top1,val_top5\n";
}

std::string metrics_row(const EpochRecord& r) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%lld,%lld,%.9g,%.9g,%.6f,%.6f,%.6f,%.6f,%.6f,%.3f,%.1f,%.3f,%.3f,%.3f,%.3f",
                static_cast<long long>(r.epoch), static_cast<long long>(r.step), r.lr, r.phi, r.train_loss,
                r.train_acc, r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds, r.images_per_second,
                r.data_wait_seconds, r.compute_seconds, r.allreduce_seconds, r.optimizer_seconds);
  std::string row(buf);  // then the validation columns, empty without a validation split
  for (double v : {r.val_loss, r.val_top1, r.val_top5}) {
    char field[32] = "";
    if (std::isfinite(v)) std::snprintf(field, sizeof(field), "%.6f", v);
    row += std::string(",") + field;
  }
  return row + "\n";
}

json record_json(const EpochRecord& r) {
  return json{{"epoch", r.epoch}, {"step", r.step}, {"lr", r.lr}, {"phi", r.phi}, {"train_loss", r.train_loss},
              {"train_acc", r.train_acc}, {"test_loss", r.test_loss}, {"test_top1", r.test_top1},
              {"test_top5", r.test_top5}, {"epoch_seconds", r.epoch_seconds},
              {"img_per_s", r.images_per_second}, {"data_wait_s", r.data_wait_seconds},
              {"compute_s", r.compute_seconds}, {"allreduce_s", r.allreduce_seconds},
              {"optimizer_s", r.optimizer_seconds}, {"val_loss", r.val_loss}, {"val_top1", r.val_top1},
              {"val_top5", r.val_top5}};
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
  for (auto [key, field] : {std::pair<const char*, double*>{"val_loss", &r.val_loss}, {"val_top1", &r.val_top1},
                            {"val_top5", &r.val_top5}})
    if (j.contains(key) && !j.at(key).is_null()) *field = j.at(key).get<double>();
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
