"""CIFAR-10 from the "python version" pickle batches in a local directory.

The directory holds ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (or contains a
``cifar-10-batches-py`` folder that does). Each batch is a pickled dict with ``b"data"``, an
``N x 3072`` uint8 array (1024 red, then 1024 green, then 1024 blue values, each a row-major
32x32 plane), and ``b"labels"``, ``N`` ints in 0..9 (plus ``b"batch_label"`` and ``b"filenames"``).

The batches are pickles, so they are read without running code: the unpickler constructs only what
the format holds (dicts, lists, bytes, ints and integer numpy arrays, see
:func:`fbcompile.safe_load.numpy_array_globals`); any other type is refused with an
:class:`~fbcompile.errors.UnsafeFileError` naming the file and the type.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from ..safe_load import load_restricted_pickle, numpy_array_globals
from .dataset import Dataset, from_arrays

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SUBFOLDER = "cifar-10-batches-py"
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
# What a batch may construct besides dicts, lists, bytes and ints: uint8 images, integer labels.
BATCH_GLOBALS = numpy_array_globals(dtype_kinds="ui")


def load_cifar10(directory: Path) -> Dataset:
    """Read CIFAR-10 into float32 ``(N, 3, 32, 32)`` images in [0, 1] and int64 labels."""
    directory = _batch_dir(directory)
    train = _concat([_read_batch(directory / b) for b in TRAIN_BATCHES])
    test = _read_batch(directory / TEST_BATCH)
    return from_arrays("cifar10", train, test, input_shape=INPUT_SHAPE,
                       num_classes=NUM_CLASSES, scale=255.0)


def _batch_dir(directory: Path) -> Path:
    """``directory`` or its ``cifar-10-batches-py`` subfolder, whichever holds the batches."""
    nested = directory / SUBFOLDER
    if nested.is_dir() and not (directory / TEST_BATCH).exists():
        directory = nested
    missing = [b for b in (*TRAIN_BATCHES, TEST_BATCH) if not (directory / b).is_file()]
    if missing:
        raise DataError(f"cifar10: missing batch file(s) in {directory}: {', '.join(missing)} "
                        f"(expected {', '.join(TRAIN_BATCHES)} and {TEST_BATCH}, the CIFAR-10 "
                        f"python version, possibly inside {SUBFOLDER}/)")
    return directory


def _read_batch(path: Path) -> tuple:
    """Unpickle one batch and check its layout; returns ``(uint8 data (N, 3072), int64 labels)``."""
    batch = load_restricted_pickle(path, BATCH_GLOBALS, "CIFAR-10 pickle batch", encoding="bytes")
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with keys b'data' and b'labels'")
    data, labels = _array(path, batch, b"data"), _array(path, batch, b"labels")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {len(data)} images but b'labels' is {labels.dtype} {labels.shape}, "
                        f"expected {len(data)} ints")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels must lie in 0..{NUM_CLASSES - 1}")
    return data, labels.astype(np.int64)


def _array(path: Path, batch: dict, key: bytes) -> np.ndarray:
    """``batch[key]`` as a numpy array (a DataError, naming the key, for a ragged list and the like)."""
    value = batch[key]
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, list) or not all(type(item) is int for item in value):
        raise DataError(f"{path}: {key!r} must be a numpy array or a list of ints, got {type(value).__name__}")
    try:
        return np.asarray(value, dtype=np.int64)
    except OverflowError:
        raise DataError(f"{path}: {key!r} holds ints beyond int64") from None


def _concat(parts: list) -> tuple:
    """Stack the ``(data, labels)`` pairs of several batches."""
    return np.concatenate([d for d, _ in parts]), np.concatenate([l for _, l in parts])
