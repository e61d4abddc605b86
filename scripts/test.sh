#!/usr/bin/env bash
# The whole test suite: the Python package's tests (pytest, in the
# environment scripts/pyenv.sh makes), then the C test runner; the last
# line sums both as "N passed, N failed".
set -uo pipefail
build=${1:-build}
venv=${2:-.venv}
bash scripts/pyenv.sh "$venv" "$build" || { echo "0 passed, 1 failed"; exit 1; }
py_log=$(mktemp)
trap 'rm -f "$py_log"' EXIT
"$venv/bin/python" -m pytest -q -p no:cacheprovider python/tests 2>&1 | tee "$py_log"
py_summary=$(tail -n 1 "$py_log")
count() { grep -oE "[0-9]+ $1" <<<"$py_summary" | grep -oE "^[0-9]+" || echo 0; }
py_pass=$(count passed)
py_fail=$(( $(count failed) + $(count error) ))
[ "$py_pass" -gt 0 ] || py_fail=$((py_fail + 1))   # pytest did not run
c_log=$(mktemp)
trap 'rm -f "$py_log" "$c_log"' EXIT
"$build/qkv_tests" | tee "$c_log"
c_status=${PIPESTATUS[0]}
c_summary=$(tail -n 1 "$c_log")
c_pass=$(grep -oE "^[0-9]+ passed" <<<"$c_summary" | grep -oE "^[0-9]+" || echo 0)
c_fail=$(grep -oE "[0-9]+ failed" <<<"$c_summary" | grep -oE "^[0-9]+" || echo 1)
[ "$c_status" -eq 0 ] || [ "$c_fail" -gt 0 ] || c_fail=1
echo "python: $py_pass passed, $py_fail failed; C: $c_pass passed, $c_fail failed"
echo "$((py_pass + c_pass)) passed, $((py_fail + c_fail)) failed"
[ "$py_fail" -eq 0 ] && [ "$c_fail" -eq 0 ]
