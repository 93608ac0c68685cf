import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


if os.environ.get("FUSED_SOFTMAX_CPU_RUNS_CUDA_KERNELS"):  # see scripts/test_cuda_kernels_on_cpu.sh
    import simulated_cuda

    _cuda_kernels_as_cpu_kernels = simulated_cuda.take_over_cpu_kernels()
