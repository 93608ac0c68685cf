"""fused_softmax.linear_cross_entropy: cross-entropy of input @ linear_weight.T + linear_bias, computed
in chunks so that no N x C logits tensor ever exists.

For each chunk of rows: the chunk's logits, the fused op's per-row losses, and (see
_LinearCrossEntropy) the chunk's share of the gradients of input and bias, and of weight in
float32/float64; then the logits are dropped. A 16-bit weight's gradient is formed afterwards a
block of classes at a time (see _Gradients). Peak memory is set by the chunk, not by N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ops
from ._shared import (
    REDUCTIONS,
    accumulate_dtype,
    as_dtype,
    as_index,
    mean_divisor,
    mean_z_loss,
    probabilities_as_read,
)
from .functional import (
    CrossEntropyOutput,
    cross_entropy,
    loss_dtype,
    with_lse_and_z_loss,
)

# A chunk of rows' logits takes about this many bytes unless chunk_size says otherwise.
_CHUNK_BYTES = 64 << 20


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    chunk_size: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_lse: bool = False,
    return_z_loss: bool = False,
    return_predictions: bool = False,
    options: object | None = None,
) -> Tensor | CrossEntropyOutput:
    """As torch.nn.functional.linear_cross_entropy (input (N, H) or (H,), linear_weight (C, H),
    linear_bias (C,)), without ever holding the (N, C) logits: rows go chunk_size at a time.
    z_loss, softcap, logit_scale, return_lse, return_z_loss and return_predictions as in
    fused_softmax.cross_entropy (predictions: each row's argmax, found chunk by chunk as the loss is).
    A K-dimensional linear_weight (C, d1, ..., dK, H), gradients with respect to probability targets,
    and torch.func transforms take torch's reference path: the logits formed whole, then the fused loss.
    options: torch's LinearCrossEntropyOptions (torch >= 2.14); its batch_chunk_size is chunk_size, the
    rest is torch's own chunking policy (this one always chunks and accumulates as described above)."""
    ignore_index = -100 if ignore_index is None else as_index(ignore_index)
    if options is not None:
        if not hasattr(options, "batch_chunk_size"):
            raise TypeError(
                "linear_cross_entropy: options: expected torch.nn.LinearCrossEntropyOptions or None, got "
                f"{type(options).__name__}"
            )
        chunk_size = chunk_size if options.batch_chunk_size is None else options.batch_chunk_size
    # Shape errors are RuntimeErrors, as torch's.
    if not isinstance(linear_weight, Tensor) or linear_weight.dim() < 2:
        raise RuntimeError(
            "linear_cross_entropy: linear_weight: expected a (C, in_features) or (C, d1, ..., dK, in_features) "
            "tensor, got "
            f"{tuple(linear_weight.shape) if isinstance(linear_weight, Tensor) else type(linear_weight).__name__}"
        )
    features = linear_weight.shape[-1]
    if not isinstance(input, Tensor) or input.dim() not in (1, 2) or input.shape[-1] != features:
        raise RuntimeError(
            f"linear_cross_entropy: input: expected (N, {features}) or ({features},), "
            f"got {tuple(input.shape) if isinstance(input, Tensor) else type(input).__name__}"
        )
    if linear_weight.dim() > 2 and input.dim() != 2:
        raise RuntimeError(
            f"linear_cross_entropy: input: a K-dimensional linear_weight {tuple(linear_weight.shape)} needs "
            f"(N, {features}) input, got {tuple(input.shape)}"
        )
    if linear_bias is not None and linear_bias.shape != linear_weight.shape[:-1]:
        raise RuntimeError(
            f"linear_cross_entropy: linear_bias: expected shape {tuple(linear_weight.shape[:-1])}, "
            f"got {tuple(linear_bias.shape)}"
        )
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_cross_entropy: chunk_size: expected a positive int, got {chunk_size!r}")
    if (
        _ops.LOAD_ERROR is not None
        or linear_weight.dim() > 2
        or (torch.is_grad_enabled() and isinstance(target, Tensor) and target.requires_grad)
        or _ops.transformed(input, linear_weight)
    ):  # the reference path: F.linear's logits, whole
        bias = None if linear_bias is None else linear_bias.flatten()
        logits = torch.nn.functional.linear(input, linear_weight.flatten(0, -2), bias)
        logits = logits.unflatten(-1, linear_weight.shape[:-1])
        return cross_entropy(
            logits, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            z_loss=z_loss, softcap=softcap, logit_scale=logit_scale, return_lse=return_lse,
            return_z_loss=return_z_loss, return_predictions=return_predictions,
        )  # fmt: skip

    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast runs F.linear: in its dtype (float64 stays)
        low = torch.get_autocast_dtype(device_type)
        input, linear_weight, linear_bias = (
            t if t is None or t.dtype == torch.float64 else t.to(low) for t in (input, linear_weight, linear_bias)
        )
    unbatched = input.dim() == 1
    rows = input.unsqueeze(0) if unbatched else input
    rows_target = target.unsqueeze(0) if unbatched else target
    if rows_target.shape[:1] != rows.shape[:1]:
        raise ValueError(f"linear_cross_entropy: target: expected {rows.shape[0]} rows, got {rows_target.shape[0]}")
    if torch.is_grad_enabled() and weight is not None and weight.requires_grad:
        raise ValueError(
            "linear_cross_entropy: weight: gradients with respect to class weights are not supported; pass "
            "weight.detach()"
        )
    if rows_target.is_floating_point():  # once, not per chunk
        rows_target = probabilities_as_read(rows_target, input.dtype)
    # cross_entropy checks the options and shapes once, on an empty chunk; the op checks the class
    # indices and weights on every chunk.
    with torch.no_grad():
        cross_entropy(
            torch.nn.functional.linear(rows[:0], linear_weight, linear_bias),
            rows_target[:0],
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            logit_scale=logit_scale,
        )
    kernel_z_loss = z_loss  # 'mean': the z-loss over the rows kept, the cross-entropy over D (mean_z_loss)
    if reduction == "mean":
        kernel_z_loss = mean_z_loss(z_loss, rows_target, weight, ignore_index, accumulate_dtype(input.dtype))
    chunk = chunk_size or _power_of_two_at_most(_CHUNK_BYTES // (max(1, linear_weight.shape[0]) * input.element_size()))
    out_dtype = loss_dtype(input, target)  # float32 under autocast, as its F.cross_entropy returns
    predictions = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device) if return_predictions else None
    with torch.autocast(device_type, enabled=False):  # the chunks' matmuls in the dtype cast above
        loss, stats = _LinearCrossEntropy.apply(
            rows,
            linear_weight,
            linear_bias,
            rows_target,
            weight,
            ignore_index,
            label_smoothing,
            REDUCTIONS.index(reduction),
            chunk,
            (float(logit_scale), float(softcap or 0.0), float(kernel_z_loss)),
            predictions,
        )
    if unbatched and reduction == "none":
        loss = loss.squeeze(0)
    loss = as_dtype(loss, out_dtype)
    if not (return_lse or return_z_loss or return_predictions):
        return loss
    rows_shape = rows.shape[:0] if unbatched else rows.shape[:1]
    out = with_lse_and_z_loss(
        loss, stats, rows_target, weight, ignore_index, reduction, z_loss, rows_shape, return_lse, return_z_loss
    )
    return out if predictions is None else out._replace(predictions=predictions.reshape(rows_shape))


def _linear(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None, buffer: Tensor) -> Tensor:
    """input @ linear_weight.T + linear_bias, written into the leading rows of buffer."""
    out = buffer[: input.shape[0]]
    if linear_bias is None:
        return torch.mm(input, linear_weight.t(), out=out)
    return torch.addmm(linear_bias, input, linear_weight.t(), out=out)


def _power_of_two_at_most(n: int) -> int:
    """Chunk and block sizes: CPU GEMMs (oneDNN) ran 20-35% slower with 261 or 320 rows than with 256."""
    return 1 << max(0, n.bit_length() - 1)


class _Gradients:
    """The gradients of input, weight and bias. Input and bias: a chunk of rows at a time (add). Weight:
    in float32/float64, summed over the chunks inside the GEMM (addmm_). In 16 bits that running sum
    would be rounded once per chunk (about 5x torch's error at 64 chunks) and a float32 one would
    take twice the weight's memory, so it is formed once every row's statistics are known, a block of
    classes at a time (result): each block's logits again, their gradient (the backward op on a block
    of columns), and its rows of the weight gradient in one GEMM over all the rows, rounded once. One
    more matmul than the row chunks need, and no weight-sized temporary."""

    def __init__(self, needs: tuple[bool, bool, bool], input: Tensor, linear_weight: Tensor, acc: torch.dtype):
        self.input = torch.empty_like(input) if needs[0] else None
        self.by_classes = needs[1] and linear_weight.dtype != acc
        self.weight = torch.zeros_like(linear_weight) if needs[1] and not self.by_classes else None
        self.bias = torch.zeros(linear_weight.shape[0], dtype=acc, device=input.device) if needs[2] else None

    def add(self, part: slice, grad_logits: Tensor, input: Tensor, linear_weight: Tensor) -> None:
        if self.input is not None:
            torch.mm(grad_logits, linear_weight, out=self.input[part])  # rows of input: contiguous
        if self.weight is not None:
            self.weight.addmm_(grad_logits.t(), input[part])
        if self.bias is not None:
            self.bias += grad_logits.sum(0, dtype=self.bias.dtype)

    def result(self, rows_grad: Tensor, chunk: int, saved: tuple, ignore_index: int, eps: float, options) -> tuple:
        """(input, weight, bias) gradients; rows_grad: each row's grad_output; chunk: rows per chunk."""
        input, linear_weight, linear_bias, target, weight, stats = saved
        weight_grad = self.weight
        if self.by_classes:
            n, classes = input.shape[0], linear_weight.shape[0]
            # A block's logits and their gradient together take half a chunk's memory.
            block = _power_of_two_at_most(chunk * classes // (4 * max(1, n)))
            weight_grad = torch.empty_like(linear_weight)
            for start in range(0, classes, block):
                cols = slice(start, start + block)
                logits = torch.nn.functional.linear(
                    input, linear_weight[cols], None if linear_bias is None else linear_bias[cols]
                )
                grad_logits = torch.ops.fused_softmax.cross_entropy_bwd(
                    rows_grad, logits, target, weight, stats, ignore_index, eps, 0, *options, start, classes
                )
                torch.mm(grad_logits.t(), input, out=weight_grad[cols])
        bias = None if self.bias is None else self.bias.to(linear_bias.dtype)
        return self.input, weight_grad, bias


class _LinearCrossEntropy(torch.autograd.Function):
    """For 'mean' and 'sum' the gradient is known up to grad_output (one number) during the forward:
    the in-place op turns each chunk's logits into their gradient (for a summed loss) as it computes
    the loss, and the first backward only scales the formed gradients, in place. For 'none' each
    row's grad_output differs, so the backward recomputes each chunk's logits; so does a second
    backward through the same graph (retain_graph)."""

    @staticmethod
    def forward(
        ctx, input, linear_weight, linear_bias, target, weight, ignore_index, eps, reduction, chunk, options,
        predictions,
    ):  # fmt: skip
        n = input.shape[0]
        acc = accumulate_dtype(input.dtype)
        needs = tuple(ctx.needs_input_grad[:3])
        precompute = reduction != 0 and any(needs)
        if reduction == 1:
            divisor = mean_divisor(target, weight, ignore_index, acc)
            # What the gradients are divided by. torch's gradient of an ignored row is 0, not 0 * (1 / 0): with
            # every row ignored (an all-padding batch) 'mean' divides the loss by 0 (NaN, as torch's) but the
            # gradients, zero sums of ignored rows, by infinity. A row kept with weight 0 stays NaN, as torch's.
            kept = (target != ignore_index).any() if not target.is_floating_point() else divisor > 0
            grad_divisor = torch.where(kept, divisor, torch.inf)
        else:
            divisor = grad_divisor = torch.ones((), dtype=acc, device=input.device)
        if precompute:
            grads = _Gradients(needs, input, linear_weight, acc)
        losses = input.new_empty((n,), dtype=acc)
        stats = input.new_empty((n, 2), dtype=acc)
        # One buffer for every chunk's logits: a fresh one per chunk cost ~10% more in page faults.
        buffer = input.new_empty((min(n, chunk), linear_weight.shape[0]))
        for start in range(0, n, chunk):
            part = slice(start, start + chunk)
            logits = _linear(input[part], linear_weight, linear_bias, buffer)
            chunk_predictions = None if predictions is None else predictions[part]
            if precompute:  # logits become d(sum of the chunk's losses) / d logits
                losses[part], stats[part] = torch.ops.fused_softmax.cross_entropy_fwd_inplace(
                    logits, target[part], weight, ignore_index, eps, 0, *options, chunk_predictions
                )
                grads.add(part, logits, input, linear_weight)
            else:
                losses[part], stats[part] = torch.ops.fused_softmax.cross_entropy_fwd(
                    logits, target[part], weight, ignore_index, eps, 0, *options, chunk_predictions
                )
        buffer = logits = None  # freed before the weight gradient's blocks
        saved = (input, linear_weight, linear_bias, target, weight, stats)
        ctx.grads = None
        if precompute:  # attributes, not saved tensors: backward scales them in place
            unit = torch.ones(n, dtype=acc, device=input.device)
            ctx.grads = [g for g in grads.result(unit, chunk, saved, ignore_index, eps, options) if g is not None]
        ctx.save_for_backward(*saved, grad_divisor)
        ctx.options = (ignore_index, eps, reduction, chunk, options)
        ctx.mark_non_differentiable(stats)
        return (losses if reduction == 0 else losses.sum() / divisor), stats

    @staticmethod
    def backward(ctx, grad_output, _grad_stats):
        no_grads = (None,) * 8
        *saved, grad_divisor = ctx.saved_tensors
        input, linear_weight, linear_bias, target, weight, stats = saved
        needs = tuple(ctx.needs_input_grad[:3])
        ignore_index, eps, reduction, chunk, options = ctx.options
        rows_grad = grad_output if reduction == 0 else (grad_output / grad_divisor).expand(input.shape[0])
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
            ctx.grads = None
            return (*_gradients_with_graph(saved, needs, rows_grad, ignore_index, eps, options), *no_grads)
        if ctx.grads is not None:  # handed over, scaled in place: a second (C, H) weight gradient would double the peak
            formed = iter(g.mul_(grad_output / grad_divisor) for g in ctx.grads)
            ctx.grads = None  # the caller owns them now; a later backward recomputes
            return (*(next(formed) if need else None for need in needs), *no_grads)
        rows_grad = rows_grad.to(stats.dtype).contiguous()
        grads = _Gradients(needs, input, linear_weight, stats.dtype)
        for start in range(0, input.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = torch.nn.functional.linear(input[part], linear_weight, linear_bias)
            grad_logits = torch.ops.fused_softmax.cross_entropy_bwd(
                rows_grad[part], logits, target[part], weight, stats[part], ignore_index, eps, 0, *options
            )
            del logits
            grads.add(part, grad_logits, input, linear_weight)
            del grad_logits
        return (*grads.result(rows_grad, chunk, saved, ignore_index, eps, options), *no_grads)


def _gradients_with_graph(saved: tuple, needs: tuple, rows_grad: Tensor, ignore_index: int, eps: float, options):
    """(input, weight, bias) gradients that autograd can differentiate again (create_graph=True): the
    logits are formed whole, once, and differentiated through the fused op, whose backward is
    differentiable itself (fused_softmax/_ops.py). Second derivatives hold the N x C logits."""
    input, linear_weight, linear_bias, target, weight, _stats = saved
    logits = torch.nn.functional.linear(input, linear_weight, linear_bias)
    losses, _ = _ops.forward(logits, target, weight, ignore_index, eps, "none", *options)
    wrt = [t for t, need in zip((input, linear_weight, linear_bias), needs, strict=True) if need]
    found = iter(torch.autograd.grad(losses, wrt, rows_grad.to(losses.dtype), create_graph=True))
    return tuple(next(found) if need else None for need in needs)
