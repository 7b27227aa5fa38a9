"""Parse a dataset spec (``name`` or ``name:DIR``) and dispatch to its loader."""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from .cifar import load_cifar10
from .dataset import Dataset
from .digits import load_digits_dataset
from .idx import load_idx_dataset
from .mnist1d_data import load_mnist1d
from .synthetic import load_synthetic_classification, load_synthetic_regression

# name -> loader(seed, directory); directory is None for the sets that need none.
_LOADERS = {
    "digits": lambda seed, d: load_digits_dataset(),
    "mnist1d": lambda seed, d: load_mnist1d(),
    "mnist": lambda seed, d: load_idx_dataset("mnist", d),
    "fashion-mnist": lambda seed, d: load_idx_dataset("fashion-mnist", d),
    "cifar10": lambda seed, d: load_cifar10(d),
    "synthetic-regression": lambda seed, d: load_synthetic_regression(seed),
    "synthetic-classification": lambda seed, d: load_synthetic_classification(seed),
}
NEEDS_DIR = frozenset({"mnist", "fashion-mnist", "cifar10"})
DATASET_NAMES = tuple(_LOADERS)


def spec_help() -> str:
    """The accepted specs, e.g. for a ``--data`` help text: ``digits, mnist1d, mnist:DIR, ...``."""
    return ", ".join(f"{n}:DIR" if n in NEEDS_DIR else n for n in DATASET_NAMES)


def load_dataset(spec: str, *, seed: int = 0) -> Dataset:
    """Load the dataset named by ``spec``; nothing is ever downloaded.

    ``spec`` is one of ``digits``, ``mnist1d``, ``synthetic-regression``,
    ``synthetic-classification`` (built in or generated locally), or ``mnist:DIR``,
    ``fashion-mnist:DIR``, ``cifar10:DIR`` (read from files already in ``DIR``). ``seed`` only
    affects the synthetic sets; the splits of the others are fixed.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"dataset seed must be a non-negative int, got {seed!r}")
    name, directory = _parse(spec)
    return _LOADERS[name](seed, directory)


def _parse(spec) -> tuple:
    """Split ``spec`` into a known name and a checked directory (or None)."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"dataset spec must be a non-empty string, got {spec!r}; choose from "
                        f"{spec_help()}")
    name, sep, rest = spec.strip().partition(":")
    if name not in _LOADERS:
        raise DataError(f"unknown dataset {name!r} in spec {spec!r}; choose from {spec_help()}")
    if name not in NEEDS_DIR:
        if sep:
            raise DataError(f"dataset {name!r} takes no directory (spec {spec!r}); it is built in "
                            f"or generated locally. Specs: {spec_help()}")
        return name, None
    if not rest:
        raise DataError(f"dataset {name!r} needs a directory: use '{name}:DIR' (spec {spec!r}); "
                        f"specs: {spec_help()}")
    directory = Path(rest).expanduser()
    if not directory.is_dir():
        raise DataError(f"dataset spec {spec!r}: directory {str(directory)!r} does not exist "
                        f"(or is not a directory); specs: {spec_help()}")
    return name, directory
