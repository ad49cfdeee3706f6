#!/usr/bin/env python3
"""The cost of each training feature (label smoothing, mixup, CutMix, EMA, poly schedule, ghost BatchNorm,
gradient clipping, bf16): one-epoch `largebatch train` runs of every feature, interleaved in rounds with the
baseline so that the machine's drift hits all alike; prints, per feature, the median over rounds of its
training throughput and epoch time divided by the baseline's of the same round.

    scripts/feature_cost.py [--largebatch build/largebatch] [--rounds 3] [--out runs/feature-cost]
                            [-- extra train options]

Uses only the standard library (reads metrics.csv)."""
import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys

FEATURES = [
    ("baseline", []),
    ("label-smoothing 0.1", ["--label-smoothing", "0.1"]),
    ("mixup 0.2", ["--mixup", "0.2"]),
    ("cutmix 1", ["--cutmix", "1"]),
    ("ema-decay 0.99", ["--ema-decay", "0.99"]),
    ("schedule poly", ["--schedule", "poly"]),
    ("bn-group-size 256", ["--bn-group-size", "256"]),
    ("clip-grad-norm 1", ["--clip-grad-norm", "1"]),
    ("precision bf16", ["--precision", "bf16"]),
]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--largebatch", default="build/largebatch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="runs/feature-cost")
    ap.add_argument("extra", nargs="*", help="options added to every run (after --)")
    args = ap.parse_args()
    base = ["train", "--data", "fashion-mnist", "--model", "cnn", "--optimizer", "lars", "--batch-size", "4096",
            "--epochs", "1", "--val-split", "5000", "--threads", "2", "--loader-workers", "1", "--progress",
            "none", "--no-plots"] + args.extra
    print(f"# {cpu_model()}, {os.cpu_count()} cores; {args.rounds} rounds of {len(FEATURES)} one-epoch runs:",
          " ".join([args.largebatch] + base), flush=True)
    ratios = {name: {"img_per_s": [], "epoch_seconds": []} for name, _ in FEATURES}
    raw = []
    for r in range(args.rounds):
        baseline = None
        for name, flags in FEATURES:
            out = os.path.join(args.out, f"round{r}", name.replace(" ", "-"))
            shutil.rmtree(out, ignore_errors=True)
            cmd = [args.largebatch] + base + flags + ["--out", out]
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if done.returncode != 0:
                sys.exit(f"feature_cost.py: {' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
            with open(os.path.join(out, "metrics.csv")) as f:
                row = list(csv.DictReader(f))[-1]
            m = {"img_per_s": float(row["img_per_s"]), "epoch_seconds": float(row["epoch_seconds"])}
            raw.append({"round": r, "feature": name, **m})
            print(f"round {r + 1}/{args.rounds}  {name:22s} {m['img_per_s']:8.1f} img/s  {m['epoch_seconds']:6.2f} s",
                  flush=True)
            if baseline is None:
                baseline = m
            ratios[name]["img_per_s"].append(baseline["img_per_s"] / m["img_per_s"])
            ratios[name]["epoch_seconds"].append(m["epoch_seconds"] / baseline["epoch_seconds"])
    print("\n| feature | training time / baseline (median, range) | epoch time with evaluation / baseline |")
    print("| --- | --- | --- |")
    for name, _ in FEATURES[1:]:
        t, e = ratios[name]["img_per_s"], ratios[name]["epoch_seconds"]
        print(f"| {name} | {statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | "
              f"{statistics.median(e):.2f} ({min(e):.2f}-{max(e):.2f}) |")
    with open(os.path.join(args.out, "feature_cost.json"), "w") as f:
        json.dump({"cpu": cpu_model(), "command": [args.largebatch] + base, "runs": raw}, f, indent=1)


if __name__ == "__main__":
    main()
