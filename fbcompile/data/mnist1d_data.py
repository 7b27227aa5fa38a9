"""MNIST-1D, generated locally from the templates inside the ``mnist1d`` package.

``mnist1d.data.make_dataset(get_dataset_args())`` builds the standard split (4,000 train / 1,000
test sequences of length 40, 10 classes) in about 4 s. Its ``get_dataset()`` downloads and is never
called. The arrays are cached in-process and on disk (see :mod:`fbcompile.data.cache`) under a
name that hashes the generation arguments and the mnist1d version.
"""
from __future__ import annotations

import functools
import hashlib
import json
import random
from importlib import metadata

import numpy as np

from ..errors import DataError
from .cache import cache_dir, cached_arrays
from .dataset import Dataset, from_arrays

KEYS = ("x", "y", "x_test", "y_test")
SEQ_LEN = 40


def load_mnist1d() -> Dataset:
    """MNIST-1D as float32 ``(N, 1, 40)`` inputs and int64 labels (4,000 / 1,000).

    The standard split is fixed by mnist1d's own seed (42); training seeds do not change it.
    """
    arrays = _mnist1d_arrays()
    return from_arrays("mnist1d", (arrays["x"], arrays["y"]), (arrays["x_test"], arrays["y_test"]),
                       input_shape=(1, SEQ_LEN), num_classes=10)


@functools.cache
def _mnist1d_arrays() -> dict:
    """The generated arrays, from the disk cache when it holds a valid copy."""
    make_dataset, args = _import_mnist1d()
    path = cache_dir() / f"mnist1d-{_args_hash(args)}.npz"
    return cached_arrays(path, KEYS, lambda: _generate(make_dataset, args))


def _import_mnist1d():
    """``(make_dataset, default args)`` from the mnist1d package, or a DataError saying how to get it."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError(f"the 'mnist1d' dataset needs the mnist1d package ({exc}); "
                        f"install it with: pip install mnist1d") from exc
    return make_dataset, get_dataset_args()


def _args_hash(args) -> str:
    """A short stable hash of the generation arguments (the download url excluded) and version."""
    fields = {k: v for k, v in sorted(vars(args).items()) if k != "url"}
    try:
        fields["mnist1d_version"] = metadata.version("mnist1d")
    except metadata.PackageNotFoundError:  # importable but not installed (e.g. on PYTHONPATH)
        fields["mnist1d_version"] = "unknown"
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _generate(make_dataset, args) -> dict:
    """Run mnist1d's generator, restoring the global ``random``/``numpy`` RNG state it reseeds."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(data[k]) for k in KEYS}
