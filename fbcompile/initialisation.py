"""Random matrices for feedback: the initialisations shared by feedback weights (FA, FWDTP, learned
feedback) and direct projections (DFA, DRTP).

- ``"kaiming"``: U(-b, b), b = sqrt(6 / fan_in) (He uniform; the scale of trained forward weights).
- ``"xavier"``: U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
- ``"uniform"``: U(-scale, scale).
- ``"normal"``: N(0, scale^2).
- ``"forward"``: a copy of the forward weight (``like``).

fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive field (torch's convention).
"""
from __future__ import annotations

import math

import torch

from .errors import OptionError

INITS = ("kaiming", "xavier", "uniform", "normal", "forward")


def fans(shape: tuple) -> tuple[int, int]:
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


def draw(shape: tuple, init: str, scale: float, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    fan_in, fan_out = fans(shape)
    if init == "kaiming":
        bound = math.sqrt(6.0 / fan_in)
    elif init == "xavier":
        bound = math.sqrt(6.0 / (fan_in + fan_out))
    elif init == "uniform":
        bound = scale
    elif init == "normal":
        return torch.randn(shape, device="cpu", generator=generator, dtype=like.dtype).mul_(scale).to(like.device)
    elif init == "forward":
        return like.detach().clone()
    else:
        raise OptionError(f"feedback_init={init!r} is unknown; use one of {', '.join(INITS)}")
    return (torch.rand(shape, device="cpu", generator=generator, dtype=like.dtype) * 2 - 1).mul_(bound).to(like.device)
