// `largebatch sweep GRID` and `largebatch report DIR`.
#include "commands.h"

#include <largebatch/report/report.h>
#include <largebatch/report/sweep.h>

#include <csignal>
#include <cstdio>
#include <filesystem>

namespace fs = std::filesystem;

namespace largebatch {
namespace apps {

namespace {
void on_sweep_signal(int) {
  report::request_sweep_stop();
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
}
}  // namespace

Runner add_sweep_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "Run every combination of a grid file (JSON or TOML), each in its own folder");
  auto grid_path = std::make_shared<std::string>();
  auto options = std::make_shared<report::SweepOptions>();
  cmd->add_option("grid", *grid_path, "Grid file: axes and fixed settings (docs/STUDIES.md)")->required();
  cmd->add_option("--out", options->out, "Folder of the sweep (default: runs/<grid file name>)");
  cmd->add_option("--jobs", options->jobs, "Runs at a time (each gets cores / jobs threads unless the grid sets threads)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_flag("--dry-run", options->dry_run, "List the runs with their state (run, resume, finished); run nothing");
  return [cmd, grid_path, options]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      if (!fs::exists(*grid_path)) {
        std::fprintf(stderr, "largebatch sweep: no grid file %s\n", grid_path->c_str());
        return kExitBadInput;
      }
      const report::SweepGrid grid = report::read_grid(*grid_path);
      if (options->out.empty()) options->out = (fs::path("runs") / fs::path(*grid_path).stem()).string();
      std::error_code ec;
      options->executable = fs::read_symlink("/proc/self/exe", ec).string();
      if (ec) {
        std::fprintf(stderr, "largebatch sweep: cannot find this program's path (/proc/self/exe)\n");
        return 1;
      }
      std::signal(SIGINT, on_sweep_signal);
      std::signal(SIGTERM, on_sweep_signal);
      options->print = [](const std::string& line) {
        std::printf("%s\n", line.c_str());
        std::fflush(stdout);
      };
      const auto r = report::run_sweep(grid, *options);
      if (options->dry_run) return 0;
      std::printf("sweep: %lld runs: %lld finished before, %lld completed, %lld diverged, %lld failed, %lld interrupted; "
                  "see %s/sweep.csv\n",
                  static_cast<long long>(r.total), static_cast<long long>(r.skipped), static_cast<long long>(r.completed),
                  static_cast<long long>(r.diverged), static_cast<long long>(r.failed),
                  static_cast<long long>(r.interrupted), options->out.c_str());
      if (r.stopped || r.interrupted > 0) return kExitInterrupted;
      return r.failed > 0 ? 1 : 0;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch sweep: %s\n", e.what());
      return kExitBadInput;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "largebatch sweep: error: %s\n", e.what());
      return 1;
    }
  };
}

Runner add_report_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("report", "Write DIR/report.md with tables and plots from the runs under DIR");
  auto dir = std::make_shared<std::string>();
  auto options = std::make_shared<report::ReportOptions>();
  cmd->add_option("dir", *dir, "A sweep's folder (or any folder of run folders)")->required();
  cmd->add_option("--target", options->target, "Test top-1 for the time-to-accuracy columns")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  return [cmd, dir, options]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      const auto files = report::write_report(*dir, *options);
      std::printf("report: %s (%zu files)\n", files.front().c_str(), files.size());
      return 0;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch report: %s\n", e.what());
      return kExitBadInput;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "largebatch report: error: %s\n", e.what());
      return 1;
    }
  };
}

}  // namespace apps
}  // namespace largebatch
