"""Hugging Face transformers through fused_softmax (needs `pip install transformers`).

Two switches, each undone by the handle it returns (also a context manager):

    from fused_softmax.integrations.transformers import use_fused_loss_functions, use_linear_cross_entropy

    use_linear_cross_entropy(model)   # this causal LM's training loss from its hidden states:
                                      # linear_cross_entropy, no (tokens x vocab) logits
    use_fused_loss_functions()        # transformers' loss mapping (ForCausalLM, ForSequenceClassification,
                                      # ...) computes its cross-entropy with fused_softmax.cross_entropy

Both keep transformers' semantics: labels shifted by one for causal LMs (or `shift_labels` as
given), -100 ignored, `num_items_in_batch` (sum, then divided by it: gradient accumulation), and
a model's `final_logit_softcapping`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers.loss import loss_utils

from ..functional import cross_entropy
from ..linear import linear_cross_entropy

IGNORE_INDEX = -100  # transformers' label padding

# Causal LMs whose forward is the standard one: base model -> final hidden states -> lm_head (-> the
# final logit softcap, Gemma 2) -> self.loss_function(logits, labels, vocab_size, **kwargs).
LINEAR_CROSS_ENTROPY_MODELS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
)


class Patch:
    """A switch that is on until undo() (or the end of a `with` block)."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    def undo(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


# --- the loss-function switch -----------------------------------------------------------------


def fixed_cross_entropy(
    source: Tensor,
    target: Tensor,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    **kwargs,
) -> Tensor:
    """transformers' fixed_cross_entropy, fused: 'mean', or with num_items_in_batch the sum divided by it."""
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = cross_entropy(source, target, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def shifted_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Token t's label is token t + 1's: shifted left, the last position padded with ignore_index."""
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """transformers' ForCausalLMLoss, fused. The logits are not copied to float32 first (transformers
    does): the fused loss reads 16-bit logits and accumulates in float32 itself."""
    if shift_labels is None:
        shift_labels = shifted_labels(labels, ignore_index)
    target = shift_labels.reshape(-1).to(logits.device)
    return fixed_cross_entropy(logits.reshape(-1, vocab_size), target, num_items_in_batch, ignore_index, **kwargs)


def use_fused_loss_functions() -> Patch:
    """Makes transformers' loss mapping compute its cross-entropies with fused_softmax.cross_entropy:
    every loss built on transformers' fixed_cross_entropy (ForCausalLM, ForMaskedLM,
    ForSequenceClassification, ForTokenClassification, ForQuestionAnswering, ...), for every model
    whose loss_function comes from the mapping. Returns the handle that undoes it."""
    original_fixed = loss_utils.fixed_cross_entropy
    original_causal = loss_utils.ForCausalLMLoss
    replaced = {name: f for name, f in loss_utils.LOSS_MAPPING.items() if f is original_causal}
    loss_utils.fixed_cross_entropy = fixed_cross_entropy  # the For* losses look it up when called
    loss_utils.LOSS_MAPPING.update(dict.fromkeys(replaced, causal_lm_loss))

    def undo() -> None:
        loss_utils.fixed_cross_entropy = original_fixed
        for name, f in replaced.items():
            if loss_utils.LOSS_MAPPING.get(name) is causal_lm_loss:
                loss_utils.LOSS_MAPPING[name] = f

    return Patch(undo)


# --- the linear cross-entropy switch ----------------------------------------------------------


def use_linear_cross_entropy(model: nn.Module) -> Patch:
    """Makes this causal LM (one of LINEAR_CROSS_ENTROPY_MODELS) compute its loss with
    fused_softmax.linear_cross_entropy on the final hidden states when it is called with labels in
    training mode: no (tokens x vocab) logits are formed, and the output's logits are None. In eval
    mode, without labels (generation), with logits_to_keep, or called with return_logits=True, the
    model runs as it did (its logits, and its own loss from them). Returns the handle that undoes it."""
    name = type(model).__name__
    if name not in LINEAR_CROSS_ENTROPY_MODELS or not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise ValueError(
            f"use_linear_cross_entropy: model: {name} is not one of the causal LMs whose forward this switch "
            f"knows ({', '.join(LINEAR_CROSS_ENTROPY_MODELS)}); use_fused_loss_functions() serves any model "
            "that computes its loss through transformers' loss mapping"
        )
    if "forward" in vars(model):
        raise ValueError(f"use_linear_cross_entropy: model: this {name}'s forward is already replaced")
    original = type(model).forward.__get__(model)

    @functools.wraps(original)  # its signature: Trainer reads which arguments the model takes
    def forward(*args, **kwargs):
        return _linear_cross_entropy_forward(model, original, *args, **kwargs)

    model.forward = forward

    def undo() -> None:
        if vars(model).get("forward") is not None:
            del model.forward

    return Patch(undo)


def _check_head(head: nn.Module) -> None:
    """The loss reads lm_head's weight itself and never calls lm_head: refused where calling it would
    have done more (hooks: FSDP gathering a sharded weight, accelerate moving it) or the weight is not
    the whole matrix."""
    hooked = head._forward_pre_hooks or head._forward_hooks or hasattr(head, "_hf_hook")
    if hooked or type(head.weight) is not nn.Parameter or type(head.weight.data) is not Tensor:
        raise ValueError(
            "use_linear_cross_entropy: model.lm_head has forward hooks or a sharded weight (FSDP, tensor "
            "parallelism, accelerate offloading), which the fused loss would bypass; undo the switch and "
            "use_fused_loss_functions() instead"
        )


class _HiddenStates(nn.Module):
    """Stands in for lm_head for one call: keeps the final hidden states and hands them on (so the
    model's own forward runs unchanged, and forms no vocabulary-sized tensor)."""

    def forward(self, hidden: Tensor) -> Tensor:
        self.hidden = hidden
        return hidden


def _linear_cross_entropy_forward(
    self, original: Callable, *args, labels: Tensor | None = None, return_logits: bool = False, **kwargs
):
    keep = kwargs.get("logits_to_keep", 0)
    fused = labels is not None and self.training and not return_logits and isinstance(keep, int) and keep == 0
    if not fused:
        return original(*args, labels=labels, **kwargs)
    head = self.lm_head
    _check_head(head)
    return_dict = kwargs.pop("return_dict", None)
    capture = _HiddenStates()
    self.lm_head = capture
    try:
        outputs = original(*args, return_dict=True, **kwargs)  # no labels: the model computes no loss
    finally:
        self.lm_head = head
    hidden = capture.hidden
    del capture.hidden
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:
        shift_labels = shifted_labels(labels)
    num_items = kwargs.get("num_items_in_batch")
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        shift_labels.reshape(-1).to(hidden.device),
        linear_bias=head.bias,
        reduction="mean" if num_items is None else "sum",
        ignore_index=IGNORE_INDEX,
        softcap=getattr(self.config, "final_logit_softcapping", None),
    )
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    outputs = type(outputs)(loss=loss, **{k: v for k, v in outputs.items() if k != "logits"})  # loss first
    return outputs if return_dict is not False else outputs.to_tuple()


__all__ = [
    "LINEAR_CROSS_ENTROPY_MODELS",
    "Patch",
    "causal_lm_loss",
    "fixed_cross_entropy",
    "use_fused_loss_functions",
    "use_linear_cross_entropy",
]
