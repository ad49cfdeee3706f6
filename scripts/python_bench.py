#!/usr/bin/env python3
"""The optimizer step from Python: largebatch.optim against the Python reference step and timm's style of loop.

Same shapes (a model's parameters, ResNet-50's by default: torchvision's), same gradients, same threads, one
process, interleaved repeats; the median of each. Also the binding's own cost: a step of one 1-element tensor
(nearly all of it is the call from Python into the engine and back).

    PYTHONPATH=build/python /usr/bin/python3 scripts/python_bench.py [--model resnet50] [--repeats 30] [--threads 2]

Needs Debian's python3-torch (and python3-torchvision for the ResNet shapes). Prints a Markdown table and, on its
last line, one JSON object.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_bench import ReferenceLayerwise  # noqa: E402  the paper's released code's loop, .item() per layer

import largebatch  # noqa: E402
from largebatch import optim  # noqa: E402


class TimmStyle(torch.optim.Optimizer):
    """A per-tensor loop of torch operations without host reads, as timm's Lars and Lamb are written (trust ratio
    by torch.where on device scalars); the rules are lars:reference's and lamb:paper's."""

    def __init__(self, params, kind, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, betas=(0.9, 0.999), eps=1e-6):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, betas=betas,
                                      eps=eps))
        self.kind = kind

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                g = p.grad
                state = self.state[p]
                adapt = p.ndim > 1
                if self.kind == "lars":
                    d = g.add(p, alpha=wd) if adapt else g
                    if adapt:
                        w_norm, d_norm = p.norm(), d.norm()
                        one = torch.ones_like(w_norm)
                        r = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, one)
                        d = d.mul(r)
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(d)
                    p.add_(buf, alpha=-lr)
                else:
                    b1, b2 = group["betas"]
                    if not state:
                        state["step"] = 0
                        state["m"] = torch.zeros_like(p)
                        state["v"] = torch.zeros_like(p)
                    state["step"] += 1
                    m, v = state["m"], state["v"]
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
                    s = (m / bc1) / ((v / bc2).sqrt().add_(group["eps"]))
                    if adapt:
                        s.add_(p, alpha=wd)
                        w_norm, s_norm = p.norm(), s.norm()
                        one = torch.ones_like(w_norm)
                        s.mul_(torch.where((w_norm > 0) & (s_norm > 0), w_norm / s_norm, one))
                    p.add_(s, alpha=-lr)


def shapes_of(model_name):
    if model_name == "resnet50":
        import torchvision
        return [p.shape for p in torchvision.models.resnet50().parameters()]
    if model_name == "resnet18":
        import torchvision
        return [p.shape for p in torchvision.models.resnet18().parameters()]
    raise SystemExit("python_bench: --model must be resnet50 or resnet18")


def params_like(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, generator=g).mul_(0.05).requires_grad_()
        p.grad = torch.randn(shape, generator=g).mul_(0.01)
        out.append(("param.%d" % i, p))
    return out


def time_steps(opt, repeats):
    opt.step()  # state allocated, caches warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.repeats < 3 or args.threads < 1:
        raise SystemExit("python_bench: --repeats must be >= 3 and --threads >= 1")
    torch.set_num_threads(args.threads)
    shapes = shapes_of(args.model)
    elements = sum(int(torch.Size(s).numel()) for s in shapes)
    rows = []
    for kind, preset, lr in (("lars", "lars:reference", 1.0), ("lamb", "lamb:paper", 0.01)):
        builders = {
            "largebatch.optim": lambda ps: optim.make(preset, ps, lr=lr),
            "Python reference (the released code's loop)": lambda ps: ReferenceLayerwise([p for _, p in ps], kind, lr),
            "timm-style loop (no host reads)": lambda ps: TimmStyle([p for _, p in ps], kind, lr),
        }
        opts = {name: build(params_like(shapes, 0)) for name, build in builders.items()}
        samples = {name: [] for name in opts}
        # Interleaved: each round steps every optimizer once, so slow drifts of the machine hit all alike.
        for name, opt in opts.items():
            opt.step()
        for _ in range(args.repeats):
            for name, opt in opts.items():
                t0 = time.perf_counter()
                opt.step()
                samples[name].append(time.perf_counter() - t0)
        ours = statistics.median(samples["largebatch.optim"])
        for name, ts in samples.items():
            med = statistics.median(ts)
            rows.append({"optimizer": kind, "implementation": name, "median_ms": 1e3 * med,
                         "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts), "vs_largebatch": med / ours})
    # The binding's own cost: one 1-element tensor, so the step's arithmetic is nothing.
    tiny = optim.make("lars:reference", [("w", torch.ones(1, requires_grad=True))], lr=0.1)
    tiny.param_groups[0]["params"][0].grad = torch.ones(1)
    overhead = statistics.median(time_steps(tiny, max(200, args.repeats)))
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print("%s, %d tensors, %.1f M elements, %d thread(s), %d repeats, median; CPU %s; torch %s; kernel %s"
          % (args.model, len(shapes), elements / 1e6, args.threads, args.repeats, cpu, torch.__version__,
             largebatch.fused_step_instruction_set()))
    print("| optimizer | implementation | median ms | min | max | time / largebatch.optim |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print("| %s | %s | %.2f | %.2f | %.2f | %.2fx |" % (r["optimizer"], r["implementation"], r["median_ms"],
                                                           r["min_ms"], r["max_ms"], r["vs_largebatch"]))
    print("binding overhead: %.1f us per step of one 1-element tensor" % (1e6 * overhead))
    print(json.dumps({"model": args.model, "tensors": len(shapes), "elements": elements, "threads": args.threads,
                      "repeats": args.repeats, "cpu": cpu, "rows": rows, "binding_overhead_us": 1e6 * overhead}))


if __name__ == "__main__":
    main()
