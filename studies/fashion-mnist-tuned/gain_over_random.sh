#!/usr/bin/env bash
# What pre-training adds: for every follow-up run of the self-supervised study (RUN__seed-N), its linear
# evaluation's final test top-1 minus that of the randomly initialised backbone of the same seed (the weights its
# pre-training started from), per seed, then mean ± sample std per configuration, in percentage points.
# Usage: studies/fashion-mnist-tuned/gain_over_random.sh [SSL_RESULTS] [BASELINE_RESULTS]
set -euo pipefail
ssl=${1:-docs/results/fashion-mnist-ssl}
baseline=${2:-docs/results/fashion-mnist-ssl-random-init}
final() { jq -er '.final_test_top1' "$1" 2>/dev/null || { echo "$0: no final_test_top1 in $1" >&2; exit 2; }; }
printf '%-28s %-8s %-10s %-10s %s\n' configuration seed "pre-trained %" "random %" "gain (points)"
for run in "$ssl"/*__seed-*/; do
  run=${run%/}
  name=$(basename "$run")
  seed=${name##*__seed-}
  [ -f "$run/linear-eval/summary.json" ] || continue
  [ -f "$baseline/seed-$seed/summary.json" ] || { echo "$0: no baseline for seed $seed in $baseline" >&2; exit 2; }
  pretrained=$(final "$run/linear-eval/summary.json")
  random=$(final "$baseline/seed-$seed/summary.json")
  printf '%s %s %s %s\n' "${name%__seed-*}" "$seed" "$pretrained" "$random"
done | awk '{ gain = 100 * ($3 - $4); printf "%-28s %-8s %-13.2f %-10.2f %+.2f\n", $1, $2, 100 * $3, 100 * $4, gain
              if (!($1 in n)) names[++k] = $1
              n[$1]++; s[$1] += gain; q[$1] += gain * gain }
            END { print ""; print "configuration                mean gain ± sample std (seeds)"
                  for (i = 1; i <= k; ++i) { c = names[i]; m = s[c] / n[c]
                    sd = n[c] > 1 ? sqrt((q[c] - n[c] * m * m) / (n[c] - 1)) : 0
                    printf "%-28s %+.2f ± %.2f (%d)\n", c, m, sd, n[c] } }'
