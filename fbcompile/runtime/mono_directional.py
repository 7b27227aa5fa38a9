"""Directional-derivative gradient estimates and parameter chunking for MF+DD (paper 004, sec. 3, 4.4).

Estimator. For a loss L of a flat parameter vector w in R^n, P directions v_p ~ N(0, I), v^_p = v_p/|v_p|:

    g^ = (n / P) sum_p D_p v^_p,   D_p = (L(w + eps v^_p) - L(w - eps v^_p)) / (2 eps).

D_p is the central difference: exact for quadratics (the eps^2 term cancels), O(eps^2) otherwise.
With E[v^ v^^T] = I/n, E[g^] = grad L (for exact D_p): unbiased, with variance growing like n/P,
which is why parameters are split into chunks of at most C_max entries (each chunk its own n).

Chunks (:class:`Chunk`): lists of flat index ranges into parameters, so a chunk can span several
tensors. :func:`unit_chunks` keeps each output channel (row of a Linear/conv weight) together with
its bias and the scale/shift of a BatchNorm reached from it inside the unit, and fills chunks with
whole channels up to ``chunk_size`` entries (paper 004, sec. 4.4); a single channel larger than
``chunk_size`` is split into consecutive ranges (the only case that breaks a channel). Parameters
outside such groups are split into consecutive ranges. :func:`row_chunks` does the same for the
rows of a head M.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FBCompileError
from ..passes.units import starts_unit
from ..trace import info


# -- the estimator ----------------------------------------------------------------------------------
def central_difference(loss_at, w: torch.Tensor, v: torch.Tensor, eps: float) -> float:
    """(L(w + eps v) - L(w - eps v)) / (2 eps) for a flat ``w`` and direction ``v``."""
    return (float(loss_at(w + eps * v)) - float(loss_at(w - eps * v))) / (2 * eps)


def directional_gradient(loss_at, w: torch.Tensor, directions: int, eps: float,
                         generator: torch.Generator) -> torch.Tensor:
    """g^ = (n/P) sum_p D_p v^_p for the flat vector ``w`` (see the module docstring).

    ``loss_at(w')`` evaluates the loss at the flat point w' (it may write w' into the model); the
    directions come from ``generator`` (CPU), so a seeded generator makes the estimate reproducible."""
    n = w.numel()
    estimate = torch.zeros_like(w)
    for _ in range(directions):
        v = torch.randn(n, device="cpu", generator=generator, dtype=w.dtype).to(w.device)
        v /= v.norm()
        estimate.add_(v, alpha=central_difference(loss_at, w, v, eps))
    return estimate.mul_(n / directions)


class RandomState:
    """The CPU random state and, for CUDA tensors among ``values``, their device's, captured now;
    ``restore()`` sets them back, so a pass run after it draws the same random numbers (dropout
    masks) as the pass run after the capture."""

    def __init__(self, values):
        device = next((v.device for v in values if torch.is_tensor(v) and v.device.type == "cuda"), None)
        self.device, self.cpu = device, torch.random.get_rng_state()
        self.accelerator = torch.cuda.get_rng_state(device) if device is not None else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.accelerator, self.device)


# -- chunks -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Chunk:
    """Flat index ranges ``(name, start, stop)`` of named tensors, perturbed together."""
    pieces: tuple

    @property
    def numel(self) -> int:
        return sum(stop - start for _, start, stop in self.pieces)

    def views(self, tensors: dict) -> list:
        """In-place writable flat views of the pieces (tensors must be contiguous)."""
        return [_flat(tensors[name], name)[start:stop] for name, start, stop in self.pieces]

    def read(self, tensors: dict) -> torch.Tensor:
        return read(self.views(tensors))

    def write(self, tensors: dict, flat: torch.Tensor) -> None:
        write(self.views(tensors), flat)

    def scatter(self, flat: torch.Tensor, into: dict) -> None:
        """Add the flat chunk vector ``flat`` into the full-size tensors of ``into`` (name -> tensor)."""
        offset = 0
        for name, start, stop in self.pieces:
            into[name].view(-1)[start:stop].add_(flat[offset:offset + stop - start])
            offset += stop - start


def read(views: list) -> torch.Tensor:
    """The concatenated values of flat ``views`` (a copy)."""
    return torch.cat(views) if len(views) > 1 else views[0].clone()


def write(views: list, flat: torch.Tensor) -> None:
    """Write consecutive parts of ``flat`` into the flat ``views``."""
    offset = 0
    for view in views:
        view.copy_(flat[offset:offset + view.numel()])
        offset += view.numel()


def _flat(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not tensor.is_contiguous():
        raise FBCompileError(f"MF+DD perturbs parameters through flat views; {name!r} is not contiguous "
                             "(call .contiguous() on it, e.g. undo channels_last)")
    return tensor.detach().view(-1)


def unit_chunks(unit, params: dict, chunk_size: int) -> list:
    """Chunks of the trainable parameters of ``unit`` (``params``: name -> Parameter)."""
    trainable = [p for p in unit.params if params[p].requires_grad]
    chunks, grouped = [], set()
    for group in channel_groups(unit, params):
        members = [p for p in group if p in trainable and p not in grouped]
        if not members:
            continue
        grouped.update(members)
        channels = params[members[0]].shape[0]
        rows = [(name, params[name].numel() // channels) for name in members]
        chunks += _pack_rows(rows, channels, chunk_size)
    for name in trainable:
        if name not in grouped:
            chunks += _split_flat(name, params[name].numel(), chunk_size)
    return chunks


def row_chunks(name: str, rows: int, row_size: int, chunk_size: int) -> list:
    """Chunks of whole rows of one (rows x row_size) tensor, e.g. a head M."""
    return _pack_rows([(name, row_size)], rows, chunk_size)


def channel_groups(unit, params: dict) -> list:
    """[[parameter names]] whose dim 0 indexes the output channels of one unit-starting op (Linear, conv,
    LayerNorm): its weight and bias, plus the weight/bias of BatchNorms fed by it within the unit."""
    groups, nodes = [], list(unit.nodes)
    for position, node in enumerate(nodes):
        call = info(node).call
        if call is None or not starts_unit(call.spec) or "weight" not in call.params:
            continue
        channels = params[call.params["weight"]].shape[0]
        group = [q for q in call.params.values() if params[q].dim() >= 1 and params[q].shape[0] == channels]
        for later in nodes[position + 1:]:
            other = info(later).call
            if other is None or other.spec.name != "batch_norm" or not _fed_by(later, node, set(nodes)):
                continue
            group += [q for q in other.params.values() if params[q].shape[0] == channels and q not in group]
        groups.append(group)
    return groups


def _fed_by(node, source, members: set) -> bool:
    """Whether ``node`` reads ``source`` through a chain of single-active-input ops inside the unit."""
    while True:
        sources = [src for _, _, src in info(node).call.active] if info(node).call is not None else []
        if len(sources) != 1:
            return False
        if sources[0] is source:
            return True
        node = sources[0]
        if node not in members:
            return False


def _pack_rows(rows: list, count: int, chunk_size: int) -> list:
    """Greedy packing of ``count`` channels, channel c = row c of every (name, row size) in ``rows``."""
    per_channel = sum(size for _, size in rows)
    chunks = []
    if per_channel > chunk_size:   # one channel exceeds the limit: split each channel's rows flat
        for c in range(count):
            pieces = [(name, c * size, (c + 1) * size) for name, size in rows]
            chunks += _split_pieces(pieces, chunk_size)
        return chunks
    step = chunk_size // per_channel
    for first in range(0, count, step):
        last = min(count, first + step)
        chunks.append(Chunk(tuple((name, first * size, last * size) for name, size in rows)))
    return chunks


def _split_flat(name: str, numel: int, chunk_size: int) -> list:
    return [Chunk(((name, start, min(numel, start + chunk_size)),)) for start in range(0, numel, chunk_size)]


def _split_pieces(pieces: list, chunk_size: int) -> list:
    """Consecutive chunks of at most ``chunk_size`` over the concatenation of ``pieces``."""
    chunks, current, room = [], [], chunk_size
    for name, start, stop in pieces:
        while start < stop:
            take = min(room, stop - start)
            current.append((name, start, start + take))
            start, room = start + take, room - take
            if room == 0:
                chunks.append(Chunk(tuple(current)))
                current, room = [], chunk_size
    if current:
        chunks.append(Chunk(tuple(current)))
    return chunks
