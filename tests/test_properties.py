"""Property-based tests (hypothesis): random shapes, dtypes, options, strides and value scales,
against a float64 reference and against torch wherever torch's result is finite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_softmax

pytest.importorskip("hypothesis", reason="hypothesis is not installed here (CI installs it)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Tolerances against float64, relative to the largest magnitude involved.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(0, 40))
    c = draw(st.sampled_from([1, 2, 3, 5, 7, 13, 16, 17, 31, 97, 257, 1031]))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    # Strides and offsets: a wider buffer sliced from a random column, every other row, or transposed.
    layout = draw(st.sampled_from(["contiguous", "offset", "rows", "transposed"]))
    width = c + (3 if layout == "offset" else 0)
    rows = n * (2 if layout == "rows" else 1)
    base = torch.randn(rows, width, generator=g, dtype=torch.float64) * scale
    if layout == "transposed":
        x = base.t().contiguous().t()
    elif layout == "offset":
        x = base[:, 1 : c + 1]
    elif layout == "rows":
        x = base[::2]
    else:
        x = base
    if draw(st.booleans()) and n > 0:  # -inf masks, never on every column of a row
        mask = torch.rand(n, c, generator=g) < 0.3
        mask[:, 0] = False
        x = x.masked_fill(mask, float("-inf"))
    x = x.to(dtype)
    probabilities = draw(st.booleans())
    if probabilities:
        target = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1).to(dtype)
        if x.isinf().any():
            x = x.masked_fill(x.isinf(), -1e3)  # 0 * -inf is NaN for probability targets, as in torch
    else:
        target = torch.randint(0, c, (n,), generator=g)
        ignored = torch.rand(n, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))
        target = target.masked_fill(ignored, -100)
        if x.isinf().any() and n > 0:  # keep every target class finite
            x = x.clone()
            rows_idx = torch.arange(n)[target >= 0]
            x[rows_idx, target[target >= 0]] = 0
    kwargs = {
        "reduction": draw(st.sampled_from(["none", "mean", "sum"])),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1])) if not x.isinf().any() else 0.0,
    }
    if draw(st.booleans()):
        kwargs["weight"] = (torch.rand(c, generator=g, dtype=torch.float64) + 0.1).to(dtype)  # torch wants dtype
    return x, target, kwargs


def _loss_and_grad(fn, x, target, kwargs):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    cotangent = torch.linspace(-1, 1, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss.double() * cotangent).sum().backward()
    return loss.detach().double(), x.grad.double()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_float64_and_torch(problem):
    x, target, kwargs = problem
    ours = _loss_and_grad(fused_softmax.cross_entropy, x, target, kwargs)
    kwargs64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    t64 = target.double() if target.is_floating_point() else target
    exact = _loss_and_grad(F.cross_entropy, x.double(), t64, kwargs64)
    theirs = _loss_and_grad(F.cross_entropy, x, target, kwargs)
    for name, a, ref, b in zip(("loss", "grad"), ours, exact, theirs, strict=True):
        expected = ref.to(x.dtype).double()  # float64's answer in the output dtype (inf where it overflows)
        finite = expected.isfinite()
        assert torch.equal(a[~finite].nan_to_num(), expected[~finite].nan_to_num()), f"{name}: other inf/NaN"
        assert a[finite].isfinite().all(), f"{name}: not finite where float64 is"
        scale = ref[finite].abs().max().item() if finite.any() else 1.0
        tol = TOL[x.dtype] * max(scale, 1.0)
        assert torch.allclose(a[finite], ref[finite], rtol=0, atol=tol), f"{name}: off float64 by more than {tol}"
        torch_finite = b.isfinite() & finite
        assert torch.allclose(a[torch_finite], b[torch_finite], rtol=0, atol=2 * tol), f"{name}: off torch"
