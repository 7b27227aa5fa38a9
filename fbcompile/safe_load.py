"""Readers for files that come from elsewhere: they build data and never run code.

A pickle is a small program: its ``GLOBAL`` opcodes name any importable callable and ``REDUCE``
calls it, so ``pickle.load`` or ``torch.load(weights_only=False)`` on a shared checkpoint or a
downloaded dataset runs whatever the file's author chose. fbcompile therefore reads such files
only through the two functions here:

- :func:`load_torch_data`: ``torch.load(..., weights_only=True)``, torch's own restricted unpickler
  (tensors, plain containers and numbers); a file that needs any other type is refused with an
  :class:`~fbcompile.errors.UnsafeFileError` naming the file and the type.
- :func:`load_restricted_pickle`: a :class:`pickle.Unpickler` whose ``find_class`` answers only the
  ``(module, name)`` pairs the caller allows; every other global is refused before it is imported.
  :func:`numpy_array_globals` is the allow-list of plain numpy arrays of chosen dtype kinds (with the
  two helpers protocol-2 pickles use for ``bytes``).

Every failure is a :class:`~fbcompile.errors.DataError` naming the file (an UnsafeFileError when
the file asked for something forbidden), never a bare exception from the unpickler.
"""
from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .errors import DataError, UnsafeFileError

# torch names the global it refused: "Unsupported global: GLOBAL mod.name was not an allowed
# global ..." or "Trying to load unsupported GLOBAL mod.name whose module mod is blocked."
_TORCH_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+?)(?:\s|\.?$)", re.MULTILINE)
# The advice torch wraps around every weights-only failure; the line that explains it lies between.
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation of torch.load",
                      "Please file an issue", "WeightsUnpickler error")


class _Refused(Exception):
    """Raised inside the unpickler for a forbidden global or value; carries its description."""


def load_torch_data(path, what: str):
    """``torch.load(path)`` with ``weights_only=True`` onto the CPU; ``what`` names the kind of file
    in messages (e.g. ``"checkpoint"``). A zip-format file (what ``torch.save`` writes) is first
    checked against its CRCs, since torch itself would load damaged tensor bytes silently."""
    import torch
    damaged = _damaged_member(path)
    if damaged:
        raise DataError(f"{what} {str(path)!r} is damaged: {damaged}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _TORCH_REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise _unsafe(path, what, refused.group(1)) from exc
        raise _unreadable(path, what, exc) from exc
    except Exception as exc:  # a truncated zip, a wrong magic number, a storage of the wrong size, ...
        raise _unreadable(path, what, exc) from exc


def _damaged_member(path) -> str | None:
    """Why the zip archive at ``path`` is damaged (a member failing its CRC, an unreadable
    directory), or None when it is intact or not a zip file at all (torch reports on those)."""
    try:
        if not zipfile.is_zipfile(path):
            return None
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, a truncated member, an OS error while reading
        return _describe(exc)
    return f"its member {bad!r} fails the CRC check" if bad else None


def load_restricted_pickle(path, allowed: Mapping[tuple[str, str], Callable], what: str, **options):
    """Unpickle ``path`` constructing only the globals in ``allowed`` (``(module, name)`` -> the
    callable to use for it). ``options`` go to :class:`pickle.Unpickler` (e.g. ``encoding="bytes"``
    for Python 2 pickles)."""
    try:
        with open(Path(path), "rb") as stream:
            return _AllowListUnpickler(stream, allowed, **options).load()
    except _Refused as exc:
        raise _unsafe(path, what, str(exc)) from None
    except Exception as exc:  # unreadable, or a corrupt pickle: EOFError, ValueError, UnpicklingError, ...
        raise _unreadable(path, what, exc) from exc


class _AllowListUnpickler(pickle.Unpickler):
    """An unpickler that resolves a global only when its ``(module, name)`` is allowed."""

    def __init__(self, stream, allowed: Mapping[tuple[str, str], Callable], **options):
        super().__init__(stream, **options)
        self.allowed = allowed

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise _Refused(f"a persistent object reference ({type(pid).__name__})")


def numpy_array_globals(dtype_kinds: str) -> dict:
    """The globals a pickled ``numpy.ndarray`` needs, for dtypes whose ``kind`` is in
    ``dtype_kinds`` (``"u"`` unsigned, ``"i"`` signed integers, ...): array reconstruction under
    numpy 1.x and 2.x names (protocols 2 to 4), ``_frombuffer`` (protocol 5), a dtype constructor that
    refuses other kinds (object arrays above all), and the two callables protocol-2 pickles written
    by Python 3 use for ``bytes`` values."""
    reconstruct = np.zeros(0).__reduce__()[0]           # whatever numpy's own pickles name
    from_buffer = np.zeros(0).__reduce_ex__(5)[0]

    def dtype(*args):
        made = np.dtype(*args)
        if made.kind not in dtype_kinds or made.hasobject:
            raise _Refused(f"numpy.dtype({made.str!r}) (only dtype kinds {dtype_kinds!r} are allowed)")
        return made

    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): dtype,
             ("_codecs", "encode"): _latin1_encode, ("builtins", "bytes"): _empty_bytes,
             ("__builtin__", "bytes"): _empty_bytes}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = from_buffer
    return table


def _latin1_encode(text, encoding="latin1"):
    """``_codecs.encode`` as protocol 2 uses it for ``bytes``: latin-1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode with encoding {encoding!r} (only latin1 text is allowed)")
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()`` as protocol 2 uses it for an empty bytes value; with arguments it is refused."""
    if args:
        raise _Refused("builtins.bytes with arguments (only bytes() is allowed)")
    return b""


def _unsafe(path, what: str, refused: str) -> UnsafeFileError:
    return UnsafeFileError(f"refused to load {what} {str(path)!r}: it asks to construct {refused}, which a "
                           f"{what} never holds (fbcompile reads data files without running code)")


def _unreadable(path, what: str, exc: Exception) -> DataError:
    return DataError(f"cannot read {what} {str(path)!r} (damaged, truncated or not such a file): {_describe(exc)}")


def _describe(exc: Exception) -> str:
    """``Type: line``, the line being the first of ``exc``'s message that is not torch's generic
    weights-only advice (just ``Type`` for an empty message)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)] or lines
    return f"{type(exc).__name__}: {useful[0]}" if useful else type(exc).__name__


__all__ = ["load_restricted_pickle", "load_torch_data", "numpy_array_globals"]
