"""Fashion-MNIST: finding, downloading and reading the four IDX files into tensors.

The files are read from --data-dir when it is given (and nowhere else); otherwise they are looked
for, in order, in $FASHION_MNIST_DIR, the per-user cache (~/.cache/fused_softmax/fashion-mnist,
where --download puts them) and where Debian's package dataset-fashion-mnist installs them. Each
may be gzipped or raw.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

import torch

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# d2l's text labels, in class order.
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MD5 = {  # of the official .gz files
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
ENV_VAR = "FASHION_MNIST_DIR"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_IDX_UBYTE = 0x08  # the IDX type code of unsigned bytes


class DataError(RuntimeError):
    """The data set is missing or a file is malformed."""


class FashionMNIST(NamedTuple):
    train_images: torch.Tensor  # (60000, 784) float32 in [0, 1]
    train_labels: torch.Tensor  # (60000,) int64
    test_images: torch.Tensor
    test_labels: torch.Tensor


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fused_softmax" / "fashion-mnist"


def search_dirs() -> list[Path]:
    """Where the files are looked for without --data-dir, in order."""
    env = [Path(os.environ[ENV_VAR])] if os.environ.get(ENV_VAR) else []
    return env + [cache_dir(), DEBIAN_DIR]


def _file_in(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def find(data_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """The four files, from the first place that has all of them; from data_dir alone when it is given."""
    for directory in [Path(data_dir)] if data_dir else search_dirs():
        found = {key: _file_in(directory, stem) for key, stem in FILES.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    if data_dir:  # an explicit folder is used or refused, never silently replaced by another
        missing = ", ".join(stem for key, stem in FILES.items() if not found[key])
        what = "does not exist" if not Path(data_dir).is_dir() else f"lacks {missing} (.gz or raw)"
        raise DataError(f"--data-dir {data_dir} {what}")
    places = "\n".join(f"  {d}" for d in search_dirs())
    raise DataError(
        "Fashion-MNIST not found. Looked for the four IDX files (gzipped or raw) in:\n"
        f"{places}\n"
        "Get them with one of:\n"
        "  sudo apt-get install dataset-fashion-mnist   (Debian/Ubuntu)\n"
        "  fused-softmax-train --download               (fetches them into the cache)\n"
        f"  or point --data-dir or ${ENV_VAR} at a folder holding them."
    )


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file of unsigned bytes as a uint8 tensor of its declared shape."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise DataError(f"{path}: cannot be read: {error}") from error
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or not 1 <= raw[3] <= 3:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number {raw[:4].hex() or 'none'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(torch.tensor(shape).prod())
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(f"{path}: {what}: header declares shape {shape} ({expected} bytes), file has {len(raw)}")
    if expected == header:  # no items (frombuffer refuses an empty buffer)
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def load(data_dir: str | os.PathLike | None = None) -> FashionMNIST:
    """Loads all four files once, images flattened to 784 floats in [0, 1]."""
    files = find(data_dir)
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{files[f'{split}_images']}, {files[f'{split}_labels']}: expected N images and N labels, "
                f"got shapes {list(images.shape)} and {list(labels.shape)}"
            )
        if labels.numel() and int(labels.max()) >= len(CLASS_NAMES):
            raise DataError(f"{files[f'{split}_labels']}: label {int(labels.max())} is not a Fashion-MNIST class")
        if images.shape[0] == 0:
            raise DataError(f"{files[f'{split}_images']}: holds 0 images")
        if tuple(images.shape[1:]) != (28, 28):
            raise DataError(
                f"{files[f'{split}_images']}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28"
            )
    return FashionMNIST(
        *(
            arrays[key].reshape(arrays[key].shape[0], -1).float().div_(255)
            if key.endswith("images")
            else arrays[key].long()
            for key in FILES
        )
    )


def download(target: str | os.PathLike | None = None, mirror: str = MIRROR, md5: dict[str, str] | None = None) -> Path:
    """Fetches the four .gz files into target (the cache by default), verifying their MD5 sums."""
    target = Path(target) if target else cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    md5 = MD5 if md5 is None else md5
    for stem in FILES.values():
        name = stem + ".gz"
        if (target / name).is_file() and _md5(target / name) == md5[name]:
            continue
        url = mirror.rstrip("/") + "/" + name
        with tempfile.NamedTemporaryFile(dir=target, prefix=name, suffix=".part", delete=False) as tmp:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        tmp.write(chunk)
            except OSError as error:
                os.unlink(tmp.name)
                raise DataError(f"downloading {url} failed: {error}") from error
        digest = _md5(Path(tmp.name))
        if digest != md5[name]:
            os.unlink(tmp.name)
            raise DataError(f"{url}: checksum mismatch (MD5 {digest}, expected {md5[name]}); nothing was kept")
        os.replace(tmp.name, target / name)  # a file appears under its name only once it is complete
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
