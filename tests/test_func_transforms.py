"""torch.func (grad, vjp, jacrev, vmap, jvp, jacfwd) and forward-mode AD over the losses, as over torch's own:
the compiled ops have no functorch or forward-AD rules, so these go through the same math in torch ops."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import fused_softmax

N, C = 5, 7
G = torch.Generator().manual_seed(0)
X = torch.randn(N, C, dtype=torch.float64, generator=G)
INDICES = torch.tensor([1, 0, -100, 6, 3])
PROBABILITIES = torch.softmax(torch.randn(N, C, dtype=torch.float64, generator=G), 1)
TANGENT = torch.randn(N, C, dtype=torch.float64, generator=G)
CASES = {
    "indices": (INDICES, {}),
    "indices, smoothing, weight": (INDICES, {"label_smoothing": 0.1, "weight": torch.rand(C, dtype=torch.float64)}),
    "probabilities, none": (PROBABILITIES, {"reduction": "none"}),
}
TRANSFORMS = {
    "grad": lambda f: grad(lambda x: f(x).sum())(X),
    "vjp": lambda f: vjp(f, X)[1](torch.ones_like(f(X)))[0],
    "jacrev": lambda f: jacrev(f)(X),
    "jvp": lambda f: jvp(f, (X,), (TANGENT,))[1],
    "jacfwd": lambda f: jacfwd(f)(X),
}


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("case", CASES)
def test_transforms_match_torch(transform, case):
    target, options = CASES[case]
    ours = TRANSFORMS[transform](lambda x: fused_softmax.cross_entropy(x, target, **options))
    theirs = TRANSFORMS[transform](lambda x: F.cross_entropy(x, target, **options))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_per_sample_gradients_with_vmap():
    """vmap(grad(...)) over samples, the per-sample-gradient recipe: (C,) logits and a 0-d target each."""
    target = INDICES.clamp(min=0)
    per_sample = [
        vmap(grad(lambda x, t, ce=ce: ce(x, t, label_smoothing=0.1)))(X, target)
        for ce in (fused_softmax.cross_entropy, F.cross_entropy)
    ]
    torch.testing.assert_close(*per_sample, rtol=1e-12, atol=1e-14)


def test_forward_ad_dual_tensors():
    tangents = []
    for ce in (fused_softmax.cross_entropy, F.cross_entropy):
        with fwAD.dual_level():
            loss = ce(fwAD.make_dual(X, TANGENT), INDICES, reduction="none")
            tangents.append(fwAD.unpack_dual(loss).tangent)
    torch.testing.assert_close(*tangents, rtol=1e-12, atol=1e-14)


def test_linear_cross_entropy_under_grad_and_vmap():
    h = torch.randn(N, 4, dtype=torch.float64, generator=G)
    w = torch.randn(C, 4, dtype=torch.float64, generator=G)

    def via_logits(h, w, t):
        return F.cross_entropy(F.linear(h, w), t)

    ours = grad(lambda w: fused_softmax.linear_cross_entropy(h, w, INDICES))(w)
    theirs = grad(lambda w: via_logits(h, w, INDICES))(w)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    target = INDICES.clamp(min=0)
    ours = vmap(grad(lambda w, h, t: fused_softmax.linear_cross_entropy(h, w, t)), in_dims=(None, 0, 0))(w, h, target)
    theirs = vmap(grad(lambda w, h, t: via_logits(h, w, t)), in_dims=(None, 0, 0))(w, h, target)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
