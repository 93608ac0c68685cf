"""A smoke test of the installed fused_softmax on whatever CPU runs it: imports it, prints backend(), and
checks the loss and gradient of each dtype against torch's float64 cross-entropy, through the CPU
kernels' two paths (a vector of rows at a time for few classes, a row at a time for many) and the
in-place gradient. Exits non-zero on the first difference.

    python tests/smoke.py [expected CPU level]

tests/test_portable_build.py runs it under qemu-x86_64 on CPUs without AVX-512 (no exception stops an
instruction the CPU lacks: the process dies), and scripts/test_wheel.sh in a fresh environment where
only a built wheel is installed.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fused_softmax

# Per dtype: how far the loss and gradient may be from float64's (relative to the largest gradient).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


def check(dtype: torch.dtype, classes: int, inplace: bool) -> None:
    logits = (torch.randn(37, classes, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, classes, (37,))
    target[5] = -100  # an ignored row
    expected_input = logits.double().clone().requires_grad_()
    expected = F.cross_entropy(expected_input, target, label_smoothing=0.1)
    expected.backward()

    ours_input = logits.clone().requires_grad_()
    loss = fused_softmax.cross_entropy(ours_input * 1, target, label_smoothing=0.1, inplace_backward=inplace)
    loss.backward()
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=tolerance, atol=0)
    torch.testing.assert_close(
        ours_input.grad.double(), expected_input.grad, rtol=0, atol=tolerance * expected_input.grad.abs().max().item()
    )


def main() -> int:
    backend = fused_softmax.backend()
    print("fused_softmax backend:", backend)
    if "fallback" in backend["cpu"]:
        print("smoke test: the compiled CPU kernels did not load")
        return 1
    level = fused_softmax._ops._C.cpu_capability()
    if len(sys.argv) > 1 and level != sys.argv[1]:
        print(f"smoke test: the CPU level in use is {level}, expected {sys.argv[1]}")
        return 1
    torch.manual_seed(0)
    for dtype in TOLERANCE:
        for classes in (10, 1000):
            for inplace in (False, True):
                check(dtype, classes, inplace)
    print(f"smoke test: {len(TOLERANCE) * 4} cases match torch on the {level} kernels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
