"""Shared oracles: torch's own cross-entropy in float64 and in the input's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fused_softmax

# Our error against float64 may be at most this much above torch's own (the flash-attention rule),
# plus a small absolute floor per dtype for values torch happens to get exactly.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def loss_and_grad(fn, input: torch.Tensor, target: torch.Tensor, **kwargs):
    """fn's loss and d(loss . v)/d input for a fixed random cotangent v."""
    x = input.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    v = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (loss.double() * v.to(loss.device)).sum().backward()
    return loss.detach(), x.grad


def _max_abs(t: torch.Tensor, default: float = 0.0) -> float:
    """Largest magnitude in t, or default when t is empty."""
    return t.abs().max().item() if t.numel() else default


def _as64(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def assert_matches_torch(
    input: torch.Tensor, target: torch.Tensor, ours=fused_softmax.cross_entropy, oracle=F.cross_entropy, **kwargs
) -> None:
    """Loss and gradient agree with torch's float64 result, within twice torch's own error in input's dtype.
    oracle: the same loss in plain torch (torch's cross-entropy unless the options need more)."""
    ours = loss_and_grad(ours, input, target, **kwargs)
    theirs = loss_and_grad(oracle, input, target, **kwargs)
    kwargs64 = {k: _as64(v) for k, v in kwargs.items()}
    exact = loss_and_grad(oracle, input.double(), _as64(target), **kwargs64)
    for name, a, b, ref in zip(("loss", "grad"), ours, theirs, exact, strict=True):
        assert a.dtype == b.dtype == input.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        # Where the float64 result is not finite in input's dtype (NaN rows, overflow), ours is the same
        # value; elsewhere ours is finite, except where torch overflows too (then ours is finite or torch's).
        expected = ref.to(input.dtype)
        finite = expected.isfinite()
        assert torch.equal(a[~finite].nan_to_num(), expected[~finite].nan_to_num()), f"{name}: other inf/NaN"
        overflow = finite & ~a.isfinite()
        assert torch.equal(a[overflow], b[overflow]), f"{name}: not finite where float64 and torch are finite"
        finite &= a.isfinite()
        ours_err = _max_abs((a.double() - ref)[finite])
        torch_err = _max_abs((b.double() - ref)[finite & b.isfinite()])
        scale = _max_abs(ref[finite], default=1.0)
        bound = 2 * torch_err + FLOOR[input.dtype] * max(1.0, scale)
        assert ours_err <= bound, f"{name}: error {ours_err:.3g} vs torch's {torch_err:.3g} (bound {bound:.3g})"
