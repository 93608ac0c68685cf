#!/usr/bin/env bash
# Builds the sdist and, from it, a wheel (as `python -m build` does: a wheel built from the sdist proves
# the sdist holds every source), checks that the wheel pins the torch it was compiled against, installs
# it into a fresh virtual environment and runs tests/smoke.py there, outside the source tree: on this
# CPU, and on CPUs without AVX-512 emulated by qemu-user (Haswell: the avx2 kernels; Nehalem: the
# baseline ones). Needs the environment of scripts/setup.sh and qemu-user (scripts/test.sh installs it).
#   bash scripts/test_wheel.sh     # FUSED_SOFTMAX_CUDA=0 by default: the CPU kernels only
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet build
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "fused_softmax: building the sdist and a wheel from it"
FUSED_SOFTMAX_CUDA=${FUSED_SOFTMAX_CUDA:-0} python -m build --no-isolation --outdir "$work/dist" . > "$work/build.log" 2>&1 ||
  { tail -30 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
ls -l "$work"/dist
torch_release=$(python -c "import torch; print(torch.__version__.split('+')[0])")
python -m zipfile -e "$wheel" "$work/unpacked"
grep -x "Requires-Dist: torch==$torch_release" "$work"/unpacked/*.dist-info/METADATA ||
  { echo "fused_softmax: the wheel does not pin torch==$torch_release"; exit 1; }

echo "fused_softmax: installing the wheel into a fresh environment"
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet "$wheel"
# The library needs torch alone: the trainer's plotting and progress-bar extras are not pulled in.
"$work/venv/bin/python" -c "
import importlib.util
extras = [name for name in ('matplotlib', 'tqdm') if importlib.util.find_spec(name)]
assert not extras, f'pip install of the wheel pulled in {extras}'"
# pip itself refuses the wheel beside another torch.
"$work/venv/bin/python" -m pip install --dry-run "$wheel" "torch!=$torch_release" > "$work/mismatch.log" 2>&1 || true
grep -q "conflicting dependencies" "$work/mismatch.log" ||
  { cat "$work/mismatch.log"; echo "fused_softmax: pip did not refuse the wheel beside another torch"; exit 1; }

cd "$work"  # outside the source tree: only the installed wheel can be imported
"$work/venv/bin/python" -c "import fused_softmax; print('fused_softmax from', fused_softmax.__file__)"
"$work/venv/bin/python" "$root/tests/smoke.py"
for cpu in Haswell:avx2 Nehalem:default; do
  echo "fused_softmax: the wheel on an emulated ${cpu%%:*} CPU"
  qemu-x86_64 -cpu "${cpu%%:*}" "$work/venv/bin/python" "$root/tests/smoke.py" "${cpu##*:}" 2>&1 | grep -v "TCG doesn't support"
done
