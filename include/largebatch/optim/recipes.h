#pragma once
// Recipes: what a name given to --optimizer means, as data. A recipe names the optimizer it builds (an
// engine preset of factory.h or a LibTorch optimizer), the schedule it runs with, the learning-rate rule and
// the options each kind of task sets unless they are given. An engine preset named explicitly
// ("tvlars:paper") is a recipe that changes nothing: it runs with exactly the preset's values. The bare names
// ("lars", "tvlars", ...) are the trainer's tuned recipes; their descriptions say what they change.
// `largebatch optimizers` prints the table.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace largebatch {
namespace optim {

// The kind of training a recipe's defaults are for.
enum class Task { kClassification, kSelfSupervised };

// lr = base, times sqrt(B / 256) or B / 256 when batch-scaled.
struct LrRule {
  double base = 0.1;
  bool sqrt_batch_scaled = false;
  bool linear_batch_scaled = false;
  double at(int64_t batch_size) const;
  std::string describe() const;  // "2", "0.1 sqrt(B/256)", "0.2 B/256"
};

// What one kind of task takes from a recipe unless the run gives it.
struct TaskDefaults {
  LrRule lr;
  std::map<std::string, std::string> options;  // optimizer option = value
};

struct Recipe {
  std::string name;                  // "tvlars", "tvlars:paper", "wa-lamb", "sgd"
  std::vector<std::string> aliases;  // other spellings: "walars"
  std::string optimizer;             // the engine preset or LibTorch optimizer it builds
  std::string schedule;              // what --schedule auto means: "constant" or "warmup-cosine"
  bool lambda_per_run = false;       // TVLARS: lambda = 2 / T (T = the run's total steps) unless given
  TaskDefaults classification;
  TaskDefaults self_supervised;
  std::string description;           // one line: what it is, what it changes from its optimizer's preset

  const TaskDefaults& defaults(Task task) const {
    return task == Task::kClassification ? classification : self_supervised;
  }
};

// Every recipe, in the order `largebatch optimizers` prints them.
const std::vector<Recipe>& recipes();
// A recipe by name or alias, case-insensitive; std::invalid_argument listing the known names otherwise.
const Recipe& find_recipe(const std::string& name);
// Every name and alias a run may give, in table order.
std::vector<std::string> recipe_names();

// The optimizer a run builds from a recipe: every value resolved.
struct ResolvedRecipe {
  std::string recipe;      // the table name ("tvlars" for "TVLARS")
  std::string optimizer;   // what it builds ("tvlars:reference")
  double lr = 0;           // the learning rate used (given, or the recipe's rule at this batch size)
  std::string schedule;    // "constant", "cosine" or "warmup-cosine"
  std::map<std::string, std::string> options;  // the recipe's task defaults, then the run's own options
};

// lr < 0 takes the recipe's rule; schedule "auto" the recipe's schedule; `given` options win over the recipe's.
// total_steps feeds lambda_per_run.
ResolvedRecipe resolve_recipe(const std::string& name, Task task, int64_t batch_size, int64_t total_steps,
                              double lr, const std::string& schedule,
                              const std::map<std::string, std::string>& given);

}  // namespace optim
}  // namespace largebatch
