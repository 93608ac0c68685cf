"""fused_softmax.cross_entropy: a drop-in for torch.nn.functional.cross_entropy.

Layering: the ops (csrc/) compute the loss of a 2-D (rows, classes) view, per
row or reduced in the accumulation dtype; this module checks the user's
arguments, folds every accepted layout into that view, and shapes the result.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _dtensor, _ops, reference
from ._shared import REDUCTIONS, accumulate_dtype, as_dtype, as_index, probabilities_as_read


class CrossEntropyOutput(NamedTuple):
    """What the losses return when return_lse, return_z_loss or return_predictions asks for more than the loss."""

    loss: Tensor
    lse: Tensor | None  # per-row log-sum-exp of the (scaled, capped) logits, float32 (float64 for float64)
    z_loss: Tensor | None  # the z-loss part of loss, reduced like it; detached, for logging
    predictions: Tensor | None = None  # per-row argmax of the logits (int64), e.g. for token accuracy


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_predictions: bool = False,
    inplace_backward: bool = False,
) -> Tensor | CrossEntropyOutput:
    """Softmax cross-entropy between logits `input` and `target`, fused.

    Same signature, defaults and results as torch.nn.functional.cross_entropy:
    input (C), (N, C) or (N, C, d1, ..., dk); target class indices (int64 or
    int32) of shape (), (N) or (N, d1, ..., dk), or class probabilities of
    input's shape. The loss is accumulated in float32 for float16/bfloat16
    input and returned in the dtype torch returns (see loss_dtype); under
    torch.autocast that is float32, without the float32 copy of the logits
    that torch makes there. Float32 probabilities of float16/bfloat16 logits
    are read as float32, not rounded to 16 bits.

    Beyond torch (keyword-only, all off by default):
      z_loss: adds z_loss * lse^2 per row (PaLM's auxiliary loss; ignored rows add nothing); 'mean'
        divides it by the rows not ignored, the cross-entropy by torch's divisor (class weights).
      softcap: the softmax sees softcap * tanh(logits / softcap) (Gemma 2); -inf logits stay -inf.
      logit_scale: the softmax sees logit_scale * logits (applied before softcap).
      return_lse / return_z_loss / return_predictions: return CrossEntropyOutput(loss, lse, z_loss,
        predictions) instead of the loss. predictions: each row's predicted class (int64, shaped as a
        'none' loss), the argmax of its logits found in the pass that finds their max, ties to the
        first and NaN above all as torch.argmax; read before inplace_backward overwrites the logits.
        (With logit_scale or softcap, of the logits as the softmax sees them.)
      inplace_backward: the forward also writes d loss / d input into input's own storage, so
        forward + backward allocate nothing of input's size; input then holds the gradient, not the
        logits. Needs (N, C) or (C,) contiguous logits that are not a leaf and are used by nothing
        else that autograd saved; only when a gradient is needed (else it is a plain forward).

    DTensor input on a 1-D mesh (torch.distributed.tensor): sharded on the class dimension it takes the
    vocab-parallel loss (no all-gather; the gradient is a DTensor placed as input), replicated or
    batch-sharded the ordinary op per rank; the loss is a DTensor (see fused_softmax/_dtensor.py).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    ignore_index = as_index(ignore_index)
    if _dtensor.is_dtensor(input):  # see fused_softmax/_dtensor.py
        if return_lse or return_z_loss or inplace_backward:
            raise ValueError(
                "cross_entropy: return_lse, return_z_loss and inplace_backward are not supported with DTensor input"
            )
        if reduction not in REDUCTIONS:
            raise ValueError(f"cross_entropy: reduction: expected one of {REDUCTIONS}, got {reduction!r}")
        check_options("cross_entropy", z_loss, softcap, logit_scale)
        return _dtensor.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale,
            return_predictions,
        )  # fmt: skip
    rows, target_rows, rows_shape = _as_rows(input, target, reduction, label_smoothing, weight, ignore_index)
    check_options("cross_entropy", z_loss, softcap, logit_scale)
    inplace_backward = inplace_backward and torch.is_grad_enabled() and input.requires_grad
    if inplace_backward:
        _check_inplace(input)
    predictions = found = None
    if return_predictions:
        if rows.shape[1] == 0:  # torch.argmax's error
            raise IndexError("cross_entropy: return_predictions: input has 0 classes, no argmax")
        if _ops.transformed(rows, target_rows):  # torch.func: no buffer to fill, the same argmax in torch ops
            found = reference.row_argmax(rows, logit_scale, softcap or 0.0)
        else:  # the op fills it
            predictions = found = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    if rows.shape[1] == 0:
        loss, stats = _no_classes(rows, target_rows, weight, ignore_index, label_smoothing, reduction, z_loss)
    else:
        loss, stats = _ops.forward(
            rows, target_rows, weight, ignore_index, label_smoothing, reduction,
            float(logit_scale), float(softcap or 0.0), float(z_loss), inplace_backward, predictions,
        )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(rows_shape)
    out_dtype = loss_dtype(input, target)
    loss = as_dtype(loss, out_dtype)  # 'mean' with every target ignored: 0 / 0 = nan, as in torch
    if not (return_lse or return_z_loss or return_predictions):
        return loss
    out = with_lse_and_z_loss(
        loss, stats, target_rows, weight, ignore_index, reduction, z_loss, rows_shape, return_lse, return_z_loss
    )
    return out if found is None else out._replace(predictions=found.reshape(rows_shape))


def with_lse_and_z_loss(
    loss: Tensor,
    stats: Tensor,
    target_rows: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    z_loss: float,
    rows_shape: torch.Size,
    return_lse: bool,
    return_z_loss: bool,
) -> CrossEntropyOutput:
    """The loss with what return_lse and return_z_loss ask for, from the op's per-row stats."""
    lse = stats.sum(1) if return_lse or return_z_loss else None
    z_part = None
    if return_z_loss:
        counted = target_rows.is_floating_point() or target_rows != ignore_index
        z_part = torch.where(counted, z_loss * lse * lse, 0.0)
        if reduction != "none":
            z_part = z_part.sum()
            if reduction == "mean":  # over the rows not ignored (with_mean_z_loss in csrc/cross_entropy.h)
                z_part = z_part / (counted.sum() if isinstance(counted, Tensor) else target_rows.shape[0])
        z_part = as_dtype(z_part.reshape(rows_shape) if reduction == "none" else z_part, loss.dtype)
    return CrossEntropyOutput(loss, lse.reshape(rows_shape) if return_lse else None, z_part)


def _no_classes(
    rows: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, eps: float, reduction: str, z_loss: float
) -> tuple[Tensor, Tensor]:
    """Logits with 0 classes: torch's own values (0 or -0 per row, NaN for 'mean', NaN with smoothing)
    and errors (IndexError for a class index that is not ignored), as the ops' (loss, stats); each
    row's lse is -inf, so a z-loss makes its rows infinite."""
    acc = accumulate_dtype(rows.dtype)
    probabilities = target.is_floating_point()
    kept = torch.ones(rows.shape[0], dtype=torch.bool) if probabilities else (target != ignore_index).cpu()
    if not probabilities and kept.any():
        raise IndexError("cross_entropy: target: class indices out of range for input with 0 classes")
    loss = torch.nn.functional.cross_entropy(
        rows.to(acc), target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps
    )
    stats = rows.new_full((rows.shape[0], 2), float("-inf"), dtype=acc)
    if z_loss > 0:
        z_part = torch.where(kept, torch.inf, 0.0).to(device=rows.device, dtype=acc)
        loss = loss + (z_part if reduction == "none" else z_part.sum())
    return loss, stats


def loss_dtype(logits: Tensor, target: Tensor | None = None) -> torch.dtype:
    """The dtype torch's cross-entropy returns: the logits', but float32 for float16/bfloat16 logits under
    torch.autocast (which runs cross-entropy in float32), and with class probabilities the dtype the
    logits' and the target's promote to."""
    dtype = logits.dtype
    if dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(logits.device.type):
        dtype = torch.float32
    if target is not None and target.is_floating_point():
        dtype = torch.promote_types(dtype, target.dtype)
    return dtype


def check_options(caller: str, z_loss: float, softcap: float | None, logit_scale: float) -> None:
    """The options beyond torch; errors name the caller and the option."""
    for name, value in (("z_loss", z_loss), ("logit_scale", logit_scale), ("softcap", softcap)):
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise TypeError(f"{caller}: {name}: expected a float, got {type(value).__name__}")
    if not z_loss >= 0:
        raise ValueError(f"{caller}: z_loss: expected a value >= 0, got {z_loss}")
    if not logit_scale > 0:
        raise ValueError(f"{caller}: logit_scale: expected a value > 0, got {logit_scale}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{caller}: softcap: expected a value > 0 or None, got {softcap}")


def _check_inplace(input: Tensor) -> None:
    """The misuses of inplace_backward that can be seen before anything is overwritten."""
    if input.is_leaf:
        raise ValueError(
            "cross_entropy: input: inplace_backward=True overwrites the logits with their gradient, but input is a "
            "leaf that requires grad (its .grad would be lost); use it on logits computed from your parameters"
        )
    if input.dim() > 2 or not input.is_contiguous():
        raise ValueError(
            "cross_entropy: input: inplace_backward=True needs contiguous (N, C) or (C,) logits, got shape "
            f"{tuple(input.shape)} with strides {input.stride()}"
        )
    whole = input if input._base is None else input._base  # a view is overwritten through its base
    if whole.numel() != input.numel() or not whole.is_contiguous():
        raise ValueError(
            "cross_entropy: input: inplace_backward=True would overwrite a view of a larger or non-contiguous tensor "
            f"({tuple(whole.shape)}); pass the whole tensor or a copy"
        )
    if whole.is_leaf:
        raise ValueError(
            "cross_entropy: input: inplace_backward=True would overwrite a view of a leaf that requires grad; use "
            "it on logits computed from your parameters"
        )
    if whole.retains_grad and whole.output_nr != 0:  # autograd would look for the hook at another output
        raise ValueError(
            "cross_entropy: input: inplace_backward=True cannot keep retain_grad() on logits that are output "
            f"{whole.output_nr} of the op that made them; retain the grad of a copy"
        )


def _as_rows(
    input: Tensor, target: Tensor, reduction: str, label_smoothing: float, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor, torch.Size]:
    """Checks the arguments; returns input as (rows, C), target per row, and the shape of per-row losses."""
    if not isinstance(input, Tensor):
        raise TypeError(f"cross_entropy: input: expected a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"cross_entropy: target: expected a torch.Tensor, got {type(target).__name__}")
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"cross_entropy: weight: expected a torch.Tensor or None, got {type(weight).__name__}")
    if not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"cross_entropy: label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:  # RuntimeError, torch's type; torch ignores a negative one silently
        raise RuntimeError(f"cross_entropy: label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if not input.is_floating_point():
        raise TypeError(f"cross_entropy: input: expected floating-point logits, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("cross_entropy: input: expected shape (C), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "cross_entropy: weight: gradients with respect to class weights are not supported; pass weight.detach()"
        )

    probabilities = target.is_floating_point()
    if probabilities and ignore_index != -100:  # torch raises too: no row of probabilities is ignored
        raise RuntimeError(
            f"cross_entropy: ignore_index: not supported with class-probability targets, got {ignore_index}"
        )
    unbatched = input.dim() == 1
    rows_shape = input.shape[:0] if unbatched else input.shape[:1] + input.shape[2:]  # input without classes
    expected = input.shape if probabilities else rows_shape
    if target.shape != expected:
        kind = "class probabilities" if probabilities else "class indices"
        # torch's types: ValueError where the class indices' batch size differs from input's, else RuntimeError
        batch_mismatch = not probabilities and input.dim() > 1 and target.shape[:1] != input.shape[:1]
        raise (ValueError if batch_mismatch else RuntimeError)(
            f"cross_entropy: target: expected {kind} of shape {tuple(expected)} for input of "
            f"shape {tuple(input.shape)}, got shape {tuple(target.shape)}"
        )
    if probabilities:
        target = probabilities_as_read(target, input.dtype)

    num_classes = input.shape[0] if unbatched else input.shape[1]
    if unbatched:
        rows, target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        rows = input
    else:  # (N, C, d1, ..., dk) -> (N * d1 * ... * dk, C): classes last, one copy when they were not
        rows = input.movedim(1, -1).reshape(rows_shape.numel(), num_classes)
        target = target.movedim(1, -1).reshape(rows.shape) if probabilities else target.reshape(-1)
    return rows, target, rows_shape


__all__ = ["cross_entropy"]
