#!/usr/bin/env bash
# A prebuilt CUDA extension to carry to the GPU machine, used there only if building from source fails.
#   tools/gpu/prebuild.sh                    here: build fastcurv._C for sm_90 with PYTHON (default
#                                            /tmp/venv211/bin/python: Python 3.12, torch 2.11.0+cu130, the
#                                            device image's versions) and CUDA_HOME, into .gpu-prebuilt/
#   tools/gpu/prebuild.sh --install-carried  there (run.sh does it): copy it into fastcurv/ if the sources'
#                                            hash and the torch version match, and check that it loads
# .gpu-prebuilt/ is git-ignored; name it in the run call's carry list (about 7 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=.gpu-prebuilt
sources_hash() { cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1; }

if [ "${1:-}" = --install-carried ]; then
  PYTHON=${PYTHON:-python3}
  so=$(ls "$DIR"/_C.*.so 2>/dev/null | head -n 1 || true)
  [ -n "$so" ] || { echo "prebuild: no $DIR/_C.*.so carried"; exit 1; }
  want_hash=$(cat "$DIR/SOURCES.sha256"); want_torch=$(cat "$DIR/TORCH_VERSION")
  have_torch=$("$PYTHON" -c 'import torch; print(torch.__version__)')
  [ "$want_hash" = "$(sources_hash)" ] || { echo "prebuild: $so was built from other sources (hash differs): not used"; exit 1; }
  [ "$want_torch" = "$have_torch" ] || { echo "prebuild: $so was built against torch $want_torch, this is $have_torch: not used"; exit 1; }
  cp "$so" fastcurv/
  "$PYTHON" -c "import fastcurv._backend as b; assert b.has_cuda_kernels(), b._C_ERROR; print('prebuild: carried', '$so', 'loads with CUDA kernels')"
  exit
fi

PYTHON=${PYTHON:-/tmp/venv211/bin/python}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 FASTCURV_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/fastcurv-prebuild.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
start=$(date +%s)
"$PYTHON" setup.py build_ext --build-temp "$BUILD/temp" --build-lib "$BUILD/lib"
mkdir -p "$DIR"
rm -f "$DIR"/_C.*.so
cp "$BUILD"/lib/fastcurv/_C.*.so "$DIR/"
sources_hash >"$DIR/SOURCES.sha256"
"$PYTHON" -c 'import torch; print(torch.__version__)' >"$DIR/TORCH_VERSION"
echo "prebuild: $(ls "$DIR"/_C.*.so) for torch $(cat "$DIR/TORCH_VERSION"), sm_90, in $(($(date +%s) - start))s"
