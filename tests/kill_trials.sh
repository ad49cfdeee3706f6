#!/usr/bin/env bash
# Kill trials: `largebatch train` killed with SIGKILL at any moment and resumed with --resume ends exactly where
# an uninterrupted run ends.
#  - Reference: one uninterrupted run (resnet18 on 128 synthetic images, 3 epochs of 2 steps, one thread: its
#    checkpoint is ~90 MB, so writing it takes a good share of each epoch), run twice: the two model.pt files
#    must be byte-identical, so `cmp` is a meaningful test of bit-identical weights (stricter than
#    `largebatch compare --atol 0 --rtol 0`, which checks the tensors only). Its wall time is T.
#  - 10 random trials: the same run in a fresh --out, SIGKILL at a uniformly random moment in (0, T); in the
#    even-numbered trials the first --resume is also killed at a random moment in (0, T); then --resume until
#    summary.json says completed (at most 6 resumes). A trial where a run finished before its kill is started
#    afresh with new moments, up to 5 times, and fails if none of its attempts was killed in time.
#    Trials 6-10 add --checkpoint-every 1 (checkpoints within epochs, resumes in the middle of one).
#    KILL_RANDOM_TRIALS="1 2 6 7" runs those alone.
#  - 4 targeted trials: SIGKILL 0-80 ms after checkpoint.pt.tmp appears during the write of epoch 1, 2 or 3
#    (a write lasts ~100-400 ms), and 0-15 ms after model.pt.tmp appears (the final model write, ~30 ms);
#    then --resume until completed.
#  After every kill: a checkpoint.pt that exists has the largebatch header and the size its header promises,
#  and the next --resume never refuses it (exit 2 = "damaged: CRC-32" / "truncated"), a leftover
#  checkpoint.pt.tmp included. At the end of every trial: status completed, model.pt byte-identical to the
#  reference, metrics.csv (all but the timing columns) equal to the reference's, no *.tmp file left.
#  - 2 SIGTERM trials: a stop request at a random moment writes a checkpoint at the step the run stops after
#    (exit 130), and the resume continues from exactly that step.
# Kill moments come from $RANDOM seeded with KILL_SEED (printed; KILL_SEED=N replays the same moments as fractions
# of T, though what the run is doing at a given moment also depends on the machine's load).
# Usage: kill_trials.sh path/to/largebatch
set -u
LB=$(readlink -f "$1")
W=$(mktemp -d)
trap 'jobs -p | xargs -r kill -9 2>/dev/null; rm -rf "$W"' EXIT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

seed=${KILL_SEED:-$(( $(date +%s%N) / 1000 % 1000000 ))}
echo "kill seed: $seed (replay with KILL_SEED=$seed)"
RANDOM=$seed

RUN=(train --data synthetic --synthetic-size 128 --batch-size 64 --model resnet18 --epochs 3 --seed 7
     --threads 1 --loader-workers 1 --progress none --no-plots)
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
sleep_ms() { sleep "$(($1 / 1000)).$(printf %03d $(($1 % 1000)))"; }
cols() { cut -d, -f1-9 "$1"; }  # metrics.csv without the timing columns

# ---- reference -----------------------------------------------------------------------------------------
t0=$(now_ms)
"$LB" "${RUN[@]}" --out "$W/ref" > "$W/ref.log" 2>&1 || { cat "$W/ref.log"; bad "reference run failed"; }
T=$(( $(now_ms) - t0 ))
t0=$(now_ms)
"$LB" "${RUN[@]}" --out "$W/ref2" > "$W/ref2.log" 2>&1 || { cat "$W/ref2.log"; bad "second reference run failed"; }
T2=$(( $(now_ms) - t0 ))
[ "$T2" -lt "$T" ] && T=$T2  # the first run also pays for cold caches: the shorter is the run's length
if [ -f "$W/ref/model.pt" ] && cmp -s "$W/ref/model.pt" "$W/ref2/model.pt"; then
  ok "reference: ${T} ms, checkpoint $(stat -c %s "$W/ref/checkpoint.pt") bytes; two runs give byte-identical model.pt"
else
  bad "two identical runs give different model.pt: cmp cannot judge the trials"
fi

in_write=0 over_tmp=0 survived=0 trials=0
# After a kill: the checkpoint, if any, is whole (header magic, size as promised). Sets $tmp_left.
after_kill() {  # after_kill OUT LABEL
  local out=$1 ckpt="$1/checkpoint.pt"
  tmp_left=0
  if [ -e "$ckpt.tmp" ]; then tmp_left=1; in_write=$((in_write + 1)); fi
  [ -e "$ckpt" ] || return 0
  local size promised
  size=$(stat -c %s "$ckpt")
  promised=$(od -An -tu8 -j26 -N8 "$ckpt" | tr -d ' ')
  if [ "$(head -c 22 "$ckpt")" != "largebatch-checkpoint" ] || [ "$size" -ne $((promised + 38)) ]; then
    trial_ok=0
    echo "     $2: checkpoint.pt is not whole after the kill: $size bytes, header promises $promised + 38"
  fi
}

# Starts a run (fresh or --resume) in the background; $pid.
start() {
  over=0
  [[ " $* " == *" --resume "* ]] && [ -e "$out/checkpoint.pt.tmp" ] && over=1
  "$LB" "${RUN[@]}" "${TRIAL_FLAGS[@]}" "$@" >> "$W/trial.log" 2>&1 &
  pid=$!
}

# Waits for the run $pid; a resume must never be refused (exit 2). Returns the exit code.
finish() {
  wait "$pid" 2>/dev/null
  local rc=$?
  [ "$rc" -eq 0 ] && [ "$over" -eq 1 ] && over_tmp=$((over_tmp + 1))  # a leftover .tmp did not hurt
  if [ "$rc" -eq 2 ]; then
    trial_ok=0
    echo "     resume refused (exit 2): $(grep 'largebatch train:' "$W/trial.log" | tail -1)"
  fi
  return "$rc"
}

# SIGKILL now; if the run had already ended, says how. Returns 0 when the kill is what ended it, 1 when the run
# had finished first (the trial is tried again: it tested nothing), 2 when it had failed first.
kill_now() {  # kill_now OUT LABEL
  kill -9 "$pid" 2>/dev/null
  finish
  local rc=$?
  if [ "$rc" -eq 0 ]; then note+=" $2 finished before the kill;"; return 1; fi
  if [ "$rc" -ne 137 ]; then
    trial_ok=0; note+=" $2 ended with exit $rc before the kill;"; return 2
  fi
  after_kill "$1" "$2"
}

kill_at_random() {  # kill_at_random OUT LABEL: SIGKILL at a random moment in (0, T) of the run $pid
  local ms=$(( 1 + RANDOM * (T - 1) / 32768 ))
  sleep_ms "$ms"
  kill_now "$1" "$2" || return $?
  local where=""
  [ "$tmp_left" -eq 1 ] && where=" (in a checkpoint write)"
  note+=" $2 killed at ${ms} ms$where;"
}

kill_in_write() {  # kill_in_write OUT FILE N MAX: SIGKILL 0-MAX ms after FILE.tmp appears for the Nth time
  local tmp="$1/$2.tmp" n=0 seen=0 ms=$(( RANDOM * $4 / 32768 ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ -e "$tmp" ]; then
      if [ "$seen" -eq 0 ]; then seen=1; n=$((n + 1)); [ "$n" -eq "$3" ] && break; fi
    else
      seen=0
    fi
  done  # busy polling (builtins only): the model.pt write lasts ~30 ms
  [ "$ms" -gt 0 ] && sleep_ms "$ms"
  local still=0
  kill -0 "$pid" 2>/dev/null && [ -e "$tmp" ] && still=1
  kill_now "$1" "run" || return $?
  note+=" run killed ${ms} ms after $2.tmp #$3 appeared ($([ "$still" -eq 1 ] && echo "while written" || echo "write already done"));"
}

# A trial whose kill came after the run's end tested nothing: it is started afresh, up to this many times, and
# fails if no attempt is killed in time (it never counts as survived).
ATTEMPTS=5
# Runs "$@" (which starts and kills the trial's runs) until its kills land: 0 when they did, or when the trial
# already failed for another reason (complete_and_check reports it); 1 after ATTEMPTS attempts that finished first.
until_killed() {
  local attempt rc
  for attempt in $(seq 1 "$ATTEMPTS"); do
    rm -rf "$out"
    "$@"
    rc=$?
    [ "$rc" -ne 1 ] && return 0
  done
  return 1
}

# Resumes until completed; checks the end state against the reference.
complete_and_check() {  # complete_and_check OUT NAME
  local out=$1 name=$2 tries=0
  until grep -q '"status": "completed"' "$out/summary.json" 2>/dev/null || [ "$tries" -ge 6 ]; do
    tries=$((tries + 1))
    start --resume --out "$out"
    finish || { trial_ok=0; echo "     resume $tries failed: $(tail -2 "$W/trial.log")"; }
  done
  note+=" $tries resume(s) to completion"
  local leftovers
  leftovers=$(cd "$out" && ls -- *.tmp 2>/dev/null | tr '\n' ' ')
  if ! grep -q '"status": "completed"' "$out/summary.json" 2>/dev/null; then
    trial_ok=0; note+="; NOT completed"
  elif ! cmp -s "$W/ref/model.pt" "$out/model.pt"; then
    trial_ok=0; note+="; model.pt differs from the reference"
  elif [ "$(cols "$W/ref/metrics.csv")" != "$(cols "$out/metrics.csv")" ]; then
    trial_ok=0; note+="; metrics.csv differs from the reference"
  elif [ -n "$leftovers" ]; then
    trial_ok=0; note+="; temporary files left: $leftovers"
  fi
  trials=$((trials + 1))
  if [ "$trial_ok" -eq 1 ]; then
    survived=$((survived + 1))
    ok "$name:$note, weights identical"
  else
    bad "$name:$note"
    sed 's/^/     | /' "$W/trial.log" | grep -v "optimizer options" | tail -8
  fi
}

# ---- 10 random trials ----------------------------------------------------------------------------------
# Trials 6-10 also checkpoint within epochs (--checkpoint-every 1: after the first step of each 2-step epoch), so
# kills land between, during and after those writes too and resumes start in the middle of an epoch.
# KILL_RANDOM_TRIALS lists which of the 10 run (the sanitizer build, whose point is memory errors and not the
# spread of kill moments, runs 1 2 6 7: a run and a resume killed, with and without checkpoints within epochs).
TRIAL_FLAGS=()
for i in ${KILL_RANDOM_TRIALS:-$(seq 1 10)}; do
  case "$i" in [1-9] | 10) ;; *) bad "KILL_RANDOM_TRIALS: '$i' is not a trial number 1-10"; continue ;; esac
  [ "$i" -ge 6 ] && TRIAL_FLAGS=(--checkpoint-every 1)
  out="$W/t$i" note="" trial_ok=1
  : > "$W/trial.log"
  if [ $((i % 2)) -eq 0 ]; then
    random_kills() { start --out "$out"; kill_at_random "$out" "run" || return $?
                     start --resume --out "$out"; kill_at_random "$out" "first resume"; }
  else
    random_kills() { start --out "$out"; kill_at_random "$out" "run"; }
  fi
  if until_killed random_kills; then
    complete_and_check "$out" "random trial $i"
  else
    trials=$((trials + 1))
    bad "random trial $i: no attempt was killed before it finished ($ATTEMPTS attempts):$note"
  fi
done

TRIAL_FLAGS=()

# ---- targeted trials: inside the checkpoint writes and the final model write ---------------------------
# A checkpoint write lasts ~100-400 ms here, the model.pt write ~30 ms: kill 0-80 or 0-15 ms after the start.
for target in checkpoint.pt:1:80 checkpoint.pt:2:80 checkpoint.pt:3:80 model.pt:1:15; do
  file=${target%%:*} nth=$(cut -d: -f2 <<<"$target") max=${target##*:}
  out="$W/w-$file-$nth" note="" trial_ok=1
  : > "$W/trial.log"
  write_kill() { start --out "$out"; kill_in_write "$out" "$file" "$nth" "$max"; }
  if until_killed write_kill; then
    complete_and_check "$out" "targeted trial: $file write #$nth"
  else
    trials=$((trials + 1))
    bad "targeted trial $file write #$nth: no attempt was killed before it finished ($ATTEMPTS attempts):$note"
  fi
done

# ---- stop requests: SIGTERM at a random moment ---------------------------------------------------------
# The run stops after its current step, writes a checkpoint there (exit 130) and the resume repeats no step:
# its first line names the step it continues from, which must be the step the run stopped after.
for i in 1 2; do
  out="$W/term$i" note="" trial_ok=1
  : > "$W/trial.log"
  for attempt in 1 2 3 4 5; do
    rm -rf "$out"
    start --out "$out"
    ms=$(( T / 10 + RANDOM * (T * 7 / 10) / 32768 ))  # within the run: after start-up, before its end
    sleep_ms "$ms"
    kill -TERM "$pid" 2>/dev/null
    finish
    rc=$?
    [ "$rc" -eq 130 ] && break
    if [ "$rc" -eq 143 ]; then note+=" SIGTERM at ${ms} ms came before the handler was installed (start-up: nothing to save), again;"
    else note+=" run ended with exit $rc before SIGTERM at ${ms} ms, again;"; fi
  done
  stopped=$(grep -o 'stopped by a signal at step [0-9]*' "$out/summary.json" | grep -o '[0-9]*$')
  note+=" SIGTERM at ${ms} ms, stopped after step ${stopped:-?};"
  start --resume --out "$out"
  finish || trial_ok=0
  resumed=$(grep -o 'resumed .* (step [0-9]*)' "$W/trial.log" | grep -o '[0-9]*)$' | tr -d ')')
  if [ -z "$stopped" ] || [ "$resumed" != "$stopped" ]; then
    trial_ok=0; note+=" resumed from step ${resumed:-?}, not where it stopped;"
  fi
  complete_and_check "$out" "SIGTERM trial $i"
done

echo "kill trials: $survived/$trials survived ($in_write kills during a checkpoint write, $over_tmp resumes over a leftover checkpoint.pt.tmp)"
end_checks kill_trials
