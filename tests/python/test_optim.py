"""largebatch.optim from Python: the golden trajectories (lbt-golden-1 and lbt-golden-2), the model's own tensors
stepped, state_dict round trips, PyTorch schedulers, telemetry, bad input, and a short Fashion-MNIST training.

Run by CTest (python.optim) with PYTHONPATH=build/python; the golden files are the repository's tests/golden.
"""
import gzip
import io
import json
import math
import os
import pathlib
import struct

import pytest
import torch

import largebatch
from largebatch import optim

ROOT = pathlib.Path(__file__).resolve().parents[2]
GOLDEN = sorted((ROOT / "tests" / "golden").glob("*.json"))
ABS_TOL, REL_TOL = 1e-6, 1e-4  # the golden tolerance of tests/test_golden.cpp


def _hyper_of_v1(case):
    """An lbt-golden-1 case's options spelled out in the engine's vocabulary, on the preset its builder starts from."""
    o = case["options"]
    mask = lambda exclude: "ndim<=1" if exclude else "all"  # noqa: E731
    hyper = {"weight_decay": o["weight_decay"], "decay_mask": mask(o["exclude_1d_from_decay"]),
             "adapt_mask": mask(o["exclude_1d_from_adaptation"])}
    clamp = "%r:%r" % tuple(o["norm_clamp"]) if "norm_clamp" in o else None
    if case["optimizer"] == "lars":
        hyper.update(momentum=o["momentum"], eta=o["eta"], weight_norm_clamp=clamp, update_norm_clamp=clamp)
        if "tv" in o:
            hyper.update(tv=True, alpha=o["tv"]["alpha"], delay=o["tv"]["delay"], gamma_min=o["tv"]["gamma_min"])
            hyper["lambda"] = o["tv"]["lambda"]
        else:
            hyper["tv"] = False
        return "lars:reference", hyper
    hyper.update(betas=tuple(o["betas"]), eps=o["eps"], bias_correction=o["bias_correction"], weight_norm_clamp=clamp)
    return "lamb:paper", hyper


def _close(actual, expected):
    return math.isfinite(actual) and abs(actual - expected) <= ABS_TOL + REL_TOL * abs(expected)


@pytest.mark.parametrize("kernel", ["fused", "tensor-ops"])
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_case(path, kernel):
    case = json.loads(path.read_text())
    params = [(p["name"], torch.tensor(p["value"] if "value" in p else p["values"], dtype=torch.float64)
               .reshape(p["shape"]).float().requires_grad_()) for p in case["params"]]
    if case["format"] == "lbt-golden-1":
        preset, hyper = _hyper_of_v1(case)
    else:
        assert case["format"] == "lbt-golden-2"
        preset, hyper = case["preset"], dict(case["hyper"])
    opt = optim.make(preset, params, lr=case["lr"][0], **hyper)
    opt.use_kernel(kernel)
    opt.telemetry(True)
    checked = 0
    for t, grads in enumerate(case["grads"]):
        for g in opt.param_groups:
            g["lr"] = case["lr"][t]
        for (name, p), grad, spec in zip(params, grads, case["params"]):
            p.grad = torch.tensor(grad, dtype=torch.float64).reshape(spec["shape"]).float()
        opt.step()
        tel = opt.telemetry()
        assert tel["step"] == t
        if isinstance(case.get("phi"), list):
            assert _close(tel["phi"], case["phi"][t]), (t, tel["phi"], case["phi"][t])
        ratios = {layer["name"]: layer["trust_ratio"] for layer in tel["layers"]}
        for i, (name, p) in enumerate(params):
            actual = p.detach().double().flatten().tolist()
            expected = case["expected"][t][i]
            assert len(actual) == len(expected)
            for k, (a, e) in enumerate(zip(actual, expected)):
                assert _close(a, e), "%s: step %d, %s[%d] = %r, expected %r" % (path.name, t, name, k, a, e)
            checked += len(expected)
            if case["format"] == "lbt-golden-1":
                r = case["trust_ratio"][t][i]
                if r is None:
                    assert name not in ratios, "%s is adapted but the golden file says it is not" % name
                else:
                    assert _close(ratios[name], r), (name, t, ratios[name], r)
    assert checked > len(case["grads"]) * len(params)


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)


def _train(model, opt, steps, first=0, scheduler=None):
    for s in range(first, first + steps):
        x, y = _batch(s)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("preset", ["lars", "tvlars", "tvlars:paper", "lamb", "lamb:timm", "lars:timm", "larc:apex",
                                    "lars:barlowtwins"])
def test_steps_the_models_own_tensors(preset):
    model = _model()
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    opt = optim.make(preset, model.named_parameters(), lr=0.1)
    _train(model, opt, 3)
    moved = 0
    for n, p in model.named_parameters():
        ptr, value = before[n]
        assert p.data_ptr() == ptr, "%s was replaced, not updated in place" % n
        # (the conv bias before BatchNorm has a zero gradient: it need not move)
        if p.grad.abs().max() > 1e-6:
            assert not torch.equal(p.detach(), value), "%s did not move" % n
            moved += 1
    assert moved >= 4
    # Names reach the engine: 1-D tensors are not adapted by the default masks (apex's LARC adapts every tensor).
    assert opt.adapts(model[0].weight) and opt.adapts(model[1].weight) == (preset == "larc:apex")


def test_plain_tensors_and_group_dicts():
    model = _model()
    opt = optim.make("lars", model.parameters(), lr=0.5)
    _train(model, opt, 1)
    assert opt.param_groups[0]["names"][0] == "param.0"
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    opt = optim.make("lars", [{"params": weights}, {"params": others, "lr": 0.05, "weight_decay": 0.0}], lr=0.5)
    assert "lr=0.05" in opt.describe(1) and "weight_decay=0 " in opt.describe(1)
    assert "lr=0.5" in opt.describe(0) and "weight_decay=0.0005" in opt.describe(0)
    _train(model, opt, 2)


def test_state_dict_round_trip_continues_bit_for_bit():
    for preset in ("tvlars", "lamb"):
        a, b = _model(), _model()
        opt_a = optim.make(preset, a.named_parameters(), lr=0.2)
        _train(a, opt_a, 4)
        buffer = io.BytesIO()
        torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer)
        b.load_state_dict(saved["model"])
        opt_b = optim.make(preset, b.named_parameters(), lr=0.2)
        opt_b.load_state_dict(saved["opt"])
        _train(a, opt_a, 5, first=4)
        _train(b, opt_b, 5, first=4)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(pa, pb), "%s: %s differs after the round trip" % (preset, n)
        assert opt_b.telemetry() is not None


def test_a_pytorch_scheduler_drives_the_learning_rate():
    model = _model()
    opt = optim.make("lars", model.named_parameters(), lr=1.0)
    opt.telemetry(True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    seen = []
    for s in range(4):
        x, y = _batch(s)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        seen.append(opt.telemetry()["lr"])
        sched.step()
    assert seen == [1.0, 0.5, 0.25, 0.125]
    assert "lr=0.0625" in opt.describe()


def test_changed_hyper_parameters_reach_the_engine():
    model = _model()
    opt = optim.make("lars", model.named_parameters(), lr=1.0)
    opt.param_groups[0]["weight_decay"] = 0.01
    _train(model, opt, 1)
    assert "weight_decay=0.01" in opt.describe()


def test_classes_with_pytorch_style_arguments():
    model = _model()
    lars = optim.LARS(model.parameters(), lr=1.0, momentum=0.8, eta=2e-3)
    assert "momentum=0.8" in lars.describe() and "eta=0.002" in lars.describe()
    tv = optim.TVLARS(model.parameters(), lr=1.0, lambda_=0.01, batch_size=4096)
    assert "lambda=0.01" in tv.describe() and "gamma_min=0.016" in tv.describe()
    lamb = optim.LAMB(model.parameters(), lr=1e-3, betas=(0.8, 0.99), max_grad_norm=1.0)
    assert "beta1=0.8" in lamb.describe() and "max_grad_norm=1" in lamb.describe()
    _train(model, lamb, 2)


def test_phi_and_schedules():
    assert largebatch.phi(0, alpha=1.0, lambda_=1e-3) == pytest.approx(0.5)
    t, a, lam, d, g = 40, 0.5, 0.01, 10.0, 0.002
    assert largebatch.phi(t, alpha=a, delay=d, gamma_min=g, **{"lambda": lam}) == pytest.approx(
        1 / (a + math.exp(lam * (t - d))) + g, rel=1e-12)
    s = largebatch.LrSchedule("warmup-cosine", lr=0.1, total_steps=100, warmup_steps=10, final_ratio=0.0,
                              scaling="linear", batch_size=1024)
    assert s.peak == pytest.approx(0.4)
    assert s.at(5) == pytest.approx(0.2)
    assert s(100) == pytest.approx(0.0, abs=1e-12)
    names = [name for name, _ in largebatch.presets()]
    assert "tvlars:paper" in names and "lamb:timm" in names


def test_bad_input_is_refused_with_the_name():
    model = _model()
    with pytest.raises(ValueError, match="momentun"):
        optim.make("lars", model.named_parameters(), lr=1.0, momentun=0.9)
    with pytest.raises(ValueError, match="adamax"):
        optim.make("adamax", model.named_parameters(), lr=1.0)
    with pytest.raises(ValueError, match="not a layer-wise preset"):
        optim.make("sgd", model.named_parameters(), lr=1.0)
    with pytest.raises(ValueError, match="momentum = 1.5"):
        optim.make("lars", model.named_parameters(), lr=1.0, momentum=1.5)
    with pytest.raises(ValueError, match="lr must be finite and >= 0"):
        optim.make("lars", model.named_parameters(), lr=-1.0)
    with pytest.raises(ValueError, match="non-leaf"):
        optim.make("lars", [("x", torch.ones(3, requires_grad=True) * 2)], lr=1.0)
    with pytest.raises(TypeError):
        optim.make("lars", torch.ones(3), lr=1.0)
    opt = optim.make("lars", model.named_parameters(), lr=1.0)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()


def _idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        return torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).reshape(count, 1, rows, cols)
    return torch.frombuffer(bytearray(data[8:]), dtype=torch.uint8).long()


FASHION = pathlib.Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="SKIP Fashion-MNIST not installed (Debian's dataset-fashion-mnist)")
def test_a_short_fashion_mnist_training_learns():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    x = _idx(FASHION / "train-images-idx3-ubyte.gz")[:12288].float().div(255).sub(0.2860).div(0.3530)
    y = _idx(FASHION / "train-labels-idx1-ubyte.gz")[:12288]
    tx = _idx(FASHION / "t10k-images-idx3-ubyte.gz")[:2000].float().div(255).sub(0.2860).div(0.3530)
    ty = _idx(FASHION / "t10k-labels-idx1-ubyte.gz")[:2000]
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(16 * 14 * 14, 10))
    opt = optim.make("tvlars", model.named_parameters(), lr=2.0, eta=2e-3, **{"lambda": 2.0 / 36})
    for epoch in range(3):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 1024):
            idx = order[i:i + 1024]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(tx).argmax(1) == ty).float().mean().item()
    assert accuracy > 0.75, accuracy


def test_schedulers_that_keep_their_own_keys_in_the_groups_drive_it():
    # OneCycleLR cycles momentum (LARS) or betas (LAMB) through the groups and keeps max_lr, base_momentum, ...
    # there; SWALR keeps swa_lr. Their own keys stay out of the engine; the momentum they set reaches it.
    for preset, key in (("lars", "momentum"), ("lamb", "betas")):
        model = _model()
        opt = optim.make(preset, model.named_parameters(), lr=0.1)
        assert key in opt.param_groups[0]
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=10)
        seen = set()
        for step in range(5):
            _train(model, opt, 1, first=step)
            sched.step()
            value = opt.param_groups[0][key]
            engine_value = float(_resolved_option(opt, "momentum" if key == "momentum" else "beta1"))
            assert engine_value == pytest.approx(value if key == "momentum" else value[0], rel=1e-5)  # describe() rounds to 6 digits
            seen.add(engine_value)
        assert len(seen) > 1, "OneCycleLR's momentum never reached the engine"
        assert torch.isfinite(torch.cat([p.detach().flatten() for p in model.parameters()])).all()
    model = _model()
    opt = optim.make("tvlars", model.named_parameters(), lr=0.1)
    swa = torch.optim.swa_utils.SWALR(opt, swa_lr=0.05, anneal_epochs=2)
    for step in range(3):
        _train(model, opt, 1, first=step)
        swa.step()
    assert opt.param_groups[0]["swa_lr"] == 0.05 and "swa_lr" not in opt.describe()


def _resolved_option(opt, key):
    return dict(item.split("=", 1) for item in opt.describe().split() if "=" in item)[key]


def test_group_keys_are_checked_and_spelt_like_the_keywords():
    model = _model()
    w = [p for n, p in model.named_parameters() if p.ndim > 1]
    b = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = optim.TVLARS([{"params": w, "lambda_": 0.1}, {"params": b}], lr=1.0, lambda_=0.5)
    assert "lambda=0.1 " in opt.describe(0) + " " and "lambda=0.5 " in opt.describe(1) + " "
    opt = optim.make("lars", [{"params": w, "lr_scale": 0.5}, {"params": b}], lr=1.0)  # timm's layer decay key
    assert opt.param_groups[0]["lr_scale"] == 0.5
    with pytest.raises(ValueError, match="param group 1: unknown optimizer option 'momentun'"):
        optim.make("lars", [{"params": w}, {"params": b, "momentun": 0.8}], lr=1.0)
    with pytest.raises(ValueError, match="both lambda and lambda_"):
        optim.make("tvlars", [{"params": w, "lambda": 0.1, "lambda_": 0.2}], lr=1.0)
    with pytest.raises(ValueError, match="already a parameter"):
        optim.make("lars", [w[0], w[0]], lr=1.0)
    with pytest.raises(TypeError, match="lr must be a number"):
        optim.make("lars", w, lr="1")


def test_an_infinite_lr_set_by_a_scheduler_is_refused():
    model = _model()
    opt = optim.make("lars", model.named_parameters(), lr=1.0)
    opt.param_groups[0]["lr"] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] must be finite"):
        _train(model, opt, 1)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))


def test_a_state_of_another_preset_or_a_copy_is_refused():
    import copy
    model = _model()
    lamb = optim.make("lamb", model.named_parameters(), lr=1e-3)
    _train(model, lamb, 1)
    lars = optim.make("lars", model.named_parameters(), lr=1.0)
    with pytest.raises(ValueError, match="preset lamb:paper, this optimizer.s of lars:reference"):
        lars.load_state_dict(lamb.state_dict())
    same = optim.make("lamb:paper", model.named_parameters(), lr=1e-3)  # another name of the same preset
    same.load_state_dict(lamb.state_dict())
    with pytest.raises(TypeError, match="cannot be pickled or copied"):
        copy.deepcopy(lamb)
