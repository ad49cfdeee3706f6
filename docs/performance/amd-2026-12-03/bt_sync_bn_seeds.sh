#!/bin/bash
# The one-step Barlow Twins check of tests/dist_test.sh (world 1 vs world 2 with --sync-bn) over many seeds,
# with and without the fused first layer: elementwise (the old check) and as whole steps (the new one).
# Usage: bt_sync_bn_seeds.sh path/to/largebatch FIRST LAST > out.txt
set -u
LB=$(readlink -f "$1"); W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
START=(pretrain --data synthetic --synthetic-size 128 --batch-size 128 --epochs 1 --projector 64-64 --threads 1
       --optimizer sgd --schedule constant --loader-workers 1 --progress none --no-plots)
PRE=("${START[@]}" --lr 1e-3)
port=$((30000 + RANDOM % 20000))
for seed in $(seq "$2" "$3"); do
  "$LB" "${START[@]}" --lr 0 --seed "$seed" --out "$W/start-$seed" > /dev/null 2>&1  # the initial parameters
  for fused in 0 1; do
    port=$((port + 3))
    LARGEBATCH_FUSED_FIRST_LAYER=$fused "$LB" "${PRE[@]}" --seed "$seed" --out "$W/w1-$seed-$fused" > /dev/null 2>&1
    LARGEBATCH_FUSED_FIRST_LAYER=$fused "$LB" launch --nproc-per-node 2 --master-port "$port" -- "${PRE[@]}" \
      --seed "$seed" --sync-bn --out "$W/w2-$seed-$fused" > /dev/null 2>&1
    echo "seed $seed fused $fused: $("$LB" compare "$W/w1-$seed-$fused/backbone.pt" "$W/w2-$seed-$fused/backbone.pt" \
      --rtol 1e-4 --atol 1e-6 --quiet)"
    echo "seed $seed fused $fused steps: $("$LB" compare "$W/w1-$seed-$fused/backbone.pt" "$W/w2-$seed-$fused/backbone.pt" \
      --from "$W/start-$seed/backbone.pt" --exclude 'running_|num_batches' --rtol 2e-2 --atol 1e-9 --quiet)"
  done
done
