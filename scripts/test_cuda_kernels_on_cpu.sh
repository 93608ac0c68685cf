#!/usr/bin/env bash
# Runs the op's tests with the CUDA kernels in place of the CPU kernels: csrc/cuda/cross_entropy_kernels.cuh
# compiled for the host and run by tests/cuda_on_host.h's simulator (tests/simulated_cuda.py), so the
# public API, autograd, torch.compile, the distributed loss and the Fashion-MNIST trainer go through
# the CUDA kernels on a machine without a GPU. Tests of what the CPU kernel alone does (marked
# cpu_kernel) are left out, and the 2^31- and 2^30-element ones (too slow a thread at a time). Needs the
# environment of scripts/setup.sh (and the dataset, for the trainer's real-data test).
#   bash scripts/test_cuda_kernels_on_cpu.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/../tests"
# shellcheck disable=SC1091
source ../.venv/bin/activate
FUSED_SOFTMAX_CPU_RUNS_CUDA_KERNELS=1 python -m pytest -q -p no:cacheprovider -m "not cpu_kernel" \
  test_cross_entropy.py test_options.py test_degenerate_and_determinism.py test_linear.py test_properties.py \
  test_bad_inputs.py test_op_registration.py test_large_and_cuda.py test_distributed.py test_trainer.py \
  test_torch_samples.py test_double_backward.py test_func_transforms.py test_predictions.py test_dtensor.py \
  -k "not 2_to_the_31 and not 2_to_the_30" "$@"
