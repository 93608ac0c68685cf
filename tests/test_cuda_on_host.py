"""The CUDA ops run on the CPU: csrc/cuda/cross_entropy_kernels.cuh (every kernel and the host code
that launches them) compiled for the host with tests/cuda_on_host.h, whose simulator runs each
block's threads one by one, with __syncthreads and warp shuffles as barriers that every thread must
reach (tests/cuda_kernels_host.cpp is the module).

No GPU is needed, so CI runs the kernels' indexing, schedules (4 threads, a warp or a block per row),
grid-stride loops, pack walks, merges, options and in-place writes, and this is the oracle:
the CPU op (itself held to torch and float64 by the other tests) and the float64 reference. The
host's exp2/log/tanh are not the GPU's, so this checks logic, not the last bits or the speed; the
GPU check (benchmarks/gpu_check.sh) runs the same kernels on a GPU where one is lent.
"""

from __future__ import annotations

import shutil

import pytest
import simulated_cuda
import torch

import fused_softmax  # noqa: F401  (loads torch.ops.fused_softmax)
from fused_softmax import reference

ops = torch.ops.fused_softmax
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# Columns for each schedule: 4 threads a row (up to 128 bf16 / 64 fp32 / 32 fp64 classes), a warp
# (up to 1024), a block; odd sizes leave heads and tails.
CLASSES = [1, 5, 31, 64, 129, 1000, 1025, 3001]


@pytest.fixture(scope="session")
def sim():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    return simulated_cuda.build()


def tolerances(dtype: torch.dtype) -> dict:
    """Between two float32-accumulating kernels with different exp/log: a few float32 ulps in the
    float32 results, one ulp of a 16-bit gradient (a value near a rounding boundary may go either way)."""
    return {
        torch.float64: {"rtol": 1e-12, "atol": 1e-14},
        torch.float32: {"rtol": 1e-5, "atol": 1e-6},
        torch.bfloat16: {"rtol": 8e-3, "atol": 1e-6},
        torch.float16: {"rtol": 1e-3, "atol": 1e-6},
    }[dtype]


def close(ours, expected, dtype):
    """Same shape, dtype, NaN and inf places, and values within the tolerances of dtype's results."""
    for a, b in zip(ours, expected, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
        tol = tolerances(dtype) if a.dtype == dtype else tolerances(torch.float32 if dtype != torch.float64 else dtype)
        torch.testing.assert_close(a, b, equal_nan=True, **tol)


def run(module, x, target, weight=None, ignore_index=-100, eps=0.0, reduction=0, scale=1.0, cap=0.0, z=0.0):
    """The forward's loss and lse (max + log_sum: the max alone of a NaN row is arbitrary) and the
    backward of a random grad_loss, through module's ops."""
    loss, stats = module.cross_entropy_fwd(x, target, weight, ignore_index, eps, reduction, scale, cap, z)
    g = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3))
    grad = module.cross_entropy_bwd(g, x, target, weight, stats, ignore_index, eps, reduction, scale, cap, z, 0, 0)
    return loss, stats.sum(1), grad


def logits(n: int, c: int, dtype: torch.dtype, offset: int = 0, pad: int = 0) -> torch.Tensor:
    """(n, c) logits whose rows start `offset` elements into their storage and are c + pad apart; the
    padding is NaN, so a kernel that reads outside its row makes the row NaN."""
    storage = torch.full((offset + n * (c + pad) + pad,), float("nan"), dtype=dtype)
    x = storage[offset : offset + n * (c + pad)].view(n, c + pad)[:, :c]
    x.copy_(torch.randn(n, c, dtype=torch.float64) * 3)
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CLASSES)
def test_matches_the_cpu_op_for_every_schedule(sim, dtype, c):
    n = 300 if c <= 1000 else 70  # past the grid (64 blocks) for the warp and block schedules
    x = logits(n, c, dtype)
    y = torch.randint(0, c, (n,))
    y[::7] = -100
    for reduction in (0, 1, 2):
        close(run(sim, x, y, reduction=reduction), run(ops, x, y, reduction=reduction), dtype)


def test_tiny_rows_take_the_grid_stride_loop(sim):
    """4 threads a row: 64 rows a block, so 64 blocks cover 4096 rows; 5000 - 4096 rows come round again."""
    x = logits(5000, 37, torch.bfloat16)
    y = torch.randint(0, 37, (5000,))
    close(run(sim, x, y), run(ops, x, y), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [29, 100, 1000, 2051])
@pytest.mark.parametrize("offset", [1, 3])
def test_unaligned_and_strided_rows_read_only_their_row(sim, dtype, c, offset):
    """Rows that start off a 16-byte boundary (a scalar head, then packs), with NaN between them."""
    x = logits(67, c, dtype, offset=offset, pad=5)
    y = torch.randint(0, c, (67,))
    ours = run(sim, x, y)
    assert all(t.isfinite().all() for t in ours), "read outside the row"
    close(ours, run(ops, x, y), dtype)


OPTIONS = [
    {"eps": 0.1},
    {"weight": True},
    {"weight": True, "eps": 0.2, "reduction": 1},
    {"cap": 3.0},
    {"scale": 0.5, "cap": 1.5},
    {"scale": 2.0},
    {"z": 1e-2},
    {"z": 1e-3, "cap": 4.0, "eps": 0.1, "weight": True, "reduction": 1},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("c", [13, 700, 3001])
def test_options_match_the_cpu_op_and_float64(sim, options, dtype, c):
    x = logits(45, c, dtype)
    y = torch.randint(0, c, (45,))
    y[::5] = -100
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(c, dtype=reference.accumulate_dtype(dtype)) + 0.5
    ours = run(sim, x, y, **options)
    close(ours, run(ops, x, y, **options), dtype)
    if dtype == torch.float64:
        exact = reference_run(x, y, **options)
        for a, b in zip(ours, exact, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def reference_run(x, target, weight=None, ignore_index=-100, eps=0.0, reduction=0, scale=1.0, cap=0.0, z=0.0):
    """run() with the float64 reference's forward and backward (fused_softmax.reference)."""
    loss, stats = reference.forward_op(x, target, weight, ignore_index, eps, reduction, scale, cap, z)
    g = torch.randn(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3))
    grad = reference.backward_op(g, x, target, weight, stats, ignore_index, eps, reduction, scale, cap, z)
    return loss.detach(), stats.sum(1), grad


PROBABILITY_DTYPES = [(dtype, dtype) for dtype in DTYPES] + [
    (torch.bfloat16, torch.float32),  # 16-bit logits, float32 probabilities: read as they are
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize(("dtype", "target_dtype"), PROBABILITY_DTYPES, ids=str)
@pytest.mark.parametrize("c", [6, 500, 2500])
def test_probability_targets(sim, dtype, target_dtype, c):
    x = logits(40, c, dtype)
    t = torch.softmax(torch.randn(40, c, dtype=torch.float64), 1).to(target_dtype)
    for options in ({}, {"eps": 0.1, "reduction": 1}, {"weight": torch.rand(c).to(reference.accumulate_dtype(dtype))}):
        close(run(sim, x, t, **options), run(ops, x, t, **options), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [10, 300, 5000])
def test_in_place_gradient_writes_only_the_logits(sim, dtype, c):
    """The in-place op leaves fwd_grad's gradient in the logits, and nothing outside them changes."""
    storage = torch.randn(3 + 33 * c + 5, dtype=dtype)
    before = storage.clone()
    x = storage[3 : 3 + 33 * c].view(33, c)  # contiguous, not 16-byte aligned
    y = torch.randint(0, c, (33,))
    y[4] = -100
    loss, stats, grad = sim.cross_entropy_fwd_grad(x, y, None, -100, 0.0, 1, 1.0, 0.0, 0.0)
    loss_in_place, stats_in_place = sim.cross_entropy_fwd_inplace(x, y, None, -100, 0.0, 1, 1.0, 0.0, 0.0)
    assert torch.equal(loss_in_place, loss) and torch.equal(stats_in_place, stats)
    assert torch.equal(x, grad)
    assert torch.equal(storage[:3], before[:3]) and torch.equal(storage[3 + 33 * c :], before[3 + 33 * c :])
    close(
        (loss, stats, grad),
        ops.cross_entropy_fwd_grad(before[3 : 3 + 33 * c].view(33, c), y, None, -100, 0.0, 1),
        dtype,
    )


@pytest.mark.parametrize("c", [40, 1000, 3000])
@pytest.mark.parametrize("probabilities", [False, True])
def test_backward_of_a_block_of_classes(sim, c, probabilities):
    """class_start / num_classes (the fused linear and vocab-parallel losses): the gradient of columns
    [start, start + width) of rows of c classes is that slice of the whole rows' gradient, to the bit
    (a block takes the whole rows' schedule, so a row's target mass is summed in the same order)."""
    x = logits(50, c, torch.float32)
    y = torch.softmax(torch.randn(50, c), 1) if probabilities else torch.randint(0, c, (50,))
    options = (torch.rand(c) + 0.5, -100, 0.1, 1, 1.0, 0.0, 1e-3)
    loss, stats = sim.cross_entropy_fwd(x, y, *options)
    g = torch.ones(())
    whole = sim.cross_entropy_bwd(g, x, y, options[0], stats, *options[1:], 0, 0)
    for start, width in ((0, c // 3), (c // 3, c - c // 3), (7, 9)):
        block = sim.cross_entropy_bwd(g, x[:, start : start + width], y, options[0], stats, *options[1:], start, c)
        assert torch.equal(block, whole[:, start : start + width]), (start, width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [9, 600, 2000])
def test_nan_inf_and_minus_inf_rows(sim, dtype, c):
    x = logits(12, c, dtype)
    x[1, c // 2] = float("nan")
    x[2, 0] = float("inf")
    x[3] = float("-inf")
    x[4, : c // 2] = float("-inf")  # padding: no probability mass
    x[5] *= 1e4
    x[6, 0], x[7, -1] = float("nan"), float("inf")
    y = torch.randint(c // 2, c, (12,))  # row 4's target among its finite logits
    y[6:8] = -100  # ignored rows have no gradient, whatever their logits hold
    close(run(sim, x, y), run(ops, x, y), dtype)


def test_empty_batch(sim):
    x = torch.randn(0, 50)
    y = torch.zeros(0, dtype=torch.int64)
    for reduction in (0, 2):
        close(run(sim, x, y, reduction=reduction), run(ops, x, y, reduction=reduction), torch.float32)


def test_device_side_asserts_name_the_argument(sim):
    x = torch.randn(8, 100)
    with pytest.raises(RuntimeError, match="class index out of range"):
        sim.cross_entropy_fwd(x, torch.full((8,), 100), None, -100, 0.0, 0, 1.0, 0.0, 0.0)
    # Class weights that torch computes with (negative ones here) are computed with: no assert.
    loss, _ = sim.cross_entropy_fwd(x, torch.zeros(8, dtype=torch.int64), -torch.ones(100), -100, 0.0, 0, 1.0, 0.0, 0.0)
    assert loss.isfinite().all() and (loss <= 0).all()


@pytest.mark.parametrize("which", ["shuffle", "barrier"])
def test_the_simulator_reports_threads_that_skip_a_barrier(sim, which):
    """What makes the tests above able to fail on divergence: a kernel whose threads do not all reach
    a shuffle (or __syncthreads) is an error here, not a result."""
    with pytest.raises(RuntimeError, match="deadlock"):
        sim.run_diverged(which)
