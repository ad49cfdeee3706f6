#pragma once
// The epoch records of classifying runs (train, linear-eval): metrics.csv's header and rows, the same record as
// JSON (kept in checkpoints, so a resume can rewrite the CSV), and the summary of a run's records. Internal.
#include <largebatch/train/trainer.h>

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace largebatch {
namespace train {
namespace detail {

struct LoopResult;

std::string metrics_header();
std::string metrics_row(const EpochRecord& r);
nlohmann::json record_json(const EpochRecord& r);
EpochRecord record_from(const nlohmann::json& j);

// The run's summary from the loop's result: the best test epoch, and with a validation split the epoch selected
// on it (the first of equals) and its test top-1.
TrainSummary classification_summary(const LoopResult& result);
// summary.json's classification fields of those records (final, best and selected epochs; validation size).
nlohmann::json classification_summary_fields(const std::vector<nlohmann::json>& history, int64_t val_split);
// The epoch line of the progress display.
std::string classification_epoch_line(const EpochRecord& r, int64_t epochs);

}  // namespace detail
}  // namespace train
}  // namespace largebatch
