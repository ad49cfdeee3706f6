#!/bin/bash
# Step time of data-parallel training split into compute (forward + backward, with the all-reduce hidden
# behind backward), exposed all-reduce and optimizer, for world sizes 1, 2 and 4 on this machine.
# Usage: scripts/dist_timing.sh [largebatch binary] [extra train flags...]
# Defaults: Fashion-MNIST, the default CNN, global batch 4096, 2 epochs (30 steps), threads per rank =
# cores / world (at least 1). Prints a markdown table from each run's metrics.csv (epoch 2 only: epoch 1
# includes warm-up).
set -eu
LB=${1:-build/largebatch}
shift || true
CORES=$(nproc)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
port=$((22000 + RANDOM % 20000))
echo "| world size | threads per rank | steps | compute s/step | all-reduce s/step | optimizer s/step | step s | all-reduce / compute | img/s |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
for world in 1 2 4; do
  threads=$((CORES / world))
  [ "$threads" -ge 1 ] || threads=1
  port=$((port + 11))
  args=(train --data fashion-mnist --batch-size 4096 --epochs 2 --threads "$threads" --loader-workers 1
        --progress none --no-plots --out "$OUT/w$world" "$@")
  if [ "$world" -eq 1 ]; then
    "$LB" "${args[@]}" > "$OUT/w$world.log" 2>&1
  else
    "$LB" launch --nproc-per-node "$world" --master-port "$port" -- "${args[@]}" > "$OUT/w$world.log" 2>&1
  fi
  # Columns: ... epoch_seconds(10) img_per_s(11) data_wait_s(12) compute_s(13) allreduce_s(14) optimizer_s(15)
  awk -F, -v w="$world" -v t="$threads" 'NR == 3 {
      steps = $2 - prev; c = $13 / steps; a = $14 / steps; o = $15 / steps
      printf "| %d | %d | %d | %.3f | %.3f | %.3f | %.3f | %.1f %% | %.0f |\n", w, t, steps, c, a, o, c + a + o, 100 * a / c, $11
    } NR == 2 { prev = $2 }' "$OUT/w$world/metrics.csv"
done
