"""fused_softmax.CrossEntropyLoss: torch.nn.CrossEntropyLoss computed by the fused kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """Drop-in for torch.nn.CrossEntropyLoss (same arguments, buffers and state dict)."""

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
