#pragma once
// A config lists its fields once, as a function `fields(config, visitor)` calling visitor(key, member) for each;
// writing config.json and reading it both walk that list. Internal to the library (src/train).
#include <largebatch/data/dataset.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>

#include "run_support.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

namespace largebatch {
namespace train {
namespace detail {


struct JsonWriter {
  nlohmann::json& j;
  template <class T>
  void operator()(const char* key, const T& value) { j[key] = value; }
  void operator()(const char* key, const std::map<std::string, std::string>& options) {
    std::vector<std::string> items;
    for (const auto& kv : options) items.push_back(kv.first + "=" + kv.second);
    j[key] = items;
  }
};

struct JsonReader {
  const std::string& key;  // the key being read
  const nlohmann::json& v;
  const std::string& source;
  bool matched = false;
  void wrong(const char* key_name, const char* what) {
    usage(source + ": '" + key_name + "' must be " + what);
  }
  void operator()(const char* k, std::string& x) {
    if (key != k) return;
    if (!v.is_string()) wrong(k, "a string");
    x = v.get<std::string>();
    matched = true;
  }
  void operator()(const char* k, double& x) {
    if (key != k) return;
    if (!v.is_number()) wrong(k, "a number");
    x = v.get<double>();
    matched = true;
  }
  void operator()(const char* k, int64_t& x) {
    if (key != k) return;
    if (!v.is_number_integer()) wrong(k, "an integer");
    x = v.get<int64_t>();
    matched = true;
  }
  void operator()(const char* k, uint64_t& x) {
    if (key != k) return;
    if (!v.is_number_integer() || v.get<int64_t>() < 0) wrong(k, "a non-negative integer");
    x = v.get<uint64_t>();
    matched = true;
  }
  void operator()(const char* k, bool& x) {
    if (key != k) return;
    if (!v.is_boolean()) wrong(k, "true or false");
    x = v.get<bool>();
    matched = true;
  }
  void operator()(const char* k, std::map<std::string, std::string>& x) {
    if (key != k) return;
    if (!v.is_array()) wrong(k, "an array of \"key=value\" strings");
    for (const auto& item : v) {
      if (!item.is_string()) wrong(k, "an array of \"key=value\" strings");
      try {
        for (const auto& kv : optim::parse_overrides(item.get<std::string>())) x[kv.first] = kv.second;
      } catch (const std::invalid_argument& e) {
        usage(source + ": '" + k + "': " + e.what());
      }
    }
    matched = true;
  }
};


template <class Config, class Fields>
Config config_from_json(const std::string& text, const std::string& source, Fields fields) {
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
    fields(c, reader);
    if (!reader.matched) usage(source + ": unknown key '" + it.key() + "'");
  }
  return c;
}

inline void check_common(const std::string& data, const std::string& model, const std::string& init,
                  const std::string& progress, const std::string& device, const std::string& out, int64_t threads) {
  const auto& datasets = data::dataset_names();
  if (std::find(datasets.begin(), datasets.end(), data) == datasets.end())
    usage("--data: unknown data set '" + data + "'");
  const auto& models = models::model_names();
  if (!model.empty() && std::find(models.begin(), models.end(), model) == models.end())
    usage("--model: unknown model '" + model + "'");
  const auto& inits = models::init_names();
  if (std::find(inits.begin(), inits.end(), init) == inits.end()) usage("--init: unknown method '" + init + "'");
  if (!one_of(progress, {"auto", "bar", "lines", "none"}))
    usage("--progress: '" + progress + "' is not auto, bar, lines or none");
  if (!(device == "cpu" || device.rfind("cuda", 0) == 0)) usage("--device: '" + device + "' is not cpu or cuda[:N]");
  if (out.empty()) usage("--out must not be empty");
  if (threads < 0) usage("--threads must be >= 0");
}

// "1024-1024-1024" -> {1024, 1024, 1024}; UsageError naming --projector otherwise.

// A config as config.json text: every field the list names.
template <class Config, class Fields>
std::string config_to_json(const Config& c, Fields fields) {
  nlohmann::json j;
  JsonWriter writer{j};
  fields(const_cast<Config&>(c), writer);
  return j.dump(2) + "\n";
}

}  // namespace detail
}  // namespace train
}  // namespace largebatch
