#include <largebatch/train/options.h>

#include <largebatch/data/dataset.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/recipes.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace largebatch {
namespace train {
std::string OptionError::render(const std::string& option, std::string problem,
                                const std::vector<std::string>& mentioned, const std::string& prefix) {
  for (const auto& key : mentioned) {
    const std::string token = "{" + key + "}";
    for (size_t at = problem.find(token); at != std::string::npos; at = problem.find(token, at + prefix.size() + key.size()))
      problem.replace(at, token.size(), prefix + key);
  }
  return prefix + option + (problem.rfind(':', 0) == 0 ? "" : " ") + problem;
}

std::vector<double> parse_epoch_list(const std::string& text) {
  std::vector<double> epochs;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find(',', begin);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(begin, end - begin);
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || !std::isfinite(v) || v < 0)
      throw std::invalid_argument("'" + item + "' in '" + text + "' is not a number of epochs >= 0");
    if (!epochs.empty() && v <= epochs.back())
      throw std::invalid_argument("'" + text + "' is not increasing");
    epochs.push_back(v);
    begin = end + 1;
  }
  return epochs;
}

namespace check {

namespace {

std::string listed(const std::vector<std::string>& names, const char* last_separator = ", ") {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i)
    out += (i == 0 ? "" : i + 1 == names.size() ? last_separator : ", ") + names[i];
  return out;
}

std::string known(const std::string& name, const char* what, const std::vector<std::string>& names) {
  if (std::find(names.begin(), names.end(), name) != names.end()) return "";
  return ": unknown " + std::string(what) + " '" + name + "' (known: " + listed(names) + ")";
}

}  // namespace

std::string describe(int64_t v) { return std::to_string(v); }
std::string describe(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
std::string describe(const std::string& v) { return "'" + v + "'"; }

std::function<std::string(const std::string&)> one_of(std::vector<std::string> words) {
  return [words](const std::string& v) {
    if (std::find(words.begin(), words.end(), v) != words.end()) return std::string();
    return ": '" + v + "' is not " + listed(words, " or ");
  };
}

std::string data_set(const std::string& name) { return known(name, "data set", data::dataset_names()); }
std::string model(const std::string& name) { return known(name, "model", models::model_names()); }
std::string model_or_empty(const std::string& name) { return name.empty() ? "" : model(name); }
std::string init(const std::string& name) { return known(name, "initialisation", models::init_names()); }

std::string recipe(const std::string& name) {
  try {
    optim::find_recipe(name);
    return "";
  } catch (const std::invalid_argument& e) {
    return std::string(": ") + e.what();
  }
}

std::string device(const std::string& name) {
  if (name == "cpu" || name.rfind("cuda", 0) == 0) return "";
  return ": '" + name + "' is not cpu or cuda[:N]";
}

std::string not_empty(const std::string& text) { return text.empty() ? "must not be empty" : ""; }

std::string epoch_list(const std::string& text) {
  try {
    (void)train::parse_epoch_list(text);
    return "";
  } catch (const std::invalid_argument& e) {
    return std::string(": ") + e.what();
  }
}

std::string data_set_list() { return listed(data::dataset_names()); }
std::string model_list() { return listed(models::model_names()); }
std::string init_list() { return listed(models::init_names()); }

}  // namespace check
}  // namespace train
}  // namespace largebatch
