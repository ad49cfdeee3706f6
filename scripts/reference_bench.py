#!/usr/bin/env python3
"""The Python reference that `largebatch bench` measures against (needs Debian's python3-torch).

Not part of the product: the C++ benchmark runs it as part of its own run, so both sides see the same machine.
The optimizers are written the way the paper's released code is (a per-tensor loop of torch operations with a
scalar read per layer for logging); the rule is docs/algorithms.md's.

    reference_bench.py step  --shapes FILE --optimizer lars|tvlars|lamb --repeats N --threads T
    reference_bench.py train --model resnet18|resnet20|cnn|mlp --batch-size B --steps N --threads T --optimizer lars
                             [--channels-last] [--precision fp32|bf16]
    reference_bench.py pretrain --model resnet20|cnn --projector 1024-1024-1024 --lambda L --batch-size B ... (as train)

Prints one JSON object on its last line.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceLayerwise(torch.optim.Optimizer):
    """LARS / TVLARS / LAMB as in the released code: one tensor at a time, .item() per layer for logging."""

    def __init__(self, params, kind, lr, momentum=0.9, weight_decay=5e-4, eta=1e-3, lam=1e-3,
                 betas=(0.9, 0.999), eps=1e-6):
        super().__init__(params, dict(lr=lr))
        self.kind, self.momentum, self.wd, self.eta, self.lam = kind, momentum, weight_decay, eta, lam
        self.betas, self.eps, self.t = betas, eps, 0
        self.ratios = []

    @torch.no_grad()
    def step(self):
        phi = 1.0
        if self.kind == "tvlars":
            phi = 1.0 / (0.1 + math.exp(self.lam * (self.t + 1)))  # reference code, commit 89c3291 (alpha 0.1)
        ratios = []
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                adapt = p.ndim > 1
                if self.kind == "lamb":
                    if not state:
                        state["m"] = torch.zeros_like(p)
                        state["v"] = torch.zeros_like(p)
                    m, v = state["m"], state["v"]
                    b1, b2 = self.betas
                    m.mul_(b1).add_(g, alpha=1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    bc1, bc2 = 1 - b1 ** (self.t + 1), 1 - b2 ** (self.t + 1)
                    d = (m / bc1) / ((v / bc2).sqrt() + self.eps)
                    if adapt:
                        d = d.add(p, alpha=self.wd)
                        w_norm, d_norm = p.norm(), d.norm()
                        ratio = torch.where((w_norm > 0) & (d_norm > 0), w_norm / d_norm, torch.ones_like(w_norm))
                        ratios.append(ratio.item())
                        d = d.mul(ratio)
                    p.add_(d, alpha=-lr)
                else:
                    d = g
                    if adapt:
                        d = g.add(p, alpha=self.wd)
                        w_norm, d_norm = p.norm(), d.norm()
                        ratio = torch.where((w_norm > 0) & (d_norm > 0), self.eta * phi * w_norm / d_norm,
                                            torch.ones_like(w_norm))
                        ratios.append(ratio.item())
                        d = d.mul(ratio)
                    if "mu" not in state:
                        state["mu"] = d.clone()
                    else:
                        state["mu"].mul_(self.momentum).add_(d)
                    p.add_(state["mu"], alpha=-lr)
        self.ratios = ratios
        self.t += 1


def bench_step(args):
    shapes = json.load(open(args.shapes))
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen) * 0.05
        p.grad = torch.randn(shape, generator=gen) * 0.01
        params.append(p)
    lr = 0.01 if args.optimizer == "lamb" else 1.0
    opt = ReferenceLayerwise(params, args.optimizer, lr)
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": args.repeats,
            "tensors": len(params), "parameters": sum(p.numel() for p in params)}


class CompactCNN(nn.Module):
    """largebatch's `cnn` (models.cpp): conv-pool-BN-ReLU twice, then two linear layers."""

    def __init__(self, in_channels=1, image_size=28, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        side = image_size // 4
        self.fc1 = nn.Linear(64 * side * side, 128)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x):
        y = F.relu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        y = F.relu(self.bn2(F.max_pool2d(self.conv2(y), 2)))
        return self.fc(F.relu(self.fc1(y.flatten(1))))


class BasicBlock(nn.Module):
    """largebatch's ResNet block (models.cpp): two 3x3 convs with BatchNorm, a 1x1 conv + BN shortcut when the
    shape changes."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (self.downsample(x) if self.downsample is not None else x))


class ResNet20(nn.Module):
    """largebatch's `resnet20`: a 3x3 stem of 16 channels, three stages of three blocks (16, 32, 64)."""

    def __init__(self, in_channels=3, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for b in range(3):
                blocks.append(BasicBlock(cin, planes, 2 if b == 0 and stage > 0 else 1))
                cin = planes
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        y = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class MLP(nn.Module):
    """largebatch's `mlp`: 784-256-10."""

    def __init__(self, in_features=784, num_classes=10):
        super().__init__()
        self.fc1 = nn.Linear(in_features, 256)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.fc(F.relu(self.fc1(x.flatten(1))))


def train_macs_per_image(model, shape):
    """Multiply-adds of one training step per image (convolutions and linear layers), counted with hooks:
    the forward pass, the weight gradients (as many) and the input gradients (as many, but for the layer that
    reads the images: nothing needs their gradient)."""
    # Convolutions are counted without the taps that fall on zero padding: at 32x32, ResNet-18's last stage runs
    # 3x3 kernels over 1x1 maps, where 8 of the 9 taps multiply padding.
    import copy
    probe = copy.deepcopy(model).eval()
    total = [0]
    images = torch.zeros((2,) + tuple(shape[1:]))

    def valid_taps(size, out_size, kernel, stride, pad, dilation):
        # (output position, kernel tap) pairs that land inside the input: taps on the zero padding are no work
        return sum(1 for o in range(out_size) for k in range(kernel) if 0 <= o * stride - pad + k * dilation < size)

    def count(mod, inputs, out):
        if isinstance(mod, nn.Conv2d):
            taps = 1
            for dim in range(2):
                taps *= valid_taps(inputs[0].shape[2 + dim], out.shape[2 + dim], mod.kernel_size[dim], mod.stride[dim],
                                   mod.padding[dim], mod.dilation[dim])
            macs = out.shape[0] * out.shape[1] * (mod.in_channels // mod.groups) * taps
        elif isinstance(mod, nn.Linear):
            macs = out.numel() * mod.in_features
        else:
            return
        reads_images = inputs[0].data_ptr() == images.data_ptr()  # the images themselves or a view of them
        total[0] += macs * (2 if reads_images else 3)

    for mod in probe.modules():
        mod.register_forward_hook(count)
    with torch.no_grad():
        probe(images)
    return total[0] // 2


def timed_steps(args, one_step, macs_per_image):
    """The median time of args.steps calls of one_step after args.warmup untimed ones."""
    for _ in range(args.warmup):
        one_step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"median_s": median, "images_per_s": args.batch_size / median, "steps": args.steps,
            "train_macs_per_image": macs_per_image}


def bench_train(args):
    if args.model == "resnet18":
        import torchvision
        model = torchvision.models.resnet18(num_classes=10)
        shape = (args.batch_size, 3, 32, 32)
    elif args.model == "resnet20":
        model, shape = ResNet20(in_channels=1), (args.batch_size, 1, 28, 28)
    elif args.model == "cnn":
        model, shape = CompactCNN(), (args.batch_size, 1, 28, 28)
    elif args.model == "mlp":
        model, shape = MLP(), (args.batch_size, 1, 28, 28)
    else:
        raise SystemExit(f"reference_bench.py: unknown --model {args.model}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen)
    if args.channels_last:
        x = x.to(memory_format=torch.channels_last)  # activations only, as largebatch's --channels-last
    y = torch.randint(0, 10, (args.batch_size,), generator=gen)
    lr = 0.01 if args.optimizer == "lamb" else 1.0
    opt = ReferenceLayerwise(model.parameters(), args.optimizer, lr)
    model.train()

    def one_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        return loss.item()

    return timed_steps(args, one_step, train_macs_per_image(model, shape))


class Projector(nn.Module):
    """largebatch's Barlow Twins projector: Linear (no bias) - BatchNorm - ReLU, the last layer a bare Linear."""

    def __init__(self, cin, sizes):
        super().__init__()
        layers = []
        for i, size in enumerate(sizes):
            layers.append(nn.Linear(cin, size, bias=False))
            if i + 1 < len(sizes):
                layers += [nn.BatchNorm1d(size), nn.ReLU()]
            cin = size
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class BarlowTwinsNet(nn.Module):
    """The backbone's features (the model without its last linear layer), then the projector."""

    def __init__(self, backbone, features, sizes):
        super().__init__()
        backbone.fc = nn.Identity()
        self.backbone, self.projector = backbone, Projector(features, sizes)

    def forward(self, x):
        return self.projector(self.backbone(x))


def barlow_twins_loss(z1, z2, lam):
    """largebatch's barlow_twins_loss (train/barlow_twins.h): both embeddings batch-normalised without affine,
    C = z1n^T z2n / N, sum (1 - C_ii)^2 + lam * sum_{i != j} C_ij^2."""
    n = z1.shape[0]
    z1n = F.batch_norm(z1, None, None, training=True, eps=1e-5)
    z2n = F.batch_norm(z2, None, None, training=True, eps=1e-5)
    c = z1n.t() @ z2n / n
    diagonal = torch.diagonal(c)
    return (1 - diagonal).pow(2).sum() + lam * (c.pow(2).sum() - diagonal.pow(2).sum())


def bench_pretrain(args):
    sizes = [int(v) for v in args.projector.split("-")]
    if args.model == "resnet20":
        backbone, features = ResNet20(in_channels=1), 64
    elif args.model == "cnn":
        backbone, features = CompactCNN(), 128
    else:
        raise SystemExit(f"reference_bench.py: unknown backbone {args.model}")
    net = BarlowTwinsNet(backbone, features, sizes)
    shape = (args.batch_size, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    if args.channels_last:
        v1, v2 = v1.to(memory_format=torch.channels_last), v2.to(memory_format=torch.channels_last)
    lr = 0.01 if args.optimizer == "lamb" else 1.0
    opt = ReferenceLayerwise(net.parameters(), args.optimizer, lr)
    net.train()

    def one_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            z1, z2 = net(v1), net(v2)
        loss = barlow_twins_loss(z1.float(), z2.float(), args.lam)
        loss.backward()
        opt.step()
        return loss.item()

    # Both views pass the network: twice the arithmetic of one image through backbone and projector (the
    # cross-correlation's D x D product over the batch is left out).
    return timed_steps(args, one_step, 2 * train_macs_per_image(net, shape))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("step")
    s.add_argument("--shapes", required=True)
    s.add_argument("--optimizer", choices=["lars", "tvlars", "lamb"], required=True)
    s.add_argument("--repeats", type=int, default=10)
    s.add_argument("--threads", type=int, default=0)
    t = sub.add_parser("train")
    t.add_argument("--model", required=True)
    t.add_argument("--batch-size", type=int, default=512)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--optimizer", choices=["lars", "tvlars", "lamb"], default="lars")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--channels-last", action="store_true")
    t.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p = sub.add_parser("pretrain")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--projector", default="1024-1024-1024")
    p.add_argument("--lambda", dest="lam", type=float, default=0.005)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--optimizer", choices=["lars", "tvlars", "lamb"], default="lars")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = {"step": bench_step, "train": bench_train, "pretrain": bench_pretrain}[args.what](args)
    result["threads"] = torch.get_num_threads()
    result["torch"] = torch.__version__
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
