// `largebatch sweep`: every run of a grid as a child process, resumed, skipped or retried by its folder's state.
#include <largebatch/report/sweep.h>

#include "files.h"

#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <thread>

namespace fs = std::filesystem;
using nlohmann::json;

namespace largebatch {
namespace report {

namespace {

using detail::format;
using detail::read_text;
using detail::write_atomically;

std::atomic<bool> g_sweep_stop{false};

// The status a finished run left in summary.json ("" when there is none or it cannot be read).
std::string summary_status(const fs::path& dir, json* summary = nullptr) {
  try {
    const json j = json::parse(read_text(dir / "summary.json"));
    if (summary) *summary = j;
    return j.value("status", "");
  } catch (const std::exception&) {
    return "";
  }
}

bool has_setting(const PlannedRun& run, const std::string& key) {
  for (const auto& kv : run.settings)
    if (kv.first == key) return true;
  return false;
}

struct RunRecord {
  std::string status = "pending";  // pending | skipped-<status> | completed | diverged | failed | interrupted
  int exit_code = -1;
  double seconds = 0;
};

std::string sweep_csv(const SweepGrid& grid, const std::vector<RunRecord>& records, const fs::path& out) {
  std::string csv = "run,status,exit_code,seconds,final_test_top1,best_test_top1,settings\n";
  for (size_t i = 0; i < grid.runs.size(); ++i) {
    json summary;
    summary_status(out / grid.runs[i].name, &summary);
    std::string settings;
    for (const auto& kv : grid.runs[i].settings) settings += (settings.empty() ? "" : " ") + kv.first + "=" + kv.second;
    csv += grid.runs[i].name + "," + records[i].status + "," + std::to_string(records[i].exit_code) + "," +
           format("%.1f", records[i].seconds) + "," +
           (summary.contains("final_test_top1") ? format("%.6f", summary["final_test_top1"].get<double>()) : "") + "," +
           (summary.contains("best_test_top1") ? format("%.6f", summary["best_test_top1"].get<double>()) : "") + ",\"" +
           settings + "\"\n";
  }
  return csv;
}

}  // namespace

void request_sweep_stop() { g_sweep_stop = true; }

SweepResult run_sweep(const SweepGrid& grid, const SweepOptions& o) {
  if (o.jobs <= 0) throw std::invalid_argument("--jobs must be > 0");
  if (o.out.empty()) throw std::invalid_argument("--out must not be empty");
  const fs::path out(o.out);
  const auto print = [&o](const std::string& line) {
    if (o.print) o.print(line);
  };
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) throw std::invalid_argument("--out: cannot create " + out.string() + ": " + ec.message());
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t threads = std::max<int64_t>(1, cores / o.jobs);

  SweepResult result;
  result.total = static_cast<int64_t>(grid.runs.size());
  std::vector<RunRecord> records(grid.runs.size());
  std::vector<size_t> pending;
  for (size_t i = 0; i < grid.runs.size(); ++i) {
    const fs::path dir = out / grid.runs[i].name;
    const std::string status = summary_status(dir);
    if (status == "completed" || status == "diverged") {
      records[i].status = "skipped-" + status;
      ++result.skipped;
    } else {
      pending.push_back(i);
    }
    if (o.dry_run) {
      std::string settings;
      for (const auto& kv : grid.runs[i].settings) settings += " --" + kv.first + "=" + kv.second;
      const bool resumable = fs::exists(dir / "checkpoint.pt");
      char state[16];
      std::snprintf(state, sizeof(state), "%-12s",
                    !records[i].status.rfind("skipped", 0) ? "finished" : resumable ? "resume" : "run");
      print(state + std::string(" ") + grid.runs[i].name + ":" + settings);
    }
  }
  if (o.dry_run) return result;
  {
    char line[512];
    std::snprintf(line, sizeof(line),
                  "sweep: %lld runs (%lld finished before, %zu to run), %lld at a time, %lld thread(s) each unless set; "
                  "outputs in %s",
                  static_cast<long long>(result.total), static_cast<long long>(result.skipped), pending.size(),
                  static_cast<long long>(o.jobs), static_cast<long long>(threads), out.string().c_str());
    print(line);
  }
  write_atomically(out / "sweep.csv", sweep_csv(grid, records, out));

  std::map<pid_t, std::pair<size_t, std::chrono::steady_clock::time_point>> active;
  size_t next = 0, done = 0;
  g_sweep_stop = false;
  bool stop_sent = false;
  while (next < pending.size() || !active.empty()) {
    while (!g_sweep_stop && next < pending.size() && static_cast<int64_t>(active.size()) < o.jobs) {
      const size_t i = pending[next++];
      const PlannedRun& run = grid.runs[i];
      const fs::path dir = out / run.name;
      const bool resume = fs::exists(dir / "checkpoint.pt");
      if (!resume) {
        // A run stopped before its first checkpoint, or one that failed: start it afresh.
        fs::remove_all(dir, ec);
      }
      fs::create_directories(dir, ec);
      std::vector<std::string> args{o.executable, grid.command, "--out=" + dir.string()};
      if (!has_setting(run, "progress")) args.push_back("--progress=none");
      if (!has_setting(run, "threads")) args.push_back("--threads=" + std::to_string(threads));
      if (resume) args.push_back("--resume");
      for (const auto& kv : run.settings) args.push_back("--" + kv.first + "=" + kv.second);
      const std::string log = (dir / "log.txt").string();
      // Signals are blocked across fork so a stop request cannot hit the child before it runs the program
      // with default handlers. The child gets its own process group: a terminal's Ctrl-C reaches only the
      // sweep, which then asks each run to stop (SIGTERM) exactly once.
      sigset_t block, previous;
      sigemptyset(&block);
      sigaddset(&block, SIGINT);
      sigaddset(&block, SIGTERM);
      sigprocmask(SIG_BLOCK, &block, &previous);
      const pid_t pid = fork();
      if (pid < 0) {
        sigprocmask(SIG_SETMASK, &previous, nullptr);
        throw std::runtime_error("sweep: fork failed");
      }
      if (pid == 0) {
        setpgid(0, 0);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        sigprocmask(SIG_SETMASK, &previous, nullptr);
        const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd >= 0) {
          dup2(fd, 1);
          dup2(fd, 2);
          close(fd);
        }
        std::vector<char*> argv;
        for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
        argv.push_back(nullptr);
        execv(argv[0], argv.data());
        std::fprintf(stderr, "sweep: cannot execute %s\n", argv[0]);
        _exit(127);
      }
      sigprocmask(SIG_SETMASK, &previous, nullptr);
      active[pid] = {i, std::chrono::steady_clock::now()};
      records[i].status = "running";
      print("[start] " + run.name + (resume ? " (resumed from its checkpoint)" : ""));
    }
    if (g_sweep_stop && !stop_sent) {
      // Ask the runs to stop at their next step; they keep their checkpoints for the next invocation.
      for (const auto& a : active) kill(a.first, SIGTERM);
      stop_sent = true;
    }
    // Polled rather than blocking: a stop request must reach the running runs at once.
    int status = 0;
    const pid_t pid = waitpid(-1, &status, WNOHANG);
    if (pid == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      continue;
    }
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    const auto found = active.find(pid);
    if (found == active.end()) continue;
    const size_t i = found->second.first;
    RunRecord& r = records[i];
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - found->second.second).count();
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    active.erase(found);
    const std::string finished = summary_status(out / grid.runs[i].name);
    if (r.exit_code == 0 && finished == "completed") {
      r.status = "completed";
      ++result.completed;
    } else if (r.exit_code == 3 && finished == "diverged") {
      r.status = "diverged";  // a result, not a failure: the study reports it
      ++result.diverged;
    } else if (r.exit_code == 130 || (g_sweep_stop && r.exit_code == 128 + SIGTERM)) {
      r.status = "interrupted";
      ++result.interrupted;
    } else {
      r.status = "failed";
      ++result.failed;
    }
    ++done;
    std::string tail;
    if (r.status == "failed") {
      const std::string log = read_text(out / grid.runs[i].name / "log.txt");
      const auto cut = log.find_last_of('\n', log.size() > 1 ? log.size() - 2 : 0);
      tail = " -- " + log.substr(cut == std::string::npos ? 0 : cut + 1);
      while (!tail.empty() && tail.back() == '\n') tail.pop_back();
    }
    char line[256];
    std::snprintf(line, sizeof(line), "[%zu/%zu] %s: %s (exit %d, %.1f s)", done, pending.size(),
                  grid.runs[i].name.c_str(), r.status.c_str(), r.exit_code, r.seconds);
    print(line + tail);
    write_atomically(out / "sweep.csv", sweep_csv(grid, records, out));
  }
  for (size_t k = next; k < pending.size(); ++k) records[pending[k]].status = "not started";
  result.stopped = g_sweep_stop;
  write_atomically(out / "sweep.csv", sweep_csv(grid, records, out));
  return result;
}

}  // namespace report
}  // namespace largebatch
