"""The Fashion-MNIST trainer on a tiny IDX data set written here, and on the real one when installed."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from fused_softmax import data, train


def write_idx(path: Path, array: torch.Tensor, compress: bool = True) -> Path:
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    payload = header + array.to(torch.uint8).numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_dataset(directory: Path, n_train: int = 640, n_test: int = 200, compress: bool = True) -> Path:
    """Ten noisy class templates: learnable in a couple of epochs."""
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 28, 28, generator=g)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = torch.randint(0, 10, (n,), generator=g)
        images = (templates[labels] * 0.7 + torch.rand(n, 28, 28, generator=g) * 0.3) * 255
        write_idx(directory / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(directory / f"{split}-labels-idx1-ubyte", labels, compress)
    return directory


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("fashion"))


def run(*args: str) -> list[dict]:
    return train.train(train.parse_args(["--quiet", "--device", "cpu", *args]))


def main(*args: str) -> None:
    """The command line, as a user runs it (errors become SystemExit)."""
    train.main(["--quiet", "--device", "cpu", *args])


def without_seconds(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def test_loader_reads_gzipped_and_raw(tmp_path, tiny):
    raw = make_dataset(tmp_path / "raw", compress=False)
    a, b = data.load(tiny), data.load(raw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert a.train_images.shape == (640, 784) and a.train_images.dtype == torch.float32
    assert 0 <= a.train_images.min() and a.train_images.max() <= 1
    assert a.train_labels.dtype == torch.int64


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda b: b"\x00\x00\x09\x03" + b[4:], "bad magic number"),
        (lambda b: b[:-7], "truncated"),
        (lambda b: b + b"\x00", "longer than its header says"),
        (lambda b: b[:10], "truncated header"),
    ],
    ids=["magic", "truncated", "too long", "header"],
)
def test_malformed_file_is_named(tmp_path, damage, words):
    directory = make_dataset(tmp_path / "d", compress=False)
    target = directory / "train-images-idx3-ubyte"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(data.DataError, match=words) as info:
        data.load(directory)
    assert str(target) in str(info.value)


def test_count_mismatch_and_bad_label(tmp_path):
    directory = make_dataset(tmp_path / "d", compress=False)
    write_idx(directory / "t10k-labels-idx1-ubyte", torch.zeros(199), compress=False)
    with pytest.raises(data.DataError, match="expected N images and N labels"):
        data.load(directory)
    write_idx(directory / "t10k-labels-idx1-ubyte", torch.full((200,), 11), compress=False)
    with pytest.raises(data.DataError, match="label 11"):
        data.load(directory)


def test_missing_data_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "env"))
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "debian")
    with pytest.raises(data.DataError) as info:
        data.find()
    message = str(info.value)
    for place in ("env", "cache", "debian"):
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "--download" in message
    with pytest.raises(SystemExit, match="Fashion-MNIST not found"):
        train.main(["--quiet", "--device", "cpu", "--output-dir", str(tmp_path / "out")])


def test_an_explicit_data_dir_is_used_or_refused(tmp_path, tiny, monkeypatch):
    """--data-dir /nonexistent used to train silently on the data found elsewhere."""
    monkeypatch.setenv(data.ENV_VAR, str(tiny))  # data that a fallback would find
    with pytest.raises(SystemExit, match=f"--data-dir {tmp_path / 'nowhere'} does not exist"):
        main("--data-dir", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "train-images-idx3-ubyte.gz").write_bytes((tiny / "train-images-idx3-ubyte.gz").read_bytes())
    with pytest.raises(SystemExit, match="lacks train-labels-idx1-ubyte, t10k-images"):
        main("--data-dir", str(tmp_path / "half"), "--output-dir", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape,words", [((0, 28, 28), "holds 0 images"), ((5, 27, 28), "27x28, expected 28x28")])
def test_images_of_no_rows_or_another_size_are_refused(tmp_path, shape, words):
    directory = make_dataset(tmp_path / "d", n_train=5)
    write_idx(directory / "train-images-idx3-ubyte", torch.zeros(shape))
    write_idx(directory / "train-labels-idx1-ubyte", torch.zeros(shape[0]))
    with pytest.raises(SystemExit, match=words):
        main("--data-dir", str(directory), "--output-dir", str(tmp_path / "out"))


def test_train_writes_outputs_and_fused_matches_torch(tmp_path, tiny):
    fused = run("--data-dir", str(tiny), "--output-dir", str(tmp_path / "f"), "--epochs", "3", "--batch-size", "64")
    plain = run(
        "--data-dir",
        str(tiny),
        "--output-dir",
        str(tmp_path / "t"),
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--loss",
        "torch",
    )
    for a, b in zip(fused, plain, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]
    assert fused[-1]["loss"] < fused[0]["loss"] and fused[-1]["test_acc"] > 0.5  # it learns
    out = tmp_path / "f"
    assert without_seconds(json.loads((out / "metrics.json").read_text())) == without_seconds(fused)
    assert (out / "metrics.csv").read_text().splitlines()[0] == "epoch,loss,train_acc,test_acc,seconds"
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and state["config"]["loss"] == "fused"


@pytest.mark.parametrize("loss", ["fused-inplace", "fused-linear"])
def test_inplace_and_linear_losses_train_like_the_default(tmp_path, tiny, loss, monkeypatch):
    """Their train accuracy comes from the loss's predictions (the logits are overwritten, or never
    formed): the same as the default's, which takes the argmax of its logits."""
    common = ["--data-dir", str(tiny), "--epochs", "3", "--batch-size", "64"]
    default = run(*common, "--output-dir", str(tmp_path / "d"))
    asked = []
    for name in ("cross_entropy", "linear_cross_entropy"):
        fn = getattr(train, name)
        recorded = lambda *a, fn=fn, **k: asked.append(k.get("return_predictions")) or fn(*a, **k)  # noqa: E731
        monkeypatch.setattr(train, name, recorded)
    monkeypatch.setitem(train.LOSSES, "fused-inplace", functools.partial(train.cross_entropy, inplace_backward=True))
    other = run(*common, "--output-dir", str(tmp_path / "o"), "--loss", loss)
    assert asked and all(asked), asked
    for a, b in zip(default, other, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"], (a, b)
    w1 = torch.load(tmp_path / "d" / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


def test_resume_ends_like_an_uninterrupted_run(tmp_path, tiny):
    common = ("--data-dir", str(tiny), "--batch-size", "50")
    straight = run(*common, "--output-dir", str(tmp_path / "a"), "--epochs", "3")
    run(*common, "--output-dir", str(tmp_path / "b"), "--epochs", "1")
    resumed = run(*common, "--output-dir", str(tmp_path / "b"), "--epochs", "3", "--resume")
    assert without_seconds(resumed) == without_seconds(straight)
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, tiny):
    out = tmp_path / "o"
    run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match="lr: checkpoint 0.1, now 0.5"):
        run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "2", "--resume", "--lr", "0.5")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_says_where_it_continues_and_when_there_is_nothing_to_do(tmp_path, tiny, capsys):
    common = ("--data-dir", str(tiny), "--output-dir", str(tmp_path / "o"))
    run(*common, "--epochs", "1")
    capsys.readouterr()
    run(*common, "--epochs", "2", "--resume")
    assert "resuming from" in capsys.readouterr().out and "after epoch 1, to epoch 2"
    metrics = run(*common, "--epochs", "2", "--resume")
    assert "nothing to do" in capsys.readouterr().out and len(metrics) == 2
    with pytest.raises(SystemExit, match="nothing to resume: train without --resume first"):
        run("--data-dir", str(tiny), "--output-dir", str(tmp_path / "new"), "--resume")


def test_help_shows_defaults_and_the_command_name(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["/usr/bin/fused-softmax-train"])
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: fused-softmax-train") and "(default: 256)" in out
    monkeypatch.setattr(sys, "argv", [train.__file__])
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m fused_softmax.train")


@pytest.mark.parametrize("damage", ["truncated", "missing shuffle_rng", "not a dict"])
def test_damaged_checkpoints_are_one_line_errors(tmp_path, tiny, damage):
    out = tmp_path / "o"
    run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "1")
    ckpt = out / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:100])
    else:
        state = torch.load(ckpt, weights_only=True)
        torch.save(
            {k: v for k, v in state.items() if k != "shuffle_rng"} if damage.startswith("missing") else [1], ckpt
        )
    with pytest.raises(SystemExit) as info:
        run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "2", "--resume")
    message = str(info.value)
    assert "\n" not in message and "weights_only" not in message, message
    assert ("corrupt or truncated" if damage == "truncated" else "not a fused_softmax training checkpoint") in message
    if damage.startswith("missing"):
        assert "shuffle_rng" in message


def test_outputs_get_the_usual_file_mode(tmp_path, tiny):
    out = tmp_path / "o"
    run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "1")
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # metrics and checkpoint as the PNG (mkstemp's are 0600)


def test_an_unwritable_output_dir_is_a_one_line_error(tmp_path, tiny, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=f"error: {blocker / 'out'}"):
        main("--data-dir", str(tiny), "--output-dir", str(blocker / "out"), "--epochs", "1")

    def full_disk(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match="No space left on device"):
        main("--data-dir", str(tiny), "--output-dir", str(tmp_path / "o"), "--epochs", "1")


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    train.save_checkpoint(path, {"epoch": 1})

    def torn_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # killed mid-write

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, {"epoch": 2})
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny):
    out = tmp_path / "o"
    run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "1")
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.raises(SystemExit, match="corrupt or truncated"):
        train.main(["evaluate", "--data-dir", str(tiny), "--output-dir", str(out)])


def test_evaluate_and_predict(tmp_path, tiny, capsys):
    out = tmp_path / "o"
    metrics = run("--data-dir", str(tiny), "--output-dir", str(out), "--epochs", "2")
    capsys.readouterr()
    result = train.evaluate(train.parse_args(["evaluate", "--data-dir", str(tiny), "--output-dir", str(out)]))
    printed = capsys.readouterr().out
    assert abs(result["test_acc"] - metrics[-1]["test_acc"]) < 1e-9
    for name in data.CLASS_NAMES:
        assert name in printed
    path = train.predict(
        train.parse_args(["predict", "--data-dir", str(tiny), "--output-dir", str(out), "--count", "12"])
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_two_process_data_parallel_matches_one_process(tmp_path, tiny):
    common = ["--quiet", "--device", "cpu", "--data-dir", str(tiny), "--epochs", "2", "--batch-size", "64"]
    single = run(*common[3:], "--output-dir", str(tmp_path / "one"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "fused_softmax.train",
            *common,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch 1,") == 1  # only rank 0 prints
    both = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # Gradients are summed in another order across two ranks: the same numbers up to rounding, so at
    # most one borderline image may flip between right and wrong.
    for a, b in zip(single, both, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
        assert abs(a["train_acc"] - b["train_acc"]) <= 1 / 640 + 1e-12, (a, b)
        assert abs(a["test_acc"] - b["test_acc"]) <= 1 / 200 + 1e-12, (a, b)
    w1 = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)["model"]
    w2 = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=1e-6)


def test_download_verifies_checksums(tmp_path, tiny):
    """--download's fetch, against a mirror served on the loopback interface."""
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in tiny.iterdir()}
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(tiny), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        target = data.download(tmp_path / "cache", mirror=mirror, md5=md5)
        assert sorted(p.name for p in target.iterdir()) == sorted(md5)
        assert torch.equal(data.load(target).train_images, data.load(tiny).train_images)
        bad = dict(md5, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
        with pytest.raises(data.DataError, match="checksum mismatch"):
            data.download(tmp_path / "cache2", mirror=mirror, md5=bad)
        assert "t10k-labels-idx1-ubyte.gz" not in [p.name for p in (tmp_path / "cache2").iterdir()]
    finally:
        server.shutdown()


def _real_data_present() -> bool:
    try:
        data.find()
        return True
    except data.DataError:
        return False


@pytest.mark.skipif(
    not _real_data_present(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_real_fashion_mnist_reproduces_d2l(tmp_path):
    fused = run("--output-dir", str(tmp_path / "f"))
    plain = run("--output-dir", str(tmp_path / "t"), "--loss", "torch")
    for a, b in zip(fused, plain, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["train_acc"] - b["train_acc"]) < 1e-3 and abs(a["test_acc"] - b["test_acc"]) < 1e-3
    assert len(fused) == 5
    assert fused[-1]["loss"] <= 0.50
    assert 0.82 <= fused[-1]["test_acc"] <= 0.86


def test_killed_checkpoint_writer_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that keeps rewriting the checkpoint: what is on disk always loads."""
    import signal
    import time

    path = tmp_path / "checkpoint.pt"
    writer = (
        "import sys, torch\n"
        "from fused_softmax.train import save_checkpoint\n"
        "k = 0\n"
        "while True:\n"
        "    k += 1\n"
        "    save_checkpoint(__import__('pathlib').Path(sys.argv[1]), {'epoch': k, 'w': torch.full((3_000_000,), k)})\n"
        "    print(k, flush=True)\n"
    )
    for delay in (0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # one checkpoint is complete
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = torch.load(path, weights_only=True)
        assert (state["w"] == state["epoch"]).all()
        assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".tmp")] == ["checkpoint.pt"]
    train.save_checkpoint(path, {"epoch": 0})  # the next save clears what killed writers left
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("missing", ["matplotlib", "tqdm"])
def test_a_missing_extra_is_named_with_its_install_command(tmp_path, tiny, monkeypatch, missing):
    # The library installs without the trainer's extras; the trainer then says how to get them, before
    # it trains (matplotlib, for the plot drawn at the end) or when it needs them (tqdm, for the bar).
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError
    args = train.parse_args(
        ["--device", "cpu", "--epochs", "1", "--data-dir", str(tiny), "--output-dir", str(tmp_path)]
    )
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the progress bar shows on a terminal
    with pytest.raises(SystemExit, match=rf"the trainer needs {missing}, .*pip install 'fused_softmax\[train\]'"):
        train.train(args)
    assert not (tmp_path / "metrics.json").exists()  # nothing trained before the error
