#pragma once
// Pieces the training loop (run_loop.h) and its tasks share: output files written atomically, checkpoints, the
// device flag, the output-directory rules, data and model construction. Internal to the library.
#include <largebatch/data/dataset.h>
#include <largebatch/dist/dist.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/layerwise.h>
#include <largebatch/optim/recipes.h>
#include <largebatch/train/checkpoint.h>
#include <largebatch/train/options.h>
#include <largebatch/train/reporter.h>
#include <largebatch/train/trainer.h>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <filesystem>
#include <functional>
#include <string>
#include <utility>

namespace largebatch {
namespace train {
namespace detail {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

[[noreturn]] inline void usage(const std::string& message) { throw UsageError(message); }

bool one_of(const std::string& value, std::initializer_list<const char*> options);

// Writes text to path atomically and durably (temporary file, fsync, rename): a kill or power cut leaves the old
// file or the new one, never half of one. std::runtime_error naming the file and the system's reason (a full
// disk, no permission) otherwise, with the temporary file removed.
void write_atomically(const std::filesystem::path& path, const std::string& text);

// "cpu", "cuda", "cuda:N"; UsageError naming --device when CUDA is missing or the index does not exist.
torch::Device parse_device(const std::string& name);

// Intra-op threads: n > 0, or every core for 0.
void set_threads(int64_t n);

// What the run's optimizer resolved to, for summary.json: the recipe, what it built, the learning rate and
// schedule used, every option given to the factory and, for the layer-wise engine, every option's value.
nlohmann::json resolved_optimizer_json(const optim::ResolvedRecipe& recipe, const torch::optim::Optimizer& optimizer,
                                       int64_t warmup_steps, int64_t total_steps);

// The data set by name; "synthetic" is made with synthetic_size training images (a quarter as many, at least
// 64, for test).
data::DatasetSplit load_data(const std::string& name, const std::string& dir, int64_t synthetic_size, uint64_t seed);

// A zoo model for images of data set d.
models::Classifier make_classifier(const std::string& name, const data::ImageDataset& d, const std::string& init,
                                   uint64_t seed, int64_t num_classes);

// Data parallel: connects to the other ranks (timeout in seconds) and, with sync_bn, makes every
// SyncableBatchNorm2d of module use the global batch; *cross_rank_sum (if given) receives that sum.
std::shared_ptr<dist::Communicator> connect_ranks(const dist::LaunchEnv& env, torch::Device device, double timeout,
                                                  bool sync_bn, torch::nn::Module& module,
                                                  models::CrossRankSum* cross_rank_sum = nullptr);

// The output directory's rules: a fresh run never overwrites a previous one's results (metrics.csv or
// checkpoint.pt present); check_resumed (given the saved config.json's text) refuses a resume whose identity
// flags differ. Creates the directory on the lead rank (UsageError naming --out if it cannot, or cannot write
// in it). Returns whether there is a checkpoint to resume from: --resume without one starts from the beginning.
bool prepare_output_dir(const std::filesystem::path& out, bool resume, bool lead, Reporter* reporter,
                        const std::function<void(const std::string& saved_config)>& check_resumed);

// The checkpoint container (format in <largebatch/train/checkpoint.h>): header + CRC-32 around a payload.
std::string seal_checkpoint(const std::string& payload);
bool is_sealed_checkpoint(const std::string& bytes);
// {offset, size} of the payload of a sealed file's bytes; CheckpointError naming path for any defect.
std::pair<size_t, size_t> unseal_checkpoint(const std::string& bytes, const std::string& path);

// Whether a training loop writes a checkpoint within the epoch after a step (step: steps done; index: batches
// of this epoch done): every `every` steps (0: never), except after the epoch's last batch, which the
// end-of-epoch checkpoint follows; and always when stopping, so that a resume repeats no step.
inline bool checkpoint_within_epoch_due(int64_t every, int64_t step, int64_t index, int64_t steps_per_epoch,
                                        bool stopping) {
  return stopping || (every > 0 && step % every == 0 && index < steps_per_epoch);
}

// A checkpoint's record of an unfinished epoch ({} at an epoch's end); UsageError naming the checkpoint when
// its batch lies beyond the epoch (the data set or --drop-last changed).
nlohmann::json within_epoch_of(const nlohmann::json& meta, int64_t steps_per_epoch, const std::filesystem::path& checkpoint);
// Data parallel: every rank must resume from the same step (each reads the checkpoint itself: a rank that finds
// none, on a machine whose --out is not shared, would start afresh and drift silently). UsageError otherwise.
void require_same_resume_point(dist::Communicator* comm, bool resuming, int64_t step, const std::filesystem::path& out);

// Appends a row to a log whose content a checkpoint also holds (metrics.csv); std::runtime_error naming the file
// and the reason (a full disk) if it cannot: the run stops, and a resume rewrites the file from the checkpoint.
void append_line(const std::filesystem::path& path, const std::string& text);

// Checkpoint: the module, the optimizer's state, the CPU generator's state and a JSON "meta" record, sealed
// and written atomically (write_atomically).
// average: the tensors of a weight average (--ema-decay), saved beside the module when given.
void save_checkpoint(const std::filesystem::path& path, torch::nn::Module& module, torch::optim::Optimizer& optimizer,
                     const nlohmann::json& meta, const std::vector<torch::Tensor>* average = nullptr);
// Restores what save_checkpoint wrote and returns meta; UsageError naming the file if it cannot be read.
// average: filled with the saved average's tensors (left empty when the checkpoint has none).
nlohmann::json load_checkpoint(const std::filesystem::path& path, torch::nn::Module& module,
                               torch::optim::Optimizer& optimizer, torch::Device device,
                               std::vector<torch::Tensor>* average = nullptr);

// Saves a module's parameters and buffers as a bare LibTorch archive (torch::load reads it), atomically.
void save_module(const std::filesystem::path& path, torch::nn::Module& module);

// The stop request of request_stop() (signal handlers set it; loops poll it once per step).
std::atomic<bool>& stop_flag();

// telemetry.csv (step,layer,weight_norm,update_norm,grad_norm,trust_ratio,effective_lr,lr,phi): opens it fresh, or on
// resume keeps only the rows of steps before `step` and appends. UsageError naming the file if unwritable.
void open_telemetry(std::ofstream& file, const std::filesystem::path& path, bool resume, int64_t step);
// Any per-step CSV log whose first column is a step: fresh with header, or on resume keeping only rows whose
// step is below keep_below (rows the checkpoint covers) and appending. UsageError names flag if unwritable.
void open_csv_log(std::ofstream& file, const std::filesystem::path& path, const std::string& header, bool resume,
                  int64_t keep_below, const std::string& option);
void write_telemetry(std::ofstream& file, int64_t step, const optim::StepTelemetry& telemetry);

// "; largest trust ratio at step t: <layer> (r = ..., lr*r = ...)" from the optimizer's last step, or "" when
// there is none: the likely culprit of a divergence.
std::string largest_trust_ratio(const optim::LayerwiseOptimizer* optimizer);
// Name of the first parameter whose gradient holds a NaN or an infinity, "" when all are finite (one host read).
std::string first_nonfinite_gradient(torch::nn::Module& module);
// The same for the parameters themselves.
std::string first_nonfinite_parameter(torch::nn::Module& module);

// Data parallel: how many parameter elements differ from rank 0's (0 when replicas are bit-identical).
int64_t replica_mismatches(torch::nn::Module& module, dist::Communicator& comm);

inline uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// A seed that depends only on (seed, epoch, batch index): a resumed run draws the same views and orders.
inline uint64_t view_seed(uint64_t seed, int64_t epoch, int64_t index) {
  return mix64(mix64(mix64(seed) ^ static_cast<uint64_t>(epoch)) ^ static_cast<uint64_t>(index));
}


// printf into a std::string.
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

}  // namespace detail
}  // namespace train
}  // namespace largebatch
