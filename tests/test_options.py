"""The options beyond torch's cross-entropy: z_loss, softcap, logit_scale, return_lse / return_z_loss and
inplace_backward, against the same loss composed from plain torch ops (in float64 and in the input dtype)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches_torch

import fused_softmax


def composed(input, target, z_loss=0.0, softcap=None, logit_scale=1.0, reduction="mean", **kwargs):
    """The options written out in torch ops: the oracle."""
    x = input * logit_scale
    if softcap is not None:
        x = torch.where(x == float("-inf"), x, torch.tanh(x / softcap) * softcap)
    loss = F.cross_entropy(x, target, reduction="none", **kwargs)
    counted = torch.ones_like(loss, dtype=torch.bool)
    if not target.is_floating_point():
        counted = target != kwargs.get("ignore_index", -100)
    lse = torch.logsumexp(x.float() if x.dtype != torch.float64 else x, 1)
    z_part = torch.where(counted, z_loss * lse**2, 0).to(loss.dtype)
    if reduction == "none":
        return loss + z_part
    if reduction == "sum":
        return (loss + z_part).sum()
    # 'mean': the cross-entropy over torch's divisor, the z-loss over the rows not ignored (as Liger-Kernel's)
    w = kwargs.get("weight")
    if target.is_floating_point():
        divisor = target.shape[0]
    else:
        divisor = counted.sum() if w is None else (w[target.clamp(min=0)] * counted).sum()
    return loss.sum() / divisor + z_part.sum() / counted.sum()


OPTIONS = [
    {"z_loss": 1e-3},
    {"z_loss": 0.5},
    {"softcap": 5.0},
    {"softcap": 1.5, "logit_scale": 2.0},
    {"logit_scale": 0.25},
    {"z_loss": 1e-2, "softcap": 3.0, "logit_scale": 1.3, "label_smoothing": 0.1},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("C", [7, 32, 1000, 4099])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options_match_composed_torch(device, options, C, dtype, reduction):
    x = (torch.randn(67, C, dtype=torch.float64) * 4).to(dtype).to(device)
    y = torch.randint(0, C, (67,), device=device)
    y[::9] = -100
    assert_matches_torch(x, y, oracle=composed, reduction=reduction, **options)


def test_mean_z_loss_over_the_rows_kept_with_class_weights(device):
    """'mean' divides the z-loss by the rows not ignored, as Liger-Kernel and flash-attn do, and the
    cross-entropy by the summed weights, as torch does (it was divided by the summed weights too)."""
    x = torch.randn(40, 300, dtype=torch.float64, device=device) * 3
    w = torch.rand(300, dtype=torch.float64, device=device) * 3
    y = torch.randint(0, 300, (40,), device=device)
    y[::7] = -100
    out = fused_softmax.cross_entropy(x, y, weight=w, z_loss=0.1, return_z_loss=True)
    kept = y != -100
    lse = torch.logsumexp(x[kept], 1)
    torch.testing.assert_close(out.z_loss, 0.1 * (lse**2).mean())
    torch.testing.assert_close(out.loss, F.cross_entropy(x, y, weight=w) + out.z_loss)
    h, hw = (
        torch.randn(40, 16, dtype=torch.float64, device=device),
        torch.randn(300, 16, dtype=torch.float64, device=device),
    )
    linear = fused_softmax.linear_cross_entropy(h, hw, y, weight=w, z_loss=0.1, chunk_size=16)
    torch.testing.assert_close(linear, fused_softmax.cross_entropy(F.linear(h, hw), y, weight=w, z_loss=0.1))
    assert_matches_torch(x, y, oracle=composed, weight=w, z_loss=0.1)
    assert_matches_torch(x.float(), y, oracle=composed, weight=w.float(), z_loss=0.1)


@pytest.mark.parametrize("options", OPTIONS[1:4], ids=str)
def test_options_with_weights_and_probabilities(device, options):
    x = torch.randn(40, 300, dtype=torch.float64, device=device) * 3
    w = torch.rand(300, dtype=torch.float64, device=device) + 0.5
    y = torch.randint(0, 300, (40,), device=device)
    assert_matches_torch(x.float(), y, oracle=composed, weight=w.float(), **options)
    p = torch.softmax(torch.randn(40, 300, dtype=torch.float64, device=device), 1)
    assert_matches_torch(x.float(), p.float(), oracle=composed, **options)


def test_gradcheck_through_every_option():
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, -100, 8, 1, 1])
    for reduction in ("none", "mean", "sum"):
        torch.autograd.gradcheck(
            lambda t, reduction=reduction: fused_softmax.cross_entropy(
                t, y, z_loss=0.3, softcap=2.0, logit_scale=1.5, label_smoothing=0.2, reduction=reduction
            ),
            (x,),
        )


def test_return_lse_and_z_loss(device):
    x = torch.randn(33, 500, device=device) * 5
    y = torch.randint(0, 500, (33,), device=device)
    y[4] = -100
    out = fused_softmax.cross_entropy(x, y, z_loss=1e-2, softcap=4.0, return_lse=True, return_z_loss=True)
    capped = torch.tanh(x.double() / 4.0) * 4.0
    lse = torch.logsumexp(capped, 1)
    torch.testing.assert_close(out.lse.double(), lse, rtol=1e-6, atol=1e-6)
    assert out.lse.dtype == torch.float32 and out.lse.shape == (33,)
    counted = y != -100
    torch.testing.assert_close(out.z_loss.double(), (1e-2 * lse[counted] ** 2).mean(), rtol=1e-5, atol=1e-7)
    plain = fused_softmax.cross_entropy(x, y, softcap=4.0)
    torch.testing.assert_close(out.loss - out.z_loss, plain, rtol=1e-5, atol=1e-6)
    assert not out.z_loss.requires_grad and not out.lse.requires_grad
    none = fused_softmax.cross_entropy(x, y, z_loss=1e-2, reduction="none", return_z_loss=True)
    assert none.lse is None and none.z_loss.shape == (33,) and none.z_loss[4] == 0
    unbatched = fused_softmax.cross_entropy(x[0], y[0], return_lse=True)
    assert unbatched.lse.shape == () and unbatched.z_loss is None


def test_softcap_padding_takes_no_mass(device):
    x = torch.randn(8, 50, device=device, dtype=torch.float64)
    padded = torch.cat([x, torch.full((8, 14), float("-inf"), device=device, dtype=torch.float64)], 1)
    y = torch.randint(0, 50, (8,), device=device)
    a = padded.clone().requires_grad_()
    loss = fused_softmax.cross_entropy(a, y, softcap=2.0)
    loss.backward()
    b = x.clone().requires_grad_()
    expected = composed(b, y, softcap=2.0)
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(a.grad[:, :50], b.grad)
    assert torch.equal(a.grad[:, 50:], torch.zeros(8, 14, device=device, dtype=torch.float64))


@pytest.mark.parametrize("bad", [{"z_loss": -1.0}, {"softcap": 0.0}, {"softcap": -2.0}, {"logit_scale": 0.0},
                                 {"logit_scale": float("nan")}, {"z_loss": "1"}])  # fmt: skip
def test_bad_options_name_the_argument(bad):
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        fused_softmax.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), **bad)


def test_ops_reject_bad_options_too():
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    for args, name in (((float("inf"), 0.0, 0.0), "logit_scale"), ((1.0, -1.0, 0.0), "softcap"),
                       ((1.0, 0.0, float("nan")), "z_loss")):  # fmt: skip
        with pytest.raises(RuntimeError, match=name):
            torch.ops.fused_softmax.cross_entropy_fwd(x, y, None, -100, 0.0, 1, *args)


# --- the gradient formed during the forward (CPU autograd) ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradient_formed_in_the_forward_is_the_backward_ops(dtype, reduction):
    """On the CPU autograd's forward also forms the gradient (cross_entropy_fwd_grad); the first
    backward scales it in place, later ones (retain_graph) recompute it with the backward op."""
    n, c = 64, 500
    x = (torch.randn(n, c) * 3).to(dtype)
    y = torch.randint(0, c, (n,))
    y[::7] = -100
    w = torch.rand(c) + 0.5
    options = (1.3, 5.0, 1e-3)  # logit_scale, softcap, z_loss
    kwargs = dict(weight=w, label_smoothing=0.1, reduction=reduction, logit_scale=1.3, softcap=5.0, z_loss=1e-3)
    xr = x.clone().requires_grad_(True)
    with torch.autograd.profiler.profile() as prof:
        loss = fused_softmax.cross_entropy(xr, y, **kwargs)
    assert "fused_softmax::cross_entropy_fwd_grad" in {e.key for e in prof.key_averages()}
    red = ("none", "mean", "sum").index(reduction)
    ops = torch.ops.fused_softmax
    _, stats = ops.cross_entropy_fwd(x, y, w, -100, 0.1, red, *options)
    rtol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float64: 1e-14}[dtype]
    # The formed gradient (unit grad_output: bitwise), then two recomputed ones.
    for k, scale in enumerate((1.0, 2.5, 1.0)):
        cot = torch.full(loss.shape, scale, dtype=loss.dtype)
        if reduction == "none" and k == 0:
            cot = torch.linspace(0.5, 2.0, n, dtype=loss.dtype)  # per row: the in-place scaling
        (grad,) = torch.autograd.grad(loss, xr, cot, retain_graph=True)
        expected = ops.cross_entropy_bwd(cot.float() if dtype != torch.float64 else cot, x, y, w, stats, -100, 0.1,
                                         red, *options)  # fmt: skip
        if scale == 1.0 and (k > 0 or reduction != "none"):
            assert torch.equal(grad, expected), (k, scale)
        else:
            torch.testing.assert_close(grad, expected, rtol=rtol, atol=rtol * expected.abs().max().item() * 1e-3)
    with torch.no_grad():  # no gradient needed: the plain forward
        with torch.autograd.profiler.profile() as prof:
            fused_softmax.cross_entropy(xr, y, **kwargs)
    assert "fused_softmax::cross_entropy_fwd_grad" not in {e.key for e in prof.key_averages()}


def test_forward_with_gradient_op_schema_and_fake_kernel(device):
    x = torch.randn(12, 40, device=device)
    y = torch.randint(0, 40, (12,), device=device)
    ops = torch.ops.fused_softmax
    for reduction in (0, 1, 2):
        args = (x, y, None, -100, 0.1, reduction, 1.5, 3.0, 1e-3)
        torch.library.opcheck(ops.cross_entropy_fwd_grad.default, args)
        # Its gradient is the backward op's for grad_loss = 1 (the CUDA one runs the two kernels).
        loss, stats, grad = ops.cross_entropy_fwd_grad(*args)
        unit = torch.ones_like(loss)
        assert torch.equal(grad, ops.cross_entropy_bwd(unit, x, y, None, stats, -100, 0.1, reduction, 1.5, 3.0, 1e-3))


# --- inplace_backward -----------------------------------------------------------------------------


def logits_from(h: torch.Tensor) -> torch.Tensor:
    """Non-leaf logits, as a model's last layer makes them (mul saves its other operand, not its result)."""
    return h * 1.0


INPLACE_CASES = [
    dict(C=10, dtype=torch.float32),
    dict(C=10, dtype=torch.bfloat16, label_smoothing=0.1),
    dict(C=32000, dtype=torch.float32, z_loss=1e-4),
    dict(C=1000, dtype=torch.bfloat16, softcap=10.0, logit_scale=0.5),
    dict(C=1000, dtype=torch.float64, weighted=True, label_smoothing=0.2),
    dict(C=257, dtype=torch.float32, probabilities=True),
    dict(C=3, dtype=torch.float16),
]


@pytest.mark.parametrize("case", INPLACE_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_inplace_backward_is_the_out_of_place_result(device, case, reduction):
    case = dict(case)
    C, dtype = case.pop("C"), case.pop("dtype")
    N = 37
    x = (torch.randn(N, C, dtype=torch.float64) * 3).to(dtype).to(device)
    if case.pop("probabilities", False):
        y = torch.softmax(torch.randn(N, C, dtype=torch.float64, device=device), 1).to(dtype)
    else:
        y = torch.randint(0, C, (N,), device=device)
        y[::5] = -100
    if case.pop("weighted", False):
        case["weight"] = torch.rand(C, dtype=dtype, device=device) + 0.1
    v = torch.randn(N if reduction == "none" else (), dtype=dtype, device=device)  # grad_output other than 1

    h1 = x.clone().requires_grad_()
    expected = fused_softmax.cross_entropy(logits_from(h1), y, reduction=reduction, **case)
    (expected * v).sum().backward()

    h2 = x.clone().requires_grad_()
    logits = logits_from(h2)
    storage = logits.untyped_storage().data_ptr()
    loss = fused_softmax.cross_entropy(logits, y, reduction=reduction, inplace_backward=True, **case)
    assert torch.equal(loss, expected)
    assert not torch.equal(logits, x)  # overwritten by the gradient
    (loss * v).sum().backward()
    assert logits.untyped_storage().data_ptr() == storage
    # The stored gradient is rounded to the input dtype before it is scaled by v: one more rounding.
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(h2.grad, h1.grad, rtol=tol, atol=tol * h1.grad.abs().max().item())


def test_inplace_backward_with_unit_grad_is_bitwise(device):
    x = torch.randn(64, 5000, device=device)
    y = torch.randint(0, 5000, (64,), device=device)
    h1, h2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused_softmax.cross_entropy(logits_from(h1), y).backward()
    fused_softmax.cross_entropy(logits_from(h2), y, inplace_backward=True).backward()
    assert torch.equal(h1.grad, h2.grad)


def test_inplace_backward_leaves_logits_alone_without_grad(device):
    x = torch.randn(16, 100, device=device)
    y = torch.randint(0, 100, (16,), device=device)
    before = x.clone()
    expected = fused_softmax.cross_entropy(x, y)
    assert torch.equal(fused_softmax.cross_entropy(x, y, inplace_backward=True), expected)
    h = x.clone().requires_grad_()
    with torch.no_grad():
        logits = logits_from(h)
        assert torch.equal(fused_softmax.cross_entropy(logits, y, inplace_backward=True), expected)
    assert torch.equal(x, before) and torch.equal(logits, before)


def test_inplace_backward_misuse_is_refused(device):
    y = torch.randint(0, 100, (16,), device=device)
    h = torch.randn(16, 100, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="input: .*leaf"):
        fused_softmax.cross_entropy(h, y, inplace_backward=True)
    with pytest.raises(ValueError, match="input: .*contiguous"):
        fused_softmax.cross_entropy(logits_from(h).t().contiguous().t(), y, inplace_backward=True)
    with pytest.raises(ValueError, match="input: .*contiguous"):
        fused_softmax.cross_entropy(
            logits_from(h).reshape(4, 4, 100).transpose(1, 2), y.reshape(4, 4), inplace_backward=True
        )
    with pytest.raises(ValueError, match="input: .*view of a larger"):
        fused_softmax.cross_entropy(logits_from(h)[:8], y[:8], inplace_backward=True)
    assert h.grad is None

    # Saved by another node (exp saves its result): autograd's version counter refuses, nothing is corrupted.
    logits = logits_from(h).exp()
    loss = fused_softmax.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()

    # The overwritten logits used again after the loss.
    logits = logits_from(h)
    loss = fused_softmax.cross_entropy(logits, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="overwritten by their gradient"):
        (loss + logits.sum()).backward()

    # A second backward through the same stored gradient.
    loss = fused_softmax.cross_entropy(logits_from(h), y, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()


@pytest.mark.parametrize("layout", ["view", "(C,)", "retain_grad", "retain_grad on a view"])
def test_inplace_backward_on_views_and_retained_logits(device, layout):
    """The language-model call (logits.view(-1, V)), unbatched (C,) logits, and logits with retain_grad():
    each once failed after the logits were overwritten (views; torch's internal assert for retain_grad)."""
    shape = {"view": (2, 3, 11), "(C,)": (11,), "retain_grad": (6, 11), "retain_grad on a view": (2, 3, 11)}[layout]
    x = torch.randn(shape, device=device)
    y = torch.tensor(4, device=device) if layout == "(C,)" else torch.randint(0, 11, (6,), device=device)
    results = []
    for inplace in (False, True):
        h = x.clone().requires_grad_()
        logits = logits_from(h)
        if "retain_grad" in layout:
            logits.retain_grad()
        rows = logits.view(-1, 11) if "view" in layout else logits
        loss = fused_softmax.cross_entropy(rows, y, inplace_backward=inplace)
        (loss * 3.0).backward()
        results.append((loss.detach(), h.grad))
    torch.testing.assert_close(results[1], results[0])


def test_inplace_backward_refuses_a_view_of_a_leaf_before_writing(device):
    h = torch.randn(2, 3, 11, device=device, requires_grad=True)
    before = h.detach().clone()
    with pytest.raises(ValueError, match="input: .*leaf"):
        fused_softmax.cross_entropy(
            h.view(-1, 11), torch.zeros(6, dtype=torch.long, device=device), inplace_backward=True
        )
    assert torch.equal(h.detach(), before)


def test_inplace_backward_on_a_view_compiles(device):
    x = torch.randn(2, 16, 300, device=device)
    y = torch.randint(0, 300, (32,), device=device)

    def loss_of(h, inplace):
        return fused_softmax.cross_entropy((h * 2.0).view(-1, 300), y, inplace_backward=inplace)

    torch._dynamo.reset()
    h1, h2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss_of(h1, False).backward()
    compiled = torch.compile(loss_of, fullgraph=True)(h2, True)
    compiled.backward()
    torch.testing.assert_close(h2.grad, h1.grad)


def test_inplace_op_schema_and_fake_kernel():
    x = torch.randn(12, 40)
    y = torch.randint(0, 40, (12,))
    for reduction in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.fused_softmax.cross_entropy_fwd_inplace.default,
            (x.clone(), y, None, -100, 0.1, reduction, 1.5, 3.0, 1e-3),
            test_utils=("test_schema", "test_faketensor"),
        )
        torch.library.opcheck(
            torch.ops.fused_softmax.cross_entropy_fwd.default, (x, y, None, -100, 0.1, reduction, 1.5, 3.0, 1e-3)
        )


def test_options_and_inplace_compile_fullgraph(device):
    x = torch.randn(32, 300, device=device)
    y = torch.randint(0, 300, (32,), device=device)

    def loss_of(h, inplace):
        return fused_softmax.cross_entropy(h * 2.0, y, z_loss=1e-3, softcap=8.0, inplace_backward=inplace)

    for inplace in (False, True):
        torch._dynamo.reset()
        h1, h2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager = loss_of(h1, inplace)
        eager.backward()
        compiled = torch.compile(loss_of, fullgraph=True)(h2, inplace)
        compiled.backward()
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(h2.grad, h1.grad)


# --- the backward op on a block of classes (fused linear cross-entropy's 16-bit weight gradient) -------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("target_kind", ["indices", "probabilities"])
@pytest.mark.parametrize("options", [(1.0, 0.0, 0.0), (0.7, 5.0, 1e-3)])
def test_backward_of_a_block_of_classes_is_those_columns(device, dtype, target_kind, options):
    n, c = 37, 300
    x = (torch.randn(n, c, device=device) * 3).to(dtype)
    if target_kind == "indices":
        y = torch.randint(0, c, (n,), device=device)
        y[3] = -100
    else:
        y = torch.softmax(torch.randn(n, c, device=device), 1).to(dtype)
    w = torch.rand(c, device=device) + 0.1
    ops = torch.ops.fused_softmax
    for weight, eps in ((None, 0.0), (w, 0.1)):
        _, stats = ops.cross_entropy_fwd(x, y, weight, -100, eps, 0, *options)
        g = torch.rand(n, device=device)
        whole = ops.cross_entropy_bwd(g, x, y, weight, stats, -100, eps, 0, *options)
        for start, stop in ((0, 64), (64, 200), (200, 300), (17, 18)):
            block = x[:, start:stop].contiguous()
            ours = ops.cross_entropy_bwd(g, block, y, weight, stats, -100, eps, 0, *options, start, c)
            # The same per-element arithmetic as the whole row: the same bits (float64's exp is a
            # per-lane library call that the compiler may vectorize differently: a few ulps).
            if dtype == torch.float64:
                torch.testing.assert_close(ours, whole[:, start:stop], rtol=1e-13, atol=1e-18)
            else:
                assert torch.equal(ours, whole[:, start:stop]), (weight is None, start, stop)


@pytest.mark.cpu_kernel  # (its out-of-range target)
def test_backward_of_a_block_of_classes_rejects_a_bad_block():
    x, y = torch.randn(3, 10), torch.tensor([0, 1, 2])
    _, stats = torch.ops.fused_softmax.cross_entropy_fwd(x, y, None, -100, 0.0, 0)
    g = torch.ones(3)
    for start, classes in ((-1, 20), (15, 20), (0, 5)):
        with pytest.raises(RuntimeError, match="class_start, num_classes"):
            torch.ops.fused_softmax.cross_entropy_bwd(g, x, y, None, stats, -100, 0.0, 0, 1.0, 0.0, 0.0, start, classes)
    with pytest.raises(IndexError, match="target: class index 12"):
        torch.ops.fused_softmax.cross_entropy_bwd(g, x, torch.tensor([0, 12, 2]), None, stats, -100, 0.0, 0,
                                                  1.0, 0.0, 0.0, 0, 12)  # fmt: skip
    with pytest.raises(RuntimeError, match="weight: expected a 1-D tensor of 20"):
        torch.ops.fused_softmax.cross_entropy_bwd(g, x, y, torch.ones(10), stats, -100, 0.0, 0, 1.0, 0.0, 0.0, 0, 20)


def test_backward_op_schema_and_fake_kernel():
    x = torch.randn(12, 40)
    y = torch.randint(0, 40, (12,))
    _, stats = torch.ops.fused_softmax.cross_entropy_fwd(x, y, None, -100, 0.1, 0, 1.5, 3.0, 1e-3)
    torch.library.opcheck(
        torch.ops.fused_softmax.cross_entropy_bwd.default,
        (torch.rand(12), x[:, 8:24].contiguous(), y, None, stats, -100, 0.1, 0, 1.5, 3.0, 1e-3, 8, 40),
    )
