#!/usr/bin/env bash
# tests/dist_test.sh's 20-step drift check of the cnn (world 2 --sync-bn against world 1, and its noise floors) over
# seeds, with and without the Winograd convolutions. Per (seed, LARGEBATCH_WINOGRAD), each run against world 1 on one
# thread, two measures: "elementwise", the worst share of rtol 1e-4 / atol 1e-6 over all elements (the check before
# 2026-12-07), and "whole", the largest relative difference of the parameters' updates as whole tensors
# (|dA - dB| / |dB|, the updates from the initial parameters; the check since).
# Usage: dist_drift_seeds.sh path/to/largebatch first_seed last_seed
set -u
LB=$(realpath "$1")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
COMMON=(--data synthetic --batch-size 256 --loader-workers 1 --progress none --no-plots --optimizer lars
        --synthetic-size 2560 --model cnn)
uses() { sed -n 's/.* uses \([^ ]*\) of the tolerance.*/\1/p'; }
elementwise() { "$LB" compare "$1" "$2" --rtol 1e-4 --atol 1e-6 --quiet | uses; }
whole() { "$LB" compare "$1" "$2" --from "$3" --exclude 'running_|num_batches' --rtol 1 --atol 0 --quiet | uses; }
port=29650
echo "seed winograd | elementwise: threads2 libtorch_kernels world2_sync_bn world2_per_rank_bn | whole: the same four"
for seed in $(seq "$2" "$3"); do
  for wino in 1 0; do
    export LARGEBATCH_WINOGRAD=$wino
    d=$W/$seed-$wino
    run() { "$LB" train "${COMMON[@]}" --seed "$seed" "$@" > /dev/null 2>&1; }
    run2() { port=$((port + 1)); "$LB" launch --nproc-per-node 2 --master-port "$port" -- train "${COMMON[@]}" --seed "$seed" "$@" > /dev/null 2>&1; }
    run --lr 0 --epochs 1 --threads 1 --out "$d/w0" && run --lr 1 --epochs 2 --threads 1 --out "$d/w1" &&
      run --lr 1 --epochs 2 --threads 2 --out "$d/w1t2" && run --lr 1 --epochs 2 --threads 1 --cpu-kernels false --out "$d/w1lib" &&
      run2 --lr 1 --epochs 2 --threads 1 --sync-bn --out "$d/w2" && run2 --lr 1 --epochs 2 --threads 1 --out "$d/w2l" ||
      { echo "$seed $wino runs failed"; continue; }
    line="$seed $wino |"
    for r in w1t2 w1lib w2 w2l; do line+=" $(elementwise "$d/w1/model.pt" "$d/$r/model.pt")"; done
    line+=" |"
    for r in w1t2 w1lib w2 w2l; do line+=" $(whole "$d/w1/model.pt" "$d/$r/model.pt" "$d/w0/model.pt")"; done
    echo "$line"
  done
done
