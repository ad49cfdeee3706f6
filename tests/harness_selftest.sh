#!/usr/bin/env bash
# The shell tests' harness (tests/lib.sh) decides by exit code: a script with one failing check exits 1 even
# when its output says "0 failed"; one whose every check was skipped exits 77; passing checks exit 0.
set -u
HERE=$(dirname "${BASH_SOURCE[0]}")
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
status=0
expect_exit() {  # expect_exit CODE DESCRIPTION SCRIPT-BODY
  printf 'source %q\n%s\n' "$HERE/lib.sh" "$3" > "$W/t.sh"
  LARGEBATCH_INJECT_FAILURE=0 bash "$W/t.sh" > "$W/out" 2>&1
  local rc=$?
  if [ "$rc" -eq "$1" ]; then
    echo "ok   $2: exit $rc"
  else
    echo "FAIL $2: exit $rc, expected $1"; sed 's/^/     | /' "$W/out"; status=1
  fi
}
expect_exit 1 "a failing check whose log says '0 failed'" 'ok first; echo "sweep: 10 passed, 0 failed"; bad "second"; end_checks t'
expect_exit 0 "passing checks" 'ok first; ok second; end_checks t'
expect_exit 0 "passing checks beside a skipped one" 'ok first; skip "no tmpfs here"; end_checks t'
expect_exit 77 "every check skipped" 'skip "no root"; end_checks t'
printf 'source %q\nok first\nend_checks t\n' "$HERE/lib.sh" > "$W/t.sh"
LARGEBATCH_INJECT_FAILURE=1 bash "$W/t.sh" > "$W/out" 2>&1
rc=$?
if [ "$rc" -eq 1 ]; then echo "ok   LARGEBATCH_INJECT_FAILURE=1 fails a passing script"; else echo "FAIL injected failure: exit $rc"; status=1; fi
exit "$status"
