"""Fused linear cross-entropy (chunked, no N x C logits) against matmul + cross-entropy: time and peak
extra memory of forward+backward, side by side in one process.

    python benchmarks/bench_linear_cross_entropy.py --n 2048 --hidden 1024 --classes 32000 --threads 2

Rows (median, p20, p80, peak) are appended to --csv (default runs/benchmarks/linear_cross_entropy.csv,
untracked) with the machine and settings; benchmarks/results/linear_cross_entropy.csv is the record.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_cross_entropy import DTYPES, PeakMemory, Timer, add_run_arguments, append_row, machine

import fused_softmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--providers", default="fused,matmul+torch,matmul+fused,torch.linear_ce")
    add_run_arguments(parser, "runs/benchmarks/linear_cross_entropy.csv")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    timer, memory = Timer(args.device), PeakMemory(args.device)
    host = machine(args.device)
    print("machine:", host)
    path = Path(args.csv)
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    providers = {
        "fused": lambda x, w, t: fused_softmax.linear_cross_entropy(x, w, t),
        "matmul+torch": lambda x, w, t: F.cross_entropy(x @ w.t(), t),
        "matmul+fused": lambda x, w, t: fused_softmax.cross_entropy(x @ w.t(), t),
    }
    if hasattr(F, "linear_cross_entropy"):  # torch >= 2.13
        providers["torch.linear_ce"] = lambda x, w, t: F.linear_cross_entropy(x, w, t)
    providers = {k: v for k, v in providers.items() if k in args.providers.split(",")}
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        x0 = torch.randn(args.n, args.hidden, device=args.device).to(dtype)
        w0 = (torch.randn(args.classes, args.hidden, device=args.device) / args.hidden**0.5).to(dtype)
        t = torch.randint(0, args.classes, (args.n,), device=args.device)
        logits_mib = args.n * args.classes * x0.element_size() / 2**20
        print(f"{name} N={args.n} hidden={args.hidden} C={args.classes}: the logits would take {logits_mib:.0f} MiB")
        base = None
        for provider, fn in providers.items():

            def setup(x0=x0, w0=w0):
                return x0.clone().requires_grad_(True), w0.clone().requires_grad_(True)

            def timed(state, fn=fn, t=t):
                fn(state[0], state[1], t).backward()

            times = timer(setup, timed, args.reps, args.warmup)
            state = setup()
            memory.start()
            timed(state)
            peak = memory.stop_mib()  # includes the gradients of input and weight that every provider makes
            median = statistics.median(times)
            base = base or (median, peak)
            print(f"  {provider:13} fwd+bwd {median:9.1f} ms (x{median / base[0]:.2f})   peak extra {peak:8.1f} MiB")
            p20, p80 = (statistics.quantiles(times, n=5)[i] for i in (0, 3)) if len(times) > 1 else (median, median)
            append_row(
                path,
                dict(machine=json.dumps(host), time=when, device=args.device, dtype=name, n=args.n,
                     hidden=args.hidden, c=args.classes, provider=provider, median_ms=median, p20_ms=p20,
                     p80_ms=p80, peak_mib=peak, note=args.note),
            )  # fmt: skip


if __name__ == "__main__":
    main()
