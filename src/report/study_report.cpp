// The sections of a study's report: the selection rule applied to the candidates, the chosen settings' test
// results over seeds, paired differences and variants (DIR/study.json, written by `largebatch sweep`).
#include "study_report.h"

#include <largebatch/report/select.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <set>
#include <stdexcept>

namespace largebatch {
namespace report {
namespace detail {

namespace {

using OrderedJson = nlohmann::ordered_json;

[[noreturn]] void bad_study(const fs::path& file, const std::string& what) {
  throw std::invalid_argument(file.string() + ": " + what);
}

Values values_of(const fs::path& file, const std::string& field, const OrderedJson& v) {
  if (!v.is_object()) bad_study(file, field + " must be an object of axis: value");
  Values out;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!it.value().is_string()) bad_study(file, field + "." + it.key() + " must be a string");
    out.emplace_back(it.key(), it.value().get<std::string>());
  }
  return out;
}

std::string value_of(const Values& values, const std::string& axis) {
  for (const auto& [a, v] : values)
    if (a == axis) return v;
  return "";
}

std::string joined(const Values& values, const std::string& skip = "") {
  std::string out;
  for (const auto& [a, v] : values)
    if (a != skip) out += (out.empty() ? "" : ", ") + a + " " + v;
  return out;
}

std::string metric_words(const std::string& by) {
  if (by == "final_val_top1") return "final validation top-1 (the last epoch's, on the images held out by --val-split)";
  if (by == "best_val_top1") return "best validation top-1 over the epochs (held-out images of --val-split)";
  return "lowest final validation loss (held-out images of --val-split)";
}

std::string metric_text(double v, const std::string& by) {
  if (!std::isfinite(v)) return "–";
  return lower_is_better(by) ? format("%.4f", v) : format("%.2f", 100 * v);
}

double final_test(const Run* r) {
  const Csv& m = r->metrics;
  return m.rows.empty() ? NAN : m.number(m.rows.size() - 1, m.column("test_top1"));
}

std::string signed_points(double v) { return (v >= 0 ? "+" : "") + format("%.2f", v); }

}  // namespace

bool read_study(const fs::path& dir, StudyPlan& plan) {
  const fs::path file = dir / "study.json";
  if (!fs::exists(file)) return false;
  OrderedJson j;
  try {
    j = OrderedJson::parse(read_text(file));
  } catch (const std::exception&) {
    bad_study(file, "not valid JSON");
  }
  if (!j.is_object() || j.value("format", "") != "lbt-study-1") bad_study(file, "\"format\" is not lbt-study-1");
  try {
    plan.grid = j.at("grid").get<std::string>();
    plan.linear_eval = j.value("linear_eval", false);
    const auto& s = j.at("select");
    plan.by = s.at("by").get<std::string>();
    if (plan.by != "final_val_top1" && plan.by != "best_val_top1" && plan.by != "final_val_loss")
      bad_study(file, "select.by '" + plan.by + "' is not a rule this report knows");
    plan.within = s.at("within").get<std::vector<std::string>>();
    if (plan.within.empty()) bad_study(file, "select.within is empty");
    if (s.contains("extend")) {
      plan.extend_axis = s["extend"].at("axis").get<std::string>();
      plan.extend_factor = s["extend"].at("factor").get<double>();
      plan.extend_times = s["extend"].at("times").get<int>();
    }
    for (const auto& pair : s.value("compare", OrderedJson::array()))
      plan.compare.emplace_back(pair.at(0).get<std::string>(), pair.at(1).get<std::string>());
    for (const auto& c : j.at("cells")) {
      StudyCell cell;
      cell.cell = c.at("cell").get<std::string>();
      const Values values = values_of(file, "cells[].values", c.at("values"));
      for (const auto& axis : plan.within) cell.values.emplace_back(axis, value_of(values, axis));
      for (const auto& cand : c.at("candidates")) {
        cell.candidates.push_back(cand.at("run").get<std::string>());
        cell.over.push_back(values_of(file, "cells[].candidates[].over", cand.at("over")));
        cell.extended.push_back(cand.value("extended", false));
      }
      plan.cells.push_back(std::move(cell));
    }
    for (const auto& f : j.at("follow_ups"))
      plan.follow_ups.push_back({f.at("run").get<std::string>(), f.at("from").get<std::string>(),
                                 values_of(file, "follow_ups[].values", f.at("values"))});
  } catch (const nlohmann::json::exception& e) {
    bad_study(file, std::string("missing or mistyped field (") + e.what() + ")");
  }
  return true;
}

void write_study_sections(const StudyPlan& plan, const fs::path& dir, const std::vector<const Run*>& follow,
                          const fs::path& assets, std::ostream& md, std::vector<std::string>& made) {
  const std::string& by = plan.by;
  // The rule, applied here to the candidates' own files.
  std::vector<int> chosen(plan.cells.size(), -1);
  std::vector<bool> decided(plan.cells.size(), true);
  std::vector<std::vector<double>> metrics(plan.cells.size());
  std::vector<std::vector<std::string>> states(plan.cells.size());
  std::map<std::string, size_t> cell_of_candidate;
  for (size_t c = 0; c < plan.cells.size(); ++c) {
    for (const auto& cand : plan.cells[c].candidates) {
      const std::string run_dir = (dir / cand).string();
      cell_of_candidate[cand] = c;
      states[c].push_back(finished_state(run_dir, plan.linear_eval));
      metrics[c].push_back(selection_metric(run_dir, by));
      if (states[c].back().empty()) decided[c] = false;
    }
    if (decided[c]) chosen[c] = choose(metrics[c], by);
  }
  // Every follow-up on disk must come from the candidate the rule chooses now.
  for (const auto& f : plan.follow_ups) {
    if (!fs::exists(dir / f.run)) continue;
    const auto c = cell_of_candidate.find(f.from);
    if (c == cell_of_candidate.end())
      bad_study(dir / "study.json", "follow-up " + f.run + " comes from " + f.from + ", which is no candidate");
    const int pick = chosen[c->second];
    if (pick < 0 || plan.cells[c->second].candidates[pick] != f.from)
      bad_study(dir / "study.json",
                "follow-up " + f.run + " was made from " + f.from + ", but the rule applied to the candidates' files "
                    "chooses " + (pick < 0 ? std::string("none") : plan.cells[c->second].candidates[pick]) +
                    " (files changed since the sweep?)");
  }
  std::map<std::string, const Run*> run_named;
  for (const Run* r : follow) run_named[r->name] = r;

  size_t finished_candidates = 0, all_candidates = 0;
  for (const auto& s : states)
    for (const auto& x : s) {
      ++all_candidates;
      finished_candidates += x.empty() ? 0 : 1;
    }
  std::string cell_words;
  for (const auto& w : plan.within) cell_words += (cell_words.empty() ? "" : " × ") + w;
  md << "## Selection\n\n"
     << "The rule, from the grid file `" << plan.grid << "` (written before any run): in each cell (" << cell_words
     << ") the candidate with the " << (lower_is_better(by) ? "" : "highest ") << metric_words(by)
     << "; on a tie the first in grid order; a diverged candidate is never chosen.";
  if (!plan.extend_axis.empty())
    md << " Where that candidate's " << plan.extend_axis << " is the smallest (largest) among the candidates that "
       << "share its other values, the sweep first adds a candidate at " << plan.extend_axis << " / "
       << format("%g", plan.extend_factor) << " (x " << format("%g", plan.extend_factor) << "), up to "
       << plan.extend_times << " per direction and cell, and the rule is applied again (candidates marked *added*).";
  md << " The chosen candidate's settings "
        "are then run again with the follow-up seeds (and variants). This report applies the rule to the candidates' "
        "own files and checks that every follow-up comes from the candidate it chooses. The candidates' test "
        "accuracy is not shown anywhere: test results below are those of the follow-up runs only.\n\n"
     << all_candidates << " candidates in " << plan.cells.size() << " cells, " << finished_candidates << " finished; "
     << plan.follow_ups.size() << " follow-up runs planned, " << follow.size() << " finished.\n\n";

  // ---- every candidate's validation result
  md << "### Candidates\n\n| cell | candidate | " << (lower_is_better(by) ? "final val loss" : "val top-1 %")
     << " | |\n|---|---|---|---|\n";
  std::vector<std::string> edges;
  for (size_t c = 0; c < plan.cells.size(); ++c) {
    const auto& cell = plan.cells[c];
    for (size_t k = 0; k < cell.candidates.size(); ++k) {
      const std::string state = states[c][k];
      const std::string mark = !decided[c] && state.empty() ? "unfinished"
                               : state == "diverged"        ? "diverged"
                               : static_cast<int>(k) == chosen[c] ? "**chosen**"
                                                                  : "";
      md << "| " << (k == 0 ? joined(cell.values) : "") << " | " << joined(cell.over[k])
         << (cell.extended[k] ? " *added*" : "") << " | "
         << metric_text(metrics[c][k], by) << " | " << mark << " |\n";
    }
    if (!decided[c]) continue;
    if (chosen[c] < 0) {
      edges.push_back(joined(cell.values) + ": no candidate finished with a result (all diverged)");
      continue;
    }
    // A choice at either end of a grid of three or more values may lie beyond the grid: said, not hidden.
    for (const auto& [axis, value] : cell.over[chosen[c]]) {
      std::vector<std::string> seen;
      for (const auto& o : cell.over) {
        const std::string v = value_of(o, axis);
        if (std::find(seen.begin(), seen.end(), v) == seen.end()) seen.push_back(v);
      }
      // Numbers by size (a grid extended by the sweep lists its additions last), other values in grid order.
      const bool numeric = std::all_of(seen.begin(), seen.end(), [](const std::string& t) {
        char* end = nullptr;
        std::strtod(t.c_str(), &end);
        return !t.empty() && *end == '\0';
      });
      if (numeric)
        std::sort(seen.begin(), seen.end(),
                  [](const std::string& a, const std::string& b) { return std::atof(a.c_str()) < std::atof(b.c_str()); });
      if (seen.size() >= 3 && (value == seen.front() || value == seen.back()))
        edges.push_back(joined(cell.values) + ": " + axis + " " + value + " is the " +
                        (value == seen.front() ? (numeric ? "smallest" : "first") : (numeric ? "largest" : "last")) +
                        " of the " + std::to_string(seen.size()) + " values tried");
    }
  }
  if (!edges.empty()) {
    md << "\nChoices at the edge of their grid (the best setting may lie beyond it):\n\n";
    for (const auto& e : edges) md << "- " << e << "\n";
  }

  // ---- the chosen settings over the follow-up seeds, without variants
  const std::string row_axis = plan.within.front();
  std::vector<std::string> rows;  // values of the first within axis, in cell order
  std::vector<std::string> columns;  // the other within axes' values, joined
  auto rest_of = [&](const StudyCell& cell) { return joined(cell.values, row_axis); };
  for (const auto& cell : plan.cells) {
    const std::string r = value_of(cell.values, row_axis), col = rest_of(cell);
    if (std::find(rows.begin(), rows.end(), r) == rows.end()) rows.push_back(r);
    if (std::find(columns.begin(), columns.end(), col) == columns.end()) columns.push_back(col);
  }
  // The follow-ups of each cell by variant (their values other than the seed; "" for the plain seeds).
  struct Result {
    std::map<std::string, double> test_by_seed, val_by_seed;
  };
  std::vector<std::map<std::string, Result>> results(plan.cells.size());
  std::vector<std::string> variants;
  for (const auto& f : plan.follow_ups) {
    const auto c = cell_of_candidate.find(f.from);
    const auto r = run_named.find(f.run);
    if (c == cell_of_candidate.end() || r == run_named.end()) continue;
    const std::string variant = joined(f.values, "seed");
    if (!variant.empty() && std::find(variants.begin(), variants.end(), variant) == variants.end()) variants.push_back(variant);
    const std::string seed = value_of(f.values, "seed");
    const Csv& m = r->second->metrics;
    results[c->second][variant].test_by_seed[seed] = final_test(r->second);
    results[c->second][variant].val_by_seed[seed] =
        m.rows.empty() ? NAN : m.number(m.rows.size() - 1, m.column("val_top1"));
  }
  auto cell_at = [&](const std::string& row, const std::string& col) -> int {
    for (size_t c = 0; c < plan.cells.size(); ++c)
      if (value_of(plan.cells[c].values, row_axis) == row && rest_of(plan.cells[c]) == col) return static_cast<int>(c);
    return -1;
  };
  auto seeds_stats = [](const std::map<std::string, double>& by_seed) {
    std::vector<double> v;
    for (const auto& kv : by_seed) v.push_back(kv.second);
    return stats(v);
  };
  md << "\n### Chosen settings: final test top-1 %\n\nMean ± sample standard deviation over the follow-up seeds "
        "(n each); in brackets the values the rule chose.\n\n| " << row_axis << " |";
  for (const auto& col : columns) md << " " << col << " |";
  md << "\n|---|";
  for (size_t i = 0; i < columns.size(); ++i) md << "---|";
  md << "\n";
  for (const auto& row : rows) {
    md << "| " << row << " |";
    for (const auto& col : columns) {
      const int c = cell_at(row, col);
      if (c < 0) {
        md << " |";
        continue;
      }
      if (!decided[c] || chosen[c] < 0) {
        md << " " << (decided[c] ? "all diverged" : "undecided") << " |";
        continue;
      }
      const auto it = results[c].find("");
      const Stats s = it == results[c].end() ? Stats{} : seeds_stats(it->second.test_by_seed);
      md << " " << percent(s) << " (n " << s.n << ") [" << joined(plan.cells[c].over[chosen[c]]) << "] |";
    }
    md << "\n";
  }
  md << "\n| cell | chosen | " << (lower_is_better(by) ? "tuning val loss" : "tuning val top-1 %")
     << " | seeds | follow-up val top-1 % | follow-up test top-1 % |\n|---|---|---|---|---|---|\n";
  for (size_t c = 0; c < plan.cells.size(); ++c) {
    if (!decided[c] || chosen[c] < 0) continue;
    const auto it = results[c].find("");
    const Stats t = it == results[c].end() ? Stats{} : seeds_stats(it->second.test_by_seed);
    const Stats v = it == results[c].end() ? Stats{} : seeds_stats(it->second.val_by_seed);
    std::string seeds;
    if (it != results[c].end())
      for (const auto& kv : it->second.test_by_seed) seeds += (seeds.empty() ? "" : ", ") + kv.first;
    md << "| " << joined(plan.cells[c].values) << " | " << joined(plan.cells[c].over[chosen[c]]) << " | "
       << metric_text(metrics[c][chosen[c]], by) << " | " << (seeds.empty() ? "–" : seeds) << " | " << percent(v)
       << " | " << percent(t) << " |\n";
  }

  // A − B in percentage points over the seeds both have (finite results only).
  struct Paired {
    std::vector<double> diffs, b_values;
    std::string seeds, per_seed;
    int ahead = 0;
  };
  auto paired = [](const std::map<std::string, double>& a, const std::map<std::string, double>& b) {
    Paired p;
    for (const auto& entry : a) {
      const auto other = b.find(entry.first);
      if (other == b.end() || !std::isfinite(entry.second) || !std::isfinite(other->second)) continue;
      const double d = 100 * (entry.second - other->second);
      p.diffs.push_back(d);
      p.b_values.push_back(other->second);
      p.ahead += d > 0 ? 1 : 0;
      p.seeds += (p.seeds.empty() ? "" : ", ") + entry.first;
      p.per_seed += (p.per_seed.empty() ? "" : ", ") + signed_points(d);
    }
    return p;
  };
  auto mean_std_points = [](const Stats& s) {
    return signed_points(s.mean) + (s.n > 1 ? " ± " + format("%.2f", s.std) : "");
  };

  // ---- variants of the chosen settings (e.g. other initialisations), beside the plain follow-ups, each also
  // against the plain follow-ups of the same seeds (an ablation compares like with like)
  if (!variants.empty()) {
    md << "\n### Variants of the chosen settings: final test top-1 %\n\nEach variant also against the chosen settings "
          "run with the same seeds: their test top-1 on those seeds, the difference per seed (percentage points), its "
          "mean ± sample std, and in how many seeds the variant is ahead.\n\n"
          "| cell | variant | seeds | test top-1 % | as chosen, same seeds % | variant − as chosen per seed | mean ± std "
          "| variant ahead |\n|---|---|---|---|---|---|---|---|\n";
    for (size_t c = 0; c < plan.cells.size(); ++c) {
      bool any = false;
      for (const auto& v : variants) any = any || results[c].count(v);
      if (!any) continue;
      std::vector<std::string> keys{""};
      keys.insert(keys.end(), variants.begin(), variants.end());
      for (const auto& v : keys) {
        const auto it = results[c].find(v);
        if (it == results[c].end()) continue;
        std::string seeds;
        for (const auto& kv : it->second.test_by_seed) seeds += (seeds.empty() ? "" : ", ") + kv.first;
        md << "| " << joined(plan.cells[c].values) << " | " << (v.empty() ? "as chosen" : v) << " | " << seeds << " | "
           << percent(seeds_stats(it->second.test_by_seed)) << " |";
        const auto plain = results[c].find("");
        const Paired p = v.empty() || plain == results[c].end() ? Paired{}
                                                                : paired(it->second.test_by_seed, plain->second.test_by_seed);
        if (p.diffs.empty()) {
          md << " – | – | – | – |\n";
          continue;
        }
        const Stats d = stats(p.diffs);
        md << " " << percent(stats(p.b_values)) << " | " << p.per_seed << " | " << mean_std_points(d) << " | "
           << p.ahead << " of " << d.n << " |\n";
      }
    }
  }

  // ---- paired differences: the same seed (same initialisation draw and data order) under two settings
  if (!plan.compare.empty()) {
    md << "\n### Paired differences of final test top-1 (percentage points)\n\nA − B per seed they share (same "
          "seed: same initial weights' draw and data order), mean ± sample std over those seeds, and in how many "
          "A is ahead.\n\n| A − B | cell | variant | seeds | per seed | mean ± std | A ahead |\n"
          "|---|---|---|---|---|---|---|\n";
    std::vector<std::string> keys{""};
    keys.insert(keys.end(), variants.begin(), variants.end());
    for (const auto& [a, b] : plan.compare)
      for (const auto& col : columns)
        for (const auto& v : keys) {
          const int ca = cell_at(a, col), cb = cell_at(b, col);
          if (ca < 0 || cb < 0) continue;
          const auto ra = results[ca].find(v), rb = results[cb].find(v);
          if (ra == results[ca].end() || rb == results[cb].end()) continue;
          const Paired p = paired(ra->second.test_by_seed, rb->second.test_by_seed);
          if (p.diffs.empty()) continue;
          const Stats s = stats(p.diffs);
          md << "| " << a << " − " << b << " | " << col << " | " << (v.empty() ? "as chosen" : v) << " | " << p.seeds
             << " | " << p.per_seed << " | " << mean_std_points(s) << " | " << p.ahead << " of " << s.n << " |\n";
        }
  }

  // ---- tuning curves: the rule's metric against the learning rate, one plot per column (e.g. batch size)
  bool has_lr = false;
  for (const auto& cell : plan.cells)
    for (const auto& o : cell.over) has_lr = has_lr || !value_of(o, "lr").empty();
  if (!has_lr || lower_is_better(by)) return;
  md << "\n";
  for (size_t col = 0; col < columns.size(); ++col) {
    // One series per cell and combination of its other tuned values (e.g. TVLARS's lambda).
    std::vector<std::pair<std::string, std::vector<std::pair<double, double>>>> series;
    for (size_t c = 0; c < plan.cells.size(); ++c) {
      if (rest_of(plan.cells[c]) != columns[col]) continue;
      for (size_t k = 0; k < plan.cells[c].candidates.size(); ++k) {
        const std::string lr = value_of(plan.cells[c].over[k], "lr");
        if (lr.empty()) continue;
        const std::string others = joined(plan.cells[c].over[k], "lr");
        const std::string title = value_of(plan.cells[c].values, row_axis) + (others.empty() ? "" : " " + others);
        auto s = std::find_if(series.begin(), series.end(), [&](const auto& x) { return x.first == title; });
        if (s == series.end()) {
          series.push_back({title, {}});
          s = series.end() - 1;
        }
        s->second.emplace_back(std::atof(lr.c_str()), metrics[c][k]);
      }
    }
    if (series.empty()) continue;
    const std::string base = "tuning_" + std::to_string(col);
    const bool one_column = columns[col].empty();  // a grid without a second axis: no ", batch-size ..." suffix
    const std::string title = "candidates' " + by + " against lr" + (one_column ? "" : ": " + columns[col]);
    std::string gp = header_lines(base + ".png", title) +
                     "set xlabel 'lr (log scale)'\nset logscale x\nset ylabel " + quote(by) + "\nplot ";
    for (size_t i = 0; i < series.size(); ++i) {
      std::string csv = "lr,metric\n";
      auto points = series[i].second;
      std::sort(points.begin(), points.end());
      for (const auto& [x, y] : points) csv += format("%.6g", x) + "," + (std::isfinite(y) ? format("%.6f", y) : "NaN") + "\n";
      const std::string file = base + "_series" + std::to_string(i) + ".csv";
      write_atomically(assets / file, csv);
      made.push_back((assets / file).string());
      gp += (i ? ", \\\n     " : "") + quote(file) + " using 1:2 every ::1 with linespoints" + series_style(i) +
            " title " + quote(series[i].first);
    }
    gp += "\n";
    if (render(assets / (base + ".gp"), gp, made))
      md << "![candidates' " << by << " against lr" << (one_column ? "" : ", " + columns[col]) << "](report/" << base
         << ".png)\n\n";
  }
}

}  // namespace detail
}  // namespace report
}  // namespace largebatch
