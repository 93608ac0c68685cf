"""The README's examples run as written: each python block in this process, the one meant for torchrun
on two processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from test_distributed import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
TORCHRUN = "# torchrun --nproc_per_node 2"


def blocks() -> list[str]:
    found = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert found, "no python block in the README"
    return found


def test_quick_start_runs():
    results = []
    for code in blocks():
        if code.startswith(TORCHRUN):
            continue
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (our own README)
        results.append(namespace)
    assert results[0]["out"].lse.shape == (4096,)
    assert 0 <= results[0]["accuracy"] <= 1
    assert results[1]["out"].logits is None and results[1]["loss"].requires_grad


def test_the_dtensor_example_runs_on_two_processes(tmp_path):
    (code,) = [code for code in blocks() if code.startswith(TORCHRUN)]
    script = tmp_path / "example.py"
    script.write_text(code)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    subprocess.run([*command, str(free_port()), str(script)], check=True, timeout=300)
