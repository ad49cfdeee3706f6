#pragma once
// config.json of every command, written and read by walking the command's option list (train/options.h).
// Internal to the library (src/train).
#include <largebatch/optim/factory.h>
#include <largebatch/train/options.h>

#include "run_support.h"

#include <nlohmann/json.hpp>

#include <map>
#include <string>
#include <vector>

namespace largebatch {
namespace train {
namespace detail {

// Every saved option under its key.
struct JsonWriter {
  nlohmann::json& j;
  template <class T, class Check>
  void operator()(const Option& o, const T& value, Check&&) {
    if (o.saved()) j[o.key()] = value;
  }
  template <class Check>
  void operator()(const Option& o, const std::map<std::string, std::string>& options, Check&&) {
    std::vector<std::string> items;
    for (const auto& kv : options) items.push_back(kv.first + "=" + kv.second);
    j[o.key()] = items;
  }
};

// One key of a JSON object into the option it names; UsageError naming the file and key for a wrong type.
struct JsonReader {
  const std::string& key;  // the key being read
  const nlohmann::json& v;
  const std::string& source;
  bool matched = false;

  template <class T, class Check>
  void operator()(const Option& o, T& x, Check&&) {
    if (!o.saved() || (key != o.key() && !(o.alias_key() && key == o.alias_key()))) return;
    read(o.key(), x);
    matched = true;
  }

 private:
  [[noreturn]] void wrong(const char* k, const char* what) { usage(source + ": '" + k + "' must be " + what); }
  void read(const char* k, std::string& x) {
    if (!v.is_string()) wrong(k, "a string");
    x = v.get<std::string>();
  }
  void read(const char* k, double& x) {
    if (!v.is_number()) wrong(k, "a number");
    x = v.get<double>();
  }
  void read(const char* k, int64_t& x) {
    if (!v.is_number_integer()) wrong(k, "an integer");
    x = v.get<int64_t>();
  }
  void read(const char* k, uint64_t& x) {
    if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<int64_t>() < 0))
      wrong(k, "a non-negative integer");
    x = v.get<uint64_t>();
  }
  void read(const char* k, bool& x) {
    if (!v.is_boolean()) wrong(k, "true or false");
    x = v.get<bool>();
  }
  void read(const char* k, std::map<std::string, std::string>& x) {
    if (!v.is_array()) wrong(k, "an array of \"key=value\" strings");
    for (const auto& item : v) {
      if (!item.is_string()) wrong(k, "an array of \"key=value\" strings");
      try {
        for (const auto& kv : optim::parse_overrides(item.get<std::string>())) x[kv.first] = kv.second;
      } catch (const std::invalid_argument& e) {
        usage(source + ": '" + k + "': " + e.what());
      }
    }
  }
};

// A config from config.json text: every key must name an option of the config's list.
template <class Config>
Config config_from_json(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1e99999
    usage(source + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object()) usage(source + ": expected a JSON object");
  Config c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    JsonReader reader{it.key(), it.value(), source};
    visit_options(c, reader);
    if (!reader.matched) usage(source + ": unknown key '" + it.key() + "'");
  }
  return c;
}

// A config as config.json text: every saved option.
template <class Config>
std::string config_to_json(const Config& c) {
  nlohmann::json j;
  JsonWriter writer{j};
  visit_options(const_cast<Config&>(c), writer);
  return j.dump(2) + "\n";
}

// --resume: every identity option (Option::identity) must have the saved config.json's value; OptionError naming
// the first that differs.
template <class Config>
void require_same_identity(const Config& now, const std::string& saved_text, const std::filesystem::path& out) {
  const Config before = Config::from_json(saved_text, (out / "config.json").string());
  const nlohmann::json a = nlohmann::json::parse(now.to_json()), b = nlohmann::json::parse(before.to_json());
  visit_options(const_cast<Config&>(now), [&](const Option& o, const auto&, auto&&) {
    if (o.is_identity() && a.at(o.key()) != b.at(o.key()))
      throw OptionError(o.key(), "differs from the checkpointed run in " + out.string());
  });
}

// Every option's own check (OptionError for the first that fails).
template <class Config>
void check_options(const Config& c) {
  visit_options(const_cast<Config&>(c), OptionChecker{});
}

}  // namespace detail
}  // namespace train
}  // namespace largebatch
