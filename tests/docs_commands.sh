#!/usr/bin/env bash
# Every command written in README.md and docs/ (and the studies' READMEs) in a ```sh or ```bash block runs as
# written, as far as can be checked without running it:
#  - `largebatch ...` (or build/largebatch): with LARGEBATCH_PARSE_ONLY=1 the program parses and checks every
#    option as usual and exits without running; train, pretrain and linear-eval also validate their whole
#    configuration (as --dry-run). The worker command after `launch ... --` is checked the same way, and a
#    `sweep GRID` runs as `sweep GRID --dry-run`, which reads the grid and lists its runs, each of whose option
#    lists is then checked as a train (or pretrain) command of its own.
#  - `make TARGET...`: the targets exist (make -n).
#  - anything else (cmake, srun, sha256sum, ...) is listed, not run.
# Each runs in a scratch folder laid out like the repository (build/largebatch, docs/, studies/, tests/, ...),
# so nothing is written into the source tree. A command documented to fail ends with the comment
# `# exit N`, and must then exit with N.
# Usage: docs_commands.sh path/to/largebatch SOURCE_DIR
set -u
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
LB=$(readlink -f "$1")
ROOT=$(readlink -f "$2")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
mkdir -p "$W/build"
ln -s "$LB" "$W/build/largebatch"
for entry in "$ROOT"/*; do
  name=$(basename "$entry")
  [ "$name" = build ] || ln -s "$entry" "$W/$name"
done
export PATH="$W/build:$PATH"

# The commands of the sh/bash blocks of a Markdown file, one per line as FILE:LINE<TAB>COMMAND (continuation
# lines joined, a leading "$ " prompt dropped, comment-only lines and blank lines left out).
extract() {
  awk -v file="${1#"$ROOT"/}" '
    /^```/ {
      if (!inside && $0 ~ /^```(sh|bash|shell)[[:space:]]*$/) { inside = 1; next }
      if (inside) { inside = 0; cmd = ""; next }
    }
    !inside { next }
    {
      line = $0
      sub(/^[[:space:]]*\$ /, "", line)
      if (cmd == "") { start = NR; if (line ~ /^[[:space:]]*(#|$)/) next }
      if (line ~ /\\$/) { sub(/\\$/, "", line); cmd = cmd line " "; next }
      cmd = cmd line
      print file ":" start "\t" cmd
      cmd = ""
    }' "$1"
}

checked=0
declare -A grids_checked
# check_largebatch WHERE EXPECTED COMMAND-LINE: parse-only run of a largebatch command line (bash syntax). A
# train, pretrain or linear-eval prints the config.json its run would write: it is written to its --out, as
# the run would, for the commands that follow (e.g. --config runs/x/config.json).
check_largebatch() {
  local where=$1 expected=$2 line=$3 rc
  (cd "$W" && LARGEBATCH_PARSE_ONLY=1 bash -c "$line" > "$W/out.log" 2>&1 < /dev/null)
  rc=$?
  checked=$((checked + 1))
  local out
  out=$(sed -n 's/.*--out[ =]\([^ ]*\).*/\1/p' <<<"$line" | tr -d '"'"'")
  if [ "$rc" -eq 0 ] && [ -n "$out" ] && [[ "$out" != /* ]] && [[ "$out" != *'$'* ]] && head -c 1 "$W/out.log" | grep -q '{'; then
    mkdir -p "$W/$out" && cp "$W/out.log" "$W/$out/config.json"
  fi
  if [ "$rc" -eq "$expected" ]; then
    ok "$where: $line"
  else
    bad "$where: exit $rc (expected $expected): $line"
    sed 's/^/     | /' "$W/out.log" | tail -5
  fi
}

# check_sweep WHERE LINE: the grid expands (--dry-run), and every run it lists takes its options.
check_sweep() {
  local where=$1 line=$2 rc
  (cd "$W" && bash -c "${line%%#*} --dry-run" > "$W/sweep.log" 2>&1 < /dev/null)
  rc=$?
  if [ "$rc" -ne 0 ]; then
    bad "$where: sweep --dry-run exit $rc: $line"; sed 's/^/     | /' "$W/sweep.log" | tail -5; return
  fi
  local grid command runs failed
  grid=$(awk '{ for (i = 1; i <= NF; i++) if ($(i - 1) == "sweep") print $i }' <<<"${line%%#*}")
  command=$(sed -n 's/.*"command": *"\([a-z-]*\)".*/\1/p' "$W/$grid" 2>/dev/null | head -1)
  # Every run, whatever its state (a checkout with finished runs in runs/ lists them as finished).
  grep -E '^(run|resume|finished) ' "$W/sweep.log" | sed -E 's/^(run|resume|finished) *[^:]*: //' > "$W/runs.txt"
  runs=$(wc -l < "$W/runs.txt")
  if [ -n "${grids_checked[$grid]:-}" ]; then  # the same grid's runs were checked for an earlier command
    checked=$((checked + 1))
    ok "$where: $line (grid of $runs runs, checked above)"
    return
  fi
  grids_checked[$grid]=1
  # Each run's option list, as the sweep would pass it, two at a time.
  export LB W
  failed=$(cd "$W" && xargs -P 2 -I{} -d '\n' bash -c 'LARGEBATCH_PARSE_ONLY=1 "$LB" '"${command:-train}"' {} --out "$W/dry" \
             > /dev/null 2>&1 < /dev/null || echo "refused: {}"' < "$W/runs.txt" | tee "$W/refused.txt" | grep -c '^refused')
  sed 's/^/     | /' "$W/refused.txt" | head -5
  checked=$((checked + 1))
  if [ "$runs" -gt 0 ] && [ "$failed" -eq 0 ]; then
    ok "$where: $line (grid of $runs runs, each run's options accepted)"
  else
    bad "$where: $line: $failed of $runs runs refused their options"
  fi
}

files=("$ROOT/README.md")
while IFS= read -r f; do files+=("$f"); done < <(find "$ROOT/docs" "$ROOT/studies" -name '*.md' | sort)
not_run=0
for f in "${files[@]}"; do
  while IFS=$'\t' read -r where line; do
    expected=0
    if [[ "$line" =~ \#[[:space:]]*exit[[:space:]]+([0-9]+)[[:space:]]*$ ]]; then expected=${BASH_REMATCH[1]}; fi
    # The first word after any VAR=value assignments (a trailing comment aside).
    stripped=$(sed 's/[[:space:]]#.*$//' <<<"$line")
    words=($stripped)
    i=0
    while [ "$i" -lt "${#words[@]}" ] && [[ "${words[$i]}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do i=$((i + 1)); done
    first=${words[$i]:-}
    case "$first" in
      build/largebatch|largebatch)
        sub=${words[$((i + 1))]:-}
        if [ "$sub" = sweep ]; then
          check_sweep "$where" "$line"
        else
          check_largebatch "$where" "$expected" "$line"
          if [ "$sub" = launch ] && [[ "$stripped" == *" -- "* ]] && [[ "$stripped" != *" --exec "* ]]; then
            check_largebatch "$where (worker)" 0 "largebatch ${stripped#* -- }"
          fi
        fi
        ;;
      make)
        targets=("${words[@]:$((i + 1))}")
        checked=$((checked + 1))
        if make -n -C "$ROOT" "${targets[@]}" > "$W/make.log" 2>&1; then
          ok "$where: $line (make -n)"
        else
          bad "$where: make -n fails: $line"; tail -3 "$W/make.log"
        fi
        ;;
      *)
        not_run=$((not_run + 1))
        echo "note $where: not a largebatch or make command, not run here: $line"
        ;;
    esac
  done < <(extract "$f")
done
echo "docs_commands: $checked commands checked in ${#files[@]} files; $not_run other commands listed above, not run"
[ "$checked" -gt 0 ] || bad "no command found in README.md and docs/"
end_checks docs_commands
