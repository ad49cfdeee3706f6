// largebatch: the command-line program. Subcommands are added per capability (train, sweep, report, bench).
#include "commands.h"

#include <largebatch/largebatch.h>

#include <CLI/CLI.hpp>

#include <cstdio>
#include <iostream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include <sstream>

namespace lo = largebatch::optim;

namespace {

// Config files: JSON (an object whose keys are option names, as written to config.json) or CLI11's TOML.
// Keys without a section belong to the subcommand given on the command line (e.g. train).
class JsonOrTomlConfig : public CLI::ConfigTOML {
 public:
  explicit JsonOrTomlConfig(const CLI::App* app) : app_(app) {}

  std::vector<CLI::ConfigItem> from_config(std::istream& input) const override {
    auto items = parse(input);
    const auto subcommands = app_->get_subcommands();
    if (!subcommands.empty()) {
      for (auto& item : items)
        if (item.parents.empty()) item.parents.push_back(subcommands.front()->get_name());
    }
    return items;
  }

 private:
  const CLI::App* app_;

  std::vector<CLI::ConfigItem> parse(std::istream& input) const {
    std::stringstream ss;
    ss << input.rdbuf();
    const std::string text = ss.str();
    const auto first = text.find_first_not_of(" \t\r\n");
    if (first == std::string::npos || text[first] != '{') {
      std::istringstream again(text);
      return CLI::ConfigTOML::from_config(again);
    }
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {  // parse_error, and out_of_range for 1e99999
      throw CLI::ConversionError("--config: not valid JSON: " + std::string(e.what()));
    }
    std::vector<CLI::ConfigItem> items;
    for (auto it = j.begin(); it != j.end(); ++it) {
      CLI::ConfigItem item;
      item.name = it.key();
      auto text_of = [](const nlohmann::json& v) {
        if (v.is_string()) return v.get<std::string>();
        if (v.is_boolean()) return std::string(v.get<bool>() ? "true" : "false");
        return v.dump();
      };
      if (it.value().is_array()) {
        for (const auto& v : it.value()) item.inputs.push_back(text_of(v));
        if (item.inputs.empty()) continue;  // an empty list sets nothing
      } else if (it.value().is_object()) {
        throw CLI::ConversionError("--config: key '" + it.key() + "' holds an object; expected a value or a list");
      } else {
        item.inputs.push_back(text_of(it.value()));
      }
      items.push_back(std::move(item));
    }
    return items;
  }
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"largebatch: large-batch training with layer-wise adaptive optimizers (LARS, TVLARS, LAMB)"};
  app.require_subcommand(0, 1);
  bool show_version = false;
  app.add_flag("--version", show_version, "Print the version, LibTorch, BLAS and allocator in use, and exit");

  // optimizers: list presets and their exact options.
  auto* list = app.add_subcommand("optimizers", "List the optimizer presets and their exact options");
  double list_lr = 0.1;
  int64_t list_batch = 256;
  list->add_option("--lr", list_lr, "Learning rate to show in the options")->capture_default_str();
  list->add_option("--batch-size", list_batch, "Global batch size B (tvlars:paper's gamma_min depends on it)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);

  // phi: the TVLARS factor as CSV, for plots.
  auto* phi = app.add_subcommand("phi", "Print the TVLARS factor phi_t = 1/(alpha + exp(lambda (t - d_e))) + gamma_min as CSV");
  lo::TimeVarying tv;
  int64_t phi_steps = 100;
  phi->add_option("--alpha", tv.alpha, "alpha (> 0)")->capture_default_str();
  phi->add_option("--lambda", tv.lambda, "decay coefficient lambda (>= 0)")->capture_default_str();
  phi->add_option("--delay", tv.delay, "delay d_e in steps")->capture_default_str();
  phi->add_option("--gamma-min", tv.gamma_min, "floor gamma_min (>= 0)")->capture_default_str();
  phi->add_option("--steps", phi_steps, "number of steps")->capture_default_str()->check(CLI::PositiveNumber);

  app.config_formatter(std::make_shared<JsonOrTomlConfig>(&app));
  app.set_config("--config", "",
                 "Read a subcommand's options from a JSON or TOML file (keys = option names, as in a run's "
                 "config.json); flags given on the command line win")
      ->check(CLI::ExistingFile);
  auto run_train = largebatch::apps::add_train_command(app);
  auto run_summarize = largebatch::apps::add_summarize_command(app);
  auto run_bench = largebatch::apps::add_bench_command(app);
  auto run_launch = largebatch::apps::add_launch_command(app);
  auto run_compare = largebatch::apps::add_compare_command(app);
  auto run_pretrain = largebatch::apps::add_pretrain_command(app);
  auto run_linear_eval = largebatch::apps::add_linear_eval_command(app);
  auto run_sweep = largebatch::apps::add_sweep_command(app);
  auto run_report = largebatch::apps::add_report_command(app);
  auto run_lr_find = largebatch::apps::add_lr_find_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }

  try {
    if (largebatch::apps::parse_only()) {  // train, pretrain and linear-eval check their configuration too
      for (const auto& checked : {run_train, run_pretrain, run_linear_eval})
        if (int rc = checked(); rc >= 0) return rc;
      std::printf("largebatch: options accepted (LARGEBATCH_PARSE_ONLY=1: nothing run)\n");
      return 0;
    }
    if (show_version) {
      std::cout << largebatch::runtime_summary() << "\n";
      return 0;
    }
    if (int rc = run_train(); rc >= 0) return rc;
    if (int rc = run_summarize(); rc >= 0) return rc;
    if (int rc = run_bench(); rc >= 0) return rc;
    if (int rc = run_launch(); rc >= 0) return rc;
    if (int rc = run_compare(); rc >= 0) return rc;
    if (int rc = run_pretrain(); rc >= 0) return rc;
    if (int rc = run_linear_eval(); rc >= 0) return rc;
    if (int rc = run_sweep(); rc >= 0) return rc;
    if (int rc = run_report(); rc >= 0) return rc;
    if (int rc = run_lr_find(); rc >= 0) return rc;
    if (list->parsed()) {
      // The recipes (what --optimizer takes), then the engine presets they build, with every value.
      auto options_text = [](const std::map<std::string, std::string>& options) {
        std::string text;
        for (const auto& [k, v] : options) text += (text.empty() ? "" : ",") + k + "=" + v;
        return text.empty() ? std::string("none") : text;
      };
      std::cout << "Recipes (--optimizer NAME; explicit preset names run with exactly the preset's values):\n";
      for (const auto& r : lo::recipes()) {
        std::cout << r.name;
        for (const auto& alias : r.aliases) std::cout << " | " << alias;
        std::cout << "  builds " << r.optimizer << ", " << r.schedule << " schedule"
                  << (r.lambda_per_run ? ", lambda = 2/T" : "") << "\n  " << r.description
                  << "\n  classification: lr " << r.classification.lr.describe() << ", options "
                  << options_text(r.classification.options) << "\n  self-supervised: lr "
                  << r.self_supervised.lr.describe() << ", options " << options_text(r.self_supervised.options)
                  << "\n";
      }
      std::cout << "\nEngine presets at lr " << list_lr << ", B " << list_batch << ":\n";
      for (const auto& p : lo::layerwise_presets()) {
        std::cout << p.name << "\n  " << p.description << "\n  "
                  << lo::preset_options(p.name, list_lr, list_batch).describe() << "\n";
      }
      return 0;
    }
    if (phi->parsed()) {
      lo::validate(tv);
      std::cout << "step,phi\n";
      for (int64_t t = 0; t < phi_steps; ++t) std::printf("%lld,%.17g\n", static_cast<long long>(t), lo::tv_phi(tv, t));
      return 0;
    }
    std::cout << app.help();
    return 0;
  } catch (const std::invalid_argument& e) {
    std::cerr << "largebatch: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "largebatch: error: " << e.what() << "\n";
    return 1;
  }
}
