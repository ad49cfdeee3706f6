#!/usr/bin/env bash
# Bad input to `largebatch train`: each case must exit with code 2 and a one-line message naming the
# file, field or flag, with no stack trace.
set -u
BIN="$1"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

expect() {  # expect NAME EXPECTED_CODE PATTERN -- ARGS...
  local name="$1" code="$2" pattern="$3"
  shift 4
  local out rc
  out=$("$BIN" "$@" 2>&1)
  rc=$?
  if [ "$rc" -eq "$code" ] && grep -q -- "$pattern" <<<"$out" && ! grep -q -E "terminate called|Exception raised from|what\(\):" <<<"$out"; then
    ok "$name"
  else
    bad "$name: exit $rc (expected $code), output:"
    echo "$out" | head -5
  fi
}

T="train --progress none --no-plots --threads 1 --epochs 1"

# A missing data set, corrupt and truncated files.
expect missing-dir 2 "$WORK/nowhere" -- $T --data mnist --data-dir "$WORK/nowhere" --out "$WORK/o1"
mkdir -p "$WORK/badmagic"
printf '\x00\x00\x08\x04\x00\x00\x00\x01\x00\x00\x00\x1c\x00\x00\x00\x1c' > "$WORK/badmagic/train-images-idx3-ubyte"
printf '\x00\x00\x08\x01\x00\x00\x00\x01\x05' > "$WORK/badmagic/train-labels-idx1-ubyte"
cp "$WORK/badmagic/train-images-idx3-ubyte" "$WORK/badmagic/t10k-images-idx3-ubyte"
cp "$WORK/badmagic/train-labels-idx1-ubyte" "$WORK/badmagic/t10k-labels-idx1-ubyte"
expect bad-magic 2 "train-images-idx3-ubyte.*magic" -- $T --data mnist --data-dir "$WORK/badmagic" --out "$WORK/o2"
mkdir -p "$WORK/trunc"
printf '\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00\x00\x1c\x00\x00\x00\x1c\x01\x02\x03' > "$WORK/trunc/train-images-idx3-ubyte"
printf '\x00\x00\x08\x01\x00\x00\x00\x02\x05\x01' > "$WORK/trunc/train-labels-idx1-ubyte"
cp "$WORK/trunc/"* "$WORK/badmagic/" 2>/dev/null
cp "$WORK/trunc/train-images-idx3-ubyte" "$WORK/trunc/t10k-images-idx3-ubyte"
cp "$WORK/trunc/train-labels-idx1-ubyte" "$WORK/trunc/t10k-labels-idx1-ubyte"
expect truncated 2 "train-images-idx3-ubyte.*truncated" -- $T --data mnist --data-dir "$WORK/trunc" --out "$WORK/o3"
mkdir -p "$WORK/cifar"
head -c 3072 /dev/zero > "$WORK/cifar/data_batch_1.bin"
expect cifar-size 2 "data_batch_1.bin" -- $T --data cifar10 --data-dir "$WORK/cifar" --out "$WORK/o4"
mkdir -p "$WORK/labels"
printf '\x00\x00\x08\x03\x00\x00\x00\x01\x00\x00\x00\x1c\x00\x00\x00\x1c' > "$WORK/labels/train-images-idx3-ubyte"
head -c 784 /dev/zero >> "$WORK/labels/train-images-idx3-ubyte"
printf '\x00\x00\x08\x01\x00\x00\x00\x01\x0c' > "$WORK/labels/train-labels-idx1-ubyte"
cp "$WORK/labels/train-images-idx3-ubyte" "$WORK/labels/t10k-images-idx3-ubyte"
cp "$WORK/labels/train-labels-idx1-ubyte" "$WORK/labels/t10k-labels-idx1-ubyte"
expect label-range 2 "label 12 out of range" -- $T --data mnist --data-dir "$WORK/labels" --out "$WORK/o5"

# Unknown names and contradictory flags.
S="$T --data synthetic --synthetic-size 256 --batch-size 64"
expect unknown-data 2 "--data: unknown data set 'imagenet'" -- $T --data imagenet --out "$WORK/o6"
expect unknown-model 2 "--model" -- $S --model vgg --out "$WORK/o7"
expect unknown-optimizer 2 "unknown optimizer 'adamax'" -- $S --optimizer adamax --out "$WORK/o8"
expect on-nonfinite 2 "--on-nonfinite" -- $S --on-nonfinite ignore --out "$WORK/o8b"
expect checkpoint-every 2 "--checkpoint-every must be >= 0" -- $S --checkpoint-every -1 --out "$WORK/o8d"
LARGEBATCH_STEP_SIMD=sse9 expect step-simd 2 "LARGEBATCH_STEP_SIMD: unknown or unavailable instruction set 'sse9'" -- $S --out "$WORK/o8e"
LARGEBATCH_STEP_BLOCK_BYTES=12Q expect step-block-bytes 2 "LARGEBATCH_STEP_BLOCK_BYTES: '12Q' is not a byte count" -- $S --out "$WORK/o8f"
expect skip-limit 2 "--skip-limit must be >= 1" -- $S --skip-limit 0 --out "$WORK/o8c"
expect unknown-opt-key 2 "unknown optimizer option 'momentun'" -- $S --opt momentun=0.9 --out "$WORK/o9"
expect bad-opt-value 2 "momentum = 1.5" -- $S --opt momentum=1.5 --out "$WORK/o10"
expect bad-per-run-lambda 2 "--opt lambda=x/T: expected a positive number before /T" -- $S --optimizer tvlars --opt lambda=x/T --out "$WORK/o10b"
expect opt-not-kv 2 "not key=value" -- $S --opt momentum --out "$WORK/o11"
expect micro-batch 2 "--micro-batch 48 does not divide --batch-size 64" -- $S --micro-batch 48 --out "$WORK/o12"
expect schedule 2 "--schedule: 'exponential' is not" -- $S --schedule exponential --out "$WORK/o13"
expect step-epochs 2 "--step-epochs: '60,30' is not increasing" -- $S --schedule step --step-epochs 60,30 --out "$WORK/o13b"
expect step-needs-milestones 2 "the step schedule needs its milestones" -- $S --schedule step --warmup-epochs 0 --out "$WORK/o13c"
expect precision 2 "--precision: 'fp16' is not" -- $S --precision fp16 --out "$WORK/o13d"
expect ema 2 "--ema-decay must be in" -- $S --ema-decay 1 --out "$WORK/o13e"
expect warmup 2 "--warmup-epochs" -- $S --schedule warmup-cosine --warmup-epochs 5 --out "$WORK/o14"
# --resume with nothing to resume from starts from the beginning (a retry loop can always pass it).
expect no-checkpoint-yet 0 "no checkpoint in $WORK/o15 yet, starting from the beginning" -- $S --resume --out "$WORK/o15"
: > "$WORK/a-file"
expect out-is-a-file 2 "--out: cannot create $WORK/a-file/run" -- $S --out "$WORK/a-file/run"
expect not-a-number 2 "batch-size" -- $S --batch-size many --out "$WORK/o16"
expect unknown-flag 2 "--frobnicate" -- $S --frobnicate --out "$WORK/o17"
echo '{"lr": "fast"}' > "$WORK/bad.json"
expect config-type 2 "lr" -- $S --config "$WORK/bad.json" --out "$WORK/o18"
expect config-missing 2 "$WORK/none.json" -- $S --config "$WORK/none.json" --out "$WORK/o19"

# An existing run is not overwritten; a resumed run must match the checkpointed one.
"$BIN" $S --out "$WORK/run" >/dev/null 2>&1
expect overwrite 2 "already holds a run" -- $S --out "$WORK/run"
expect resume-mismatch 2 "--model differs" -- $S --model mlp --resume --out "$WORK/run"
# A damaged checkpoint is refused before LibTorch reads it (the CRC-32 in its header).
cp -r "$WORK/run" "$WORK/damaged"
printf 'XXXX' | dd of="$WORK/damaged/checkpoint.pt" bs=1 seek=2000 conv=notrunc 2>/dev/null
expect damaged-checkpoint 2 "checkpoint $WORK/damaged/checkpoint.pt: damaged: CRC-32" -- $S --resume --out "$WORK/damaged"
truncate -s 1000 "$WORK/damaged/checkpoint.pt"
expect truncated-checkpoint 2 "checkpoint.pt: truncated" -- $S --resume --out "$WORK/damaged"

# A JSON config written by a run is accepted back (the saved config.json).
out=$("$BIN" train --config "$WORK/run/config.json" --out "$WORK/again" --epochs 1 2>&1)
if [ $? -eq 0 ]; then ok config-roundtrip; else bad "config-roundtrip: $(head -5 <<<"$out")"; fi

# summarize: a table row for a run, exit 2 naming a directory that holds none.
out=$("$BIN" summarize "$WORK/run" 2>&1)
if [ $? -eq 0 ] && grep -q "| $WORK/run | tvlars | 64 | 1 |" <<<"$out"; then ok summarize; else bad "summarize: $(head -5 <<<"$out")"; fi
expect summarize-not-a-run 2 "$WORK/badmagic: no summary.json" -- summarize "$WORK/badmagic"

# Divergence: exit 3 with the step and the layer with the largest trust ratio.
expect diverged 3 "non-finite loss.*at step.*largest trust ratio" -- $S --optimizer lars --lr 1e30 --out "$WORK/o20"

# pretrain and linear-eval: the same rules, their own flags.
P="pretrain --progress none --no-plots --threads 1 --epochs 1 --data synthetic --synthetic-size 128 --batch-size 32"
expect pre-projector 2 "--projector: '64-x'" -- $P --projector 64-x --out "$WORK/p1"
expect pre-batch 2 "--batch-size must be >= 2" -- pretrain --progress none --data synthetic --batch-size 1 --out "$WORK/p2"
expect pre-lambda 2 "--lambda" -- $P --lambda -1 --out "$WORK/p3"
expect pre-min-scale 2 "--min-scale" -- $P --min-scale 0 --out "$WORK/p4"
expect pre-optimizer 2 "unknown optimizer 'adamax'" -- $P --optimizer adamax --out "$WORK/p5"
expect pre-warmup 2 "--warmup-epochs 3 is longer than --epochs 1" -- $P --schedule warmup-cosine --warmup-epochs 3 --out "$WORK/p6"
expect pre-clip 2 "--clip-grad-norm must be finite and >= 0, got -1" -- $P --clip-grad-norm -1 --out "$WORK/p7"
expect peer-max-grad-norm 2 "max_grad_norm = 0: must be finite and > 0" -- $P --optimizer lamb:timm --opt max_grad_norm=0 --out "$WORK/p8"
expect peer-guarded-update 2 "guarded_update: 'foo' is not unit-ratio" -- $P --optimizer larc:apex --opt guarded_update=foo --out "$WORK/p9"
"$BIN" $P --projector 32-32 --out "$WORK/pre" >/dev/null 2>&1
expect pre-overwrite 2 "already holds a run" -- $P --projector 32-32 --out "$WORK/pre"
expect pre-resume-mismatch 2 "--projector differs" -- $P --projector 64-64 --resume --out "$WORK/pre"
echo '{"lambda": "big"}' > "$WORK/badpre.json"
expect pre-config-type 2 "lambda = big" -- pretrain --config "$WORK/badpre.json" --out "$WORK/p7"
L="linear-eval --progress none --no-plots --threads 1 --epochs 1 --data synthetic --synthetic-size 128"
expect le-no-backbone 2 "--backbone is required" -- $L --out "$WORK/l1"
expect le-missing 2 "--backbone: no such file $WORK/none.pt" -- $L --backbone "$WORK/none.pt" --out "$WORK/l2"
expect le-random-model 2 "--backbone random needs --model" -- $L --backbone random --out "$WORK/l3"
expect le-augment 2 "--augment: 'paper'" -- $L --backbone random --model cnn --augment paper --out "$WORK/l4"
expect le-not-a-model 2 "$WORK/bad.json: not a model file" -- $L --backbone "$WORK/bad.json" --model cnn --out "$WORK/l5"
expect le-wrong-model 2 "does not hold a resnet20" -- $L --backbone "$WORK/pre/backbone.pt" --model resnet20 --out "$WORK/l6"
expect compare-exclude-regex 2 "--exclude '(running': not a regular expression" -- compare "$WORK/pre/backbone.pt" "$WORK/pre/backbone.pt" --exclude '(running'
expect compare-exclude-all 2 "no tensor left to compare (--exclude '.' matches all" -- compare "$WORK/pre/backbone.pt" "$WORK/pre/backbone.pt" --exclude .
expect compare-from-mismatch 2 "--from $WORK/pre/checkpoint.pt: .* is missing" -- compare "$WORK/pre/backbone.pt" "$WORK/pre/backbone.pt" --from "$WORK/pre/checkpoint.pt"
expect bench-pretrain-projector 2 "largebatch bench pretrain: --projector: '64-x' is not a list of layer sizes" -- bench pretrain --projector 64-x --no-python
expect bench-step-block-bytes 2 "largebatch bench step: --block-bytes: 'lots' is not a byte count" -- bench step --models mlp --no-python --block-bytes lots
LARGEBATCH_FUSED_FIRST_LAYER=yes expect fused-first-layer-env 2 "LARGEBATCH_FUSED_FIRST_LAYER: 'yes' is neither 0 nor 1" -- $S --model cnn --out "$WORK/fused-env"
LARGEBATCH_WINOGRAD=yes expect winograd-env 2 "LARGEBATCH_WINOGRAD: 'yes' is neither 0 nor 1" -- $S --model cnn --out "$WORK/winograd-env"
LARGEBATCH_STEP_BLOCK_BYTES=12Q expect bench-step-block-env 2 "LARGEBATCH_STEP_BLOCK_BYTES: '12Q' is not a byte count" -- bench step --models mlp --no-python
expect bench-profile-projector 2 "largebatch bench profile: --projector: '64-x' is not a list of layer sizes" -- bench profile --task barlow-twins --projector 64-x
expect bench-profile-data 2 "largebatch bench profile: .*nowhere" -- bench profile --data cifar10 --data-dir "$WORK/nowhere"
WORLD_SIZE=2 RANK=0 expect le-world 2 "linear-eval runs in one process" -- $L --backbone "$WORK/pre/backbone.pt" --out "$WORK/l8"
expect le-lr 2 "--lr must be" -- $L --backbone random --model cnn --lr 0 --out "$WORK/l9"

# sweep and report.
expect sweep-missing 2 "no grid file $WORK/nogrid.json" -- sweep "$WORK/nogrid.json"
echo '{"axes": {"lr": [1, 1]}}' > "$WORK/grid.json"
expect sweep-duplicate 2 "$WORK/grid.json: two runs would share the folder 'lr-1'" -- sweep "$WORK/grid.json" --out "$WORK/sw"
expect sweep-jobs 2 "--jobs" -- sweep "$WORK/grid.json" --jobs 0
expect report-empty 2 "no finished classification runs" -- report "$WORK/badmagic"

end_checks cli_bad_input
