"""One training step (forward + backward) of a transformers causal LM: the unpatched model against
fused_softmax's two switches (fused_softmax.integrations.transformers), time and peak extra memory,
side by side in one process. The model is a small random Llama with a large vocabulary, where the
(tokens x vocab) logits are most of a step's memory.

    python benchmarks/bench_transformers.py --vocab 128256 --tokens 2048 --hidden 256 --threads 2

Rows are appended to --csv (default runs/benchmarks/transformers.csv, untracked) with the machine and
settings; benchmarks/results/transformers.csv is the record.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from pathlib import Path

import torch
from bench_cross_entropy import PeakMemory, Timer, add_run_arguments, append_row, machine, quantiles
from transformers import LlamaConfig, LlamaForCausalLM

from fused_softmax.integrations.transformers import use_fused_loss_functions, use_linear_cross_entropy

PROVIDERS = {
    "transformers": lambda model: contextlib.nullcontext(),
    "fused-loss": lambda model: use_fused_loss_functions(),
    "fused-linear": use_linear_cross_entropy,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens in the step (2 sequences)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16-autocast")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    add_run_arguments(parser, "runs/benchmarks/transformers.csv")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timer, memory = Timer(args.device), PeakMemory(args.device)
    host = machine(args.device)
    print("machine:", host)
    path = Path(args.csv)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(args.device).train()
    ids = torch.randint(0, args.vocab, (2, args.tokens // 2), device=args.device)
    for dtype_name in args.dtypes.split(","):
        autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=dtype_name == "bf16-autocast")

        def step(provider: str, autocast=autocast) -> float:
            model.zero_grad(set_to_none=True)  # every provider allocates the same gradients
            with PROVIDERS[provider](model), autocast:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss.item()

        providers = args.providers.split(",")
        losses = {p: step(p) for p in providers}  # warm-up, and the losses agree
        print(f"{dtype_name} vocab={args.vocab} tokens={args.tokens}: losses {losses}")
        peaks = {}
        for provider in providers:
            model.zero_grad(set_to_none=True)
            memory.start()
            step(provider)
            peaks[provider] = memory.stop_mib()
        times = timer.interleaved({p: (lambda: None, lambda _, p=p: step(p)) for p in providers}, args.reps)
        base = times[providers[0]]
        for provider in providers:
            median, p20, p80 = quantiles(times[provider])
            print(
                f"  {provider:13} step {median:9.1f} ms (x{median / quantiles(base)[0]:.2f})   "
                f"peak extra {peaks[provider]:8.1f} MiB"
            )
            append_row(
                path,
                dict(machine=json.dumps(host), time=when, device=args.device, dtype=dtype_name, vocab=args.vocab,
                     tokens=args.tokens, hidden=args.hidden, layers=args.layers, provider=provider,
                     median_ms=median, p20_ms=p20, p80_ms=p80, peak_mib=peaks[provider], note=args.note),
            )  # fmt: skip


if __name__ == "__main__":
    main()
