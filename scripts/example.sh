#!/usr/bin/env bash
# The bundled example, end to end: build the example guest, turn it into a BOINC app
# version, package the hello program as an RPM, make a workunit, run it here as the
# BOINC client would, and show the results.
#   bash scripts/example.sh [OUTPUT_DIR]     (default: example-run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BOOTSTRAP_FOR=example source scripts/bootstrap.sh
OUT=${1:-example-run}
rm -rf "$OUT"
mkdir -p "$OUT"

echo "== 1. the example guest image (cached after the first build)" >&2
IMAGE=$(boincvm build-image --recipe minimal)

echo "== 2. app version: image + wrapper + job defaults + version.xml" >&2
boincvm package-image "$IMAGE" --app hello --version 1.00 -o "$OUT/app-version" >/dev/null

echo "== 3. the guest package: examples/hello as an RPM" >&2
PACKAGE=$(boincvm package-rpm examples/hello/program --name hello --version 1.0 -o "$OUT")

echo "== 4. one workunit" >&2
boincvm make-workunit --app hello --package "$PACKAGE" \
    --application /opt/hello/bin/hello --input in=examples/hello/world.txt \
    --output out:100000 -o "$OUT/workunit" >/dev/null

echo "== 5. validate what we made" >&2
boincvm validate "$OUT/app-version" "$OUT/workunit" "$PACKAGE"

echo "== 6. run it locally, as the BOINC client would" >&2
boincvm run-local "$OUT/workunit" --app-version "$OUT/app-version" --results "$OUT/results"

echo "== 7. results ($OUT/results)" >&2
ls -l "$OUT/results" >&2
echo "--- out:" >&2
cat "$OUT/results/out"
