#!/usr/bin/env bash
# Builds the CPU kernels another way (in place, beside the sources) and runs the kernel tests on
# that build. Needs the environment of scripts/setup.sh. (The CPU levels are tested on the release
# build itself: scripts/test_cpu_levels.sh.)
#   bash scripts/test_kernel_build.sh sanitize [pytest args]  # AddressSanitizer + UndefinedBehaviorSanitizer
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:?"which build: sanitize"}
shift
case "$variant" in
  sanitize) export FUSED_SOFTMAX_SANITIZE=1 ;;
  *) echo "test_kernel_build.sh: unknown build '$variant' (sanitize)"; exit 2 ;;
esac
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet pytest hypothesis
root=$PWD
trap 'rm -f "$root"/fused_softmax/_C*.so' EXIT  # this build must not linger beside the sources
mkdir -p build
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python setup.py build_ext --inplace --build-temp "build/$variant" \
  > "build/$variant.log" 2>&1 || { tail -30 "build/$variant.log"; exit 1; }
grep "^fused_softmax:" "build/$variant.log"
if [ "$variant" = sanitize ]; then
  # Python and torch are not instrumented: the runtimes are preloaded, leak checks are off (CPython's
  # and torch's own allocations at exit are not ours), any report fails the run.
  export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
fi
export PYTHONPATH="$PWD"
so=$(cd tests && python -c "import fused_softmax._C as c; print(c.__file__)")
echo "testing $so"
[ "$so" = "$root/fused_softmax/$(basename "$so")" ] || { echo "fused_softmax: $so is not this build"; exit 1; }
if [ "$variant" = sanitize ]; then
  ldd "$so" | grep -q libasan || { echo "fused_softmax: $so is not the instrumented build"; exit 1; }
fi
# Under the sanitizers, the simulated CUDA kernels too (tests/simulated_cuda.py instruments them).
extra=$([ "$variant" = sanitize ] && echo test_cuda_on_host.py || true)
cd tests && python -m pytest -q -p no:cacheprovider -x \
  test_cross_entropy.py test_bad_inputs.py test_degenerate_and_determinism.py test_properties.py \
  test_options.py test_op_registration.py test_predictions.py $extra -k "not 2_to_the_31 and not compile" "$@"
