"""fused_softmax.cross_entropy against torch.nn.functional.cross_entropy and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import FLOOR, assert_matches_torch

import fused_softmax

REDUCTIONS = ["none", "mean", "sum"]
SHAPES = [(n, c) for c in (1, 2, 10, 1000, 32000, 50257) for n in (0, 1, 3, 4096) if n * c <= 4096 * 1000]
SHAPES += [(64, 32000), (17, 50257)]  # the large vocabularies at a size the suite can afford


def indices(n: int, c: int, device: str, dtype=torch.int64) -> torch.Tensor:
    return torch.randint(0, c, (n,), device=device, dtype=dtype)


def test_backend_is_compiled():
    backend = fused_softmax.backend()
    assert backend["cpu"].startswith("compiled C++ kernel"), backend


@pytest.mark.parametrize("n,c", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch(device, n, c, reduction, dtype):
    x = torch.randn(n, c, device=device, dtype=dtype) * 3
    assert_matches_torch(x, indices(n, c, device), reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_int32_target(device, reduction):
    x = torch.randn(50, 300, device=device)
    y = indices(50, 300, device)
    ours = fused_softmax.cross_entropy(x, y.int(), reduction=reduction)
    torch.testing.assert_close(ours, F.cross_entropy(x, y, reduction=reduction))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fraction", [0.3, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_ignore_index(device, reduction, fraction, ignore_index):
    x = torch.randn(200, 50, device=device)
    y = indices(200, 50, device)
    y[torch.rand(200, device=device) < fraction] = ignore_index
    assert_matches_torch(x, y, reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_weights_ignore_and_smoothing(device, reduction, label_smoothing):
    x = torch.randn(300, 77, device=device)
    y = indices(300, 77, device)
    y[::7] = -100
    w = torch.rand(77, device=device) + 0.1
    assert_matches_torch(x, y, weight=w, reduction=reduction, label_smoothing=label_smoothing)
    assert_matches_torch(x, y, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(device, reduction, label_smoothing, weighted):
    x = torch.randn(100, 33, device=device)
    t = torch.softmax(torch.randn(100, 33, device=device), dim=1)
    w = torch.rand(33, device=device) + 0.5 if weighted else None
    assert_matches_torch(x, t, weight=w, reduction=reduction, label_smoothing=label_smoothing)


def test_probability_targets_gradient_to_target(device):
    x = torch.randn(20, 9, device=device, dtype=torch.float64)
    t = torch.softmax(torch.randn(20, 9, device=device, dtype=torch.float64), 1)
    w = torch.rand(9, device=device, dtype=torch.float64)
    for fn in (fused_softmax.cross_entropy, F.cross_entropy):
        tt = t.clone().requires_grad_(True)
        fn(x, tt, weight=w, label_smoothing=0.1).backward()
        if fn is fused_softmax.cross_entropy:
            ours = tt.grad
    torch.testing.assert_close(ours, tt.grad)


@pytest.mark.parametrize("probabilities", [False, True])
def test_smoothing_at_a_large_vocabulary(device, probabilities):
    """The smoothing term sums over every class: at 64 x 128256 float32 it was 5.6e-5 off float64 (torch
    8.2e-7) while each vector lane summed 8016 terms; now within twice torch's error."""
    x = torch.randn(64, 128256, device=device)
    y = torch.softmax(torch.randn_like(x), 1) if probabilities else torch.randint(0, 128256, (64,), device=device)
    assert_matches_torch(x, y, reduction="none", label_smoothing=0.1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("probabilities", [False, True])
def test_spatial_and_unbatched(device, reduction, probabilities):
    x = torch.randn(4, 11, 5, 6, device=device)  # (N, C, d1, d2)
    y = torch.softmax(torch.randn_like(x), 1) if probabilities else torch.randint(0, 11, (4, 5, 6), device=device)
    assert_matches_torch(x, y, reduction=reduction, label_smoothing=0.05)
    x1 = torch.randn(11, device=device)  # (C,)
    y1 = torch.softmax(torch.randn_like(x1), 0) if probabilities else torch.tensor(4, device=device)
    assert_matches_torch(x1, y1, reduction=reduction)


def test_non_contiguous(device):
    base = torch.randn(64, 300, device=device)
    y = indices(64, 250, device)
    assert_matches_torch(base[:, :250], y)  # rows with stride 300 > C
    assert_matches_torch(base[:, 1:251], y)  # rows that start off 16-byte boundaries
    xt = torch.randn(250, 64, device=device).t()  # classes strided
    assert_matches_torch(xt, y)
    assert_matches_torch(base[::2, :250], y[::2])  # every other row
    assert_matches_torch(base[:, :250], y.repeat(2)[::2])  # strided target
    probs = torch.softmax(torch.randn(250, 64, device=device), 0).t()  # strided probability target
    assert_matches_torch(xt, probs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [1, 3, 4, 7, 10, 13, 20, 32])
def test_small_classes_strided_rows_and_partial_blocks(device, dtype, c):
    # C <= 32 moves 16 rows at a time through a transposed block (AVX-512: 16 x 16 register
    # transposes, classes past 16 in a second one; AVX2: 4 x 4 tiles): rows back to back and apart by
    # more than C, row and class counts that leave partial tiles and blocks.
    for n in (1, 3, 5, 37):
        base = torch.randn(2 * n, c + 3, device=device).to(dtype)
        y = indices(n, c, device)
        y[::4] = -100
        assert_matches_torch(base[::2, 1 : c + 1], y, label_smoothing=0.1)  # row stride 2 (C + 3)
        assert_matches_torch(base[:n, :c], y, reduction="none")  # row stride C + 3
        assert_matches_torch(base[:n, :c].contiguous(), y, label_smoothing=0.1)  # rows back to back


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 1000), (64, 32000), (1, 50257), (2048, 10)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reduced_precision_within_twice_torch_error(device, dtype, shape, label_smoothing):
    x = (torch.randn(shape, device=device) * 4).to(dtype)
    assert_matches_torch(x, indices(shape[0], shape[1], device), label_smoothing=label_smoothing)
    assert_matches_torch(x, indices(shape[0], shape[1], device), reduction="none")


def test_half_mean_over_many_rows_is_finite(device):
    # torch eager sums fp16 losses in fp16 and overflows at N >= 65504; we accumulate in fp32.
    x = torch.randn(65536, 10, device=device).half()
    y = indices(65536, 10, device)
    ours = fused_softmax.cross_entropy(x, y)
    exact = F.cross_entropy(x.double(), y)
    assert torch.isfinite(ours)
    assert abs(ours.double() - exact) <= 1e-3 * exact


def test_bf16_mean_within_1e3_of_float64(device):
    # The accuracy target at 8192 x 1000 (eager bf16 is off by up to 0.07). Our mean is
    # accumulated in float32: under autocast it is returned so; as a bf16 tensor it is that value
    # rounded once (half a bf16 ulp, 2^-9 relative, is the most a bf16 result can promise).
    x = (torch.randn(8192, 1000, device=device) * 2).bfloat16()
    y = indices(8192, 1000, device)
    exact = F.cross_entropy(x.double(), y).item()
    with torch.autocast(device, dtype=torch.bfloat16):
        under_autocast = fused_softmax.cross_entropy(x, y)
    assert under_autocast.dtype == torch.float32
    assert abs(under_autocast.item() - exact) <= 1e-3 * exact
    assert abs(fused_softmax.cross_entropy(x, y).double().item() - exact) <= 2**-9 * exact


def _loss_and_grad_under_autocast(fn, x, y, dtype, **kwargs):
    h = x.clone().requires_grad_(True)
    with torch.autocast(h.device.type, dtype=dtype):
        loss = fn(h, y, **kwargs)
    loss.sum().backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("probabilities", [False, True])
def test_autocast_returns_what_torch_returns(device, dtype, reduction, probabilities):
    # torch.autocast runs cross-entropy in float32 (a float32 copy of the 16-bit logits); we read the
    # logits as they are and accumulate in float32: the same dtypes, and float32-accurate losses.
    x = (torch.randn(300, 1000, device=device) * 3).to(dtype)
    y = (
        torch.softmax(torch.randn(300, 1000, device=device), 1).to(dtype)
        if probabilities
        else indices(300, 1000, device)
    )
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    loss, grad = _loss_and_grad_under_autocast(fused_softmax.cross_entropy, x, y, dtype, **kwargs)
    torch_loss, torch_grad = _loss_and_grad_under_autocast(F.cross_entropy, x, y, dtype, **kwargs)
    assert loss.dtype == torch_loss.dtype == torch.float32 and grad.dtype == torch_grad.dtype == dtype
    x64 = x.double().requires_grad_(True)
    exact = F.cross_entropy(x64, y.double() if probabilities else y, **kwargs)
    exact.sum().backward()
    torch.testing.assert_close(loss.double(), exact.detach(), rtol=1e-5, atol=1e-5)
    ours_err, torch_err = ((g.double() - x64.grad).abs().max().item() for g in (grad, torch_grad))
    assert ours_err <= 2 * torch_err + 1e-6, (ours_err, torch_err)


def test_autocast_under_torch_compile(device):
    x, y = torch.randn(64, 100, device=device).bfloat16(), indices(64, 100, device)
    compiled = torch.compile(fused_softmax.cross_entropy, fullgraph=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert compiled(x, y).dtype == torch.float32
    assert compiled(x, y).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64), (torch.float16, torch.bfloat16)]
)
def test_probability_target_of_another_dtype_gives_torchs_loss_dtype(device, dtypes):
    # torch promotes: bf16 logits with float32 probabilities give a float32 loss (the gradient stays bf16).
    x = (torch.randn(40, 30, device=device) * 2).to(dtypes[0])
    t = torch.softmax(torch.randn(40, 30, device=device), 1).to(dtypes[1])
    for reduction in REDUCTIONS:
        ours, theirs = (fn(x, t, reduction=reduction) for fn in (fused_softmax.cross_entropy, F.cross_entropy))
        assert ours.dtype == theirs.dtype == torch.promote_types(*dtypes)
        exact = F.cross_entropy(x.double(), t.double(), reduction=reduction)
        floor = FLOOR[dtypes[0]] * max(1.0, exact.abs().max().item())  # our sums are in float32 (as the logits)
        assert (ours.double() - exact).abs().max() <= 2 * (theirs.double() - exact).abs().max() + floor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4, 5), (64, 10), (16, 1000), (4, 3000)])  # CUDA: warp and block rows
def test_float32_probabilities_with_16_bit_logits_are_read_at_float32(device, dtype, shape):
    """The kernels read float32 probabilities as they are: the loss of 16-bit logits is then
    float32-accurate against float64 on the same values. Rounded to 16 bits, the probabilities
    cost 4.5e-4 relative at 4 x 5 bf16 (torch 2.6e-5)."""
    x = (torch.randn(shape, device=device) * 2).to(dtype)
    t = torch.softmax(torch.randn(shape, dtype=torch.float64, device=device), 1).float()
    for reduction in REDUCTIONS:
        ours = fused_softmax.cross_entropy(x, t, reduction=reduction)
        exact = F.cross_entropy(x.double(), t.double(), reduction=reduction)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    h, h64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    fused_softmax.cross_entropy(h, t, reduction="sum").backward()
    F.cross_entropy(h64, t.double(), reduction="sum").backward()
    # formed in float32 and rounded once to the logits' dtype: within half an ulp (eps / 2) and a bit
    assert ((h.grad.double() - h64.grad).abs() <= torch.finfo(dtype).eps * h64.grad.abs() + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e4, 3e38])
def test_extreme_logits(device, dtype, scale):
    if dtype == torch.bfloat16 and scale > 1e38:
        scale = 3e38  # bfloat16 also reaches 3e38
    x = (torch.rand(40, 100, device=device) * 2 - 1).double() * scale
    x = x.clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    y = indices(40, 100, device)
    for reduction in REDUCTIONS:
        assert_matches_torch(x, y, reduction=reduction)
        assert_matches_torch(x, y, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [10, 1000])  # the small-C and the row kernels
def test_probabilities_across_the_float_range_elementwise(device, dtype, c):
    """Each probability (the gradient of 'sum' off the target) from 1 down past float32's smallest normal,
    elementwise against float64: within twice torch's own relative error, so the exp may not be cruder
    than torch's anywhere in the range (a max-abs comparison would not see the small ones)."""
    x = (torch.linspace(-100.0, 0.0, c, device=device) + torch.rand(64, 1, device=device)).to(dtype)
    y = torch.zeros(64, dtype=torch.long, device=device)
    exact = torch.softmax(x.double(), 1)
    exact[:, 0] -= 1
    normal = exact.abs() >= torch.finfo(torch.float32).tiny  # below it float32 itself has fewer digits
    errors = []
    for fn in (fused_softmax.cross_entropy, F.cross_entropy):
        h = x.clone().requires_grad_(True)
        fn(h, y, reduction="sum").backward()
        errors.append(((h.grad.double() - exact).abs() / exact.abs())[normal].max().item())
        assert (h.grad.double() - exact)[~normal].abs().max() <= 2 * torch.finfo(torch.float32).tiny
    ours, torchs = errors
    assert ours <= 2 * torchs + torch.finfo(dtype).eps, (ours, torchs)


def test_minus_inf_columns(device):
    x = torch.randn(50, 64, device=device)
    y = indices(50, 64, device)
    mask = torch.rand(50, 64, device=device) < 0.5
    mask[torch.arange(50), y] = False  # never the target
    x = x.masked_fill(mask, float("-inf"))
    for reduction in REDUCTIONS:
        assert_matches_torch(x, y, reduction=reduction)
    x[3, y[3]] = float("-inf")  # -inf at the target: infinite loss, as torch
    assert_matches_torch(x, y, reduction="none")


def test_nan_and_inf_rows_are_confined(device):
    x = torch.randn(6, 20, device=device)
    y = indices(6, 20, device)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    x[3] = float("-inf")
    assert_matches_torch(x, y, reduction="none")
    loss = fused_softmax.cross_entropy(x, y, reduction="none")
    assert loss[[1, 2, 3]].isnan().all() and loss[[0, 4, 5]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_matches_torch_module(device, dtype):
    w = torch.rand(40, device=device) + 0.5
    ours = fused_softmax.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(30, 40, device=device, dtype=dtype)
    y = indices(30, 40, device)
    torch.testing.assert_close(
        ours(x, y).float(),
        theirs(x.float(), y),
        atol=2e-2 if dtype != torch.float32 else 1e-5,
        rtol=1e-2 if dtype != torch.float32 else 1e-5,
    )


def test_module_takes_the_loss_options(device):
    x = torch.randn(30, 40, device=device, requires_grad=True)
    y = indices(30, 40, device)
    options = dict(z_loss=1e-3, softcap=5.0, logit_scale=0.5)
    module = fused_softmax.CrossEntropyLoss(label_smoothing=0.1, **options)
    assert "z_loss=0.001" in repr(module) and "softcap=5.0" in repr(module)
    assert module.state_dict().keys() == torch.nn.CrossEntropyLoss().state_dict().keys()
    expected = fused_softmax.cross_entropy(x, y, label_smoothing=0.1, **options)
    assert torch.equal(module(x, y), expected)
    h = (x * 1).detach().requires_grad_(True)
    logits = h * 1  # a non-leaf, as inplace_backward needs
    fused_softmax.CrossEntropyLoss(inplace_backward=True)(logits, y).backward()
    (grad,) = torch.autograd.grad(fused_softmax.cross_entropy(x, y), x)
    torch.testing.assert_close(h.grad, grad, rtol=0, atol=0)
    with pytest.raises(ValueError, match="CrossEntropyLoss: softcap"):
        fused_softmax.CrossEntropyLoss(softcap=-1.0)


def test_legacy_size_average_and_reduce(device):
    x = torch.randn(10, 5, device=device)
    y = indices(10, 5, device)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            ours = fused_softmax.cross_entropy(x, y, size_average=size_average, reduce=reduce)
        with pytest.warns(UserWarning):
            theirs = F.cross_entropy(x, y, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("linear", [False, True])
def test_targets_and_ignore_index_of_the_types_torch_takes(linear):
    # uint8 class indices and a numpy integer ignore_index, which torch's cross-entropy takes: the same
    # loss and gradients as torch's with int64 indices and a Python int.
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 4, dtype=torch.float64, generator=g)
    w = torch.randn(12, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 12, (6,), generator=g)
    y[1] = y[4]  # two rows ignored

    def expected(h, w):
        return F.cross_entropy(h @ w.T, y, ignore_index=int(y[4]))

    def ours(h, w):
        target, ignore_index = y.to(torch.uint8), np.int64(y[4])
        if linear:
            return fused_softmax.linear_cross_entropy(h, w, target, ignore_index=ignore_index)
        return fused_softmax.cross_entropy(h @ w.T, target, ignore_index=ignore_index)

    def loss_and_grads(fn):
        params = [h.clone().requires_grad_(), w.clone().requires_grad_()]
        loss = fn(*params)
        loss.backward()
        return [loss.detach(), *(p.grad for p in params)]

    for got, wanted in zip(loss_and_grads(ours), loss_and_grads(expected), strict=True):
        torch.testing.assert_close(got, wanted, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("weights", ["negative", "zero_sum", "nan", "inf"])
@pytest.mark.parametrize("classes", [10, 100])  # a vector of rows at a time, and a row at a time on the CPU
@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_class_weights_torch_takes_give_torch_results(weights, classes, probabilities, reduction):
    # torch computes with any class weights: negative ones, ones summing to 0, NaN, inf. So do we, without
    # a host check or a device-side assert: finite weights give torch's results; a NaN or infinite one
    # gives non-finite values exactly where torch's are (inf - inf may be NaN where torch's is inf), the
    # rest as torch's, and an ignored row's gradient is 0 (torch's may be NaN: README, differences).
    g = torch.Generator().manual_seed(classes)
    x = torch.randn(9, classes, dtype=torch.float64, generator=g) * 2
    w = torch.rand(classes, dtype=torch.float64, generator=g) + 0.1
    if probabilities:
        y = torch.softmax(torch.randn(9, classes, dtype=torch.float64, generator=g), 1)
    else:
        y = torch.randint(0, classes, (9,), generator=g)
        y[2] = -100
    if weights == "negative":
        w[::2] *= -1
    elif weights == "zero_sum":  # every target class weighs 0: 'mean' divides by 0
        w[:] = 0.0
    else:
        w[y.argmax(1)[4] if probabilities else y[4]] = float(weights)
    kept = torch.ones(9, classes, dtype=torch.bool) if probabilities else (y != -100)[:, None].expand(9, classes)
    for eps in (0.0, 0.2):
        expected_x, ours_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        expected = F.cross_entropy(expected_x, y, w, reduction=reduction, label_smoothing=eps)
        ours = fused_softmax.cross_entropy(ours_x, y, w, reduction=reduction, label_smoothing=eps)
        cotangent = torch.linspace(-1, 1, expected.numel(), dtype=torch.float64).reshape(expected.shape)
        (expected * cotangent).sum().backward()
        (ours * cotangent).sum().backward()
        results = [(ours, expected), (ours_x.grad[kept], expected_x.grad[kept])]
        assert not ours_x.grad[~kept].any()
        for got, wanted in results:
            if weights in ("negative", "zero_sum"):
                torch.testing.assert_close(got, wanted, rtol=1e-12, atol=1e-12, equal_nan=True)
            else:
                assert torch.equal(got.isfinite(), wanted.isfinite())
                finite = wanted.isfinite()
                torch.testing.assert_close(got[finite], wanted[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_first_backward_gives_the_bits_of_a_recomputed_one(dtype, reduction):
    # On the CPU the forward forms the gradient for grad_output 1, in the logits' dtype. For another
    # grad_output the first backward gives the bits of a recomputed gradient (a second backward through
    # the same graph): a 16-bit gradient is not scaled after its rounding (loss scaling, a loss divided
    # for gradient accumulation: two roundings), nor is another (gradcheck's fast mode reported the last
    # bit's difference as "Backward is not reentrant").
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 300, generator=g) * 3).to(dtype).requires_grad_()
    y = torch.randint(0, 300, (64,), generator=g)
    loss = fused_softmax.cross_entropy(x, y, reduction=reduction)
    cotangent = torch.full_like(loss, 0.37) if reduction != "none" else torch.linspace(0.1, 3.0, 64).to(loss.dtype)
    (first,) = torch.autograd.grad(loss, x, cotangent, retain_graph=True)
    (again,) = torch.autograd.grad(loss, x, cotangent)
    assert torch.equal(first, again)
