"""vocab_parallel_cross_entropy on 2 gloo processes against the single-process op on the gathered logits."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fused_softmax
from fused_softmax.distributed import vocab_parallel_cross_entropy

WORLD = 2
CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none", label_smoothing=0.3, ignore_index=5),
]


def problem(
    dtype: torch.dtype, ignore_index: int, c_local: int = 300, n: int = 23
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(n, WORLD * c_local, generator=g, dtype=torch.float64) * 4).to(dtype)
    logits[3, c_local:] = float("-inf")  # a row that one rank sees as all -inf
    target = torch.randint(0, WORLD * c_local, (n,), generator=g)
    target[::4] = ignore_index
    target[1] = 5
    return logits, target


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for k, case in enumerate(CASES):
                logits, target = problem(dtype, case.get("ignore_index", -100))
                c_local = logits.shape[1] // WORLD
                local = logits[:, rank * c_local : (rank + 1) * c_local].clone().requires_grad_()
                loss = vocab_parallel_cross_entropy(local, target, **case)
                v = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
                (loss.double() * v).sum().backward()
                torch.save({"loss": loss.detach(), "grad": local.grad}, os.path.join(out_dir, f"{rank}-{dtype}-{k}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_the_gathered_logits(tmp_path):
    mp.start_processes(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    for dtype in (torch.float32, torch.bfloat16):
        for k, case in enumerate(CASES):
            logits, target = problem(dtype, case.get("ignore_index", -100))
            c_local = logits.shape[1] // WORLD
            x = logits.clone().requires_grad_()
            expected = fused_softmax.cross_entropy(x, target, **case)
            v = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).reshape(expected.shape)
            (expected.double() * v).sum().backward()
            x64 = logits.double().requires_grad_()
            exact = fused_softmax.cross_entropy(x64, target, **case)
            (exact * v).sum().backward()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            for rank in range(WORLD):
                got = torch.load(tmp_path / f"{rank}-{dtype}-{k}.pt")
                assert got["loss"].dtype == dtype
                # Both sides round to dtype once; each is within dtype's rounding of the float64 result.
                torch.testing.assert_close(got["loss"].double(), exact.detach(), rtol=tol, atol=tol)
                torch.testing.assert_close(got["loss"], expected.detach(), rtol=tol, atol=tol)
                part = slice(rank * c_local, (rank + 1) * c_local)
                torch.testing.assert_close(got["grad"].double(), x64.grad[:, part], rtol=tol, atol=tol * 1e-2)
                torch.testing.assert_close(got["grad"], x.grad[:, part], rtol=tol, atol=tol * 1e-2)


def test_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
