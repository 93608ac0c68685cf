"""The cross-entropy math in plain PyTorch: the oracle of the tests and the fallback
when the compiled kernels cannot be loaded.

forward_op and backward_op follow the contract of the compiled ops (csrc/cross_entropy.h): 2-D
input (N, C); target int class indices (N,) or class probabilities (N, C); per-row
results in the accumulation dtype (float64 for float64 input, else float32).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._shared import REDUCTIONS, accumulate_dtype, mean_divisor, mean_z_loss, transform

__all__ = ["REDUCTIONS", "accumulate_dtype", "backward_op", "forward_op", "row_argmax", "row_stats", "transform"]


def _target_mass(
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    num_classes: int,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """q[i, c], the weighted target mass of each class, and which rows count (not ignored)."""
    w = torch.ones(num_classes, dtype=acc, device=target.device) if weight is None else weight.to(acc)
    eps = label_smoothing
    if target.is_floating_point():
        q = w * ((1 - eps) * target.to(acc) + eps / num_classes)
        return q, torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
    valid = target != ignore_index
    y = torch.where(valid, target, 0).long()
    spread = (eps / num_classes * w).expand(target.shape[0], num_classes)
    q = spread.scatter_add(1, y[:, None], ((1 - eps) * w[y])[:, None])  # out of place: torch.func's vmap
    return q * valid[:, None], valid


def forward_op(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    z_loss: float = 0.0,
    predictions: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward op's contract: the loss (per row, or reduced) and stats (max, log_sum); differentiable.
    predictions, if given, receives each row's argmax of the logits as the softmax sees them."""
    if predictions is not None:
        predictions.copy_(row_argmax(input, logit_scale, softcap))
    if reduction == 1:
        z_loss = mean_z_loss(z_loss, target, weight, ignore_index, accumulate_dtype(input.dtype))
    rows, stats = cross_entropy_rows(input, target, weight, ignore_index, label_smoothing, logit_scale, softcap, z_loss)
    if reduction == 0:
        return rows, stats
    total = rows.sum()
    return (total / mean_divisor(target, weight, ignore_index, rows.dtype) if reduction == 1 else total), stats


def row_argmax(input: Tensor, logit_scale: float = 1.0, softcap: float = 0.0) -> Tensor:
    """Each row's argmax of the logits as the softmax sees them (the ops' predictions)."""
    with torch.no_grad():
        return transform(input.to(accumulate_dtype(input.dtype)), logit_scale, softcap).argmax(1)


def cross_entropy_rows(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Per-row losses sum_c q[i, c] * (lse[i] - x[i, c]) + z_loss * lse[i]^2 and stats (max, log_sum) of
    the transformed logits x; differentiable."""
    acc = accumulate_dtype(input.dtype)
    x = transform(input.to(acc), logit_scale, softcap)
    stats = row_stats(x)
    q, valid = _target_mass(target, weight, ignore_index, label_smoothing, x.shape[1], acc)
    terms = q * minus_lse(x, stats).neg()
    if not (target.is_floating_point() or label_smoothing > 0):
        # An index row's one term is its target class: -inf logits elsewhere stay out (no 0 * inf),
        # as in torch; with smoothing or probabilities torch multiplies every class, and so do we.
        terms = torch.where(q != 0, terms, 0)
    rows = terms.sum(1)
    if isinstance(z_loss, Tensor) or z_loss != 0:
        lse = stats.sum(1)  # max + log_sum, differentiable here (detached only on return)
        rows = rows + z_loss * lse * lse
    return torch.where(valid, rows, 0), stats.detach()


def row_stats(x: Tensor) -> Tensor:
    """(max, log_sum) per row, lse = max + log_sum; a row with a +inf or only -inf gets NaN, as in torch."""
    row_max = x.amax(1, keepdim=True)
    log_sum = torch.log(torch.exp(x - row_max).sum(1, keepdim=True))
    return torch.cat([row_max, log_sum], 1)


def minus_lse(x: Tensor, stats: Tensor) -> Tensor:
    """x - lse, formed as (x - max) - log_sum: exact where x is near the max."""
    return (x - stats[:, :1]) - stats[:, 1:]


def backward_op(
    grad_loss: Tensor,
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    stats: Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
    z_loss: float = 0.0,
    class_start: int = 0,
    num_classes: int = 0,
) -> Tensor:
    """The backward op's contract: d(grad_loss . loss) / d input =
    g[i] * (softmax * (S[i] + 2 z_loss lse[i]) - q[i, :]) * dx/dinput; input may be the classes
    [class_start, class_start + input.shape[1]) of rows of num_classes (0: input.shape[1]) classes."""
    acc = accumulate_dtype(input.dtype)
    x = transform(input.to(acc), logit_scale, softcap)
    q, valid = _target_mass(target, weight, ignore_index, label_smoothing, num_classes or x.shape[1], acc)
    if reduction != 0:  # one value for every row
        divisor = 1
        if reduction == 1:  # every row ignored: zero gradients, not 0 / 0 (nor NaN second derivatives)
            divisor = torch.where(valid.any(), mean_divisor(target, weight, ignore_index, acc), torch.inf)
            z_loss = mean_z_loss(z_loss, target, weight, ignore_index, acc)
        grad_loss = (grad_loss.to(acc) / divisor).expand(x.shape[0])
    stats = stats.to(acc)
    p = torch.exp(minus_lse(x, stats))
    S = q.sum(1, keepdim=True) + 2 * z_loss * stats.sum(1, keepdim=True)
    q = q[:, class_start : class_start + x.shape[1]]
    grad = grad_loss.to(acc)[:, None] * (p * S - q) * transform_slope(x, logit_scale, softcap)
    return torch.where(valid[:, None], grad, 0).to(input.dtype)


def transform_slope(x: Tensor, logit_scale: float, softcap: float) -> Tensor | float:
    """d x / d input at the transformed logits x; 0 at x = -inf (where p = q = 0)."""
    if softcap <= 0:
        return logit_scale
    t = x / softcap
    return torch.where(x == float("-inf"), 0.0, logit_scale * (1 - t * t))
