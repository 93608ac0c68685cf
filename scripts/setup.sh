#!/usr/bin/env bash
# Sets up a fresh machine of our kind: a virtual environment with torch and the build tools, then
# builds and installs fused_softmax into it (CPU kernels, and the CUDA kernels when torch has CUDA and
# a toolkit is found), with the extras named. Says what it does at each stage. Safe to run again.
#
#   bash scripts/setup.sh            # then: source .venv/bin/activate
#
# Settings: EXTRAS (extras to install: train, test; default none), VENV (default .venv),
# TORCH_SPEC (default torch==2.14.1), MAX_JOBS (default: the core count),
# FUSED_SOFTMAX_CUDA=auto|1|0, TORCH_CUDA_ARCH_LIST (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
torch_spec=${TORCH_SPEC:-torch==2.14.1}
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
stage() { echo "fused_softmax setup [$(date +%H:%M:%S)]: $*"; }

stage "1/3 installing $torch_spec and the build tools into $venv (about a minute; several GB for a CUDA build of torch)"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet "$torch_spec" numpy pybind11 ninja "setuptools>=64" wheel

stage "2/3 compiling and installing fused_softmax with $MAX_JOBS jobs (on 2 cores about 1.5 minutes for the CPU
  kernels, 3 with the CUDA kernels; the log is build.log)"
# --no-build-isolation: compile against the torch just installed (an isolated build would fetch its own
# torch, and an extension built for another torch cannot load). --verbose: the build's own lines
# (indented by pip) say what is compiled, for which CPU levels and GPUs, and whether CUDA is skipped.
started=$SECONDS
package=.${EXTRAS:+[$EXTRAS]}
python -m pip install --no-build-isolation --verbose "$package" 2>&1 | tee build.log |
  grep --line-buffered -E "^\s*fused_softmax:|ptxas warning|error:" || true
grep -qE "^Successfully installed .*fused[-_]softmax-" build.log || { echo "fused_softmax: build failed, see build.log"; exit 1; }
if grep -q "Registers are spilled" build.log; then
  echo "fused_softmax: the CUDA register report shows spills (see build.log)"; exit 1
fi
stage "3/3 built in $((SECONDS - started)) s; checking the installed package"
(cd /tmp && python -c "import fused_softmax; print('fused_softmax backends:', fused_softmax.backend())")
