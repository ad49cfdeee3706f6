#!/usr/bin/env bash
# The measurements of docs/PERFORMANCE.md ("The fused first layer per instruction set"), on one machine in a row:
# the first layer's kernels in this build against a baseline build (bench_kernels, alternating rounds), the cnn's
# training step in both (bench train --no-python, alternating rounds, bf16 and float32), and this build's cnn in
# bf16 against PyTorch Python, the first layer's kernels on each instruction set of this build, and a 2-epoch
# training run in both builds (bf16 and float32), whose weights are compared byte for byte.
# Usage: docs/performance/amd-2026-12-07-first-layer/measure.sh path/to/build path/to/baseline-build
# (each a directory with the largebatch and bench_kernels programs, e.g. build/ and a build of commit d34a68a).
set -u
here=$(dirname "${BASH_SOURCE[0]}")
[ $# -eq 2 ] || { echo "usage: $(basename "$0") path/to/build path/to/baseline-build" >&2; exit 2; }
new=$(realpath "$1") old=$(realpath "$2")  # before the cd: paths relative to where it was called from
for dir in "$new" "$old"; do
  for program in largebatch bench_kernels; do
    [ -f "$dir/$program" ] && [ -x "$dir/$program" ] || { echo "$(basename "$0"): $dir/$program: not an executable" >&2; exit 2; }
  done
done
cd "$here"
lscpu > cpu.txt
: > kernels_ab.txt
for round in 1 2 3 4 5; do
  for which in new old; do
    dir=$new; [ $which = old ] && dir=$old
    echo "== round $round $which" >> kernels_ab.txt
    "$dir/bench_kernels" --benchmark_filter='first_conv' --benchmark_min_time=0.5 2>&1 | grep -E '^first_conv' >> kernels_ab.txt
  done
done
: > train_ab.txt
for round in 1 2 3; do
  for which in new old; do
    dir=$new; [ $which = old ] && dir=$old
    for precision in bf16 fp32; do
      echo "== round $round $which $precision" >> train_ab.txt
      "$dir/largebatch" bench train --model cnn --precision $precision --batch-sizes 256,1024 --steps 10 --no-python 2>&1 |
        grep -E '^\| (256|1024) ' >> train_ab.txt
    done
  done
done
"$new/largebatch" bench train --model cnn --batch-sizes 256,1024,4096 --steps 5 --precision bf16 --out train_cnn > train_cnn.txt 2>&1
: > instruction_sets.txt
for round in 1 2 3; do
  for set in baseline avx2 avx512; do
    echo "== round $round $set" >> instruction_sets.txt
    LARGEBATCH_CONV_POOL_SIMD=$set "$new/bench_kernels" --benchmark_filter='first_conv_pool' --benchmark_min_time=0.5 \
      2>&1 | grep -E '^first_conv_pool|instruction set' >> instruction_sets.txt
  done
done
runs=$(mktemp -d)
: > training.txt
for precision in bf16 fp32; do
  for which in new old; do
    dir=$new; [ $which = old ] && dir=$old
    "$dir/largebatch" train --model cnn --optimizer tvlars --precision $precision --batch-size 4096 --epochs 2 \
      --val-split 5000 --seed 0 --out "$runs/$which-$precision" > "$runs/$which-$precision.log" 2>&1
    echo "$which $precision: $(grep -E '^epoch +2/2' "$runs/$which-$precision.log")" >> training.txt
  done
  if cmp -s "$runs/new-$precision/model.pt" "$runs/old-$precision/model.pt"; then
    echo "$precision: model.pt byte-identical in both builds" >> training.txt
  else
    echo "$precision: model.pt differs between the builds" >> training.txt
  fi
done
rm -rf "$runs"
echo "measure.sh: done"
