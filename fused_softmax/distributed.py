"""Vocab-parallel cross-entropy (Megatron-style tensor parallelism over the classes).

Each rank of `group` holds a contiguous, equal slice of the C = world * C_local classes: rank r holds
classes [r * C_local, (r + 1) * C_local). Per row, the fused op gives the slice's (max, log_sum) in
one pass, and the target logit is gathered where it lives; then one MAX all-reduce (the global max)
and one SUM all-reduce of a packed (N, 3) tensor (sum of exp relative to that max, the target logit,
and for label smoothing the sum of the logits) give every rank the global log-sum-exp. Backward
needs no communication: each rank's gradient depends only on its own slice and the global lse.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops
from .reference import REDUCTIONS, accumulate_dtype


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: Tensor, target: Tensor, group, ignore_index: int, label_smoothing: float) -> Tensor:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n, c_local = local.shape
        acc = accumulate_dtype(local.dtype)
        start = rank * c_local
        # The slice's (max, log_sum) from the fused forward; no target here (every row "ignored").
        nowhere = torch.full((n,), ignore_index, dtype=torch.long, device=local.device)
        _, stats = _ops.cross_entropy(local.detach(), nowhere, None, ignore_index, 0.0, "none")
        global_max = stats[:, 0].clone()
        dist.all_reduce(global_max, dist.ReduceOp.MAX, group=group)
        counted = target != ignore_index
        mine = counted & (target >= start) & (target < start + c_local)
        local_index = torch.where(mine, target - start, 0)
        packed = torch.stack(
            [
                # A slice of only -inf adds 0; a NaN or +inf stays NaN.
                torch.where(stats[:, 0] == float("-inf"), 0.0, torch.exp(stats[:, 0] - global_max + stats[:, 1])),
                torch.where(mine, local.gather(1, local_index[:, None])[:, 0].to(acc), 0.0),
                local.sum(1, dtype=acc) if label_smoothing > 0 else torch.zeros(n, dtype=acc, device=local.device),
            ],
            1,
        )
        dist.all_reduce(packed, dist.ReduceOp.SUM, group=group)
        lse = global_max + torch.log(packed[:, 0])
        classes = world * c_local
        eps = label_smoothing
        # sum_c q_c (lse - x_c) with q = (1 - eps) onehot + eps / C
        loss = (1 - eps) * (lse - packed[:, 1]) + eps * (lse - packed[:, 2] / classes)
        loss = torch.where(counted, loss, 0.0)
        ctx.save_for_backward(local, lse, local_index, mine, counted)
        ctx.eps, ctx.classes = eps, classes
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        local, lse, local_index, mine, counted = ctx.saved_tensors
        acc = lse.dtype
        g = torch.where(counted, grad_loss.to(acc), 0.0)[:, None]
        grad = torch.exp(local.to(acc) - lse[:, None]) - ctx.eps / ctx.classes
        grad.scatter_add_(1, local_index[:, None], torch.where(mine, ctx.eps - 1.0, 0.0).to(acc)[:, None])
        return (grad * g).to(local.dtype), None, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Cross-entropy of logits split by class over the ranks of `group` (default: the world).

    local_logits: (N, C_local), this rank's contiguous slice of the classes (rank r holds classes
    r * C_local ... (r + 1) * C_local - 1; every rank the same C_local). target: (N,) global class
    indices, the same on every rank. Returns what fused_softmax.cross_entropy returns on the gathered
    (N, world * C_local) logits, on every rank; the gradient is this rank's slice of its gradient.
    """
    if not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy: torch.distributed is not initialized")
    if not isinstance(local_logits, Tensor) or local_logits.dim() != 2 or not local_logits.is_floating_point():
        raise ValueError("vocab_parallel_cross_entropy: local_logits: expected floating (N, C_local) logits")
    if not isinstance(target, Tensor) or target.shape != local_logits.shape[:1] or target.is_floating_point():
        raise ValueError(
            f"vocab_parallel_cross_entropy: target: expected ({local_logits.shape[0]},) class indices, got "
            f"{tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"vocab_parallel_cross_entropy: reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"vocab_parallel_cross_entropy: label_smoothing: expected a value in [0, 1], got {label_smoothing}"
        )
    classes = dist.get_world_size(group) * local_logits.shape[1]
    counted = target != ignore_index
    if bool(((target < 0) | (target >= classes)).logical_and(counted).any()):
        raise ValueError(f"vocab_parallel_cross_entropy: target: class indices must be in [0, {classes})")
    loss = _VocabParallelCrossEntropy.apply(local_logits, target.long(), group, ignore_index, float(label_smoothing))
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / counted.sum()
    return loss.to(local_logits.dtype)


__all__ = ["vocab_parallel_cross_entropy"]
