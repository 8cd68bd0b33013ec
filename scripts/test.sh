#!/usr/bin/env bash
# The test command: installs what it needs, then runs ruff, mypy --strict and the whole
# pytest suite (unit, CLI and integration tests with real QEMU guests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/bootstrap.sh

echo "== ruff" >&2
ruff check boincvm tests benchmarks
ruff format --check boincvm tests benchmarks
echo "== mypy --strict" >&2
mypy
echo "== pytest" >&2
set +e
pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
