"""The CUDA kernels checked without a GPU: their machine code (SASS, through cuobjdump), and the
row walk and row statistics they share (csrc/cuda/row_packs.cuh, row_state.cuh) compiled for the
host and run there (tests/row_*_host.cpp).

CI builds the CUDA kernels (the machine has nvcc) but cannot run them; these tests hold the
memory access pattern the kernels were designed for, which a wrong cast can silently undo (it
did once: every pack was read element by element, 2 or 4 bytes a load), and the indexing of the
row walk (a head of up to 7 elements was once walked by lanes 0-3 only, with 4-thread groups).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fused_softmax import _ops

PACKS_IN_FLIGHT = 4  # kPacksInFlight in csrc/cuda/row_packs.cuh
HERE = Path(__file__).resolve().parent


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton  # torch's CUDA builds bring triton, which bundles cuobjdump
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def _kernels_sass() -> dict[str, list[str]]:
    """SASS of each kernel, by name, one entry per GPU architecture built."""
    if _ops._C is None or not _ops._C.cuda_built():
        pytest.skip("the CUDA kernels were not built")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (the CUDA toolkit's, or triton's)")
    sass = subprocess.run([tool, "-sass", _ops._C.__file__], capture_output=True, text=True, check=True).stdout
    kernels: dict[str, list[str]] = {}
    for section in sass.split("Function : ")[1:]:
        name = re.search(r"cross_entropy_(fwd|bwd)_kernel", section.split()[0])
        if name:
            kernels.setdefault(name.group(0), []).append(section)
    return kernels


def test_cuda_kernels_move_the_rows_16_bytes_at_a_time_several_in_flight():
    kernels = _kernels_sass()
    assert {"cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"} <= kernels.keys()
    for name in ("cross_entropy_fwd_kernel", "cross_entropy_bwd_kernel"):
        for section in kernels[name]:  # each dtype and schedule, each architecture
            loads = re.findall(r"\bLDG\.[\w.]*128\b", section)
            assert len(loads) >= PACKS_IN_FLIGHT, f"{section.split()[0]}: {len(loads)} 16-byte loads"
            if name == "cross_entropy_bwd_kernel":  # (ptxas may split a pack's store in two 8-byte ones)
                stores = re.findall(r"\bSTG\.[\w.]*128\b", section)
                assert stores, f"{section.split()[0]}: no 16-byte stores"


@pytest.mark.parametrize(
    "harness",
    [
        "row_packs_host.cpp",  # every element visited once, for any C, alignment, group size, pack width
        "row_state_host.cpp",  # log-sum-exp and target term against float64, inf and NaN rows included
    ],
)
def test_cuda_row_code_on_the_host(harness, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path / Path(harness).stem
    flags = ["-std=c++20", "-O1", "-Wall", "-Wno-unknown-pragmas"]
    subprocess.run([compiler, *flags, str(HERE / harness), "-o", str(exe)], check=True)
    result = subprocess.run([str(exe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "0 failures" in result.stdout
