#pragma once
// Subcommands of the largebatch program. Each registers its options and returns the function that runs it.
#include <largebatch/optim/factory.h>
#include <largebatch/train/options.h>
#include <largebatch/train/reporter.h>

#include <CLI/CLI.hpp>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace largebatch {
namespace apps {

using Runner = std::function<int()>;

Runner add_train_command(CLI::App& app);
// `largebatch lr-find`: the learning-rate range test (train::run_lr_find) with every train option.
Runner add_lr_find_command(CLI::App& app);
Runner add_summarize_command(CLI::App& app);
Runner add_bench_command(CLI::App& app);  // bench pipeline, and the two below
Runner add_bench_step_command(CLI::App& bench);
Runner add_bench_train_command(CLI::App& bench);
Runner add_bench_pretrain_command(CLI::App& bench);
Runner add_bench_profile_command(CLI::App& bench);  // bench_profile.cpp
Runner add_launch_command(CLI::App& app);
Runner add_compare_command(CLI::App& app);
Runner add_pretrain_command(CLI::App& app);
Runner add_linear_eval_command(CLI::App& app);
Runner add_sweep_command(CLI::App& app);
Runner add_report_command(CLI::App& app);

// Checking written commands (tests/docs_commands.sh): with LARGEBATCH_PARSE_ONLY=1 in the environment every
// subcommand parses and checks its options as usual and exits 0 without running; train, pretrain and
// linear-eval act as with --dry-run. Files and directories named on the command line need not exist then.
bool parse_only();
CLI::Validator existing_file();
CLI::Validator existing_directory();

// --dry-run of train, pretrain and linear-eval: validates the configuration and prints it as JSON (the
// config.json the run would write), writing nothing. Exit codes as run_training_command's.
int dry_run(const char* command, const std::function<std::string()>& validated_json);
// Adds --dry-run to a command; the flag's value (true also under LARGEBATCH_PARSE_ONLY=1) once parsed.
std::shared_ptr<bool> add_dry_run_flag(CLI::App* command);

// Runs a training-like command's body with Ctrl-C / SIGTERM asking it to stop after the current step, and maps
// its exceptions to one line on stderr prefixed with "largebatch <command>:" and the exit codes below.
int run_training_command(const char* command, const std::function<int()>& body);

// The flags of a command, from its option list (train/options.h): "--" + key (or the option's own names), its
// help and default. Values are checked by the config's validate(), so that a flag and a config file key get the
// same message.
struct FlagAdder {
  CLI::App* command;
  template <class T, class Check>
  void operator()(const train::Option& o, T& value, Check&&) {
    const std::string names = o.flag_names() ? o.flag_names() : "--" + std::string(o.key());
    CLI::Option* added = nullptr;
    if constexpr (std::is_same_v<T, bool>) {
      if (!o.is_valued()) {
        command->add_flag(names, value, o.help());
        return;
      }
    }
    if constexpr (std::is_same_v<T, std::map<std::string, std::string>>) {
      // Repeatable key=value items, each parsed as it is read.
      added = command->add_option_function<std::vector<std::string>>(
          names,
          [&value, names](const std::vector<std::string>& items) {
            try {
              for (const auto& item : items)
                for (const auto& kv : optim::parse_overrides(item)) value[kv.first] = kv.second;
            } catch (const std::invalid_argument& e) {
              throw CLI::ValidationError(names, e.what());
            }
          },
          o.help());
    } else {
      added = command->add_option(names, value, o.help());
    }
    if (o.show_default()) added->capture_default_str();
  }
};

template <class Config>
void add_flags(CLI::App* command, Config& config) {
  train::visit_options(config, FlagAdder{command});
}

// The console of train, pretrain and linear-eval: banners, notes and epoch lines on stdout; a progress bar
// (mode bar, or auto on a terminal) and warnings, prefixed "largebatch <command>:", on stderr. Mode none drops
// the epoch lines and the bar.
class ConsoleReporter : public train::Reporter {
 public:
  ConsoleReporter(std::string command, const std::string& mode);
  void info(const std::string& line) override;
  void warning(const std::string& line) override;
  void step(int64_t epoch, int64_t epochs, int64_t index, int64_t steps_per_epoch, const std::string& fields) override;
  void epoch(const std::string& line) override;
  std::string option(const std::string& key) const override { return "--" + key; }

 private:
  std::string command_;
  bool bar_ = false, quiet_ = false;
};

// Exit codes: 0 success, 1 failure at run time, 2 bad input (flags, config, data files), 3 diverged,
// 4 a data-parallel peer was lost, 130 interrupted by a signal.
constexpr int kExitBadInput = 2;
constexpr int kExitDiverged = 3;
constexpr int kExitInterrupted = 130;
// A data-parallel peer died or stopped answering (the message names it).
constexpr int kExitPeerLost = 4;

}  // namespace apps
}  // namespace largebatch
