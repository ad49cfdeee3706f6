// `largebatch launch`: a torchrun-like local launcher. Starts N data-parallel workers on this node with
// torchrun's environment contract (RANK, WORLD_SIZE, LOCAL_RANK, ... MASTER_ADDR, MASTER_PORT), supervises
// them, and tears the job down when one fails. Plain POSIX on purpose: no LibTorch here.
//
// Process groups and signals: every worker leads its own process group, so a terminal's Ctrl-C reaches only
// the launcher (the foreground group), which forwards it exactly once to each worker's whole group; the same
// holds for SIGTERM / SIGHUP sent to the launcher's pid. Signalling a worker's group (not just its pid) also
// reaches what a wrapper (`sh -c`, a shell script) started. Consequences, by design:
//  - workers are in background groups: with a terminal on stdin they get /dev/null as stdin instead (a
//    background read would stop them), and `stty tostop` would stop them on output;
//  - Ctrl-Z suspends only the launcher; a worker stopped by SIGSTOP is simply waited for (waitpid does not
//    report stops) - the workers' own collective timeouts end such a job;
//  - if the launcher itself is killed, each worker gets SIGTERM (Linux parent-death signal).
#include "commands.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

extern char** environ;

namespace largebatch {
namespace apps {

namespace {

struct LaunchArgs {
  int64_t nproc = 1, nnodes = 1, node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int64_t master_port = 29500;
  bool exec = false;
  double grace_seconds = 10;
  std::vector<std::string> command;
};

struct Worker {
  int local = 0;
  int64_t rank = 0;
  pid_t pid = -1;
  bool alive = false;
};

void say(const std::string& line) { std::fprintf(stderr, "largebatch launch: %s\n", line.c_str()); }

std::string describe(const Worker& w) {
  return "worker rank " + std::to_string(w.rank) + " (local " + std::to_string(w.local) + ", pid " +
         std::to_string(w.pid) + ")";
}

std::string signal_text(int sig) {
  const char* name = strsignal(sig);
  return "signal " + std::to_string(sig) + (name ? std::string(" (") + name + ")" : std::string());
}

double now_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// The environment of one worker: the launcher's own, with the launch contract set (overriding any values
// inherited from an outer launcher).
std::vector<std::string> worker_environment(const LaunchArgs& a, const Worker& w) {
  const std::vector<std::pair<std::string, std::string>> contract = {
      {"RANK", std::to_string(w.rank)},
      {"WORLD_SIZE", std::to_string(a.nnodes * a.nproc)},
      {"LOCAL_RANK", std::to_string(w.local)},
      {"LOCAL_WORLD_SIZE", std::to_string(a.nproc)},
      {"GROUP_RANK", std::to_string(a.node_rank)},
      {"NODE_RANK", std::to_string(a.node_rank)},
      {"MASTER_ADDR", a.master_addr},
      {"MASTER_PORT", std::to_string(a.master_port)},
  };
  std::vector<std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string entry(*e);
    const std::string key = entry.substr(0, entry.find('='));
    const bool overridden =
        std::any_of(contract.begin(), contract.end(), [&](const auto& kv) { return kv.first == key; });
    if (!overridden) env.push_back(entry);
  }
  for (const auto& kv : contract) env.push_back(kv.first + "=" + kv.second);
  return env;
}

std::vector<char*> pointers(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(&s[0]);
  out.push_back(nullptr);
  return out;
}

class Launcher {
 public:
  explicit Launcher(const LaunchArgs& a) : a_(a) {}

  int run() {
    block_signals();
    const int64_t first = a_.node_rank * a_.nproc;
    say("starting " + std::to_string(a_.nproc) + (a_.nproc == 1 ? " worker" : " workers") + " (ranks " +
        std::to_string(first) + ".." + std::to_string(first + a_.nproc - 1) + " of " +
        std::to_string(a_.nnodes * a_.nproc) + "), master " + a_.master_addr + ":" +
        std::to_string(a_.master_port));
    for (int i = 0; i < a_.nproc && !stopping_; ++i) spawn(i);
    supervise();
    sigprocmask(SIG_SETMASK, &old_mask_, nullptr);
    return exit_code_;
  }

 private:
  const LaunchArgs& a_;
  std::vector<Worker> workers_;
  sigset_t handled_{}, old_mask_{};
  int exit_code_ = 0;
  bool stopping_ = false;   // a worker failed (or could not start): the rest are being terminated
  bool killed_ = false;     // the grace period ran out and SIGKILL was sent
  bool forwarded_ = false;  // a stop signal was forwarded: every worker is already stopping
  double deadline_ = 0;

  // Signals are blocked and taken synchronously with sigtimedwait, so none is lost between checking the
  // children and going to sleep. Signals the launcher was started with ignored (nohup's SIGHUP, SIGINT of
  // a background job) stay ignored, in the launcher and in the workers.
  void block_signals() {
    signal(SIGCHLD, SIG_DFL);  // an inherited SIG_IGN would make the kernel reap workers behind our back
    sigemptyset(&handled_);
    sigaddset(&handled_, SIGCHLD);
    for (int sig : {SIGINT, SIGTERM, SIGHUP}) {
      struct sigaction current {};
      if (sigaction(sig, nullptr, &current) == 0 && current.sa_handler != SIG_IGN) sigaddset(&handled_, sig);
    }
    sigprocmask(SIG_BLOCK, &handled_, &old_mask_);
  }

  void spawn(int local) {
    Worker w;
    w.local = local;
    w.rank = a_.node_rank * a_.nproc + local;

    // Everything the child needs is built before fork: after it, only async-signal-safe calls.
    std::vector<std::string> env = worker_environment(a_, w);
    std::vector<std::string> args;
    std::string program;
    if (a_.exec) {
      args = a_.command;
      program = args[0];
    } else {
      // This very binary; argv[0] is its real path so the worker's messages and `ps` read naturally.
      char self[4096];
      const ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
      args.push_back(n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string("largebatch"));
      args.insert(args.end(), a_.command.begin(), a_.command.end());
      program = "/proc/self/exe";
    }
    std::vector<char*> envp = pointers(env), argv = pointers(args);

    // exec errors come back through a close-on-exec pipe: EOF means the program started.
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return fail_to_start(w, std::string("pipe: ") + std::strerror(errno), 1);
    const int devnull = isatty(STDIN_FILENO) ? open("/dev/null", O_RDONLY | O_CLOEXEC) : -1;
    const pid_t launcher = getpid();
    const pid_t pid = fork();
    if (pid == 0) {
      close(report[0]);
      setpgid(0, 0);
#ifdef __linux__
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() != launcher) _exit(1);  // the launcher died before prctl took effect
#endif
      if (devnull >= 0) dup2(devnull, STDIN_FILENO);
      sigprocmask(SIG_SETMASK, &old_mask_, nullptr);
      environ = envp.data();
      if (a_.exec)
        execvp(program.c_str(), argv.data());
      else
        execv(program.c_str(), argv.data());
      const int err = errno;
      const ssize_t ignored = write(report[1], &err, sizeof(err));
      (void)ignored;
      _exit(127);
    }
    close(report[1]);
    if (devnull >= 0) close(devnull);
    if (pid < 0) {
      close(report[0]);
      return fail_to_start(w, std::string("fork: ") + std::strerror(errno), 1);
    }
    setpgid(pid, pid);  // also here, so the group exists before we might signal it (EACCES after exec is fine)
    w.pid = pid;
    w.alive = true;
    workers_.push_back(w);

    int err = 0;
    ssize_t got;
    do got = read(report[0], &err, sizeof(err));
    while (got < 0 && errno == EINTR);
    close(report[0]);
    if (got == static_cast<ssize_t>(sizeof(err))) {
      int status = 0;
      waitpid(pid, &status, 0);
      workers_.back().alive = false;
      fail_to_start(w, "cannot run '" + program + "': " + std::strerror(err), a_.exec ? kExitBadInput : 1);
    }
  }

  void fail_to_start(const Worker& w, const std::string& why, int code) {
    say("worker rank " + std::to_string(w.rank) + " (local " + std::to_string(w.local) + "): " + why);
    begin_teardown(code);
  }

  // The first failure decides the exit code; the remaining workers get SIGTERM, then SIGKILL after the grace.
  // After a forwarded stop signal the SIGTERM is skipped: it would be the workers' second signal, which ends a
  // largebatch worker at once instead of after its current step.
  void begin_teardown(int code) {
    if (stopping_) return;
    stopping_ = true;
    exit_code_ = code;
    deadline_ = now_seconds() + a_.grace_seconds;
    if (!forwarded_) signal_workers(SIGTERM);
  }

  // Each live worker's whole process group. Groups of workers already reaped are left alone: their id may
  // since have been reused by an unrelated process group.
  int signal_workers(int sig) {
    int n = 0;
    for (const auto& w : workers_)
      if (w.alive && (kill(-w.pid, sig) == 0 || kill(w.pid, sig) == 0)) ++n;
    return n;
  }

  int live() const {
    return static_cast<int>(std::count_if(workers_.begin(), workers_.end(), [](const Worker& w) { return w.alive; }));
  }

  void reap() {
    for (auto& w : workers_) {
      if (!w.alive) continue;
      int status = 0;
      const pid_t r = waitpid(w.pid, &status, WNOHANG);
      if (r == 0) continue;
      if (r < 0 && errno == EINTR) continue;
      w.alive = false;
      if (stopping_) continue;  // exits caused by the teardown are not news
      if (r < 0) {
        say(describe(w) + " could not be waited for: " + std::strerror(errno));
        begin_teardown(1);
      } else if (WIFSIGNALED(status)) {
        say(describe(w) + " was killed by " + signal_text(WTERMSIG(status)));
        begin_teardown(128 + WTERMSIG(status));
      } else if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        say(describe(w) + " exited with code " + std::to_string(WEXITSTATUS(status)));
        begin_teardown(WEXITSTATUS(status));
      }
    }
  }

  void supervise() {
    for (;;) {
      reap();
      if (live() == 0) break;
      double wait = 1.0;  // also polls, as a safety net against a lost SIGCHLD
      if (stopping_ && !killed_) {
        const double left = deadline_ - now_seconds();
        if (left <= 0) {
          char grace[32];
          std::snprintf(grace, sizeof(grace), "%g", a_.grace_seconds);
          say(std::to_string(live()) + " worker(s) still running " + grace + " s after SIGTERM; sending SIGKILL");
          signal_workers(SIGKILL);
          killed_ = true;
          continue;
        }
        wait = std::min(wait, left);
      }
      timespec ts{};
      ts.tv_sec = static_cast<time_t>(wait);
      ts.tv_nsec = static_cast<long>((wait - static_cast<double>(ts.tv_sec)) * 1e9);
      siginfo_t info{};
      const int sig = sigtimedwait(&handled_, &info, &ts);
      if (sig == SIGINT || sig == SIGTERM || sig == SIGHUP) {
        const int n = signal_workers(sig);
        forwarded_ = true;
        say("received " + std::string(sigabbrev(sig)) + "; forwarded to " + std::to_string(n) + " worker(s)");
      }
    }
  }

  static const char* sigabbrev(int sig) {
    switch (sig) {
      case SIGINT: return "SIGINT";
      case SIGTERM: return "SIGTERM";
      case SIGHUP: return "SIGHUP";
      default: return "a signal";
    }
  }
};

// One line naming the flag, exit code 2.
int bad_input(const std::string& message) {
  say(message);
  return kExitBadInput;
}

}  // namespace

Runner add_launch_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "launch",
      "Start data-parallel workers on this node with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, "
      "LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, MASTER_ADDR, MASTER_PORT) and supervise them");
  cmd->footer(
      "The worker command follows `--`, e.g. `largebatch launch --nproc-per-node 4 -- train --data synthetic`. "
      "If a worker fails, the others get SIGTERM (SIGKILL after --grace-seconds) and the launcher exits with "
      "its code (128+N for signal N). SIGINT, SIGTERM and SIGHUP sent to the launcher are forwarded to every "
      "worker's process group.");
  auto a = std::make_shared<LaunchArgs>();
  cmd->add_option("--nproc-per-node", a->nproc, "Workers to start on this node (N >= 1)")->capture_default_str();
  cmd->add_option("--nnodes", a->nnodes, "Nodes in the job (M >= 1); WORLD_SIZE = M * N")->capture_default_str();
  cmd->add_option("--node-rank", a->node_rank, "Rank of this node, 0 <= R < M; worker i gets RANK = R * N + i")
      ->capture_default_str();
  cmd->add_option("--master-addr", a->master_addr, "Address of the rank-0 node (the rendezvous store)")
      ->capture_default_str();
  cmd->add_option("--master-port", a->master_port, "Port of the rendezvous store on the master (1..65535)")
      ->capture_default_str();
  cmd->add_flag("--exec", a->exec,
                "Run any program (the first word after `--`, looked up in PATH) instead of this largebatch binary");
  cmd->add_option("--grace-seconds", a->grace_seconds,
                  "After a worker fails, seconds the others get to exit on SIGTERM before SIGKILL")
      ->capture_default_str();
  cmd->add_option("command", a->command,
                  "After `--`: a largebatch command line (e.g. train ...), or with --exec a program and its "
                  "arguments; taken verbatim");

  return [cmd, a]() -> int {
    if (!cmd->parsed()) return -1;
    // CLI11 records the `--` separator as an unused argument; without it, flags meant for the workers
    // would have been taken (or rejected) by the launcher, so it is required whenever a command is given.
    const auto rest = cmd->remaining();
    const bool separator = std::find(rest.begin(), rest.end(), "--") != rest.end();
    if (a->nproc < 1) return bad_input("--nproc-per-node must be >= 1 (got " + std::to_string(a->nproc) + ")");
    if (a->nnodes < 1) return bad_input("--nnodes must be >= 1 (got " + std::to_string(a->nnodes) + ")");
    if (a->node_rank < 0 || a->node_rank >= a->nnodes)
      return bad_input("--node-rank must be in 0.." + std::to_string(a->nnodes - 1) + " for --nnodes " +
                       std::to_string(a->nnodes) + " (got " + std::to_string(a->node_rank) + ")");
    if (a->master_port < 1 || a->master_port > 65535)
      return bad_input("--master-port must be in 1..65535 (got " + std::to_string(a->master_port) + ")");
    if (a->master_addr.empty()) return bad_input("--master-addr must not be empty");
    if (!(a->grace_seconds >= 0)) return bad_input("--grace-seconds must be >= 0");
    if (a->command.empty())
      return bad_input("missing the worker command after `--` (e.g. launch --nproc-per-node 2 -- train ...)");
    if (!separator)
      return bad_input("put the worker command after `--` (e.g. launch --nproc-per-node 2 -- " + a->command[0] +
                       " ...)");
    return Launcher(*a).run();
  };
}

}  // namespace apps
}  // namespace largebatch
