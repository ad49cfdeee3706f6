#pragma once
// How a training run tells a person what it does. The library prints nothing itself: train, pretrain and
// linear-eval report through a Reporter the caller gives them (the command-line program's prints banners and
// epoch lines on stdout, a progress bar and warnings on stderr). Without one a run is silent. Only the lead
// rank of a data-parallel run reports.
#include <cstdint>
#include <string>

namespace largebatch {
namespace train {

class Reporter {
 public:
  virtual ~Reporter() = default;
  // What the run is about to do, where it resumed, notes about options: one line each.
  virtual void info(const std::string& line) {}
  // Something the user should know that does not stop the run (a skipped step, replicas that differ).
  virtual void warning(const std::string& line) {}
  // After each step: epoch (0-based) of epochs, batch index (0-based) of steps_per_epoch, and the running
  // metrics as text ("loss 0.1234 acc 0.9 1200 img/s").
  virtual void step(int64_t epoch, int64_t epochs, int64_t index, int64_t steps_per_epoch, const std::string& fields) {}
  // After each epoch: its metrics in one line.
  virtual void epoch(const std::string& line) {}
  // How messages name an option (its key, "on-nonfinite"): the command line's reporter says "--on-nonfinite".
  virtual std::string option(const std::string& key) const { return key; }
};

}  // namespace train
}  // namespace largebatch
