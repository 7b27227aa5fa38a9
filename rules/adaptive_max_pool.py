"""Adaptive max pooling (1d, 2d, 3d): max pooling over the bins that cover the input evenly for the
requested output size (bins can overlap).

As for max pooling (:mod:`fbcompile.rules.pool`), J_F selects the input position of each bin's
maximum, the flat per-plane index the op returns, so

    T (exact): G(g) = scatter-add of g at the indices (overlapping bins add their feedback);
    P (exact): the same divided by how many bins chose each position; I is refused.

The tapped forward always asks for the indices and saves them. ``return_indices=True`` makes the
output the (values, indices) pair (a MaxUnpool can read them); fx records the functional call
with return_indices=True as ``F.adaptive_max_pool2d_with_indices``, its own op returning the pair,
which is also how torch.export writes every adaptive max pool (``aten.adaptive_max_pool2d``).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fbcompile.ops import declare_op

from .pool import register_max_pool_rules, with_indices

POOLS = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}


def _make(n_spatial: int, pair_always: bool):
    """apply and tapped of the n-d op; ``pair_always``: the with_indices spelling."""
    pool = POOLS[n_spatial]

    def apply(input, output_size, return_indices=False):
        return pool(input, output_size, return_indices=bool(pair_always or return_indices))

    def tapped(input, output_size, return_indices=False):
        return with_indices(pool(input, output_size, return_indices=True), pair_always or return_indices)

    name = f"adaptive_max_pool{n_spatial}d" + ("_with_indices" if pair_always else "")
    apply.__name__ = apply.__qualname__ = name
    tapped.__name__ = tapped.__qualname__ = f"{name}_tapped"
    return name, apply, tapped


def _module(m):
    return {"output_size": m.output_size, "return_indices": m.return_indices}


SPELLINGS = {  # (n, pair_always) -> (functions, modules)
    (1, False): ([F.adaptive_max_pool1d], {nn.AdaptiveMaxPool1d: _module}),
    (2, False): ([F.adaptive_max_pool2d], {nn.AdaptiveMaxPool2d: _module}),
    (3, False): ([F.adaptive_max_pool3d], {nn.AdaptiveMaxPool3d: _module}),
    (1, True): ([F.adaptive_max_pool1d_with_indices], {}),
    (2, True): ([F.adaptive_max_pool2d_with_indices], {}),
    (3, True): ([F.adaptive_max_pool3d_with_indices], {}),
}
ADAPTIVE_MAX_POOLS = {}
for (_n, _pair_always), (_functions, _modules) in SPELLINGS.items():
    _name, _apply, _tapped = _make(_n, _pair_always)
    ADAPTIVE_MAX_POOLS[declare_op(_name, _apply, functions=_functions, modules=_modules, tapped=_tapped,
                                  extras=("indices",))] = _n

register_max_pool_rules(ADAPTIVE_MAX_POOLS)
