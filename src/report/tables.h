#pragma once
// Internal to src/report: the report's view of run folders (CSV files, runs, mean and spread over seeds), shared
// by the report writer (report.cpp) and its study sections (study_report.cpp).
#include "files.h"

#include <largebatch/report/plot.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace largebatch {
namespace report {
namespace detail {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct Csv {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  int column(const std::string& name) const {
    for (size_t i = 0; i < header.size(); ++i)
      if (header[i] == name) return static_cast<int>(i);
    return -1;
  }
  double number(size_t row, int col) const {
    if (col < 0 || col >= static_cast<int>(rows[row].size())) return NAN;
    try {
      return std::stod(rows[row][col]);
    } catch (const std::exception&) {
      return NAN;
    }
  }
};

inline Csv read_csv(const fs::path& path) {
  Csv csv;
  std::ifstream in(path);
  std::string line;
  auto split = [](const std::string& l) {
    std::vector<std::string> out;
    std::stringstream ss(l);
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(item);
    return out;
  };
  if (std::getline(in, line)) csv.header = split(line);
  while (std::getline(in, line))
    if (!line.empty()) csv.rows.push_back(split(line));
  return csv;
}

// A CSV file with a header and at least one row (without reading the rest of a long file).
inline bool has_data_rows(const fs::path& path) {
  std::ifstream in(path);
  std::string line;
  return std::getline(in, line) && std::getline(in, line) && !line.empty();
}

struct Run {
  std::string name;       // folder, relative to the report's directory
  fs::path dir;
  json config;
  Csv metrics;                 // a pre-training run followed by linear evaluation: the evaluation's
  bool has_telemetry = false, has_sharpness = false;
  bool linear_eval = false;    // metrics from RUN/linear-eval/, config and telemetry from the pre-training
  Csv pretrain_metrics;        // with linear_eval: the pre-training's own metrics.csv (loss, epoch seconds)
  double pretrain_loss = NAN;  // its final Barlow Twins loss
};

// A linear evaluation run by itself (e.g. of a random backbone, a pre-training study's baseline): no optimizer of
// its own, a backbone to evaluate.
inline bool is_linear_eval_alone(const json& config) {
  return !config.contains("optimizer") && config.contains("backbone") && config["backbone"].is_string();
}

struct Stats {
  double mean = NAN, std = NAN;
  int n = 0;
};

inline Stats stats(const std::vector<double>& v) {
  Stats s;
  std::vector<double> x;
  for (double d : v)
    if (!std::isnan(d)) x.push_back(d);
  s.n = static_cast<int>(x.size());
  if (x.empty()) return s;
  double sum = 0;
  for (double d : x) sum += d;
  s.mean = sum / s.n;
  if (s.n > 1) {
    double ss = 0;
    for (double d : x) ss += (d - s.mean) * (d - s.mean);
    s.std = std::sqrt(ss / (s.n - 1));
  }
  return s;
}

inline std::string percent(const Stats& s) {
  if (s.n == 0) return "–";
  if (s.n == 1) return format("%.2f", 100 * s.mean);
  return format("%.2f", 100 * s.mean) + " ± " + format("%.2f", 100 * s.std);
}

inline std::string quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

// Runs gnuplot on a script written next to the PNG; returns whether the PNG was made.
inline bool render(const fs::path& script_path, const std::string& script, std::vector<std::string>& made) {
  write_atomically(script_path, script);
  made.push_back(script_path.string());
  if (!gnuplot_available()) return false;
  const std::string cmd = "cd " + quote(script_path.parent_path().string()) + " && gnuplot " +
                          quote(script_path.filename().string()) + " 2>/dev/null";
  const fs::path png = fs::path(script_path).replace_extension(".png");
  if (std::system(cmd.c_str()) != 0) {
    std::error_code ec;
    fs::remove(png, ec);  // gnuplot opens the output before it fails: no half-drawn picture is left
    return false;
  }
  made.push_back(png.string());
  return true;
}

// Line style of the i-th series: gnuplot cycles 8 colours, so series beyond 8 are told apart by dashes.
inline std::string series_style(size_t i) {
  return " lc " + std::to_string(i % 8 + 1) + " dt " + std::to_string((i / 8) % 5 + 1) + " pt " + std::to_string(i % 13 + 1);
}

inline std::string header_lines(const std::string& png, const std::string& title, int width = 1100, int height = 650) {
  return "set datafile separator ','\nset terminal pngcairo size " + std::to_string(width) + "," +
         std::to_string(height) + " noenhanced\nset output " + quote(png) + "\nset title " + quote(title) +
         "\nset grid\nset key outside right font ',8'\n";
}

}  // namespace detail
}  // namespace report
}  // namespace largebatch
