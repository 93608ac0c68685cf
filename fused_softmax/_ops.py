"""The compiled ops, their torch.library registrations, and the fallback.

torch.ops.fused_softmax.cross_entropy_fwd / _bwd / _fwd_inplace / _fwd_grad are defined in
csrc/register.cpp; the dispatcher runs the CPU or CUDA kernel, and the
forward's autograd is registered in C++ (csrc/cross_entropy_autograd.cpp). Here
they get fake kernels (shapes only, so torch.compile can trace them). If the
extension cannot be loaded, the same math runs in plain PyTorch
(fused_softmax.reference) and one warning says why.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.autograd import forward_ad

from . import reference
from ._shared import REDUCTIONS, accumulate_dtype, transform

try:
    from . import _C  # loading it registers the ops and their CPU (and CUDA) kernels
except ImportError as error:  # no compiler at install time, built against another torch, or a source tree
    _C = None
    LOAD_ERROR: str | None = f"{type(error).__name__}: {error}"
    here = Path(__file__).resolve().parent
    if not any(here.glob("_C.*")):  # the package was imported from a tree where nothing was built
        LOAD_ERROR = f"no compiled extension (_C) in {here}"  # not Python's "circular import" guess
        fix = (
            f"this fused_softmax is the source tree at {here}, which has no built extension (with `python -m`, "
            "the current directory comes first on sys.path and hides the installed package): run from another "
            "directory, or the `fused-softmax-train` command, or install with `pip install --no-build-isolation -e .`"
        )
    else:
        fix = (
            f"rebuild against the installed torch {torch.__version__}: `pip install --no-build-isolation "
            "--force-reinstall .` in the source tree"
        )
    warnings.warn(
        f"fused_softmax: the compiled kernels could not be loaded ({LOAD_ERROR}); serving the same math "
        f"in pure PyTorch, which is slower. To fix it, {fix}.",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    LOAD_ERROR = None
    # The CPU kernels' instruction-set level is chosen now (csrc/cpu/kernels.h): a bad
    # FUSED_SOFTMAX_CPU_CAPABILITY fails the import with a message that names it.
    _C.cpu_capability()


def backend() -> dict[str, str]:
    """Which implementation serves each device."""
    if _C is None:
        fallback = f"pure PyTorch fallback (compiled kernels not loaded: {LOAD_ERROR})"
        return {"cpu": fallback, "cuda": fallback}
    return {
        "cpu": f"compiled C++ kernel ({_C.cpu_capability()})",
        "cuda": "pure PyTorch fallback (built without CUDA)"
        if not _C.cuda_built()
        else "compiled CUDA kernel"
        if torch.cuda.is_available()
        else "compiled CUDA kernel (no CUDA device visible)",
    }


def empty_cache() -> None:
    """Returns the CPU kernel's cached gradient memory to the system. A CPU gradient of 1 MiB or more
    gets its own memory mapping, and the last four freed (up to 1 GiB together) are kept for the next
    gradients that fit them, so a training loop does not fault in fresh pages every step (as CUDA's
    caching allocator keeps memory; torch.cuda.empty_cache is the CUDA side's counterpart)."""
    if _C is not None:
        _C.empty_cache()


def forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    z_loss: float = 0.0,
    inplace_backward: bool = False,
    predictions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The loss of 2-D input (per row for 'none', else 0-dim) and the stats (max, log_sum) per row, in the
    accumulation dtype; the loss is differentiable. inplace_backward: input's storage receives the gradient.
    predictions: an int64 tensor of a value per row that receives each row's argmax (csrc/cross_entropy.h)."""
    args = (input, target, weight, ignore_index, label_smoothing, REDUCTIONS.index(reduction), logit_scale, softcap)
    if _C is None or transformed(input, target):
        if inplace_backward:
            return _reference_inplace(*args, z_loss, predictions)
        return reference.forward_op(*args, z_loss, predictions)
    if inplace_backward:
        return _FWD_INPLACE(*args, z_loss, predictions)
    return _FWD(*args, z_loss, predictions)


def transformed(first: Tensor, second: Tensor) -> bool:
    """Whether torch.func's transforms (grad, vjp, jacrev, vmap, jvp, ...) or forward-mode AD (dual tensors)
    see these tensors. The compiled ops have no rules for them, so the same math in torch ops (reference)
    serves them, unfused: per-sample gradients, Jacobians and forward derivatives as torch's. (Not while
    torch.compile traces: dynamo cannot call the check, and traces torch.func itself.)"""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    if forward_ad._current_level < 0:  # no dual_level() active
        return False
    return forward_ad.unpack_dual(first).tangent is not None or forward_ad.unpack_dual(second).tangent is not None


def backward(*args) -> Tensor:
    """The backward op (cross_entropy_bwd's arguments), or its reference math without compiled ops."""
    if _C is None:
        return reference.backward_op(*args)
    return torch.ops.fused_softmax.cross_entropy_bwd(*args)


INPLACE_CREATE_GRAPH = (
    "fused_softmax: inplace_backward=True: second derivatives (backward with create_graph=True) need the "
    "logits, which the forward overwrote with their gradient; use inplace_backward=False"
)


class _ReferenceInplace(torch.autograd.Function):
    """The in-place contract in plain PyTorch (no compiled ops): the gradient replaces the logits."""

    @staticmethod
    def forward(
        ctx, input, target, weight, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, predictions
    ):
        loss, stats = _reference_inplace_kernel(
            input, target, weight, ignore_index, label_smoothing, reduction, logit_scale, softcap, z_loss, predictions
        )
        ctx.mark_dirty(input)
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(input)
        ctx.reduction = reduction
        return loss, stats, input

    @staticmethod
    def backward(ctx, grad_loss, grad_stats, grad_input):
        if torch.is_grad_enabled():
            raise RuntimeError(INPLACE_CREATE_GRAPH)
        (grad,) = ctx.saved_tensors
        g = grad_loss[:, None] if ctx.reduction == 0 else grad_loss
        return (grad * g,) + (None,) * 9


def _reference_inplace_kernel(
    input,
    target,
    weight,
    ignore_index,
    label_smoothing,
    reduction,
    logit_scale=1.0,
    softcap=0.0,
    z_loss=0.0,
    predictions=None,
):
    """The in-place op's contract: the forward's results, and input overwritten by d loss / d input."""
    options = (logit_scale, softcap, z_loss)
    with torch.no_grad():
        loss, stats = reference.forward_op(
            input, target, weight, ignore_index, label_smoothing, reduction, *options, predictions
        )
        unit = torch.ones_like(loss)
        input.copy_(
            reference.backward_op(
                unit, input, target, weight, stats, ignore_index, label_smoothing, reduction, *options
            )
        )
    return loss, stats


def _reference_inplace(*args) -> tuple[Tensor, Tensor]:
    if not torch.is_grad_enabled() or not args[0].requires_grad:
        return _reference_inplace_kernel(*args)
    loss, stats, _ = _ReferenceInplace.apply(*args)
    return loss, stats


if _C is not None:
    _FWD = torch.ops.fused_softmax.cross_entropy_fwd.default  # the overload itself: less Python per call
    _FWD_INPLACE = torch.ops.fused_softmax.cross_entropy_fwd_inplace.default

    def _check_devices(input: Tensor, **tensors: Tensor | None) -> None:
        """The fake kernels' part of the real ops' checks (csrc/cross_entropy.cpp): every tensor on input's
        device. One on the meta device beside real ones sends the call here, where no kernel would see it,
        and the result would be memory never written."""
        for name, tensor in tensors.items():
            if tensor is not None and tensor.device != input.device:
                raise RuntimeError(
                    f"fused_softmax: {name}: expected a tensor on {input.device} like input, got one on {tensor.device}"
                )

    def _check_args(input: Tensor, target: Tensor, weight: Tensor | None, label_smoothing, reduction, classes=None):
        """The real ops' shape and dtype checks (csrc/cross_entropy.cpp) for the fake kernels, so that a bad
        call traced by torch.compile fails as it does in eager, with a message naming the argument."""
        torch._check(
            input.dim() == 2 and input.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64),
            lambda: (
                f"fused_softmax: input: expected 2-D floating (rows, classes) logits, got {input.dtype} "
                f"of shape {list(input.shape)}"
            ),
        )
        rows, classes = input.shape[0], classes or input.shape[1]
        torch._check(input.shape[1] >= 1, lambda: "fused_softmax: input: expected at least one class")
        if target.is_floating_point():
            torch._check(
                target.dim() == 2 and target.shape[0] == rows and target.shape[1] == classes,
                lambda: (
                    f"fused_softmax: target: class probabilities must have shape [{rows}, {classes}], got "
                    f"{list(target.shape)}"
                ),
            )
        else:
            torch._check(
                target.dtype in (torch.int64, torch.int32, torch.uint8) and target.dim() == 1
                and target.shape[0] == rows,
                lambda: f"fused_softmax: target: expected int64, int32 or uint8 class indices of shape [{rows}], "
                f"got {target.dtype} of shape {list(target.shape)}",
            )  # fmt: skip
        if weight is not None:
            torch._check(
                weight.dim() == 1 and weight.shape[0] == classes and weight.is_floating_point(),
                lambda: (
                    f"fused_softmax: weight: expected {classes} floating class weights, got {weight.dtype} "
                    f"of shape {list(weight.shape)}"
                ),
            )
        torch._check(
            0.0 <= label_smoothing <= 1.0,
            lambda: f"fused_softmax: label_smoothing: expected a value in [0, 1], got {label_smoothing}",
        )
        torch._check(reduction in (0, 1, 2), lambda: f"fused_softmax: reduction: expected 0, 1 or 2, got {reduction}")

    @torch.library.register_fake("fused_softmax::cross_entropy_fwd")
    def _fwd_fake(
        input,
        target,
        weight,
        ignore_index,
        label_smoothing,
        reduction,
        logit_scale=1.0,
        softcap=0.0,
        z_loss=0.0,
        predictions=None,
    ):
        _check_devices(input, target=target, weight=weight, predictions=predictions)
        _check_args(input, target, weight, label_smoothing, reduction)
        if predictions is not None:
            torch._check(
                predictions.dtype == torch.int64 and predictions.shape == (input.shape[0],),
                lambda: (
                    f"fused_softmax: predictions: expected a contiguous int64 tensor of shape [{input.shape[0]}], "
                    f"got {predictions.dtype} of shape {list(predictions.shape)}"
                ),
            )
        acc = accumulate_dtype(input.dtype)
        loss_shape = (input.shape[0],) if reduction == 0 else ()
        return input.new_empty(loss_shape, dtype=acc), input.new_empty((input.shape[0], 2), dtype=acc)

    torch.library.register_fake("fused_softmax::cross_entropy_fwd_inplace")(_fwd_fake)

    @torch.library.register_fake("fused_softmax::cross_entropy_fwd_grad")
    def _fwd_grad_fake(input, *args, **kwargs):
        return (*_fwd_fake(input, *args, **kwargs), input.new_empty(input.shape))

    @torch.library.register_fake("fused_softmax::cross_entropy_bwd")
    def _bwd_fake(grad_loss, input, target, weight, stats, ignore_index, label_smoothing, reduction, *options):
        _check_devices(input, grad_loss=grad_loss, target=target, weight=weight, stats=stats)
        classes = options[4] if len(options) > 4 else 0  # num_classes: a block of the rows' classes
        _check_args(input, target, weight, label_smoothing, reduction, classes)
        rows, acc = input.shape[0], accumulate_dtype(input.dtype)
        torch._check(
            grad_loss.shape == ((rows,) if reduction == 0 else ()),
            lambda: (
                f"fused_softmax: grad_loss: expected shape {[rows] if reduction == 0 else []}, got "
                f"{list(grad_loss.shape)}"
            ),
        )
        torch._check(
            stats.shape == (rows, 2) and stats.dtype == acc,
            lambda: (
                f"fused_softmax: stats: expected the forward's {acc} tensor of shape [{rows}, 2], got "
                f"{stats.dtype} of shape {list(stats.shape)}"
            ),
        )
        return input.new_empty(input.shape)

    def _bwd_setup_context(ctx, inputs, output) -> None:
        grad_loss, input, target, weight, _stats, *options = inputs
        ctx.save_for_backward(grad_loss, input, target, weight)
        ctx.options = options

    def _bwd_backward(ctx, grad_grad: Tensor):
        """Second derivatives: the backward op's result written in differentiable torch ops (reference), with
        the row statistics recomputed from input so that the softmax's own derivative is in it, and
        differentiated. Reached only with create_graph=True (csrc/cross_entropy_autograd.cpp)."""
        grad_loss, input, target, weight = ctx.saved_tensors
        ignore_index, eps, reduction, logit_scale, softcap, z_loss, class_start, num_classes = ctx.options
        if class_start != 0 or num_classes not in (0, input.shape[1]):
            raise RuntimeError("fused_softmax: cross_entropy_bwd: no second derivatives for a block of classes")
        create_graph = torch.is_grad_enabled()
        wrt = [t for t, need in zip((grad_loss, input, target), ctx.needs_input_grad[:3], strict=True) if need]
        with torch.enable_grad():
            x = transform(input.to(accumulate_dtype(input.dtype)), logit_scale, softcap)
            grad = reference.backward_op(
                grad_loss, input, target, weight, reference.row_stats(x), ignore_index, eps, reduction,
                logit_scale, softcap, z_loss,
            )  # fmt: skip
            found = iter(torch.autograd.grad(grad, wrt, grad_grad, create_graph=create_graph, allow_unused=True))
        return (*(next(found) if need else None for need in ctx.needs_input_grad[:3]), *(None,) * 10)

    torch.library.register_autograd("fused_softmax::cross_entropy_bwd", _bwd_backward, setup_context=_bwd_setup_context)

    if not _C.cuda_built():  # CUDA tensors still work, through the reference math

        @torch.library.register_kernel("fused_softmax::cross_entropy_fwd", "cuda")
        def _fwd_cuda_fallback(*args, **kwargs):
            with torch.no_grad():
                return reference.forward_op(*args, **kwargs)

        @torch.library.register_kernel("fused_softmax::cross_entropy_fwd_inplace", "cuda")
        def _fwd_inplace_cuda_fallback(*args, **kwargs):
            return _reference_inplace_kernel(*args, **kwargs)

        @torch.library.register_kernel("fused_softmax::cross_entropy_fwd_grad", "cuda")
        def _fwd_grad_cuda_fallback(input, *args, **kwargs):
            grad = input.detach().clone()
            return (*_reference_inplace_kernel(grad, *args, **kwargs), grad)

        @torch.library.register_kernel("fused_softmax::cross_entropy_bwd", "cuda")
        def _bwd_cuda_fallback(*args):
            return reference.backward_op(*args)
