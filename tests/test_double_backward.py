"""Second derivatives (backward with create_graph=True): gradient penalties and gradgradcheck, as
torch's F.cross_entropy gives them; the one option that cannot (inplace_backward) refuses them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_softmax

N, C, H = 5, 7, 4
TARGET = torch.tensor([1, 0, -100, 6, 3])

OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.2},
    {"weight": "random"},
    {"softcap": 2.0, "logit_scale": 0.7, "z_loss": 0.1},
]


def _resolve(options: dict) -> dict:
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = torch.rand(C, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    return options


def _logits(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(N, C, dtype=dtype, generator=torch.Generator().manual_seed(0)).requires_grad_()


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_gradgradcheck_class_indices(options):
    options = _resolve(options)
    assert torch.autograd.gradgradcheck(lambda x: fused_softmax.cross_entropy(x, TARGET, **options), (_logits(),))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck_probabilities_and_their_gradient(reduction):
    t = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1).requires_grad_()
    fn = lambda x, t: fused_softmax.cross_entropy(x, t, label_smoothing=0.2, reduction=reduction)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (_logits(), t))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradgradcheck_linear(reduction):
    g = torch.Generator().manual_seed(1)
    h, w, b = (torch.randn(*s, dtype=torch.float64, generator=g).requires_grad_() for s in ((N, H), (C, H), (C,)))

    def fn(h, w, b):
        return fused_softmax.linear_cross_entropy(h, w, TARGET, linear_bias=b, reduction=reduction, chunk_size=2)

    assert torch.autograd.gradgradcheck(fn, (h, w, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS[:5], ids=str)
def test_gradient_penalty_matches_torch(options, dtype):
    """loss + |d loss / d logits|^2, the gradient penalty: its gradient is torch's. The old backward returned
    a gradient without a graph, so the penalty's part was silently dropped."""
    options = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in _resolve(options).items()}
    results = []
    for loss_fn in (fused_softmax.cross_entropy, F.cross_entropy):
        x = _logits(dtype)
        loss = loss_fn(x, TARGET, **options).sum()
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        assert g.requires_grad
        (loss + g.pow(2).sum()).backward()
        results.append(x.grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(*results, rtol=tol, atol=tol)


def test_all_ignored_mean_has_zero_second_derivatives():
    x = _logits()
    (g,) = torch.autograd.grad(fused_softmax.cross_entropy(x, torch.full((N,), -100)), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert torch.equal(g, torch.zeros_like(g)) and torch.equal(h, torch.zeros_like(h))


def test_inplace_backward_refuses_create_graph():
    x = _logits()
    logits = x * 1
    loss = fused_softmax.cross_entropy(logits, TARGET, inplace_backward=True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)
