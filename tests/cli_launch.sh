#!/usr/bin/env bash
# `largebatch launch`: the environment each worker gets, teardown when a worker fails or is killed, signal
# forwarding, bad input (exit code 2, message naming the flag), and running this binary as the worker.
# Output goes to files, not pipes, so a leftover process can never keep the test waiting.
set -u
BIN="$1"
WORK=$(mktemp -d)
cleanup() {
  [ -n "${LAUNCHER:-}" ] && kill -KILL "$LAUNCHER" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# A failed check also shows the launcher's stderr.
report_bad() {
  bad "$1"
  [ -f "$WORK/err" ] && sed 's/^/     | /' "$WORK/err" | head -8
}

# run NAME ARGS...: runs the launcher; sets rc and secs; stderr in $WORK/err, stdout in $WORK/out.
run() {
  local start=$SECONDS
  "$BIN" launch "$@" >"$WORK/out" 2>"$WORK/err" </dev/null
  rc=$?
  secs=$((SECONDS - start))
}

# 1. The environment of each worker: ranks R*N+i of M*N, local ranks, master address and port.
D="$WORK/env"
mkdir -p "$D"
echo "checking: 3 workers of node 1 of 2 get RANK 3..5, WORLD_SIZE 6, LOCAL_RANK 0..2, MASTER_ADDR/PORT"
run --nproc-per-node 3 --nnodes 2 --node-rank 1 --master-port 29611 --exec -- \
  sh -c 'echo "$RANK $WORLD_SIZE $LOCAL_RANK $LOCAL_WORLD_SIZE $NODE_RANK $MASTER_ADDR $MASTER_PORT" > '"$D"'/out.$RANK'
envok=1
for i in 0 1 2; do
  r=$((3 + i))
  want="$r 6 $i 3 1 127.0.0.1 29611"
  got=$(cat "$D/out.$r" 2>/dev/null)
  [ "$got" = "$want" ] || { envok=0; echo "     out.$r: '$got', expected '$want'"; }
done
[ "$(ls "$D" | wc -l)" -eq 3 ] || { envok=0; echo "     files: $(ls "$D" | tr '\n' ' ')"; }
if [ "$rc" -eq 0 ] && [ "$envok" -eq 1 ] && grep -q "starting 3 workers (ranks 3..5 of 6), master 127.0.0.1:29611" "$WORK/err"; then
  ok "environment (exit $rc)"
else
  report_bad "environment: exit $rc"
fi

# A worker that fails: the launcher exits with its code (128 + N for signal N) within 5 s, names it, and
# does not wait for the others. Arguments: label, expected exit code, message pattern, launch arguments.
expect_worker_failure() {
  local label=$1 code=$2 pattern=$3
  shift 3
  run "$@"
  if [ "$rc" -eq "$code" ] && [ "$secs" -le 5 ] && grep -q "$pattern" "$WORK/err"; then
    ok "$label (exit $rc after ${secs} s)"
  else
    report_bad "$label: exit $rc after ${secs} s (expected $code within 5 s)"
  fi
}

# 2. A failing worker.
echo "checking: worker rank 1 exits 7 -> launcher exits 7 at once, the other worker is terminated"
expect_worker_failure "failing worker" 7 "worker rank 1 (local 1, pid [0-9]*) exited with code 7" \
  --nproc-per-node 2 --exec -- sh -c 'if [ $RANK = 1 ]; then exit 7; fi; sleep 30'

# 3. A worker killed by a signal.
echo "checking: worker rank 0 killed by SIGKILL -> launcher exits 137"
expect_worker_failure "killed worker" 137 "worker rank 0 (local 0, pid [0-9]*) was killed by signal 9" \
  --nproc-per-node 2 --exec -- sh -c 'if [ $RANK = 0 ]; then kill -9 $$; fi; sleep 30'

# 4. SIGTERM sent to the launcher reaches every worker; the launcher exits when they have.
D="$WORK/term"
mkdir -p "$D"
echo "checking: SIGTERM to the launcher is forwarded to both workers"
"$BIN" launch --nproc-per-node 2 --exec -- \
  sh -c 'trap "echo got > '"$D"'/term.\$RANK; exit 0" TERM; echo up > '"$D"'/up.$RANK; while true; do sleep 0.1; done' \
  >"$WORK/out" 2>"$WORK/err" </dev/null &
LAUNCHER=$!
for _ in $(seq 50); do [ -f "$D/up.0" ] && [ -f "$D/up.1" ] && break; sleep 0.1; done
kill -TERM "$LAUNCHER"
for _ in $(seq 50); do kill -0 "$LAUNCHER" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$LAUNCHER" 2>/dev/null; then
  report_bad "forwarded SIGTERM: launcher still running 5 s after SIGTERM"
else
  wait "$LAUNCHER"
  rc=$?
  if [ -f "$D/term.0" ] && [ -f "$D/term.1" ] && [ "$rc" -eq 0 ]; then
    ok "forwarded SIGTERM (both workers trapped it, launcher exit $rc)"
  else
    report_bad "forwarded SIGTERM: term files: $(ls "$D" | tr '\n' ' '), launcher exit $rc"
  fi
fi
LAUNCHER=

# 5. Bad input: exit 2 and one line naming the flag, before any worker starts.
expect_bad() {  # expect_bad NAME PATTERN ARGS...
  local name="$1" pattern="$2"
  shift 2
  run "$@"
  if [ "$rc" -eq 2 ] && grep -q -- "$pattern" "$WORK/err" && ! grep -q "starting" "$WORK/err" &&
    [ "$(wc -l <"$WORK/err")" -eq 1 ]; then
    ok "bad input $name: $(cat "$WORK/err")"
  else
    report_bad "bad input $name: exit $rc (expected 2, message matching '$pattern')"
  fi
}
echo "checking: bad input exits 2 naming the flag"
expect_bad nproc "largebatch launch: --nproc-per-node" --nproc-per-node 0 --exec -- true
expect_bad node-rank "largebatch launch: --node-rank" --node-rank 2 --nnodes 2 --exec -- true
expect_bad port "largebatch launch: --master-port" --master-port 70000 --exec -- true
expect_bad no-command "largebatch launch: missing the worker command after \`--\`" --nproc-per-node 2 --
expect_bad no-separator "largebatch launch: put the worker command after \`--\`" --nproc-per-node 2 --exec true
run --nproc-per-node 2 --exec -- no-such-program-xyz
if [ "$rc" -eq 2 ] && grep -q "worker rank 0 (local 0): cannot run 'no-such-program-xyz'" "$WORK/err" &&
  [ "$(grep -c "cannot run" "$WORK/err")" -eq 1 ]; then
  ok "bad input no-program: $(grep "cannot run" "$WORK/err")"
else
  report_bad "bad input no-program: exit $rc (expected 2, one 'cannot run' line)"
fi

# 6. Without --exec the workers run this binary with the arguments after `--`.
echo "checking: launch --nproc-per-node 2 -- --version runs largebatch --version twice"
run --nproc-per-node 2 -- --version
n=$(grep -c "^largebatch " "$WORK/out")
if [ "$rc" -eq 0 ] && [ "$n" -eq 2 ]; then
  ok "same binary ($n version lines, exit $rc)"
else
  report_bad "same binary: $n version lines, exit $rc (expected 2 and 0)"
fi

end_checks cli_launch
