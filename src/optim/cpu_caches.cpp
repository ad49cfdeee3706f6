// The CPU's caches as Linux reports them, for sizing the fused step's blocks at run time: the machines this
// runs on differ (1 to 4 MiB of L2 per core), and one fixed size is slow on some of them.
#include <largebatch/optim/layerwise.h>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>

namespace largebatch {
namespace optim {

namespace {

std::string first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// "1024K", "32M", "48K" (sysfs's sizes), or a plain byte count; -1 when not one.
int64_t size_of(const std::string& text) {
  if (text.empty() || !std::isdigit(static_cast<unsigned char>(text[0]))) return -1;
  size_t used = 0;
  int64_t value = 0;
  try {
    value = std::stoll(text, &used);
  } catch (const std::exception&) {
    return -1;
  }
  const std::string suffix = text.substr(used);
  if (suffix.empty()) return value;
  if (suffix == "K" || suffix == "k" || suffix == "KiB") return value << 10;
  if (suffix == "M" || suffix == "m" || suffix == "MiB") return value << 20;
  if (suffix == "G" || suffix == "g" || suffix == "GiB") return value << 30;
  return -1;
}

// Logical CPUs in a list such as "0-3,8,10-11".
int cpus_in(const std::string& list) {
  int count = 0;
  std::stringstream items(list);
  for (std::string item; std::getline(items, item, ',');) {
    if (item.empty()) continue;
    const auto dash = item.find('-');
    try {
      count += dash == std::string::npos ? 1 : std::stoi(item.substr(dash + 1)) - std::stoi(item.substr(0, dash)) + 1;
    } catch (const std::exception&) {
      return 1;
    }
  }
  return count > 0 ? count : 1;
}

}  // namespace

CpuCaches cpu_caches() {
  CpuCaches c;
  const std::string base = "/sys/devices/system/cpu/cpu0/cache/index";
  for (int index = 0; index < 8; ++index) {
    const std::string dir = base + std::to_string(index) + "/";
    const std::string level = first_line(dir + "level"), type = first_line(dir + "type");
    if (level.empty()) break;
    const int64_t bytes = size_of(first_line(dir + "size"));
    if (bytes <= 0 || type == "Instruction") continue;
    const int shared = cpus_in(first_line(dir + "shared_cpu_list"));
    if (level == "1") c.l1d_bytes = bytes;
    if (level == "2") c.l2_bytes = bytes, c.l2_shared_by = shared;
    if (level == "3") c.l3_bytes = bytes, c.l3_shared_by = shared;
    c.source = "sysfs";
  }
  if (c.source.empty()) {
    // What the CPUID instruction says; in a VM it can describe the host rather than this guest.
#ifdef _SC_LEVEL2_CACHE_SIZE
    c.l1d_bytes = std::max<long>(0, sysconf(_SC_LEVEL1_DCACHE_SIZE));
    c.l2_bytes = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
    c.l3_bytes = std::max<long>(0, sysconf(_SC_LEVEL3_CACHE_SIZE));
#endif
    c.source = c.l2_bytes > 0 ? "sysconf" : "none";
  }
  return c;
}

int64_t parse_byte_count(const std::string& text, const std::string& what) {
  const int64_t bytes = size_of(text);
  if (bytes < 0)
    throw std::invalid_argument(what + ": '" + text + "' is not a byte count (e.g. 524288, 512K or 1M)");
  return bytes;
}

}  // namespace optim
}  // namespace largebatch
