#!/usr/bin/env bash
# The README's first command (`make demo`): TVLARS against warm-up LARS on Fashion-MNIST at batch 4096.
# DEMO_EPOCHS (default 4) sets the length; DEMO_OUT the output folder.
set -euo pipefail
BIN=${1:-build/largebatch}
EPOCHS=${DEMO_EPOCHS:-4}
OUT=${DEMO_OUT:-runs/demo-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
echo "== largebatch demo: Fashion-MNIST, batch 4096, $EPOCHS epochs per optimizer, outputs in $OUT"
"$BIN" --version
for opt in tvlars wa-lars; do
  echo
  echo "== $opt"
  "$BIN" train --optimizer "$opt" --batch-size 4096 --epochs "$EPOCHS" --warmup-epochs 1 --telemetry-every 5 \
    --progress lines --out "$OUT/$opt"
done
echo
echo "== comparison"
"$BIN" summarize "$OUT/tvlars" "$OUT/wa-lars"
echo
echo "Per run: metrics.csv, summary.json, telemetry.csv (per-layer trust ratios), curves.png, loss.png,"
echo "trust_ratios.png, config.json (re-run with: $BIN --config $OUT/tvlars/config.json train --out NEW_DIR)."
