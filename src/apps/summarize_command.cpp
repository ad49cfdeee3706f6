// `largebatch summarize RUN...`: a comparison table of finished (or interrupted) runs.
#include "commands.h"

#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;

namespace largebatch {
namespace apps {

namespace {

// Mean training images/s over the epochs of metrics.csv (column img_per_s).
double mean_rate(const fs::path& metrics) {
  std::ifstream in(metrics);
  std::string line;
  if (!std::getline(in, line)) return 0;
  int col = -1, i = 0;
  std::stringstream header(line);
  std::string name;
  while (std::getline(header, name, ',')) {
    if (name == "img_per_s") col = i;
    ++i;
  }
  double sum = 0;
  int n = 0;
  while (col >= 0 && std::getline(in, line)) {
    std::stringstream row(line);
    std::string cell;
    for (int c = 0; std::getline(row, cell, ','); ++c)
      if (c == col) {
        sum += std::stod(cell);
        ++n;
      }
  }
  return n ? sum / n : 0;
}

}  // namespace

Runner add_summarize_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("summarize", "Print a comparison table of training runs (their summary.json)");
  auto runs = std::make_shared<std::vector<std::string>>();
  cmd->add_option("runs", *runs, "Run directories (--out of `largebatch train`)")->required()->check(existing_directory());
  return [cmd, runs]() -> int {
    if (!cmd->parsed()) return -1;
    std::printf("| run | optimizer | batch | epochs | final top-1 | best top-1 (epoch) | status | wall s | train img/s |\n");
    std::printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    int bad = 0;
    for (const auto& dir : *runs) {
      const fs::path summary = fs::path(dir) / "summary.json";
      std::ifstream in(summary);
      if (!in) {
        std::fprintf(stderr, "largebatch summarize: %s: no summary.json (not a finished run)\n", dir.c_str());
        ++bad;
        continue;
      }
      try {
        const auto j = nlohmann::json::parse(in);
        std::printf("| %s | %s | %lld | %lld | %.2f %% | %.2f %% (%lld) | %s | %.0f | %.0f |\n", dir.c_str(),
                    j.at("optimizer").get<std::string>().c_str(), j.at("batch_size").get<long long>(),
                    j.at("epochs_done").get<long long>(), 100 * j.at("final_test_top1").get<double>(),
                    100 * j.at("best_test_top1").get<double>(), j.at("best_epoch").get<long long>(),
                    j.at("status").get<std::string>().c_str(), j.at("wall_seconds").get<double>(),
                    mean_rate(fs::path(dir) / "metrics.csv"));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "largebatch summarize: %s: %s\n", summary.string().c_str(), e.what());
        ++bad;
      }
    }
    return bad ? kExitBadInput : 0;
  };
}

}  // namespace apps
}  // namespace largebatch
