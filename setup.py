"""Builds fused_softmax._C: the C++ CPU kernels always, the CUDA kernels when they can be.

Environment knobs:
  FUSED_SOFTMAX_CUDA=auto|1|0    CUDA kernels: auto builds them when torch has CUDA and a toolkit is
                                 found; 1 forces them (the build fails without a toolkit); 0 skips them.
  TORCH_CUDA_ARCH_LIST           GPU architectures (default here: "8.0;9.0+PTX").
  MAX_JOBS                       parallel compile jobs (ninja).
  CUDA_HOME                      the CUDA toolkit; when unset it is found from nvcc (see find_cuda_home).
  FUSED_SOFTMAX_SANITIZE=1       the CPU kernels only, with AddressSanitizer and UndefinedBehaviorSanitizer
                                 (scripts/test_kernel_build.sh sanitize builds and tests that way).
"""

import os
import platform
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
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

# The CPU kernels' instruction-set levels (csrc/cpu/kernels.h): csrc/cpu/kernels.cpp is compiled once
# per level with its flags, and the library runs the best level the CPU it runs on supports. The
# levels and their flags are ATen's (DEFAULT, AVX2, AVX512), plus AVX512-BF16 for one instruction that
# rounds 16 floats to bfloat16. Nothing else is compiled for more than the baseline CPU.
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
CPU_LEVELS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": [*AVX512, "-DCPU_CAPABILITY_AVX512"],
    "AVX512_BF16": [*AVX512, "-mavx512bf16", "-DCPU_CAPABILITY_AVX512"],
}


def cpu_levels(compiler: str) -> list[str]:
    """The levels to build: all that the compiler has on x86-64, the baseline elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64") or os.name == "nt":
        return ["DEFAULT"]
    return [level for level, flags in CPU_LEVELS.items() if compiler_accepts(compiler, flags)]


def compiler_accepts(compiler: str, flags: list[str]) -> bool:
    """Whether the compiler takes these flags (an older one may not know -mavx512bf16)."""
    probe = subprocess.run(
        [compiler, *flags, "-x", "c++", "-fsyntax-only", "-"], input="int main() {}", text=True, capture_output=True
    )
    return probe.returncode == 0


class BuildWithCpuLevels(BuildExtension):
    """torch's BuildExtension, which also compiles csrc/cpu/kernels.cpp once per CPU level (each into a
    build folder of its own) and links those objects in after the others, lowest level first: where
    two objects hold the same inline function (a header's), the linker keeps the first, so code
    compiled for a higher level is never what a lower level's kernels call."""

    def build_extension(self, ext):
        print(*BUILD_PLAN, sep="\n")  # here, not when setup.py is read: pip reads it more than once
        compiler = self.compiler.compiler_so[0]
        levels = cpu_levels(compiler)
        args = ext.extra_compile_args

        def compile_level(level: str) -> list[str]:
            flags = [*CPU_LEVELS[level], f"-DCPU_CAPABILITY={level}"]
            return self.compiler.compile(
                [os.path.join("csrc", "cpu", "kernels.cpp")],
                output_dir=os.path.join(self.build_temp, "cpu_levels", level),
                include_dirs=ext.include_dirs,
                debug=self.debug,
                extra_postargs={**args, "cxx": args["cxx"] + flags},
                depends=ext.depends,
            )

        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(levels)))) as pool:
            objects = [obj for level_objects in pool.map(compile_level, levels) for obj in level_objects]
        args["cxx"] = args["cxx"] + [f"-DFUSED_SOFTMAX_CPU_LEVEL_{level}" for level in levels]
        ext.extra_objects = objects + list(ext.extra_objects or [])
        print(f"fused_softmax: CPU kernels compiled for {', '.join(levels).lower()}")
        super().build_extension(ext)


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


BUILD_PLAN: list[str] = []  # what the build does, said when it starts


def extension():
    # -ffp-contract=off: the kernel's FMAs are the ones it spells out. GCC otherwise fuses a multiply and
    # an add where it sees fit, differently in different inlined copies of the same arithmetic: the
    # forward-formed and the recomputed gradient, which must agree bit for bit, did not (AVX2, float64).
    # The C++ standard is the one torch.utils.cpp_extension picks.
    flags = ["-ffp-contract=off", "-fopenmp"]
    cxx, link = ["-O3", *flags], ["-fopenmp"]
    if SANITIZE:
        cxx, link = ["-O1", *flags, *SANITIZER_FLAGS], link + SANITIZER_FLAGS
    sources = [
        "csrc/register.cpp",
        "csrc/cross_entropy.cpp",
        "csrc/cross_entropy_autograd.cpp",
        "csrc/cpu/cross_entropy_cpu.cpp",
        "csrc/cpu/gradient_memory.cpp",
    ]  # and csrc/cpu/kernels.cpp, once per CPU level (BuildWithCpuLevels)
    if not want_cuda():
        BUILD_PLAN.append(
            f"fused_softmax: building the CPU kernels{' with sanitizers' if SANITIZE else ''}; "
            f"CUDA kernels skipped (torch CUDA {torch.version.cuda}, CUDA_HOME {CUDA_HOME})"
        )
        return CppExtension("fused_softmax._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    BUILD_PLAN.append(
        f"fused_softmax: building the CPU kernels and CUDA kernels for "
        f"{os.environ['TORCH_CUDA_ARCH_LIST']} with {CUDA_HOME}"
    )
    if not torch.cuda.is_available():
        BUILD_PLAN.append(
            "fused_softmax: no GPU here: the CUDA kernels are compiled anyway (about 2 more minutes on 2 cores), "
            "so that the package also runs on a GPU; FUSED_SOFTMAX_CUDA=0 skips them"
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


# The lowest torch we support: pyproject.toml's build requirement, the one CI runs the whole suite on.
TORCH_FLOOR = re.search(r'"torch>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
if torch.__version__ < TORCH_FLOOR:  # torch.__version__ compares as a version
    raise SystemExit(f"fused_softmax: needs torch >= {TORCH_FLOOR} to build, found {torch.__version__}")

setup(
    # An extension runs only with the torch it was compiled against (torch's C++ ABI changes between
    # releases): the built package asks for that one, so pip refuses a mismatch instead of the import
    # failing later. The pin leaves out the local label (2.14.1+cu130 -> 2.14.1), as torchvision's does.
    install_requires=[f"torch=={torch.__version__.split('+')[0]}"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithCpuLevels.with_options(use_ninja=True)},
)
