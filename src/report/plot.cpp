#include <largebatch/report/plot.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <algorithm>
#include <map>
#include <sstream>

namespace fs = std::filesystem;

namespace largebatch {
namespace report {

namespace {

std::vector<std::string> split_csv_line(const std::string& line) {
  std::vector<std::string> out;
  std::stringstream ss(line);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

int index_of(const std::vector<std::string>& columns, const std::string& name) {
  for (size_t i = 0; i < columns.size(); ++i)
    if (columns[i] == name) return static_cast<int>(i);
  return -1;
}

int column_index(const std::string& csv, const std::string& column) {
  std::ifstream in(csv);
  std::string header;
  if (!std::getline(in, header)) return -1;
  const int i = index_of(split_csv_line(header), column);
  return i < 0 ? -1 : i + 1;  // gnuplot columns are 1-based
}

std::string quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += (c == '\'') ? std::string("''") : std::string(1, c);
  return out + "'";
}

}  // namespace

bool gnuplot_available() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

bool plot(const PlotSpec& spec, std::string* error) {
  auto fail = [&](const std::string& why) {
    if (error) *error = why;
    return false;
  };
  if (spec.series.empty()) return fail("nothing to plot");
  std::ostringstream gp;
  gp << "set datafile separator ','\n"
     << "set terminal pngcairo size 1000,600 noenhanced\n"
     << "set output " << quote(spec.png) << "\n"
     << "set title " << quote(spec.title) << "\n"
     << "set xlabel " << quote(spec.x_label) << "\nset ylabel " << quote(spec.y_label) << "\n"
     << "set key outside right\nset grid\n";
  if (spec.log_y) gp << "set logscale y\n";
  if (spec.log_x) gp << "set logscale x 2\n";
  if (!spec.y2_label.empty()) gp << "set y2label " << quote(spec.y2_label) << "\nset y2tics\nset ytics nomirror\n";
  gp << "plot ";
  bool first = true;
  for (const auto& s : spec.series) {
    const int x = column_index(s.csv, s.x_column), y = column_index(s.csv, s.y_column);
    if (x < 0 || y < 0) return fail(s.csv + ": no column " + (x < 0 ? s.x_column : s.y_column));
    std::string using_y = "($" + std::to_string(y) + ")";
    if (!spec.filter_column.empty()) {
      const int f = column_index(s.csv, spec.filter_column);
      if (f < 0) return fail(s.csv + ": no column " + spec.filter_column);
      using_y = "(strcol(" + std::to_string(f) + ") eq " + quote(spec.filter) + " ? $" + std::to_string(y) + " : 1/0)";
    }
    gp << (first ? "" : ", \\\n     ") << quote(s.csv) << " using " << x << ":" << using_y
       << " every ::1" << (s.second_axis ? " axes x1y2" : "") << " with linespoints title " << quote(s.title);
    first = false;
  }
  gp << "\n";
  const std::string script = fs::path(spec.png).replace_extension(".gp").string();
  {
    std::ofstream out(script);
    if (!out) return fail("cannot write " + script);
    out << gp.str();
  }
  if (!gnuplot_available()) return fail("gnuplot is not installed (script kept in " + script + ")");
  const std::string cmd = "gnuplot " + quote(script) + " 2>" + quote(script + ".log");
  if (std::system(cmd.c_str()) != 0) return fail("gnuplot failed; see " + script + ".log");
  std::error_code ec;
  fs::remove(script + ".log", ec);
  return true;
}

std::vector<std::string> plot_run(const std::string& dir) {
  std::vector<std::string> made;
  const std::string metrics = (fs::path(dir) / "metrics.csv").string();
  std::string header;
  if (std::ifstream in{metrics}) std::getline(in, header);
  if (header.find("on_diagonal") != std::string::npos) {
    // Barlow Twins pre-training: the loss and its two terms.
    PlotSpec loss{(fs::path(dir) / "loss.png").string(), "Barlow Twins loss per epoch: " + dir, "epoch",
                  "loss (mean over the epoch's steps)", true,
                  {{metrics, "epoch", "train_loss", "loss"}, {metrics, "epoch", "on_diagonal", "on-diagonal sum (1 - C_ii)^2"},
                   {metrics, "epoch", "off_diagonal", "off-diagonal sum C_ij^2 (unweighted)"}},
                  "", ""};
    if (plot(loss)) made.push_back(loss.png);
  } else if (fs::exists(metrics)) {
    PlotSpec acc{(fs::path(dir) / "curves.png").string(), "accuracy per epoch: " + dir, "epoch", "accuracy", false,
                 {{metrics, "epoch", "train_acc", "train accuracy"}, {metrics, "epoch", "test_top1", "test top-1"}},
                 "", ""};
    if (plot(acc)) made.push_back(acc.png);
    PlotSpec loss{(fs::path(dir) / "loss.png").string(), "loss per epoch: " + dir, "epoch", "cross-entropy", true,
                  {{metrics, "epoch", "train_loss", "train loss"}, {metrics, "epoch", "test_loss", "test loss"}},
                  "", ""};
    if (plot(loss)) made.push_back(loss.png);
  }
  const std::string sharpness = (fs::path(dir) / "sharpness.csv").string();
  if (fs::exists(sharpness) && fs::exists(metrics)) {
    PlotSpec sharp{(fs::path(dir) / "sharpness.png").string(), "sharpness and accuracy: " + dir, "step",
                   "top Hessian eigenvalue (fixed batch)", false,
                   {{sharpness, "step", "top_eigenvalue", "sharpness"},
                    {metrics, "step", "test_top1", "test top-1 (per epoch)", true}},
                   "", "", "test top-1"};
    if (plot(sharp)) made.push_back(sharp.png);
  }
  const std::string telemetry = (fs::path(dir) / "telemetry.csv").string();
  if (fs::exists(telemetry)) {
    // One series per layer: the layer names are the distinct values of the "layer" column.
    std::ifstream in(telemetry);
    std::string line;
    std::getline(in, line);
    const auto header = split_csv_line(line);
    const int layer_col = index_of(header, "layer"), step_col = index_of(header, "step"),
              ratio_col = index_of(header, "trust_ratio");
    // Rows of the layers interleave, so a filtered column would leave every line broken: the script
    // carries one inline data block per layer instead (and stays self-contained).
    std::vector<std::string> layers;
    std::map<std::string, std::string> points;
    while (layer_col >= 0 && step_col >= 0 && ratio_col >= 0 && std::getline(in, line)) {
      const auto cols = split_csv_line(line);
      const int needed = std::max({layer_col, step_col, ratio_col});
      if (static_cast<int>(cols.size()) <= needed) continue;
      if (!points.count(cols[layer_col])) layers.push_back(cols[layer_col]);
      points[cols[layer_col]] += cols[step_col] + "," + cols[ratio_col] + "\n";
    }
    if (!layers.empty()) {
      std::ostringstream gp;
      const std::string png = (fs::path(dir) / "trust_ratios.png").string();
      gp << "set datafile separator ','\n";
      for (size_t i = 0; i < layers.size(); ++i) gp << "$L" << i << " << EOD\n" << points[layers[i]] << "EOD\n";
      gp << "set terminal pngcairo size 1200,700 noenhanced\nset output " << quote(png)
         << "\nset title " << quote("layer-wise trust ratio (LNR, incl. phi_t): " + dir)
         << "\nset xlabel 'step'\nset ylabel 'trust ratio'\nset logscale y\nset key outside right font ',7'\n"
         << "set grid\nplot ";
      for (size_t i = 0; i < layers.size(); ++i)
        gp << (i ? ", \\\n     " : "") << "$L" << i << " using 1:2 with linespoints title " << quote(layers[i]);
      gp << "\n";
      const std::string script = fs::path(png).replace_extension(".gp").string();
      std::ofstream(script) << gp.str();
      if (gnuplot_available() && std::system(("gnuplot " + quote(script) + " 2>/dev/null").c_str()) == 0)
        made.push_back(png);
    }
  }
  return made;
}

}  // namespace report
}  // namespace largebatch
