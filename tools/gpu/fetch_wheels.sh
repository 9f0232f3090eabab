#!/usr/bin/env bash
# Downloads the wheels the GPU run carries (tools/gpu/wheels.txt) for the device image's Python 3.12 on
# manylinux x86-64, into DEST (default .whl/ at the repository root, git-ignored), then checks them:
# one wheel per pinned distribution, no torch/triton/nvidia wheel among them (the image's own must never
# be replaced), every wheel pure Python (py3-none-any), and the total under FASTCURV_WHEELS_MAX_MIB
# (default 8 MiB; the device tool carries at most 64 MiB with the working tree).
#   usage: tools/gpu/fetch_wheels.sh [DEST]        environment: PYTHON (default python3)
# Needs the network (PyPI); exits 2 with "offline" when pip cannot reach it, 1 on a failed check.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.whl}
PYTHON=${PYTHON:-python3}
MAX_MIB=${FASTCURV_WHEELS_MAX_MIB:-8}
mapfile -t PINS < <(grep -v -E '^\s*(#|$)' tools/gpu/wheels.txt)
mkdir -p "$DEST"
# The platforms of the device tool's README: pip matches a manylinux tag exactly.
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PINS[@]}" 2>"$DEST/.pip-error"; then
  if grep -q -i -E "network|connection|resolve|unreachable|timed out|Temporary failure" "$DEST/.pip-error"; then
    echo "fetch_wheels: offline: pip could not reach the package index" >&2
    exit 2
  fi
  cat "$DEST/.pip-error" >&2
  exit 1
fi
rm -f "$DEST/.pip-error"
"$PYTHON" tools/gpu/check_wheels.py "$DEST" --max-mib "$MAX_MIB"
