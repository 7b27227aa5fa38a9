"""Minibatch iteration over in-memory tensors."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import DataError


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool,
            generator: torch.Generator | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Iterate over ``(xb, yb)`` minibatches of one epoch.

    Every sample appears exactly once; the last batch is kept even when it is smaller than
    ``batch_size``. With ``shuffle=True`` the order is ``torch.randperm`` drawn from ``generator``
    (pass a seeded ``torch.Generator`` for a reproducible order; ``None`` uses torch's global RNG).
    Without shuffling the batches are views in the stored order. Arguments are checked at the
    call, not at the first ``next()``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if len(x) != len(y):
        raise DataError(f"batches(): x has {len(x)} samples but y has {len(y)}")
    order = torch.randperm(len(x), device="cpu", generator=generator) if shuffle else None
    return _iterate(x, y, batch_size, order)


def _iterate(x, y, batch_size, order):
    """Yield the batches of one epoch, in ``order`` (a permutation) or in stored order if None."""
    for start in range(0, len(x), batch_size):
        if order is None:
            yield x[start:start + batch_size], y[start:start + batch_size]
        else:
            idx = order[start:start + batch_size]
            yield x[idx], y[idx]
