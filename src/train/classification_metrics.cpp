#include "classification_metrics.h"

#include "run_loop.h"

#include <cmath>
#include <cstdio>
#include <limits>

using nlohmann::json;

namespace largebatch {
namespace train {

torch::Tensor classification_loss_sum(const torch::Tensor& logits, const torch::Tensor& labels,
                                      const torch::Tensor& mix_labels, double mix_lambda, double label_smoothing) {
  namespace F = torch::nn::functional;
  const auto options = F::CrossEntropyFuncOptions().reduction(torch::kSum).label_smoothing(label_smoothing);
  const auto loss = F::cross_entropy(logits, labels, options);
  if (!mix_labels.defined()) return loss;
  return loss * mix_lambda + F::cross_entropy(logits, mix_labels, options) * (1 - mix_lambda);
}

namespace detail {

std::string metrics_header() {
  return "epoch,step,lr,phi,train_loss,train_acc,test_loss,test_top1,test_top5,epoch_seconds,img_per_s,data_wait_s,"
         "compute_s,allreduce_s,optimizer_s,val_loss,val_top1,val_top5\n";
}

std::string metrics_row(const EpochRecord& r) {
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%lld,%lld,%.9g,%.9g,%.6f,%.6f,%.6f,%.6f,%.6f,%.3f,%.1f,%.3f,%.3f,%.3f,%.3f",
                static_cast<long long>(r.epoch), static_cast<long long>(r.step), r.lr, r.phi, r.train_loss,
                r.train_acc, r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds, r.images_per_second,
                r.data_wait_seconds, r.compute_seconds, r.allreduce_seconds, r.optimizer_seconds);
  std::string row(buf);  // then the validation columns, empty without a validation split
  for (double v : {r.val_loss, r.val_top1, r.val_top5}) {
    char field[32] = "";
    if (std::isfinite(v)) std::snprintf(field, sizeof(field), "%.6f", v);
    row += std::string(",") + field;
  }
  return row + "\n";
}

json record_json(const EpochRecord& r) {
  return json{{"epoch", r.epoch}, {"step", r.step}, {"lr", r.lr}, {"phi", r.phi}, {"train_loss", r.train_loss},
              {"train_acc", r.train_acc}, {"test_loss", r.test_loss}, {"test_top1", r.test_top1},
              {"test_top5", r.test_top5}, {"epoch_seconds", r.epoch_seconds},
              {"img_per_s", r.images_per_second}, {"data_wait_s", r.data_wait_seconds},
              {"compute_s", r.compute_seconds}, {"allreduce_s", r.allreduce_seconds},
              {"optimizer_s", r.optimizer_seconds}, {"val_loss", r.val_loss}, {"val_top1", r.val_top1},
              {"val_top5", r.val_top5}};
}

EpochRecord record_from(const json& j) {
  // JSON has no NaN: nlohmann writes it as null (an epoch whose every step was skipped has no train loss).
  auto number = [&](const char* key) {
    const json& v = j.at(key);
    return v.is_null() ? std::numeric_limits<double>::quiet_NaN() : v.get<double>();
  };
  EpochRecord r;
  r.epoch = j.at("epoch");
  r.step = j.at("step");
  r.lr = number("lr");
  r.phi = number("phi");
  r.train_loss = number("train_loss");
  r.train_acc = number("train_acc");
  r.test_loss = number("test_loss");
  r.test_top1 = number("test_top1");
  r.test_top5 = number("test_top5");
  r.epoch_seconds = number("epoch_seconds");
  r.images_per_second = number("img_per_s");
  r.data_wait_seconds = number("data_wait_s");
  r.compute_seconds = j.value("compute_s", 0.0);
  r.allreduce_seconds = j.value("allreduce_s", 0.0);
  r.optimizer_seconds = j.value("optimizer_s", 0.0);
  for (auto [key, field] : {std::pair<const char*, double*>{"val_loss", &r.val_loss}, {"val_top1", &r.val_top1},
                            {"val_top5", &r.val_top5}})
    if (j.contains(key) && !j.at(key).is_null()) *field = j.at(key).get<double>();
  return r;
}

namespace {

void note_best_epochs(TrainSummary& summary, const EpochRecord& r) {
  if (r.test_top1 > summary.best_test_top1) {
    summary.best_test_top1 = r.test_top1;
    summary.best_epoch = r.epoch;
  }
  if (std::isfinite(r.val_top1) && (summary.selected_epoch == 0 || r.val_top1 > summary.selected_val_top1)) {
    summary.selected_epoch = r.epoch;
    summary.selected_val_top1 = r.val_top1;
    summary.selected_test_top1 = r.test_top1;
  }
}

TrainSummary summary_of(const std::vector<json>& history) {
  TrainSummary s;
  for (const auto& j : history) {
    s.history.push_back(record_from(j));
    note_best_epochs(s, s.history.back());
  }
  s.epochs_done = s.history.empty() ? 0 : s.history.back().epoch;
  s.final_test_top1 = s.history.empty() ? 0 : s.history.back().test_top1;
  return s;
}

}  // namespace

TrainSummary classification_summary(const LoopResult& result) {
  TrainSummary s = summary_of(result.history);
  s.status = result.status;
  s.message = result.message;
  s.steps = result.steps;
  s.wall_seconds = result.wall_seconds;
  s.world_size = result.world_size;
  s.rank = result.rank;
  s.replica_mismatches = result.replica_mismatches;
  s.skipped_steps = result.skipped_steps;
  return s;
}

json classification_summary_fields(const std::vector<json>& history, int64_t val_split) {
  const TrainSummary s = summary_of(history);
  return json{{"final_test_top1", s.final_test_top1},
              {"final_test_top5", s.history.empty() ? 0.0 : s.history.back().test_top5},
              {"best_test_top1", s.best_test_top1},
              {"best_epoch", s.best_epoch},
              {"val_split", val_split},
              {"selected_epoch", s.selected_epoch},  // on validation (0: no split)
              {"selected_val_top1", s.selected_val_top1},
              {"selected_test_top1", s.selected_test_top1}};
}

std::string classification_epoch_line(const EpochRecord& r, int64_t epochs) {
  return format("epoch %3lld/%lld  step %6lld  lr %.4g  phi %.4f  train loss %.4f acc %.4f  %stest loss %.4f top1 %.4f "
                "top5 %.4f  %.1fs %.0f img/s",
                static_cast<long long>(r.epoch), static_cast<long long>(epochs), static_cast<long long>(r.step), r.lr,
                r.phi, r.train_loss, r.train_acc,
                std::isfinite(r.val_top1) ? format("val loss %.4f top1 %.4f  ", r.val_loss, r.val_top1).c_str() : "",
                r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds, r.images_per_second);
}

}  // namespace detail
}  // namespace train
}  // namespace largebatch
