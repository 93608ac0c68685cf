"""fused_softmax.cross_entropy: a drop-in for torch.nn.functional.cross_entropy.

Layering: the ops (csrc/) compute the loss of a 2-D (rows, classes) view, per
row or reduced in the accumulation dtype; this module checks the user's
arguments, folds every accepted layout into that view, and shapes the result.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops
from .reference import REDUCTIONS


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross-entropy between logits `input` and `target`, fused.

    Same signature, defaults and results as torch.nn.functional.cross_entropy:
    input (C), (N, C) or (N, C, d1, ..., dk); target class indices (int64 or
    int32) of shape (), (N) or (N, d1, ..., dk), or class probabilities of
    input's shape. The loss is accumulated in float32 for float16/bfloat16
    input and returned in input's dtype.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    rows, target_rows, rows_shape = _as_rows(input, target, reduction, label_smoothing, weight, ignore_index)
    loss = _ops.cross_entropy(rows, target_rows, weight, ignore_index, label_smoothing, reduction)
    if reduction == "none":
        loss = loss.reshape(rows_shape)
    return _as_dtype(loss, input.dtype)  # 'mean' with every target ignored: 0 / 0 = nan, as in torch


def _as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips a dispatcher call on the common float32 path


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
    if not isinstance(ignore_index, int):
        raise TypeError(f"cross_entropy: ignore_index: expected an int, got {type(ignore_index).__name__}")
    if not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"cross_entropy: label_smoothing: expected a float, got {type(label_smoothing).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing: expected a value in [0, 1], got {label_smoothing}")
    if not input.is_floating_point():
        raise TypeError(f"cross_entropy: input: expected floating-point logits, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("cross_entropy: input: expected shape (C), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "cross_entropy: weight: gradients with respect to class weights are not supported; pass weight.detach()"
        )

    probabilities = target.is_floating_point()
    unbatched = input.dim() == 1
    rows_shape = input.shape[:0] if unbatched else input.shape[:1] + input.shape[2:]  # input without classes
    expected = input.shape if probabilities else rows_shape
    if target.shape != expected:
        kind = "class probabilities" if probabilities else "class indices"
        raise ValueError(
            f"cross_entropy: target: expected {kind} of shape {tuple(expected)} for input of "
            f"shape {tuple(input.shape)}, got shape {tuple(target.shape)}"
        )
    if probabilities and target.dtype != input.dtype:
        target = target.to(input.dtype)

    num_classes = input.shape[0] if unbatched else input.shape[1]
    if num_classes == 0:
        raise ValueError(f"cross_entropy: input: expected at least one class, got shape {tuple(input.shape)}")
    if unbatched:
        rows, target = input.unsqueeze(0), target.unsqueeze(0)
    elif input.dim() == 2:
        rows = input
    else:  # (N, C, d1, ..., dk) -> (N * d1 * ... * dk, C): classes last, one copy when they were not
        rows = input.movedim(1, -1).reshape(-1, num_classes)
        target = target.movedim(1, -1).reshape(-1, num_classes) if probabilities else target.reshape(-1)
    return rows, target, rows_shape


__all__ = ["cross_entropy"]
