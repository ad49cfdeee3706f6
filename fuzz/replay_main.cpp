// largebatch_fuzz_replay: runs files through a fuzz target without libFuzzer (any compiler, any build), so the
// seed corpora and the inputs of every crash ever found are replayed by the ordinary test suite.
//   largebatch_fuzz_replay <target> <file or directory>...   (exit 0: every input handled, and there was one)
//   largebatch_fuzz_replay --list
//   largebatch_fuzz_replay --write-seeds <dir>
#include "targets.h"

#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace fs = std::filesystem;
namespace lf = largebatch::fuzz;

namespace {

// The input being run, for the crash handler: a failing replay names the file that made it fail.
char current_input[4096];

void name_the_input(int signal) {
  const char* what = "largebatch_fuzz_replay: crashed on ";
  (void)!::write(2, what, std::strlen(what));
  (void)!::write(2, current_input, std::strlen(current_input));
  (void)!::write(2, "\n", 1);
  std::signal(signal, SIG_DFL);
  std::raise(signal);
}

}  // namespace

int main(int argc, char** argv) {
  for (int s : {SIGABRT, SIGSEGV, SIGBUS, SIGFPE, SIGILL}) std::signal(s, name_the_input);
  if (argc == 2 && std::string(argv[1]) == "--list") {
    for (const auto& t : lf::targets()) std::printf("%-20s %s\n", t.name, t.what);
    return 0;
  }
  if (argc == 3 && std::string(argv[1]) == "--write-seeds") {
    lf::write_seeds(argv[2]);
    return 0;
  }
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <target> <file or directory>... | --list | --write-seeds <dir>\n", argv[0]);
    return 2;
  }
  const lf::TargetInfo* target = lf::find_target(argv[1]);
  if (!target) {
    std::fprintf(stderr, "unknown target '%s' (--list shows them)\n", argv[1]);
    return 2;
  }
  std::vector<fs::path> files;
  for (int i = 2; i < argc; ++i) {
    const fs::path p(argv[i]);
    std::error_code ec;
    if (fs::is_directory(p, ec)) {
      for (const auto& e : fs::recursive_directory_iterator(p))
        if (e.is_regular_file()) files.push_back(e.path());
    } else if (fs::is_regular_file(p, ec)) {
      files.push_back(p);
    } else {
      std::fprintf(stderr, "%s: no such file or directory\n", argv[i]);
      return 2;
    }
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {  // a replay of nothing would pass without testing anything
    std::fprintf(stderr, "%s: no input files in the given paths\n", target->name);
    return 1;
  }
  for (const auto& f : files) {
    std::snprintf(current_input, sizeof(current_input), "%s", f.c_str());
    std::ifstream in(f, std::ios::binary);
    const std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    target->run(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());  // a bug aborts here, and the handler names f
  }
  std::printf("%s: %zu inputs handled\n", target->name, files.size());
  return 0;
}
