// The selection rule of studies: metrics of finished runs and the choice among a cell's candidates.
#include <largebatch/report/select.h>

#include "files.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;

namespace largebatch {
namespace report {

namespace {

std::string summary_status(const fs::path& dir) {
  try {
    return nlohmann::json::parse(detail::read_text(dir / "summary.json")).value("status", "");
  } catch (const std::exception&) {
    return "";
  }
}

std::vector<std::string> split(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream ss(line);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

double number(const std::string& text) {
  try {
    size_t used = 0;
    const double v = std::stod(text, &used);
    return used == text.size() ? v : NAN;
  } catch (const std::exception&) {
    return NAN;
  }
}

}  // namespace

bool lower_is_better(const std::string& by) { return by == "final_val_loss"; }

double selection_metric(const std::string& run_dir, const std::string& by) {
  const fs::path dir = fs::exists(fs::path(run_dir) / "linear-eval" / "metrics.csv") ? fs::path(run_dir) / "linear-eval"
                                                                                       : fs::path(run_dir);
  if (summary_status(dir) != "completed") return NAN;  // a diverged run has no result to choose
  std::ifstream in(dir / "metrics.csv");
  std::string line;
  if (!std::getline(in, line)) return NAN;
  const auto header = split(line);
  const std::string column = by == "final_val_loss" ? "val_loss" : "val_top1";
  int col = -1;
  for (size_t i = 0; i < header.size(); ++i)
    if (header[i] == column) col = static_cast<int>(i);
  if (col < 0) return NAN;
  double last = NAN, best = NAN;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const auto row = split(line);
    last = col < static_cast<int>(row.size()) ? number(row[col]) : NAN;
    if (std::isfinite(last) && (std::isnan(best) || last > best)) best = last;
  }
  return by == "best_val_top1" ? best : last;
}

int choose(const std::vector<double>& metrics, const std::string& by) {
  int best = -1;
  for (size_t i = 0; i < metrics.size(); ++i) {
    if (!std::isfinite(metrics[i])) continue;
    const bool better = best < 0 || (lower_is_better(by) ? metrics[i] < metrics[best] : metrics[i] > metrics[best]);
    if (better) best = static_cast<int>(i);
  }
  return best;
}

std::string finished_state(const std::string& run_dir, bool linear_eval) {
  const std::string pre = summary_status(run_dir);
  if (pre != "completed" && pre != "diverged") return "";
  if (!linear_eval || pre == "diverged") return pre;
  const std::string after = summary_status(fs::path(run_dir) / "linear-eval");
  return after == "completed" || after == "diverged" ? after : "";
}

}  // namespace report
}  // namespace largebatch
