"""Predictions (each row's argmax) from the fused losses: cross_entropy (in-place too) and
linear_cross_entropy, against torch.argmax of the logits: ties to the first class, NaN above all.
(The vocab-parallel loss's: tests/test_distributed.py.)"""

from __future__ import annotations

import pytest
import torch

import fused_softmax

OPS = torch.ops.fused_softmax
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Small C (the CPU's lane-per-row path), a warp's and a block's rows on CUDA, several argmax chunks of
# the CPU's row path (512 classes), a single class.
SHAPES = [(37, 10), (40, 32), (9, 33), (6, 1000), (3, 5000), (4, 1)]


def awkward_logits(n: int, c: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Random logits with the rows that can go wrong: all -inf, NaNs (two), a tie for the max far apart, a
    tie in the first chunk's max beaten later, +inf."""
    x = torch.randn(n, c, device=device).to(dtype)
    if c > 3 and n >= 5:
        x[0] = float("-inf")
        x[1, 2] = x[1, c - 1] = float("nan")
        x[2, c // 3] = x[2, c - 1] = 50
        x[3, 0] = 20
        x[3, c - 2] = 30
        x[4, c // 2] = float("inf")
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy_predictions_are_torch_argmax(device, shape, dtype):
    x = awkward_logits(*shape, dtype, device)
    target = torch.randint(0, shape[1], shape[:1], device=device)
    out = fused_softmax.cross_entropy(x, target, return_predictions=True, reduction="none")
    assert out.predictions.dtype == torch.long
    assert torch.equal(out.predictions, x.argmax(1))
    # The losses are the ones computed without predictions, bit for bit.
    torch.testing.assert_close(
        out.loss, fused_softmax.cross_entropy(x, target, reduction="none"), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"logit_scale": 0.5, "label_smoothing": 0.1}])
@pytest.mark.parametrize("shape", [(37, 10), (6, 1000)])
def test_predictions_with_a_gradient_and_in_place(device, shape, options):
    """The forward that forms the gradient (autograd, CPU) and the in-place one find them too; the
    in-place one before it overwrites the logits."""
    x = awkward_logits(*shape, torch.float32, device)[5:]  # rows without NaN: gradients to compare
    target = torch.randint(0, shape[1], (x.shape[0],), device=device)
    expected = x.argmax(1)
    leaf = x.clone().requires_grad_(True)
    out = fused_softmax.cross_entropy(leaf, target, return_predictions=True, **options)
    out.loss.backward()
    assert torch.equal(out.predictions, expected)
    inplace_leaf = x.clone().requires_grad_(True)
    logits = inplace_leaf * 1
    out = fused_softmax.cross_entropy(logits, target, return_predictions=True, inplace_backward=True, **options)
    out.loss.backward()
    assert torch.equal(out.predictions, expected)
    torch.testing.assert_close(inplace_leaf.grad, leaf.grad)


def test_predictions_take_the_losses_layouts(device):
    """(C,), (N, C, d1, d2) and probability targets: shaped as a 'none' loss."""
    x = torch.randn(3, 7, 4, 5, device=device)
    target = torch.randint(0, 7, (3, 4, 5), device=device)
    out = fused_softmax.cross_entropy(x, target, return_predictions=True)
    assert torch.equal(out.predictions, x.argmax(1))
    probabilities = torch.softmax(torch.randn_like(x), 1)
    assert torch.equal(fused_softmax.cross_entropy(x, probabilities, return_predictions=True).predictions, x.argmax(1))
    v = torch.randn(11, device=device)
    assert torch.equal(fused_softmax.cross_entropy(v, torch.tensor(3, device=device), return_predictions=True)
                       .predictions, v.argmax())  # fmt: skip


def test_predictions_with_no_classes_raise_as_argmax():
    with pytest.raises(IndexError, match="return_predictions"):
        fused_softmax.cross_entropy(torch.randn(2, 0), torch.tensor([-100, -100]), return_predictions=True)
    with pytest.raises(IndexError):  # torch's own
        torch.randn(2, 0).argmax(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_linear_cross_entropy_predictions(device, dtype, chunk_size):
    """Every chunk's rows, without the logits ever existing whole."""
    h = torch.randn(50, 16, device=device, dtype=dtype)
    w = torch.randn(300, 16, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 300, (50,), device=device)
    out = fused_softmax.linear_cross_entropy(h, w, target, chunk_size=chunk_size, return_predictions=True)
    out.loss.backward()
    logits = torch.nn.functional.linear(h, w.detach())
    assert torch.equal(out.predictions, logits.argmax(1))
    ref = fused_softmax.linear_cross_entropy(h, w.detach(), target, chunk_size=chunk_size)
    assert torch.equal(out.loss.detach(), ref)


def test_linear_cross_entropy_predictions_on_the_reference_path():
    """A K-dimensional weight takes torch's reference path: predictions still come."""
    h = torch.randn(6, 8)
    w = torch.randn(5, 3, 8)
    target = torch.randint(0, 5, (6, 3))
    out = fused_softmax.linear_cross_entropy(h, w, target, return_predictions=True)
    assert torch.equal(out.predictions, torch.einsum("nh,cdh->ncd", h, w).argmax(1))


@pytest.mark.parametrize("name", ["cross_entropy_fwd", "cross_entropy_fwd_inplace", "cross_entropy_fwd_grad"])
def test_opcheck_with_predictions(device, name):
    """The ops' predictions output as torch.library sees it (schema, fake kernel, autograd, mutation)."""
    x = torch.randn(9, 40, device=device, requires_grad=name != "cross_entropy_fwd_inplace")
    target = torch.randint(0, 40, (9,), device=device)
    predictions = torch.empty(9, dtype=torch.long, device=device)
    args = (x.detach().clone() if name == "cross_entropy_fwd_inplace" else x, target, None, -100, 0.0, 1)
    torch.library.opcheck(getattr(OPS, name).default, (*args, 1.0, 0.0, 0.0, predictions))  # on copies
    getattr(OPS, name)(*args, predictions=predictions)
    assert torch.equal(predictions, x.argmax(1))


@pytest.mark.parametrize("bad", ["dtype", "shape", "strided"])
def test_ops_refuse_bad_predictions(bad):
    x, target = torch.randn(4, 5), torch.randint(0, 5, (4,))
    predictions = {
        "dtype": torch.empty(4, dtype=torch.int32),
        "shape": torch.empty(5, dtype=torch.long),
        "strided": torch.empty(8, dtype=torch.long)[::2],
    }[bad]
    with pytest.raises(RuntimeError, match="predictions: expected a contiguous int64 tensor of shape \\[4\\]"):
        OPS.cross_entropy_fwd(x, target, None, -100, 0.0, 1, predictions=predictions)


def test_torch_compile_with_predictions(device):
    torch._dynamo.reset()
    x = torch.randn(12, 30, device=device)
    target = torch.randint(0, 30, (12,), device=device)

    def step(x):
        out = fused_softmax.cross_entropy(x, target, return_predictions=True)
        return out.loss, (out.predictions == target).float().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), step(x))
    assert torch.equal(step(x)[1], (x.argmax(1) == target).float().mean())


def test_predictions_under_torch_func():
    """vmap and grad see the reference math (README): the predictions come out of it, batched."""
    x = torch.randn(3, 5, 8)
    target = torch.randint(0, 8, (5,))
    found = torch.func.vmap(lambda r: fused_softmax.cross_entropy(r, target, return_predictions=True).predictions)(x)
    assert torch.equal(found, x.argmax(2))
    grad, predictions = torch.func.grad(
        lambda r: (lambda out: (out.loss, out.predictions))(
            fused_softmax.cross_entropy(r, target, return_predictions=True)
        ),
        has_aux=True,
    )(x[0])
    assert torch.equal(predictions, x[0].argmax(1))
    torch.testing.assert_close(grad, torch.func.grad(lambda r: torch.nn.functional.cross_entropy(r, target))(x[0]))
