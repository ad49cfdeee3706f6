// The Python extension largebatch._largebatch: the layer-wise engine (largebatch::optim) on the tensors of a
// PyTorch model, for python/largebatch/optim.py. Tensors cross without copies: LibTorch's at::Tensor is the
// very object behind a torch.Tensor (the same libtorch in the process), so the engine steps the model's own
// parameters and reads their .grad.
#include <torch/extension.h>

#include <largebatch/optim/factory.h>
#include <largebatch/optim/layerwise.h>
#include <largebatch/optim/option_keys.h>
#include <largebatch/optim/schedule.h>

#include <c10/util/string_utils.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;
namespace lo = largebatch::optim;

namespace {

// One parameter group as optim.py hands it over.
struct GroupSpec {
  std::vector<std::string> names;
  std::vector<torch::Tensor> params;
  std::string preset;
  double lr;
  int64_t batch_size;
  std::map<std::string, std::string> overrides;  // the factory's key=value vocabulary (docs/optimizers.md)
};

lo::LayerwiseOptions options_of(const GroupSpec& g) {
  const std::string preset = lo::resolve_optimizer_name(g.preset);
  if (!lo::is_layerwise_preset(preset))
    throw std::invalid_argument("'" + g.preset + "' is not a layer-wise preset (`largebatch optimizers` lists them); "
                                "use torch.optim for " + preset);
  lo::LayerwiseOptions o = lo::preset_options(preset, g.lr, g.batch_size);
  lo::apply_overrides(o, g.overrides);
  o.lr(g.lr);
  o.validate();
  return o;
}

class Engine {
 public:
  explicit Engine(const std::vector<GroupSpec>& groups) {
    if (groups.empty()) throw std::invalid_argument("an optimizer needs at least one parameter group");
    std::vector<std::pair<lo::NamedParameters, lo::LayerwiseOptions>> built;
    for (const auto& g : groups) {
      if (g.names.size() != g.params.size()) throw std::invalid_argument("names and params differ in length");
      lo::NamedParameters named;
      for (size_t i = 0; i < g.params.size(); ++i) {
        if (!g.params[i].is_leaf()) throw std::invalid_argument("parameter " + g.names[i] + " is not a leaf tensor");
        named.insert(g.names[i], g.params[i]);
      }
      built.emplace_back(std::move(named), options_of(g));
    }
    optimizer_ = std::make_unique<lo::LayerwiseOptimizer>(built, built.front().second);
  }

  void step() {
    py::gil_scoped_release release;  // the step is C++ (and OpenMP) only
    optimizer_->step();
  }

  void set_lr(size_t group, double lr) { options(group).lr(lr); }

  // Applies key=value overrides to a group's options (a hyper-parameter changed in param_groups).
  void update_group(size_t group, const std::map<std::string, std::string>& overrides) {
    lo::LayerwiseOptions o = options(group);
    lo::apply_overrides(o, overrides);
    o.validate();
    options(group) = o;
  }

  std::string describe(size_t group) { return options(group).describe(); }

  // Per-parameter state, in parameter order over the groups: step and the buffers that exist (None otherwise).
  py::list state() const {
    py::list out;
    for (auto& group : optimizer_->param_groups())
      for (auto& p : group.params()) {
        const auto& s = state_of(p);
        py::dict d;
        d["step"] = s.step();
        d["momentum_buffer"] = s.momentum_buffer().defined() ? py::cast(s.momentum_buffer().clone()) : py::none();
        d["exp_avg"] = s.exp_avg().defined() ? py::cast(s.exp_avg().clone()) : py::none();
        d["exp_avg_sq"] = s.exp_avg_sq().defined() ? py::cast(s.exp_avg_sq().clone()) : py::none();
        out.append(d);
      }
    return out;
  }

  void load_state(const py::list& states) {
    size_t i = 0, count = 0;
    for (auto& group : optimizer_->param_groups()) count += group.params().size();
    if (states.size() != count)
      throw std::invalid_argument("state for " + std::to_string(states.size()) + " parameters, the optimizer has " +
                                  std::to_string(count));
    for (auto& group : optimizer_->param_groups())
      for (auto& p : group.params()) {
        const py::dict d = states[i++];
        auto& s = state_of(p);
        auto buffer = [&](const char* key) -> torch::Tensor {
          if (!d.contains(key) || d[key].is_none()) return {};
          torch::Tensor t = d[key].cast<torch::Tensor>();
          if (t.sizes() != p.sizes())
            throw std::invalid_argument(std::string("state '") + key + "' of " + s.name() + " has another shape");
          return t.detach().to(p.options()).clone();
        };
        s.step(d["step"].cast<int64_t>());
        s.momentum_buffer(buffer("momentum_buffer"));
        s.exp_avg(buffer("exp_avg"));
        s.exp_avg_sq(buffer("exp_avg_sq"));
      }
  }

  void set_telemetry(bool on) { optimizer_->set_telemetry(on); }

  py::dict telemetry() const {
    const lo::StepTelemetry& t = optimizer_->last_telemetry();
    py::dict out;
    out["step"] = t.step;
    out["lr"] = t.lr;
    out["phi"] = t.phi;
    py::list layers;
    for (const auto& l : t.layers) {
      py::dict d;
      d["name"] = l.name;
      d["weight_norm"] = l.weight_norm;
      d["update_norm"] = l.update_norm;
      d["grad_norm"] = l.grad_norm;
      d["trust_ratio"] = l.trust_ratio;
      d["effective_lr"] = l.effective_lr;
      layers.append(d);
    }
    out["layers"] = layers;
    return out;
  }

  bool adapts(const torch::Tensor& p) const { return optimizer_->adapts(p); }
  bool decays(const torch::Tensor& p) const { return optimizer_->decays(p); }
  int64_t steps_taken() const { return optimizer_->steps_taken(); }
  void set_kernel(const std::string& kernel) {
    if (kernel == "auto") optimizer_->set_kernel(lo::StepKernel::kAuto);
    else if (kernel == "fused") optimizer_->set_kernel(lo::StepKernel::kFused);
    else if (kernel == "tensor-ops") optimizer_->set_kernel(lo::StepKernel::kTensorOps);
    else throw std::invalid_argument("kernel '" + kernel + "' is not auto, fused or tensor-ops");
  }

 private:
  lo::LayerwiseOptions& options(size_t group) {
    if (group >= optimizer_->param_groups().size())
      throw std::out_of_range("no parameter group " + std::to_string(group));
    return static_cast<lo::LayerwiseOptions&>(optimizer_->param_groups()[group].options());
  }
  lo::LayerwiseParamState& state_of(const torch::Tensor& p) const {
    auto& states = optimizer_->state();
    const auto it = states.find(c10::guts::to_string(p.unsafeGetTensorImpl()));
    if (it == states.end()) throw std::runtime_error("parameter without optimizer state");
    return static_cast<lo::LayerwiseParamState&>(*it->second);
  }

  std::unique_ptr<lo::LayerwiseOptimizer> optimizer_;
};

}  // namespace

PYBIND11_MODULE(_largebatch, m) {
  m.doc() = "largebatch's layer-wise optimizer engine (C++), for largebatch.optim";
  py::register_exception<std::invalid_argument>(m, "OptionError", PyExc_ValueError);

  py::class_<GroupSpec>(m, "GroupSpec")
      .def(py::init([](std::vector<std::string> names, std::vector<torch::Tensor> params, std::string preset, double lr,
                       int64_t batch_size, std::map<std::string, std::string> overrides) {
             return GroupSpec{std::move(names), std::move(params), std::move(preset), lr, batch_size, std::move(overrides)};
           }),
           py::arg("names"), py::arg("params"), py::arg("preset"), py::arg("lr"), py::arg("batch_size"),
           py::arg("overrides"));

  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::vector<GroupSpec>&>(), py::arg("groups"))
      .def("step", &Engine::step)
      .def("set_lr", &Engine::set_lr, py::arg("group"), py::arg("lr"))
      .def("update_group", &Engine::update_group, py::arg("group"), py::arg("overrides"))
      .def("describe", &Engine::describe, py::arg("group"))
      .def("state", &Engine::state)
      .def("load_state", &Engine::load_state, py::arg("states"))
      .def("set_telemetry", &Engine::set_telemetry, py::arg("enabled"))
      .def("telemetry", &Engine::telemetry)
      .def("adapts", &Engine::adapts, py::arg("param"))
      .def("decays", &Engine::decays, py::arg("param"))
      .def("steps_taken", &Engine::steps_taken)
      .def("set_kernel", &Engine::set_kernel, py::arg("kernel"));

  m.def("presets", [] {
    std::vector<std::pair<std::string, std::string>> out;
    for (const auto& p : lo::layerwise_presets()) out.emplace_back(p.name, p.description);
    return out;
  });
  m.def("preset_options", [](const std::string& preset, double lr, int64_t batch_size) {
    return lo::preset_options(lo::resolve_optimizer_name(preset), lr, batch_size).describe();
  }, py::arg("preset"), py::arg("lr") = 0.1, py::arg("batch_size") = 256);
  // The values a preset gives the hyper-parameters torch.optim's groups show (exact, unlike describe()'s text).
  m.def("preset_hyper", [](const std::string& preset, double lr, int64_t batch_size) {
    const lo::LayerwiseOptions o = lo::preset_options(lo::resolve_optimizer_name(preset), lr, batch_size);
    py::dict d;
    d["momentum_direction"] = o.direction() == lo::Direction::kMomentum;
    d["momentum"] = o.momentum();
    d["beta1"] = o.beta1();
    d["beta2"] = o.beta2();
    d["weight_decay"] = o.weight_decay();
    return d;
  }, py::arg("preset"), py::arg("lr") = 0.1, py::arg("batch_size") = 256);
  m.def("resolve_preset", [](const std::string& name) { return lo::resolve_optimizer_name(name); }, py::arg("name"));
  m.def("override_keys", &lo::override_keys);
  m.def("phi", [](int64_t t, double alpha, double lambda, double delay, double gamma_min) {
    const lo::TimeVarying tv{alpha, lambda, delay, gamma_min};
    lo::validate(tv);
    return lo::tv_phi(tv, t);
  }, py::arg("t"), py::arg("alpha") = 1.0, py::arg("lambda_") = 1e-3, py::arg("delay") = 0.0,
     py::arg("gamma_min") = 0.0);
  m.def("fused_step_instruction_set", &lo::fused_step_instruction_set);

  py::class_<lo::LrSchedule>(m, "LrSchedule")
      .def(py::init([](const std::string& kind, double lr, int64_t total_steps, int64_t warmup_steps,
                       double final_ratio, const std::string& scaling, int64_t batch_size, int64_t base_batch_size,
                       double poly_power, std::vector<int64_t> milestones, double step_gamma) {
             lo::ScheduleOptions o;
             o.kind = lo::parse_schedule_kind(kind);
             o.lr = lr;
             o.total_steps = total_steps;
             o.warmup_steps = warmup_steps;
             o.final_ratio = final_ratio;
             o.scaling = lo::parse_lr_scaling(scaling);
             o.batch_size = batch_size;
             o.base_batch_size = base_batch_size;
             o.poly_power = poly_power;
             o.milestones = std::move(milestones);
             o.step_gamma = step_gamma;
             return lo::LrSchedule(o);
           }),
           py::arg("kind"), py::arg("lr"), py::arg("total_steps"), py::arg("warmup_steps") = 0,
           py::arg("final_ratio") = 0.001, py::arg("scaling") = "none", py::arg("batch_size") = 256,
           py::arg("base_batch_size") = 256, py::arg("poly_power") = 2.0,
           py::arg("milestones") = std::vector<int64_t>{}, py::arg("step_gamma") = 0.1)
      .def("at", &lo::LrSchedule::at, py::arg("step"))
      .def("__call__", &lo::LrSchedule::at, py::arg("step"))
      .def_property_readonly("peak", &lo::LrSchedule::peak);
}
