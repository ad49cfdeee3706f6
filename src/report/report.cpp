// `largebatch report`: tables and gnuplot plots from the run folders' CSV files.
#include <largebatch/report/plot.h>
#include <largebatch/report/report.h>
#include <largebatch/report/select.h>

#include "files.h"
#include "study_report.h"
#include "tables.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace fs = std::filesystem;
using nlohmann::json;

namespace largebatch {
namespace report {

namespace {

using detail::format;
using detail::read_text;
using detail::write_atomically;
using detail::Csv;
using detail::Run;
using detail::Stats;
using detail::has_data_rows;
using detail::is_linear_eval_alone;
using detail::percent;
using detail::read_csv;
using detail::stats;
using detail::quote;
using detail::render;
using detail::series_style;
using detail::header_lines;

// Options that identify a configuration (a seed axis or bookkeeping options do not).
bool identifying(const std::string& key) {
  static const std::set<std::string> ignored{"seed", "out", "progress", "threads", "plots", "data-dir",
                                             "loader-workers", "eval-batch-size", "resume", "dist-timeout",
                                             "bucket-mb", "telemetry-every", "sharpness-every",
                                             "sharpness-batch", "sharpness-iterations", "checkpoint-every"};
  return !ignored.count(key);
}

std::string optimizer_label(const json& config) {
  if (is_linear_eval_alone(config)) {  // named by what it evaluates
    const std::string backbone = config["backbone"].get<std::string>();
    return backbone == "random" ? "linear eval, random " + config.value("model", std::string("?")) + " backbone"
                                : "linear eval of " + fs::path(backbone).filename().string();
  }
  std::string label = config.value("optimizer", "?");
  if (config.contains("opt") && config["opt"].is_array())
    for (const auto& o : config["opt"]) label += " " + o.get<std::string>();
  return label;
}

std::string text_of(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_number_float()) return format("%.6g", v.get<double>());
  return v.dump();
}

struct Group {
  std::string key;                 // identifying config, as JSON text
  json config;                     // of its first run
  std::vector<const Run*> runs;    // one per seed
};

std::string slug(const std::string& text) {
  std::string out;
  for (char c : text) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
    out += ok ? c : '_';
  }
  return out;
}

// Seconds of every epoch in a metrics file (0 without the column).
double epoch_seconds(const Csv& metrics) {
  const int column = metrics.column("epoch_seconds");
  double total = 0;
  for (size_t row = 0; column >= 0 && row < metrics.rows.size(); ++row)
    if (std::isfinite(metrics.number(row, column))) total += metrics.number(row, column);
  return total;
}

}  // namespace

// A word for a shell command line: as it is when it holds only characters no shell treats specially.
static std::string shell_word(const std::string& text) {
  const bool plain = !text.empty() && std::all_of(text.begin(), text.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || std::strchr("_./-:=+,@%", c) != nullptr;
  });
  if (plain) return text;
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

std::vector<std::string> write_report(const std::string& dir_text, const ReportOptions& options) {
  const fs::path dir(dir_text);
  // The command that gives this very report: the folder as it was named, and every option that shapes it.
  char target_text[32];
  std::snprintf(target_text, sizeof(target_text), "%.15g", options.target);
  const std::string regenerate = "largebatch report " + shell_word(dir_text) + " --target " + target_text;
  const std::string title = dir.lexically_normal().has_filename() ? dir.lexically_normal().filename().string()
                                                                  : dir.lexically_normal().parent_path().filename().string();
  if (!fs::is_directory(dir)) throw std::invalid_argument(dir_text + ": not a directory");
  // The runs: DIR itself or its sub-folders, every one holding config.json and metrics.csv.
  std::vector<fs::path> candidates{dir};
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.is_directory() && entry.path().filename() != "report") candidates.push_back(entry.path());
  std::vector<Run> runs;
  std::vector<std::string> unfinished;
  std::vector<double> run_seconds;  // every finished run's epochs, candidates included: what the study cost
  for (const auto& d : candidates) {
    if (!fs::exists(d / "config.json") || !fs::exists(d / "metrics.csv")) continue;
    Run r;
    r.dir = d;
    r.name = d == dir ? "." : d.filename().string();
    try {
      r.config = json::parse(read_text(d / "config.json"));
    } catch (const std::exception&) {
      throw std::invalid_argument((d / "config.json").string() + ": not valid JSON");
    }
    // A pre-training run followed by linear evaluation (a sweep's "linear-eval" block) is reported by its
    // evaluation's metrics, under the pre-training's configuration.
    r.linear_eval = fs::exists(d / "linear-eval" / "metrics.csv");
    r.metrics = read_csv(r.linear_eval ? d / "linear-eval" / "metrics.csv" : d / "metrics.csv");
    if (r.metrics.column("test_top1") < 0) continue;  // not a classification run (e.g. pretrain alone)
    // Only finished runs are results: a run still going, interrupted or failed has no summary saying
    // completed or diverged, and its partial curve would pass for a short run.
    if (finished_state(d.string(), r.linear_eval).empty()) {
      unfinished.push_back(r.name);
      continue;
    }
    if (r.linear_eval) {
      r.pretrain_metrics = read_csv(d / "metrics.csv");
      try {
        r.pretrain_loss = json::parse(read_text(d / "summary.json")).value("final_loss", NAN);
      } catch (const std::exception&) {
      }
    }
    r.has_telemetry = has_data_rows(d / "telemetry.csv");
    r.has_sharpness = fs::exists(d / "sharpness.csv");
    run_seconds.push_back(epoch_seconds(r.metrics) + (r.linear_eval ? epoch_seconds(r.pretrain_metrics) : 0.0));
    runs.push_back(std::move(r));
  }
  std::sort(unfinished.begin(), unfinished.end());
  // A study (DIR/study.json): its candidates are read by the selection sections only; the tables and plots
  // below show the follow-ups, so that no test result of a candidate appears.
  detail::StudyPlan study;
  const bool is_study = detail::read_study(dir, study);
  std::size_t finished_candidates = 0;
  std::vector<std::string> outside_plan;
  if (is_study) {
    std::set<std::string> candidate_names;
    for (const auto& cell : study.cells) candidate_names.insert(cell.candidates.begin(), cell.candidates.end());
    finished_candidates = static_cast<std::size_t>(std::count_if(
        runs.begin(), runs.end(), [&](const Run& r) { return candidate_names.count(r.name) > 0; }));
    runs.erase(std::remove_if(runs.begin(), runs.end(), [&](const Run& r) { return candidate_names.count(r.name) > 0; }),
               runs.end());
    unfinished.erase(std::remove_if(unfinished.begin(), unfinished.end(),
                                    [&](const std::string& n) { return candidate_names.count(n) > 0; }),
                     unfinished.end());
    // A folder the study's record does not list (left from an earlier plan) is no follow-up of its choices.
    std::set<std::string> planned;
    for (const auto& f : study.follow_ups) planned.insert(f.run);
    for (const auto& r : runs)
      if (!planned.count(r.name)) outside_plan.push_back(r.name);
    runs.erase(std::remove_if(runs.begin(), runs.end(), [&](const Run& r) { return planned.count(r.name) == 0; }),
               runs.end());
    std::sort(outside_plan.begin(), outside_plan.end());
  }
  if (runs.empty() && !is_study)
    throw std::invalid_argument(dir_text + ": no finished classification runs (folders with config.json, metrics.csv "
                                "and a summary.json saying completed or diverged)" +
                                (unfinished.empty() ? std::string() : "; unfinished: " + std::to_string(unfinished.size())));
  std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) { return a.name < b.name; });

  // Configurations: runs that differ only in seed (and bookkeeping) form one group.
  std::vector<Group> groups;
  for (const auto& r : runs) {
    json id = json::object();
    for (auto it = r.config.begin(); it != r.config.end(); ++it)
      if (identifying(it.key())) id[it.key()] = it.value();
    const std::string key = id.dump();
    auto g = std::find_if(groups.begin(), groups.end(), [&](const Group& x) { return x.key == key; });
    if (g == groups.end()) {
      groups.push_back({key, id, {}});
      g = groups.end() - 1;
    }
    g->runs.push_back(&r);
  }
  // Which identifying options vary between groups (besides optimizer, opt and batch size): table columns.
  std::vector<std::string> varying;
  std::set<std::string> keys;  // over every group: a key only some runs have varies too
  for (const auto& g : groups)
    for (auto it = g.config.begin(); it != g.config.end(); ++it) keys.insert(it.key());
  for (const auto& k : keys) {
    if (k == "optimizer" || k == "opt" || k == "batch-size") continue;
    const json first = groups.front().config.value(k, json());
    for (const auto& g : groups)
      if (g.config.value(k, json()) != first) {
        varying.push_back(k);
        break;
      }
  }
  std::sort(groups.begin(), groups.end(), [](const Group& a, const Group& b) {
    const auto ba = a.config.value("batch-size", 0), bb = b.config.value("batch-size", 0);
    if (ba != bb) return ba < bb;
    return a.key < b.key;
  });
  // Labels (plot keys, headings) name only the options a group sets away from the value most groups share
  // (the first such value on a tie): "lars precision=bf16", not every varying option. Two groups still get
  // two labels: where they differ, at least one of them is away from the common value.
  std::map<std::string, json> common;
  for (const auto& k : varying) {
    std::vector<std::pair<json, int>> counts;
    for (const auto& g : groups) {
      const json v = g.config.value(k, json());
      auto it = std::find_if(counts.begin(), counts.end(), [&](const auto& c) { return c.first == v; });
      if (it == counts.end()) counts.emplace_back(v, 1);
      else ++it->second;
    }
    common[k] = std::max_element(counts.begin(), counts.end(), [](const auto& a, const auto& b) {
                  return a.second < b.second;
                })->first;
  }
  auto group_label = [&](const Group& g) {
    std::string label = optimizer_label(g.config);
    for (const auto& k : varying)
      if (g.config.contains(k) && g.config[k] != common.at(k)) label += " " + k + "=" + text_of(g.config[k]);
    return label;
  };

  const fs::path assets = dir / "report";
  fs::create_directories(assets);
  // Files of an earlier report (other configurations) must not linger beside this one's.
  for (const auto& entry : fs::directory_iterator(assets)) {
    const std::string f = entry.path().filename().string();
    if (entry.is_regular_file() && (f.rfind("config", 0) == 0 || f.rfind("accuracy_b", 0) == 0 || f.rfind("schedules_b", 0) == 0 ||
                                    f.rfind("tuning_", 0) == 0 || f.rfind("pretrain_loss_b", 0) == 0))
      fs::remove(entry.path());
  }
  std::vector<std::string> made;
  std::ostringstream md;
  md << "# Report: " << title << "\n\n";
  if (is_study)
    md << finished_candidates << " finished candidate runs (read for the selection only) and ";
  md << runs.size() << (is_study ? " follow-up" : "") << " runs in " << groups.size() << " configurations (runs that differ only in their seed are "
     << "one configuration; mean ± sample standard deviation over seeds). Regenerate with `" << regenerate
     << "`: the same CSV files give the same report.\n\n";
  if (!unfinished.empty()) {
    md << "**" << unfinished.size() << " unfinished run" << (unfinished.size() == 1 ? "" : "s")
       << " left out** (no summary saying completed or diverged: still running, interrupted or failed):";
    for (const auto& name : unfinished) md << " `" << name << "`";
    md << ".\n\n";
  }
  if (!outside_plan.empty()) {
    md << "**" << outside_plan.size() << " finished run" << (outside_plan.size() == 1 ? "" : "s")
       << " outside the study's plan left out** (not in study.json: neither a candidate nor a follow-up of a choice):";
    for (const auto& name : outside_plan) md << " `" << name << "`";
    md << ".\n\n";
  }
  if (!run_seconds.empty()) {
    std::vector<double> sorted = run_seconds;
    std::sort(sorted.begin(), sorted.end());
    double total = 0;
    for (double v : sorted) total += v;
    const double median = sorted.size() % 2 ? sorted[sorted.size() / 2]
                                             : (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]) / 2;
    md << "Compute: the " << sorted.size() << " finished run" << (sorted.size() == 1 ? "" : "s") << "' epochs took "
       << format("%.0f", total) << " s (" << format("%.2f", total / 3600) << " h; per run median "
       << format("%.0f", median) << " s, " << format("%.0f", sorted.front()) << "-" << format("%.0f", sorted.back())
       << " s), half that with two runs at a time throughout: the sum of the runs' `epoch_seconds` (training, "
          "sharpness estimates, evaluation; pre-training and linear evaluation both), without start-up, the work an "
          "interruption lost and unfinished runs.\n\n";
  }
  if (is_study) {
    std::vector<const Run*> follow;
    for (const auto& r : runs) follow.push_back(&r);
    detail::write_study_sections(study, dir, follow, assets, md, made);
  }

  // ---- table 1: every configuration
  md << (is_study ? "\n## Test top-1 of every follow-up configuration\n\n" : "## Test top-1 per configuration\n\n")
     << "Target for the last two columns: " << format("%.2f", 100 * options.target)
     << " % test top-1 (epochs and training seconds until the first epoch that reaches it, mean over the seeds "
        "that did).\n\n"
     << "| optimizer | batch |";
  for (const auto& k : varying) md << " " << k << " |";
  // A run's metric after its last epoch (NaN without it).
  auto final_of = [](const Run* r, const char* column) {
    return r->metrics.rows.empty() ? NAN : r->metrics.number(r->metrics.rows.size() - 1, r->metrics.column(column));
  };
  // Runs with a validation split (--val-split) add its final top-1, the number to choose settings by.
  bool any_validation = false;
  for (const auto& r : runs) any_validation = any_validation || std::isfinite(final_of(&r, "val_top1"));
  bool any_pretrained = false;  // pre-training runs followed by linear evaluation: their final Barlow Twins loss too
  for (const auto& r : runs) any_pretrained = any_pretrained || r.linear_eval;
  if (any_pretrained) md << " pre-training loss |";
  md << " seeds |" << (any_validation ? " final val top-1 % |" : "")
     << " final top-1 % | best top-1 % | epochs | reached | epochs to target | seconds to target |\n|---|---|";
  for (size_t i = 0; i < varying.size() + (any_validation ? 1 : 0) + (any_pretrained ? 1 : 0); ++i) md << "---|";
  md << "---|---|---|---|---|---|---|\n";
  for (const auto& g : groups) {
    std::vector<double> finals, bests, epochs_to, seconds_to, vals;
    int reached = 0;
    double epochs = 0;
    for (const Run* r : g.runs) {
      const Csv& m = r->metrics;
      const int top1 = m.column("test_top1"), secs = m.column("epoch_seconds");
      double best = NAN, elapsed = 0;
      bool hit = false;
      for (size_t row = 0; row < m.rows.size(); ++row) {
        const double a = m.number(row, top1);
        if (std::isnan(best) || a > best) best = a;
        elapsed += std::isnan(m.number(row, secs)) ? 0 : m.number(row, secs);
        if (!hit && a >= options.target) {
          hit = true;
          epochs_to.push_back(static_cast<double>(row + 1));
          seconds_to.push_back(elapsed);
        }
      }
      reached += hit ? 1 : 0;
      finals.push_back(m.rows.empty() ? NAN : m.number(m.rows.size() - 1, top1));
      vals.push_back(final_of(r, "val_top1"));
      bests.push_back(best);
      epochs = std::max(epochs, static_cast<double>(m.rows.size()));
    }
    md << "| " << optimizer_label(g.config) << " | " << g.config.value("batch-size", 0) << " |";
    for (const auto& k : varying) md << " " << (g.config.contains(k) ? text_of(g.config[k]) : "") << " |";
    const Stats e = stats(epochs_to), s = stats(seconds_to);
    if (any_pretrained) {
      std::vector<double> losses;
      for (const Run* r : g.runs) losses.push_back(r->pretrain_loss);
      const Stats l = stats(losses);
      md << " " << (l.n == 0 ? std::string("–") : l.n == 1 ? format("%.2f", l.mean)
                                                            : format("%.2f", l.mean) + " ± " + format("%.2f", l.std))
         << " |";
    }
    md << " " << g.runs.size() << " |" << (any_validation ? " " + percent(stats(vals)) + " |" : "") << " "
       << percent(stats(finals)) << " | " << percent(stats(bests)) << " | "
       << static_cast<int>(epochs) << " | " << reached << "/" << g.runs.size() << " | "
       << (e.n ? format("%.1f", e.mean) : "–") << " | " << (s.n ? format("%.0f", s.mean) : "–") << " |\n";
  }

  // ---- table 2: optimizer x batch size, the best configuration of each cell, chosen on validation (the runs'
  // final val_top1, --val-split) when every run of the cell has it, else on the test set, and said so. A study
  // has its own rule (the selection sections) instead.
  std::vector<std::string> optimizers;
  std::vector<int64_t> batches;
  for (const auto& g : groups) {
    const std::string o = optimizer_label(g.config);
    if (std::find(optimizers.begin(), optimizers.end(), o) == optimizers.end()) optimizers.push_back(o);
    const int64_t b = g.config.value("batch-size", 0);
    if (std::find(batches.begin(), batches.end(), b) == batches.end()) batches.push_back(b);
  }
  std::sort(optimizers.begin(), optimizers.end());
  std::sort(batches.begin(), batches.end());
  if (!is_study) {
    md << "\n## Final test top-1 %, optimizer × batch size\n\nEach cell: the mean final test top-1 of the "
          "configuration chosen among those of that optimizer and batch size";
    if (!varying.empty()) {
      md << " (over";
      for (const auto& k : varying) md << " " << k;
      md << ")";
    }
    md << ": the one with the best mean final validation top-1 (marked *val*) where every run of the cell held out "
          "a validation split (--val-split), otherwise the one with the best mean final test top-1 (marked *test*: "
          "chosen on the test set itself, an optimistic estimate).\n\n| optimizer |";
    for (auto b : batches) md << " B = " << b << " |";
    md << "\n|---|";
    for (size_t i = 0; i < batches.size(); ++i) md << "---|";
    md << "\n";
    for (const auto& o : optimizers) {
      md << "| " << o << " |";
      for (auto b : batches) {
        bool validated = true;
        for (const auto& g : groups) {
          if (optimizer_label(g.config) != o || g.config.value("batch-size", 0) != b) continue;
          for (const Run* r : g.runs) validated = validated && std::isfinite(final_of(r, "val_top1"));
        }
        const char* chooser = validated ? "val_top1" : "test_top1";
        const Group* best = nullptr;
        double best_choice = NAN;
        Stats best_stats;
        for (const auto& g : groups) {
          if (optimizer_label(g.config) != o || g.config.value("batch-size", 0) != b) continue;
          std::vector<double> finals, choice;
          for (const Run* r : g.runs) {
            finals.push_back(final_of(r, "test_top1"));
            choice.push_back(final_of(r, chooser));
          }
          const Stats s = stats(finals), c = stats(choice);
          if (c.n && (!best || c.mean > best_choice)) {
            best = &g;
            best_choice = c.mean;
            best_stats = s;
          }
        }
        md << " " << (best ? percent(best_stats) + (validated ? " *val*" : " *test*") : "–");
        if (best)
          for (const auto& k : varying)
            if (best->config.contains(k)) md << " (" << k << " " << text_of(best->config[k]) << ")";
        md << " |";
      }
      md << "\n";
    }
  }

  // ---- table 3: sharpness, where it was measured
  bool any_sharpness = false;
  for (const auto& g : groups)
    for (const Run* r : g.runs) any_sharpness = any_sharpness || r->has_sharpness;
  if (any_sharpness) {
    md << "\n## Sharpness\n\n"
       << "Top eigenvalue of the training-loss Hessian on a fixed batch (power iteration), mean ± std over seeds: at "
          "the first measurement, the largest, and the last. Estimates whose power iteration did not converge "
          "(--sharpness-iterations reached first) are counted and left out of these numbers.\n\n"
       << "| optimizer | batch | seeds | estimates | not converged (left out) | first | largest | last |\n"
          "|---|---|---|---|---|---|---|---|\n";
    auto plain = [](const Stats& s) {
      if (s.n == 0) return std::string("–");
      return s.n == 1 ? format("%.1f", s.mean) : format("%.1f", s.mean) + " ± " + format("%.1f", s.std);
    };
    for (const auto& g : groups) {
      std::vector<double> first, largest, last;
      size_t estimates = 0, unconverged = 0;
      for (const Run* r : g.runs) {
        if (!r->has_sharpness) continue;
        const Csv c = read_csv(r->dir / "sharpness.csv");
        const int col = c.column("top_eigenvalue"), conv = c.column("converged");
        if (col < 0 || c.rows.empty()) continue;
        // Converged, finite estimates only (a diverged run can leave NaN or infinite ones).
        std::vector<double> values;
        for (size_t i = 0; i < c.rows.size(); ++i) {
          ++estimates;
          const bool converged = conv < 0 || c.number(i, conv) == 1;
          if (!converged) ++unconverged;
          if (converged && std::isfinite(c.number(i, col))) values.push_back(c.number(i, col));
        }
        if (values.empty()) continue;
        first.push_back(values.front());
        largest.push_back(*std::max_element(values.begin(), values.end()));
        last.push_back(values.back());
      }
      if (first.empty()) continue;
      md << "| " << group_label(g) << " | " << g.config.value("batch-size", 0) << " | " << first.size() << " | "
         << estimates << " | " << unconverged << " | " << plain(stats(first)) << " | " << plain(stats(largest)) << " | " << plain(stats(last)) << " |\n";
    }
  }

  // ---- plots: accuracy per epoch, one plot per batch size, mean over seeds
  md << "\n## Plots\n\n";
  for (auto b : batches) {
    std::vector<const Group*> in;
    for (const auto& g : groups)
      if (g.config.value("batch-size", 0) == b) in.push_back(&g);
    size_t epochs = 0;
    for (const Group* g : in)
      for (const Run* r : g->runs) epochs = std::max(epochs, r->metrics.rows.size());
    std::string csv = "epoch";
    for (size_t i = 0; i < in.size(); ++i) csv += ",config" + std::to_string(i);
    csv += "\n";
    for (size_t e = 0; e < epochs; ++e) {
      csv += std::to_string(e + 1);
      for (const Group* g : in) {
        std::vector<double> v;
        for (const Run* r : g->runs)
          v.push_back(e < r->metrics.rows.size() ? r->metrics.number(e, r->metrics.column("test_top1")) : NAN);
        const Stats s = stats(v);
        csv += "," + (s.n ? format("%.6f", s.mean) : std::string("NaN"));
      }
      csv += "\n";
    }
    const std::string base = "accuracy_b" + std::to_string(b);
    write_atomically(assets / (base + ".csv"), csv);
    made.push_back((assets / (base + ".csv")).string());
    // Pre-training runs are read by their linear evaluation: its epochs are the head's, not the backbone's.
    bool evaluated = false, linear_eval_alone = false;
    for (const Group* g : in)
      for (const Run* r : g->runs) {
        evaluated = evaluated || r->linear_eval;
        linear_eval_alone = linear_eval_alone || is_linear_eval_alone(r->config);
      }
    const std::string what =
        evaluated || linear_eval_alone ? "linear-evaluation test top-1 per epoch of the head" : "test top-1 per epoch";
    // One line per configuration of this batch size: column i + 2 of the CSV file, titled by its configuration.
    auto per_configuration = [&](const std::string& csv_file) {
      std::string lines;
      for (size_t i = 0; i < in.size(); ++i)
        lines += (i ? ", \\\n     " : "") + quote(csv_file) + " using 1:" + std::to_string(i + 2) +
                 " every ::1 with linespoints" + series_style(i) + " title " + quote(group_label(*in[i]));
      return lines + "\n";
    };
    const std::string gp = header_lines(base + ".png", what + ", batch " + std::to_string(b) + " (mean over seeds)") +
                           "set xlabel 'epoch'\nset ylabel 'test top-1'\nplot " + per_configuration(base + ".csv");
    if (render(assets / (base + ".gp"), gp, made))
      md << "![" << what << ", B = " << b << "](report/" << base << ".png)\n\n";

    // The pre-training's own curve: its loss per epoch (Barlow Twins), mean over seeds, log scale.
    if (evaluated) {
      size_t pre_epochs = 0;
      for (const Group* g : in)
        for (const Run* r : g->runs) pre_epochs = std::max(pre_epochs, r->pretrain_metrics.rows.size());
      std::string loss_csv = "epoch";
      for (size_t i = 0; i < in.size(); ++i) loss_csv += ",config" + std::to_string(i);
      loss_csv += "\n";
      for (size_t e = 0; e < pre_epochs; ++e) {
        loss_csv += std::to_string(e + 1);
        for (size_t i = 0; i < in.size(); ++i) {
          std::vector<double> v;
          for (const Run* r : in[i]->runs) {
            if (!r->linear_eval) continue;
            const Csv& c = r->pretrain_metrics;
            const int col = c.column("train_loss");
            v.push_back(col >= 0 && e < c.rows.size() ? c.number(e, col) : NAN);
          }
          const Stats st = stats(v);
          loss_csv += "," + (st.n && std::isfinite(st.mean) ? format("%.6f", st.mean) : std::string("NaN"));
        }
        loss_csv += "\n";
      }
      const std::string lbase = "pretrain_loss_b" + std::to_string(b);
      write_atomically(assets / (lbase + ".csv"), loss_csv);
      made.push_back((assets / (lbase + ".csv")).string());
      const std::string lgp = header_lines(lbase + ".png", "pre-training loss per epoch, batch " + std::to_string(b) +
                                                               " (mean over seeds)") +
                              "set xlabel 'pre-training epoch'\nset ylabel 'training loss (log scale)'\n"
                              "set logscale y\nplot " + per_configuration(lbase + ".csv");
      if (render(assets / (lbase + ".gp"), lgp, made))
        md << "![pre-training loss per epoch, B = " << b << "](report/" << lbase << ".png)\n\n";
    }

    // lr_t and phi_t of every configuration (first seed): per step from telemetry.csv, else per epoch from
    // metrics.csv. Warm-up + cosine against TVLARS's constant lr and decaying phi.
    const std::string sbase = "schedules_b" + std::to_string(b);
    std::string lr_plot, phi_plot;
    for (size_t i = 0; i < in.size(); ++i) {
      const Run& r = *in[i]->runs.front();
      std::string data = "step,lr,phi\n";
      if (r.has_telemetry) {
        const Csv t = read_csv(r.dir / "telemetry.csv");
        const int c_step = t.column("step"), c_lr = t.column("lr"), c_phi = t.column("phi");
        std::set<std::string> seen;
        for (const auto& row : t.rows)
          if (c_phi >= 0 && c_phi < static_cast<int>(row.size()) && seen.insert(row[c_step]).second)
            data += row[c_step] + "," + row[c_lr] + "," + row[c_phi] + "\n";
      } else {
        const Csv& m = r.metrics;
        const int c_step = m.column("step"), c_lr = m.column("lr"), c_phi = m.column("phi");
        for (const auto& row : m.rows)
          if (c_phi >= 0 && c_phi < static_cast<int>(row.size()))
            data += row[c_step] + "," + row[c_lr] + "," + row[c_phi] + "\n";
      }
      const std::string file = sbase + "_config" + std::to_string(i) + ".csv";
      write_atomically(assets / file, data);
      made.push_back((assets / file).string());
      const std::string style = r.has_telemetry ? " with lines" : " with linespoints";
      lr_plot += (i ? ", \\\n     " : "") + quote(file) + " using 1:2 every ::1" + style + series_style(i) +
                 " title " + quote(group_label(*in[i]));
      phi_plot += (i ? ", \\\n     " : "") + quote(file) + " using 1:3 every ::1" + style + series_style(i) +
                  " title " + quote(group_label(*in[i]));
    }
    std::string sg = "set datafile separator ','\nset terminal pngcairo size 1100,800 noenhanced\nset output " +
                     quote(sbase + ".png") + "\nset multiplot layout 2,1 title " +
                     quote("learning rate lr_t and TVLARS factor phi_t, batch " + std::to_string(b) +
                           " (per step with telemetry, else per epoch)") +
                     "\nset grid\nset key outside right font ',8'\nset offsets 0, 0, graph 0.05, 0\n"
                     "set ylabel 'lr_t (log scale)'\nset logscale y\nplot " + lr_plot +
                     "\nunset logscale y\nset xlabel 'step'\nset ylabel 'phi_t'\nplot " + phi_plot + "\nunset multiplot\n";
    if (render(assets / (sbase + ".gp"), sg, made))
      md << "![lr and phi, B = " << b << "](report/" << sbase << ".png)\n\n";
  }

  // ---- per configuration (its first seed's run): schedule, trust ratios, norms, sharpness
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& g = groups[gi];
    const Run& r = *g.runs.front();
    if (!r.has_telemetry && !r.has_sharpness) continue;
    const std::string base = "config" + std::to_string(gi) + "_" + slug(r.name);
    md << "### " << group_label(g) << ", B = " << g.config.value("batch-size", 0) << " (run " << r.name << ")\n\n";
    if (r.has_telemetry) {
      const Csv t = read_csv(r.dir / "telemetry.csv");
      const int c_step = t.column("step"), c_layer = t.column("layer"), c_ratio = t.column("trust_ratio"),
                c_w = t.column("weight_norm"), c_g = t.column("grad_norm"), c_lr = t.column("lr"), c_phi = t.column("phi");
      std::vector<std::string> layers;
      std::map<std::string, size_t> layer_index;
      std::vector<std::string> steps;
      std::map<std::string, size_t> step_index;
      for (const auto& row : t.rows) {
        if (static_cast<int>(row.size()) <= std::max({c_step, c_layer, c_ratio})) continue;
        if (!layer_index.count(row[c_layer])) {
          layer_index[row[c_layer]] = layers.size();
          layers.push_back(row[c_layer]);
        }
        if (!step_index.count(row[c_step])) {
          step_index[row[c_step]] = steps.size();
          steps.push_back(row[c_step]);
        }
      }
      // Long form: one row per (step, layer) with the layer's index, for heat map and lines alike.
      std::string data = "step,layer_index,trust_ratio,weight_norm,grad_norm\n", schedule = "step,lr,phi\n";
      std::set<std::string> scheduled;
      for (size_t i = 0; i < t.rows.size(); ++i) {
        const auto& row = t.rows[i];
        if (static_cast<int>(row.size()) <= std::max({c_step, c_layer, c_ratio})) continue;
        data += row[c_step] + "," + std::to_string(layer_index[row[c_layer]]) + "," + row[c_ratio] + "," +
                (c_w >= 0 ? row[c_w] : "NaN") + "," + (c_g >= 0 && c_g < static_cast<int>(row.size()) ? row[c_g] : "NaN") + "\n";
        if (c_lr >= 0 && c_phi >= 0 && scheduled.insert(row[c_step]).second)
          schedule += row[c_step] + "," + row[c_lr] + "," + row[c_phi] + "\n";
      }
      write_atomically(assets / (base + "_layers.csv"), data);
      write_atomically(assets / (base + "_schedule.csv"), schedule);
      made.push_back((assets / (base + "_layers.csv")).string());
      made.push_back((assets / (base + "_schedule.csv")).string());
      std::string ytics;
      for (size_t i = 0; i < layers.size(); ++i) ytics += (i ? ", " : "") + quote(layers[i]) + " " + std::to_string(i);
      // Cells as wide as the telemetry interval (the smallest gap between logged steps), so the map is filled.
      double cell_half_width = 0.5;
      {
        std::vector<double> at;
        for (const auto& st : steps) at.push_back(std::atof(st.c_str()));
        std::sort(at.begin(), at.end());
        double gap = 0;
        for (size_t i = 1; i < at.size(); ++i)
          if (at[i] > at[i - 1] && (gap == 0 || at[i] - at[i - 1] < gap)) gap = at[i] - at[i - 1];
        if (gap > 0) cell_half_width = gap / 2;
      }
      // Heat map: layer x step, colour = log10 trust ratio.
      std::string gp = header_lines(base + "_lnr_heatmap.png", "log10 trust ratio (LNR, incl. phi_t): " + group_label(g), 1100,
                                    std::max(400, 120 + 22 * static_cast<int>(layers.size()))) +
                       "set xlabel 'step'\nset ytics (" + ytics + ") font ',7'\nset yrange [-0.5:" +
                       std::to_string(layers.size()) + "-0.5]\nset cblabel 'log10 r'\nset palette rgb 33,13,10\n"
                       "unset key\nset autoscale xfix\nset style fill solid noborder\nplot " + quote(base + "_layers.csv") +
                       " using 1:2:(" + std::to_string(cell_half_width) +
                       "):(0.5):(log10($3)) every ::1 with boxxyerror lc palette\n";
      if (render(assets / (base + "_lnr_heatmap.gp"), gp, made))
        md << "![LNR heat map](report/" << base << "_lnr_heatmap.png)\n\n";
      // Wide form for the line plots: one row per step, (r, |w|, |g|) of layer i in columns 2 + 3i .. 4 + 3i
      // (gnuplot draws a line only between consecutive valid rows, so the long form cannot be filtered).
      std::map<std::string, std::vector<std::string>> wide;
      for (const auto& row : t.rows) {
        if (static_cast<int>(row.size()) <= std::max({c_step, c_layer, c_ratio})) continue;
        auto& cells = wide[row[c_step]];
        if (cells.empty()) cells.assign(3 * layers.size(), "NaN");
        const size_t i = layer_index[row[c_layer]];
        cells[3 * i] = row[c_ratio];
        if (c_w >= 0 && c_w < static_cast<int>(row.size())) cells[3 * i + 1] = row[c_w];
        if (c_g >= 0 && c_g < static_cast<int>(row.size())) cells[3 * i + 2] = row[c_g];
      }
      std::string wide_csv = "step";
      for (const auto& l : layers) wide_csv += "," + l + " r," + l + " |w|," + l + " |g|";
      wide_csv += "\n";
      for (const auto& st : steps) {
        wide_csv += st;
        for (const auto& c : wide[st]) wide_csv += "," + c;
        wide_csv += "\n";
      }
      write_atomically(assets / (base + "_layers_wide.csv"), wide_csv);
      made.push_back((assets / (base + "_layers_wide.csv")).string());
      auto per_layer = [&](const std::string& name, const std::string& title, const std::string& ylabel, int offset) {
        std::string s = header_lines(base + "_" + name + ".png", title + ": " + group_label(g)) +
                        "set xlabel 'step'\nset ylabel " + quote(ylabel) + "\nset logscale y\nplot ";
        for (size_t i = 0; i < layers.size(); ++i)
          s += (i ? ", \\\n     " : "") + quote(base + "_layers_wide.csv") + " using 1:" +
               std::to_string(2 + 3 * i + offset) + " every ::1 with lines" + series_style(i) + " title " + quote(layers[i]);
        s += "\n";
        if (render(assets / (base + "_" + name + ".gp"), s, made))
          md << "![" << title << "](report/" << base << "_" << name << ".png)\n\n";
      };
      per_layer("lnr_lines", "trust ratio per layer", "trust ratio", 0);
      per_layer("weight_norms", "weight norm |w| per layer", "|w|", 1);
      if (c_g >= 0) per_layer("grad_norms", "gradient norm |g| per layer", "|g|", 2);
      std::string sg = header_lines(base + "_schedule.png", "lr_t and phi_t per step: " + group_label(g)) +
                       "set xlabel 'step'\nset ylabel 'lr_t'\nset y2label 'phi_t'\nset y2tics\nset ytics nomirror\n"
                       "plot " + quote(base + "_schedule.csv") + " using 1:2 every ::1 with lines title 'lr_t', \\\n     " +
                       quote(base + "_schedule.csv") + " using 1:3 every ::1 axes x1y2 with lines title 'phi_t'\n";
      if (render(assets / (base + "_schedule.gp"), sg, made))
        md << "![lr and phi](report/" << base << "_schedule.png)\n\n";
    }
    if (r.has_sharpness) {
      const std::string sharp = fs::relative(r.dir / "sharpness.csv", assets).string();
      const std::string metrics = fs::relative(r.dir / "metrics.csv", assets).string();
      std::string gp = header_lines(base + "_sharpness.png", "sharpness and test top-1: " + group_label(g)) +
                       "set xlabel 'step'\nset ylabel 'top Hessian eigenvalue'\nset y2label 'test top-1'\nset y2tics\n"
                       "set ytics nomirror\nplot " + quote(sharp) +
                       " using 1:($5 == 1 ? $3 : 1/0) every ::1 with linespoints pt 7 title 'sharpness', \\\n     " +
                       quote(sharp) + " using 1:($5 == 1 ? 1/0 : $3) every ::1 with points pt 6 ps 2 lc rgb 'red' "
                       "title 'not converged (left out of the table)', \\\n     " +
                       quote(metrics) + " using 2:8 every ::1 axes x1y2 with linespoints title 'test top-1'\n";
      if (render(assets / (base + "_sharpness.gp"), gp, made))
        md << "![sharpness](report/" << base << "_sharpness.png)\n\n";
    }
  }
  if (!gnuplot_available()) md << "(gnuplot is not installed: the scripts are in report/, the PNGs are missing.)\n";
  write_atomically(dir / "report.md", md.str());
  made.insert(made.begin(), (dir / "report.md").string());
  return made;
}

}  // namespace report
}  // namespace largebatch
