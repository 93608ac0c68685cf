"""fused_softmax.cross_entropy of DTensor logits (torch.distributed.tensor) on a 1-D device mesh.

Sharded on the class dimension (Shard(1), or Shard(0) of unbatched (C,) logits: what a column-parallel
LM head gives), each rank's slice goes through the vocab-parallel loss (fused_softmax.distributed):
no all-gather of the logits, and autograd returns the gradient as a DTensor of the logits' placement
(through to_local). Replicated logits go through the ordinary op on every rank; batch-sharded ones
(Shard(0)) through it on each rank's rows, reduced over the mesh. The loss comes back as a DTensor:
replicated, or sharded by rows for reduction='none' of batch-sharded logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._shared import accumulate_dtype, mean_divisor


def is_dtensor(t: object) -> bool:
    """Whether t is a DTensor (torch.distributed.tensor is imported only for a Tensor subclass)."""
    if type(t) is Tensor or not isinstance(t, Tensor) or not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    logit_scale: float,
    return_predictions: bool,
):
    """fused_softmax.cross_entropy's DTensor case (its arguments already converted)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    from .functional import cross_entropy as local_cross_entropy

    mesh = input.device_mesh
    if mesh.ndim != 1:
        raise ValueError(f"cross_entropy: input: expected a DTensor on a 1-D device mesh, got a {mesh.ndim}-D mesh")
    (placement,) = input.placements
    class_dim = 0 if input.dim() == 1 else 1
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    batch_sharded = placement.is_shard(0) and class_dim == 1
    if isinstance(target, DTensor):
        expected = Shard(0) if batch_sharded else Replicate()
        if target.device_mesh != mesh or target.placements != (expected,):
            raise ValueError(
                f"cross_entropy: target: expected a DTensor placed {expected} on input's mesh for logits placed "
                f"{placement}, got one placed {target.placements}"
            )
        target = target.to_local()
    elif batch_sharded:
        raise ValueError("cross_entropy: target: batch-sharded logits need a DTensor target sharded the same way")
    options = dict(z_loss=z_loss, softcap=softcap, logit_scale=logit_scale)

    def as_dtensor(t: Tensor | None, placements) -> Tensor | None:
        return None if t is None else DTensor.from_local(t, mesh, placements, run_check=False)

    def rows_sharded(t: Tensor | None) -> Tensor | None:  # per-row results of batch-sharded logits (uneven shards)
        if t is None:
            return None
        shape = input.shape[:1] + input.shape[2:]
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(t, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)

    def loss_and_predictions(out) -> tuple[Tensor, Tensor | None]:
        return (out.loss, out.predictions) if return_predictions else (out, None)

    if placement.is_shard(class_dim) and not target.is_floating_point():  # the vocab-parallel loss
        from .distributed import vocab_parallel_cross_entropy

        local = input.to_local()  # differentiable: its gradient comes back as a DTensor placed as input
        unbatched = input.dim() == 1
        rows_shape = target.shape
        if unbatched:
            local, target = local.unsqueeze(0), target.unsqueeze(0)
        elif local.dim() > 2:
            local, target = local.movedim(1, -1).reshape(-1, local.shape[1]), target.reshape(-1)
        loss, predictions = loss_and_predictions(vocab_parallel_cross_entropy(
            local, target, mesh.get_group(), weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, return_predictions=return_predictions, **options,
        ))  # fmt: skip
        loss = loss.reshape(rows_shape) if reduction == "none" else loss
        predictions = None if predictions is None else predictions.reshape(rows_shape)
        return _result(as_dtensor(loss, [Replicate()]), as_dtensor(predictions, [Replicate()]))

    if placement.is_replicate() or placement.is_shard(class_dim):  # every rank has the whole problem
        local = input.to_local() if placement.is_replicate() else input.full_tensor()
        loss, predictions = loss_and_predictions(local_cross_entropy(
            local, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
            return_predictions=return_predictions, **options,
        ))  # fmt: skip
        return _result(as_dtensor(loss, [Replicate()]), as_dtensor(predictions, [Replicate()]))

    if not batch_sharded:
        raise ValueError(
            f"cross_entropy: input: DTensor logits placed {placement} are not supported; expected them sharded on "
            "the class dimension or the batch dimension, or replicated"
        )
    # Batch-sharded: each rank's rows, reduced over the mesh. 'mean' divides by D, the summed weights of the
    # rows kept on every rank, the z-loss scaled by D / (rows kept) so that it is divided by their count (as
    # the ordinary op does: mean_z_loss).
    local = input.to_local()
    if reduction == "mean":
        acc = accumulate_dtype(local.dtype)
        if target.is_floating_point():  # every row counts
            divisor = rows_kept = torch.tensor(float(local.numel() // local.shape[1]), dtype=acc, device=local.device)
        else:
            divisor = mean_divisor(target.reshape(-1), weight, ignore_index, acc)
            rows_kept = (target != ignore_index).sum().to(acc)
        counts = torch.stack([divisor, rows_kept])
        dist.all_reduce(counts, group=mesh.get_group())
        divisor = counts[0]
        if z_loss and weight is not None and not target.is_floating_point() and counts[1] > 0:
            options["z_loss"] = z_loss * float(counts[0] / counts[1])
    rows, predictions = loss_and_predictions(local_cross_entropy(
        local, target, weight, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing,
        return_predictions=return_predictions, **options,
    ))  # fmt: skip
    if reduction == "none":
        return _result(rows_sharded(rows), rows_sharded(predictions))
    loss = as_dtensor(rows.sum(), [Partial()]).redistribute(mesh, [Replicate()])
    if reduction == "mean":
        loss = loss / as_dtensor(divisor.to(loss.dtype), [Replicate()])
    return _result(loss, rows_sharded(predictions))


def _result(loss: Tensor, predictions: Tensor | None):
    """The loss, or with predictions both, as the functional API returns them."""
    from .functional import CrossEntropyOutput

    return loss if predictions is None else CrossEntropyOutput(loss, None, None, predictions)
