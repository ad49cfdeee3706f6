#pragma once
// Sweeps: every combination of a grid runs as its own `largebatch` process in its own folder.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace largebatch {
namespace report {

// One run of a sweep: its folder name and its settings as command-line options (key without "--", value;
// a key may repeat, e.g. "opt"). Every value is text, as it would be typed.
struct PlannedRun {
  std::string name;
  std::vector<std::pair<std::string, std::string>> settings;
};

struct SweepGrid {
  std::string command = "train";  // the subcommand every run executes (train or pretrain)
  std::vector<PlannedRun> runs;   // the expansion, in order: the first axis varies slowest
};

// Reads a grid file, JSON or TOML (chosen by the first non-blank character: '{' is JSON):
//   JSON: {"command": "train", "fixed": {"epochs": 5, ...},
//          "axes": {"optimizer": ["sgd", {"label": "tvlars-1e-3", "optimizer": "tvlars", "opt": ["lambda=1e-3"]}],
//                   "batch-size": [1024, 4096], "seed": [0, 1, 2]}}
//   TOML: command = "train" / [fixed] epochs = 5 / [axes] optimizer = ["sgd", "tvlars"] (plain values only).
// An axis value that is an object sets several options at once (its "label" names it in folder names).
// Keys are the subcommand's option names. Throws std::invalid_argument naming the file and the field.
SweepGrid read_grid(const std::string& path);

struct SweepOptions {
  std::string executable;  // the largebatch program the runs execute (normally this very program)
  std::string out;         // folder of the sweep: one sub-folder per run, sweep.csv
  int64_t jobs = 1;        // runs at a time; a run without "threads" gets cores / jobs threads
  bool dry_run = false;    // list the runs and their state, run nothing
  // Receives each line of the sweep's progress (the runs' states, starts and ends); none: silent.
  std::function<void(const std::string& line)> print;
};

struct SweepResult {
  int64_t total = 0, skipped = 0, completed = 0, diverged = 0, failed = 0, interrupted = 0;
  bool stopped = false;  // by request_sweep_stop (a signal): some runs did not start
};

// Runs the grid: a finished run (summary.json with status completed or diverged) is skipped, an interrupted
// one (checkpoint.pt without a finished summary) resumed, a failed one (any other exit) recorded in
// sweep.csv with its exit code and retried on the next invocation; the sweep goes on. SIGINT / SIGTERM stop
// the running runs at their next step (they keep their checkpoints) and end the sweep.
SweepResult run_sweep(const SweepGrid& grid, const SweepOptions& options);
// Asks a running sweep to stop (signal-safe).
void request_sweep_stop();

}  // namespace report
}  // namespace largebatch
