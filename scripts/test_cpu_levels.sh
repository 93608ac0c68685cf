#!/usr/bin/env bash
# Runs the kernel tests on each CPU level of the installed build that this CPU runs, below the best one
# (scripts/test.sh's run takes that), forced with FUSED_SOFTMAX_CPU_CAPABILITY: one build, every level
# tested. Needs the environment of scripts/setup.sh.   bash scripts/test_cpu_levels.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../tests"
# shellcheck disable=SC1091
source ../.venv/bin/activate
python -m pip install --quiet pytest hypothesis expecttest
levels=$(python -c "
from fused_softmax import _ops
runnable = [name for name, runs in _ops._C.cpu_capabilities() if runs]
print(' '.join(runnable[:-1]))")
for level in $levels; do
  echo "fused_softmax: the kernel tests on the $level kernels"
  FUSED_SOFTMAX_CPU_CAPABILITY=$level python -c "
import fused_softmax
assert fused_softmax.backend()['cpu'].endswith('($level)'), fused_softmax.backend()"
  FUSED_SOFTMAX_CPU_CAPABILITY=$level python -m pytest -q -p no:cacheprovider -x \
    test_cross_entropy.py test_bad_inputs.py test_degenerate_and_determinism.py test_properties.py \
    test_options.py test_op_registration.py test_torch_samples.py test_large_and_cuda.py test_predictions.py \
    -k "not 2_to_the_31 and not 2_to_the_30 and not compile" "$@"
done
