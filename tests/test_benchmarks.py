"""The benchmark script runs end to end on tiny shapes: every provider, mode and the copy get a row."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cross_entropy.py"


def test_cross_entropy_benchmark_writes_every_row_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "rows.csv"
    args = ["--device", "cpu", "--threads", "1", "--dtypes", "fp32,bf16", "--shapes", "64x10,16x100"]
    args += ["--modes", "full,forward,backward,inplace", "--providers", "fused,torch", "--reps", "3"]
    args += ["--warmup", "1", "--csv", str(out), "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "p")]
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "failed" not in result.stdout, result.stdout
    rows = list(csv.DictReader(out.open()))
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == len(rows)
    seen = {(r["dtype"], r["n"], r["c"], r["mode"], r["provider"]) for r in rows}
    for dtype in ("fp32", "bf16"):
        for n, c in (("64", "10"), ("16", "100")):
            for mode in ("full", "forward", "backward"):
                assert {(dtype, n, c, mode, p) for p in ("fused", "torch", "copy")} <= seen
            assert {(dtype, n, c, "inplace", p) for p in ("fused", "copy")} <= seen  # fused only, beside the copy
    assert len(rows) == 2 * 2 * (3 * 3 + 2)  # dtypes x shapes x (3 modes x 3 providers + in-place's 2)
    for r in rows:
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
    assert (tmp_path / "p_cpu_gbps.png").stat().st_size > 0 and (tmp_path / "p_cpu_peak_mib.png").stat().st_size > 0


def test_linear_benchmark_appends_rows(tmp_path):
    out = tmp_path / "linear.csv"
    script = SCRIPT.with_name("bench_linear_cross_entropy.py")
    args = ["--device", "cpu", "--n", "64", "--hidden", "16", "--classes", "300", "--dtypes", "fp32,bf16"]
    args += ["--reps", "3", "--providers", "fused,matmul+torch", "--csv", str(out), "--note", "test run"]
    for _ in range(2):  # a second run appends below the first, one header
        result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * 2 * 2  # runs x dtypes x providers
    assert {r["provider"] for r in rows} == {"fused", "matmul+torch"} and {r["note"] for r in rows} == {"test run"}
    for r in rows:
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert json.loads(r["machine"])["threads"] >= 1


def test_transformers_benchmark_appends_a_row_per_provider(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "transformers.csv"
    script = SCRIPT.with_name("bench_transformers.py")
    args = ["--device", "cpu", "--vocab", "500", "--tokens", "32", "--hidden", "32", "--layers", "1", "--reps", "3"]
    result = subprocess.run([sys.executable, str(script), *args, "--csv", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    providers = ("transformers", "fused-loss", "fused-linear")
    expected = [(dtype, provider) for dtype in ("fp32", "bf16-autocast") for provider in providers]
    assert [(r["dtype"], r["provider"]) for r in rows] == expected
    for r in rows:
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
