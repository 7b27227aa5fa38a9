"""Fourier transforms and complex values: ``torch.fft``'s transforms (``fft`` / ``ifft``, ``fft2`` /
``ifft2``, ``fftn`` / ``ifftn``, their real forms ``rfft*`` / ``irfft*`` and ``hfft`` / ``ihfft``),
the parts of a complex tensor (``torch.real`` / ``torch.imag``, and ``z.real`` / ``z.imag``, which
canonicalization spells so), ``view_as_real``, ``view_as_complex``, ``torch.complex`` and the
short-time transforms ``torch.stft`` / ``torch.istft`` (a spectrogram inside the model). FNet mixes
its tokens with ``fftn(h, dim=(1, 2)).real``; spectral filters (GFNet, Fourier neural operators)
transform, scale and transform back.

The feedback of a complex value z follows autograd's convention: for a real loss L it is
dL/dRe z + i dL/dIm z. A map z = A x, linear over the complex numbers, then sends feedback g back as
A^H g (conjugate transpose), and a real input keeps the real part: for ``y = fft(x).real`` with x
real, the feedback at the transform's output is g + 0i and at x Re(conj(F) g) = Re(F g), F the
(symmetric) DFT matrix. A rule written for real tensors would skip that conjugation, so only rules
registered with ``complex_values=True`` serve complex values: these, every rule that is autograd's
vjp, mul / div (:mod:`rules.arith`: GFNet's filter, a spectrum times a complex weight), add / sub /
neg, sum / mean, abs (g sgn z, autograd's formula for complex z), and the structural and selection
rules (reshapes, permutations, cat / split, indexing, expand / repeat, flips), which map with real
coefficients, so that A^H = A^T. Any other is refused on complex values, naming the op
(:func:`fbcompile.compiler.select_rules`).

T (kind "linearised"): J_F(x)^T g by autograd's vjp at the saved inputs (:func:`rules.vjp_ops.autograd_vjp`),
so error mode equals autograd to rounding. A transform over dims that leave out the batch dim 0
keeps the samples apart (``batch_local``); ``fftn`` without ``dim`` transforms the batch too.
"""
from __future__ import annotations

import torch

from fbcompile.ops import declare_op, tensor_method
from fbcompile.registry import register_rule

from .vjp_math import _unary
from .vjp_ops import _apart, autograd_vjp


def _one_dim(fn):
    def apply(input, n=None, dim=-1, norm=None):
        return fn(input, n, dim, norm)
    return apply


def _two_dims(fn):
    def apply(input, s=None, dim=(-2, -1), norm=None):
        return fn(input, s, dim, norm)
    return apply


def _n_dims(fn):
    def apply(input, s=None, dim=None, norm=None):
        return fn(input, s, dim, norm)
    return apply


#: transform name -> (how its apply takes the transformed dims, their default)
TRANSFORMS = {**{name: (_one_dim, -1) for name in ("fft", "ifft", "rfft", "irfft", "hfft", "ihfft")},
              **{name: (_two_dims, (-2, -1)) for name in ("fft2", "ifft2", "rfft2", "irfft2")},
              **{name: (_n_dims, None) for name in ("fftn", "ifftn", "rfftn", "irfftn")}}


def complex(real, imag):     # noqa: A001  (torch's name)
    return torch.complex(real, imag)


def stft(input, n_fft, hop_length=None, win_length=None, window=None, center=True, pad_mode="reflect",
         normalized=False, onesided=None, return_complex=None, align_to_window=None):
    return torch.stft(input, n_fft, hop_length, win_length, window, center, pad_mode, normalized, onesided,
                      return_complex, align_to_window)


def istft(input, n_fft, hop_length=None, win_length=None, window=None, center=True, normalized=False,
          onesided=None, length=None, return_complex=False):
    return torch.istft(input, n_fft, hop_length, win_length, window, center, normalized, onesided, length,
                       return_complex)


def _batch_of_signals(rank: int):
    """stft of (batch, time) and istft of (batch, freq, frames) keep the samples apart; one signal does not."""
    return lambda ctx: len(ctx.shape("input")) == rank


def _transform(name: str):
    shape, default = TRANSFORMS[name]
    fn = getattr(torch.fft, name)
    apply = shape(fn)
    apply.__name__ = apply.__qualname__ = f"fft_{name}"
    return declare_op(f"fft_{name}", apply, functions=[fn], batch_local=_apart(default=default))


FOURIER_OPS = [
    *(_transform(name) for name in TRANSFORMS),
    *(declare_op(name, _unary(name, fn), functions=[fn]) for name, fn in (
        ("real", torch.real), ("imag", torch.imag), ("view_as_real", torch.view_as_real))),
    declare_op("view_as_complex", _unary("view_as_complex", torch.view_as_complex),
               functions=[torch.view_as_complex], batch_local=lambda ctx: len(ctx.shape("input")) > 2),
    declare_op("complex", complex, functions=[torch.complex]),
    declare_op("stft", stft, functions=[torch.stft], methods=[tensor_method("stft")], batch_local=_batch_of_signals(2)),
    declare_op("istft", istft, functions=[torch.istft], methods=[tensor_method("istft")],
               batch_local=_batch_of_signals(3)),
]
for _op in FOURIER_OPS:
    register_rule(_op, conditions="T", kind="linearised", complex_values=True)(autograd_vjp)
