#!/usr/bin/env bash
# The Winograd convolutions' measurements of docs/PERFORMANCE.md ("Winograd convolutions"), in a row on one machine:
# each model with them (against Python) and without (LARGEBATCH_WINOGRAD=0, largebatch alone), the cnn's profile.
# Usage: docs/performance/amd-2026-12-07/measure.sh [path/to/largebatch]
set -u
here=$(dirname "${BASH_SOURCE[0]}")
lb=$(realpath "${1:-$here/../../../build/largebatch}")  # before the cd: a path relative to where it was called from
[ -f "$lb" ] && [ -x "$lb" ] || { echo "$(basename "$0"): $lb: not an executable largebatch" >&2; exit 2; }
cd "$here"
lscpu > cpu.txt
"$lb" bench train --model cnn --batch-sizes 256,1024,4096 --steps 5 --out train_cnn > train_cnn.txt 2>&1
LARGEBATCH_WINOGRAD=0 "$lb" bench train --model cnn --batch-sizes 256,1024,4096 --steps 5 --no-python --out train_cnn_no_winograd > train_cnn_no_winograd.txt 2>&1
"$lb" bench train --model resnet20 --batch-sizes 256,512 --steps 3 --out train_resnet20 > train_resnet20.txt 2>&1
LARGEBATCH_WINOGRAD=0 "$lb" bench train --model resnet20 --batch-sizes 256,512 --steps 3 --no-python --out train_resnet20_no_winograd > train_resnet20_no_winograd.txt 2>&1
"$lb" bench pretrain --model resnet20 --batch-sizes 512 --steps 3 --out pretrain_resnet20 > pretrain_resnet20.txt 2>&1
LARGEBATCH_WINOGRAD=0 "$lb" bench pretrain --model resnet20 --batch-sizes 512 --steps 3 --no-python --out pretrain_resnet20_no_winograd > pretrain_resnet20_no_winograd.txt 2>&1
"$lb" bench profile --model cnn --batch-size 1024 --json profile_cnn_1024.json > profile_cnn_1024.txt 2>&1
echo "measure.sh: done"
