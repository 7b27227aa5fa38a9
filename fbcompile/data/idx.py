"""MNIST and Fashion-MNIST from the four IDX files in a local directory.

IDX format (big-endian): two zero bytes, a dtype code byte (``0x08`` = unsigned byte, the only
code MNIST uses and the only one accepted here), a byte with the number of dimensions ``d``, then
``d`` uint32 sizes, then ``prod(sizes)`` data bytes in C order. Images are ``(N, rows, cols)``,
labels ``(N,)``. Each file may be plain or gzipped (``<name>.gz``).
"""
from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from .dataset import Dataset, from_arrays

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
UBYTE = 0x08
NUM_CLASSES = 10


def load_idx_dataset(name: str, directory: Path) -> Dataset:
    """Read the four IDX files of ``name`` (``mnist`` or ``fashion-mnist``) from ``directory``.

    Images become float32 ``(N, 1, rows, cols)`` in [0, 1]; labels int64 in [0, 10).
    """
    paths = _find_files(name, directory)
    train = _read_pair(paths["train_images"], paths["train_labels"])
    test = _read_pair(paths["test_images"], paths["test_labels"])
    if train[0].shape[1:] != test[0].shape[1:]:
        raise DataError(f"{name}: train images are {train[0].shape[1:]} but test images are "
                        f"{test[0].shape[1:]} ({paths['train_images']}, {paths['test_images']})")
    return from_arrays(name, train, test, input_shape=(1, *train[0].shape[1:]),
                       num_classes=NUM_CLASSES, scale=255.0)


def _find_files(name: str, directory: Path) -> dict:
    """Map each IDX role to its path (plain preferred over ``.gz``); list every missing file."""
    found, missing = {}, []
    for role, base in IDX_FILES.items():
        candidates = [directory / base, directory / (base + ".gz")]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{base}[.gz]")
        found[role] = path
    if missing:
        raise DataError(f"{name}: missing IDX file(s) in {directory}: {', '.join(missing)} "
                        f"(expected {', '.join(IDX_FILES.values())}, each plain or .gz)")
    return found


def _read_pair(images_path: Path, labels_path: Path) -> tuple:
    """Read one images/labels pair and check that the counts agree and labels are 0..9."""
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has "
                        f"{len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} is outside 0..{NUM_CLASSES - 1}")
    return images, labels


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Parse one unsigned-byte IDX file with ``ndim`` dimensions into a uint8 array."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: file is {len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, file_ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != UBYTE or file_ndim != ndim:
        raise DataError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}, expected "
                        f"0x0000{UBYTE:02x}{ndim:02x} (unsigned bytes, {ndim} dimension(s))")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes, expected {header_len})")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = math.prod(dims)
    if len(raw) - header_len != expected:
        raise DataError(f"{path}: header says dims {dims} ({expected} data bytes) but the file "
                        f"holds {len(raw) - header_len} (truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when the name ends in ``.gz``."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read ({exc})") from exc
