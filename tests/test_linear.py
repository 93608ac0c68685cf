"""fused_softmax.linear_cross_entropy against torch's reference (linear, then cross_entropy) in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_softmax


def reference(x, w, target, b=None, **kwargs):
    return F.cross_entropy(F.linear(x, w, b), target, **kwargs)


def grads(fn, x, w, b, target, **kwargs):
    params = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b)]
    loss = fn(
        params[0],
        params[1],
        target,
        **({"linear_bias": params[2]} if fn is not reference else {"b": params[2]}),
        **kwargs,
    )
    cot = torch.linspace(-1, 1, loss.numel(), dtype=torch.float64, device=loss.device).reshape(loss.shape)
    (loss.double() * cot).sum().backward()
    return [loss.detach()] + [p.grad for p in params if p is not None]


def problem(device, n=37, h=16, c=50, dtype=torch.float64, probabilities=False):
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = torch.randn(n, h, generator=g, dtype=torch.float64).to(device, dtype)
    w = (torch.randn(c, h, generator=g, dtype=torch.float64) / h**0.5).to(device, dtype)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device, dtype)
    if probabilities:
        t = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), 1).to(device, dtype)
    else:
        t = torch.randint(0, c, (n,), generator=g).to(device)
        t[::5] = -100
    return x, w, b, t


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 7, 37, 1000])
@pytest.mark.parametrize("probabilities", [False, True])
def test_matches_reference(device, reduction, chunk_size, probabilities):
    x, w, b, t = problem(device, probabilities=probabilities)
    cw = torch.rand(w.shape[0], dtype=torch.float64, device=device) + 0.5
    kwargs = dict(reduction=reduction, weight=cw, label_smoothing=0.1)
    ours = grads(fused_softmax.linear_cross_entropy, x, w, b, t, chunk_size=chunk_size, **kwargs)
    theirs = grads(reference, x, w, b, t, **kwargs)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def fused_on_logits(x, w, target, b=None, **kwargs):
    return fused_softmax.cross_entropy(F.linear(x, w, b), target, **kwargs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("chunk_size", [5, 1000])
def test_options_match_cross_entropy_on_the_logits(device, reduction, chunk_size):
    x, w, b, t = problem(device)
    kwargs = dict(reduction=reduction, z_loss=1e-2, softcap=3.0, logit_scale=1.5, label_smoothing=0.1)
    ours = grads(fused_softmax.linear_cross_entropy, x, w, b, t, chunk_size=chunk_size, **kwargs)
    theirs = grads(lambda x, w, t, linear_bias, **kw: fused_on_logits(x, w, t, linear_bias, **kw), x, w, b, t, **kwargs)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("unbatched", [False, True])
def test_return_lse_and_z_loss_as_cross_entropy_on_the_logits(device, reduction, unbatched):
    x, w, b, t = problem(device)
    x = x.detach().requires_grad_()
    if unbatched:
        x, t = x[0], t[0]
    kwargs = dict(reduction=reduction, z_loss=1e-2, softcap=3.0, return_lse=True, return_z_loss=True)
    ours = fused_softmax.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=5, **kwargs)
    theirs = fused_on_logits(x, w, t, b, **kwargs)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, equal_nan=True)  # unbatched: an ignored row
    ours.loss.sum().backward()  # the loss trains as without the extras


def torch_linear_cross_entropy(x, w, target, linear_bias=None, **kwargs):
    """torch's F.linear_cross_entropy as its reference path computes it (torch < 2.14 has none): the logits
    of a (C, d1, ..., in_features) weight, then F.cross_entropy."""
    b = None if linear_bias is None else linear_bias.flatten()
    logits = F.linear(x, w.flatten(0, -2), b).unflatten(-1, w.shape[:-1])
    return F.cross_entropy(logits, target, **kwargs)


@pytest.mark.parametrize("bias", [False, True])
def test_k_dimensional_linear_weight_as_torch(device, bias):
    """linear_weight (C, d1, in_features) and linear_bias (C, d1): the K-dimensional loss, as torch's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g).to(device)
    w = torch.randn(7, 3, 4, dtype=torch.float64, generator=g).to(device)
    b = torch.randn(7, 3, dtype=torch.float64, generator=g).to(device) if bias else None
    t = torch.randint(0, 7, (6, 3), generator=g).to(device)
    ours = grads(fused_softmax.linear_cross_entropy, x, w, b, t, label_smoothing=0.1)
    theirs = grads(torch_linear_cross_entropy, x, w, b, t, label_smoothing=0.1)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_probability_target_gradients(device):
    x, w, b, t = problem(device, probabilities=True)
    results = []
    for loss_fn in (fused_softmax.linear_cross_entropy, torch_linear_cross_entropy):
        target = t.clone().requires_grad_()
        loss_fn(x, w, target, linear_bias=b, label_smoothing=0.1).backward()
        results.append(target.grad)
    torch.testing.assert_close(*results, rtol=1e-10, atol=1e-12)


def test_no_bias_unbatched_and_ignore_index(device):
    x, w, _, t = problem(device)
    t = torch.where(t == -100, 3, t)
    ours = grads(fused_softmax.linear_cross_entropy, x, w, None, t, ignore_index=3)
    theirs = grads(reference, x, w, None, t, ignore_index=3)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e)
    one = fused_softmax.linear_cross_entropy(x[0], w, t[1], reduction="none")
    torch.testing.assert_close(one, reference(x[0], w, t[1], reduction="none"))


def assert_within_twice_the_error(ours, theirs, exact, floor):
    for name, a, o, e in zip(("loss", "input", "weight", "bias"), ours, theirs, exact, strict=True):
        ours_err = (a.double() - e).abs().max().item()
        baseline_err = (o.double() - e).abs().max().item()
        assert ours_err <= 2 * baseline_err + floor * max(1.0, e.abs().max().item()), (name, ours_err, baseline_err)


# 16-bit weights take the class-block path for their gradient (the backward op on blocks of columns).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_low_precision_within_twice_torch_error(device, dtype, reduction, probabilities):
    x, w, b, t = problem(device, n=256, h=64, c=1000, probabilities=probabilities)
    cw = (torch.rand(w.shape[0], dtype=torch.float64, device=device) + 0.5).to(dtype)
    low_t = t.to(dtype) if probabilities else t
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    exact = grads(reference, x, w, b, low_t.double() if probabilities else t, weight=cw.double(), **kwargs)
    low = [v.to(dtype) for v in (x, w, b)]
    ours = grads(fused_softmax.linear_cross_entropy, *low, low_t, weight=cw, chunk_size=100, **kwargs)
    theirs = grads(reference, *low, low_t, weight=cw, **kwargs)
    assert_within_twice_the_error(ours, theirs, exact, 1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_low_precision_options_within_twice_the_unchunked_error(device, reduction):
    # No torch equivalent of the options: the baseline is the fused op on the whole bf16 logits.
    x, w, b, t = problem(device, n=256, h=64, c=1000)
    kwargs = dict(reduction=reduction, z_loss=1e-2, softcap=3.0, logit_scale=1.5)
    on_logits = lambda x, w, t, linear_bias, **kw: fused_on_logits(x, w, t, linear_bias, **kw)  # noqa: E731
    exact = grads(on_logits, x, w, b, t, **kwargs)
    low = [v.to(torch.bfloat16) for v in (x, w, b)]
    ours = grads(fused_softmax.linear_cross_entropy, *low, t, chunk_size=100, **kwargs)
    theirs = grads(on_logits, *low, t, **kwargs)
    assert_within_twice_the_error(ours, theirs, exact, 1e-3)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_autocast_matmuls_in_its_dtype_loss_in_float32(device, param_dtype, reduction):
    # What torch.autocast makes of linear + cross_entropy: the matmuls in bfloat16, the loss in
    # float32, each gradient in its parameter's dtype.
    x, w, b, t = problem(device, n=256, h=64, c=1000)
    params = [v.to(param_dtype) for v in (x, w, b)]

    def run(fn):
        leaves = [p.clone().requires_grad_(True) for p in params]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fn(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction)
        (loss.double() * torch.linspace(-1, 1, loss.numel(), dtype=torch.float64, device=device)).sum().backward()
        return [loss.detach()] + [p.grad for p in leaves]

    ours = run(lambda *a, **kw: fused_softmax.linear_cross_entropy(*a, chunk_size=100, **kw))
    theirs = run(lambda x, w, t, linear_bias, **kw: F.cross_entropy(F.linear(x, w, linear_bias), t, **kw))
    assert [v.dtype for v in ours] == [v.dtype for v in theirs] == [torch.float32] + [param_dtype] * 3
    exact = grads(reference, *(v.to(torch.bfloat16).double() for v in (x, w, b)), t, reduction=reduction)
    assert_within_twice_the_error(ours, theirs, exact, 1e-3)


def test_gradcheck(device):
    x, w, b, t = problem(device, n=6, h=3, c=5)
    inputs = tuple(v.detach().requires_grad_(True) for v in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: fused_softmax.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=4, label_smoothing=0.2),
        inputs,
    )


def test_torch_compile_fullgraph_equals_eager(device):
    torch._dynamo.reset()
    x, w, b, t = problem(device, dtype=torch.float32)

    def step(x, w, b):
        return fused_softmax.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        params = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
        loss = fn(*params)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in params])
    torch.testing.assert_close(results[0], results[1])


def test_torch_compile_fullgraph_under_autocast(device):
    torch._dynamo.reset()
    x, w, b, t = problem(device, dtype=torch.float32)
    compiled = torch.compile(
        lambda x, w, b: fused_softmax.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16),
        fullgraph=True,
        backend="aot_eager",
    )
    results = []
    for fn in (lambda x, w, b: fused_softmax.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=16), compiled):
        params = [v.detach().clone().requires_grad_(True) for v in (x, w, b)]
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = fn(*params)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in params])
    assert results[1][0].dtype == torch.float32 and results[1][2].dtype == torch.float32
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize(
    "call,words",
    [
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x[:, :3], w, t), ["input", "(N, 16)", "(37, 3)"]),
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x, w[0], t), ["linear_weight", "(C, in_features)"]),
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t[:5]), ["target", "37 rows"]),
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t, linear_bias=w[0]), ["linear_bias", "(50,)"]),
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t, chunk_size=0), ["chunk_size"]),
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t, reduction="avg"), ["reduction"]),
        (lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t.clamp(0) + 50), ["target", "out of range"]),
        (
            lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t, weight=torch.ones(50).requires_grad_()),
            ["weight", "not supported"],
        ),
    ],
)
def test_bad_inputs(call, words):
    x, w, _, t = problem("cpu")
    with pytest.raises((ValueError, RuntimeError, IndexError)) as info:
        call(x, w, t)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_backward_twice_through_one_graph():
    x, w, b, t = problem("cpu")
    x.requires_grad_(True)
    loss = fused_softmax.linear_cross_entropy(x, w, t, linear_bias=b)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    (g3,) = torch.autograd.grad(loss * 3, x, retain_graph=True)
    (g1_again,) = torch.autograd.grad(loss, x, retain_graph=True)
    torch.testing.assert_close(g3, 3 * g1, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g1_again, g1, rtol=1e-12, atol=1e-15)
    (zero,) = torch.autograd.grad(loss * 0, x, retain_graph=True)
    assert not zero.any()
    torch.testing.assert_close(torch.autograd.grad(loss, x)[0], g1, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_mean_over_an_all_padding_batch_has_zero_gradients(device, dtype, weighted):
    # Every target ignored: torch's 'mean' loss is NaN (0 / 0) but its gradients are 0, so one such
    # micro-batch leaves the weights as they were. Both our backward paths: the gradient formed in the
    # forward (first backward) and the recomputed one (a second backward through the same graph).
    x, w, b, _ = problem(device, dtype=dtype)
    t = torch.full((x.shape[0],), -100, device=device)
    weight = torch.rand(w.shape[0], device=device, dtype=dtype) if weighted else None
    expected = grads(reference, x, w, b, t, weight=weight)
    params = [p.detach().clone().requires_grad_(True) for p in (x, w, b)]
    loss = fused_softmax.linear_cross_entropy(params[0], params[1], t, linear_bias=params[2], weight=weight)
    assert loss.isnan() and expected[0].isnan()
    first = torch.autograd.grad(loss, params, retain_graph=True)
    again = torch.autograd.grad(loss, params)
    for ours, theirs in zip((*first, *again), expected[1:] * 2, strict=True):
        assert not ours.isnan().any()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
