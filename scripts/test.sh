#!/usr/bin/env bash
# The test command: installs what it needs, then runs ruff, mypy --strict and the whole
# pytest suite (unit, CLI and integration tests with real QEMU guests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A run keeps at most about 4.5 GB in the temporary directory at once (guests, images, app
# versions; a passed test's directory goes when it ends) and about 5 GB of caches (images,
# golden checkpoints, BOINC's server build, the frozen wrappers), besides the venv. A full
# disk fails half the suite in confusing ways: say so before starting.
NEED_GB=${BOINCVM_TEST_NEED_GB:-12}
for dir in "${TMPDIR:-/tmp}" "${XDG_CACHE_HOME:-$HOME/.cache}"; do
  mkdir -p "$dir"
  free_gb=$(( $(df -Pk "$dir" | awk 'NR == 2 {print $4}') / 1024 / 1024 ))
  if [ "$free_gb" -lt "$NEED_GB" ]; then
    echo "error: the tests need about $NEED_GB GB free on the file system of $dir; it has $free_gb GB" >&2
    echo "hint: free some space there, or set TMPDIR and XDG_CACHE_HOME to a larger file system" >&2
    exit 1
  fi
done

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
