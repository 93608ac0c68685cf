"""Small CUDA cases for compute-sanitizer (memcheck, racecheck): every kernel path runs once.

compute-sanitizer --tool memcheck python3 benchmarks/sanitizer_cases.py
"""

import torch

import fused_softmax


def main() -> None:
    torch.manual_seed(0)
    cases = [
        (5, 10, torch.float32, {}),  # warp per row
        (3, 5000, torch.bfloat16, {"label_smoothing": 0.1}),  # block per row, 16-byte packs
        (4, 1027, torch.float16, {"weight": torch.rand(1027, device="cuda")}),  # odd C: unaligned rows
        (0, 100, torch.float32, {}),  # no rows
        (6, 33, torch.float64, {"ignore_index": 2}),
    ]
    for n, c, dtype, kwargs in cases:
        x = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
        y = torch.randint(0, c, (n,), device="cuda")
        fused_softmax.cross_entropy(x, y, **kwargs).backward()
        base = torch.randn(n, c + 3, device="cuda", dtype=dtype)[:, 1 : c + 1]  # rows with stride c + 3
        fused_softmax.cross_entropy(base.requires_grad_(True), y, reduction="sum").backward()
        probs = torch.softmax(torch.randn(n, c, device="cuda"), 1).to(dtype)
        fused_softmax.cross_entropy(x, probs, label_smoothing=0.05).backward()
        if dtype in (torch.float16, torch.bfloat16):  # float32 probabilities, read as they are
            fused_softmax.cross_entropy(x, probs.float()).backward()
        options = {"z_loss": 1e-3, "softcap": 5.0, "logit_scale": 0.7}
        fused_softmax.cross_entropy(x, y, **options, **kwargs).backward()
        for extra in ({}, options):  # the in-place gradient, plain and with every option
            logits = x.detach().clone().requires_grad_(True) * 1.0  # non-leaf
            fused_softmax.cross_entropy(logits, y, inplace_backward=True, **extra, **kwargs).backward()
        # The backward op on a block of columns (linear cross-entropy's 16-bit weight gradient).
        w = torch.randn(c, 16, device="cuda", dtype=dtype, requires_grad=True)
        h = torch.randn(n, 16, device="cuda", dtype=dtype)
        fused_softmax.linear_cross_entropy(h, w, y, chunk_size=2, **options).backward()
    torch.cuda.synchronize()
    print("sanitizer cases ran")


if __name__ == "__main__":
    main()
