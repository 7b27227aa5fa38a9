"""Random draws made while a front end captures ``forward``: refused, as they would be constants.

A capture runs ``forward``'s Python once. torch.fx runs for real every torch call none of whose
arguments is a traced value (``torch.randn(4)``), and both front ends run Python's ``random`` and
NumPy's generators for real (``if random.random() < p``). A draw made there happens once, at
capture, and its value (or the branch it chose) becomes a constant of the program, where the model
draws anew at every call: noise that never changes, a stochastic layer always kept or always
dropped. :func:`draws_refused` compares the generators' states before and after the capture and
raises :class:`~fbcompile.errors.UntraceableModelError` naming the generator that moved (with
``frontend="auto"``, a torch draw that torch.fx refuses is then captured by torch.export, which
records torch's random ops as graph nodes).
"""
from __future__ import annotations

import contextlib
import random
import sys

import torch

from .errors import UntraceableModelError


@contextlib.contextmanager
def draws_refused(model_name: str, frontend: str, torch_generator: bool = True):
    """Raise after the block when it drew from torch's generators (``torch_generator``: the CPU's and
    those of CUDA devices in use), Python's ``random`` or NumPy's global generator (see the module
    docstring)."""
    before = _states(torch_generator)
    yield
    moved = [name for name, state in _states(torch_generator).items() if not _same(state, before[name])]
    if moved:
        _restore(before)          # the user's random streams as they were before the capture
        remedy = ("draw from a traced value instead (torch.rand_like(x), torch.rand(x.shape)), which the program "
                  "records" if set(moved) <= {"torch", "cuda"} else "draw with torch from a traced value "
                  "(torch.rand_like(x)), which the program records, or pass the random values in as an input")
        raise UntraceableModelError(
            f"forward of {model_name} draws random numbers from {' and '.join(_NAMES[m] for m in moved)} while "
            f"{frontend} captures it: the draw is made once, at capture, and its value would be a constant of "
            f"the program, where the model draws anew at every call. To compile it, {remedy}")


_NAMES = {"torch": "torch's generator (a torch random op on no traced value)",
          "cuda": "a CUDA generator (a torch random op on no traced value)", "python": "Python's random module",
          "numpy": "NumPy's global generator"}


def _states(torch_generator: bool) -> dict:
    states = {"python": random.getstate()}
    if torch_generator:
        states["torch"] = torch.random.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["numpy"] = numpy.random.get_state(legacy=False)
    return states


def _restore(states: dict) -> None:
    random.setstate(states["python"])
    if "torch" in states:
        torch.random.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        sys.modules["numpy"].random.set_state(states["numpy"])


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, list):                                   # CUDA's states, one per device
        return len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "shape") and hasattr(a, "dtype"):          # a NumPy array in NumPy's state
        return a.shape == b.shape and bool((a == b).all())
    return a == b
