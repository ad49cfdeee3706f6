# The shared harness of the shell tests (sourced). ok, bad and skip count checks; end_checks prints
# "NAME: N passed, N failed, N skipped" and sets the exit code, which alone decides the CTest entry:
# 1 if any check failed, 77 if every check was skipped (CTest's SKIP_RETURN_CODE), 0 otherwise.
# A skipped check prints SKIP and its reason; scripts/run_tests.sh lists and counts them after the suite.
# LARGEBATCH_INJECT_FAILURE=1 adds one failing check, to show that a failure reaches CTest.
lb_pass=0 lb_fail=0 lb_skip=0
ok() { echo "ok   $*"; lb_pass=$((lb_pass + 1)); }
bad() { echo "FAIL $*"; lb_fail=$((lb_fail + 1)); }
skip() { echo "SKIP $*"; lb_skip=$((lb_skip + 1)); }
if [ "${LARGEBATCH_INJECT_FAILURE:-0}" = 1 ]; then
  bad "injected failure (LARGEBATCH_INJECT_FAILURE=1); the log of a check may still say 0 failed"
fi
# A random first port for rendezvous stores, below the kernel's ephemeral range (the local ports of outgoing
# connections and Gloo's listeners come from there, and one of them can hold any port in it), with room for the
# few hundred ports a test counts up from it.
rendezvous_port() {
  local low
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null)
  [[ "$low" =~ ^[0-9]+$ ]] && [ "$low" -gt 12000 ] || low=32768
  echo $((10000 + RANDOM % (low - 11000)))
}
end_checks() {  # end_checks NAME
  echo "$1: $lb_pass passed, $lb_fail failed, $lb_skip skipped"
  [ "$lb_fail" -eq 0 ] || exit 1
  [ "$lb_pass" -gt 0 ] || exit 77
  exit 0
}
