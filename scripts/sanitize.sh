#!/usr/bin/env bash
# Builds the CPU kernels with AddressSanitizer + UndefinedBehaviorSanitizer (in place, beside the
# sources) and runs the kernel tests under them. Needs the environment of scripts/setup.sh.
#   bash scripts/sanitize.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet pytest hypothesis
root=$PWD
trap 'rm -f "$root"/fused_softmax/_C*.so' EXIT  # the instrumented build must not linger beside the sources
mkdir -p build
FUSED_SOFTMAX_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  python setup.py build_ext --inplace --build-temp build/sanitize > build/sanitize.log 2>&1 \
  || { tail -30 build/sanitize.log; exit 1; }
grep "^fused_softmax:" build/sanitize.log
# Python and torch are not instrumented: the runtimes are preloaded, leak checks are off (CPython's
# and torch's own allocations at exit are not ours), any report fails the run.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export PYTHONPATH="$PWD"
so=$(cd tests && python -c "import fused_softmax._C as c; print(c.__file__)")
echo "testing $so"
ldd "$so" | grep -q libasan || { echo "fused_softmax: $so is not the instrumented build"; exit 1; }
cd tests && python -m pytest -q -p no:cacheprovider -x \
  test_cross_entropy.py test_bad_inputs.py test_degenerate_and_determinism.py test_properties.py \
  test_options.py -k "not 2_to_the_31 and not compile" "$@"
