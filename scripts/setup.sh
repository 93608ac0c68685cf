#!/usr/bin/env bash
# Sets up a fresh machine of our kind: a virtual environment in .venv with torch and the
# build tools, then builds and installs fused_softmax into it (CPU kernels, and the CUDA
# kernels when torch has CUDA and a toolkit is found). Safe to run again.
#
#   bash scripts/setup.sh            # then: source .venv/bin/activate
#
# Settings: TORCH_SPEC (default torch==2.14.1), MAX_JOBS (default: the core count),
# FUSED_SOFTMAX_CUDA=auto|1|0, TORCH_CUDA_ARCH_LIST (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet "${TORCH_SPEC:-torch==2.14.1}" numpy pybind11 ninja "setuptools>=64" wheel
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# --no-build-isolation: compile against the torch just installed (an isolated build would
# fetch its own torch, and an extension built for another torch cannot load).
python -m pip install --no-build-isolation --verbose . 2>&1 | tee build.log | grep -E "^fused_softmax:|ptxas warning|error" || true
grep -qE "^Successfully installed .*fused_softmax-" build.log || { echo "fused_softmax: build failed, see build.log"; exit 1; }
if grep -q "Registers are spilled" build.log; then
  echo "fused_softmax: the CUDA register report shows spills (see build.log)"; exit 1
fi
(cd /tmp && python -c "import fused_softmax; print('fused_softmax backends:', fused_softmax.backend())")
