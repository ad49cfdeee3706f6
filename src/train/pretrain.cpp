// `largebatch pretrain`: Barlow Twins as a task of the training loop (run_loop.h). See
// include/largebatch/train/self_supervised.h.
#include <largebatch/train/self_supervised.h>

#include <largebatch/data/pipeline.h>
#include <largebatch/optim/recipes.h>
#include <largebatch/train/barlow_twins.h>
#include <largebatch/train/precision.h>

#include "config_fields.h"
#include "run_loop.h"

#include <cmath>
#include <limits>
#include <sstream>

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;
using namespace largebatch::train::detail;

namespace largebatch {
namespace train {

std::vector<int64_t> parse_projector(const std::string& text) {
  std::vector<int64_t> sizes;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, '-')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v <= 0 || v > 65536)
      throw OptionError("projector", ": '" + text + "' is not a list of layer sizes such as 1024-1024-1024 (each 1..65536)");
    sizes.push_back(v);
  }
  if (sizes.empty()) throw OptionError("projector", "must not be empty");
  return sizes;
}

namespace {

std::string pretrain_metrics_header() {
  return "epoch,step,lr,phi,train_loss,on_diagonal,off_diagonal,epoch_seconds,img_per_s,data_wait_s,augment_s,"
         "compute_s,allreduce_s,optimizer_s\n";
}

std::string pretrain_metrics_row(const PretrainRecord& r, double augment_seconds) {
  return format("%lld,%lld,%.9g,%.9g,%.6f,%.6f,%.6f,%.3f,%.1f,%.3f,%.3f,%.3f,%.3f,%.3f\n",
                static_cast<long long>(r.epoch), static_cast<long long>(r.step), r.lr, r.phi, r.train_loss,
                r.on_diagonal, r.off_diagonal, r.epoch_seconds, r.images_per_second, r.data_wait_seconds,
                augment_seconds, r.compute_seconds, r.allreduce_seconds, r.optimizer_seconds);
}

json pretrain_record_json(const PretrainRecord& r, double augment_seconds) {
  return json{{"epoch", r.epoch}, {"step", r.step}, {"lr", r.lr}, {"phi", r.phi}, {"train_loss", r.train_loss},
              {"on_diagonal", r.on_diagonal}, {"off_diagonal", r.off_diagonal}, {"epoch_seconds", r.epoch_seconds},
              {"img_per_s", r.images_per_second}, {"data_wait_s", r.data_wait_seconds},
              {"augment_s", augment_seconds}, {"compute_s", r.compute_seconds},
              {"allreduce_s", r.allreduce_seconds}, {"optimizer_s", r.optimizer_seconds}};
}

PretrainRecord pretrain_record_from(const json& j, double* augment_seconds) {
  // JSON has no NaN: nlohmann writes it as null (an epoch whose every step was skipped has no loss).
  auto number = [&](const char* key) {
    const json& v = j.at(key);
    return v.is_null() ? std::numeric_limits<double>::quiet_NaN() : v.get<double>();
  };
  PretrainRecord r;
  r.epoch = j.at("epoch");
  r.step = j.at("step");
  r.lr = number("lr");
  r.phi = number("phi");
  r.train_loss = number("train_loss");
  r.on_diagonal = number("on_diagonal");
  r.off_diagonal = number("off_diagonal");
  r.epoch_seconds = number("epoch_seconds");
  r.images_per_second = number("img_per_s");
  r.data_wait_seconds = number("data_wait_s");
  *augment_seconds = number("augment_s");
  r.compute_seconds = number("compute_s");
  r.allreduce_seconds = number("allreduce_s");
  r.optimizer_seconds = number("optimizer_s");
  return r;
}


}  // namespace

// ------------------------------------------------------------------ pretrain config

std::string PretrainConfig::to_json() const { return config_to_json(*this); }

PretrainConfig PretrainConfig::from_json(const std::string& text, const std::string& source) {
  return config_from_json<PretrainConfig>(text, source);
}

void PretrainConfig::validate() const {
  check_options(*this);
  parse_projector(projector);
}

// ------------------------------------------------------------------ the Barlow Twins task

namespace {

class BarlowTwinsTask : public Task {
 public:
  explicit BarlowTwinsTask(const PretrainConfig& config) : c_(config), projector_sizes_(parse_projector(config.projector)) {}

  LoopOptions loop_options() const override {
    LoopOptions o = common_loop_options(c_, "pretrain");
    o.telemetry_every = c_.telemetry_every;
    o.sync_bn = c_.sync_bn;
    o.dist_timeout = c_.dist_timeout;
    o.bucket_mb = c_.bucket_mb;
    o.clip_grad_norm = c_.clip_grad_norm;
    return o;
  }

  void check_resume(const std::string& saved, const fs::path& out) const override {
    require_same_identity(c_, saved, out);
  }

  void setup(const RunPlace& place) override {
    place_ = place;
    split_ = load_data(c_.data, c_.data_dir, c_.synthetic_size, c_.seed);
    const auto& train_set = split_.train;
    if (train_set.size() < c_.batch_size && train_set.size() < 2)
      throw OptionError("data", c_.data + ": too few training images for Barlow Twins");
    backbone_ = make_classifier(c_.model, train_set, c_.init, c_.seed, train_set.num_classes);
    torch::manual_seed(mix64(c_.seed) & 0x7fffffffffffffffULL);  // the projector's initialisation
    net_ = BarlowTwinsNet(backbone_, projector_sizes_);
    net_->to(place.device);
    // The loader yields raw pixels in [0, 1]; the views are drawn per global batch and then normalised.
    data::LoaderOptions o;
    o.batch_size = c_.batch_size;
    o.shuffle = true;
    // A last batch of one image has no batch statistics; Barlow Twins needs at least two.
    const int64_t last = train_set.size() % c_.batch_size;
    o.drop_last = last == 1 || (place.world > 1 && last > 0 && last < 2 * place.world);
    o.seed = c_.seed;
    o.workers = c_.loader_workers;
    o.prefetch = 2;
    o.augment.normalize = false;
    o.rank = place.rank;
    o.world = place.world;
    source_ = std::make_unique<LoaderSource>(train_set, o);
    if (source_->batches_per_epoch() == 0)
      throw OptionError("batch-size", std::to_string(c_.batch_size) + " is larger than the data set");
    mean_ = torch::tensor(std::vector<float>(train_set.mean.begin(), train_set.mean.end())).view({1, -1, 1, 1});
    std_ = torch::tensor(std::vector<float>(train_set.std.begin(), train_set.std.end())).view({1, -1, 1, 1});
    view_options_.min_scale = c_.min_scale;
  }

  void set_communicator(dist::Communicator* comm) override { comm_ = comm; }
  torch::nn::Module& module() override { return *net_; }
  lo::NamedParameters trainable() override { return net_->trainable(); }
  BatchSource& batches() override { return *source_; }

  // The recipe's self-supervised defaults (optim/recipes.h), then --opt, then --weight-decay. The warm-up is
  // counted in this run's own steps, so it spans what the run actually trains.
  OptimizerPlan plan_optimizer(int64_t steps_per_epoch, int64_t total_steps) override {
    auto given = c_.optimizer_options;
    if (c_.weight_decay >= 0) given["weight_decay"] = format("%.17g", c_.weight_decay);
    const lo::ResolvedRecipe recipe = lo::resolve_recipe(c_.optimizer, lo::Task::kSelfSupervised, c_.batch_size,
                                                         total_steps, c_.lr, c_.schedule, given);
    check_schedule(recipe.schedule, c_.optimizer, c_.warmup_epochs, c_.epochs, c_.step_epochs);
    const lo::ScheduleOptions so = schedule_options(c_, steps_per_epoch, total_steps);
    return plan_from_recipe(recipe, net_->trainable(), c_.batch_size, so);
  }

  std::vector<std::string> banner(const OptimizerPlan& plan, int64_t steps_per_epoch) override {
    int64_t trained = 0;
    for (const auto& kv : net_->trainable()) trained += kv.value().numel();
    return {format("largebatch pretrain: Barlow Twins on %s (%lld images) | %s backbone (%lld features) + projector "
                   "%s, %lld parameters trained | %s | batch %lld | %lld epochs x %lld steps | %s",
                   c_.data.c_str(), static_cast<long long>(split_.train.size()), c_.model.c_str(),
                   static_cast<long long>(backbone_->feature_dim()), c_.projector.c_str(),
                   static_cast<long long>(trained), plan.description.c_str(), static_cast<long long>(c_.batch_size),
                   static_cast<long long>(c_.epochs), static_cast<long long>(steps_per_epoch), c_.out.c_str())};
  }

  // config.json records the learning rate used (a recipe's default resolved), so that it alone rebuilds the run.
  std::string config_json(double lr_used) const override {
    PretrainConfig recorded = c_;
    recorded.lr = lr_used;
    return recorded.to_json();
  }

  // C is summed over ranks inside the loss, so the loss is the same on every rank (and not a sum over images).
  bool per_example_loss() const override { return false; }
  std::vector<std::string> step_metrics() const override { return {"loss", "on_diagonal", "off_diagonal"}; }
  std::vector<std::string> earlier_sum_keys() const override { return {"loss_sum", "on_sum", "off_sum"}; }

  // The two views of the global batch, drawn from (seed, epoch, batch) alone: a resumed run draws the same ones.
  void prepare(data::Batch& batch, int64_t epoch) override {
    const uint64_t seed = view_seed(c_.seed, epoch, batch.index);
    auto view = [&](int v) {
      return ((barlow_twins_view(batch.images, v, seed, batch.global_size, batch.offset, view_options_) - mean_) / std_)
          .to(place_.device);
    };
    view1_ = view(0);
    view2_ = view(1);
  }

  std::vector<double> forward_backward(const data::Batch&, int64_t, int64_t, double) override {
    torch::Tensor z1, z2;
    {
      const AutocastGuard autocast(bf16_, place_.device);
      z1 = net_->forward(view1_);
      z2 = net_->forward(view2_);
    }
    // The cross-correlation in float32 whatever the precision: it sums over the whole batch.
    BarlowTwinsTerms terms;
    const auto loss = barlow_twins_loss(z1.to(torch::kFloat), z2.to(torch::kFloat), c_.lambda, comm_, &terms);
    loss.backward();
    // One host copy per step for the loss and its two terms.
    const auto logged =
        torch::stack({loss.detach(), terms.on_diagonal, terms.off_diagonal}).to(torch::kCPU, torch::kFloat64);
    const auto a = logged.accessor<double, 1>();
    return {a[0], a[1], a[2]};
  }

  std::string progress_fields(const EpochState& s, double seconds) const override {
    return format("loss %.2f %.0f img/s", s.sums[0] / static_cast<double>(s.steps_done),
                  static_cast<double>(s.seen) / seconds);
  }

  json epoch_record(const EpochState& s, dist::Communicator*) override {
    PretrainRecord r;
    const double steps = static_cast<double>(s.steps_done);
    r.train_loss = s.sums[0] / steps;
    r.on_diagonal = s.sums[1] / steps;
    r.off_diagonal = s.sums[2] / steps;
    return pretrain_record_json(r, s.prepare_s);
  }

  std::string epoch_line(const json& record, int64_t epochs) const override {
    double views = 0;
    const PretrainRecord r = pretrain_record_from(record, &views);
    return format("epoch %3lld/%lld  step %6lld  lr %.4g  phi %.4f  loss %.3f (on-diagonal %.3f, off-diagonal %.2f)  "
                  "%.1fs %.0f img/s (views %.1fs)",
                  static_cast<long long>(r.epoch), static_cast<long long>(epochs), static_cast<long long>(r.step),
                  r.lr, r.phi, r.train_loss, r.on_diagonal, r.off_diagonal, r.epoch_seconds, r.images_per_second,
                  views);
  }
  std::string metrics_header() const override { return pretrain_metrics_header(); }
  std::string metrics_row(const json& record) const override {
    double views = 0;
    const PretrainRecord r = pretrain_record_from(record, &views);
    return pretrain_metrics_row(r, views);
  }

  json summary_fields(const std::vector<json>& history, const std::string& status) const override {
    double views = 0;
    return json{{"final_loss", history.empty() ? 0.0 : pretrain_record_from(history.back(), &views).train_loss},
                {"optimizer", c_.optimizer},
                {"model", c_.model},
                {"projector", c_.projector},
                {"data", c_.data},
                {"backbone", status == "completed" ? (fs::path(c_.out) / "backbone.pt").string() : ""},
                {"images", {{"train", split_.train.size()}}},
                {"seed", c_.seed}};
  }

  void save_artifacts(const fs::path& out) override { save_module(out / "backbone.pt", *backbone_); }

 private:
  const PretrainConfig& c_;
  const bool bf16_ = is_bf16(c_.precision);
  const std::vector<int64_t> projector_sizes_;
  RunPlace place_;
  dist::Communicator* comm_ = nullptr;
  data::DatasetSplit split_;
  models::Classifier backbone_{nullptr};
  BarlowTwinsNet net_{nullptr};
  std::unique_ptr<LoaderSource> source_;
  torch::Tensor mean_, std_, view1_, view2_;
  ViewOptions view_options_;
};

}  // namespace

PretrainSummary run_pretraining(const PretrainConfig& config, Reporter* reporter) {
  config.validate();
  BarlowTwinsTask task(config);
  const LoopResult result = run_loop(task, reporter);
  PretrainSummary s;
  s.status = result.status;
  s.message = result.message;
  s.steps = result.steps;
  s.skipped_steps = result.skipped_steps;
  for (const auto& j : result.history) {
    double views = 0;
    s.history.push_back(pretrain_record_from(j, &views));
  }
  s.epochs_done = s.history.empty() ? 0 : s.history.back().epoch;
  s.final_loss = s.history.empty() ? 0 : s.history.back().train_loss;
  s.wall_seconds = result.wall_seconds;
  s.world_size = result.world_size;
  s.rank = result.rank;
  s.replica_mismatches = result.replica_mismatches;
  return s;
}

}  // namespace train
}  // namespace largebatch
