#!/usr/bin/env bash
# The dist test's one-step cnn comparison (LARS lr 1, 256 synthetic images, one batch of 256): one process
# against 2 ranks with --sync-bn, in the default layout and with --channels-last, at seeds FIRST..LAST.
# Usage: cnn_channels_last_seeds.sh path/to/largebatch FIRST LAST
set -u
LB=$1; W=$(mktemp -d); trap 'rm -rf "$W"' EXIT
C=(train --data synthetic --batch-size 256 --loader-workers 1 --progress none --no-plots --optimizer lars --lr 1
   --model cnn --epochs 1 --synthetic-size 256 --threads 1)
port=29750
for seed in $(seq "$2" "$3"); do
  for layout in "" --channels-last; do
    port=$((port + 3))
    "$LB" "${C[@]}" $layout --seed "$seed" --out "$W/a" > /dev/null 2>&1
    "$LB" launch --nproc-per-node 2 --master-port "$port" -- "${C[@]}" $layout --sync-bn --seed "$seed" --out "$W/b" > /dev/null 2>&1
    echo "seed $seed ${layout:-nchw}: $("$LB" compare "$W/a/model.pt" "$W/b/model.pt" --rtol 1e-5 --atol 1e-7 --quiet 2>&1)"
    rm -rf "$W/a" "$W/b"
  done
done
