#!/usr/bin/env bash
# A diagnostic beside the self-supervised study, not part of its selection (docs/results/fashion-mnist-ssl/README.md,
# "TVLARS's norm clamps"): TVLARS without the reference code's norm clamps (|w| and |update| in [0, 10]) at the lr
# LARS chose, seeds 1 and 2, so that it is LARS times phi_t; each pre-training followed by the study's linear
# evaluation. Then each seed's final test top-1 against LARS's and TVLARS's follow-ups of the same seed.
# Resumable: a finished run is skipped. Usage: studies/fashion-mnist-tuned/ssl_clamp_diagnostic.sh [path/to/largebatch]
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
lb=${1:-build/largebatch}
[ -x "$lb" ] || { echo "$0: no program $lb (make build first)" >&2; exit 2; }
export LARGEBATCH_FUSED_FIRST_LAYER=0 LARGEBATCH_WINOGRAD=0  # as the study's runs
study=docs/results/fashion-mnist-ssl
out=runs/fashion-mnist-ssl-diagnostic
results=docs/results/fashion-mnist-ssl-diagnostic
lars_lr=$(jq -er '.lr' "$study"/lars__lr-*__seed-1/config.json) || { echo "$0: no LARS follow-up in $study" >&2; exit 2; }
finished() { grep -qsE '"status": "(completed|diverged)"' "$1/summary.json"; }
one() {  # seed: pre-training, then linear evaluation, unless finished
  local run=$out/tvlars-no-clamps__lr-${lars_lr}__seed-$1
  if ! finished "$run"; then
    "$lb" pretrain --optimizer tvlars --opt weight_norm_clamp=none,update_norm_clamp=none --lr "$lars_lr" \
      --model cnn --data fashion-mnist --batch-size 2048 --epochs 6 --seed "$1" --loader-workers 1 --threads 1 \
      --telemetry-every 2 --progress none --out "$run" || return
  fi
  grep -qs '"status": "diverged"' "$run/summary.json" && return
  finished "$run/linear-eval" || "$lb" linear-eval --backbone "$run/backbone.pt" --epochs 30 --val-split 5000 \
    --seed "$1" --threads 1 --progress none --out "$run/linear-eval"
}
one 1 & one 2 & wait
scripts/collect_study.sh "$out" "$results" >/dev/null
"$lb" report "$results" --target 0.85 >/dev/null
{
  echo "final test top-1 % of the linear evaluation, per seed (TVLARS without clamps at LARS's lr $lars_lr)"
  printf '%-6s %-22s %-8s %-14s %-18s %s\n' seed "tvlars, no clamps" lars "tvlars (study)" "no clamps - lars" "no clamps - tvlars"
  f() { jq -er '.final_test_top1 * 100' "$1" 2>/dev/null || echo nan; }
  for seed in 1 2; do
    a=$(f "$results/tvlars-no-clamps__lr-${lars_lr}__seed-$seed/linear-eval/summary.json")
    b=$(f "$study/lars__lr-${lars_lr}__seed-$seed/linear-eval/summary.json")
    c=$(f "$(ls -d "$study"/tvlars__lr-*__seed-$seed | head -1)/linear-eval/summary.json")
    echo "$seed $a $b $c"
  done | awk '{ printf "%-6s %-22.2f %-8.2f %-14.2f %+-18.2f %+.2f\n", $1, $2, $3, $4, $2 - $3, $2 - $4
                for (i = 2; i <= 6; ++i) { v = i <= 4 ? $i : (i == 5 ? $2 - $3 : $2 - $4); s[i] += v; q[i] += v * v } ++n }
              END { printf "mean ± sample std over %d seeds:", n
                    for (i = 2; i <= 6; ++i) { m = s[i] / n; printf "  %+.2f ± %.2f", m, (n > 1 ? sqrt((q[i] - n * m * m) / (n - 1)) : 0) }
                    print "" }'
} | tee "$results/comparison.txt"
