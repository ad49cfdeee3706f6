"""Layer-wise optimizers as torch.optim.Optimizer, stepped by largebatch's C++ engine on the model's own tensors.

    from largebatch import optim
    opt = optim.make("tvlars", model.named_parameters(), lr=1.0, weight_decay=5e-4)
    opt = optim.make("lamb:timm", model.parameters(), lr=1e-3, betas=(0.9, 0.999), max_grad_norm=1.0)
    opt = optim.LARS(model.parameters(), lr=2.0, momentum=0.9, weight_decay=5e-4, eta=1e-3)

`preset` is any name of `largebatch optimizers` / `largebatch.presets()` (a bare name builds the preset the
command line builds for it: "lars" lars:reference, "tvlars" tvlars:reference, "lamb" lamb:paper); `hyper` uses the vocabulary of docs/optimizers.md (momentum, nesterov,
weight_decay, eta, eps, trust_clip, betas, bias_correction, max_grad_norm, decoupled_decay, lr_ratio_1d, and the
engine's own option names: alpha, lambda, delay, gamma_min, weight_norm_clamp, ...). An unknown name is an error.
"""
import math
import numbers

import torch

from . import _largebatch as _engine

__all__ = ["Optimizer", "make", "LARS", "TVLARS", "LAMB"]

# Keys of a param group that are not the engine's options.
_GROUP_KEYS = ("params", "names", "lr", "preset", "batch_size")
# The engine's option names (apply_overrides), and the peers' spelling of lambda.
_ENGINE_KEYS = frozenset(_engine.override_keys()) | {"lambda_"}
# Keys PyTorch's and timm's schedulers and parameter-group helpers keep in a group for themselves (OneCycleLR,
# CyclicLR, SWALR, ReduceLROnPlateau's state, timm's layer decay); they never reach the engine. A key that is neither
# an engine option nor one of these is refused when the optimizer is built (a misspelt hyper-parameter) and, when a
# scheduler adds it later, left alone.
_SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum",
                             "swa_lr", "lr_scale", "weight_decay_scale", "param_names"})


def _option_text(key, value):
    """A hyper-parameter as the engine's key=value text."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Real):
        if not math.isfinite(float(value)):
            raise ValueError("optimizer option %s = %r is not finite" % (key, value))
        return repr(float(value)) if not isinstance(value, numbers.Integral) else str(int(value))
    if isinstance(value, str):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _option_text(key, value[0]) + ":" + _option_text(key, value[1])
    raise TypeError("optimizer option %s = %r is not a number, boolean, None, text or pair" % (key, value))


def _engine_key(key):
    return "lambda" if key == "lambda_" else key


def _groups_of(params):
    """Param groups from tensors, (name, tensor) pairs or group dicts; every tensor gets a name."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, not a tensor")
    items = list(params)
    if not items:
        raise ValueError("the optimizer got an empty parameter list")
    if all(isinstance(x, dict) for x in items):
        groups = []
        for g in items:
            g = dict(g)
            inner = _groups_of(g["params"]) if not isinstance(g["params"], torch.Tensor) else [
                {"params": [g["params"]], "names": [None]}]
            g["params"] = inner[0]["params"]
            g.setdefault("names", inner[0]["names"])
            groups.append(g)
        return groups
    names, tensors = [], []
    for x in items:
        if isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[0], str):
            names.append(x[0])
            tensors.append(x[1])
        elif isinstance(x, torch.Tensor):
            names.append(None)
            tensors.append(x)
        else:
            raise TypeError("params must hold tensors, (name, tensor) pairs or dicts, got %r" % type(x))
    return [{"params": tensors, "names": names}]


class Optimizer(torch.optim.Optimizer):
    """A layer-wise preset of the C++ engine as a torch.optim.Optimizer.

    param_groups[i]["lr"] is read before every step (so any torch.optim.lr_scheduler drives it); another
    hyper-parameter changed in a group is applied to the engine before the next step (the masks, resolved when the
    optimizer was built, stay). state_dict() / load_state_dict() hold every tensor's step count and buffers and
    continue a run bit for bit.
    """

    def __init__(self, params, preset, lr, batch_size=256, **hyper):
        _check_lr("lr", lr)
        groups = _groups_of(params)
        for i, g in enumerate(groups):
            if "lambda_" in g:
                if "lambda" in g:
                    raise ValueError("param group %d sets both lambda and lambda_" % i)
                g["lambda"] = g.pop("lambda_")
            if "lr" in g:
                _check_lr("param group %d: lr" % i, g["lr"])
            unknown = [k for k in g if k not in _GROUP_KEYS and k not in _ENGINE_KEYS and k not in _SCHEDULER_KEYS]
            if unknown:
                raise ValueError("param group %d: unknown optimizer option %s" % (i, ", ".join(map(repr, unknown))))
        if "lambda_" in hyper and "lambda" in hyper:
            raise ValueError("both lambda and lambda_ given")
        unknown = [k for k in hyper if k not in _ENGINE_KEYS]
        if unknown:
            raise ValueError("unknown optimizer option %s (known: %s)" % (
                ", ".join(map(repr, unknown)), ", ".join(_engine.override_keys())))
        defaults = dict(lr=lr, preset=preset, batch_size=batch_size)
        defaults.update({_engine_key(k): v for k, v in hyper.items()})
        # The preset's momentum (or betas) and weight decay appear in the groups, as in torch.optim's optimizers:
        # schedulers that cycle momentum (OneCycleLR, CyclicLR) read and write them there.
        given = _engine.preset_hyper(preset, float(lr), int(batch_size))
        if given["momentum_direction"]:
            defaults.setdefault("momentum", given["momentum"])
        elif "beta1" not in defaults and "beta2" not in defaults:
            defaults.setdefault("betas", (given["beta1"], given["beta2"]))
        if "wd" not in defaults:
            defaults.setdefault("weight_decay", given["weight_decay"])
        seen = set()
        for i, g in enumerate(groups):
            for p in g["params"]:
                if id(p) in seen:
                    raise ValueError("param group %d holds a tensor that is already a parameter (it would be stepped "
                                     "twice)" % i)
                seen.add(id(p))
        super().__init__(groups, defaults)
        counter = 0
        for g in self.param_groups:
            named = []
            for name in g["names"]:
                named.append(name if name is not None else "param.%d" % counter)
                counter += 1
            g["names"] = named
        self._built = [self._overrides(g) for g in self.param_groups]
        self._lrs = [g["lr"] for g in self.param_groups]
        self._engine = _engine.Engine([
            _engine.GroupSpec(g["names"], list(g["params"]), g["preset"], float(g["lr"]), int(g["batch_size"]), o)
            for g, o in zip(self.param_groups, self._built)])

    @staticmethod
    def _overrides(group):
        return {_engine_key(k): _option_text(k, v) for k, v in group.items()
                if k in _ENGINE_KEYS and k not in _GROUP_KEYS}

    def _sync(self):
        for i, g in enumerate(self.param_groups):
            if g["lr"] != self._lrs[i]:
                _check_lr("param_groups[%d]['lr']" % i, g["lr"])
                self._engine.set_lr(i, float(g["lr"]))
                self._lrs[i] = g["lr"]
            now = self._overrides(g)
            if now != self._built[i]:
                changed = {k: v for k, v in now.items() if self._built[i].get(k) != v}
                self._engine.update_group(i, changed)
                self._built[i] = now

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        self._engine.step()
        return loss

    def add_param_group(self, param_group):
        if getattr(self, "_engine", None) is not None:
            raise NotImplementedError("largebatch optimizers take their parameter groups when they are built")
        super().add_param_group(param_group)

    def state_dict(self):
        states = self._engine.state()
        packed = {}
        for i, s in enumerate(states):
            entry = {"step": torch.tensor(float(s["step"]))}
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                if s[key] is not None:
                    entry[key] = s[key]
            packed[i] = entry
        groups, index = [], 0
        for g in self.param_groups:
            saved = {k: v for k, v in g.items() if k != "params"}
            saved["params"] = list(range(index, index + len(g["params"])))
            index += len(g["params"])
            groups.append(saved)
        return {"state": packed, "param_groups": groups}

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("state_dict's parameter groups do not match this optimizer's")
        for i, (g, saved) in enumerate(zip(self.param_groups, groups)):
            ours, theirs = _engine.resolve_preset(g["preset"]), _engine.resolve_preset(str(saved.get("preset", "")))
            if ours != theirs:
                raise ValueError("state_dict's param group %d is of preset %s, this optimizer's of %s" % (i, theirs, ours))
        for g, saved in zip(self.param_groups, groups):
            for k, v in saved.items():
                if k not in ("params", "names"):
                    g[k] = v
        self._sync()
        total = sum(len(g["params"]) for g in self.param_groups)
        states = []
        for i in range(total):
            s = state_dict["state"].get(i, state_dict["state"].get(str(i), {}))
            step = s.get("step", 0)
            states.append({
                "step": int(step.item() if isinstance(step, torch.Tensor) else step),
                "momentum_buffer": s.get("momentum_buffer"),
                "exp_avg": s.get("exp_avg"),
                "exp_avg_sq": s.get("exp_avg_sq"),
            })
        self._engine.load_state(states)

    def __getstate__(self):
        raise TypeError("a largebatch optimizer cannot be pickled or copied (its state is in the C++ engine): "
                        "save opt.state_dict() and load it into a new optimizer")

    # ---- the engine's own views
    def telemetry(self, enabled=None):
        """The last step's per-layer record (adapted tensors): {"step", "lr", "phi", "layers": [{"name",
        "weight_norm", "update_norm", "grad_norm", "trust_ratio", "effective_lr"}]}. telemetry(True) turns recording
        on (off by default: it costs a little per step), telemetry(False) off."""
        if enabled is not None:
            self._engine.set_telemetry(bool(enabled))
            return None
        return self._engine.telemetry()

    def describe(self, group=0):
        """Every option of a group, resolved, on one line (after the param_groups' current values)."""
        self._sync()
        return self._engine.describe(group)

    def adapts(self, param):
        return self._engine.adapts(param)

    def decays(self, param):
        return self._engine.decays(param)

    def use_kernel(self, kernel):
        """'auto' (the fused CPU kernel where it applies), 'fused' or 'tensor-ops' (per-tensor LibTorch)."""
        self._engine.set_kernel(kernel)


def _check_lr(what, lr):
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError("%s must be a number, got %r" % (what, lr))
    if not (math.isfinite(float(lr)) and lr >= 0):
        raise ValueError("%s must be finite and >= 0, got %r" % (what, lr))


def make(preset, params, lr, batch_size=256, **hyper):
    """The optimizer of a preset: make("tvlars:paper", model.named_parameters(), lr=1.0, batch_size=4096)."""
    return Optimizer(params, preset, lr, batch_size=batch_size, **hyper)


class LARS(Optimizer):
    """Heavy-ball LARS (lars:reference): r = eta |w| / |g + wd w|, mu = momentum mu + r (g + wd w)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, nesterov=False, trust_clip=False,
                 **hyper):
        super().__init__(params, "lars:reference", lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                         nesterov=nesterov, trust_clip=trust_clip, **hyper)


class TVLARS(Optimizer):
    """TVLARS in the paper's form (tvlars:paper): LARS whose ratio is scaled by
    phi_t = 1 / (alpha + exp(lambda (t - delay))) + gamma_min (gamma_min default 0.001 B / 256)."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, alpha=1.0, lambda_=1e-3, delay=0.0,
                 gamma_min=None, batch_size=256, **hyper):
        if "lambda" in hyper:
            lambda_ = hyper.pop("lambda")
        extra = dict(alpha=alpha, delay=delay, momentum=momentum, weight_decay=weight_decay, eta=eta)
        extra["lambda"] = lambda_
        if gamma_min is not None:
            extra["gamma_min"] = gamma_min
        extra.update(hyper)
        super().__init__(params, "tvlars:paper", lr, batch_size=batch_size, **extra)


class LAMB(Optimizer):
    """LAMB of You et al. (lamb:paper): Adam direction with bias correction, coupled decay, r = |w| / |s|."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
                 max_grad_norm=None, decoupled_decay=False, **hyper):
        super().__init__(params, "lamb:paper", lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, max_grad_norm=max_grad_norm,
                         decoupled_decay=decoupled_decay, **hyper)
