"""The ``torch.autocast`` state a program was captured under, checked before every run.

Both front ends evaluate forward's Python once, at capture, so whatever it decides from the autocast
state is fixed in the program:

- Hugging Face's rotary embeddings enter a full-precision block (``maybe_autocast(enabled=False)``)
  only when autocast is on; captured with autocast off, the program has no block;
- DeBERTa masks scores with ``torch.finfo(scores.dtype).min``: captured with autocast off,
  torch.export fixed float32's minimum, which overflows the bfloat16 scores of a step under
  autocast (a crash; a smaller constant would have been silently another function);
- timm's EfficientViT computes its attention in ``torch.autocast(enabled=False)``: a no-op with
  autocast off, which is why the export front end copies the block's body inline
  (:class:`fbcompile.frontends.export._ProgramCopy`), and refuses it in a capture under autocast.

So every program records the autocast state at capture (per device: on or off, and its dtype;
``traced.meta["fbcompile_autocast"]``), and every run of the captured forward checks first that the
state is the same (:meth:`fbcompile.program.FeedbackProgram.check_model`), refusing by name
otherwise: to train under autocast, compile under the same ``torch.autocast``. Within that state
the feedback runs under it too; its backward kernels get their operands in the dtypes autocast
gave the forward (:mod:`fbcompile.rules.kernel_dtypes`), and the parameters' ``.grad`` keeps their
dtype, as with autograd.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import FBCompileError

META = "fbcompile_autocast"
_DEVICES = ("cpu", "cuda")
AUTOCAST_DTYPES = ("bfloat16", "float16")       # the dtype names --autocast takes


def mixed_precision(device_type: str, dtype: str | None):
    """``torch.autocast(device_type, dtype=torch.<dtype>)``, or no context for None: what a run with
    ``--autocast DTYPE`` compiles and trains in (``fbcompile train``, the benchmarks)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=getattr(torch, dtype))


def under_mixed_precision(fn: Callable, device_type: str, dtype: str | None) -> Callable:
    """``fn`` run inside :func:`mixed_precision` (``fn`` itself for None; ``fn`` is the result's
    ``__wrapped__``)."""
    if dtype is None:
        return fn

    @functools.wraps(fn)
    def mixed(*args, **kwargs):
        with mixed_precision(device_type, dtype):
            return fn(*args, **kwargs)
    return mixed


def autocast_state() -> tuple:
    """Per device ("cpu", "cuda"): (autocast on, its dtype)."""
    return tuple((torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in _DEVICES)


def _state_text(state: tuple) -> str:
    on = [f"{device} ({str(dtype).replace('torch.', '')})" for device, (enabled, dtype) in zip(_DEVICES, state)
          if enabled]
    return f"torch.autocast on for {', '.join(on)}" if on else "torch.autocast off"


@dataclass(frozen=True)
class CapturedAutocast:
    model_name: str
    state: tuple        # autocast_state() at capture

    def check(self) -> None:
        """Raise unless autocast is as it was at capture. Under autocast, also drop autocast's cache
        of low-precision parameter copies, so the run reads the parameters' current values: the
        cache lives until the outermost autocast context exits, so in a context spanning several
        steps the optimizer's in-place updates would otherwise be invisible to the forward (its
        copies stale: a silently wrong gradient; the same holds for plain autograd, and torch.amp
        advises a context per step)."""
        now = autocast_state()
        if now != self.state:
            raise FBCompileError(
                f"{self.model_name} was captured with {_state_text(self.state)}, and this run has {_state_text(now)}. "
                "The capture evaluated forward's Python once, so what it decides from the autocast state or from "
                "dtypes that autocast sets (full-precision blocks, masking constants such as "
                "torch.finfo(x.dtype).min) holds only for that state: compile inside the same torch.autocast "
                "context you train in")
        if any(enabled for enabled, _ in now):
            torch.clear_autocast_cache()
