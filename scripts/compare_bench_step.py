#!/usr/bin/env python3
"""Compares the fused step of two builds from `largebatch bench step --json` files taken in one session, runs of the
two builds interleaved (docs/PERFORMANCE.md has the command): per model and optimizer, the median over runs of each
build's fused ms and their ratio. Usage: compare_bench_step.py --before B1.json B2.json ... --after A1.json ..."""
import argparse
import json
import statistics
import sys


def fused_ms(files):
    rows = {}
    for name in files:
        try:
            with open(name) as f:
                data = json.load(f)
            for r in data["results"]:
                rows.setdefault((r["model"], r["optimizer"]), []).append(1000 * r["fused_s"])
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"compare_bench_step.py: {name}: {e}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs="+", required=True)
    parser.add_argument("--after", nargs="+", required=True)
    args = parser.parse_args()
    before, after = fused_ms(args.before), fused_ms(args.after)
    if before.keys() != after.keys():
        sys.exit("compare_bench_step.py: the two builds' runs measured different rows")
    print(f"median over {len(args.before)} runs (before) and {len(args.after)} runs (after)\n")
    print("| model | optimizer | before fused ms (range) | after fused ms (range) | after / before |")
    print("| --- | --- | --- | --- | --- |")
    for key in before:
        b, a = before[key], after[key]
        mb, ma = statistics.median(b), statistics.median(a)
        print(f"| {key[0]} | {key[1]} | {mb:.2f} ({min(b):.2f}-{max(b):.2f}) | {ma:.2f} ({min(a):.2f}-{max(a):.2f}) "
              f"| {ma / mb:.3f} |")


if __name__ == "__main__":
    main()
