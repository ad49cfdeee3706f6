#!/usr/bin/env bash
# Copies a sweep's small result files (no weights, checkpoints or logs) into a results folder that is committed,
# so that the report regenerates from it alone: every finished run's config.json, metrics.csv, summary.json,
# telemetry.csv and sharpness.csv (and those of its linear-eval/ part), and the sweep's study.json.
# Runs still going are left for the next call. Usage: scripts/collect_study.sh RUNS_DIR RESULTS_DIR
set -eu
[ $# -eq 2 ] || { echo "usage: $0 RUNS_DIR RESULTS_DIR" >&2; exit 2; }
src=$1 dest=$2
[ -d "$src" ] || { echo "$0: no folder $src" >&2; exit 2; }
mkdir -p "$dest"
finished() {  # a summary.json saying completed or diverged
  grep -qE '"status": "(completed|diverged)"' "$1/summary.json" 2>/dev/null
}
linear_eval=0
grep -qE '"linear_eval": *true' "$src/study.json" 2>/dev/null && linear_eval=1
copied=0
for run in "$src"/*/; do
  run=${run%/}
  name=$(basename "$run")
  [ "$name" = report ] && continue
  finished "$run" || continue
  # In a sweep whose runs go on to a linear evaluation (study.json says so), a pre-training run is finished when
  # its evaluation is (or when it diverged): the committed files hold no backbone to evaluate later.
  if { [ "$linear_eval" = 1 ] || [ -d "$run/linear-eval" ]; } && ! grep -q '"status": "diverged"' "$run/summary.json"; then
    finished "$run/linear-eval" || continue
  fi
  for part in "" /linear-eval; do
    [ -d "$run$part" ] || continue
    mkdir -p "$dest/$name$part"
    for f in config.json metrics.csv summary.json telemetry.csv sharpness.csv; do
      [ -f "$run$part/$f" ] && cp -p "$run$part/$f" "$dest/$name$part/$f"
    done
  done
  copied=$((copied + 1))
done
[ -f "$src/study.json" ] && cp -p "$src/study.json" "$dest/study.json"
echo "collect_study: $copied finished runs of $src in $dest"
