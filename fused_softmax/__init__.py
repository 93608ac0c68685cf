"""fused_softmax: a fused softmax cross-entropy for PyTorch, with C++ CPU and CUDA kernels.

import fused_softmax
loss = fused_softmax.cross_entropy(logits, target)  # as torch.nn.functional.cross_entropy
fused_softmax.distributed.vocab_parallel_cross_entropy  # classes split over ranks
"""

from . import distributed
from ._ops import backend, empty_cache
from .functional import CrossEntropyOutput, cross_entropy
from .linear import linear_cross_entropy
from .modules import CrossEntropyLoss

__all__ = [
    "CrossEntropyLoss",
    "CrossEntropyOutput",
    "backend",
    "cross_entropy",
    "distributed",
    "empty_cache",
    "linear_cross_entropy",
]
__version__ = "0.1.0"
