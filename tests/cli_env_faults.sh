#!/usr/bin/env bash
# Environment faults in `largebatch train`: each ends with one clear line on stderr (naming the file, flag or
# variable and the reason), a non-zero exit, no C++ exception text, and nothing presented as complete that is
# not (no summary.json saying completed, no model.pt) unless the case says the run completes.
#  a. --out inside a regular file, under /proc, or /proc itself: exit 2 naming --out.
#  b. --out not writable (chmod 555; as root the runs are made as nobody with setpriv, else skipped): exit 2
#     naming --out; a directory made read-only between epochs: the checkpoint write fails naming
#     checkpoint.pt.tmp, checkpoint.pt unchanged, and a resume once it is writable again completes.
#  c. Full disk: `ulimit -f` (SIGXFSZ ignored, so writes fail with EFBIG) that config.json and metrics.csv fit
#     but checkpoint.pt does not; the same limit put on a running run with prlimit after its first checkpoint;
#     a real tmpfs filled up between epochs (ENOSPC; skipped where mounting is not allowed). Each: the error
#     names checkpoint.pt.tmp and the reason, checkpoint.pt absent or unchanged, no .tmp left, not completed;
#     then --resume without the limit completes with weights byte-identical to an uninterrupted run.
#  d. --out removed (rm -rf) between epochs: the run ends with an error naming the missing file.
#  e. Data set files deleted while training: the run completes (they are read into memory at the start);
#     --resume with more epochs then exits 2 naming the missing directory or file.
#  f. Rendezvous port in use (a rank 0 waiting for its rank 1 holds MASTER_PORT): a second rank 0 on that port
#     exits within 20 s (--dist-timeout 60) saying the port is in use and naming MASTER_PORT; the first run is
#     unaffected and completes once its rank 1 comes.
# Usage: cli_env_faults.sh path/to/largebatch
set -u
LB=$(readlink -f "$1")
W=$(mktemp -d)
MNT=""
cleanup() {
  jobs -p | xargs -r kill -9 2>/dev/null
  wait 2>/dev/null
  [ -n "$MNT" ] && umount "$MNT" 2>/dev/null
  chmod -R u+rwx "$W" 2>/dev/null
  rm -rf "$W"
}
trap cleanup EXIT
chmod 755 "$W"  # the runs made as nobody (b) reach their directories through it
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

S=(train --data synthetic --synthetic-size 512 --batch-size 64 --model cnn --epochs 3 --seed 3 --threads 1
   --loader-workers 1 --progress none --no-plots)

# run [PREFIX...] -- ARGS: runs the program (after an optional command prefix such as setpriv), stdout in
# $W/out.log, stderr in $W/err.log, exit code in $rc.
run() {
  local prefix=()
  while [ "$1" != "--" ]; do prefix+=("$1"); shift; done
  shift
  "${prefix[@]}" "$LB" "$@" > "$W/out.log" 2> "$W/err.log"
  rc=$?
}

# The run in $W/out.log / $W/err.log / $rc failed as it should: exit code (a number or "nonzero"), exactly one
# stderr line (the --resume note aside) matching the extended regex, no exception text, nothing completed in DIR.
check_error() {  # check_error NAME CODE REGEX DIR
  local name=$1 code=$2 regex=$3 dir=$4 why=""
  local lines
  lines=$(grep -v -- "--resume: no checkpoint in" "$W/err.log")
  if [ "$code" = nonzero ]; then [ "$rc" -ne 0 ] || why+=" exit 0;"; else [ "$rc" -eq "$code" ] || why+=" exit $rc, expected $code;"; fi
  [ "$(printf '%s' "$lines" | grep -c '')" -eq 1 ] || why+=" $(printf '%s' "$lines" | grep -c '') lines on stderr, expected 1;"
  grep -qE -- "$regex" <<<"$lines" || why+=" no line matches /$regex/;"
  cat "$W/out.log" "$W/err.log" | grep -qE "terminate called|Exception raised from|what\(\):|^done:" &&
    why+=" exception text or 'done:' in the output;"
  grep -qs '"status": "completed"' "$dir/summary.json" && why+=" $dir/summary.json says completed;"
  [ -e "$dir/model.pt" ] && why+=" $dir/model.pt exists;"
  if [ -z "$why" ]; then
    ok "$name: exit $rc: $lines"
  else
    bad "$name:$why output:"
    sed 's/^/     | /' "$W/err.log" | head -12
  fi
}

# Waits (at most 60 s) for DIR/metrics.csv to hold the row of epoch N, while process $1 runs.
wait_row() {  # wait_row PID DIR N
  for _ in $(seq 1200); do
    grep -qs "^$3," "$2/metrics.csv" && return 0
    kill -0 "$1" 2>/dev/null || return 1
    sleep 0.05
  done
  return 1
}

no_tmp() { ! ls "$1"/*.tmp > /dev/null 2>&1; }

# A resume without the fault completes with the weights of the uninterrupted reference run.
resume_completes() {  # resume_completes NAME DIR
  run -- "${S[@]}" --resume --out "$2"
  if [ "$rc" -eq 0 ] && grep -qs '"status": "completed"' "$2/summary.json" && cmp -s "$W/ref/model.pt" "$2/model.pt"; then
    ok "$1: --resume without the fault completes, weights identical to an uninterrupted run"
  else
    bad "$1: --resume without the fault: exit $rc"
    sed 's/^/     | /' "$W/err.log" | head -5
  fi
}

"$LB" "${S[@]}" --out "$W/ref" > "$W/ref.log" 2>&1 || { bad "reference run"; cat "$W/ref.log"; }

# ---- a. --out where no directory can be ----------------------------------------------------------------
: > "$W/a-file"
run -- "${S[@]}" --out "$W/a-file/run"
check_error "a1 --out inside a regular file" 2 "--out.*$W/a-file/run.*Not a directory" "$W/a-file/run"
run -- "${S[@]}" --out "/proc/largebatch-test-$$"
check_error "a2 --out under /proc" 2 "--out.*/proc/largebatch-test-$$: " "/proc/largebatch-test-$$"
run -- "${S[@]}" --out /proc
check_error "a3 --out /proc (a directory that takes no files)" 2 "--out.*/proc" /proc

# ---- b. --out not writable -----------------------------------------------------------------------------
AS=()
if [ "$(id -u)" -eq 0 ]; then
  if command -v setpriv > /dev/null && setpriv --reuid=65534 --regid=65534 --clear-groups "$LB" --version > /dev/null 2>&1; then
    AS=(setpriv --reuid=65534 --regid=65534 --clear-groups)
  elif command -v runuser > /dev/null && runuser -u nobody -- "$LB" --version > /dev/null 2>&1; then
    AS=(runuser -u nobody --)
  fi
fi
if [ "$(id -u)" -eq 0 ] && [ ${#AS[@]} -eq 0 ]; then
  skip "b unwritable --out: running as root and cannot run $LB as nobody (setpriv/runuser missing or $LB not reachable by nobody)"
else
  mkdir "$W/ro"
  chmod 555 "$W/ro"
  run "${AS[@]}" -- "${S[@]}" --out "$W/ro/run"
  check_error "b1 --out in a read-only directory${AS:+ (as nobody)}" 2 "--out.*$W/ro/run.*Permission denied" "$W/ro/run"
  run "${AS[@]}" -- "${S[@]}" --out "$W/ro"
  check_error "b2 --out is a read-only directory${AS:+ (as nobody)}" 2 "--out.*$W/ro.*Permission denied" "$W/ro"
  D="$W/turns-ro"
  mkdir "$D"
  [ ${#AS[@]} -gt 0 ] && chown 65534:65534 "$D"
  "${AS[@]}" "$LB" "${S[@]}" --out "$D" > "$W/out.log" 2> "$W/err.log" &
  pid=$!
  if wait_row "$pid" "$D" 1; then
    chmod 555 "$D"  # the fault first, then the checkpoint's hash: a write finishing in between is kept
    sum=$(md5sum < "$D/checkpoint.pt")
    wait "$pid"
    rc=$?
    check_error "b3 --out made read-only after epoch 1${AS:+ (as nobody)}" nonzero \
      "$D/checkpoint.pt.tmp.*Permission denied" "$D"
    [ "$sum" = "$(md5sum < "$D/checkpoint.pt")" ] && no_tmp "$D" && ok "b3: checkpoint.pt unchanged, no .tmp left" ||
      bad "b3: checkpoint.pt changed or a .tmp left: $(ls "$D")"
    chmod 755 "$D"
    resume_completes "b3" "$D"
  else
    wait "$pid"
    bad "b3: the run did not reach epoch 1: $(cat "$W/err.log")"
  fi
fi

# ---- c. full disk --------------------------------------------------------------------------------------
# config.json (~800 bytes) and metrics.csv fit in 1 MiB; the cnn checkpoint (~3.4 MB) does not.
D="$W/fsize"
( trap '' XFSZ; ulimit -f 1024; exec "$LB" "${S[@]}" --out "$D" ) > "$W/out.log" 2> "$W/err.log"
rc=$?
check_error "c1 ulimit -f 1024 (EFBIG)" nonzero "$D/checkpoint.pt.tmp.*File too large" "$D"
[ ! -e "$D/checkpoint.pt" ] && no_tmp "$D" && [ -s "$D/config.json" ] && ok "c1: no checkpoint.pt, no .tmp left, config.json written" ||
  bad "c1: left $(ls "$D")"
resume_completes "c1" "$D"

if command -v prlimit > /dev/null; then
  D="$W/prlimit"
  ( trap '' XFSZ; exec "$LB" "${S[@]}" --out "$D" ) > "$W/out.log" 2> "$W/err.log" &
  pid=$!
  if wait_row "$pid" "$D" 1; then
    prlimit --pid "$pid" --fsize=1048576
    sum=$(md5sum < "$D/checkpoint.pt")
    wait "$pid"
    rc=$?
    check_error "c2 file size limit set after epoch 1 (EFBIG)" nonzero "$D/checkpoint.pt.tmp.*File too large" "$D"
    [ "$sum" = "$(md5sum < "$D/checkpoint.pt")" ] && no_tmp "$D" && ok "c2: checkpoint.pt unchanged, no .tmp left" ||
      bad "c2: checkpoint.pt changed or a .tmp left: $(ls "$D")"
    resume_completes "c2" "$D"
  else
    wait "$pid"
    bad "c2: the run did not reach epoch 1: $(cat "$W/err.log")"
  fi
else
  skip "c2 limit on a running run: no prlimit"
fi

mkdir "$W/mnt"
if mount -t tmpfs -o size=8m largebatch-test "$W/mnt" 2> /dev/null; then
  MNT="$W/mnt"
  D="$MNT/run"
  "$LB" "${S[@]}" --out "$D" > "$W/out.log" 2> "$W/err.log" &
  pid=$!
  if wait_row "$pid" "$D" 1; then
    dd if=/dev/zero of="$MNT/filler" bs=64k > /dev/null 2>&1  # until the file system is full
    sum=$(md5sum < "$D/checkpoint.pt")
    wait "$pid"
    rc=$?
    check_error "c3 tmpfs filled up after epoch 1 (ENOSPC)" nonzero "$D/checkpoint.pt.tmp.*No space left on device" "$D"
    [ "$sum" = "$(md5sum < "$D/checkpoint.pt")" ] && no_tmp "$D" && ok "c3: checkpoint.pt unchanged, no .tmp left" ||
      bad "c3: checkpoint.pt changed or a .tmp left: $(ls "$D")"
    rm -f "$MNT/filler"
    resume_completes "c3" "$D"
  else
    wait "$pid"
    bad "c3: the run did not reach epoch 1: $(cat "$W/err.log")"
  fi
else
  skip "c3 real ENOSPC: mount -t tmpfs is not allowed here"
fi

# ---- d. --out removed mid-run --------------------------------------------------------------------------
D="$W/removed"
"$LB" "${S[@]}" --out "$D" > "$W/out.log" 2> "$W/err.log" &
pid=$!
if wait_row "$pid" "$D" 1; then
  rm -rf "$D"
  wait "$pid"
  rc=$?
  check_error "d --out removed after epoch 1" nonzero "$D/[a-z.]+: No such file or directory" "$D"
else
  wait "$pid"
  bad "d: the run did not reach epoch 1: $(cat "$W/err.log")"
fi

# ---- e. data set deleted mid-run -----------------------------------------------------------------------
# A small Fashion-MNIST: the first 512 / 128 images of the installed one, or noise when it is not installed.
DATA="$W/fashion"
SRC=/usr/share/datasets/fashion-mnist
mkdir "$DATA"
be32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 >> 24 & 255)) $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }
idx() {  # idx PREFIX COUNT
  local n=$2
  printf "\\x00\\x00\\x08\\x03$(be32 "$n")$(be32 28)$(be32 28)" > "$DATA/$1-images-idx3-ubyte"
  printf "\\x00\\x00\\x08\\x01$(be32 "$n")" > "$DATA/$1-labels-idx1-ubyte"
  if [ -f "$SRC/$1-images-idx3-ubyte.gz" ] && [ -f "$SRC/$1-labels-idx1-ubyte.gz" ]; then
    gzip -dc "$SRC/$1-images-idx3-ubyte.gz" | tail -c +17 | head -c $((n * 784)) >> "$DATA/$1-images-idx3-ubyte"
    gzip -dc "$SRC/$1-labels-idx1-ubyte.gz" | tail -c +9 | head -c "$n" >> "$DATA/$1-labels-idx1-ubyte"
  else
    head -c $((n * 784)) /dev/urandom >> "$DATA/$1-images-idx3-ubyte"
    for ((i = 0; i < n; i++)); do printf "\\x0$((i % 10))"; done >> "$DATA/$1-labels-idx1-ubyte"
  fi
}
idx train 512
idx t10k 128
gzip "$DATA/train-images-idx3-ubyte"  # gzip files are read too
F=(train --data fashion-mnist --data-dir "$DATA" --batch-size 64 --model cnn --seed 3 --threads 1
   --loader-workers 1 --progress none --no-plots)
D="$W/data-run"
"$LB" "${F[@]}" --epochs 4 --out "$D" > "$W/out.log" 2> "$W/err.log" &
pid=$!
for _ in $(seq 600); do grep -qs "^largebatch train: fashion-mnist" "$W/out.log" && break; kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
cp -r "$DATA" "$W/fashion-copy"
rm -rf "$DATA"
kill -0 "$pid" 2>/dev/null && running=yes || running=no
wait "$pid"
rc=$?
if [ "$running" = yes ] && [ "$rc" -eq 0 ] && grep -qs '"status": "completed"' "$D/summary.json" && [ -s "$D/model.pt" ]; then
  ok "e1 data set deleted while training: the run completes (the data set is held in memory)"
else
  bad "e1 data set deleted while training (still running when deleted: $running): exit $rc"
  sed 's/^/     | /' "$W/err.log" | head -5
fi
before=$(md5sum < "$D/summary.json")
run -- "${F[@]}" --epochs 5 --resume --out "$D"
# Only the directory is named when it is gone as a whole.
if [ "$rc" -eq 2 ] && grep -qE -- "$DATA.*not found" "$W/err.log" && [ "$(grep -c '' "$W/err.log")" -eq 1 ] &&
   ! grep -qE "terminate called|Exception raised from|what\(\):" "$W/err.log" && [ "$before" = "$(md5sum < "$D/summary.json")" ]; then
  ok "e2 --resume with the data set gone: exit 2: $(cat "$W/err.log")"
else
  bad "e2 --resume with the data set gone: exit $rc (expected 2 naming $DATA), output:"
  sed 's/^/     | /' "$W/err.log" | head -5
fi
mv "$W/fashion-copy" "$DATA"
rm "$DATA/t10k-labels-idx1-ubyte"
run -- "${F[@]}" --epochs 5 --resume --out "$D"
if [ "$rc" -eq 2 ] && grep -qE -- "$DATA/t10k-labels-idx1-ubyte.*not found" "$W/err.log" && [ "$(grep -c '' "$W/err.log")" -eq 1 ] &&
   [ "$before" = "$(md5sum < "$D/summary.json")" ]; then
  ok "e3 --resume with one data file gone: exit 2: $(cat "$W/err.log")"
else
  bad "e3 --resume with one data file gone: exit $rc (expected 2 naming t10k-labels-idx1-ubyte), output:"
  sed 's/^/     | /' "$W/err.log" | head -5
fi

# ---- f. rendezvous port in use -------------------------------------------------------------------------
listening() {  # listening PORT: a TCP socket listens on it (/proc/net/tcp*, state 0A)
  local hex
  hex=$(printf '%04X' "$1")
  cat /proc/net/tcp /proc/net/tcp6 2>/dev/null | awk -v p=":$hex" '$2 ~ p"$" && $4 == "0A" { f = 1 } END { exit !f }'
}
port=$(rendezvous_port)
while listening "$port"; do port=$((port + 1)); done
P=(train --data synthetic --synthetic-size 256 --batch-size 64 --model cnn --epochs 1 --threads 1
   --loader-workers 1 --progress none --no-plots --dist-timeout 60)
DIST=(env MASTER_ADDR=127.0.0.1 MASTER_PORT=$port WORLD_SIZE=2)
"${DIST[@]}" RANK=0 LOCAL_RANK=0 "$LB" "${P[@]}" --out "$W/holder" > "$W/holder.log" 2>&1 &
holder=$!
for _ in $(seq 300); do listening "$port" && break; sleep 0.1; done
if listening "$port"; then
  t0=$SECONDS
  run "${DIST[@]}" RANK=0 LOCAL_RANK=0 timeout 60 -- "${P[@]}" --out "$W/second"
  took=$((SECONDS - t0))
  check_error "f second rank 0 on MASTER_PORT=$port (in use), after ${took} s" nonzero \
    "MASTER_PORT.*[Ii]n use|[Ii]n use.*MASTER_PORT" "$W/second"
  [ "$took" -le 20 ] && ok "f: exited after ${took} s (--dist-timeout 60)" || bad "f: took ${took} s (--dist-timeout 60)"
  "${DIST[@]}" RANK=1 LOCAL_RANK=1 "$LB" "${P[@]}" --out "$W/holder" > "$W/rank1.log" 2>&1
  r1=$?
  wait "$holder"
  r0=$?
  [ "$r0" -eq 0 ] && [ "$r1" -eq 0 ] && grep -qs '"status": "completed"' "$W/holder/summary.json" &&
    ok "f: the run holding the port is unaffected: completes once its rank 1 comes" ||
    { bad "f: the run holding the port: rank 0 exit $r0, rank 1 exit $r1"; tail -3 "$W/holder.log" "$W/rank1.log"; }
else
  bad "f: the first rank 0 never listened on $port"
  cat "$W/holder.log"
fi

end_checks cli_env_faults
