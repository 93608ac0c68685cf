"""fused_softmax.CrossEntropyLoss: torch.nn.CrossEntropyLoss computed by the fused kernels."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .functional import check_options, cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (same arguments, buffers and state dict), plus the
    keyword-only options of fused_softmax.cross_entropy that shape the loss: z_loss, softcap,
    logit_scale, and inplace_backward (see cross_entropy for each)."""

    def __init__(
        self,
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
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        check_options("CrossEntropyLoss", z_loss, softcap, logit_scale)
        self.z_loss, self.softcap, self.logit_scale = z_loss, softcap, logit_scale
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            logit_scale=self.logit_scale,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        """The options beyond torch's that differ from their defaults."""
        options = inspect.signature(CrossEntropyLoss.__init__).parameters.values()
        return ", ".join(
            f"{o.name}={getattr(self, o.name)}"
            for o in options
            if o.kind is o.KEYWORD_ONLY and getattr(self, o.name) != o.default
        )
