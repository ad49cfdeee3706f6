#include <largebatch/optim/recipes.h>

#include <largebatch/optim/factory.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <stdexcept>

namespace largebatch {
namespace optim {

double LrRule::at(int64_t batch_size) const {
  return sqrt_batch_scaled ? base * std::sqrt(static_cast<double>(batch_size) / 256.0) : base;
}

std::string LrRule::describe() const {
  char text[48];
  std::snprintf(text, sizeof(text), "%g%s", base, sqrt_batch_scaled ? " sqrt(B/256)" : "");
  return text;
}

namespace {

// Decay only the tensors of more than one dimension: the trainer's rule for LibTorch's optimizers, whose
// own weight decay would reach every tensor.
const char* const kMatricesOnly = "ndim<=1";

Recipe preset_as_is(const std::string& preset, double classification_lr, double self_supervised_lr) {
  Recipe r;
  r.name = preset;
  r.optimizer = preset;
  r.layerwise = true;
  r.schedule = "constant";
  r.classification.lr = {classification_lr, false};
  r.self_supervised.lr = {self_supervised_lr, false};
  for (const auto& p : layerwise_presets())
    if (p.name == preset) r.description = p.description + "; exactly the preset's values";
  return r;
}

std::vector<Recipe> make_table() {
  std::vector<Recipe> t;
  // The engine presets, run with exactly their values. Default lr: classification 2 (LARS family; the trust
  // ratio sets each layer's scale, the 1-D tensors take plain SGD at lr), 0.01 (LAMB); pre-training 0.2 (the
  // Barlow Twins weight lr) and 0.01.
  t.push_back(preset_as_is("lars:reference", 2.0, 0.2));
  t.push_back(preset_as_is("tvlars:reference", 2.0, 0.2));
  t.push_back(preset_as_is("tvlars:paper", 2.0, 0.2));
  t.push_back(preset_as_is("lamb:reference", 0.01, 0.01));
  t.push_back(preset_as_is("lamb:paper", 0.01, 0.01));

  // The trainer's recipes. For classification, eta 2e-3 with lr 2: the default CNN on Fashion-MNIST at
  // B = 4096 (docs/TRAINING.md).
  Recipe lars;
  lars.name = "lars";
  lars.optimizer = "lars:reference";
  lars.layerwise = true;
  lars.schedule = "constant";
  lars.classification = {{2.0, false}, {{"eta", "0.002"}}};
  lars.self_supervised = {{0.2, false}, {}};
  lars.description = "lars:reference, constant lr; classification: eta 2e-3 (the preset's 1e-3), lr 2; "
                     "pre-training: the preset's eta, lr 0.2";
  t.push_back(lars);

  Recipe wa_lars = lars;
  wa_lars.name = "wa-lars";
  wa_lars.aliases = {"walars"};
  wa_lars.schedule = "warmup-cosine";
  wa_lars.description = "WA-LARS: the lars recipe with warm-up + cosine";
  t.push_back(wa_lars);

  Recipe tvlars = lars;
  tvlars.name = "tvlars";
  tvlars.optimizer = "tvlars:reference";
  tvlars.lambda_per_run = true;
  tvlars.description = "tvlars:reference with lambda = 2/T (T: the run's steps; the preset's is 1e-3); "
                       "classification: eta 2e-3 (the preset's 1e-3), lr 2; pre-training: the preset's eta, lr 0.2";
  t.push_back(tvlars);

  Recipe lamb;
  lamb.name = "lamb";
  lamb.optimizer = "lamb:paper";
  lamb.layerwise = true;
  lamb.schedule = "constant";
  lamb.classification = {{0.01, false}, {}};
  lamb.self_supervised = {{0.01, false}, {}};
  lamb.description = "lamb:paper, constant lr 0.01";
  t.push_back(lamb);

  Recipe wa_lamb = lamb;
  wa_lamb.name = "wa-lamb";
  wa_lamb.aliases = {"walamb"};
  wa_lamb.schedule = "warmup-cosine";
  wa_lamb.description = "WA-LAMB: lamb:paper with warm-up + cosine, lr 0.01";
  t.push_back(wa_lamb);

  // LibTorch's optimizers, with warm-up + cosine and weight decay on the tensors of more than one dimension.
  auto torch_recipe = [&](const std::string& name, TaskDefaults classification, TaskDefaults self_supervised,
                          const std::string& description) {
    Recipe r;
    r.name = name;
    r.optimizer = name;
    r.schedule = "warmup-cosine";
    r.classification = std::move(classification);
    r.self_supervised = std::move(self_supervised);
    r.description = description;
    t.push_back(r);
  };
  torch_recipe("sgd", {{0.1, true}, {{"momentum", "0.9"}, {"weight_decay", "5e-4"}, {"decay_mask", kMatricesOnly}}},
               {{0.05, true}, {{"momentum", "0.9"}, {"weight_decay", "1e-6"}, {"decay_mask", kMatricesOnly}}},
               "LibTorch SGD, momentum 0.9, warm-up + cosine; lr 0.1 sqrt(B/256) (pre-training 0.05 sqrt(B/256)), "
               "wd 5e-4 (1e-6) on tensors of ndim > 1");
  torch_recipe("adam", {{1e-3, true}, {{"decay_mask", kMatricesOnly}}}, {{1e-3, false}, {{"decay_mask", kMatricesOnly}}},
               "LibTorch Adam, no weight decay, warm-up + cosine; lr 1e-3 sqrt(B/256) (pre-training 1e-3)");
  torch_recipe("adamw", {{1e-3, true}, {{"weight_decay", "0.05"}, {"decay_mask", kMatricesOnly}}},
               {{1e-3, false}, {{"weight_decay", "0.05"}, {"decay_mask", kMatricesOnly}}},
               "LibTorch AdamW, wd 0.05 on tensors of ndim > 1, warm-up + cosine; lr 1e-3 sqrt(B/256) (pre-training 1e-3)");
  torch_recipe("adagrad", {{0.05, false}, {{"weight_decay", "5e-4"}, {"decay_mask", kMatricesOnly}}},
               {{1e-3, false}, {{"weight_decay", "1e-6"}, {"decay_mask", kMatricesOnly}}},
               "LibTorch Adagrad, warm-up + cosine; lr 0.05 (pre-training 1e-3), wd 5e-4 (1e-6) on tensors of ndim > 1");
  torch_recipe("rmsprop", {{1e-3, false}, {{"weight_decay", "5e-4"}, {"decay_mask", kMatricesOnly}}},
               {{1e-3, false}, {{"weight_decay", "1e-6"}, {"decay_mask", kMatricesOnly}}},
               "LibTorch RMSprop, warm-up + cosine; lr 1e-3, wd 5e-4 (pre-training 1e-6) on tensors of ndim > 1");
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
  for (const auto& [key, value] : given) r.options[key] = value;
  return r;
}

}  // namespace optim
}  // namespace largebatch
