"""vocab_parallel_cross_entropy on 2 processes against the single-process op on the gathered logits: gloo on
the CPU, gloo with CUDA tensors (both ranks on one GPU), and nccl with a GPU per rank where there are two."""

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
# Keyword arguments and the ranks' slice widths; "weight": class weights for every class.
CASES = [
    (dict(reduction="mean"), (300, 300)),
    (dict(reduction="sum", label_smoothing=0.1), (300, 300)),
    (dict(reduction="none", label_smoothing=0.3, ignore_index=5), (300, 300)),
    (dict(reduction="mean", weight=True, label_smoothing=0.2), (173, 427)),
    (dict(reduction="none", z_loss=1e-3, softcap=8.0, logit_scale=0.8), (300, 300)),
    (dict(reduction="mean", weight=True, z_loss=1e-2, logit_scale=1.3, ignore_index=5), (427, 173)),
    (dict(reduction="mean", weight=True, label_smoothing=0.1), (0, 600)),  # a rank may hold no classes
    (dict(reduction="none", z_loss=1e-3, softcap=8.0), (600, 0)),
]


def problem(dtype: torch.dtype, case: dict, n: int = 23) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits of 600 classes, targets, and the case's keyword arguments with its class weights."""
    g = torch.Generator().manual_seed(7)
    classes = 600
    logits = (torch.randn(n, classes, generator=g, dtype=torch.float64) * 4).to(dtype)
    logits[3, 300:] = float("-inf")  # a row that a rank sees as all -inf (the one whose slice starts at 300)
    target = torch.randint(0, classes, (n,), generator=g)
    target[::4] = case.get("ignore_index", -100)
    target[1] = 5
    kwargs = dict(case)
    if kwargs.pop("weight", False):
        kwargs["weight"] = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return logits, target, kwargs


def awkward_logits(dtype: torch.dtype) -> torch.Tensor:
    """Rows of 600 classes whose argmax is decided across the two ranks' slices of 300."""
    logits = torch.randn(7, 600, generator=torch.Generator().manual_seed(3)).to(dtype)
    logits[0] = float("-inf")  # every class: class 0
    logits[1, [10, 310]] = 50  # a tie across the slices: the first
    logits[2, [310, 320]] = 50  # a tie within rank 1's slice
    logits[3, 400] = float("nan")  # NaN ranks above every number
    logits[4, [20, 400]] = float("nan")
    logits[5, 300:] = float("-inf")  # rank 1's slice all -inf
    logits[6, :300] = float("-inf")
    return logits


def worker(rank: int, port: int, out_dir: str, backend: str, device: str) -> None:
    if os.environ.get("FUSED_SOFTMAX_CPU_RUNS_CUDA_KERNELS"):  # scripts/test_cuda_kernels_on_cpu.sh: here too
        import simulated_cuda

        library = simulated_cuda.take_over_cpu_kernels()  # noqa: F841  (kept for the worker's life)
    if backend == "nccl":  # a GPU per rank
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for k, (case, widths) in enumerate(CASES):
                logits, target, kwargs = problem(dtype, case)
                start = sum(widths[:rank])
                local = logits[:, start : start + widths[rank]].to(device).requires_grad_()
                kwargs = {key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()}
                loss, _, _, predictions = vocab_parallel_cross_entropy(
                    local, target.to(device), return_predictions=True, **kwargs
                )
                v = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
                (loss.double() * v).sum().backward()
                result = {"loss": loss.detach().cpu(), "grad": local.grad.cpu(), "predictions": predictions.cpu()}
                torch.save(result, os.path.join(out_dir, f"{rank}-{dtype}-{k}.pt"))
            # Predictions where the ranks' slices tie, hold NaN or are all -inf.
            logits = awkward_logits(dtype)
            local = logits[:, rank * 300 : (rank + 1) * 300].to(device)
            _, _, _, predictions = vocab_parallel_cross_entropy(
                local, torch.zeros(len(logits), dtype=torch.long, device=device), return_predictions=True
            )
            torch.save(predictions.cpu(), os.path.join(out_dir, f"{rank}-{dtype}-predictions.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BACKENDS = [("gloo", "cpu")]
if torch.cuda.is_available():
    BACKENDS.append(("gloo", "cuda"))  # both ranks on one GPU: the CUDA kernels' class blocks
    BACKENDS.append(
        pytest.param(
            "nccl",
            "cuda",
            marks=pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"nccl needs {WORLD} GPUs"),
        )
    )


@pytest.mark.parametrize(("backend", "device"), BACKENDS)
def test_two_ranks_match_the_gathered_logits(tmp_path, backend, device):
    args = (free_port(), str(tmp_path), backend, device)
    mp.start_processes(worker, args=args, nprocs=WORLD, start_method="spawn")
    for dtype in (torch.float32, torch.bfloat16):
        for k, (case, widths) in enumerate(CASES):
            logits, target, kwargs = problem(dtype, case)
            x = logits.clone().requires_grad_()
            expected = fused_softmax.cross_entropy(x, target, **kwargs)
            v = torch.linspace(0.5, 1.5, expected.numel(), dtype=torch.float64).reshape(expected.shape)
            (expected.double() * v).sum().backward()
            x64 = logits.double().requires_grad_()
            kwargs64 = {**kwargs, "weight": kwargs["weight"].double()} if "weight" in kwargs else kwargs
            exact = fused_softmax.cross_entropy(x64, target, **kwargs64)
            (exact * v).sum().backward()
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            for rank in range(WORLD):
                got = torch.load(tmp_path / f"{rank}-{dtype}-{k}.pt")
                assert got["loss"].dtype == dtype
                # Both sides round to dtype once; each is within dtype's rounding of the float64 result.
                torch.testing.assert_close(got["loss"].double(), exact.detach(), rtol=tol, atol=tol)
                torch.testing.assert_close(got["loss"], expected.detach(), rtol=tol, atol=tol)
                part = slice(sum(widths[:rank]), sum(widths[: rank + 1]))
                torch.testing.assert_close(got["grad"].double(), x64.grad[:, part], rtol=tol, atol=tol * 1e-2)
                torch.testing.assert_close(got["grad"], x.grad[:, part], rtol=tol, atol=tol * 1e-2)
                assert torch.equal(got["predictions"], x.detach().argmax(1))
        for rank in range(WORLD):
            assert torch.equal(torch.load(tmp_path / f"{rank}-{dtype}-predictions.pt"), awkward_logits(dtype).argmax(1))


def test_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        vocab_parallel_cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_is_the_op_and_bad_inputs_name_the_argument(one_rank_group):
    logits, target, kwargs = problem(torch.float32, dict(weight=True, label_smoothing=0.1, z_loss=1e-3))
    torch.testing.assert_close(
        vocab_parallel_cross_entropy(logits, target, **kwargs), fused_softmax.cross_entropy(logits, target, **kwargs)
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 logits give a float32 loss, as torch's
        loss = vocab_parallel_cross_entropy(logits.bfloat16(), target, **kwargs)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, fused_softmax.cross_entropy(logits.bfloat16(), target, **kwargs))
    bad = [
        (dict(target=torch.full((23,), 600)), "target"),
        (dict(weight=torch.ones(599)), "weight"),
        (dict(z_loss=-1.0), "z_loss"),
        (dict(softcap=0.0), "softcap"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(local_logits=logits.long()), "local_logits"),
    ]
    for change, name in bad:
        args = dict(local_logits=logits, target=target) | change
        with pytest.raises(ValueError, match=name):
            vocab_parallel_cross_entropy(args.pop("local_logits"), args.pop("target"), **args)
