"""Softmax regression on Fashion-MNIST (d2l's concise implementation), trained through the fused loss.

fused-softmax-train                           # 5 epochs, lr 0.1, batch 256, as d2l
fused-softmax-train --loss torch              # the same run with torch's own loss
fused-softmax-train --loss fused-inplace      # the gradient written over the logits (inplace_backward)
fused-softmax-train --loss fused-linear       # linear layer and loss fused (linear_cross_entropy)
fused-softmax-train --resume                  # continue from the output dir's checkpoint
fused-softmax-train evaluate                  # test accuracy, per class
fused-softmax-train predict                   # a PNG grid of test images with labels
torchrun --nproc_per_node 2 --no-python fused-softmax-train  # data-parallel (gloo on CPU, nccl on GPU)

(`python -m fused_softmax.train` is the same, run from outside the source tree.)
"""

from __future__ import annotations

import argparse
import csv
import functools
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data
from .functional import cross_entropy
from .linear import linear_cross_entropy

# Losses of the logits; "fused-linear" computes the logits itself (see batch_loss).
LOSSES = {
    "fused": cross_entropy,
    "torch": F.cross_entropy,
    "fused-inplace": functools.partial(cross_entropy, inplace_backward=True),
    "fused-linear": None,
}
# The settings a resumed run must share with the checkpoint (epochs may grow).
RESUME_KEYS = ("batch_size", "lr", "seed", "loss")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "default" in help
        ):
            return help
        return f"{help} (default: %(default)s)"


def _program_name() -> str:
    """The installed command's name, or `python -m fused_softmax.train` when run as a module."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m fused_softmax.train" if not name or name.endswith(".py") else name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=_program_name(), description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument(
        "command", nargs="?", default="train", choices=("train", "evaluate", "predict"), help="what to do"
    )
    parser.add_argument("--epochs", type=int, default=5, help="epochs to train (with --resume: in all)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per SGD step")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and shuffling")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--data-dir", default=None, help=f"folder with the IDX files (else ${data.ENV_VAR}, ...)")
    parser.add_argument("--download", action="store_true", help="fetch Fashion-MNIST into the cache first")
    parser.add_argument("--output-dir", default="runs/fashion_mnist", help="metrics, curves.png, checkpoint.pt")
    parser.add_argument("--loss", choices=tuple(LOSSES), default="fused", help="the loss that trains the model")
    parser.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pt")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--checkpoint", default=None, help="evaluate/predict: default <output-dir>/checkpoint.pt")
    parser.add_argument("--count", type=int, default=18, help="predict: how many test images to show")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "count"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    return args


def build_model() -> nn.Module:
    """d2l: one linear layer 784 -> 10, weights from Normal(0, 0.01), bias 0."""
    model = nn.Linear(784, 10)
    nn.init.normal_(model.weight, std=0.01)
    nn.init.zeros_(model.bias)
    return model


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes state so that a crash at any moment leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}*.tmp"):  # left by a writer that was killed (one writer: rank 0)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    _usual_mode(fd)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


CHECKPOINT_KEYS = ("model", "optimizer", "epoch", "shuffle_rng", "config", "metrics")


def load_checkpoint(path: Path, missing_hint: str = "train first, or pass --checkpoint") -> dict:
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} not found ({missing_hint})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch's own message advises on weights_only, which is beside the point here
        raise SystemExit(f"error: checkpoint {path} is corrupt or truncated ({type(error).__name__})") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    missing += [f"config.{k}" for k in RESUME_KEYS if not missing and k not in state["config"]]
    if missing:
        raise SystemExit(f"error: {path} is not a fused_softmax training checkpoint (no {', '.join(missing)})")
    return state


class Distributed:
    """torchrun's process group, or a single process."""

    def __init__(self, device: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1:
            if device.startswith("cuda"):
                local = int(os.environ.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local)
                device = f"cuda:{local}"
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        self.device = torch.device(device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def close(self, finished: bool) -> None:
        if self.world > 1:
            if finished:
                dist.barrier()  # no rank tears gloo down (and exits) while another still works
            dist.destroy_process_group()


def accuracy_counts(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> torch.Tensor:
    """Correct predictions per class (a tensor of 10 counts)."""
    correct = torch.zeros(len(data.CLASS_NAMES), dtype=torch.long, device=images.device)
    with torch.no_grad():
        for i in range(0, images.shape[0], batch):
            y = labels[i : i + batch]
            hit = model(images[i : i + batch]).argmax(1) == y
            correct.index_add_(0, y, hit.long())
    return correct


def train(args: argparse.Namespace) -> list[dict]:
    _pyplot()  # the curves are drawn at the end: a missing matplotlib is said before training, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = Distributed(args.device)
    out = Path(args.output_dir)
    ckpt_path = out / "checkpoint.pt"
    config = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "loss")}
    try:
        if args.download and ddp.main:
            data.download()
        ds = data.load(args.data_dir)
        train_x, train_y = ds.train_images.to(ddp.device), ds.train_labels.to(ddp.device)
        test_x, test_y = ds.test_images.to(ddp.device), ds.test_labels.to(ddp.device)

        torch.manual_seed(args.seed)
        model = build_model().to(ddp.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        shuffle = torch.Generator().manual_seed(args.seed)  # same permutation on every rank
        metrics: list[dict] = []
        start_epoch = 0
        if args.resume:
            state = load_checkpoint(ckpt_path, missing_hint="nothing to resume: train without --resume first")
            mismatched = {k: (state["config"][k], config[k]) for k in RESUME_KEYS if state["config"][k] != config[k]}
            if mismatched:
                details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
                raise SystemExit(f"error: --resume with settings that differ from {ckpt_path} ({details})")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            shuffle.set_state(state["shuffle_rng"])
            metrics, start_epoch = state["metrics"], state["epoch"]
            if ddp.main:
                if start_epoch >= args.epochs:
                    print(
                        f"nothing to do: {ckpt_path} has finished epoch {start_epoch} of --epochs {args.epochs}; "
                        "pass a larger --epochs to train on",
                        flush=True,
                    )
                else:
                    print(f"resuming from {ckpt_path} after epoch {start_epoch}, to epoch {args.epochs}", flush=True)
        loss_fn = LOSSES[args.loss]
        if loss_fn is None and ddp.world > 1:
            raise SystemExit("error: --loss fused-linear runs in one process (DDP needs the model's own forward)")
        wrapped = nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
        show_bar = ddp.main and not args.quiet and sys.stderr.isatty()

        n = train_x.shape[0]
        for epoch in range(start_epoch, args.epochs):
            began = time.perf_counter()
            order = torch.randperm(n, generator=shuffle).to(ddp.device)
            totals = torch.zeros(3, dtype=torch.float64, device=ddp.device)  # loss sum, correct, count
            batches = range(0, n, args.batch_size)
            if show_bar:
                batches = _train_extra("tqdm").tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, unit="batch")
            for i in batches:
                batch = order[i : i + args.batch_size]
                mine = batch[ddp.rank :: ddp.world]  # this rank's disjoint share of the global batch
                x, y = train_x[mine], train_y[mine]
                if loss_fn is None:  # linear layer and loss in one op: the predictions come from it
                    loss_sum, *_, predicted = linear_cross_entropy(
                        x, model.weight, y, linear_bias=model.bias, reduction="sum", return_predictions=True
                    )
                elif args.loss == "fused-inplace":  # the predictions come from the loss, before the logits go
                    loss_sum, *_, predicted = loss_fn(wrapped(x), y, reduction="sum", return_predictions=True)
                else:
                    logits = wrapped(x)
                    predicted = logits.argmax(1)
                    loss_sum = loss_fn(logits, y, reduction="sum")
                hits = (predicted == y).sum()
                # DDP averages gradients over ranks, so each rank scales by world / global batch:
                # the update is the single-process mean over the whole global batch.
                optimizer.zero_grad(set_to_none=True)
                (loss_sum * (ddp.world / batch.numel())).backward()
                optimizer.step()
                with torch.no_grad():
                    totals += torch.stack([loss_sum.double(), hits.double(), torch.tensor(y.numel())])
            ddp.sum(totals)
            test_correct = ddp.sum(accuracy_counts(model, test_x[ddp.rank :: ddp.world], test_y[ddp.rank :: ddp.world]))
            loss_total, correct, count = totals.tolist()
            row = {
                "epoch": epoch + 1,
                "loss": loss_total / count,
                "train_acc": correct / count,
                "test_acc": test_correct.sum().item() / test_y.numel(),
                "seconds": time.perf_counter() - began,
            }
            metrics.append(row)
            if ddp.main:
                print(
                    f"epoch {row['epoch']}, loss {row['loss']:.4f}, train acc {row['train_acc']:.3f}, "
                    f"test acc {row['test_acc']:.3f}, {row['seconds']:.2f} s",
                    flush=True,
                )
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "shuffle_rng": shuffle.get_state(),
                    "config": config,
                    "metrics": metrics,
                }
                save_checkpoint(ckpt_path, state)
                write_metrics(out, metrics)
        if ddp.main:
            plot_curves(out / "curves.png", metrics)
    except BaseException:
        ddp.close(finished=False)
        raise
    ddp.close(finished=True)
    return metrics


def write_metrics(out: Path, metrics: list[dict]) -> None:
    for name, write in (("metrics.json", _write_json), ("metrics.csv", _write_csv)):
        fd, tmp = tempfile.mkstemp(dir=out, prefix=name, suffix=".tmp")
        _usual_mode(fd)
        with os.fdopen(fd, "w", newline="") as f:
            write(f, metrics)
        os.replace(tmp, out / name)


def _usual_mode(fd: int) -> None:
    """A new file's mode as open() gives it (0666 less the umask): mkstemp's temporary files are 0600,
    and the outputs should read like the PNGs beside them."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def _write_json(f, metrics: list[dict]) -> None:
    json.dump(metrics, f, indent=1)


def _write_csv(f, metrics: list[dict]) -> None:
    writer = csv.DictWriter(f, fieldnames=list(metrics[0]))
    writer.writeheader()
    writer.writerows(metrics)


def _train_extra(module: str):
    """One of the trainer's optional dependencies (tqdm, matplotlib: `pip install 'fused_softmax[train]'`),
    or an exit that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise SystemExit(
            f"error: the trainer needs {package}, which is not installed: pip install 'fused_softmax[train]'"
        ) from None


def _pyplot():
    """matplotlib.pyplot, drawing to files (no display)."""
    _train_extra("matplotlib").use("Agg")
    return _train_extra("matplotlib.pyplot")


def plot_curves(path: Path, metrics: list[dict]) -> None:
    """d2l's training plot: train loss, train acc and test acc per epoch."""
    plt = _pyplot()
    epochs = [m["epoch"] for m in metrics]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for key, style in (("loss", "-"), ("train_acc", "m--"), ("test_acc", "g-.")):
        ax.plot(epochs, [m[key] for m in metrics], style, label=key.replace("_", " "))
    ax.set_xlabel("epoch")
    ax.set_xlim(1, max(epochs[-1], 2))
    ax.set_ylim(0.3, 0.9)
    ax.grid(True)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _trained_model(args: argparse.Namespace) -> tuple[nn.Module, data.FashionMNIST]:
    state = load_checkpoint(Path(args.checkpoint or Path(args.output_dir) / "checkpoint.pt"))
    model = build_model()
    model.load_state_dict(state["model"])
    return model.eval(), data.load(args.data_dir)


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    model, ds = _trained_model(args)
    correct = accuracy_counts(model, ds.test_images, ds.test_labels)
    per_class = torch.bincount(ds.test_labels, minlength=len(data.CLASS_NAMES))
    accuracy = {
        name: c / max(t, 1) for name, c, t in zip(data.CLASS_NAMES, correct.tolist(), per_class.tolist(), strict=True)
    }
    total = correct.sum().item() / ds.test_labels.numel()
    print(f"test acc {total:.4f} on {ds.test_labels.numel()} images")
    print(f"{'class':<12} {'accuracy':>8} {'images':>7}")
    for (name, acc), count in zip(accuracy.items(), per_class.tolist(), strict=True):
        print(f"{name:<12} {acc:8.3f} {count:7d}")
    return {"test_acc": total, **accuracy}


def predict(args: argparse.Namespace) -> Path:
    """d2l's predict_ch3: test images titled with true and predicted labels, saved as a PNG grid."""
    plt = _pyplot()
    model, ds = _trained_model(args)
    count = min(args.count, ds.test_labels.numel())
    with torch.no_grad():
        predicted = model(ds.test_images[:count]).argmax(1)
    cols = min(count, 9)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.8 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < count:
            ax.imshow(ds.test_images[k].reshape(28, 28).numpy(), cmap="gray")
            true, pred = data.CLASS_NAMES[ds.test_labels[k]], data.CLASS_NAMES[predicted[k]]
            ax.set_title(f"{true}\n{pred}", fontsize=7, color="black" if true == pred else "red")
    fig.tight_layout()
    path = Path(args.output_dir) / "predictions.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path} (titles: true label, then predicted; red where they differ)")
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        {"train": train, "evaluate": evaluate, "predict": predict}[args.command](args)
    except data.DataError as error:
        raise SystemExit(f"error: {error}") from None
    except OSError as error:  # a full disk, a read-only or missing output folder: the file and the reason
        where = f"{error.filename}: " if error.filename else ""
        raise SystemExit(f"error: {where}{error.strerror or error}") from None


if __name__ == "__main__":
    main()
