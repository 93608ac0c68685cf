#!/usr/bin/env bash
# The prepared check for a lent GPU machine (its own python3 with torch and CUDA, nvcc, ninja;
# no network). One command, under 8 minutes on an H100:
#   1. build the extension in place for this GPU, with the ptxas register report (no spills allowed)
#   2. run the test suite, CUDA tests included
#   3. a short benchmark: fused vs torch eager vs torch.compile, fwd+bwd and forward
#   4. compute-sanitizer memcheck and racecheck on small cases
# Writes gpu_check.log, gpu_check.json and the benchmark rows to $OUT if set, else benchmarks/results/.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
status() { echo "== $* ($(date -u +%H:%M:%S))"; }
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-450} ))  # the whole check stays under 8 minutes
budget() { local left=$(( deadline - $(date +%s) )); (( left < $1 )) && echo $(( left > 5 ? left : 5 )) || echo "$1"; }
declare -A result

status "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# pytest and Liger-Kernel (a peer in the benchmark) are not always on the GPU machine: install them
# from wheels carried in .gpu_wheels/ if needed. Prepare them here with
#   pip download pytest -d .gpu_wheels && pip download --no-deps liger-kernel -d .gpu_wheels
# and name .gpu_wheels in the run's carry. (quack needs the CUTLASS DSL's wheels, over the carry limit.)
if [ -d .gpu_wheels ]; then
  python3 -c "import pytest" 2>/dev/null \
    || python3 -m pip install --quiet --no-index --find-links .gpu_wheels --target /tmp/gpu_check_site pytest
  python3 -c "import liger_kernel" 2>/dev/null \
    || python3 -m pip install --quiet --no-index --no-deps --find-links .gpu_wheels --target /tmp/gpu_check_site liger-kernel
  export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
python3 -c "import liger_kernel" 2>/dev/null && echo "liger-kernel: importable" || echo "liger-kernel: not importable"

status "build"
cap=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}" FUSED_SOFTMAX_CUDA=1 FUSED_SOFTMAX_PTXAS_VERBOSE=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if python3 setup.py build_ext --inplace > "$out/gpu_build.log" 2>&1; then result[build]=ok; else result[build]=failed; fi
grep -E "^fused_softmax:|error" "$out/gpu_build.log" | head -20
grep -A1 -E "Compiling entry function" "$out/gpu_build.log" | grep -E "Used [0-9]+ registers" | sort | uniq -c || true
spills=$(grep -c "Registers are spilled" "$out/gpu_build.log")
result[spills]=$spills
echo "register spills reported by ptxas: $spills"
python3 -c "import fused_softmax; print(fused_softmax.backend())"

status "tests"
# The trainer's tests are CPU-only (CI runs them) and need matplotlib, which this machine may lack.
(cd tests && timeout "$(budget 200)" python3 -m pytest -q -p no:cacheprovider --ignore=test_trainer.py) \
  > "$out/gpu_tests.log" 2>&1
tail -25 "$out/gpu_tests.log"
result[tests]=$(tail -1 "$out/gpu_tests.log")

status "benchmark"
timeout "$(budget 120)" python3 benchmarks/bench_cross_entropy.py --device cuda --dtypes bf16 --modes full,forward,inplace \
  --providers fused,torch,compile,liger,quack --shapes 4096x32000,1024x128256,65536x128 --reps 20 \
  --csv "$out/cross_entropy_gpu.csv" --json "$out/gpu_bench_bf16.json"
timeout "$(budget 45)" python3 benchmarks/bench_cross_entropy.py --device cuda --dtypes fp32 --modes full,forward \
  --providers fused,torch --shapes 4096x32000,1024x128256,65536x128 --reps 20 \
  --csv "$out/cross_entropy_gpu.csv" --json "$out/gpu_bench_fp32.json"

# memcheck and racecheck over every kernel path (sanitizer_cases.py), then memcheck over the CUDA tests.
for run in "memcheck python3 benchmarks/sanitizer_cases.py" "racecheck python3 benchmarks/sanitizer_cases.py" \
  "memcheck python3 -m pytest -q -x -p no:cacheprovider tests/test_large_and_cuda.py -k cuda_"; do
  set -- $run
  tool=$1; shift
  name="$tool$( [ "$1" = python3 ] && [ "$2" = -m ] && echo _tests )"
  status "compute-sanitizer $name"
  if ! command -v compute-sanitizer > /dev/null; then
    result[$name]="compute-sanitizer not found"
  elif (( $(budget 100) < 30 )); then
    result[$name]="skipped: out of time"
  elif timeout "$(budget 100)" compute-sanitizer --tool "$tool" --error-exitcode 9 "$@" > "$out/sanitizer_$name.log" 2>&1
  then
    result[$name]=clean
  else
    result[$name]="exit $? (see sanitizer_$name.log)"
  fi
  tail -3 "$out/sanitizer_$name.log" 2>/dev/null
  echo "$name: ${result[$name]}"
done

status "summary"
python3 - "$out" "${result[build]}" "${result[spills]}" "${result[tests]}" "${result[memcheck]}" \
  "${result[racecheck]}" "${result[memcheck_tests]}" <<'PY'
import json, sys, pathlib
out, build, spills, tests, memcheck, racecheck, memcheck_tests = sys.argv[1:]
bench = {}
for name in ("gpu_bench_bf16.json", "gpu_bench_fp32.json"):
    p = pathlib.Path(out) / name
    if p.exists():
        bench[name] = json.loads(p.read_text())
summary = dict(build=build, register_spills=int(spills or 0), tests=tests, memcheck=memcheck,
               racecheck=racecheck, memcheck_tests=memcheck_tests, benchmark=bench)
(pathlib.Path(out) / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if k != "benchmark"}, indent=1))
PY
