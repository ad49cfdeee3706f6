#!/usr/bin/env python3
"""One Markdown table from several `largebatch bench profile --json` files: a column per file, a row per phase
and layer type, "ms per step (share of the step)", with the convolutions' share of the dense rate.

    python3 scripts/profile_table.py docs/performance/amd-2026-12-02/profile/{cnn_b1024,resnet20_b512}.json
"""
import json
import sys


def main(paths):
    if not paths:
        sys.exit(__doc__)
    profiles = []
    for path in paths:
        try:
            with open(path) as f:
                profiles.append(json.load(f))
        except (OSError, ValueError) as e:
            sys.exit(f"profile_table.py: {path}: {e}")
    keys = []
    for p in profiles:
        for r in p["rows"]:
            key = (r["phase"], r["what"])
            if key not in keys:
                keys.append(key)
    heads = [f'{p["model"]}, {p["task"]}, B {p["batch_size"]}' + ("" if p.get("cpu_kernels", True) else ", LibTorch's kernels")
             for p in profiles]
    print("| phase / layer type | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(profiles))
    for phase, what in keys:
        label = what if phase == what else f"{phase}: {what}"
        cells = []
        for p in profiles:
            row = next((r for r in p["rows"] if (r["phase"], r["what"]) == (phase, what)), None)
            if row is None:
                cells.append("")
                continue
            ms, share = 1e3 * row["seconds"], 100 * row["seconds"] / p["step_s"]
            cell = f"{ms:.1f} ({share:.1f} %)"
            if row["flops"] > 0 and row["seconds"] > 0:
                cell += f", {100 * row['flops'] / row['seconds'] / p['dense_flops_per_s']:.0f} % of dense"
            cells.append(cell)
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| **step** | " + " | ".join(f"**{1e3 * p['step_s']:.1f}**" for p in profiles) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
