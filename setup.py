"""Builds fused_softmax._C: the C++ CPU kernels always, the CUDA kernels when they can be.

Environment knobs:
  FUSED_SOFTMAX_CUDA=auto|1|0    CUDA kernels: auto builds them when torch has CUDA and a toolkit is
                                 found; 1 forces them (the build fails without a toolkit); 0 skips them.
  FUSED_SOFTMAX_CPU_VEC=auto|avx512|avx2|default
                                 vector instruction set of the CPU kernel; auto takes the best this
                                 machine's CPU has (the package is built for the machine it installs on).
  TORCH_CUDA_ARCH_LIST           GPU architectures (default here: "8.0;9.0+PTX").
  MAX_JOBS                       parallel compile jobs (ninja).
  CUDA_HOME                      the CUDA toolkit; when unset it is found from nvcc (see find_cuda_home).
  FUSED_SOFTMAX_SANITIZE=1       the CPU kernels only, with AddressSanitizer and UndefinedBehaviorSanitizer
                                 (scripts/test_kernel_build.sh sanitize builds and tests that way).
"""

import os
import platform
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def find_cuda_home() -> None:
    """Points CUDA_HOME at the real toolkit before torch guesses it.

    torch takes dirname(dirname(which nvcc)), which is wrong when the nvcc on PATH is a
    symlink or a wrapper script (as /usr/local/bin/nvcc is on our development machines).
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
        try:  # a wrapper script names the real nvcc
            words = Path(nvcc).read_text(errors="ignore")[:4096].split()
            candidates += [Path(w).parent.parent for w in words if w.endswith("/bin/nvcc")]
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").is_file() and (home / "include" / "cuda_runtime.h").is_file():
            os.environ["CUDA_HOME"] = str(home)
            return


find_cuda_home()

import torch  # noqa: E402  (CUDA_HOME must be set before torch.utils.cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def cpu_vector_flags() -> tuple[str, list[str]]:
    """Compiler flags that let ATen's Vectorized use this machine's widest vectors."""
    choice = os.environ.get("FUSED_SOFTMAX_CPU_VEC", "auto").lower()
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name == "nt":
        return "default", []
    try:
        cpu_flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        cpu_flags = set()
    sets = {
        "avx512": (
            {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
            ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
        ),
        "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
    }
    if choice == "auto":
        choice = next((name for name, (need, _) in sets.items() if need <= cpu_flags), "default")
    if choice not in sets:
        return "default", []
    flags = sets[choice][1] + [f"-DCPU_CAPABILITY_{choice.upper()}", f"-DCPU_CAPABILITY={choice.upper()}"]
    if choice == "avx512" and "avx512_bf16" in cpu_flags:
        flags.append("-mavx512bf16")  # one instruction rounds 16 floats to bfloat16
    return choice, flags


SANITIZE = os.environ.get("FUSED_SOFTMAX_SANITIZE") == "1"
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer", "-g"]


def want_cuda() -> bool:
    mode = os.environ.get("FUSED_SOFTMAX_CUDA", "auto").lower()
    if SANITIZE:
        return False
    if mode in ("0", "no", "off", "false"):
        return False
    if mode in ("1", "yes", "on", "true", "force"):
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    vec_name, vec_flags = cpu_vector_flags()
    # -ffp-contract=off: the kernel's FMAs are the ones it spells out. GCC otherwise fuses a multiply and
    # an add where it sees fit, differently in different inlined copies of the same arithmetic: the
    # forward-formed and the recomputed gradient, which must agree bit for bit, did not (AVX2, float64).
    # The C++ standard is the one torch.utils.cpp_extension picks.
    flags = ["-ffp-contract=off", "-fopenmp", *vec_flags]
    cxx, link = ["-O3", *flags], ["-fopenmp"]
    if SANITIZE:
        cxx, link = ["-O1", *flags, *SANITIZER_FLAGS], link + SANITIZER_FLAGS
    sources = [
        "csrc/register.cpp",
        "csrc/cross_entropy.cpp",
        "csrc/cross_entropy_autograd.cpp",
        "csrc/cpu/cross_entropy_cpu.cpp",
    ]
    if not want_cuda():
        print(
            f"fused_softmax: building the CPU kernel ({vec_name}{', sanitizers' if SANITIZE else ''}); "
            f"CUDA kernels skipped (torch CUDA {torch.version.cuda}, CUDA_HOME {CUDA_HOME})"
        )
        return CppExtension("fused_softmax._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    print(
        f"fused_softmax: building the CPU kernel ({vec_name}) and CUDA kernels for "
        f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {CUDA_HOME}"
    )
    nvcc = ["-O3", "-DFUSED_SOFTMAX_WITH_CUDA", "-Xptxas=-warn-spills", "-Xptxas=-warn-lmem-usage"]
    if os.environ.get("FUSED_SOFTMAX_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")  # the register report, per kernel
    return CUDAExtension(
        "fused_softmax._C",
        sources + ["csrc/cuda/cross_entropy_cuda.cu"],
        extra_compile_args={"cxx": cxx + ["-DFUSED_SOFTMAX_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
