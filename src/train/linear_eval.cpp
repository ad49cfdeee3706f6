// `largebatch linear-eval`: a linear probe on a frozen backbone as a task of the training loop (run_loop.h). See
// include/largebatch/train/self_supervised.h.
#include <largebatch/train/self_supervised.h>

#include <largebatch/data/pipeline.h>

#include "classification_metrics.h"
#include "config_fields.h"
#include "run_loop.h"

#include <cmath>
#include <fstream>

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
namespace F = torch::nn::functional;
using nlohmann::json;
using namespace largebatch::train::detail;

namespace largebatch {
namespace train {

// ------------------------------------------------------------------ linear-eval config

std::string LinearEvalConfig::to_json() const { return config_to_json(*this); }

LinearEvalConfig LinearEvalConfig::from_json(const std::string& text, const std::string& source) {
  return config_from_json<LinearEvalConfig>(text, source);
}

void LinearEvalConfig::validate() const {
  check_options(*this);
  if (backbone.empty())
    throw OptionError("backbone", "is required: a backbone.pt of `pretrain`, a model.pt of `train`, or random");
  if (backbone == "random" && model.empty()) throw OptionError("backbone", "random needs {model}", {"model"});
  if (backbone != "random" && !fs::exists(backbone)) throw OptionError("backbone", ": no such file " + backbone);
  if (micro_batch > 0 && batch_size % micro_batch != 0)
    throw OptionError("micro-batch", std::to_string(micro_batch) + " does not divide {batch-size} " + std::to_string(batch_size),
                      {"batch-size"});
}

// ------------------------------------------------------------------ the linear-probe task

namespace {

// The linear head with its fixed feature standardisation (buffers, saved with it in head.pt).
class LinearProbeImpl : public torch::nn::Module {
 public:
  LinearProbeImpl(int64_t features, int64_t classes)
      : feature_mean(register_buffer("feature_mean", torch::zeros({features}))),
        feature_std(register_buffer("feature_std", torch::ones({features}))),
        linear(register_module("linear", torch::nn::Linear(features, classes))) {}
  torch::Tensor forward(const torch::Tensor& features) { return linear((features - feature_mean) / feature_std); }
  torch::Tensor feature_mean, feature_std;
  torch::nn::Linear linear;
};
TORCH_MODULE(LinearProbe);

// Features of every image of a data set (deterministic, no augmentation), in order, on the device.
torch::Tensor extract_features(models::ClassifierImpl& backbone, const data::ImageDataset& set, int64_t batch_size,
                               torch::Device device) {
  torch::NoGradGuard no_grad;
  data::LoaderOptions o;
  o.batch_size = batch_size;
  o.shuffle = false;
  o.workers = 2;
  data::BatchLoader loader(set, o);
  loader.start_epoch(0);
  std::vector<torch::Tensor> parts;
  data::Batch batch;
  while (loader.next(batch)) parts.push_back(backbone.features(batch.images.to(device)));
  return torch::cat(parts);
}

// The model the backbone file holds: --model, else the "model" of the config.json beside it.
std::string backbone_model_name(const LinearEvalConfig& c) {
  if (!c.model.empty()) return c.model;
  const fs::path config = fs::path(c.backbone).parent_path() / "config.json";
  std::ifstream in(config);
  if (!in)
    throw OptionError("backbone", c.backbone + ": no config.json beside it to name the model; give {model}", {"model"});
  try {
    const json j = json::parse(in);
    return j.at("model").get<std::string>();
  } catch (const std::exception&) {
    throw OptionError("backbone", ": " + config.string() + " has no \"model\" string to name the backbone's model; give {model}",
                      {"model"});
  }
}


// The backbone of --backbone: a random one, or the classifier module of a pretrain or train file.
models::Classifier load_backbone(const LinearEvalConfig& config, const std::string& model_name,
                                 const data::ImageDataset& train) {
  if (config.backbone == "random") return make_classifier(model_name, train, config.init, config.seed, train.num_classes);
  // The file's head may have another number of classes (pre-trained on another data set): read its size.
  torch::serialize::InputArchive archive;
  try {
    load_archive(config.backbone, archive, torch::kCPU);  // a GPU-trained file loads anywhere; moved later
  } catch (const CheckpointError& e) {
    throw OptionError("backbone", config.backbone +
          ": not a model file (backbone.pt or checkpoint.pt of pretrain, model.pt of train): " + e.what());
  }  // load_archive turns every LibTorch error into a CheckpointError
  // A pretrain checkpoint.pt holds the whole network: its "backbone" part is the classifier module.
  {
    torch::serialize::InputArchive model_part, backbone_part;
    if (archive.try_read("model", model_part) && model_part.try_read("backbone", backbone_part))
      archive = std::move(backbone_part);
  }
  int64_t classes = train.num_classes;
  {
    const auto probe = make_classifier(model_name, train, "default", 0, classes);
    torch::serialize::InputArchive head;
    torch::Tensor weight;
    if (archive.try_read(probe->head_name(), head) && head.try_read("weight", weight) && weight.dim() == 2)
      classes = weight.size(0);
  }
  auto backbone = make_classifier(model_name, train, "default", 0, classes);
  try {
    backbone->load(archive);
  } catch (const std::exception&) {  // c10::Error, torch::jit::ErrorReport, ...
    throw OptionError("backbone", config.backbone + ": does not hold a " + model_name + " for " +
          std::to_string(train.channels()) + "x" + std::to_string(train.height()) + "x" +
          std::to_string(train.width()) + " images of " + config.data);
  }
  return backbone;
}

// The precomputed features of the training set, in an order drawn per epoch from (seed, epoch) alone.
class FeatureSource : public BatchSource {
 public:
  FeatureSource(torch::Tensor features, torch::Tensor labels, int64_t batch_size, uint64_t seed)
      : features_(std::move(features)), labels_(std::move(labels)), batch_size_(batch_size), seed_(seed) {}
  int64_t batches_per_epoch() const override { return (features_.size(0) + batch_size_ - 1) / batch_size_; }
  void start_epoch(int64_t epoch, int64_t first_batch) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(view_seed(seed_, epoch, 0));
    order_ = torch::randperm(features_.size(0), gen, torch::kInt64).to(features_.device());
    index_ = first_batch;
  }
  bool next(data::Batch& batch) override {
    const int64_t n = features_.size(0), start = index_ * batch_size_;
    if (start >= n) return false;
    const auto rows = order_.narrow(0, start, std::min(batch_size_, n - start));
    batch.images = features_.index_select(0, rows);
    batch.labels = labels_.index_select(0, rows);
    batch.index = index_++;
    batch.global_size = rows.size(0);
    batch.offset = 0;
    return true;
  }

 private:
  torch::Tensor features_, labels_, order_;
  int64_t batch_size_;
  uint64_t seed_;
  int64_t index_ = 0;
};

class LinearProbeTask : public Task {
 public:
  explicit LinearProbeTask(const LinearEvalConfig& config) : c_(config) {}

  LoopOptions loop_options() const override {
    LoopOptions o = common_loop_options(c_, "linear-eval");
    o.micro_batch = c_.micro_batch;
    return o;
  }

  void check_resume(const std::string& saved, const fs::path& out) const override {
    require_same_identity(c_, saved, out);
  }

  // The frozen features make the probe cheap; one process is enough.
  bool data_parallel() const override { return false; }

  void setup(const RunPlace& place) override {
    place_ = place;
    split_ = load_data(c_.data, c_.data_dir, c_.synthetic_size, c_.seed);
    data::ImageDataset validation;
    if (c_.val_split > 0) {
      try {
        auto held = data::hold_out(split_.train, c_.val_split);
        split_.train = std::move(held.train);
        validation = std::move(held.validation);
      } catch (const std::invalid_argument& e) {
        throw OptionError("val-split", std::string(": ") + e.what());
      }
    }
    model_name_ = backbone_model_name(c_);
    const auto& names = models::model_names();
    if (std::find(names.begin(), names.end(), model_name_) == names.end())
      throw OptionError("backbone", c_.backbone + ": unknown model '" + model_name_ + "' in its config.json");
    backbone_ = load_backbone(c_, model_name_, split_.train);
    backbone_->to(place.device);
    for (auto& p : backbone_->parameters()) p.set_requires_grad(false);
    backbone_->eval();  // frozen: BatchNorm uses its running statistics, never updates them

    // Features of the unaugmented images: the test (and validation) set's always, the training set's for the
    // standardisation and, without --augment, for every epoch (the backbone is frozen: they never change).
    const auto t_features = Clock::now();
    const torch::Tensor train_features = extract_features(*backbone_, split_.train, c_.eval_batch_size, place.device);
    test_features_ = extract_features(*backbone_, split_.test, c_.eval_batch_size, place.device);
    test_labels_ = split_.test.labels.to(place.device);
    if (c_.val_split > 0) {
      val_features_ = extract_features(*backbone_, validation, c_.eval_batch_size, place.device);
      val_labels_ = validation.labels.to(place.device);
    }
    feature_seconds_ = seconds_since(t_features);

    torch::manual_seed(mix64(c_.seed ^ 0x5eedULL) & 0x7fffffffffffffffULL);
    probe_ = LinearProbe(backbone_->feature_dim(), split_.train.num_classes);
    if (c_.standardize) {
      torch::NoGradGuard no_grad;
      probe_->feature_mean.copy_(train_features.mean(0));
      // BatchNorm's eps keeps rare features from being blown up; a feature that is constant on the training set
      // (a dead ReLU) keeps its scale, or its untrained weight would multiply test values by 1 / eps.
      const auto var = train_features.var(0, /*unbiased=*/false);
      probe_->feature_std.copy_(torch::where(var > 1e-10, torch::sqrt(var + 1e-5), torch::ones_like(var)));
    }
    {
      // As MAE's linear probe: small weights (N(0, 0.01)), zero bias; features the training set never moves then
      // add nothing at test time.
      torch::NoGradGuard no_grad;
      probe_->linear->weight.normal_(0, 0.01);
      probe_->linear->bias.zero_();
    }
    probe_->to(place.device);
    if (c_.augment != "none") {  // images through the frozen backbone each epoch (prepare)
      data::LoaderOptions o;
      o.batch_size = c_.batch_size;
      o.shuffle = true;
      o.seed = c_.seed;
      o.workers = 2;
      o.augment = data::augment_preset(c_.augment, c_.data);
      source_ = std::make_unique<LoaderSource>(split_.train, o);
    } else {
      source_ = std::make_unique<FeatureSource>(train_features, split_.train.labels.to(place.device), c_.batch_size,
                                                c_.seed);
    }
  }

  torch::nn::Module& module() override { return *probe_; }
  lo::NamedParameters trainable() override { return probe_->named_parameters(); }
  BatchSource& batches() override { return *source_; }

  // SGD with momentum, cosine stepped per epoch (CosineAnnealingLR with T_max = epochs, to zero).
  OptimizerPlan plan_optimizer(int64_t steps_per_epoch, int64_t total_steps) override {
    OptimizerPlan plan;
    plan.optimizer = std::make_unique<torch::optim::SGD>(
        probe_->parameters(),
        torch::optim::SGDOptions(c_.lr).momentum(c_.momentum).weight_decay(c_.weight_decay));
    const double lr = c_.lr, epochs = static_cast<double>(c_.epochs);
    plan.lr_at = [lr, epochs, steps_per_epoch](int64_t step) {
      const double epoch = static_cast<double>(step / steps_per_epoch);
      return lr * 0.5 * (1.0 + std::cos(M_PI * epoch / epochs));
    };
    plan.lr = c_.lr;
    plan.description = format("SGD lr %.4g momentum %.2g weight decay %.2g, cosine over %lld epochs", c_.lr,
                              c_.momentum, c_.weight_decay, static_cast<long long>(c_.epochs));
    plan.resolved = json{{"builds", "sgd"},           {"lr", c_.lr},
                         {"momentum", c_.momentum},   {"weight_decay", c_.weight_decay},
                         {"schedule", "cosine per epoch to 0"}, {"total_steps", total_steps}};
    return plan;
  }

  std::vector<std::string> banner(const OptimizerPlan& plan, int64_t steps_per_epoch) override {
    return {format("largebatch linear-eval: %s backbone %s (%lld features, frozen) on %s (%lld train / %lld test%s) | "
                   "%s, batch %lld | features in %.1fs | %s",
                   model_name_.c_str(), c_.backbone.c_str(), static_cast<long long>(backbone_->feature_dim()),
                   c_.data.c_str(), static_cast<long long>(split_.train.size()),
                   static_cast<long long>(split_.test.size()),
                   c_.val_split > 0 ? format(" / %lld validation", static_cast<long long>(c_.val_split)).c_str() : "",
                   plan.description.c_str(), static_cast<long long>(c_.batch_size), feature_seconds_, c_.out.c_str())};
  }

  std::string config_json(double) const override { return c_.to_json(); }

  std::vector<std::string> step_metrics() const override { return {"loss_sum", "correct"}; }

  void prepare(data::Batch& batch, int64_t) override {
    if (c_.augment == "none") return;
    torch::NoGradGuard no_grad;
    batch.images = backbone_->features(batch.images.to(place_.device));
    batch.labels = batch.labels.to(place_.device);
  }

  std::vector<double> forward_backward(const data::Batch& batch, int64_t start, int64_t length,
                                       double loss_divisor) override {
    const auto y = batch.labels.narrow(0, start, length);
    const auto logits = probe_->forward(batch.images.narrow(0, start, length));
    const auto loss_sum = F::cross_entropy(logits, y, F::CrossEntropyFuncOptions().reduction(torch::kSum));
    (loss_sum / loss_divisor).backward();
    return {loss_sum.item<double>(), static_cast<double>(logits.argmax(1).eq(y).sum().item<int64_t>())};
  }

  std::string progress_fields(const EpochState& s, double) const override {
    const double seen = static_cast<double>(s.seen);
    return format("loss %.4f acc %.4f", s.sums[0] / seen, s.sums[1] / seen);
  }

  json epoch_record(const EpochState& s, dist::Communicator*) override {
    EpochRecord r;
    const double seen = static_cast<double>(s.seen);
    r.train_loss = s.seen ? s.sums[0] / seen : NAN;
    r.train_acc = s.seen ? s.sums[1] / seen : NAN;
    evaluate(test_features_, test_labels_, r.test_loss, r.test_top1, r.test_top5);
    if (c_.val_split > 0) evaluate(val_features_, val_labels_, r.val_loss, r.val_top1, r.val_top5);
    return record_json(r);
  }

  std::string epoch_line(const json& record, int64_t epochs) const override {
    return classification_epoch_line(record_from(record), epochs);
  }
  std::string metrics_header() const override { return detail::metrics_header(); }
  std::string metrics_row(const json& record) const override { return detail::metrics_row(record_from(record)); }

  json summary_fields(const std::vector<json>& history, const std::string&) const override {
    json s = classification_summary_fields(history, c_.val_split);
    s["feature_seconds"] = feature_seconds_;
    s["optimizer"] = "sgd (linear head)";
    s["backbone"] = c_.backbone;
    s["model"] = model_name_;
    s["data"] = c_.data;
    s["images"] = {{"train", split_.train.size()}, {"validation", val_labels_.defined() ? val_labels_.size(0) : 0},
                   {"test", split_.test.size()}};
    s["seed"] = c_.seed;
    return s;
  }

  void save_artifacts(const fs::path& out) override { save_module(out / "head.pt", *probe_); }

 private:
  void evaluate(const torch::Tensor& features, const torch::Tensor& labels, double& loss, double& top1,
                double& top5) {
    torch::NoGradGuard no_grad;
    probe_->eval();
    const auto logits = probe_->forward(features);
    loss = F::cross_entropy(logits, labels).item<double>();
    const int64_t k = std::min<int64_t>(5, logits.size(1));
    const auto hits = std::get<1>(logits.topk(k, 1)).eq(labels.unsqueeze(1));
    const double count = static_cast<double>(labels.size(0));
    top1 = hits.select(1, 0).sum().item<double>() / count;
    top5 = hits.any(1).sum().item<double>() / count;
    probe_->train();
  }

  const LinearEvalConfig& c_;
  RunPlace place_;
  data::DatasetSplit split_;
  std::string model_name_;
  models::Classifier backbone_{nullptr};
  LinearProbe probe_{nullptr};
  torch::Tensor test_features_, test_labels_, val_features_, val_labels_;
  double feature_seconds_ = 0;
  std::unique_ptr<BatchSource> source_;
};

}  // namespace

TrainSummary run_linear_eval(const LinearEvalConfig& config, Reporter* reporter) {
  config.validate();
  LinearProbeTask task(config);
  return classification_summary(run_loop(task, reporter));
}

}  // namespace train
}  // namespace largebatch
