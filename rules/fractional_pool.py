"""Fractional max pooling (2d, 3d; Graham 2014): max pooling over pseudo-random windows.

Each (sample, channel) plane draws u in [0, 1)^d, which places its windows; within them the op
is a max pool, so J_F selects the input position of each window's maximum (the returned indices)
and the rules are max pooling's (:mod:`fbcompile.rules.pool`):

    T (exact): G(g) = scatter-add of g at the indices (windows can overlap: their feedback adds);
    P (exact): the same divided by how many windows chose each position; I is refused.

The tapped forward draws u as ``F.fractional_max_pool2d`` does (``torch.rand(N, C, d)`` in the
input's dtype and device, from the global generator, so a seeded run draws what the model draws)
and saves it with the indices; ``replay`` re-evaluates the pass that ran with the saved u. Samples
given by the model (``_random_samples``) are used as given. ``return_indices=True`` makes the output
the (values, indices) pair, as for max pooling; ``F.fractional_max_pool2d_with_indices`` (how fx
records the functional call with return_indices=True) is its own op that always returns the pair.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op

from .pool import register_max_pool_rules, with_indices

KERNELS = {2: F.fractional_max_pool2d_with_indices, 3: F.fractional_max_pool3d_with_indices}


def _samples(input, n_spatial: int, given):
    """The window offsets u, drawn as torch's functional pooling draws them when not given."""
    if given is not None:
        return given
    batch = 1 if input.dim() == n_spatial + 1 else input.size(0)
    return torch.rand(batch, input.size(-n_spatial - 1), n_spatial, dtype=input.dtype, device=input.device)


def _make(n_spatial: int, pair_always: bool):
    """apply, tapped and replay of the n-d op; ``pair_always``: the with_indices spelling."""
    kernel = KERNELS[n_spatial]

    def apply(input, kernel_size, output_size=None, output_ratio=None, return_indices=False, _random_samples=None):
        pair = kernel(input, kernel_size, output_size, output_ratio, True, _random_samples)
        return pair if pair_always or return_indices else pair[0]

    def tapped(input, kernel_size, output_size=None, output_ratio=None, return_indices=False, _random_samples=None):
        samples = _samples(input, n_spatial, _random_samples)
        pair = kernel(input, kernel_size, output_size, output_ratio, True, samples)
        return (*with_indices(pair, pair_always or return_indices), samples)

    def replay(extras, input, kernel_size, output_size=None, output_ratio=None, return_indices=False,
               _random_samples=None):
        return apply(input, kernel_size, output_size, output_ratio, return_indices, extras["samples"])

    name = f"fractional_max_pool{n_spatial}d" + ("_with_indices" if pair_always else "")
    apply.__name__ = apply.__qualname__ = name
    tapped.__name__ = tapped.__qualname__ = f"{name}_tapped"
    return name, apply, tapped, replay


def _module(m):
    return {"kernel_size": m.kernel_size, "output_size": m.output_size, "output_ratio": m.output_ratio,
            "return_indices": m.return_indices, "_random_samples": m._random_samples}


SPELLINGS = {  # (n, pair_always) -> (functions, modules)
    (2, False): ([F.fractional_max_pool2d, F._fractional_max_pool2d], {nn.FractionalMaxPool2d: _module}),
    (3, False): ([F.fractional_max_pool3d, F._fractional_max_pool3d], {nn.FractionalMaxPool3d: _module}),
    (2, True): ([F.fractional_max_pool2d_with_indices], {}),
    (3, True): ([F.fractional_max_pool3d_with_indices], {}),
}
FRACTIONAL_POOLS = {}
for (_n, _pair_always), (_functions, _modules) in SPELLINGS.items():
    _name, _apply, _tapped, _replay = _make(_n, _pair_always)
    FRACTIONAL_POOLS[declare_op(_name, _apply, functions=_functions, modules=_modules, tapped=_tapped,
                                extras=("indices", "samples"), replay=_replay)] = _n


register_max_pool_rules(FRACTIONAL_POOLS)
