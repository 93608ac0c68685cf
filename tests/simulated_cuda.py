"""The CUDA ops built for the CPU (tests/cuda_kernels_host.cpp: csrc/cuda/cross_entropy_kernels.cuh
with tests/cuda_on_host.h's simulator), as a Python module whose functions take CPU tensors."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from types import ModuleType

import torch

import fused_softmax  # noqa: F401  (defines torch.ops.fused_softmax)

HERE = Path(__file__).resolve().parent
OPS = ("cross_entropy_fwd", "cross_entropy_bwd", "cross_entropy_fwd_inplace", "cross_entropy_fwd_grad")


def build() -> ModuleType:
    """Compiles the module (about 30 s). Under scripts/test_kernel_build.sh sanitize (the sanitizers'
    runtimes preloaded) the kernels are instrumented too: a read or write outside the tensors is then
    an error, not a NaN that may go unseen."""
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", "2")
    sanitize = (
        ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if os.environ.get("FUSED_SOFTMAX_SANITIZE") else []
    )
    module = cpp_extension.load(
        name="cuda_kernels_host_sanitized" if sanitize else "cuda_kernels_host",
        sources=[str(HERE / "cuda_kernels_host.cpp"), str(HERE.parent / "csrc" / "cross_entropy.cpp")],
        extra_cflags=["-O1", "-std=c++20", *sanitize],
        extra_ldflags=sanitize,
        build_directory=_shared_build_directory(sanitize),
    )
    module.set_multiprocessors(1)  # 64 blocks: rows beyond 64 blocks' worth take the grid-stride loop
    return module


def take_over_cpu_kernels() -> torch.library.Library:
    """Makes the CUDA kernels (simulated) the CPU kernels of torch.ops.fused_softmax for this process,
    so that CPU tests run them through the public API, autograd and torch.compile included. Keep the
    returned library alive: the CPU kernels come back when it is destroyed."""
    module = build()
    library = torch.library.Library("fused_softmax", "IMPL")
    for name in OPS:
        library.impl(name, _with_defaults(getattr(module, name), name), "CPU")
    # Which kernels run now: the CPU kernel checks class indices on the host, the CUDA kernels assert on the device.
    try:
        torch.ops.fused_softmax.cross_entropy_fwd(torch.zeros(1, 2), torch.tensor([5]), None, -100, 0.0, 0)
    except RuntimeError as error:
        if "device-side assert" in str(error):
            return library
        raise AssertionError(f"the CPU kernel still runs: {error}") from error
    raise AssertionError("an out-of-range class index went through")


def _with_defaults(run, name: str):
    """run, called as a Python kernel of op `name` is: with the arguments its caller passed, the
    schema's defaults filling the rest."""
    defaults = [argument.default_value for argument in getattr(torch.ops.fused_softmax, name).default._schema.arguments]
    return lambda *args: run(*args, *defaults[len(args) :])


def _shared_build_directory(sanitize: list[str]) -> str:
    """One per user, torch release and build kind: the processes of a run (test_distributed's ranks) build
    once and share it (torch locks the directory while one builds, and rebuilds when the sources
    change). Not shared between torch releases: a module built for one cannot load in another, and
    torch 2.11 waits forever on the lock file that torch 2.14 leaves behind."""
    kind = f"{os.getuid()}_torch{torch.__version__}{'_sanitized' if sanitize else ''}"
    path = Path(tempfile.gettempdir()) / f"fused_softmax_cuda_kernels_host_{kind}"
    path.mkdir(exist_ok=True)
    return str(path)
