"""DTensor logits on a 1-D mesh of 2 gloo processes (CPU): sharded on the classes through the
vocab-parallel loss, replicated or batch-sharded through the ordinary op; against the single-process
loss on the whole logits and torch's own loss_parallel(), values, gradients (placed as the logits)
and predictions; and a column-parallel LM head (parallelize_module) trained with it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import free_port
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

import fused_softmax

WORLD = 2
CLASSES = 301  # uneven: the ranks hold 151 and 150 classes
CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", label_smoothing=0.1),
    dict(reduction="none"),
    dict(reduction="mean", weight=True, ignore_index=3),
    dict(reduction="mean", label_smoothing=0.2, ignore_index=-100),  # torch's loss_parallel raises here
    dict(reduction="mean", z_loss=1e-2, softcap=9.0, weight=True),  # beyond torch
]
TORCH_KEYS = ("reduction", "label_smoothing", "ignore_index", "weight")


def problem(case: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(13, CLASSES, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, CLASSES, (13,), generator=g)
    target[::3] = case.get("ignore_index", -100)
    kwargs = dict(case)
    if kwargs.pop("weight", False):
        kwargs["weight"] = torch.rand(CLASSES, generator=g, dtype=torch.float64) + 0.5
    return logits, target, kwargs


def loss_and_grad(loss_fn, logits: torch.Tensor, target: torch.Tensor, **kwargs):
    """The loss (a plain tensor) and d(sum(v * loss)) / d logits for a fixed v; DTensors gathered. The
    gradient as autograd.grad returns it: torch 2.11's AccumulateGrad re-lays out a DTensor leaf's .grad
    reached through to_local() (Shard(1) logits got a replicated .grad, as from x.to_local().sum())."""
    x = logits.detach().clone().requires_grad_() if not isinstance(logits, DTensor) else logits
    loss = loss_fn(x, target, **kwargs)
    whole = loss.full_tensor() if isinstance(loss, DTensor) else loss
    v = torch.linspace(0.5, 1.5, whole.numel(), dtype=whole.dtype).reshape(whole.shape)
    (grad,) = torch.autograd.grad((whole * v).sum(), x)
    return whole.detach(), grad


def check_losses(mesh) -> None:
    for case in CASES:
        logits, target, kwargs = problem(case)
        expected = loss_and_grad(fused_softmax.cross_entropy, logits, target, **kwargs)
        for placement in (Shard(1), Replicate(), Shard(0)):
            x = distribute_tensor(logits, mesh, [placement]).requires_grad_()
            t = distribute_tensor(target, mesh, [Shard(0)]) if placement == Shard(0) else target
            loss, grad = loss_and_grad(fused_softmax.cross_entropy, x, t, **kwargs)
            assert isinstance(grad, DTensor) and grad.placements == (placement,), (case, placement, grad)
            where = f"{case} {placement}"
            torch.testing.assert_close(loss, expected[0], msg=lambda m, w=where: f"{w}: {m}")
            torch.testing.assert_close(grad.full_tensor(), expected[1], msg=lambda m, w=where: f"{w}: {m}")
        # torch's own vocab-parallel loss on the same DTensor, where it has the options
        if "z_loss" in case:
            continue
        torch_kwargs = {k: v for k, v in kwargs.items() if k in TORCH_KEYS}
        x = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
        with loss_parallel():
            try:
                theirs = loss_and_grad(F.cross_entropy, x, target, **torch_kwargs)
            except Exception as error:  # noqa: BLE001  (recorded: torch 2.13-2.14 raise with smoothing + ignore_index)
                assert "label_smoothing" in case and "mixed torch.Tensor and DTensor" in str(error), error
                continue
        torch.testing.assert_close(expected[0], theirs[0])
        torch.testing.assert_close(expected[1], theirs[1].full_tensor())


def check_predictions_and_module(mesh) -> None:
    logits, target, _ = problem({})
    logits[1, [10, 200]] = 40  # a tie across the ranks' slices
    logits[2, 250] = float("nan")
    for placement in (Shard(1), Replicate(), Shard(0)):
        x = distribute_tensor(logits, mesh, [placement])
        t = distribute_tensor(target, mesh, [Shard(0)]) if placement == Shard(0) else target
        out = fused_softmax.cross_entropy(x, t, return_predictions=True, reduction="none")
        assert torch.equal(out.predictions.full_tensor(), logits.argmax(1)), placement
    module = fused_softmax.CrossEntropyLoss(label_smoothing=0.1)
    x = distribute_tensor(logits[3:], mesh, [Shard(1)])
    torch.testing.assert_close(module(x, target[3:]).full_tensor(), module(logits[3:], target[3:]))
    with pytest.raises(ValueError, match="target: batch-sharded logits need a DTensor target"):
        fused_softmax.cross_entropy(distribute_tensor(logits, mesh, [Shard(0)]), target)


def check_training(mesh) -> None:
    """A column-parallel head trained with the fused loss follows the same head trained with loss_parallel()."""
    vocab, steps = 40, 4
    data = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, vocab, (6, 5), generator=torch.Generator().manual_seed(2))

    def train(loss_fn):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, vocab))
        parallelize_module(model, mesh, {"2": ColwiseParallel(use_local_output=False)})  # logits Shard(-1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        losses = []
        for _ in range(steps):
            logits = model(data).flatten(0, 1)  # (tokens, vocab), Shard(1)
            assert logits.placements == (Shard(1),)
            loss = loss_fn(logits, labels.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.full_tensor().item())
        return losses, [p.full_tensor() if isinstance(p, DTensor) else p for p in model.parameters()]

    ours = train(lambda logits, y: fused_softmax.cross_entropy(logits, y))

    def torch_loss(logits, y):
        with loss_parallel():
            loss = F.cross_entropy(logits, y)
            loss.backward = _backward_in_loss_parallel(loss.backward)
        return loss

    theirs = train(torch_loss)
    assert ours[0][-1] < ours[0][0]  # it trains
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])


def _backward_in_loss_parallel(backward):
    def run(*args, **kwargs):
        with loss_parallel():
            return backward(*args, **kwargs)

    return run


def worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        check_losses(mesh)
        check_predictions_and_module(mesh)
        check_training(mesh)
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_dtensor_logits_on_two_ranks():
    mp.start_processes(worker, args=(free_port(),), nprocs=WORLD, start_method="spawn")
