"""Degenerate inputs behave like torch; results are bitwise repeatable, whatever the thread count."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches_torch

import fused_softmax


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batches(device, reduction):
    assert_matches_torch(
        torch.randn(0, 7, device=device), torch.zeros(0, dtype=torch.long, device=device), reduction=reduction
    )
    assert_matches_torch(
        torch.randn(2, 7, 0, device=device), torch.zeros(2, 0, dtype=torch.long, device=device), reduction=reduction
    )
    assert_matches_torch(torch.randn(0, 7, device=device), torch.rand(0, 7, device=device), reduction=reduction)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_one_class(device, reduction):
    x = torch.randn(5, 1, device=device)
    assert_matches_torch(x, torch.zeros(5, dtype=torch.long, device=device), reduction=reduction)
    assert_matches_torch(x, torch.ones(5, 1, device=device), reduction=reduction, label_smoothing=0.3)


def test_every_target_ignored(device):
    x = torch.randn(6, 4, device=device, requires_grad=True)
    y = torch.full((6,), -100, device=device)
    assert fused_softmax.cross_entropy(x, y).isnan()  # 0 / 0, as torch
    assert fused_softmax.cross_entropy(x, y, reduction="sum") == 0
    assert (fused_softmax.cross_entropy(x, y, reduction="none") == 0).all()
    fused_softmax.cross_entropy(x, y).backward()
    assert (x.grad == 0).all()


def test_row_of_minus_inf_is_nan_and_confined(device):
    x = torch.randn(3, 5, device=device)
    x[1] = float("-inf")
    assert_matches_torch(x, torch.tensor([0, 1, 2], device=device), reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_small_classes_block_mixing_ignored_nan_and_strided_grad(device, dtype):
    # C <= 32 runs many rows per vector: one block holds ignored, NaN, -inf and ordinary rows, and
    # grad_output reaches the backward strided (a column of stack's gradient).
    x = torch.randn(37, 10, device=device)
    y = torch.randint(0, 10, (37,), device=device)
    y[[2, 5, 20]] = -100
    x[3, 4], x[5, 1], x[7] = float("nan"), float("nan"), float("-inf")  # row 5 is NaN and ignored
    kwargs = dict(weight=torch.rand(10, device=device).to(dtype) + 0.5, label_smoothing=0.1, reduction="none")

    def loss_and_grad(fn):
        h = x.to(dtype).clone().requires_grad_(True)
        loss = fn(h, y, **kwargs)
        cotangent = torch.arange(1.0, 75.0, device=device).view(37, 2)
        (torch.stack([loss, 2 * loss.detach()], 1) * cotangent).sum().backward()
        return loss.detach(), h.grad

    (loss, grad), (torch_loss, torch_grad) = loss_and_grad(fused_softmax.cross_entropy), loss_and_grad(F.cross_entropy)
    assert torch.equal(grad[5], torch.zeros_like(grad[5]))  # ignored: no gradient, though torch's is NaN there
    assert grad[[3, 7]].isnan().all()
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(loss, torch_loss, equal_nan=True, **tolerance)
    kept = torch.arange(37, device=device) != 5
    torch.testing.assert_close(grad[kept], torch_grad[kept], equal_nan=True, **tolerance)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("shape", [(4096, 1000), (65536, 10), (64, 32000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_identical_for_any_thread_count(shape, dtype):
    x = torch.randn(shape).to(dtype)
    y = torch.randint(0, shape[1], (shape[0],))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            xx = x.clone().requires_grad_(True)
            loss = fused_softmax.cross_entropy(xx, y, label_smoothing=0.1)
            loss.backward()
            results.append((loss.detach(), xx.grad))
    finally:
        torch.set_num_threads(before)
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.cpu_kernel
def test_gradient_large_enough_for_huge_pages_is_an_ordinary_tensor():
    """A gradient of >= 32 MiB comes from its own huge-page mapping (CPU); it must behave like any other."""
    x = torch.randn(2048, 4100, requires_grad=True)  # 33.6 MB of float32
    y = torch.randint(0, 4100, (2048,))
    fused_softmax.cross_entropy(x, y).backward()
    first = x.grad.clone()
    fused_softmax.cross_entropy(x, y).backward()  # accumulates into the first gradient
    torch.testing.assert_close(x.grad, 2 * first)
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(x, y), x)[0]
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-7)
    grad = torch.autograd.grad(fused_softmax.cross_entropy(x, y, reduction="sum"), x)[0]
    assert grad.is_contiguous() and grad.shape == x.shape
    assert not grad.untyped_storage().resizable()  # it did come from the kernel's own mapping (Linux)
    torch.testing.assert_close(grad.clone().mul_(2).sub_(grad), grad)
    del grad  # its mapping is kept for the next gradient
    # The next gradient that fits reuses the freed one's memory; two live gradients never share it.
    g1 = torch.autograd.grad(fused_softmax.cross_entropy(x, y), x)[0]
    g2 = torch.autograd.grad(fused_softmax.cross_entropy(x, y, reduction="sum"), x)[0]
    assert g1.data_ptr() != g2.data_ptr()
    torch.testing.assert_close(g1 * x.shape[0], g2, rtol=1e-5, atol=1e-6)
    reused = g2.data_ptr()
    del g2
    g3 = torch.autograd.grad(fused_softmax.cross_entropy(x, y), x)[0]
    assert g3.data_ptr() == reused
    torch.testing.assert_close(g3, g1, rtol=0, atol=0)


@pytest.mark.cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_streamed_gradient_rows_at_every_alignment(dtype):
    """Gradients of >= 32 MiB are written past the caches (AVX-512 builds), each row from its first
    aligned address on; an odd C starts every row at another alignment. The forward-formed gradient
    and the backward op's recomputed one (a second backward) must agree bit for bit, and with torch."""
    n, c = {torch.float32: (2048, 4099), torch.bfloat16: (4096, 4099), torch.float64: (2048, 2051)}[dtype]  # 33.6 MB
    x, y = torch.randn(n, c).to(dtype), torch.randint(0, c, (n,))
    y[::7] = -100
    assert_matches_torch(x, y, label_smoothing=0.1)
    h = x.clone().requires_grad_(True)
    loss = fused_softmax.cross_entropy(h, y, label_smoothing=0.1)
    (formed,) = torch.autograd.grad(loss, h, retain_graph=True)
    (recomputed,) = torch.autograd.grad(loss, h)
    assert torch.equal(formed, recomputed)


def minor_faults() -> int:
    """Page faults of this process so far that needed no I/O: fresh anonymous pages among them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_are_ours() -> None:
    """The page-fault counts below are the gradients' own, except under AddressSanitizer (scripts/
    test_kernel_build.sh preloads it), whose shadow memory faults pages too: there the tests stop after
    exercising the kept mappings (for memory errors) and before asserting on faults."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer's shadow memory faults pages too")


@pytest.mark.cpu_kernel
@pytest.mark.skipif(sys.platform != "linux", reason="the kept mappings are Linux's")
def test_gradients_of_alternating_sizes_each_keep_their_mapping():
    """Two losses a step with gradients of different sizes (or training and evaluation batches) must
    not fault in fresh pages every step: the last few freed mappings are kept, each reused by the
    next gradient that fits it. (One kept mapping made every one of these faults its pages anew.)"""
    big, small = torch.randn(4096, 2048), torch.randn(1024, 2048)  # 32 and 8 MiB gradients
    y = torch.randint(0, 2048, (4096,))

    def grad_of(x):
        x = x.requires_grad_(True)
        return torch.autograd.grad(fused_softmax.cross_entropy(x, y[: x.shape[0]]), x)[0]

    grad_of(big)  # freed at once, its mapping kept
    grad_of(small)  # too small for the big one's mapping: a new one, kept beside it
    faults = minor_faults()
    for _ in range(3):
        grad_of(big)
        grad_of(small)
    faults_are_ours()
    assert minor_faults() - faults < 512  # fresh pages: >= 2048 a step


@pytest.mark.cpu_kernel
@pytest.mark.skipif(sys.platform != "linux", reason="the kept mappings are Linux's")
def test_a_recomputed_gradient_takes_the_formed_ones_memory():
    """For a grad_output other than 1 the backward recomputes the gradient the forward formed: the formed
    one is freed first and the recomputed one takes its memory, so the peak stays one gradient (held
    during the recomputation, the formed one made it two: 4096 fresh pages for this 16 MiB one)."""
    x, y = torch.randn(2048, 2048), torch.randint(0, 2048, (2048,))
    fused_softmax.empty_cache()  # no kept mapping for the recomputed gradient but the formed one's
    h = x.requires_grad_(True)
    loss = fused_softmax.cross_entropy(h, y)
    before = minor_faults()
    torch.autograd.grad(loss * 0.5, h)
    faults = minor_faults() - before
    fused_softmax.empty_cache()
    faults_are_ours()
    assert faults < 512, faults


@pytest.mark.cpu_kernel
@pytest.mark.skipif(sys.platform != "linux", reason="the kept mappings are Linux's")
def test_only_the_last_four_freed_gradient_mappings_are_kept():
    """The kept mappings are bounded: of five gradients freed in turn, the oldest's memory went back to
    the system (its size faults in fresh pages again); the newest's is reused."""
    fused_softmax.empty_cache()
    y = torch.randint(0, 1024, (12288,))

    def faults_of_grad(rows: int) -> int:  # rows x 1024 float32: 4 KiB a row
        x = torch.randn(rows, 1024).requires_grad_(True)
        before = minor_faults()
        torch.autograd.grad(fused_softmax.cross_entropy(x, y[:rows]), x)
        return minor_faults() - before

    sizes = [512, 1280, 3072, 7168, 12288]  # 2 to 48 MiB, each over twice the one before: no sharing
    for rows in sizes:
        faults_of_grad(rows)
    kept, pushed_out = faults_of_grad(sizes[-1]), faults_of_grad(sizes[0])
    fused_softmax.empty_cache()
    faults_are_ours()
    assert kept < 256
    assert pushed_out >= 256  # pushed out by the four after it: 512 fresh pages


@pytest.mark.cpu_kernel
@pytest.mark.skipif(sys.platform != "linux", reason="the kept mapping is Linux's")
def test_gradient_of_a_few_mib_is_not_faulted_in_every_step():
    """A 2.6 MB gradient (65536 x 10 float32) came from glibc, which returned it to the system every
    few steps: 640 page faults, as long again as the step itself. It now comes from a kept mapping."""
    x, y = torch.randn(65536, 10), torch.randint(0, 10, (65536,))
    faults = []
    for _ in range(20):
        h = x.detach().clone().requires_grad_(True)  # as a training step's fresh logits
        before = minor_faults()
        fused_softmax.cross_entropy(h, y).backward()
        faults.append(minor_faults() - before)
    faults_are_ours()
    assert sum(faults[1:]) < 640, faults  # a gradient from glibc: 640 faults whenever it was returned


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("VmRSS")


@pytest.mark.cpu_kernel
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set from /proc")
def test_empty_cache_returns_the_kept_gradient_memory():
    x = torch.randn(4096, 4096, requires_grad=True)  # a 64 MiB gradient
    y = torch.randint(0, 4096, (4096,))
    grad = torch.autograd.grad(fused_softmax.cross_entropy(x, y), x)[0]
    del grad  # kept, still resident
    before = resident_mib()
    fused_softmax.empty_cache()
    assert before - resident_mib() > 48, (before, resident_mib())
