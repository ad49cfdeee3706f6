#pragma once
// Sweeps: every combination of a grid runs as its own `largebatch` process in its own folder.
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace largebatch {
namespace report {

using Settings = std::vector<std::pair<std::string, std::string>>;

// The value an axis takes in a run: `label` as in its folder name ("batch-size-1024", "lars"), `value` as the
// grid wrote it (an object value's label, else the value's text: "1024").
struct AxisChoice {
  std::string axis, label, value;
};

// One run of a sweep: its folder name and its settings as command-line options (key without "--", value;
// a key may repeat, e.g. "opt"). Every value is text, as it would be typed.
struct PlannedRun {
  std::string name;
  Settings settings;
  std::vector<AxisChoice> choices;  // the value of every axis that made it, in axis order
};

// One "then" block of a selection: the runs made from a chosen configuration. `where` limits it to cells
// whose `within` axes take one of the listed values; `fixed` and the block's own axes override the chosen
// run's settings of the same options.
struct FollowUp {
  std::vector<std::pair<std::string, std::vector<std::string>>> where;
  Settings fixed;
  std::vector<PlannedRun> variants;  // the block's axes expanded: name suffix, settings, choices
};

// Choose, then run: the runs of the grid are the candidates; those that take the same values of the `within`
// axes form a cell, and the rule picks one candidate per cell by `by` once every candidate of the cell has
// finished (select.cpp). Each chosen run then gets its follow-ups.
struct Selection {
  std::vector<std::string> within;  // axes that define a cell (the others are chosen over)
  std::string by = "final_val_top1";
  std::vector<FollowUp> then;
  std::vector<std::pair<std::string, std::string>> compare;  // pairs of values of within[0], for paired differences
  // "extend": a choice at the smallest (largest) value of `extend_axis` among the candidates that share its other
  // values adds a candidate at value / factor (x factor), up to `extend_times` per direction and cell, before the
  // cell is decided: a grid that turns out too narrow grows where the rule points, on validation alone.
  std::string extend_axis;
  double extend_factor = 0;
  int extend_times = 0;
};

struct SweepGrid {
  std::string path;               // the grid file
  std::string command = "train";  // the subcommand every run executes (train or pretrain)
  std::vector<PlannedRun> runs;   // the expansion, in order: the first axis varies slowest
  bool selects = false;           // a "select" block: runs are candidates, follow-ups come from the choices
  Selection selection;
  // pretrain grids: a "linear-eval" block runs `largebatch linear-eval` on each run's backbone, in
  // RUN/linear-eval, as part of the same run.
  bool linear_eval = false;
  Settings linear_eval_settings;
};

// Reads a grid file, JSON or TOML (chosen by the first non-blank character: '{' is JSON):
//   JSON: {"command": "train", "fixed": {"epochs": 5, "val-split": 5000, "seed": 0, ...},
//          "axes": {"optimizer": ["sgd", {"label": "lamb", "optimizer": "lamb", "axes": {"lr": [0.005, 0.01]}}],
//                   "batch-size": [1024, 4096]},
//          "select": {"within": ["optimizer", "batch-size"], "by": "final_val_top1",
//                     "then": [{"axes": {"seed": [1, 2, 3]}}]}}
//   TOML: the same tables (toml++ orders keys alphabetically).
// An axis value that is an object sets several options at once (its "label" names it in folder names); its own
// "axes" vary right after it, for runs with that value only. Keys are the subcommand's option names. Throws
// std::invalid_argument naming the file and the field.
SweepGrid read_grid(const std::string& path);

// The cell of a candidate: its labels of the `within` axes joined by "__" ("lars__batch-size-1024").
std::string selection_cell(const Selection& selection, const PlannedRun& run);
// The runs a chosen candidate gets from the `then` blocks that apply to its cell, in block order.
std::vector<PlannedRun> follow_ups(const Selection& selection, const PlannedRun& chosen);
// `run` with the extension axis set to `value` (its text as a grid writes numbers): settings, choice and name.
PlannedRun with_extended_value(const Selection& selection, const PlannedRun& run, double value);

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
