#pragma once
// Build any optimizer from a name, a preset and option overrides: the layer-wise presets of
// docs/algorithms.md and LibTorch's own SGD, Adam, AdamW, Adagrad and RMSprop.
#include <largebatch/optim/layerwise.h>

#include <torch/optim/optimizer.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace largebatch {
namespace optim {

struct PresetInfo {
  std::string name;          // "tvlars:paper"
  std::string description;   // one line
};

// Every preset of the layer-wise engine, in a stable order. The names a run gives (bare names such as
// "tvlars" included) are recipes: optim/recipes.h.
const std::vector<PresetInfo>& layerwise_presets();
// The plain LibTorch optimizers the factory also builds.
const std::vector<std::string>& torch_optimizer_names();

// What a recipe name builds (optim/recipes.h): "tvlars" -> "tvlars:reference", "sgd" -> "sgd"; throws
// std::invalid_argument for an unknown name.
std::string resolve_optimizer_name(const std::string& name);
// One of layerwise_presets()'s names.
bool is_layerwise_preset(const std::string& name);
// The options of a layer-wise preset. batch_size feeds presets that depend on B (tvlars:paper's
// gamma_min = 0.001 B / 256).
LayerwiseOptions preset_options(const std::string& name, double lr, int64_t batch_size = 256);

// "momentum=0.95,nesterov=true" -> {{"momentum","0.95"},{"nesterov","true"}}.
std::map<std::string, std::string> parse_overrides(const std::string& text);
// Applies key=value overrides; std::invalid_argument names the key and the value.
void apply_overrides(LayerwiseOptions& options, const std::map<std::string, std::string>& overrides);

struct OptimizerSpec {
  std::string name = "lars";                        // a preset or a LibTorch optimizer name
  double lr = 0.1;
  int64_t batch_size = 256;
  std::map<std::string, std::string> overrides;    // option=value
};

// The optimizer, owning nothing but its state; parameters are shared with the model.
std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerSpec& spec,
                                                        const NamedParameters& params);

}  // namespace optim
}  // namespace largebatch
