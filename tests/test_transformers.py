"""fused_softmax.integrations.transformers on tiny randomly initialised models (nothing is downloaded):
the loss and every parameter's gradient equal transformers' own, in float32 and under bfloat16 autocast,
with padding, shift_labels and gradient accumulation (num_items_in_batch); a short transformers.Trainer
run; the switches undo cleanly and refuse what they do not know."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the test extra installs it: see pyproject.toml

from transformers.loss import loss_utils  # noqa: E402

import fused_softmax.integrations.transformers as integration  # noqa: E402

VOCAB = 301
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
)  # fmt: skip
MODELS = {
    "Llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "Mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {}),
    "Qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "Qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 8}),
    # Gemma 2 caps its final logits (final_logit_softcapping): the fused loss applies the same cap
    "Gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        {"head_dim": 8, "final_logit_softcapping": 5.0},
    ),  # fmt: skip
}


def tiny(name: str, seed: int = 0):
    config_class, model_class, extra = MODELS[name]
    torch.manual_seed(seed)
    return model_class(config_class(**COMMON, **extra)).train()


def batch(seed: int = 1, rows: int = 3, length: int = 9) -> dict:
    """Token ids, an attention mask with left padding on one row, and labels with -100 on the padding
    and on a prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def loss_and_grads(model, inputs: dict, dtype: torch.dtype | None = None, **kwargs):
    model.zero_grad()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        out = model(**inputs, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours, theirs, rtol: float, atol: float) -> None:
    (out, grads), (their_out, their_grads) = ours, theirs
    torch.testing.assert_close(out.loss, their_out.loss, rtol=rtol, atol=atol)
    assert grads.keys() == their_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name", list(MODELS))
def test_linear_cross_entropy_gives_transformers_loss_and_gradients(name):
    model, inputs = tiny(name), batch()
    theirs = loss_and_grads(model, inputs)
    with integration.use_linear_cross_entropy(model):
        ours = loss_and_grads(model, inputs)
        assert ours[0].logits is None  # never formed
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["Llama", "Gemma2"])
def test_bfloat16_autocast(name):
    """Under autocast both sides form the logits in bfloat16 and the loss in float32, and the gradients go
    through bfloat16 matmuls: each is within twice transformers' own error of the float64 model's."""
    model = tiny(name)
    inputs = {k: v for k, v in batch().items() if k != "attention_mask"}  # in float64 its masked rows are NaN
    theirs = loss_and_grads(model, inputs, torch.bfloat16)
    with integration.use_linear_cross_entropy(model):
        ours = loss_and_grads(model, inputs, torch.bfloat16)
    assert ours[0].loss.dtype == theirs[0].loss.dtype == torch.float32
    if name == "Llama":  # the same bfloat16 logits, the loss in float32 on both sides (Gemma 2: see below)
        torch.testing.assert_close(ours[0].loss, theirs[0].loss)
    # Gemma 2's softcap runs in bfloat16 in transformers (1.7e-5 off in the loss here), in float32 in ours.
    exact = loss_and_grads(tiny(name).double(), inputs)
    pairs = [("loss", ours[0].loss, theirs[0].loss, exact[0].loss)]
    pairs += [(n, g, theirs[1][n], exact[1][n]) for n, g in ours[1].items()]
    for name, a, b, ref in pairs:
        error, their_error = (a.double() - ref).abs().max(), (b.double() - ref).abs().max()
        assert error <= 2 * their_error + 1e-6, f"{name}: error {error:.3g}, transformers' {their_error:.3g}"


def test_gradient_accumulation_and_shift_labels():
    """num_items_in_batch (Trainer's sum-then-divide over micro-batches) and labels already shifted."""
    model = tiny("Llama")
    micro = [batch(seed) for seed in (1, 2)]
    items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)

    def accumulated(**kwargs):
        model.zero_grad()
        total = 0.0
        for b in micro:
            loss = model(**b, num_items_in_batch=torch.tensor(items), **kwargs).loss
            loss.backward()
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in model.named_parameters()}

    theirs = accumulated()
    with integration.use_linear_cross_entropy(model):
        ours = accumulated()
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    inputs = batch()
    shifted = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    shifted[2, 5] = -100  # not what the shift of labels gives: shift_labels wins
    theirs = loss_and_grads(model, inputs, shift_labels=shifted)
    with integration.use_linear_cross_entropy(model):
        ours = loss_and_grads(model, inputs, shift_labels=shifted)
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


def test_logits_still_come_when_asked():
    """Eval mode, no labels, return_logits=True and generation: the model as it was."""
    model, inputs = tiny("Qwen2"), batch()
    with torch.no_grad():
        expected = model(**inputs)
        model.eval()
        generated = model.generate(inputs["input_ids"][1:], max_new_tokens=4, do_sample=False)
        with integration.use_linear_cross_entropy(model):
            evaluated = model(**inputs)
            assert torch.equal(model.generate(inputs["input_ids"][1:], max_new_tokens=4, do_sample=False), generated)
            model.train()
            asked = model(**inputs, return_logits=True)
            as_tuple = model(**inputs, return_dict=False)
    for out in (evaluated, asked):
        torch.testing.assert_close(out.logits, expected.logits)
        torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(as_tuple[0], expected.loss)


def test_switches_undo_cleanly_and_refuse_unknown_models():
    model = tiny("Llama")
    patch = integration.use_linear_cross_entropy(model)
    with pytest.raises(ValueError, match="already replaced"):
        integration.use_linear_cross_entropy(model)
    patch.undo()
    patch.undo()  # twice is harmless
    assert "forward" not in vars(model)
    mapping = dict(loss_utils.LOSS_MAPPING)
    fixed = loss_utils.fixed_cross_entropy
    with integration.use_fused_loss_functions():
        assert loss_utils.LOSS_MAPPING["ForCausalLM"] is integration.causal_lm_loss
        assert loss_utils.fixed_cross_entropy is integration.fixed_cross_entropy
    assert loss_utils.LOSS_MAPPING == mapping and loss_utils.fixed_cross_entropy is fixed
    with integration.use_linear_cross_entropy(model):  # a hook it would bypass: refused, not skipped
        handle = model.lm_head.register_forward_pre_hook(lambda module, args: None)
        with pytest.raises(ValueError, match="lm_head has forward hooks or a sharded weight"):
            model(**batch())
        handle.remove()
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not one of .*LlamaForCausalLM.*use_fused_loss_functions"):
        integration.use_linear_cross_entropy(gpt2)


def test_loss_functions_switch_serves_causal_lm_and_sequence_classification(monkeypatch):
    """Through transformers' loss mapping: the fused cross_entropy is what runs, and it gives their loss."""
    calls = []
    fused = integration.cross_entropy
    monkeypatch.setattr(integration, "cross_entropy", lambda *a, **k: calls.append(1) or fused(*a, **k))
    model, inputs = tiny("Mistral"), batch()
    theirs = loss_and_grads(model, inputs, num_items_in_batch=torch.tensor(11))
    with integration.use_fused_loss_functions():
        ours = loss_and_grads(model, inputs, num_items_in_batch=torch.tensor(11))
    assert calls and ours[0].logits is not None
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    classifier = transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(**COMMON, num_labels=4, pad_token_id=0)
    ).train()
    inputs = {"input_ids": batch()["input_ids"].clamp(min=1), "labels": torch.tensor([0, 3, 2])}
    theirs = loss_and_grads(classifier, inputs)
    calls.clear()
    with integration.use_fused_loss_functions():
        ours = loss_and_grads(classifier, inputs)
    assert calls
    assert_same(ours, theirs, rtol=1e-5, atol=1e-6)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(4)
        self.ids = torch.randint(0, 40, (n, 12), generator=g) * 7 % VOCAB  # a few tokens: learnable

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains_with_the_fused_loss(tmp_path):
    """transformers.Trainer, gradient accumulation on: the same logged losses as the unpatched model."""

    def run(patched: bool) -> list[float]:
        model = tiny("Llama", seed=3)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patched)), max_steps=6, per_device_train_batch_size=4,
            gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, report_to="none",
            save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens())
        if patched:
            with integration.use_linear_cross_entropy(model):
                trainer.train()
        else:
            trainer.train()
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    ours, theirs = run(True), run(False)
    assert len(ours) == 6 and ours[-1] < ours[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_the_library_does_not_import_transformers():
    """An optional integration: importing fused_softmax (and using it) never needs transformers."""
    code = "import sys, torch, fused_softmax; fused_softmax.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))\n"
    code += "assert 'transformers' not in sys.modules and 'fused_softmax.integrations' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
