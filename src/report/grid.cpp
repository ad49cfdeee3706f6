// Grid files of `largebatch sweep`: JSON (nlohmann, key order kept) or TOML (toml++, turned into the same JSON),
// expanded into runs; a "select" block makes them candidates with follow-ups.
#include <largebatch/report/sweep.h>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace largebatch {
namespace report {

namespace {

using Json = nlohmann::ordered_json;

struct Axis;

struct AxisValue {
  std::string label;  // in folder names
  std::string value;  // as written: an object's label, else the value's text (what `where` matches)
  Settings settings;
  std::vector<Axis> axes;  // an object value's own axes: they vary right after it, for its runs only
};

struct Axis {
  std::string name;
  std::vector<AxisValue> values;
};

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw std::invalid_argument(path + ": " + what);
}

std::string number_text(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.15g", v);
  return buf;
}

// Options the sweep itself sets for every run.
void check_key(const std::string& path, const std::string& where, const std::string& key) {
  if (key == "out" || key == "resume" || key == "config")
    bad(path, where + ": '" + key + "' is set by the sweep for every run and cannot be given");
  if (key.empty() || key[0] == '-') bad(path, where + ": option names are given without dashes, got '" + key + "'");
}

void scalar(const std::string& path, const std::string& where, const std::string& key, const Json& v, Settings& out) {
  if (v.is_string()) out.emplace_back(key, v.get<std::string>());
  else if (v.is_boolean()) out.emplace_back(key, v.get<bool>() ? "true" : "false");
  else if (v.is_number_integer()) out.emplace_back(key, std::to_string(v.get<int64_t>()));
  else if (v.is_number()) out.emplace_back(key, number_text(v.get<double>()));
  else if (v.is_array()) {
    for (const auto& item : v) {
      if (item.is_array() || item.is_object()) bad(path, where + ": '" + key + "' holds a nested list or object");
      scalar(path, where, key, item, out);
    }
  } else {
    bad(path, where + ": '" + key + "' must be a string, number, boolean or list of them");
  }
}

Settings options_of(const std::string& path, const std::string& where, const Json& v) {
  if (!v.is_object()) bad(path, where + " must be an object of option: value");
  Settings out;
  for (auto f = v.begin(); f != v.end(); ++f) {
    check_key(path, where, f.key());
    scalar(path, where, f.key(), f.value(), out);
  }
  return out;
}

std::string safe_name(const std::string& text) {
  std::string out;
  for (char c : text) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                    c == '-' || c == '=' || c == '+';
    out += ok ? c : '_';
  }
  return out;
}

std::vector<Axis> parse_axes(const std::string& path, const std::string& where, const Json& v, bool nested_allowed) {
  if (!v.is_object()) bad(path, "\"" + where + "\" must be an object of option: [values]");
  std::vector<Axis> axes;
  for (auto a = v.begin(); a != v.end(); ++a) {
    const std::string field = where + "." + a.key();
    Axis axis{a.key(), {}};
    if (!a.value().is_array() || a.value().empty()) bad(path, field + ": must be a non-empty list of values");
    for (const auto& item : a.value()) {
      AxisValue value;
      if (item.is_object()) {
        for (auto f = item.begin(); f != item.end(); ++f) {
          if (f.key() == "label") {
            if (!f.value().is_string()) bad(path, field + ": \"label\" must be a string");
            value.label = safe_name(f.value().get<std::string>());
            value.value = f.value().get<std::string>();
          } else if (f.key() == "axes") {
            if (!nested_allowed) bad(path, field + ": a value here cannot have its own \"axes\"");
            value.axes = parse_axes(path, field + ".axes", f.value(), true);
          } else {
            check_key(path, field, f.key());
            scalar(path, field, f.key(), f.value(), value.settings);
          }
        }
        if (value.settings.empty()) bad(path, field + ": an object value sets no option");
        if (value.label.empty()) {
          for (const auto& kv : value.settings) value.label += (value.label.empty() ? "" : "_") + kv.first + "-" + kv.second;
          value.label = safe_name(value.label);
          value.value = value.label;
        }
      } else {
        if (item.is_array()) bad(path, field + ": a value may not itself be a list; use an object");
        check_key(path, where, a.key());
        scalar(path, field, a.key(), item, value.settings);
        value.value = value.settings.front().second;
        value.label = safe_name(a.key() + "-" + value.value);
      }
      axis.values.push_back(std::move(value));
    }
    axes.push_back(std::move(axis));
  }
  return axes;
}

struct RawGrid {
  std::string command = "train";
  Settings fixed;
  std::vector<Axis> axes;
  Json select, linear_eval;
};

RawGrid parse(const std::string& path, const Json& j) {
  if (!j.is_object()) bad(path, "expected an object with \"axes\" (and \"fixed\", \"command\", \"select\", \"linear-eval\")");
  RawGrid g;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "command") {
      if (!v.is_string()) bad(path, "\"command\" must be a string");
      g.command = v.get<std::string>();
    } else if (key == "fixed") {
      g.fixed = options_of(path, "fixed", v);
    } else if (key == "axes") {
      g.axes = parse_axes(path, "axes", v, true);
    } else if (key == "select") {
      g.select = v;
    } else if (key == "linear-eval") {
      g.linear_eval = v;
    } else {
      bad(path, "unknown key \"" + key + "\" (expected command, fixed, axes, select, linear-eval)");
    }
  }
  return g;
}

Json parse_json(const std::string& path, const std::string& text) {
  try {
    return Json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1e99999
    bad(path, std::string("not valid JSON (") + e.what() + ")");
  }
}

// TOML becomes the JSON it denotes, so one reader handles both.
Json parse_toml(const std::string& path, const std::string& text) {
  toml::table t;
  try {
    t = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << "not valid TOML (line " << e.source().begin.line << ": " << e.description() << ")";
    bad(path, msg.str());
  }
  std::ostringstream json;
  json << toml::json_formatter{t};
  try {
    return Json::parse(json.str());
  } catch (const nlohmann::json::exception&) {
    bad(path, "a TOML value has no JSON form (nan or inf)");
  }
}

// Every combination of `axes` (the first varying slowest; a value's own axes right after it), each extending
// `prefix` (name, settings from axes, choices). `set_by` maps an option to the axis that sets it.
struct Partial {
  std::string name;
  Settings settings;
  std::vector<AxisChoice> choices;
  std::map<std::string, std::string> set_by;
};

void expand(const std::string& path, std::vector<const Axis*> axes, const Partial& prefix, std::vector<Partial>& out,
            size_t limit) {
  if (axes.empty()) {
    if (out.size() >= limit)
      bad(path, "the axes combine into more than " + std::to_string(limit) + " runs, the most a sweep allows");
    out.push_back(prefix);
    return;
  }
  const Axis& axis = *axes.front();
  for (const auto& v : axis.values) {
    Partial p = prefix;
    p.name += (p.name.empty() ? "" : "__") + v.label;
    p.choices.push_back({axis.name, v.label, v.value});
    for (const auto& kv : v.settings) {
      const auto [it, fresh] = p.set_by.emplace(kv.first, axis.name);
      if (!fresh && it->second != axis.name)
        bad(path, "axes " + it->second + " and " + axis.name + " both set '" + kv.first + "'");
    }
    p.settings.insert(p.settings.end(), v.settings.begin(), v.settings.end());
    std::vector<const Axis*> rest;
    for (const auto& sub : v.axes) rest.push_back(&sub);
    rest.insert(rest.end(), axes.begin() + 1, axes.end());
    expand(path, rest, p, out, limit);
  }
}

// `base` without the options `over` sets, then `over`'s settings.
Settings overridden(const Settings& base, const Settings& over) {
  std::set<std::string> keys;
  for (const auto& kv : over) keys.insert(kv.first);
  Settings out;
  for (const auto& kv : base)
    if (!keys.count(kv.first)) out.push_back(kv);
  out.insert(out.end(), over.begin(), over.end());
  return out;
}

void check_folder(const std::string& path, const std::string& name, std::set<std::string>& names) {
  // Folder names stay strict children of the sweep's folder, apart from the report's own folder.
  if (name[0] == '.' || name == "report" || name == "bin")
    bad(path, "run folder name '" + name + "' is not allowed (starts with '.', or is 'report' or 'bin'); change the label");
  if (!names.insert(name).second) bad(path, "two runs would share the folder '" + name + "'; give labels");
}

Selection parse_selection(const std::string& path, const Json& s, const std::vector<Axis>& axes) {
  if (!s.is_object()) bad(path, "\"select\" must be an object with \"within\", \"by\" and \"then\"");
  Selection sel;
  auto axis_named = [&](const std::string& name) -> const Axis* {
    for (const auto& a : axes)
      if (a.name == name) return &a;
    return nullptr;
  };
  for (auto it = s.begin(); it != s.end(); ++it) {
    const std::string& key = it.key();
    const Json& v = it.value();
    if (key == "within") {
      if (!v.is_array() || v.empty()) bad(path, "select.within: must be a non-empty list of axis names");
      for (const auto& w : v) {
        if (!w.is_string() || !axis_named(w.get<std::string>()))
          bad(path, "select.within: " + w.dump() + " is not one of the grid's (top-level) axes");
        sel.within.push_back(w.get<std::string>());
      }
    } else if (key == "by") {
      if (!v.is_string()) bad(path, "select.by must be a string");
      sel.by = v.get<std::string>();
      if (sel.by != "final_val_top1" && sel.by != "best_val_top1" && sel.by != "final_val_loss")
        bad(path, "select.by: '" + sel.by + "' is not final_val_top1, best_val_top1 or final_val_loss");
    } else if (key == "then") {
      if (!v.is_array()) bad(path, "select.then must be a list of blocks {\"where\", \"fixed\", \"axes\"}");
      for (size_t b = 0; b < v.size(); ++b) {
        const std::string field = "select.then[" + std::to_string(b) + "]";
        if (!v[b].is_object()) bad(path, field + " must be an object");
        FollowUp block;
        std::vector<Axis> block_axes;
        for (auto f = v[b].begin(); f != v[b].end(); ++f) {
          if (f.key() == "where") {
            if (!f.value().is_object()) bad(path, field + ".where must be an object of axis: [values]");
            for (auto w = f.value().begin(); w != f.value().end(); ++w) {
              const Axis* a = axis_named(w.key());
              if (!a) bad(path, field + ".where: '" + w.key() + "' is not an axis of the grid");
              std::vector<std::string> accepted;
              const Json list = w.value().is_array() ? w.value() : Json::array({w.value()});
              if (list.empty()) bad(path, field + ".where." + w.key() + ": an empty list matches no run");
              for (const auto& item : list) {
                if (item.is_array() || item.is_object() || item.is_null())
                  bad(path, field + ".where." + w.key() + ": " + item.dump() + " is not a value of that axis");
                Settings text;
                scalar(path, field + ".where", w.key(), item, text);
                const std::string t = text.front().second;
                const bool known = std::any_of(a->values.begin(), a->values.end(),
                                               [&](const AxisValue& x) { return x.value == t || x.label == t; });
                if (!known) bad(path, field + ".where." + w.key() + ": '" + t + "' is not a value of that axis");
                accepted.push_back(t);
              }
              block.where.emplace_back(w.key(), accepted);
            }
          } else if (f.key() == "fixed") {
            block.fixed = options_of(path, field + ".fixed", f.value());
          } else if (f.key() == "axes") {
            block_axes = parse_axes(path, field + ".axes", f.value(), false);
          } else {
            bad(path, field + ": unknown key \"" + f.key() + "\" (expected where, fixed, axes)");
          }
        }
        // Its axes name its runs (a follow-up without one would take the chosen run's own folder).
        if (block_axes.empty()) bad(path, field + ": needs \"axes\" (the seeds or variants it runs)");
        std::vector<const Axis*> ptrs;
        for (const auto& a : block_axes) ptrs.push_back(&a);
        std::vector<Partial> variants;
        expand(path, ptrs, Partial{}, variants, 100000);
        for (auto& p : variants) block.variants.push_back({p.name, overridden(block.fixed, p.settings), p.choices});
        sel.then.push_back(std::move(block));
      }
    } else if (key == "extend") {
      if (!v.is_object()) bad(path, "select.extend must be an object {\"axis\", \"factor\", \"times\"}");
      for (auto f = v.begin(); f != v.end(); ++f) {
        if (f.key() == "axis" && f.value().is_string()) sel.extend_axis = f.value().get<std::string>();
        else if (f.key() == "factor" && f.value().is_number()) sel.extend_factor = f.value().get<double>();
        else if (f.key() == "times" && f.value().is_number_integer()) sel.extend_times = f.value().get<int>();
        else bad(path, "select.extend: '" + f.key() + "' is not axis (text), factor (number) or times (integer)");
      }
      if (sel.extend_axis.empty()) bad(path, "select.extend.axis is missing: the axis whose grid may grow");
      if (!(sel.extend_factor > 1) || !std::isfinite(sel.extend_factor))
        bad(path, "select.extend.factor must be a number > 1");
      if (sel.extend_times < 1 || sel.extend_times > 10) bad(path, "select.extend.times must be 1 to 10");
    } else if (key == "compare") {
      if (!v.is_array()) bad(path, "select.compare must be a list of pairs [\"a\", \"b\"]");
      for (const auto& pair : v) {
        if (!pair.is_array() || pair.size() != 2 || !pair[0].is_string() || !pair[1].is_string())
          bad(path, "select.compare: " + pair.dump() + " is not a pair of two value names");
        sel.compare.emplace_back(pair[0].get<std::string>(), pair[1].get<std::string>());
      }
    } else {
      bad(path, "select: unknown key \"" + key + "\" (expected within, by, then, compare, extend)");
    }
  }
  if (sel.within.empty()) bad(path, "select.within is missing: the axes that define a cell");
  if (!sel.extend_axis.empty() &&
      std::find(sel.within.begin(), sel.within.end(), sel.extend_axis) != sel.within.end())
    bad(path, "select.extend.axis: '" + sel.extend_axis + "' defines the cells; extend an axis chosen over");
  // Pairs name values as written or by their folder label; kept as written (what study.json and reports use).
  for (auto& pair : sel.compare) {
    const Axis* first = axis_named(sel.within.front());
    for (std::string* name : {&pair.first, &pair.second}) {
      const auto v = std::find_if(first->values.begin(), first->values.end(),
                                  [&](const AxisValue& x) { return x.value == *name || x.label == *name; });
      if (v == first->values.end())
        bad(path, "select.compare: '" + *name + "' is not a value of the axis '" + sel.within.front() + "'");
      *name = v->value;
    }
  }
  return sel;
}

bool applies(const FollowUp& block, const PlannedRun& run) {
  for (const auto& where : block.where) {
    const std::string& axis = where.first;
    const std::vector<std::string>& accepted = where.second;
    const auto c = std::find_if(run.choices.begin(), run.choices.end(), [&](const AxisChoice& x) { return x.axis == axis; });
    if (c == run.choices.end()) return false;
    if (std::none_of(accepted.begin(), accepted.end(), [&](const std::string& a) { return a == c->value || a == c->label; }))
      return false;
  }
  return true;
}

}  // namespace

std::string selection_cell(const Selection& selection, const PlannedRun& run) {
  std::string cell;
  for (const auto& axis : selection.within)
    for (const auto& c : run.choices)
      if (c.axis == axis) cell += (cell.empty() ? "" : "__") + c.label;
  return cell;
}

std::vector<PlannedRun> follow_ups(const Selection& selection, const PlannedRun& chosen) {
  std::vector<PlannedRun> runs;
  for (const auto& block : selection.then) {
    if (!applies(block, chosen)) continue;
    for (const auto& v : block.variants) {
      PlannedRun run;
      run.name = chosen.name + "__" + v.name;
      run.settings = overridden(chosen.settings, v.settings);
      run.choices = chosen.choices;
      run.choices.insert(run.choices.end(), v.choices.begin(), v.choices.end());
      runs.push_back(std::move(run));
    }
  }
  return runs;
}

PlannedRun with_extended_value(const Selection& selection, const PlannedRun& run, double value) {
  PlannedRun out = run;
  const std::string text = number_text(value);
  for (auto& kv : out.settings)
    if (kv.first == selection.extend_axis) kv.second = text;
  out.name.clear();
  for (auto& c : out.choices) {
    if (c.axis == selection.extend_axis) {
      c.value = text;
      c.label = safe_name(c.axis + "-" + text);
    }
    out.name += (out.name.empty() ? "" : "__") + c.label;
  }
  return out;
}

SweepGrid read_grid(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument(path + ": cannot read the grid file");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const auto first = text.find_first_not_of(" \t\r\n");
  const RawGrid raw =
      parse(path, first != std::string::npos && text[first] == '{' ? parse_json(path, text) : parse_toml(path, text));
  if (raw.command != "train" && raw.command != "pretrain")
    bad(path, "command '" + raw.command + "' is not train or pretrain");

  // A sweep is planned in memory and run one folder per combination: refuse a grid no one could run (a few
  // axes of many values would exhaust memory).
  constexpr size_t kMaxRuns = 100000;
  std::vector<const Axis*> top;
  for (const auto& a : raw.axes) top.push_back(&a);
  std::vector<Partial> combos;
  expand(path, top, Partial{}, combos, kMaxRuns);

  SweepGrid grid;
  grid.path = path;
  grid.command = raw.command;
  std::set<std::string> names;
  for (auto& p : combos) {
    PlannedRun run;
    run.name = p.name.empty() ? "run" : p.name;
    check_folder(path, run.name, names);
    // An axis overrides a fixed setting of the same option.
    for (const auto& kv : raw.fixed)
      if (!p.set_by.count(kv.first)) run.settings.push_back(kv);
    run.settings.insert(run.settings.end(), p.settings.begin(), p.settings.end());
    run.choices = std::move(p.choices);
    grid.runs.push_back(std::move(run));
  }
  if (!raw.select.is_null()) {
    grid.selects = true;
    grid.selection = parse_selection(path, raw.select, raw.axes);
    for (const auto& run : grid.runs)
      for (const auto& c : run.choices)
        if (c.axis == "seed" && std::find(grid.selection.within.begin(), grid.selection.within.end(), "seed") ==
                                    grid.selection.within.end())
          bad(path, "select: 'seed' is an axis of the candidates, so the rule would choose among seeds; fix the "
                    "candidates' seed in \"fixed\" and give the other seeds in a \"then\" block");
    // The axis that may grow holds plain numbers, set by the axis itself (not an object value).
    if (!grid.selection.extend_axis.empty()) {
      bool found = false;
      for (const auto& run : grid.runs)
        for (const auto& c : run.choices) {
          if (c.axis != grid.selection.extend_axis) continue;
          found = true;
          char* end = nullptr;
          std::strtod(c.value.c_str(), &end);
          const bool plain = std::any_of(run.settings.begin(), run.settings.end(), [&](const auto& kv) {
            return kv.first == c.axis && kv.second == c.value;
          });
          if (c.value.empty() || *end != '\0' || !plain)
            bad(path, "select.extend.axis: run " + run.name + " has " + c.axis + " '" + c.value +
                          "', not a plain number the sweep can scale");
        }
      if (!found) bad(path, "select.extend.axis: no candidate has an axis '" + grid.selection.extend_axis + "'");
    }
    // Every candidate could be chosen: its follow-ups must not collide with any folder, nor repeat the candidate
    // (its test result would be that of the very run the rule chose).
    for (const auto& run : grid.runs)
      for (const auto& f : follow_ups(grid.selection, run)) {
        check_folder(path, f.name, names);
        Settings a = f.settings, b = run.settings;
        std::sort(a.begin(), a.end());
        std::sort(b.begin(), b.end());
        if (a == b)
          bad(path, "select.then: follow-up " + f.name + " repeats candidate " + run.name +
                        " with its own settings and seed; give the follow-ups other seeds than the candidates'");
      }
  }
  if (!raw.linear_eval.is_null()) {
    if (raw.command != "pretrain") bad(path, "\"linear-eval\" follows pre-training: it needs \"command\": \"pretrain\"");
    grid.linear_eval = true;
    grid.linear_eval_settings = options_of(path, "linear-eval", raw.linear_eval);
    for (const auto& kv : grid.linear_eval_settings)
      if (kv.first == "backbone") bad(path, "linear-eval: 'backbone' is the run's own backbone.pt and cannot be given");
  }
  // The rule reads validation results: every candidate (its linear evaluation, after pre-training) holds images out.
  if (grid.selects) {
    auto holds_out = [](const Settings& s) {
      std::string split;
      for (const auto& kv : s)
        if (kv.first == "val-split") split = kv.second;
      return !split.empty() && split != "0";
    };
    for (const auto& run : grid.runs)
      if (!holds_out(grid.linear_eval ? grid.linear_eval_settings : run.settings))
        bad(path, "select: candidate " + run.name + " holds no validation images for the rule to read; set \"val-split\" in " +
                      (grid.linear_eval ? "\"linear-eval\"" : "\"fixed\""));
  }
  return grid;
}

}  // namespace report
}  // namespace largebatch
