#pragma once
// Plots with gnuplot: each plot's script is kept next to its PNG so it can be re-run or edited.
#include <string>
#include <vector>

namespace largebatch {
namespace report {

// True when a gnuplot executable is on PATH.
bool gnuplot_available();

struct Series {
  std::string csv;        // data file (comma-separated, header line)
  std::string x_column;   // column names from the header
  std::string y_column;
  std::string title;
  bool second_axis = false;  // plotted against the right-hand y axis (PlotSpec::y2_label)
};

struct PlotSpec {
  std::string png;        // output path; the script goes to the same path with .gp
  std::string title, x_label, y_label;
  bool log_y = false;
  std::vector<Series> series;
  std::string filter;     // optional: only rows whose column `filter_column` equals this value
  std::string filter_column;
  std::string y2_label;   // set when a series uses the second axis
  bool log_x = false;     // base-2 logarithmic x axis (batch sizes)
};

// Writes the script and runs gnuplot; returns false (and says why in *error) if it could not plot.
bool plot(const PlotSpec& spec, std::string* error = nullptr);

// The standard plots of a training run directory: curves.png (loss, accuracy, lr per epoch) and, when
// telemetry.csv exists, trust_ratios.png (per-layer trust ratio against step); sharpness.png (top Hessian
// eigenvalue and test top-1 against step) when sharpness.csv exists. Returns the files made.
std::vector<std::string> plot_run(const std::string& run_dir);

}  // namespace report
}  // namespace largebatch
