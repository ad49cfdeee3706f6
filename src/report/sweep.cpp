// `largebatch sweep`: every run of a grid as a child process, resumed, skipped or retried by its folder's state.
#include <largebatch/report/select.h>
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
#include <cmath>
#include <cstdlib>
#include <deque>
#include <set>
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

bool has_setting(const Settings& settings, const std::string& key) {
  for (const auto& kv : settings)
    if (kv.first == key) return true;
  return false;
}

struct RunRecord {
  std::string status = "pending";  // pending | skipped-<status> | running | completed | diverged | failed | interrupted
  int exit_code = -1;
  double seconds = 0;
};

// Every run of the sweep: the grid's, then the follow-ups of the cells decided so far.
struct Plan {
  std::vector<PlannedRun> runs;
  std::vector<RunRecord> records;
  std::vector<std::string> cell_of;  // a candidate's cell ("" for follow-ups and grids without selection)
  std::vector<std::string> chosen_by;  // a follow-up: the candidate it was made from
  std::vector<int> extended;           // a candidate the sweep added beyond the grid: -1 below it, +1 above
};

// The value of `axis` among a run's choices, as a number (NaN without it).
double choice_number(const PlannedRun& run, const std::string& axis) {
  for (const auto& c : run.choices)
    if (c.axis == axis) return std::strtod(c.value.c_str(), nullptr);
  return NAN;
}

// Whether two runs take the same values of every axis but `axis`.
bool same_but(const PlannedRun& a, const PlannedRun& b, const std::string& axis) {
  if (a.choices.size() != b.choices.size()) return false;
  for (size_t i = 0; i < a.choices.size(); ++i)
    if (a.choices[i].axis != axis && (a.choices[i].axis != b.choices[i].axis || a.choices[i].value != b.choices[i].value))
      return false;
  return true;
}

std::string sweep_csv(const SweepGrid& grid, const Plan& plan, const fs::path& out) {
  std::string csv = "run,status,exit_code,seconds,final_test_top1,best_test_top1,settings\n";
  for (size_t i = 0; i < plan.runs.size(); ++i) {
    json summary;
    const fs::path dir = out / plan.runs[i].name;
    summary_status(grid.linear_eval ? dir / "linear-eval" : dir, &summary);
    std::string settings;
    for (const auto& kv : plan.runs[i].settings) settings += (settings.empty() ? "" : " ") + kv.first + "=" + kv.second;
    csv += plan.runs[i].name + "," + plan.records[i].status + "," + std::to_string(plan.records[i].exit_code) + "," +
           format("%.1f", plan.records[i].seconds) + "," +
           (summary.contains("final_test_top1") ? format("%.6f", summary["final_test_top1"].get<double>()) : "") + "," +
           (summary.contains("best_test_top1") ? format("%.6f", summary["best_test_top1"].get<double>()) : "") + ",\"" +
           settings + "\"\n";
  }
  return csv;
}

// study.json: what the report needs to apply the rule itself: the rule, every cell with its candidates (in grid
// order, with the values they were chosen over), and the follow-ups made so far with the candidate each came from.
std::string study_json(const SweepGrid& grid, const Plan& plan) {
  json j;
  j["format"] = "lbt-study-1";
  j["grid"] = grid.path;
  j["command"] = grid.command;
  j["linear_eval"] = grid.linear_eval;
  j["select"] = {{"within", grid.selection.within}, {"by", grid.selection.by}, {"compare", json::array()}};
  if (!grid.selection.extend_axis.empty())
    j["select"]["extend"] = {{"axis", grid.selection.extend_axis}, {"factor", grid.selection.extend_factor},
                             {"times", grid.selection.extend_times}};
  for (const auto& [a, b] : grid.selection.compare) j["select"]["compare"].push_back({a, b});
  json cells = json::array();
  for (size_t i = 0; i < plan.runs.size(); ++i) {
    if (plan.cell_of[i].empty()) continue;
    auto cell = std::find_if(cells.begin(), cells.end(), [&](const json& c) { return c["cell"] == plan.cell_of[i]; });
    if (cell == cells.end()) {
      json values = json::object();
      for (const auto& c : plan.runs[i].choices)
        if (std::find(grid.selection.within.begin(), grid.selection.within.end(), c.axis) != grid.selection.within.end())
          values[c.axis] = c.value;
      cells.push_back({{"cell", plan.cell_of[i]}, {"values", values}, {"candidates", json::array()}});
      cell = cells.end() - 1;
    }
    json over = json::object();
    for (const auto& c : plan.runs[i].choices)
      if (std::find(grid.selection.within.begin(), grid.selection.within.end(), c.axis) == grid.selection.within.end())
        over[c.axis] = c.value;
    json candidate = {{"run", plan.runs[i].name}, {"over", over}};
    if (plan.extended[i] != 0) candidate["extended"] = true;
    (*cell)["candidates"].push_back(candidate);
  }
  j["cells"] = cells;
  json follow = json::array();
  for (size_t i = 0; i < plan.runs.size(); ++i) {
    if (plan.chosen_by[i].empty()) continue;
    json values = json::object();
    const auto& chosen = *std::find_if(plan.runs.begin(), plan.runs.end(),
                                       [&](const PlannedRun& r) { return r.name == plan.chosen_by[i]; });
    for (size_t c = chosen.choices.size(); c < plan.runs[i].choices.size(); ++c)
      values[plan.runs[i].choices[c].axis] = plan.runs[i].choices[c].value;
    follow.push_back({{"run", plan.runs[i].name}, {"from", plan.chosen_by[i]}, {"values", values}});
  }
  j["follow_ups"] = follow;
  return j.dump(1) + "\n";
}

// Runs a child `largebatch` with its output appended to `log`, in its own process group. Signals are blocked
// across fork so a stop request cannot hit the child before it runs the program with default handlers; a
// terminal's Ctrl-C reaches only the sweep, which then asks each run to stop (SIGTERM) exactly once.
pid_t launch(const std::vector<std::string>& args, const std::string& log) {
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
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    std::fprintf(stderr, "sweep: cannot execute %s\n", argv[0]);
    _exit(127);
  }
  sigprocmask(SIG_SETMASK, &previous, nullptr);
  return pid;
}

// One process to run: a run's training (or pre-training), or the linear evaluation that follows it.
struct Task {
  size_t run;
  bool linear_eval;
};

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

  Plan plan;
  for (const auto& run : grid.runs) {
    plan.runs.push_back(run);
    plan.records.emplace_back();
    plan.cell_of.push_back(grid.selects ? selection_cell(grid.selection, run) : "");
    plan.chosen_by.emplace_back();
    plan.extended.push_back(0);
  }
  SweepResult result;
  std::deque<Task> pending;
  // A run's state on disk decides what it still needs: nothing, its linear evaluation, or its training.
  auto plan_run = [&](size_t i, bool at_front) {
    const fs::path dir = out / plan.runs[i].name;
    const std::string state = finished_state(dir.string(), grid.linear_eval);
    ++result.total;
    if (!state.empty()) {
      plan.records[i].status = "skipped-" + state;
      ++result.skipped;
      return;
    }
    const bool trained = grid.linear_eval && summary_status(dir) == "completed";
    if (at_front) pending.push_front({i, trained});
    else pending.push_back({i, trained});
  };
  for (size_t i = 0; i < plan.runs.size(); ++i) plan_run(i, false);

  // Cells whose candidates have all finished get their choice and follow-ups (once).
  std::set<std::string> decided;
  auto decide = [&](bool at_front) {
    if (!grid.selects) return;
    // Again after a candidate was added: one that finished before (a resumed sweep) decides its cell at once.
    for (bool again = true; again;) {
    again = false;
    std::map<std::string, std::vector<size_t>> cells;
    std::vector<std::string> order;
    for (size_t i = 0; i < plan.runs.size(); ++i) {
      if (plan.cell_of[i].empty()) continue;
      if (!cells.count(plan.cell_of[i])) order.push_back(plan.cell_of[i]);
      cells[plan.cell_of[i]].push_back(i);
    }
    for (const auto& cell : order) {
      if (decided.count(cell)) continue;
      const auto& members = cells[cell];
      std::vector<double> metrics;
      bool complete = true;
      for (size_t i : members) {
        const fs::path dir = out / plan.runs[i].name;
        complete = complete && !finished_state(dir.string(), grid.linear_eval).empty();
        metrics.push_back(selection_metric(dir.string(), grid.selection.by));
      }
      if (!complete) continue;
      const int best = choose(metrics, grid.selection.by);
      // A choice at the edge of the extended axis's values (among the candidates that share its other values)
      // first gets one more candidate beyond that edge, while the cell has extensions left in that direction.
      const std::string& axis = grid.selection.extend_axis;
      if (best >= 0 && !axis.empty()) {
        const PlannedRun& pick = plan.runs[members[best]];
        const double v = choice_number(pick, axis);
        double lo = v, hi = v;
        int below = 0, above = 0, peers = 0;
        for (size_t i : members) {
          if (!same_but(plan.runs[i], pick, axis)) continue;
          const double x = choice_number(plan.runs[i], axis);
          lo = std::min(lo, x);
          hi = std::max(hi, x);
          ++peers;
          below += plan.extended[i] < 0 ? 1 : 0;
          above += plan.extended[i] > 0 ? 1 : 0;
        }
        const int direction = !std::isfinite(v) || peers < 2 ? 0 : v == lo ? -1 : v == hi ? 1 : 0;
        const int used = direction < 0 ? below : above;
        if (direction != 0 && used < grid.selection.extend_times) {
          const double value = direction < 0 ? v / grid.selection.extend_factor : v * grid.selection.extend_factor;
          PlannedRun extra = with_extended_value(grid.selection, pick, value);
          if (std::none_of(plan.runs.begin(), plan.runs.end(), [&](const PlannedRun& r) { return r.name == extra.name; })) {
            print("[extend] " + cell + ": " + pick.name + " is at the " + (direction < 0 ? "low" : "high") + " edge of " +
                  axis + "; candidate " + extra.name + " added");
            plan.runs.push_back(std::move(extra));
            plan.records.emplace_back();
            plan.cell_of.push_back(cell);
            plan.chosen_by.emplace_back();
            plan.extended.push_back(direction);
            plan_run(plan.runs.size() - 1, at_front);
            again = true;
            continue;
          }
        }
      }
      decided.insert(cell);
      if (best < 0) {
        print("[select] " + cell + ": no candidate has a finite " + grid.selection.by + " (all diverged?); no follow-ups");
        continue;
      }
      const PlannedRun& chosen = plan.runs[members[best]];
      const auto extra = follow_ups(grid.selection, chosen);
      print("[select] " + cell + ": " + chosen.name + " (" + grid.selection.by + " " +
            format("%.4f", metrics[best]) + " of " + std::to_string(members.size()) + " candidates); " +
            std::to_string(extra.size()) + " follow-up run(s)");
      // Follow-ups run before the remaining candidates, so that cells complete one after another.
      const size_t first = plan.runs.size();
      const std::string from = chosen.name;
      for (const auto& f : extra) {
        plan.runs.push_back(f);
        plan.records.emplace_back();
        plan.cell_of.emplace_back();
        plan.chosen_by.push_back(from);
        plan.extended.push_back(0);
      }
      if (at_front)
        for (size_t k = plan.runs.size(); k-- > first;) plan_run(k, true);
      else
        for (size_t k = first; k < plan.runs.size(); ++k) plan_run(k, false);
    }
    }
    if (!o.dry_run) write_atomically(out / "study.json", study_json(grid, plan));
  };
  decide(false);

  if (o.dry_run) {
    for (size_t i = 0; i < plan.runs.size(); ++i) {
      const fs::path dir = out / plan.runs[i].name;
      std::string settings;
      for (const auto& kv : plan.runs[i].settings) settings += " --" + kv.first + "=" + kv.second;
      const bool finished = !plan.records[i].status.rfind("skipped", 0);
      const bool resumable = fs::exists(dir / "checkpoint.pt") || fs::exists(dir / "linear-eval" / "checkpoint.pt");
      char state[16];
      std::snprintf(state, sizeof(state), "%-12s", finished ? "finished" : resumable ? "resume" : "run");
      print(state + std::string(" ") + plan.runs[i].name + ":" + settings);
    }
    if (grid.selects) {
      size_t waiting = 0;
      std::set<std::string> cells;
      for (size_t i = 0; i < grid.runs.size(); ++i) cells.insert(plan.cell_of[i]);
      for (const auto& c : cells)
        if (!decided.count(c)) ++waiting;
      if (waiting)
        print("select: " + std::to_string(waiting) + " cell(s) not decided yet (candidates unfinished): their follow-ups "
              "are planned once every candidate of the cell has finished");
    }
    return result;
  }
  {
    char line[512];
    std::snprintf(line, sizeof(line),
                  "sweep: %lld runs planned (%lld finished before, %zu to run), %lld at a time, %lld thread(s) each "
                  "unless set; outputs in %s",
                  static_cast<long long>(result.total), static_cast<long long>(result.skipped), pending.size(),
                  static_cast<long long>(o.jobs), static_cast<long long>(threads), out.string().c_str());
    print(line);
  }
  write_atomically(out / "sweep.csv", sweep_csv(grid, plan, out));

  std::map<pid_t, std::pair<Task, std::chrono::steady_clock::time_point>> active;
  size_t done = 0;
  g_sweep_stop = false;
  bool stop_sent = false;
  while (!pending.empty() || !active.empty()) {
    while (!g_sweep_stop && !pending.empty() && static_cast<int64_t>(active.size()) < o.jobs) {
      const Task task = pending.front();
      pending.pop_front();
      const PlannedRun& run = plan.runs[task.run];
      const fs::path dir = out / run.name;
      const fs::path work = task.linear_eval ? dir / "linear-eval" : dir;
      const bool resume = fs::exists(work / "checkpoint.pt");
      // A run stopped before its first checkpoint, or one that failed: start it afresh.
      if (!resume) fs::remove_all(work, ec);
      fs::create_directories(work, ec);
      std::vector<std::string> args{o.executable, task.linear_eval ? "linear-eval" : grid.command, "--out=" + work.string()};
      const Settings& own = task.linear_eval ? grid.linear_eval_settings : run.settings;
      if (!has_setting(own, "progress")) args.push_back("--progress=none");
      if (!has_setting(own, "threads")) args.push_back("--threads=" + std::to_string(threads));
      if (resume) args.push_back("--resume");
      if (task.linear_eval) {
        args.push_back("--backbone=" + (dir / "backbone.pt").string());
        // The evaluation sees the data the backbone was trained on, and the run's seed, unless it sets its own.
        for (const auto& kv : run.settings)
          if ((kv.first == "seed" || kv.first == "data" || kv.first == "data-dir" || kv.first == "synthetic-size") &&
              !has_setting(own, kv.first))
            args.push_back("--" + kv.first + "=" + kv.second);
      }
      for (const auto& kv : own) args.push_back("--" + kv.first + "=" + kv.second);
      const pid_t pid = launch(args, (work / "log.txt").string());
      active[pid] = {task, std::chrono::steady_clock::now()};
      plan.records[task.run].status = "running";
      print("[start] " + run.name + (task.linear_eval ? " linear evaluation" : "") +
            (resume ? " (resumed from its checkpoint)" : ""));
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
    const Task task = found->second.first;
    const size_t i = task.run;
    RunRecord& r = plan.records[i];
    r.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - found->second.second).count();
    r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    active.erase(found);
    const fs::path dir = out / plan.runs[i].name;
    const fs::path work = task.linear_eval ? dir / "linear-eval" : dir;
    const std::string finished = summary_status(work);
    if (r.exit_code == 0 && finished == "completed" && grid.linear_eval && !task.linear_eval) {
      // Pre-trained: its linear evaluation runs next, as part of the same run.
      pending.push_front({i, true});
      print("[trained] " + plan.runs[i].name + " (" + format("%.1f", r.seconds) + " s); linear evaluation next");
      continue;
    }
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
      const std::string log = read_text(work / "log.txt");
      const auto cut = log.find_last_of('\n', log.size() > 1 ? log.size() - 2 : 0);
      tail = " -- " + log.substr(cut == std::string::npos ? 0 : cut + 1);
      while (!tail.empty() && tail.back() == '\n') tail.pop_back();
    }
    char line[512];
    std::snprintf(line, sizeof(line), "[%zu/%zu] %s: %s (exit %d, %.1f s)", done,
                  static_cast<size_t>(result.total - result.skipped), plan.runs[i].name.c_str(), r.status.c_str(),
                  r.exit_code, r.seconds);
    print(line + tail);
    if (!g_sweep_stop) decide(true);
    write_atomically(out / "sweep.csv", sweep_csv(grid, plan, out));
  }
  for (const auto& t : pending)
    if (plan.records[t.run].status == "pending") plan.records[t.run].status = "not started";
  result.stopped = g_sweep_stop;
  write_atomically(out / "sweep.csv", sweep_csv(grid, plan, out));
  return result;
}

}  // namespace report
}  // namespace largebatch
