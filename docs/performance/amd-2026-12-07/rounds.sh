#!/usr/bin/env bash
# Three rounds in a row of the cnn with the Winograd convolutions (against Python, same run) and without
# (LARGEBATCH_WINOGRAD=0, largebatch alone): the spread of a noisy host. Usage: rounds.sh [path/to/largebatch]
set -u
here=$(dirname "${BASH_SOURCE[0]}")
lb=$(realpath "${1:-$here/../../../build/largebatch}")  # before the cd: a path relative to where it was called from
[ -f "$lb" ] && [ -x "$lb" ] || { echo "$(basename "$0"): $lb: not an executable largebatch" >&2; exit 2; }
cd "$here"
for round in 1 2 3; do
  "$lb" bench train --model cnn --batch-sizes 256,1024 --steps 10 > "rounds_cnn_winograd_$round.txt" 2>&1
  LARGEBATCH_WINOGRAD=0 "$lb" bench train --model cnn --batch-sizes 256,1024 --steps 10 > "rounds_cnn_direct_$round.txt" 2>&1
done
echo "rounds.sh: done"
