"""What the fused path and the reference math share: the reduction codes, the accumulation dtype, the
logits as the softmax sees them, what 'mean' divides by, and the losses' argument conversions. (The
reference, fused_softmax.reference, is the tests' oracle and the fallback; the fused path takes none of
these from it.)"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

REDUCTIONS = ("none", "mean", "sum")  # the ops' reduction argument is the index here, as at::Reduction


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform(input: Tensor, logit_scale: float = 1.0, softcap: float = 0.0) -> Tensor:
    """The logits as the softmax sees them: scale * r, or cap * tanh(scale * r / cap); -inf stays -inf."""
    x = input * logit_scale if logit_scale != 1.0 else input
    if softcap > 0:
        x = torch.where(x == float("-inf"), x, torch.tanh(x / softcap) * softcap)
    return x


def mean_divisor(target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """What 'mean' divides by: the summed weights of the rows not ignored, or the row count for probabilities."""
    if target.is_floating_point():
        return torch.tensor(float(target.shape[0]), dtype=dtype, device=target.device)
    counted = target != ignore_index
    if weight is None:
        return counted.sum().to(dtype)
    return (weight.to(dtype)[torch.where(counted, target, 0)] * counted).sum()


def mean_z_loss(z_loss: float, target: Tensor, weight: Tensor | None, ignore_index: int, dtype: torch.dtype):
    """The z-loss coefficient of a 'mean' loss: z_loss * D / rows kept, so that dividing by D (mean_divisor)
    divides the z-loss by the rows not ignored, as the peers do (csrc/cross_entropy.h: with_mean_z_loss)."""
    if z_loss == 0 or weight is None or target.is_floating_point():
        return z_loss
    kept = (target != ignore_index).sum()
    return torch.where(kept > 0, z_loss * mean_divisor(target, weight, ignore_index, dtype) / kept, z_loss)


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips a dispatcher call on the common float32 path


def probabilities_as_read(target: Tensor, logits_dtype: torch.dtype) -> Tensor:
    """Class probabilities in the dtype the kernels read: the logits', but float32 for 16-bit logits
    with probabilities of another dtype (rounded to 16 bits, a few rows' losses lost digits: 4.5e-4
    relative error at 4 x 5 bf16, torch 2.6e-5)."""
    if target.dtype == logits_dtype:
        return target
    wide = logits_dtype in (torch.float16, torch.bfloat16)
    return target.to(torch.float32 if wide else logits_dtype)


def as_index(ignore_index) -> int:
    """ignore_index as a Python int: any integer torch takes (numpy's too), not a float or a bool."""
    if isinstance(ignore_index, bool):
        raise TypeError("cross_entropy: ignore_index: expected an int, got bool")
    try:
        return operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"cross_entropy: ignore_index: expected an int, got {type(ignore_index).__name__}") from None
