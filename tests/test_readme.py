"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_quick_start_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "no python block in the README"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102  (our own README)
    assert namespace["out"].lse.shape == (4096,)
