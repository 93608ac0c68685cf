"""Bad input gets an exception naming the argument and what is wrong; never a crash or a wrong number."""

from __future__ import annotations

import pytest
import torch

import fused_softmax

OPS = torch.ops.fused_softmax


def x_y(device: str = "cpu"):
    return torch.randn(4, 10, device=device), torch.randint(0, 10, (4,), device=device)


CASES = [
    # (name, call, exception, words the message must contain)
    (
        "target too large",
        lambda x, y: fused_softmax.cross_entropy(x, torch.tensor([0, 1, 10, 2])),
        IndexError,
        ["target", "10", "position 2", "out of range"],
    ),
    (
        "target negative",
        lambda x, y: fused_softmax.cross_entropy(x, torch.tensor([0, -3, 1, 2])),
        IndexError,
        ["target", "-3", "out of range"],
    ),
    (
        "target float16 indices",
        lambda x, y: fused_softmax.cross_entropy(x, y.to(torch.int16)),
        RuntimeError,
        ["target", "int64, int32 or uint8"],
    ),
    ("target bool", lambda x, y: fused_softmax.cross_entropy(x, y > 3), RuntimeError, ["target", "Bool"]),
    (
        "op: probabilities wider than float32 for 16-bit logits",  # the Python API converts them first
        lambda x, y: OPS.cross_entropy_fwd(x.bfloat16(), torch.softmax(x.double(), 1), None, -100, 0.0, 1),
        RuntimeError,
        ["target", "BFloat16", "float32", "Double"],
    ),
    ("target shape", lambda x, y: fused_softmax.cross_entropy(x, y[:3]), ValueError, ["target", "(4,)", "(3,)"]),
    (
        "probability shape",
        lambda x, y: fused_softmax.cross_entropy(x, torch.rand(4, 9)),
        RuntimeError,
        ["target", "(4, 10)", "(4, 9)"],
    ),
    (
        "weight length",
        lambda x, y: fused_softmax.cross_entropy(x, y, weight=torch.ones(9)),
        RuntimeError,
        ["weight", "10", "[9]"],
    ),
    (
        "weight integer",
        lambda x, y: fused_softmax.cross_entropy(x, y, weight=torch.ones(10, dtype=torch.int64)),
        RuntimeError,
        ["weight", "floating"],
    ),
    ("input integer", lambda x, y: fused_softmax.cross_entropy(x.long(), y), TypeError, ["input", "int64"]),
    (
        "op input dtype",
        lambda x, y: OPS.cross_entropy_fwd(x.long(), y, None, -100, 0.0, 1),
        RuntimeError,
        ["input", "unsupported dtype"],
    ),
    ("input 0-d", lambda x, y: fused_softmax.cross_entropy(x[0, 0], y[0]), ValueError, ["input", "0-d"]),
    (
        "class index with no classes",
        lambda x, y: fused_softmax.cross_entropy(x[:, :0], y),
        IndexError,
        ["target", "0 classes"],
    ),
    (
        "op input 3-d",
        lambda x, y: OPS.cross_entropy_fwd(x[None], y, None, -100, 0.0, 1),
        RuntimeError,
        ["input", "2-D"],
    ),
    ("reduction", lambda x, y: fused_softmax.cross_entropy(x, y, reduction="avg"), ValueError, ["reduction", "'avg'"]),
    (
        "label_smoothing high",
        lambda x, y: fused_softmax.cross_entropy(x, y, label_smoothing=1.5),
        RuntimeError,
        ["label_smoothing", "1.5"],
    ),
    (
        "label_smoothing negative",
        lambda x, y: fused_softmax.cross_entropy(x, y, label_smoothing=-0.1),
        RuntimeError,
        ["label_smoothing", "-0.1"],
    ),
    (
        "op label_smoothing",
        lambda x, y: OPS.cross_entropy_fwd(x, y, None, -100, 2.0, 1),
        RuntimeError,
        ["label_smoothing"],
    ),
    ("input not a tensor", lambda x, y: fused_softmax.cross_entropy(x.tolist(), y), TypeError, ["input", "list"]),
    ("target not a tensor", lambda x, y: fused_softmax.cross_entropy(x, [1, 2, 3, 4]), TypeError, ["target", "list"]),
    (
        "weight requires grad",
        lambda x, y: fused_softmax.cross_entropy(x, y, weight=torch.ones(10, requires_grad=True)),
        ValueError,
        ["weight", "detach"],
    ),
    (
        "stats shape",
        lambda x, y: OPS.cross_entropy_bwd(torch.ones(4), x, y, None, torch.zeros(4), -100, 0.0, 0),
        RuntimeError,
        ["stats", "[4, 2]"],
    ),
    (
        "unknown option",
        lambda x, y: fused_softmax.cross_entropy(x, y, smoothing=0.1),
        TypeError,
        ["smoothing"],
    ),
    (
        "ignore_index not an int",
        lambda x, y: fused_softmax.cross_entropy(x, y, ignore_index=1.5),
        TypeError,
        ["ignore_index", "float"],
    ),
    (
        "ignore_index a bool",
        lambda x, y: fused_softmax.cross_entropy(x, y, ignore_index=True),
        TypeError,
        ["ignore_index", "bool"],
    ),
    (
        "ignore_index with class probabilities",  # as torch: no row of probabilities can be ignored
        lambda x, y: fused_softmax.cross_entropy(x, torch.softmax(x, 1), ignore_index=3),
        RuntimeError,
        ["ignore_index", "class-probability targets", "got 3"],
    ),
    (
        "softcap beyond float32",  # it would be inf: NaN losses
        lambda x, y: fused_softmax.cross_entropy(x, y, softcap=1e39),
        RuntimeError,
        ["softcap", "1e+39", "float32 range", "Float logits"],
    ),
    (
        "softcap below float32",  # it would round to 0: no softcap at all
        lambda x, y: fused_softmax.cross_entropy(x.bfloat16(), y, softcap=1e-46),
        RuntimeError,
        ["softcap", "1e-46", "float32 range", "BFloat16 logits"],
    ),
    (
        "logit_scale beyond float32",
        lambda x, y: fused_softmax.cross_entropy(x, y, logit_scale=1e39),
        RuntimeError,
        ["logit_scale", "1e+39", "float32 range"],
    ),
    (
        "op reduction",
        lambda x, y: OPS.cross_entropy_fwd(x, y, None, -100, 0.0, 3),
        RuntimeError,
        ["reduction", "got 3"],
    ),
    (
        "grad_loss of a reduced loss",
        lambda x, y: OPS.cross_entropy_bwd(torch.ones(4), x, y, None, torch.zeros(4, 2), -100, 0.0, 2),
        RuntimeError,
        ["grad_loss", "0-dim"],
    ),
    (
        "grad_loss shape",
        lambda x, y: OPS.cross_entropy_bwd(torch.ones(3), x, y, None, torch.zeros(4, 2), -100, 0.0, 0),
        RuntimeError,
        ["grad_loss", "4 rows"],
    ),
]


# The CPU kernel checks these values on the host and names the place; the CUDA kernels assert on the
# device (no host synchronisation), as torch's own do.
CHECKED_ON_THE_HOST = {"target too large", "target negative"}


@pytest.mark.parametrize(
    "name,call,exception,words",
    [pytest.param(*c, marks=pytest.mark.cpu_kernel if c[0] in CHECKED_ON_THE_HOST else ()) for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_input_message(name, call, exception, words):
    x, y = x_y()
    with pytest.raises(exception) as info:
        call(x, y)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


@pytest.mark.cpu_kernel
def test_out_of_range_target_in_backward_is_caught_too():
    x, y = x_y()
    loss, stats = OPS.cross_entropy_fwd(x, y, None, -100, 0.0, 0)
    with pytest.raises(IndexError, match="target: class index 12"):
        OPS.cross_entropy_bwd(torch.ones(4), x, torch.tensor([0, 12, 1, 1]), None, stats, -100, 0.0, 0)


def test_ignore_index_outside_class_range_is_fine():
    x, y = x_y()
    y[0] = 1000
    loss = fused_softmax.cross_entropy(x, y, ignore_index=1000, reduction="none")
    assert loss[0] == 0 and (loss[1:] > 0).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("moved", ["input", "target", "weight"])
def test_mixed_devices_name_the_argument(moved):
    x, y = x_y()
    args = {"input": x, "target": y, "weight": torch.ones(10)}
    args[moved] = args[moved].cuda()
    with pytest.raises(RuntimeError) as info:
        fused_softmax.cross_entropy(args["input"], args["target"], weight=args["weight"])
    assert ("target" if moved == "input" else moved) in str(info.value) and "cuda" in str(info.value)


@pytest.mark.parametrize("moved", ["target", "weight"])
@pytest.mark.parametrize("mode", ["forward", "with_grad", "inplace"])
def test_a_meta_tensor_beside_cpu_logits_is_refused(moved, mode):
    # A meta tensor among the arguments routes the call to the shape-only (fake) kernels; torch raises
    # there, and so must we, instead of returning memory no kernel wrote.
    x, y = x_y()
    args = {"target": y, "weight": torch.ones(10)}
    args[moved] = args[moved].to("meta")
    x = x.requires_grad_(mode != "forward") * 1
    with pytest.raises(
        RuntimeError, match=f"fused_softmax: {moved}: expected a tensor on cpu like input, got one on meta"
    ):
        fused_softmax.cross_entropy(x, args["target"], weight=args["weight"], inplace_backward=mode == "inplace")


def test_float64_logits_take_options_beyond_float32():
    # float64 logits are computed in float64, where a cap of 1e300 is no cap and a scale of 1e-300 is
    # representable: computed, not refused.
    x, y = x_y()
    x = x.double()
    plain = fused_softmax.cross_entropy(x, y)
    torch.testing.assert_close(fused_softmax.cross_entropy(x, y, softcap=1e300), plain, rtol=1e-12, atol=0)
    scaled = fused_softmax.cross_entropy(x * 1e300, y, logit_scale=1e-300)
    torch.testing.assert_close(scaled, plain, rtol=1e-12, atol=0)


TORCH_ERRORS = {
    # name: a bad call of cross_entropy (torch's or ours), and whether only the CPU kernel raises it there
    "label_smoothing over 1": (lambda ce, x, y: ce(x, y, label_smoothing=1.5), False),
    "class index too large": (lambda ce, x, y: ce(x, torch.tensor([0, 1, 10, 2])), True),
    "class index negative": (lambda ce, x, y: ce(x, torch.tensor([0, -3, 1, 2])), True),
    "batch sizes differ": (lambda ce, x, y: ce(x, y[:3]), False),
    "probabilities of another shape": (lambda ce, x, y: ce(x, torch.rand(4, 9)), False),
    "spatial target of another shape": (lambda ce, x, y: ce(x.reshape(4, 5, 2), y.reshape(4, 1)), False),
    "target dtype": (lambda ce, x, y: ce(x, y.to(torch.int16)), False),
    "class index with no classes": (lambda ce, x, y: ce(x[:, :0], torch.tensor([0, -100, -100, -100])), False),
}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.cpu_kernel if cpu else ()) for n, (_, cpu) in TORCH_ERRORS.items()]
)
def test_errors_are_of_torchs_types(name):
    # Code written against torch catches torch's exception types: ours raise the same ones (with their
    # own messages, which name the argument).
    call, _ = TORCH_ERRORS[name]
    x, y = x_y()
    with pytest.raises(Exception) as theirs:
        call(torch.nn.functional.cross_entropy, x, y)
    with pytest.raises(Exception) as ours:
        call(fused_softmax.cross_entropy, x, y)
    assert type(ours.value) is type(theirs.value), (ours.value, theirs.value)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    "target",
    ["probabilities", "ignored", "ignored with smoothing", "ignored with weight"],
)
def test_zero_classes_give_torchs_values(reduction, target):
    """Logits with 0 classes: torch's values (0 or -0 per row, NaN means, NaN with smoothing), an empty
    gradient; once refused with a ValueError."""
    options = {"reduction": reduction}
    if target == "probabilities":
        t = torch.rand(5, 0)
    else:
        t = torch.full((5,), -100)
        options["label_smoothing"] = 0.1 if "smoothing" in target else 0.0
        options["weight"] = torch.ones(0) if "weight" in target else None
    results = []
    for ce in (torch.nn.functional.cross_entropy, fused_softmax.cross_entropy):
        x = torch.rand(5, 0, requires_grad=True)
        loss = ce(x, t, **options)
        loss.sum().backward()
        results.append((loss, x.grad))
    (ours, ours_grad), (theirs, theirs_grad) = results[1], results[0]
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, equal_nan=True)
    assert torch.equal(ours.signbit(), theirs.signbit())
    assert ours_grad.shape == theirs_grad.shape == (5, 0)


def test_zero_classes_lse_and_z_loss():
    t = torch.rand(3, 0)
    out = fused_softmax.cross_entropy(torch.rand(3, 0), t, reduction="none", z_loss=1e-4, return_lse=True)
    assert torch.equal(out.lse, torch.full((3,), -torch.inf)) and torch.equal(out.loss, torch.full((3,), torch.inf))
