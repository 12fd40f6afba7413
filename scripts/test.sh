#!/usr/bin/env bash
# The whole suite (`make test`, .ci/run): two pytest processes at once, the end-to-end
# tests (tests/) beside the libraries' and services' own, each printing when it ends.
# One pytest left most of a 2-core machine idle (waiting on services, outages, streams):
# the split takes the wall time from ~19 to ~10 minutes. Every test already uses fresh
# Redis prefixes, stream names and free ports, so the two never meet. With arguments
# (a file, -k ...) it is one plain pytest run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

run() {  # pytest's exit 5 (no tests collected) is a failure, not a pass
  "$PY" -m pytest "$@"
  local code=$?
  if [ "$code" -eq 5 ]; then echo "pytest collected no tests: $*" >&2; return 1; fi
  return "$code"
}

if [ "$#" -gt 0 ]; then
  run "$@"
  exit $?
fi

# pyproject.toml's testpaths, less tests/ (run beside them).
mapfile -t UNITS < <("$PY" -c '
import tomllib
paths = tomllib.load(open("pyproject.toml", "rb"))["tool"]["pytest"]["ini_options"]["testpaths"]
print("\n".join(p for p in paths if p != "tests"))')

log="$(mktemp /tmp/hoosh-tests-units.XXXXXX)"
trap 'rm -f "$log"' EXIT
run -p no:cacheprovider "${UNITS[@]}" >"$log" 2>&1 &
units=$!
echo "== tests/ (end to end); libs and services run beside them, printed after =="
run -p no:cacheprovider tests
e2e=$?
wait "$units"
unit=$?
echo
echo "== libs and services =="
cat "$log"
echo
echo "end to end: exit $e2e; libs and services: exit $unit"
[ "$e2e" -eq 0 ] && [ "$unit" -eq 0 ]
