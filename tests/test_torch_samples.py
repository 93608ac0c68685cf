"""torch's own test inputs for these losses, run against ours: the OpInfo sample and error inputs of
nn.functional.cross_entropy and nn.functional.linear_cross_entropy (every variant), and the ModuleInfo
inputs of nn.CrossEntropyLoss. Values and gradients match torch's (torch's default tolerances in
float32/float64; in 16 bits at most twice torch's own error against float64, the flash-attention
rule), and ours raise an error of torch's type wherever torch raises one."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import FLOOR
from torch.utils._pytree import tree_flatten, tree_map

import fused_softmax

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

OURS = {
    "nn.functional.cross_entropy": fused_softmax.cross_entropy,
    "nn.functional.linear_cross_entropy": fused_softmax.linear_cross_entropy,  # torch >= 2.14 has its OpInfo
}
OPS = [op for op in common_methods_invocations.op_db if op.name in OURS]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _ids(op) -> str:
    return f"{op.name.split('.')[-1]}-{op.variant_test_name or 'default'}"


def _outputs_and_grads(fn, sample) -> tuple[torch.Tensor, list]:
    """fn's output and the gradients of (output . cotangent) with respect to the sample's tensors that
    require grad (None where one is unused)."""
    out = fn(sample.input, *sample.args, **sample.kwargs)
    leaves = [t for t in tree_flatten((sample.input, sample.args, sample.kwargs))[0] if _needs_grad(t)]
    if not leaves or not out.requires_grad:
        return out.detach(), []
    cot = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    return out.detach(), list(torch.autograd.grad((out * cot).sum(), leaves, allow_unused=True))


def _needs_grad(t) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


def _as_float64(sample):
    """The sample with every floating tensor in float64 (a fresh leaf where the original required grad), and
    without linear_cross_entropy's chunking options (torch's reference path: its chunked one refuses float64
    with a 16-bit sample's acc_dtype)."""

    def widen(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    widened = sample.transform(widen)
    widened.kwargs = {k: v for k, v in widened.kwargs.items() if k != "options"}
    return widened


def _assert_close(ours, theirs, exact, dtype, what):
    if ours is None or theirs is None:
        assert ours is None and theirs is None or _all_zero(ours) and _all_zero(theirs), what
        return
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (what, ours.shape, theirs.shape)
    if dtype in (torch.float64, torch.float32):
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    expected = exact.to(dtype)
    finite = expected.isfinite() & ours.isfinite() & theirs.isfinite()
    assert torch.equal(ours[~finite].nan_to_num(), theirs[~finite].nan_to_num()), f"{what}: other inf/NaN"
    ours_err = (ours.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    torch_err = (theirs.double() - exact)[finite].abs().max().item() if finite.any() else 0.0
    scale = max(1.0, exact[finite].abs().max().item() if finite.any() else 1.0)
    assert ours_err <= 2 * torch_err + FLOOR[dtype] * scale, f"{what}: error {ours_err:.3g}, torch's {torch_err:.3g}"


def _all_zero(t) -> bool:
    return t is None or not t.any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS, ids=_ids)
def test_sample_inputs(op, dtype):
    ours_fn = OURS[op.name]
    count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's chunked variants warn where they fall back
        for sample in op.sample_inputs("cpu", dtype, requires_grad=True):
            count += 1
            what = f"{_ids(op)} {dtype} sample {count}: {sample.summary() if hasattr(sample, 'summary') else sample}"
            try:
                theirs, theirs_grads = _outputs_and_grads(op.op, sample)
            except Exception as error:  # noqa: BLE001  (any error torch raises, ours must raise too)
                with pytest.raises(type(error)):
                    ours_fn(sample.input, *sample.args, **sample.kwargs)
                continue
            ours, ours_grads = _outputs_and_grads(ours_fn, sample)
            exact = exact_grads = None
            if dtype in (torch.bfloat16, torch.float16):
                exact, exact_grads = _outputs_and_grads(op.op, _as_float64(sample))
            _assert_close(ours, theirs, exact, dtype, what + " (value)")
            for i, (a, b) in enumerate(zip(ours_grads, theirs_grads, strict=True)):
                _assert_close(a, b, None if exact_grads is None else exact_grads[i], dtype, f"{what} (grad {i})")
    assert count > 0


@pytest.mark.parametrize("op", [op for op in OPS if op.error_inputs_func is not None], ids=_ids)
def test_error_inputs(op):
    ours_fn = OURS[op.name]
    for error_input in op.error_inputs("cpu"):
        sample = error_input.sample_input
        with pytest.raises(error_input.error_type):
            ours_fn(sample.input, *sample.args, **sample.kwargs)


MODULES = [m for m in common_modules.module_db if m.module_cls is torch.nn.CrossEntropyLoss]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("module_info", MODULES, ids=lambda m: m.name)
def test_module_inputs(module_info, dtype):
    inputs = module_info.module_inputs_func(module_info, device="cpu", dtype=dtype, requires_grad=True, training=True)
    for i, module_input in enumerate(inputs):
        if module_input.forward_input is None:
            continue
        ctor, fwd = module_input.constructor_input, module_input.forward_input
        results = []
        for cls in (torch.nn.CrossEntropyLoss, fused_softmax.CrossEntropyLoss):
            module = cls(*ctor.args, **ctor.kwargs)
            args = tree_map(lambda t: t.detach().requires_grad_(t.requires_grad) if _needs_grad(t) else t, fwd.args)
            out = module(*args, **fwd.kwargs)
            leaves = [t for t in tree_flatten(args)[0] if _needs_grad(t)]
            grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True) if out.requires_grad else ()
            results.append((out.detach(), grads))
        (theirs, theirs_grads), (ours, ours_grads) = results
        what = f"module input {i}: {ctor.kwargs} {[getattr(a, 'shape', a) for a in fwd.args]}"
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m, what=what: f"{what}: {m}")
        for a, b in zip(ours_grads, theirs_grads, strict=True):
            torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, what=what: f"{what} (grad): {m}")
