#include <largebatch/optim/recipes.h>

#include <largebatch/optim/factory.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace largebatch {
namespace optim {

double LrRule::at(int64_t batch_size) const {
  const double ratio = static_cast<double>(batch_size) / 256.0;
  if (linear_batch_scaled) return base * ratio;
  return sqrt_batch_scaled ? base * std::sqrt(ratio) : base;
}

std::string LrRule::describe() const {
  char text[48];
  std::snprintf(text, sizeof(text), "%g%s", base,
                linear_batch_scaled ? " B/256" : (sqrt_batch_scaled ? " sqrt(B/256)" : ""));
  return text;
}

namespace {

// The table. Layer-wise rows: an engine preset under its own name, exactly as it is (default lr: classification
// 2 for the LARS family, whose trust ratio sets each layer's scale while the 1-D tensors take plain SGD at
// lr, and 0.01 for LAMB; pre-training 0.2, the Barlow Twins weight lr, and 0.01), then the trainer's recipes
// built on them (eta 2e-3 with lr 2 for classification: the default CNN on Fashion-MNIST at B = 4096,
// docs/TRAINING.md). LibTorch rows: warm-up + cosine, weight decay on the tensors of ndim > 1 only.
std::vector<Recipe> make_table() {
  const TaskDefaults lars_cls{{2.0, false}, {}}, lars_ssl{{0.2, false}, {}}, lamb_any{{0.01, false}, {}};
  const TaskDefaults tuned_lars_cls{{2.0, false}, {{"eta", "0.002"}}};
  auto decayed = [](const char* wd) {
    return std::map<std::string, std::string>{{"weight_decay", wd}, {"decay_mask", "ndim<=1"}};
  };
  const auto as_is = [](const std::string& preset) {
    for (const auto& p : layerwise_presets())
      if (p.name == preset) return p.description + "; exactly the preset's values";
    return preset;
  };
  std::vector<Recipe> t = {
      {"lars:reference", {}, "lars:reference", "constant", false, lars_cls, lars_ssl, as_is("lars:reference")},
      {"tvlars:reference", {}, "tvlars:reference", "constant", false, lars_cls, lars_ssl,
       as_is("tvlars:reference")},
      {"tvlars:paper", {}, "tvlars:paper", "constant", false, lars_cls, lars_ssl, as_is("tvlars:paper")},
      {"lamb:reference", {}, "lamb:reference", "constant", false, lamb_any, lamb_any, as_is("lamb:reference")},
      {"lamb:paper", {}, "lamb:paper", "constant", false, lamb_any, lamb_any, as_is("lamb:paper")},
      {"lars:timm", {}, "lars:timm", "constant", false, lars_cls, lars_ssl, as_is("lars:timm")},
      {"larc:apex", {}, "larc:apex", "constant", false, lars_cls, lars_ssl, as_is("larc:apex")},
      {"lamb:timm", {}, "lamb:timm", "constant", false, lamb_any, lamb_any, as_is("lamb:timm")},
      {"lars:barlowtwins", {}, "lars:barlowtwins", "warmup-cosine", false, lars_cls, {{0.2, false, true}, {}},
       as_is("lars:barlowtwins") +
           ", with the recipe's schedule: warm-up (--warmup-epochs; the recipe's is 10 of 1000 epochs) then cosine "
           "to --final-ratio (0.001); pre-training lr 0.2 B/256 (its --learning-rate-weights)"},
      {"lars", {}, "lars:reference", "constant", false, tuned_lars_cls, lars_ssl,
       "lars:reference, constant lr; classification: eta 2e-3 (the preset's 1e-3), lr 2; pre-training: the "
       "preset's eta, lr 0.2"},
      {"wa-lars", {"walars"}, "lars:reference", "warmup-cosine", false, tuned_lars_cls, lars_ssl,
       "WA-LARS: the lars recipe with warm-up + cosine"},
      {"tvlars", {}, "tvlars:reference", "constant", true, tuned_lars_cls, lars_ssl,
       "tvlars:reference with lambda = 2/T (T: the run's steps; the preset's is 1e-3); classification: eta 2e-3 "
       "(the preset's 1e-3), lr 2; pre-training: the preset's eta, lr 0.2"},
      {"lamb", {}, "lamb:paper", "constant", false, lamb_any, lamb_any, "lamb:paper, constant lr 0.01"},
      {"wa-lamb", {"walamb"}, "lamb:paper", "warmup-cosine", false, lamb_any, lamb_any,
       "WA-LAMB: lamb:paper with warm-up + cosine, lr 0.01"},
      {"sgd", {}, "sgd", "warmup-cosine", false,
       {{0.1, true}, {{"momentum", "0.9"}, {"weight_decay", "5e-4"}, {"decay_mask", "ndim<=1"}}},
       {{0.05, true}, {{"momentum", "0.9"}, {"weight_decay", "1e-6"}, {"decay_mask", "ndim<=1"}}},
       "LibTorch SGD, momentum 0.9, warm-up + cosine; lr 0.1 sqrt(B/256) (pre-training 0.05 sqrt(B/256)), wd 5e-4 "
       "(1e-6) on tensors of ndim > 1"},
      {"adam", {}, "adam", "warmup-cosine", false, {{1e-3, true}, {{"decay_mask", "ndim<=1"}}},
       {{1e-3, false}, {{"decay_mask", "ndim<=1"}}},
       "LibTorch Adam, no weight decay, warm-up + cosine; lr 1e-3 sqrt(B/256) (pre-training 1e-3)"},
      {"adamw", {}, "adamw", "warmup-cosine", false, {{1e-3, true}, decayed("0.05")},
       {{1e-3, false}, decayed("0.05")},
       "LibTorch AdamW, wd 0.05 on tensors of ndim > 1, warm-up + cosine; lr 1e-3 sqrt(B/256) (pre-training 1e-3)"},
      {"adagrad", {}, "adagrad", "warmup-cosine", false, {{0.05, false}, decayed("5e-4")},
       {{1e-3, false}, decayed("1e-6")},
       "LibTorch Adagrad, warm-up + cosine; lr 0.05 (pre-training 1e-3), wd 5e-4 (1e-6) on tensors of ndim > 1"},
      {"rmsprop", {}, "rmsprop", "warmup-cosine", false, {{1e-3, false}, decayed("5e-4")},
       {{1e-3, false}, decayed("1e-6")},
       "LibTorch RMSprop, warm-up + cosine; lr 1e-3, wd 5e-4 (pre-training 1e-6) on tensors of ndim > 1"},
  };
  return t;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

}  // namespace

const std::vector<Recipe>& recipes() {
  static const std::vector<Recipe> table = make_table();
  return table;
}

std::vector<std::string> recipe_names() {
  std::vector<std::string> names;
  for (const auto& r : recipes()) {
    names.push_back(r.name);
    names.insert(names.end(), r.aliases.begin(), r.aliases.end());
  }
  return names;
}

const Recipe& find_recipe(const std::string& raw) {
  const std::string name = lower(raw);
  for (const auto& r : recipes()) {
    if (r.name == name || std::find(r.aliases.begin(), r.aliases.end(), name) != r.aliases.end()) return r;
  }
  std::string known;
  for (const auto& n : recipe_names()) known += (known.empty() ? "" : ", ") + n;
  throw std::invalid_argument("unknown optimizer '" + raw + "' (known: " + known + ")");
}

namespace {

// TVLARS's lambda given as "C/T": C divided by the run's total steps T, so one grid value means the same decay
// over runs of different lengths (phi's exponent reaches C at the last step). Other values pass unchanged.
// total_steps 0: the form is checked and the value returned as given.
std::string per_run_lambda(const std::string& value, int64_t total_steps) {
  if (value.size() < 3 || value.compare(value.size() - 2, 2, "/T") != 0) return value;
  const std::string c = value.substr(0, value.size() - 2);
  char* end = nullptr;
  const double per_run = std::strtod(c.c_str(), &end);
  if (end != c.c_str() + c.size() || !std::isfinite(per_run) || per_run <= 0)
    throw std::invalid_argument("--opt lambda=" + value + ": expected a positive number before /T (C/T: C over the run's steps)");
  if (total_steps <= 0) return value;  // T not known yet (a check of the schedule alone): checked, left as given
  char lambda[32];
  std::snprintf(lambda, sizeof(lambda), "%.6g", per_run / static_cast<double>(total_steps));
  return lambda;
}

}  // namespace

ResolvedRecipe resolve_recipe(const std::string& name, Task task, int64_t batch_size, int64_t total_steps,
                              double lr, const std::string& schedule,
                              const std::map<std::string, std::string>& given) {
  const Recipe& recipe = find_recipe(name);
  const TaskDefaults& defaults = recipe.defaults(task);
  ResolvedRecipe r;
  r.recipe = recipe.name;
  r.optimizer = recipe.optimizer;
  r.lr = lr >= 0 ? lr : defaults.lr.at(batch_size);
  r.schedule = schedule == "auto" ? recipe.schedule : schedule;
  r.options = defaults.options;
  if (recipe.lambda_per_run && total_steps > 0) {
    char lambda[32];
    std::snprintf(lambda, sizeof(lambda), "%.6g", 2.0 / static_cast<double>(total_steps));
    r.options["lambda"] = lambda;
  }
  for (const auto& [key, value] : given) r.options[key] = key == "lambda" ? per_run_lambda(value, total_steps) : value;
  return r;
}

}  // namespace optim
}  // namespace largebatch
