#!/usr/bin/env bash
# The bf16 measurements of docs/PERFORMANCE.md ("bf16 max pooling"), in a row on one machine: the cnn under bf16
# autocast against Python's (and with LibTorch's kernels, largebatch alone), three more rounds of it, ResNet-20 and
# the Barlow Twins step in bf16, the cnn in float32 (largebatch alone), and the cnn's bf16 profile.
# Usage: docs/performance/amd-2026-12-07-bf16/measure.sh [path/to/largebatch]
set -u
here=$(dirname "${BASH_SOURCE[0]}")
lb=$(realpath "${1:-$here/../../../build/largebatch}")  # before the cd: a path relative to where it was called from
[ -f "$lb" ] && [ -x "$lb" ] || { echo "$(basename "$0"): $lb: not an executable largebatch" >&2; exit 2; }
cd "$here"
lscpu > cpu.txt
"$lb" bench train --model cnn --batch-sizes 256,1024,4096 --steps 5 --precision bf16 --out train_cnn > train_cnn.txt 2>&1
"$lb" bench train --model cnn --batch-sizes 256,1024,4096 --steps 5 --precision bf16 --cpu-kernels false --no-python \
  --out train_cnn_library_kernels > train_cnn_library_kernels.txt 2>&1
for round in 1 2 3; do
  "$lb" bench train --model cnn --batch-sizes 256,1024 --steps 10 --precision bf16 > "rounds_cnn_$round.txt" 2>&1
done
"$lb" bench train --model resnet20 --batch-sizes 256,512 --steps 3 --precision bf16 > train_resnet20.txt 2>&1
"$lb" bench pretrain --model resnet20 --batch-sizes 512 --steps 3 --precision bf16 > pretrain_resnet20.txt 2>&1
"$lb" bench train --model cnn --batch-sizes 256,1024,4096 --steps 5 --no-python > train_cnn_fp32.txt 2>&1
"$lb" bench profile --model cnn --batch-size 1024 --precision bf16 --json profile_cnn_1024.json > profile_cnn_1024.txt 2>&1
echo "measure.sh: done"
