#!/usr/bin/env bash
# The tuned study, start to end, resumable: the classification sweep (candidates, then the chosen settings'
# seeds and the initialisation ablation), the self-supervised sweep (Barlow Twins pre-training, each run
# followed by its linear evaluation), the latter's baseline (the linear evaluation of the randomly initialised
# backbone), then their small files into docs/results/ and the reports.
# Run it again after an interruption: finished runs are skipped, interrupted ones resume from their checkpoints.
# Usage: studies/fashion-mnist-tuned/run.sh [path/to/largebatch]   (default build/largebatch)
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
lb=${1:-build/largebatch}
[ -x "$lb" ] || { echo "run.sh: no program $lb (make build first)" >&2; exit 2; }
# A sweep starts each run with the program it is itself; it runs from a copy so that rebuilding the project
# meanwhile cannot replace the program under it.
mkdir -p runs/bin
bin=runs/bin/largebatch-study
cp "$lb" "$bin.new" && mv "$bin.new" "$bin"
# The study began before the cnn's fused first layer and the Winograd convolutions existed; every run computes
# what its first runs did.
export LARGEBATCH_FUSED_FIRST_LAYER=0 LARGEBATCH_WINOGRAD=0
status=0
for study in fashion-mnist-tuned fashion-mnist-ssl; do
  # Runs finished on another machine come back from their committed files (docs/results), so that the sweep
  # skips them and the rule reads them: only runs missing from both are run.
  if [ -d "docs/results/$study" ]; then
    for done_run in "docs/results/$study"/*/; do
      name=$(basename "$done_run")
      [ "$name" = report ] || [ -e "runs/$study/$name" ] || { mkdir -p "runs/$study" && cp -rp "$done_run" "runs/$study/$name"; }
    done
  fi
  "$bin" sweep "studies/$study/grid.json" --out "runs/$study" --jobs 2
  rc=$?
  [ "$rc" -eq 130 ] && exit 130  # interrupted: run this script again to continue
  [ "$rc" -ne 0 ] && status=$rc   # failed runs are retried by the next call; the other study still runs
  scripts/collect_study.sh "runs/$study" "docs/results/$study"
  "$bin" report "docs/results/$study" --target 0.85
done
# The self-supervised study's baseline: the same linear evaluation of the cnn at its initial weights, the backbone
# each seed's pre-training starts from (seeds 0-2). Seconds each: an interrupted one starts again.
baseline=fashion-mnist-ssl-random-init
for seed in 0 1 2; do
  run=seed-$seed
  grep -qsE '"status": "(completed|diverged)"' "docs/results/$baseline/$run/summary.json" && continue
  grep -qsE '"status": "(completed|diverged)"' "runs/$baseline/$run/summary.json" && continue
  rm -rf "runs/$baseline/$run"
  "$bin" linear-eval --backbone random --model cnn --data fashion-mnist --epochs 30 --val-split 5000 --seed "$seed" \
    --threads 1 --progress none --out "runs/$baseline/$run"
  rc=$?
  [ "$rc" -eq 130 ] && exit 130
  [ "$rc" -ne 0 ] && status=$rc
done
if [ -d "runs/$baseline" ]; then scripts/collect_study.sh "runs/$baseline" "docs/results/$baseline"; fi
"$bin" report "docs/results/$baseline" --target 0.85
studies/fashion-mnist-tuned/gain_over_random.sh > docs/results/fashion-mnist-ssl/gain_over_random.txt || status=$?
exit "$status"
