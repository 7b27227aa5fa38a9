"""Random matrices for feedback: the initialisations shared by feedback weights (FA, FWDTP, learned
feedback) and direct projections (DFA, DRTP).

- ``"kaiming"``: U(-b, b), b = sqrt(6 / fan_in) (He uniform; the scale of trained forward weights).
- ``"xavier"``: U(-b, b), b = sqrt(6 / (fan_in + fan_out)).
- ``"uniform"``: U(-scale, scale).
- ``"normal"``: N(0, scale^2).
- ``"forward-scale"``: U(-b, b), b = sqrt(3) rms(W): a random matrix with the forward weight's own
  root-mean-square (``like``; He uniform where W is all zero). Fixed random feedback B stands in
  for W^T, and a normalisation after W (conv -> BatchNorm, Linear -> LayerNorm) makes the forward,
  and so W^T's backward, independent of W's scale, but not B^T's: the error through the pair is
  multiplied by rms(B) / rms(W) per pair. With He-scale B on weights drawn at std 0.02 (torchvision's
  MaxVit) that ratio is 4.4 (median; 24 at depthwise convs) and FA's errors grow ~1e50-fold through
  MaxVit's 11 blocks, past float32 (issue 11); at the forward scale they stay on BP's scale.
- ``"forward"``: a copy of the forward weight (``like``).

fan_in = shape[1] * receptive field, fan_out = shape[0] * receptive field (torch's convention).
"""
from __future__ import annotations

import math

import torch

from .errors import OptionError

INITS = ("kaiming", "xavier", "uniform", "normal", "forward-scale", "forward")   # "forward" last (FA excludes it)


def fans(shape: tuple) -> tuple[int, int]:
    """(fan in, fan out) of a weight of ``shape``; a vector (a direct projection onto one number per
    sample) is one column."""
    if len(shape) < 2:
        return 1, math.prod(shape)
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
    elif init == "forward-scale":
        rms = float(like.detach().double().pow(2).mean().sqrt()) if like.numel() else 0.0
        bound = math.sqrt(3.0) * rms if rms > 0 and math.isfinite(rms) else math.sqrt(6.0 / fan_in)
    elif init == "normal":
        return torch.randn(shape, device="cpu", generator=generator, dtype=like.dtype).mul_(scale).to(like.device)
    elif init == "forward":
        return like.detach().clone()
    else:
        raise OptionError(f"feedback_init={init!r} is unknown; use one of {', '.join(INITS)}")
    return (torch.rand(shape, device="cpu", generator=generator, dtype=like.dtype) * 2 - 1).mul_(bound).to(like.device)
