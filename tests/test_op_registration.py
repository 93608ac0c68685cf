"""The ops as torch sees them: gradcheck, opcheck, torch.compile, and the pure-PyTorch fallback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fused_softmax
from fused_softmax import reference

OPS = torch.ops.fused_softmax


def _cases(device: str):
    """(input, target, weight, ignore_index, label_smoothing) covering every target kind."""
    x = torch.randn(7, 13, device=device, dtype=torch.float64)
    y = torch.randint(0, 13, (7,), device=device)
    y[2] = -100
    w = torch.rand(13, device=device, dtype=torch.float64) + 0.5
    probs = torch.softmax(torch.randn(7, 13, device=device, dtype=torch.float64), 1)
    y5 = torch.where(y == -100, 5, y)
    return [
        (x, y, None, -100, 0.0),
        (x, y, w, -100, 0.15),
        (x, y5.int(), None, 5, 0.0),
        (x, probs, w, -100, 0.1),
        (x.t().contiguous().t(), probs, None, -100, 0.0),  # column-major input
    ]


@pytest.mark.parametrize("case", range(5))
def test_gradcheck(device, case):
    x, target, weight, ignore_index, smoothing = _cases(device)[case]
    x = x.detach().requires_grad_(True)
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda x, reduction=reduction: fused_softmax.cross_entropy(
                x, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing
            ),
            (x,),
        )


def test_gradcheck_probability_target(device):
    x, target, weight, _, smoothing = _cases(device)[3]
    target = target.detach().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, t: fused_softmax.cross_entropy(x, t, weight, label_smoothing=smoothing),
        (x.detach().requires_grad_(True), target),
    )


def _opcheck_fwd_and_bwd(x, target, weight, ignore_index, smoothing, reduction):
    args = (x, target, weight, ignore_index, smoothing, reduction)
    torch.library.opcheck(OPS.cross_entropy_fwd.default, args)
    loss, stats = OPS.cross_entropy_fwd(*args)
    grad_loss = torch.randn_like(loss)
    bwd_args = (grad_loss, x.detach(), target, weight, stats, ignore_index, smoothing, reduction)
    torch.library.opcheck(OPS.cross_entropy_bwd.default, bwd_args)


@pytest.mark.parametrize("case", range(5))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(device, case, dtype, reduction):
    x, target, weight, ignore_index, smoothing = _cases(device)[case]
    if target.is_floating_point():
        target = target.to(dtype)
    _opcheck_fwd_and_bwd(x.to(dtype).detach().requires_grad_(True), target, weight, ignore_index, smoothing, reduction)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_float32_probabilities_with_bfloat16_logits(device, reduction):
    cases = [case for case in _cases(device) if case[1].is_floating_point()]
    assert cases
    for x, target, weight, ignore_index, smoothing in cases:
        x = x.bfloat16().detach().requires_grad_(True)
        _opcheck_fwd_and_bwd(x, target.float(), weight, ignore_index, smoothing, reduction)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_ops_match_reference_contract(device, reduction):
    for x, target, weight, ignore_index, smoothing in _cases(device):
        args = (x, target, weight, ignore_index, smoothing, reduction)
        loss, stats = OPS.cross_entropy_fwd(*args)
        ref_loss, ref_stats = reference.forward_op(*args)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(stats, ref_stats)
        g = torch.randn_like(loss)
        ours = OPS.cross_entropy_bwd(g, x, target, weight, stats, ignore_index, smoothing, reduction)
        expected = reference.backward_op(g, x, target, weight, stats, ignore_index, smoothing, reduction)
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("probabilities", [False, True])
def test_torch_compile_fullgraph_equals_eager(device, reduction, probabilities):
    torch._dynamo.reset()
    x = torch.randn(33, 100, device=device)
    y = torch.softmax(torch.randn_like(x), 1) if probabilities else torch.randint(0, 100, (33,), device=device)
    w = torch.rand(100, device=device) + 0.5

    def step(x):
        loss = fused_softmax.cross_entropy(x, y, weight=w, reduction=reduction, label_smoothing=0.1)
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    results = []
    for fn in (step, compiled):
        xx = x.clone().requires_grad_(True)
        loss = fn(xx)
        loss.backward()
        results.append((loss.detach(), xx.grad))
    torch.testing.assert_close(results[0], results[1])


def test_torch_compile_inductor_cpu():
    torch._dynamo.reset()
    x = torch.randn(16, 50)
    y = torch.randint(0, 50, (16,))
    compiled = torch.compile(lambda x: fused_softmax.cross_entropy(x * 2, y), fullgraph=True)
    torch.testing.assert_close(compiled(x), F.cross_entropy(x * 2, y))


def test_fallback_without_compiled_kernels_warns_once_and_is_correct(tmp_path):
    """When _C cannot be imported, the package still works and says why."""
    script = textwrap.dedent(
        """
        import sys, warnings
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "fused_softmax._C":
                    raise ImportError("simulated: built for another torch")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fused_softmax
        import torch, torch.nn.functional as F
        msgs = [str(w.message) for w in caught if "fused_softmax" in str(w.message)]
        assert len(msgs) == 1 and "simulated" in msgs[0] and "pip install" in msgs[0], msgs
        assert "fallback" in fused_softmax.backend()["cpu"], fused_softmax.backend()
        x = torch.randn(20, 30, requires_grad=True)
        y = torch.randint(0, 30, (20,))
        y[3] = -100
        w = torch.rand(30)
        for kw in ({}, {"weight": w, "label_smoothing": 0.1}, {"reduction": "none"}):
            ours = fused_softmax.cross_entropy(x, y, **kw)
            theirs = F.cross_entropy(x, y, **kw)
            torch.testing.assert_close(ours, theirs)
            g1, = torch.autograd.grad(ours.sum(), x)
            g2, = torch.autograd.grad(theirs.sum(), x)
            torch.testing.assert_close(g1, g2)
        # The options and the in-place gradient: the fallback against itself without in-place.
        opts = {"z_loss": 1e-2, "softcap": 3.0, "logit_scale": 1.5}
        h1, h2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        a = fused_softmax.cross_entropy(h1 * 1.0, y, **opts)
        b, _, _, predictions = fused_softmax.cross_entropy(
            h2 * 1.0, y, inplace_backward=True, return_predictions=True, **opts
        )
        (2 * a).backward()
        (2 * b).backward()
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(h1.grad, h2.grad)
        assert torch.equal(predictions, x.argmax(1))
        print("fallback ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_a_source_tree_without_the_extension_says_so(tmp_path):
    """`python -m fused_softmax.train` at the repository's root imports the source tree, where pip built
    nothing: the warning must name that cause (it once sent users to rebuild), not a torch mismatch."""
    source = Path(fused_softmax.__file__).parent
    shutil.copytree(source, tmp_path / "fused_softmax", ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    # From tmp_path, `import fused_softmax` finds the copy first (an editable install's finder, which would
    # still find the real _C, is dropped: the case is that of `pip install .`).
    script = textwrap.dedent(
        """
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        import fused_softmax
        print(fused_softmax.__file__, fused_softmax.backend()["cpu"])
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", script], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "fallback" in result.stdout
    assert "source tree" in result.stderr and "fused-softmax-train" in result.stderr, result.stderr
    assert "circular import" not in result.stderr + result.stdout  # Python's guess, which points the wrong way


def test_backend_says_when_no_cuda_device_is_visible(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda = fused_softmax.backend()["cuda"]
    assert cuda.startswith("pure PyTorch fallback") or cuda == "compiled CUDA kernel (no CUDA device visible)"


BAD_OP_CALLS = {
    # name: a call of the forward op (x (4, 10) float32, y (4,) int64), the argument its error names
    "input 3-D": (lambda x, y: OPS.cross_entropy_fwd(x[None], y, None, -100, 0.0, 1), "input"),
    "input integer": (lambda x, y: OPS.cross_entropy_fwd(x.long(), y, None, -100, 0.0, 1), "input"),
    "target rows": (lambda x, y: OPS.cross_entropy_fwd(x, y[:3], None, -100, 0.0, 1), "target"),
    "target dtype": (lambda x, y: OPS.cross_entropy_fwd(x, y.to(torch.int16), None, -100, 0.0, 1), "target"),
    "probabilities shape": (lambda x, y: OPS.cross_entropy_fwd(x, x[:, :5], None, -100, 0.0, 1), "target"),
    "weight size": (lambda x, y: OPS.cross_entropy_fwd(x, y, torch.ones(9), -100, 0.0, 1), "weight"),
    "label_smoothing": (lambda x, y: OPS.cross_entropy_fwd(x, y, None, -100, 1.5, 1), "label_smoothing"),
    "grad_loss shape": (
        lambda x, y: OPS.cross_entropy_bwd(torch.ones(3), x, y, None, torch.zeros(4, 2), -100, 0.0, 0),
        "grad_loss",
    ),
    "stats shape": (
        lambda x, y: OPS.cross_entropy_bwd(torch.ones(4), x, y, None, torch.zeros(4, 3), -100, 0.0, 0),
        "stats",
    ),
}


@pytest.mark.parametrize("name", BAD_OP_CALLS)
def test_fake_kernels_refuse_what_the_ops_refuse(name):
    """Traced (fake tensors, as torch.compile makes them) a bad call fails as in eager, naming the argument;
    the fake kernels once returned shapes for anything."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    call, argument = BAD_OP_CALLS[name]
    with pytest.raises(RuntimeError, match=f"fused_softmax: {argument}"):
        call(torch.randn(4, 10), torch.randint(0, 10, (4,)))  # eager
    with FakeTensorMode(), pytest.raises(RuntimeError, match=f"fused_softmax: {argument}"):
        call(torch.randn(4, 10), torch.randint(0, 10, (4,)))
