// The checkpoint container (format in <largebatch/train/checkpoint.h>) and the files a run saves its state in.
#include "run_support.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zlib.h>

#include <cstring>
#include <sstream>

// Declared by the sanitizers' runtime when one is linked (weak: null otherwise).
extern "C" void __sanitizer_set_death_callback(void (*callback)(void)) __attribute__((weak));

namespace fs = std::filesystem;
using nlohmann::json;

namespace largebatch {
namespace train {
namespace detail {

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
                     const json& meta, const std::vector<torch::Tensor>* average) {
  torch::serialize::OutputArchive root;
  torch::serialize::OutputArchive model_archive, optimizer_archive;
  module.save(model_archive);
  optimizer.save(optimizer_archive);
  root.write("model", model_archive);
  root.write("optimizer", optimizer_archive);
  root.write("meta", c10::IValue(meta.dump()));
  if (average) {
    torch::serialize::OutputArchive average_archive;
    average_archive.write("count", c10::IValue(static_cast<int64_t>(average->size())));
    for (size_t i = 0; i < average->size(); ++i) average_archive.write(std::to_string(i), (*average)[i], true);
    root.write("weight_average", average_archive);
  }
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
                     torch::Device device, std::vector<torch::Tensor>* average) {
  torch::serialize::InputArchive root;
  try {
    read_sealed_archive(read_whole_file(path, "checkpoint"), path, device, root);  // a bare archive is refused
  } catch (const CheckpointError& e) {
    throw OptionError("resume", std::string(": ") + e.what());
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
    torch::serialize::InputArchive average_archive;
    if (average && root.try_read("weight_average", average_archive)) {
      c10::IValue count;
      average_archive.read("count", count);
      for (int64_t i = 0; i < count.toInt(); ++i) {
        torch::Tensor t;
        average_archive.read(std::to_string(i), t, true);
        average->push_back(t);
      }
    }
  } catch (const std::exception& e) {  // c10::Error, torch::jit::ErrorReport, ...
    throw OptionError("resume", ": checkpoint " + path.string() + " does not match this run's model or optimizer");
  }
  json parsed;
  try {
    if (!meta.isString()) throw std::runtime_error("not a string");
    parsed = json::parse(meta.toStringRef());
    if (!parsed.is_object()) throw std::runtime_error("not an object");
  } catch (const std::exception& e) {
    throw OptionError("resume", ": checkpoint " + path.string() + ": its meta record is not a JSON object");
  }
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    try {
      gen.set_state(rng.cpu());
    } catch (const std::exception& e) {  // c10::Error, torch::jit::ErrorReport, ...
      throw OptionError("resume", ": checkpoint " + path.string() + ": its random-number state is not a CPU generator state");
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

}  // namespace detail
}  // namespace train
}  // namespace largebatch
