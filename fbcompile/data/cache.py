"""An on-disk cache of generated numpy arrays (``.npz``), written atomically.

A cache file that cannot be read, or lacks an expected array, is regenerated, never an error; a
cache that cannot be written only warns. The directory is ``$FBCOMPILE_CACHE`` when set, else
``~/.cache/fbcompile``.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

CACHE_ENV = "FBCOMPILE_CACHE"


def cache_dir() -> Path:
    """The directory for cached arrays (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fbcompile"


def cached_arrays(path: Path, keys: tuple, make: Callable[[], dict]) -> dict:
    """Return the arrays ``keys`` stored at ``path``; on a miss call ``make()`` and store its result."""
    arrays = _read(path, keys)
    if arrays is None:
        arrays = make()
        _write_atomic(path, arrays)
    return arrays


def _read(path: Path, keys: tuple) -> dict | None:
    """The arrays in ``path``, or None if the file is missing, unreadable or incomplete."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in keys}
    except Exception:  # missing, truncated, not a zip, wrong keys: all mean "regenerate"
        return None


def _write_atomic(path: Path, arrays: dict) -> None:
    """Write ``arrays`` to a temporary file next to ``path``, then rename it into place."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        warnings.warn(f"could not write the data cache {path} ({exc}); set ${CACHE_ENV} to a "
                      f"writable directory to keep generated datasets between runs", stacklevel=3)
