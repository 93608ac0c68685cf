"""The one build runs on every x86-64 CPU torch runs on: each of its CPU levels is chosen where the CPU
has it, and a level the CPU lacks is never reached. CPUs without AVX-512 are emulated by Debian's
qemu-user (scripts/test.sh installs it), which ends the process at the first instruction the emulated
CPU does not have, as that CPU would."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fused_softmax
from fused_softmax import _ops

SMOKE = Path(__file__).resolve().parent / "smoke.py"
CSRC = Path(__file__).resolve().parent.parent / "csrc"

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="the CPU levels above the baseline are x86-64's")


def run_smoke(*prefix: str, expected_level: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, str(SMOKE), expected_level],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )


def test_the_build_holds_every_level():
    levels = [name for name, _ in _ops._C.cpu_capabilities()]
    assert levels[:3] == ["default", "avx2", "avx512"], levels  # avx512_bf16 too where the compiler has it
    assert fused_softmax.backend()["cpu"] == f"compiled C++ kernel ({_ops._C.cpu_capability()})"


def test_only_the_levels_own_code_uses_vector_extensions():
    """Every function of the built extension that holds an AVX instruction (VEX- or EVEX-encoded: its
    mnemonic starts with v) is one of a level's own (its name holds the level's namespace), or a
    header's inline function that only such code calls: nothing that runs before a level is chosen,
    or on the baseline level, can need more than the baseline CPU. This fails when a header's inline
    function compiled for AVX-512 is what the linker kept for everyone (setup.py links the lowest level
    first so that it never is)."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is missing"
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", _ops._C.__file__], capture_output=True, text=True, check=True
    ).stdout
    with_avx, callers, function = set(), {}, None
    for line in listing.splitlines():
        if header := re.match(r"^[0-9a-f]+ <(.*)>:$", line):
            function = header.group(1)
        elif function and line.count("\t") >= 1:
            instruction = line.split("\t")[1]
            if instruction.startswith("v"):
                with_avx.add(function)
            if called := re.match(r"(?:call|jmp)\s+[0-9a-f]+ <([^+>@]+)", instruction):  # name@plt: the same
                callers.setdefault(called.group(1), set()).add(function)
    level_namespace = re.compile(r"4AVX2|6AVX512|11AVX512_BF16")  # as the mangled names spell them
    assert with_avx, "no AVX instruction at all: the levels above the baseline were not compiled"
    level_code = {name for name in with_avx if level_namespace.search(name)}
    shared = with_avx - level_code
    while grown := {name for name in shared if callers.get(name) and callers[name] <= level_code}:
        level_code |= grown  # called by level code alone (its callers hold their own copy, linked earlier)
        shared -= grown
    assert not shared, f"AVX code that baseline code may run: {sorted(shared)[:5]}"


@pytest.mark.parametrize(("cpu", "expected_level"), [("Haswell", "avx2"), ("Nehalem", "default")])
def test_runs_on_an_older_cpu(cpu, expected_level):
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: install Debian's qemu-user (scripts/test.sh does)"
    # Asked for more than the CPU has, the library warns and takes the best the CPU has.
    result = run_smoke(qemu, "-cpu", cpu, expected_level=expected_level, FUSED_SOFTMAX_CPU_CAPABILITY="avx512")
    # qemu warns of each CPU feature it does not emulate; the smoke test's own lines are the rest.
    output = "\n".join(
        line for line in (result.stdout + result.stderr).splitlines() if "TCG doesn't support" not in line
    )
    assert result.returncode == 0, f"under qemu -cpu {cpu} (exit {result.returncode}):\n{output}"
    assert f"on the {expected_level} kernels" in output, output
    assert f"FUSED_SOFTMAX_CPU_CAPABILITY=avx512 is more than this CPU runs; using {expected_level}" in output, output


@pytest.mark.parametrize("level", ["default", "avx2"])
def test_a_lower_level_can_be_forced(level):
    result = run_smoke(expected_level=level, FUSED_SOFTMAX_CPU_CAPABILITY=level)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unknown_level_is_refused_at_import():
    result = run_smoke(expected_level="avx3", FUSED_SOFTMAX_CPU_CAPABILITY="avx3")
    assert result.returncode != 0
    assert "FUSED_SOFTMAX_CPU_CAPABILITY=avx3 is not a CPU level of this build" in result.stderr, result.stderr


@pytest.mark.parametrize("source", ["cpu/kernels.cpp", "cpu/cross_entropy_cpu.cpp", "cpu/gradient_memory.cpp"])
def test_the_cpu_kernels_compile_for_aarch64(tmp_path, source):
    """Other architectures build the baseline level alone, on at::vec's portable (there: NEON) path: the
    CPU sources compile with Debian's aarch64 cross compiler (scripts/test.sh installs it)."""
    from torch.utils.cpp_extension import include_paths

    compiler = shutil.which("aarch64-linux-gnu-g++")
    assert compiler, "aarch64-linux-gnu-g++ is missing: install Debian's g++-aarch64-linux-gnu (scripts/test.sh does)"
    includes = [f"-I{path}" for path in include_paths()]
    result = subprocess.run(
        [compiler, "-std=c++20", "-O1", "-DCPU_CAPABILITY=DEFAULT", *includes, "-c", str(CSRC / source)]
        + ["-o", str(tmp_path / "out.o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
