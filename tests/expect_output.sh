#!/usr/bin/env bash
# Runs one command; passes only if it exits with the expected code and its output (stdout and stderr together)
# matches every extended regular expression given. The exit code of this script decides the CTest entry.
# Usage: expect_output.sh CODE [REGEX...] -- COMMAND [ARG...]
set -u
code=$1
shift
patterns=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do patterns+=("$1"); shift; done
[ $# -gt 1 ] || { echo "usage: expect_output.sh CODE [REGEX...] -- COMMAND [ARG...]" >&2; exit 2; }
shift
out=$("$@" 2>&1)
rc=$?
printf '%s\n' "$out"
status=0
if [ "$rc" -ne "$code" ]; then
  echo "FAIL exit code $rc, expected $code: $*"
  status=1
fi
for p in "${patterns[@]}"; do
  # The output as one line, so that a pattern may span lines with .*
  if ! tr '\n' ' ' <<<"$out" | grep -Eq -- "$p"; then
    echo "FAIL output does not match /$p/"
    status=1
  fi
done
[ "$status" -eq 0 ] && echo "ok   exit $rc, ${#patterns[@]} pattern(s) matched"
exit "$status"
