// Grid files of `largebatch sweep`: JSON (nlohmann, key order kept) or TOML (toml++), expanded into runs.
#include <largebatch/report/sweep.h>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

namespace largebatch {
namespace report {

namespace {

using Settings = std::vector<std::pair<std::string, std::string>>;

struct AxisValue {
  std::string label;  // in folder names
  Settings settings;
};

struct Axis {
  std::string name;
  std::vector<AxisValue> values;
};

struct RawGrid {
  std::string command = "train";
  Settings fixed;
  std::vector<Axis> axes;
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

// ---- JSON

void json_scalar(const std::string& path, const std::string& where, const std::string& key,
                 const nlohmann::ordered_json& v, Settings& out) {
  if (v.is_string()) out.emplace_back(key, v.get<std::string>());
  else if (v.is_boolean()) out.emplace_back(key, v.get<bool>() ? "true" : "false");
  else if (v.is_number_integer()) out.emplace_back(key, std::to_string(v.get<int64_t>()));
  else if (v.is_number()) out.emplace_back(key, number_text(v.get<double>()));
  else if (v.is_array()) {
    for (const auto& item : v) {
      if (item.is_array() || item.is_object()) bad(path, where + ": '" + key + "' holds a nested list or object");
      json_scalar(path, where, key, item, out);
    }
  } else {
    bad(path, where + ": '" + key + "' must be a string, number, boolean or list of them");
  }
}

RawGrid parse_json(const std::string& path, const std::string& text) {
  nlohmann::ordered_json j;
  try {
    j = nlohmann::ordered_json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1e99999
    bad(path, std::string("not valid JSON (") + e.what() + ")");
  }
  if (!j.is_object()) bad(path, "expected a JSON object with \"axes\" (and \"fixed\", \"command\")");
  RawGrid g;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "command") {
      if (!v.is_string()) bad(path, "\"command\" must be a string");
      g.command = v.get<std::string>();
    } else if (key == "fixed") {
      if (!v.is_object()) bad(path, "\"fixed\" must be an object of option: value");
      for (auto f = v.begin(); f != v.end(); ++f) {
        check_key(path, "fixed", f.key());
        json_scalar(path, "fixed", f.key(), f.value(), g.fixed);
      }
    } else if (key == "axes") {
      if (!v.is_object()) bad(path, "\"axes\" must be an object of option: [values]");
      for (auto a = v.begin(); a != v.end(); ++a) {
        Axis axis{a.key(), {}};
        if (!a.value().is_array() || a.value().empty())
          bad(path, "axes." + a.key() + ": must be a non-empty list of values");
        for (const auto& item : a.value()) {
          AxisValue value;
          if (item.is_object()) {
            for (auto f = item.begin(); f != item.end(); ++f) {
              if (f.key() == "label") {
                if (!f.value().is_string()) bad(path, "axes." + a.key() + ": \"label\" must be a string");
                value.label = f.value().get<std::string>();
                continue;
              }
              check_key(path, "axes." + a.key(), f.key());
              json_scalar(path, "axes." + a.key(), f.key(), f.value(), value.settings);
            }
            if (value.settings.empty()) bad(path, "axes." + a.key() + ": an object value sets no option");
          } else {
            check_key(path, "axes", a.key());
            json_scalar(path, "axes." + a.key(), a.key(), item, value.settings);
            if (item.is_array()) bad(path, "axes." + a.key() + ": a value may not itself be a list; use an object");
          }
          axis.values.push_back(std::move(value));
        }
        g.axes.push_back(std::move(axis));
      }
    } else {
      bad(path, "unknown key \"" + key + "\" (expected command, fixed, axes)");
    }
  }
  return g;
}

// ---- TOML

void toml_scalar(const std::string& path, const std::string& where, const std::string& key, const toml::node& v,
                 Settings& out) {
  if (auto s = v.as_string()) out.emplace_back(key, s->get());
  else if (auto b = v.as_boolean()) out.emplace_back(key, b->get() ? "true" : "false");
  else if (auto i = v.as_integer()) out.emplace_back(key, std::to_string(i->get()));
  else if (auto d = v.as_floating_point()) out.emplace_back(key, number_text(d->get()));
  else if (auto arr = v.as_array()) {
    for (const auto& item : *arr) {
      if (item.is_array() || item.is_table()) bad(path, where + ": '" + key + "' holds a nested list or table");
      toml_scalar(path, where, key, item, out);
    }
  } else {
    bad(path, where + ": '" + key + "' must be a string, number, boolean or list of them");
  }
}

RawGrid parse_toml(const std::string& path, const std::string& text) {
  toml::table t;
  try {
    t = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    std::ostringstream msg;
    msg << "not valid TOML (line " << e.source().begin.line << ": " << e.description() << ")";
    bad(path, msg.str());
  }
  RawGrid g;
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    if (key == "command") {
      if (!v.is_string()) bad(path, "command must be a string");
      g.command = v.as_string()->get();
    } else if (key == "fixed") {
      if (!v.is_table()) bad(path, "[fixed] must be a table");
      for (const auto& [fk, fv] : *v.as_table()) {
        check_key(path, "fixed", std::string(fk.str()));
        toml_scalar(path, "fixed", std::string(fk.str()), fv, g.fixed);
      }
    } else if (key == "axes") {
      if (!v.is_table()) bad(path, "[axes] must be a table");
      for (const auto& [ak, av] : *v.as_table()) {
        const std::string name(ak.str());
        Axis axis{name, {}};
        const auto* arr = av.as_array();
        if (!arr || arr->empty()) bad(path, "axes." + name + ": must be a non-empty list of values");
        for (const auto& item : *arr) {
          AxisValue value;
          if (const auto* table = item.as_table()) {  // inline table: several options at once
            for (const auto& [fk, fv] : *table) {
              const std::string f(fk.str());
              if (f == "label") {
                if (!fv.is_string()) bad(path, "axes." + name + ": label must be a string");
                value.label = fv.as_string()->get();
                continue;
              }
              check_key(path, "axes." + name, f);
              toml_scalar(path, "axes." + name, f, fv, value.settings);
            }
            if (value.settings.empty()) bad(path, "axes." + name + ": a table value sets no option");
          } else {
            if (item.is_array()) bad(path, "axes." + name + ": a value may not itself be a list; use a table");
            check_key(path, "axes", name);
            toml_scalar(path, "axes." + name, name, item, value.settings);
          }
          axis.values.push_back(std::move(value));
        }
        // toml++ keeps tables sorted by key; the axis order is then alphabetical (documented).
        g.axes.push_back(std::move(axis));
      }
    } else {
      bad(path, "unknown key \"" + key + "\" (expected command, fixed, axes)");
    }
  }
  return g;
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

std::string value_label(const Axis& axis, const AxisValue& v) {
  if (!v.label.empty()) return safe_name(v.label);  // checked by check_label
  if (v.settings.size() == 1 && v.settings[0].first == axis.name) return safe_name(axis.name + "-" + v.settings[0].second);
  std::string out;
  for (const auto& kv : v.settings) out += (out.empty() ? "" : "_") + kv.first + "-" + kv.second;
  return safe_name(out);
}

}  // namespace

SweepGrid read_grid(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::invalid_argument(path + ": cannot read the grid file");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  const auto first = text.find_first_not_of(" \t\r\n");
  const RawGrid raw = first != std::string::npos && text[first] == '{' ? parse_json(path, text) : parse_toml(path, text);
  if (raw.command != "train" && raw.command != "pretrain")
    bad(path, "command '" + raw.command + "' is not train or pretrain");

  // A sweep is planned in memory and run one folder per combination: refuse a grid no one could run before
  // expanding it (a few axes of many values would exhaust memory).
  constexpr double kMaxRuns = 100000;
  double combinations = 1;
  for (const auto& axis : raw.axes) combinations *= static_cast<double>(axis.values.size());
  if (combinations > kMaxRuns)
    bad(path, "the axes combine into " + number_text(combinations) + " runs, more than the " +
                  number_text(kMaxRuns) + " a sweep allows");

  SweepGrid grid;
  grid.command = raw.command;
  // Odometer over the axes, the last one varying fastest.
  std::vector<size_t> index(raw.axes.size(), 0);
  std::set<std::string> names;
  while (true) {
    PlannedRun run;
    Settings from_axes;
    std::map<std::string, std::string> set_by;  // option -> the axis that sets it
    for (size_t a = 0; a < raw.axes.size(); ++a) {
      const auto& v = raw.axes[a].values[index[a]];
      run.name += (run.name.empty() ? "" : "__") + value_label(raw.axes[a], v);
      for (const auto& kv : v.settings) {
        const auto [it, fresh] = set_by.emplace(kv.first, raw.axes[a].name);
        if (!fresh && it->second != raw.axes[a].name)
          bad(path, "axes " + it->second + " and " + raw.axes[a].name + " both set '" + kv.first + "'");
      }
      from_axes.insert(from_axes.end(), v.settings.begin(), v.settings.end());
    }
    // An axis overrides a fixed setting of the same option.
    Settings settings;
    for (const auto& kv : raw.fixed)
      if (!set_by.count(kv.first)) settings.push_back(kv);
    settings.insert(settings.end(), from_axes.begin(), from_axes.end());
    if (run.name.empty()) run.name = "run";
    // Folder names stay strict children of the sweep's folder, apart from the report's own folder.
    if (run.name[0] == '.' || run.name == "report")
      bad(path, "run folder name '" + run.name + "' is not allowed (starts with '.' or is 'report'); change the label");
    if (!names.insert(run.name).second) bad(path, "two runs would share the folder '" + run.name + "'; give labels");
    run.settings = std::move(settings);
    grid.runs.push_back(std::move(run));
    size_t a = raw.axes.size();
    while (a > 0) {
      --a;
      if (++index[a] < raw.axes[a].values.size()) break;
      index[a] = 0;
      if (a == 0) return grid;
    }
    if (raw.axes.empty()) return grid;
  }
}

}  // namespace report
}  // namespace largebatch
