"""Vocab-parallel cross-entropy (Megatron-style tensor parallelism over the classes).

Each rank of `group` holds a contiguous slice of the classes, in rank order (rank r's slice starts
where rank r - 1's ends; slices may differ in width). Per row, the fused forward op gives the
slice's (max, log_sum) in one pass; one MAX all-reduce gives the global max (and every rank's slice
width, so each rank learns where its slice starts), one SUM all-reduce of a packed (N, 3) tensor
gives the sum of exp relative to that max, the target logit and, for label smoothing, the weighted
sum of the logits. Backward needs no communication: the backward op on a block of columns
(class_start, num_classes) turns the slice into its gradient given the global (max, log_sum).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops
from ._shared import REDUCTIONS, accumulate_dtype, mean_divisor, mean_z_loss, transform
from .functional import CrossEntropyOutput, check_options, loss_dtype


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, target, weight, group, ignore_index, label_smoothing, options, predictions):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        n, c_local = local.shape
        acc = accumulate_dtype(local.dtype)
        logit_scale, softcap, z_loss = options
        # The slice's (max, log_sum) of the logits as the softmax sees them, and with predictions its argmax;
        # every row "ignored": no target here.
        local_best = local.new_empty((n,), dtype=torch.long) if predictions is not None else None
        if c_local > 0:
            nowhere = torch.full((n,), ignore_index, dtype=torch.long, device=local.device)
            _, stats = _ops.forward(
                local.detach(), nowhere, None, ignore_index, 0.0, "none", logit_scale, softcap, 0.0, False, local_best
            )
        else:  # a rank may hold no classes: its slice adds nothing (max -inf), and the collectives still run
            stats = torch.tensor([float("-inf"), 0.0], dtype=acc, device=local.device).expand(n, 2)
        # MAX all-reduce: the rows' global max, each rank's slice width (-inf from the other ranks), and with
        # predictions the best logit of every slice and whether any slice holds a NaN.
        widths = torch.full((world,), float("-inf"), dtype=acc, device=local.device)
        widths[rank] = c_local
        parts = [stats[:, 0], widths]
        if predictions is not None:
            best = torch.full((n,), float("-inf"), dtype=acc, device=local.device)
            if c_local > 0:
                best = transform(local.detach().gather(1, local_best[:, None])[:, 0].to(acc), logit_scale, softcap)
            parts += [torch.where(best.isnan(), float("-inf"), best), best.isnan().to(acc)]
        maxed = torch.cat(parts)
        dist.all_reduce(maxed, dist.ReduceOp.MAX, group=group)
        global_max, widths = maxed[:n], maxed[n : n + world].long().tolist()
        start, classes = sum(widths[:rank]), sum(widths)
        if predictions is not None:  # the first class among the slices' best that rank first (NaN, then the max)
            top, any_nan = maxed[n + world : 2 * n + world], maxed[2 * n + world :] > 0
            wins = torch.where(any_nan, best.isnan(), best == top) & (c_local > 0)
            first = torch.where(wins, start + (local_best if c_local > 0 else 0), classes).to(torch.long)
            dist.all_reduce(first, dist.ReduceOp.MIN, group=group)
            predictions.copy_(first)
        counted = target != ignore_index
        # The same check on every rank (same target, same widths): all raise together, none waits.
        if bool(((target < 0) | (target >= classes)).logical_and(counted).any()):
            raise ValueError(f"vocab_parallel_cross_entropy: target: class indices must be in [0, {classes})")
        if weight is not None and weight.shape != (classes,):
            raise ValueError(
                f"vocab_parallel_cross_entropy: weight: expected ({classes},) class weights (every class, on every "
                f"rank), got {tuple(weight.shape)}"
            )
        w = None if weight is None else weight.to(acc)
        mine = counted & (target >= start) & (target < start + c_local)
        local_index = torch.where(mine, target - start, 0)
        x_y = transform(local.gather(1, local_index[:, None])[:, 0].to(acc), logit_scale, softcap) if c_local else 0.0
        eps = label_smoothing
        if eps > 0:  # sum_c w_c x_c over the slice
            x = transform(local.detach().to(acc), logit_scale, softcap)
            spread = x.sum(1) if w is None else x @ w[start : start + c_local]
        else:
            spread = torch.zeros(n, dtype=acc, device=local.device)
        packed = torch.stack(
            [
                # A slice of only -inf adds 0; a NaN or +inf stays NaN.
                torch.where(stats[:, 0] == float("-inf"), 0.0, torch.exp(stats[:, 0] - global_max + stats[:, 1])),
                torch.where(mine, x_y, 0.0),
                spread,
            ],
            1,
        )
        dist.all_reduce(packed, dist.ReduceOp.SUM, group=group)
        log_sum = torch.log(packed[:, 0])
        lse = global_max + log_sum
        # sum_c q_c (lse - x_c) with q = (1 - eps) w_y onehot(y) + eps / C w; lse - x_y = log_sum + (max - x_y)
        w_y = 1.0 if w is None else w[torch.where(counted, target, 0)]
        w_total = classes if w is None else w.sum()
        loss = (1 - eps) * w_y * (log_sum + (global_max - packed[:, 1]))
        if eps > 0:
            loss = loss + eps / classes * (w_total * lse - packed[:, 2])
        if z_loss != 0:  # negative for 'mean' under a negative weight sum (mean_z_loss)
            loss = loss + z_loss * lse * lse
        loss = torch.where(counted, loss, 0.0)
        ctx.save_for_backward(local, target, weight, torch.stack([global_max, log_sum], 1))
        ctx.args = (ignore_index, eps, options, start, classes)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        local, target, weight, stats = ctx.saved_tensors
        ignore_index, eps, options, start, classes = ctx.args
        if local.shape[1] == 0:
            return torch.zeros_like(local), *(None,) * 7
        grad = _ops.backward(
            grad_loss.to(stats.dtype).contiguous(), local, target, weight, stats, ignore_index, eps, 0,
            *options, start, classes,
        )  # fmt: skip
        return grad, *(None,) * 7


def vocab_parallel_cross_entropy(
    local_logits: Tensor,
    target: Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_predictions: bool = False,
) -> Tensor | CrossEntropyOutput:
    """Cross-entropy of logits split by class over the ranks of `group` (default: the world).

    local_logits: (N, C_r), this rank's contiguous slice of the classes, the slices in rank order
    (rank r's classes start at C_0 + ... + C_{r-1}; widths may differ). target: (N,) global class
    indices and weight: (C,) class weights of every class, the same on every rank. z_loss, softcap,
    logit_scale as in fused_softmax.cross_entropy. Returns what fused_softmax.cross_entropy returns
    on the gathered (N, C) logits, on every rank; the gradient is this rank's slice of its gradient.
    return_predictions: return CrossEntropyOutput(loss, None, None, predictions), predictions each
    row's argmax over all the classes (global indices, the same on every rank; one more all-reduce).
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
    if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1 or weight.requires_grad):
        raise ValueError("vocab_parallel_cross_entropy: weight: expected a 1-D tensor of class weights, detached")
    if reduction not in REDUCTIONS:
        raise ValueError(f"vocab_parallel_cross_entropy: reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(
            f"vocab_parallel_cross_entropy: label_smoothing: expected a value in [0, 1], got {label_smoothing}"
        )
    check_options("vocab_parallel_cross_entropy", z_loss, softcap, logit_scale)
    target = target.long()
    if reduction == "mean":  # the z-loss over the rows kept, the cross-entropy over D (mean_z_loss)
        z_loss = mean_z_loss(z_loss, target, weight, ignore_index, accumulate_dtype(local_logits.dtype))
    options = (float(logit_scale), float(softcap or 0.0), float(z_loss))
    predictions = target.new_empty(target.shape) if return_predictions else None
    loss = _VocabParallelCrossEntropy.apply(
        local_logits, target, weight, group, ignore_index, float(label_smoothing), options, predictions
    )
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / mean_divisor(target, weight, ignore_index, loss.dtype)
    loss = loss.to(loss_dtype(local_logits))
    return CrossEntropyOutput(loss, None, None, predictions) if return_predictions else loss


__all__ = ["vocab_parallel_cross_entropy"]
