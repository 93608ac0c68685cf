"""Epoch time of the Fashion-MNIST trainer with the fused loss against torch's loss, side by side.

    python benchmarks/bench_trainer.py --epochs 3 --threads 2

Both runs use the same seed; each reports the median epoch time (the first epoch, which warms up,
excluded). Rows are appended to --csv (default runs/benchmarks/trainer.csv, untracked) with the machine and
settings; benchmarks/results/trainer.csv is the project's record.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from fused_softmax import backend, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternate fused/torch this many times")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--csv",
        default="runs/benchmarks/trainer.csv",
        help="append the rows here (the default is untracked; benchmarks/results/trainer.csv is the project's record)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds: dict[str, list[float]] = {"fused": [], "torch": []}
    for _ in range(args.rounds):
        for loss in seconds:
            with tempfile.TemporaryDirectory() as out:
                argv = [
                    "--quiet",
                    "--device",
                    args.device,
                    "--epochs",
                    str(args.epochs),
                    "--output-dir",
                    out,
                    "--loss",
                    loss,
                ] + (["--data-dir", args.data_dir] if args.data_dir else [])
                metrics = train.train(train.parse_args(argv))
            seconds[loss] += [m["seconds"] for m in metrics[1:]]
    medians = {loss: statistics.median(s) for loss, s in seconds.items()}
    machine = f"{platform.machine()} threads={torch.get_num_threads()} torch={torch.__version__} {backend()['cpu']}"
    print(f"machine: {machine}")
    for loss, median in medians.items():
        print(f"{loss:6} median epoch {median * 1e3:8.1f} ms over {len(seconds[loss])} epochs")
    print(f"fused / torch = {medians['fused'] / medians['torch']:.3f}")
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(["time", "machine", "device", "loss", "median_epoch_ms", "epochs_timed"])
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for loss, median in medians.items():
            writer.writerow([stamp, machine, args.device, loss, f"{median * 1e3:.2f}", len(seconds[loss])])


if __name__ == "__main__":
    main()
