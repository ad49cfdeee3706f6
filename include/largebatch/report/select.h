#pragma once
// The selection rule of a study (a grid's "select" block): which candidate of a cell the sweep follows up and
// the report reports. One implementation for both, so the report applies the rule rather than trusting a record.
#include <string>
#include <vector>

namespace largebatch {
namespace report {

// Whether a lower value of `by` is better (final_val_loss) rather than a higher one (final_val_top1, best_val_top1).
bool lower_is_better(const std::string& by);

// The value `by` names for a finished run folder, from its metrics.csv (a pre-training run followed by linear
// evaluation: its linear-eval/metrics.csv): final_val_top1 (last epoch), best_val_top1 (any epoch),
// final_val_loss. NaN when the run has none (diverged, no validation split, not a number).
double selection_metric(const std::string& run_dir, const std::string& by);

// The index of the best value (highest; lowest for a loss), the first of equal ones; -1 when none is finite.
// A NaN (a diverged candidate) is never chosen.
int choose(const std::vector<double>& metrics, const std::string& by);

// "completed" or "diverged" when the run folder's summary.json says so (with linear evaluation: the
// pre-training diverged, or it completed and linear-eval/summary.json says so); "" otherwise (not finished).
std::string finished_state(const std::string& run_dir, bool linear_eval);

}  // namespace report
}  // namespace largebatch
