// Data parallelism on c10d. See include/largebatch/dist/dist.h for the contract.
#include <largebatch/dist/dist.h>

#include <torch/torch.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
// The Gloo header declares its class only under USE_C10D_GLOO; Debian's LibTorch exports the definition,
// some other builds do not (LibTorch itself is always built with Gloo on Linux).
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LARGEBATCH_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <thread>

namespace largebatch {
namespace dist {

namespace {

using Clock = std::chrono::steady_clock;

const char* env_or_null(const char* name) {
  const char* v = std::getenv(name);
  return (v && *v) ? v : nullptr;
}

int64_t parse_env_int(const char* name, int64_t min_value) {
  const char* v = env_or_null(name);
  char* end = nullptr;
  errno = 0;
  const long long parsed = std::strtoll(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0' || parsed < min_value)
    throw std::invalid_argument(std::string("environment variable ") + name + "='" + v + "' is not an integer >= " +
                                std::to_string(min_value));
  return parsed;
}

// The local address this host would use to reach host:port (no packet is sent: connect() on a UDP socket
// only picks the route).
std::string local_address_towards(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0 || !found)
    throw std::invalid_argument("MASTER_ADDR='" + host + "' does not resolve to an IPv4 address");
  std::string address = "127.0.0.1";
  const int fd = ::socket(AF_INET, SOCK_DGRAM, 0);
  if (fd >= 0) {
    if (::connect(fd, found->ai_addr, found->ai_addrlen) == 0) {
      sockaddr_in local{};
      socklen_t len = sizeof(local);
      char text[INET_ADDRSTRLEN] = {0};
      if (::getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len) == 0 &&
          ::inet_ntop(AF_INET, &local.sin_addr, text, sizeof(text)))
        address = text;
    }
    ::close(fd);
  }
  freeaddrinfo(found);
  return address;
}

std::string first_line(const std::string& text) {
  const auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

const std::string kAliveKey = "largebatch/alive/";
constexpr int kProbePeriods = 4;  // heartbeat periods the liveness check waits

// A collective waits the configured timeout minus the liveness check that follows a failure (and a second
// of slack), so that a rank that stopped answering is named within --dist-timeout.
std::chrono::milliseconds collective_timeout(const CommunicatorOptions& o) {
  const auto reserved = o.heartbeat * kProbePeriods + std::chrono::milliseconds(1000);
  return std::max(o.timeout - reserved, std::chrono::milliseconds(1000));
}

// Backend-specific collectives over one c10d process group type (Gloo or NCCL: same member functions in
// LibTorch 1.13, where they derive from ProcessGroup, and 2.x, where they derive from Backend).
template <typename Group>
class GroupCommunicator final : public Communicator {
 public:
  GroupCommunicator(const LaunchEnv& env, c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<Group> group,
                    std::string backend, CommunicatorOptions options)
      : env_(env), store_(std::move(store)), group_(std::move(group)), options_(options) {
    rank_ = env.rank;
    world_ = env.world;
    backend_ = std::move(backend);
    heartbeat_ = std::thread([this] { heartbeat_loop(); });
  }

  ~GroupCommunicator() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (heartbeat_.joinable()) heartbeat_.join();
  }

  void all_reduce_sum(torch::Tensor& tensor) override { all_reduce_sum_async(tensor)(); }

  std::function<void()> all_reduce_sum_async(torch::Tensor tensor) override {
    std::vector<torch::Tensor> tensors{tensor};
    auto work = group_->allreduce(tensors, c10d::AllreduceOptions());
    return [work] { work->wait(); };
  }

  void broadcast(std::vector<torch::Tensor>& tensors, int64_t root) override {
    for (auto& t : tensors) {
      std::vector<torch::Tensor> one{t};
      c10d::BroadcastOptions opts;
      opts.rootRank = root;
      group_->broadcast(one, opts)->wait();
    }
  }

  void barrier() override { group_->barrier(c10d::BarrierOptions())->wait(); }

  [[noreturn]] void raise_peer_error(const std::exception& cause) override {
    std::ostringstream msg;
    msg << "rank " << rank_ << ": a collective over " << world_ << " ranks failed";
    try {
      // A fresh client: the main one may be mid-operation. Liveness counters that stop advancing over a few
      // heartbeat periods belong to ranks that died or stopped answering.
      c10d::TCPStoreOptions o;
      o.port = static_cast<std::uint16_t>(env_.master_port);
      o.isServer = false;
      o.waitWorkers = false;
      o.timeout = std::chrono::seconds(5);
      c10d::TCPStore probe(env_.master_addr, o);
      auto counters = [&] {
        std::vector<int64_t> c;
        for (int64_t r = 0; r < world_; ++r) c.push_back(probe.add(kAliveKey + std::to_string(r), 0));
        return c;
      };
      const auto before = counters();
      std::this_thread::sleep_for(options_.heartbeat * kProbePeriods);
      const auto after = counters();
      std::vector<int64_t> silent;
      for (int64_t r = 0; r < world_; ++r)
        if (r != rank_ && after[r] == before[r]) silent.push_back(r);
      if (silent.empty()) {
        msg << " while every rank still shows signs of life";
      } else {
        msg << ": rank" << (silent.size() > 1 ? "s" : "");
        for (size_t i = 0; i < silent.size(); ++i) msg << (i ? ", " : " ") << silent[i];
        msg << " stopped answering (no heartbeat for "
            << std::chrono::duration<double>(options_.heartbeat * kProbePeriods).count() << " s)";
      }
    } catch (const std::exception&) {
      msg << ": rank 0 (host of the rendezvous store at " << env_.master_addr << ":" << env_.master_port
          << ") cannot be reached";
    }
    msg << " [" << first_line(cause.what()) << "]";
    throw PeerError(msg.str());
  }

 private:
  void heartbeat_loop() {
    try {
      c10d::TCPStoreOptions o;
      o.port = static_cast<std::uint16_t>(env_.master_port);
      o.isServer = false;
      o.waitWorkers = false;
      o.timeout = options_.timeout;
      c10d::TCPStore client(env_.master_addr, o);
      const std::string key = kAliveKey + std::to_string(rank_);
      std::unique_lock<std::mutex> lock(mutex_);
      while (!stopping_) {
        lock.unlock();
        client.add(key, 1);
        lock.lock();
        cv_.wait_for(lock, options_.heartbeat, [this] { return stopping_; });
      }
    } catch (const std::exception&) {
      // The store went away (rank 0 ended or died): the next collective reports it.
    }
  }

  LaunchEnv env_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<Group> group_;
  CommunicatorOptions options_;
  std::thread heartbeat_;
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stopping_ = false;
};

}  // namespace

LaunchEnv launch_env_from_environment() {
  LaunchEnv env;
  struct Scheme {
    const char* source;
    const char* rank;
    const char* world;
    const char* local;
  };
  const Scheme schemes[] = {{"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"},
                            {"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
                            {"slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}};
  for (const auto& s : schemes) {
    const bool has_rank = env_or_null(s.rank), has_world = env_or_null(s.world);
    if (!has_rank && !has_world) continue;
    if (!has_rank || !has_world)
      throw std::invalid_argument(std::string("environment variable ") + (has_rank ? s.world : s.rank) +
                                  " is missing while " + (has_rank ? s.rank : s.world) + " is set");
    env.source = s.source;
    env.rank = parse_env_int(s.rank, 0);
    env.world = parse_env_int(s.world, 1);
    env.local_rank = env_or_null(s.local) ? parse_env_int(s.local, 0) : env.rank;
    if (env.rank >= env.world)
      throw std::invalid_argument(std::string("environment variable ") + s.rank + "=" + std::to_string(env.rank) +
                                  " is not below " + s.world + "=" + std::to_string(env.world));
    break;
  }
  if (const char* addr = env_or_null("MASTER_ADDR")) env.master_addr = addr;
  if (env_or_null("MASTER_PORT")) {
    const int64_t port = parse_env_int("MASTER_PORT", 1);
    if (port > 65535) throw std::invalid_argument("environment variable MASTER_PORT=" + std::to_string(port) +
                                                  " is not a port (1..65535)");
    env.master_port = static_cast<int>(port);
  }
  return env;
}

namespace {

// Whether another program listens on (or holds) the port rank 0 must host the rendezvous on. Binds the way
// c10d's server does (IPv6 any, dual-stack, else IPv4 any; SO_REUSEADDR) and lets go at once, so that a taken
// port is one clear error rather than c10d's log lines and exception.
bool port_taken(int port) {
  for (const int family : {AF_INET6, AF_INET}) {
    const int fd = ::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;  // no IPv6 here: try IPv4
    const int one = 1, zero = 0;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    int rc;
    if (family == AF_INET6) {
      ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
      sockaddr_in6 a{};
      a.sin6_family = AF_INET6;
      a.sin6_addr = in6addr_any;
      a.sin6_port = htons(static_cast<uint16_t>(port));
      rc = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    } else {
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_addr.s_addr = htonl(INADDR_ANY);
      a.sin_port = htons(static_cast<uint16_t>(port));
      rc = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    }
    const int bind_errno = errno;
    ::close(fd);
    if (rc == 0) return false;
    if (bind_errno == EADDRINUSE) return true;
  }
  return false;  // some other failure: c10d reports it
}

}  // namespace

std::shared_ptr<Communicator> Communicator::connect(const LaunchEnv& env, torch::Device device,
                                                    CommunicatorOptions options) {
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  if (env.rank == 0 && port_taken(env.master_port))
    throw PeerError("rank 0: cannot host the rendezvous: port " + std::to_string(env.master_port) +
                    " (MASTER_PORT) is already in use on this machine (another run?); choose another MASTER_PORT");
  c10::intrusive_ptr<c10d::Store> store;
  try {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(env.master_port);
    o.isServer = env.rank == 0;
    o.numWorkers = static_cast<std::size_t>(env.world);
    o.waitWorkers = true;
    o.timeout = options.timeout;
    store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, o);
  } catch (const std::exception& e) {
    throw PeerError("rank " + std::to_string(env.rank) + ": rendezvous with " + std::to_string(env.world) +
                    " ranks at " + where + " failed [" + first_line(e.what()) + "]");
  }
  try {
    if (device.is_cuda()) {
#ifdef LARGEBATCH_WITH_NCCL
      auto o = c10d::ProcessGroupNCCL::Options::create();
      o->timeout = collective_timeout(options);
      auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, static_cast<int>(env.rank),
                                                               static_cast<int>(env.world), o);
      return std::make_shared<GroupCommunicator<c10d::ProcessGroupNCCL>>(env, store, group, "nccl", options);
#else
      throw std::invalid_argument("--device " + device.str() +
                                  ": this build has no NCCL (configure against a CUDA LibTorch)");
#endif
    }
    auto o = c10d::ProcessGroupGloo::Options::create(collective_timeout(options));
    if (const char* ifname = env_or_null("GLOO_SOCKET_IFNAME"))
      o->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    else
      o->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(local_address_towards(env.master_addr, env.master_port)));
    o->threads = 2;
    auto group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(env.rank),
                                                             static_cast<int>(env.world), o);
    return std::make_shared<GroupCommunicator<c10d::ProcessGroupGloo>>(env, store, group, "gloo", options);
  } catch (const std::invalid_argument&) {
    throw;
  } catch (const std::exception& e) {
    throw PeerError("rank " + std::to_string(env.rank) + ": creating the process group of " +
                    std::to_string(env.world) + " ranks (store " + where + ") failed [" + first_line(e.what()) + "]");
  }
}

// ------------------------------------------------------------------ differentiable sum

namespace {

struct AllReduceSum : public torch::autograd::Function<AllReduceSum> {
  // The communicator travels as an integer in saved_data (which holds IValues); it outlives backward because
  // its owner (the trainer) keeps it for the whole run.
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor input, Communicator* comm) {
    ctx->saved_data["comm"] = reinterpret_cast<int64_t>(comm);
    auto out = input.clone();
    guarded(*comm, [&] { comm->all_reduce_sum(out); });
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* comm = reinterpret_cast<Communicator*>(ctx->saved_data["comm"].toInt());
    auto g = grads[0].contiguous().clone();
    guarded(*comm, [&] { comm->all_reduce_sum(g); });
    return {g, torch::Tensor()};
  }
};

}  // namespace

torch::Tensor all_reduce_sum_differentiable(const torch::Tensor& input, Communicator& comm) {
  return AllReduceSum::apply(input, &comm);
}

void broadcast_module(torch::nn::Module& module, Communicator& comm, int64_t root) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> tensors;
  for (auto& p : module.parameters()) tensors.push_back(p.data());
  for (auto& b : module.buffers()) tensors.push_back(b);
  guarded(comm, [&] { comm.broadcast(tensors, root); });
}

void broadcast_buffers(torch::nn::Module& module, Communicator& comm, int64_t root) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> tensors;
  for (auto& b : module.buffers()) tensors.push_back(b);
  guarded(comm, [&] { comm.broadcast(tensors, root); });
}

// ------------------------------------------------------------------ gradient averaging

GradientAverager::GradientAverager(std::vector<torch::Tensor> parameters, std::shared_ptr<Communicator> comm,
                                   int64_t bucket_bytes)
    : parameters_(std::move(parameters)), comm_(std::move(comm)), alive_(std::make_shared<bool>(true)) {
  if (bucket_bytes <= 0) throw std::invalid_argument("GradientAverager: bucket_bytes must be > 0");
  slot_.resize(parameters_.size());
  // Reverse order: the last layers' gradients are produced first by backward.
  std::vector<int64_t> sizes;
  int64_t current_bytes = 0;
  for (int64_t i = static_cast<int64_t>(parameters_.size()) - 1; i >= 0; --i) {
    const auto& p = parameters_[i];
    const bool new_bucket = buckets_.empty() || current_bytes >= bucket_bytes ||
                            p.scalar_type() != parameters_[buckets_.back().params.front()].scalar_type() ||
                            p.device() != parameters_[buckets_.back().params.front()].device();
    if (new_bucket) {
      buckets_.emplace_back();
      sizes.push_back(0);
      current_bytes = 0;
    }
    slot_[i] = {static_cast<int64_t>(buckets_.size()) - 1, sizes.back()};
    buckets_.back().params.push_back(i);
    sizes.back() += p.numel();
    current_bytes += p.numel() * static_cast<int64_t>(p.element_size());
  }
  for (size_t b = 0; b < buckets_.size(); ++b) {
    const auto& first = parameters_[buckets_[b].params.front()];
    buckets_[b].flat = torch::zeros({sizes[b]}, first.options().requires_grad(false));
  }
  for (int64_t i = 0; i < static_cast<int64_t>(parameters_.size()); ++i) {
    auto accumulator = torch::autograd::impl::grad_accumulator(parameters_[i]);
    if (!accumulator) throw std::invalid_argument("GradientAverager: parameter " + std::to_string(i) +
                                                  " is not a leaf that requires grad");
    std::weak_ptr<bool> alive = alive_;
    accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [this, i, alive](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          if (!alive.expired()) on_gradient_ready(i);
          return outputs;
        }));
    accumulators_.push_back(std::static_pointer_cast<void>(accumulator));
  }
  zero_grad();
}

GradientAverager::~GradientAverager() {
  alive_.reset();
  for (auto& b : buckets_)
    if (b.wait) {
      try {
        b.wait();
      } catch (...) {
      }
    }
}

void GradientAverager::zero_grad() {
  for (auto& b : buckets_) {
    if (b.wait) b.wait();  // never zero a buffer a collective is still reading
    b.wait = nullptr;
    b.flat.zero_();
    b.pending = static_cast<int64_t>(b.params.size());
    b.launched = false;
  }
  next_launch_ = 0;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    auto& p = parameters_[i];
    const auto [bucket, offset] = slot_[i];
    auto view = buckets_[bucket].flat.narrow(0, offset, p.numel()).view(p.sizes());
    if (!p.grad().defined() || !p.grad().is_same(view)) p.mutable_grad() = view;
  }
}

void GradientAverager::on_gradient_ready(int64_t param) {
  if (!last_backward_) return;
  auto& bucket = buckets_[slot_[param].first];
  if (bucket.launched || bucket.pending == 0) return;  // a parameter used twice fires once per use
  if (--bucket.pending == 0) launch_ready_buckets();
}

void GradientAverager::launch_ready_buckets() {
  while (next_launch_ < static_cast<int64_t>(buckets_.size()) && buckets_[next_launch_].pending == 0) {
    auto& b = buckets_[next_launch_++];
    b.launched = true;
    b.wait = guarded(*comm_, [&] { return comm_->all_reduce_sum_async(b.flat); });
  }
}

void GradientAverager::finish() {
  const auto t0 = Clock::now();
  // Buckets whose parameters got no gradient this step, in index order as on every rank.
  for (auto& b : buckets_) b.pending = 0;
  launch_ready_buckets();
  for (auto& b : buckets_) {
    if (b.wait) guarded(*comm_, [&] { b.wait(); });
    b.wait = nullptr;
    b.flat.div_(static_cast<double>(comm_->world()));
  }
  wait_seconds_ += std::chrono::duration<double>(Clock::now() - t0).count();
}

}  // namespace dist
}  // namespace largebatch
