"""Benchmark: fused_softmax.cross_entropy against torch eager, torch.compile and, where they import,
Liger-Kernel and quack, with a plain copy of the logits beside them. Providers x modes x dtypes x
shapes, the providers of a case timed in turn; median and p20/p80 of repeated runs, GB/s counted from
the bytes a fused kernel must move, peak extra memory.

    python benchmarks/bench_cross_entropy.py --device cpu --shapes 4096x32000,65536x10
    python benchmarks/bench_cross_entropy.py --device cuda --dtypes bf16,fp32 --json out.json

Rows are appended to a CSV (--csv; default runs/benchmarks/cross_entropy.csv, untracked) with the machine
and settings; benchmarks/results/cross_entropy.csv is the project's record.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import fused_softmax

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "backward", "full", "inplace")  # inplace: fused only, the gradient over the logits


def providers(device: str) -> dict[str, Callable]:
    found: dict[str, Callable] = {
        "fused": fused_softmax.cross_entropy,
        "torch": F.cross_entropy,
        "compile": torch.compile(F.cross_entropy, dynamic=False),
    }
    try:  # Liger-Kernel, when installed
        from liger_kernel.transformers.functional import liger_cross_entropy

        if device == "cuda":
            found["liger"] = liger_cross_entropy
    except Exception:
        pass
    try:  # quack, when installed
        from quack.cross_entropy import cross_entropy as quack_cross_entropy

        if device == "cuda":
            found["quack"] = lambda x, y: quack_cross_entropy(x, y).mean()
    except Exception:
        pass
    return found


class Timer:
    """Wall time on the CPU; CUDA events on the GPU (no synchronisation inside the timed region)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def once(self, setup: Callable, timed: Callable) -> float:
        """ms of one timed(setup()) call; setup is not timed."""
        state = setup()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            timed(state)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        timed(state)
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, setup: Callable, timed: Callable, reps: int, warmup: int) -> list[float]:
        times = [self.once(setup, timed) for _ in range(warmup + reps)]
        return times[warmup:]

    def interleaved(self, cases: dict[str, tuple[Callable, Callable]], reps: int) -> dict[str, list[float]]:
        """Times every case reps times, the cases in turn: a slow spell of the machine then falls on all
        of them alike, and their ratios hold where back-to-back runs of each would not. Each timed call
        follows an untimed one of the same case, so that it finds the caches (and the threads) as a
        loop of its own calls leaves them, as back-to-back runs did (without it a CPU kernel at
        65536 x 10 measured its input's and gradient's cache misses, 0.5 ms for 0.4)."""
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(reps):
            for name, (setup, timed) in cases.items():
                self.once(setup, timed)
                times[name].append(self.once(setup, timed))
        return times


def fused_bytes(mode: str, n: int, c: int, itemsize: int) -> int:
    """Bytes a fused kernel must move: forward reads the logits; backward reads them and writes the grad."""
    return {"forward": 1, "backward": 2, "full": 3, "inplace": 2}[mode] * n * c * itemsize


def quantiles(times: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]  # median, p20, p80


def case(fn: Callable | None, mode: str, x0: torch.Tensor, y: torch.Tensor) -> tuple[Callable, Callable]:
    """(setup, timed) for one mode: setup makes what the timed part consumes, untimed. fn None: a plain
    copy of the logits into a preallocated tensor (what the in-place mode is measured against)."""

    def fresh():
        return x0.detach().clone().requires_grad_(True)

    if fn is None:
        out = torch.empty_like(x0)
        return lambda: None, lambda _: out.copy_(x0)
    if mode == "forward":
        return lambda: None, lambda _: fn(x0, y)
    if mode == "full":
        return fresh, lambda x: fn(x, y).backward()
    if mode == "inplace":  # the op that leaves d loss / d logits in the logits' storage, on a fresh copy
        op = torch.ops.fused_softmax.cross_entropy_fwd_inplace.default
        return lambda: x0.detach().clone(), lambda x: op(x, y, None, -100, 0.0, 1)
    return lambda: fn(fresh(), y), lambda loss: loss.backward()  # backward


class PeakMemory:
    """Peak extra memory of one measured call: CUDA's allocator statistics, or on the CPU the process's
    peak resident set (Linux: writing 5 to /proc/self/clear_refs resets the peak to the current size)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            fused_softmax.empty_cache()  # the kernel's kept gradient memory would hide the gradient's own
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.base = self._status("VmRSS")
            except OSError:
                self.base = None

    def stop_mib(self) -> float:
        if self.device == "cuda":
            return (torch.cuda.max_memory_allocated() - self.base) / 2**20
        return float("nan") if self.base is None else (self._status("VmHWM") - self.base) / 1024

    @staticmethod
    def _status(key: str) -> int:  # kB
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise OSError(key)


def add_run_arguments(parser: argparse.ArgumentParser, csv_default: str) -> None:
    """The options every one-row-per-case benchmark takes: device, reps, threads, the CSV and a note."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--csv", default=csv_default, help="append the rows here")
    parser.add_argument("--note", default="", help="what this run measures (a version, a change), kept in each row")


def append_row(path: Path, row: dict) -> None:
    """Appends row to the CSV at path (its directory made, a header first in a new file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def machine(device: str) -> dict:
    info = {
        "host_cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "backend": fused_softmax.backend()[device],
        "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
        if device == "cuda"
        else f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', '')}",
    }
    try:
        info["host_cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument(
        "--modes",
        default="full,forward",
        help="forward, backward, full (forward+backward), inplace (fused: forward+backward into the logits)",
    )
    parser.add_argument("--providers", default="fused,torch,compile,liger,quack")
    parser.add_argument("--shapes", default="65536x10,8192x1000,4096x32000,1024x128256")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--csv",
        default="runs/benchmarks/cross_entropy.csv",
        help="append the rows here (untracked by default; benchmarks/results/cross_entropy.csv is the record)",
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--plot", default=None, help="write PNG plots named <this>_<device>_<metric>.png")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    timer = Timer(device)
    memory = PeakMemory(device)
    info = machine(device)
    print("machine:", json.dumps(info))
    available = providers(device)
    wanted = [p for p in args.providers.split(",") if p in available]
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rows = []
    columns = ("dtype", "n", "c", "mode", "provider", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mib")

    path = Path(args.csv)

    def record(*values) -> None:
        """Keeps a row, and writes it out at once: a run cut short (the GPU check's time limit) keeps
        the rows it measured."""
        row = dict(machine=json.dumps(info), time=stamp, device=device, **dict(zip(columns, values, strict=True)))
        append_row(path, row)
        rows.append(row)
        if args.json:
            Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))

    print(
        f"{'dtype':5} {'shape':>13} {'mode':8} {'provider':8} {'median ms':>10} {'p20':>8} {'p80':>8} "
        f"{'GB/s':>7} {'x fused':>7} {'peak MiB':>8}"
    )
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for shape in args.shapes.split(","):
            n, c = (int(v) for v in shape.split("x"))
            x0 = torch.randn(n, c, device=device).to(dtype)
            y = torch.randint(0, c, (n,), device=device)
            for mode in args.modes.split(","):
                # The providers of this mode and a plain copy of the logits (the bandwidth the kernels
                # are held against), timed in turn; in-place is fused only.
                names = (["fused"] if mode == "inplace" else wanted) + ["copy"]
                cases = {}
                for name in names:
                    try:
                        cases[name] = case(available.get(name), mode, x0, y)
                        timer(*cases[name], 0, args.warmup)
                    except Exception as error:  # a provider that cannot run this case is reported, not fatal
                        cases.pop(name, None)
                        print(f"{dtype_name:5} {shape:>13} {mode:8} {name:8} failed: {type(error).__name__}: {error}")
                times = timer.interleaved(cases, args.reps)
                fused_median = statistics.median(times["fused"]) if "fused" in times else None
                for name, (setup, timed) in cases.items():
                    state = setup()  # one more call, alone, for its peak memory beyond its inputs
                    memory.start()
                    timed(state)
                    peak = memory.stop_mib()
                    del state
                    median, p20, p80 = quantiles(times[name])
                    moved = (
                        2 * n * c * x0.element_size() if name == "copy" else fused_bytes(mode, n, c, x0.element_size())
                    )
                    gbps = moved / median / 1e6
                    ratio = median / fused_median if fused_median else float("nan")
                    print(
                        f"{dtype_name:5} {shape:>13} {mode:8} {name:8} {median:10.3f} {p20:8.3f} {p80:8.3f} "
                        f"{gbps:7.1f} {ratio:7.2f} {peak:8.1f}"
                    )
                    record(dtype_name, n, c, mode, name, median, p20, p80, gbps, peak)
            del x0
    print(f"appended {len(rows)} rows to {path}")
    if args.plot:
        print("plots:", ", ".join(str(p) for p in plot(rows, Path(args.plot), device)))


def plot(rows: list[dict], prefix: Path, device: str) -> list[Path]:
    """Throughput (GB/s) and peak extra memory against C, one panel per dtype x mode, a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r["mode"] != "copy"]
    panels = sorted({(r["dtype"], r["mode"]) for r in measured})
    written = []
    for metric, label in (("gbps", "GB/s (bytes a fused kernel must move)"), ("peak_mib", "peak extra MiB")):
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
        for ax, (dtype, mode) in zip(axes[0], panels, strict=True):
            for provider in sorted({r["provider"] for r in measured}):
                points = sorted(
                    (r["c"], r[metric])
                    for r in measured
                    if (r["dtype"], r["mode"], r["provider"]) == (dtype, mode, provider)
                )
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=provider)
            ax.set_xscale("log")
            ax.set_xlabel("classes C")
            ax.set_title(f"{device} {dtype} {mode}")
            ax.grid(True, alpha=0.3)
        axes[0][0].set_ylabel(label)
        axes[0][0].legend()
        fig.tight_layout()
        path = prefix.with_name(f"{prefix.name}_{device}_{metric}.png")
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
