#pragma once
// Data-parallel training on LibTorch's c10d: the launch contract (torchrun / OpenMPI / Slurm environment
// variables), a communicator over ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA builds) with a TCPStore
// rendezvous, bucketed gradient all-reduce that overlaps the backward pass, and a differentiable cross-rank
// sum for synchronised BatchNorm.
#include <torch/nn/module.h>
#include <torch/types.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace largebatch {
namespace dist {

// Where this process sits in the job. Read from, in order of precedence: torchrun's RANK / WORLD_SIZE /
// LOCAL_RANK, OpenMPI's OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK}, Slurm's SLURM_PROCID / SLURM_NTASKS /
// SLURM_LOCALID. MASTER_ADDR (default 127.0.0.1) and MASTER_PORT (default 29500) name the rendezvous store.
struct LaunchEnv {
  int64_t rank = 0;
  int64_t world = 1;
  int64_t local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  std::string source = "none";  // torchrun | openmpi | slurm | none
  bool distributed() const { return world > 1; }
};

// Throws std::invalid_argument naming the variable when a value is malformed or inconsistent.
LaunchEnv launch_env_from_environment();

// A collective failed: the message names the rank that stopped answering when it can be told.
class PeerError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct CommunicatorOptions {
  // Rendezvous; a collective waits this minus the liveness check (about 3 s), so a lost rank is named
  // within it.
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
  std::chrono::milliseconds heartbeat{500};                    // liveness counter period in the store
};

class Communicator {
 public:
  // Joins the job described by env: rank 0 hosts the TCPStore, every rank connects to it, then the process
  // group for device (Gloo for CPU; NCCL for CUDA when built against a CUDA LibTorch). Gloo binds to the
  // interface in GLOO_SOCKET_IFNAME when set, otherwise to the address this host uses to reach MASTER_ADDR.
  static std::shared_ptr<Communicator> connect(const LaunchEnv& env, torch::Device device,
                                               CommunicatorOptions options = {});
  virtual ~Communicator() = default;

  int64_t rank() const { return rank_; }
  int64_t world() const { return world_; }
  const std::string& backend() const { return backend_; }

  // In-place sum over ranks, blocking.
  virtual void all_reduce_sum(torch::Tensor& tensor) = 0;
  // In-place sum over ranks; returns a waiter that blocks until done (and throws what the collective threw).
  virtual std::function<void()> all_reduce_sum_async(torch::Tensor tensor) = 0;
  // In-place broadcast of each tensor from root.
  virtual void broadcast(std::vector<torch::Tensor>& tensors, int64_t root = 0) = 0;
  virtual void barrier() = 0;

  // Turns an exception thrown by a collective into a PeerError that names the unresponsive rank(s), by
  // checking which ranks' liveness counters in the store have stopped advancing.
  [[noreturn]] virtual void raise_peer_error(const std::exception& cause) = 0;

 protected:
  int64_t rank_ = 0, world_ = 1;
  std::string backend_;
};

// Runs fn; a failure of a collective inside becomes PeerError via comm.raise_peer_error.
template <typename Fn>
auto guarded(Communicator& comm, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const PeerError&) {
    throw;
  } catch (const std::exception& e) {
    comm.raise_peer_error(e);
  }
  throw std::logic_error("unreachable");  // raise_peer_error never returns
}

// Sum over ranks that autograd differentiates: the gradient of each rank's input is the sum over ranks of
// the output gradients (each rank's output depends on every rank's input). comm must outlive backward.
torch::Tensor all_reduce_sum_differentiable(const torch::Tensor& input, Communicator& comm);

// Copies rank root's parameters and buffers into every rank's module.
void broadcast_module(torch::nn::Module& module, Communicator& comm, int64_t root = 0);
void broadcast_buffers(torch::nn::Module& module, Communicator& comm, int64_t root = 0);

// Averages gradients over ranks. Gradients live in flat per-bucket buffers (each parameter's .grad is a
// view into its bucket), buckets are filled in reverse parameter order (roughly the order backward
// produces them) and each bucket's all-reduce starts as soon as its last gradient is accumulated, while
// backward goes on. Buckets are always launched in index order so every rank issues the same sequence.
class GradientAverager {
 public:
  GradientAverager(std::vector<torch::Tensor> parameters, std::shared_ptr<Communicator> comm,
                   int64_t bucket_bytes = int64_t{1} << 20);
  ~GradientAverager();
  GradientAverager(const GradientAverager&) = delete;
  GradientAverager& operator=(const GradientAverager&) = delete;

  // Zeroes the buckets and (re)binds every .grad to its view (an optimizer's zero_grad may have reset it).
  void zero_grad();
  // Whether the next backward is the last before the optimizer step (gradient accumulation: earlier
  // micro-batches only accumulate, the last one launches the all-reduce).
  void set_last_backward(bool last) { last_backward_ = last; }
  // Launches buckets that did not fire (parameters without gradient), waits for all, divides by world.
  void finish();

  int64_t bucket_count() const { return static_cast<int64_t>(buckets_.size()); }
  // Seconds spent blocked in finish() (communication not hidden behind backward) since construction.
  double wait_seconds() const { return wait_seconds_; }

 private:
  struct Bucket {
    torch::Tensor flat;
    std::vector<int64_t> params;  // indices into parameters_
    int64_t pending = 0;
    bool launched = false;
    std::function<void()> wait;
  };
  void on_gradient_ready(int64_t param);
  void launch_ready_buckets();

  std::vector<torch::Tensor> parameters_;
  std::vector<std::pair<int64_t, int64_t>> slot_;  // param -> (bucket, offset)
  std::vector<Bucket> buckets_;
  std::vector<std::shared_ptr<void>> accumulators_;  // keep grad accumulators (and their hooks) alive
  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<bool> alive_;
  int64_t next_launch_ = 0;
  bool last_backward_ = true;
  double wait_seconds_ = 0;
};

}  // namespace dist
}  // namespace largebatch
