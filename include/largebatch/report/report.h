#pragma once
// Reports: the run folders' CSV files turned into report.md with tables and gnuplot plots.
#include <string>
#include <vector>

namespace largebatch {
namespace report {

struct ReportOptions {
  double target = 0.9;  // accuracy for the "epochs / seconds to reach" columns
};

// Writes DIR/report.md and DIR/report/ (derived CSV files, gnuplot scripts, PNG plots) from the run folders
// under DIR (every folder holding config.json and metrics.csv). Deterministic: the same CSV files give the
// same bytes. Returns the files written. Throws std::invalid_argument naming the folder if there are no runs.
std::vector<std::string> write_report(const std::string& dir, const ReportOptions& options = {});

}  // namespace report
}  // namespace largebatch
