"""Where a value keeps its samples: the batch layout of a traced value, found by running the model.

Direct feedback and Mono-Forward's heads give every sample of a value its own signal, so they need
to know which entries of the value belong to which sample. Dim 0 of every model input is its batch
(N samples). A value's *batch layout* is one of

- an int ``a``: the samples run along axis ``a`` (sample i is ``value.select(a, i)``); the
  per-sample shape is the value's shape without axis ``a`` (``a = 1`` for a time-first ``(L, N, E)``
  sequence);
- a :class:`Fold` ``(a, k)``, a *batch-major fold*: axis ``a`` has size k*N and sample i's entries
  are exactly the k rows ``[i*k, (i+1)*k)`` of it. Hugging Face GPT-2's Conv1D computes
  ``x.view(-1, C)`` of a ``(N, T, C)`` input (a fold with k = T), torchvision swin_t's window partition
  reshapes ``(N, H, W, C)`` into ``(N*nW, ws*ws, C)`` (k = nW windows). The per-sample shape is the
  value's shape with axis ``a`` of size k: ``(k, *rest)`` for ``a = 0``;
- a :class:`Fold` ``(a, k, outer)`` in general: axis ``a`` is laid out as ``(outer, N, k / outer)``,
  sample i's rows being ``o*N*(k/outer) + i*(k/outer) + r``. ``outer = 1`` is the batch-major fold;
  ``outer = k`` the *batch-minor* one, rows ``t*N + i`` (a time-major ``(T, N, C)`` sequence
  flattened: ``nn.MultiheadAttention`` projects ``(L*N, E)`` rows so, also with ``batch_first=True``);
  in between, windows that keep the batch inside (grid partitions). Same per-sample shape.

:func:`place_batch_axis` lays a batch-first per-sample tensor ``P`` of shape ``(N, *S)`` out like the
value, :func:`gather_samples` is its inverse. For a fold, ``P``'s axis k is split into
``(outer, k / outer)``, N is moved between the two and the three are merged: for ``outer = 1`` row
``i*k + j`` of the value gets ``P[i, .., j, ..]``, for ``outer = k`` row ``j*N + i`` does.

:func:`batch_axes` finds the layout of traced values by running the model once more, on random
inputs of another batch size M (2, or N + 1 for N <= 2): the layout's axis is the one axis whose
size changed, from N to M (axis ``a``) or from k*N to k*M, k > 1 (a fold ``(a, k)``); anything else
is refused. Only when that run fails (a model that cannot take made-up inputs) is a value with
exactly one axis of size N taken to keep its samples there.

The runs draw floating inputs at random and the rows of integer and boolean inputs (token ids,
masks) from the example's own, so special tokens the model relies on stay (BART's classifier reads
each sequence's end token).

Every fold is then *verified*, not assumed: on a float64 copy of the model (in the model's own
dtype when a float64 copy cannot run, as when forward casts to its weights' dtype captured as a
constant), with a batch of three random samples, each sample i in turn is replaced by another one
(floating inputs drawn again, integer rows rolled by one position), and the value must change
only in that sample's rows of one ``outer`` (each divisor of k is tried, batch-major first), the
same for every sample (every other row within 1e-10 of the value's largest entry). Rows in any other
order (reversed, shuffled) or samples mixed with each other (statistics over the batch computed op by
op) fail, and the value is refused with an error naming its node. In these runs, the calls of an op
that declares ``apart`` run that instead: BatchNorm on fixed statistics, as a module (also one
without running statistics) or as the functional ``F.batch_norm`` call timm's BatchNormAct2d traces
to. Batch statistics couple all samples, which says nothing about where each sample's rows are (the
layout is the same with any statistics). The model's parameters, buffers and random state are left
as they were: the checks run on copies, with the CPU RNG (and the model device's) forked for every
run, so each starts from the same random state and train-mode dropout draws the same masks in all.
"""
from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple

import torch
from torch import fx, nn

from ..errors import FBCompileError
from ..trace import EXAMPLE_ROWS, META, AttrRef, describe, info, preserved_state

FOLD_CHECK_BATCH = 3                # samples in the fold check's runs
FOLD_CHECK_TOLERANCE = 1e-10        # allowed change outside a sample's rows, relative to the value's size


class Fold(NamedTuple):
    """A value whose axis ``axis`` holds k*N rows, k per sample, laid out as ``(outer, N, k / outer)``:
    sample i's rows are ``[i*k, (i+1)*k)`` for ``outer = 1``, ``t*N + i`` for ``outer = k`` (see the
    module docstring)."""
    axis: int
    k: int
    outer: int = 1

    @property
    def inner(self) -> int:
        return self.k // self.outer

    def rows(self, sample: int, batch: int) -> list:
        """The rows of ``sample`` along the folded axis, at batch size ``batch``."""
        return [o * batch * self.inner + sample * self.inner + r for o in range(self.outer) for r in range(self.inner)]


def per_sample_shape(shape: tuple, layout) -> tuple:
    """The shape of one sample's part of a value of ``shape`` with batch layout ``layout``."""
    if isinstance(layout, tuple):
        axis, k = layout[:2]
        return tuple(k if i == axis else size for i, size in enumerate(shape))
    return tuple(size for i, size in enumerate(shape) if i != layout)


def place_batch_axis(per_sample: torch.Tensor, batch_axis) -> torch.Tensor:
    """A batch-first ``(N, *S)`` tensor laid out like a value of batch layout ``batch_axis``."""
    if isinstance(batch_axis, tuple):
        fold = Fold(*batch_axis)
        split = per_sample.unflatten(fold.axis + 1, (fold.outer, fold.inner))
        return split.movedim(0, fold.axis + 1).flatten(fold.axis, fold.axis + 2)
    return per_sample if batch_axis == 0 else per_sample.movedim(0, batch_axis)


def gather_samples(value: torch.Tensor, batch_axis) -> torch.Tensor:
    """The inverse of :func:`place_batch_axis`: a value of batch layout ``batch_axis`` as ``(N, *S)``."""
    if isinstance(batch_axis, tuple):
        fold = Fold(*batch_axis)
        split = value.unflatten(fold.axis, (fold.outer, -1, fold.inner)).movedim(fold.axis + 1, 0)
        return split.flatten(fold.axis + 1, fold.axis + 2)
    return value if batch_axis == 0 else value.movedim(batch_axis, 0)


def probe_batch(batch: int) -> int:
    """The second batch size the layouts are read at: 2 (cheap), or batch + 1 for batches 1 and 2."""
    return 2 if batch > 2 else batch + 1


def batch_axes(traced: fx.GraphModule, nodes: list, purpose: str) -> dict:
    """{node: its batch layout} (see the module docstring); ``purpose`` says who needs it in errors.
    Non-tensor values get 0 (the caller refuses them). At the example's batch N and the probe's M,
    axis a with sizes (N, M) keeps the samples; sizes (k*N, k*M), k > 1, a fold ``(a, k)``."""
    batch = example_batch(traced)
    tensors = [node for node in nodes if not info(node).is_tuple and info(node).shape]
    axes = {node: 0 for node in nodes if node not in tensors}
    if not tensors:
        return axes
    other = probe_batch(batch)
    try:
        grown = shapes_at_batch(traced, other, tensors)
    except FBCompileError:
        unique = {node: [a for a, size in enumerate(info(node).shape) if size == batch] for node in tensors}
        if any(len(found) != 1 for found in unique.values()):
            raise
        return {**axes, **{node: found[0] for node, found in unique.items()}}   # the probe cannot decide
    folds = {}
    for node in tensors:
        shape, bigger = tuple(info(node).shape), grown[node]
        grew = [a for a, (m, n) in enumerate(zip(shape, bigger)) if m != n] if len(shape) == len(bigger) else []
        k = shape[grew[0]] // batch if len(grew) == 1 else 0
        if len(grew) != 1 or k < 1 or (shape[grew[0]], bigger[grew[0]]) != (k * batch, k * other):
            raise FBCompileError(f"{purpose} needs the batch axis of {describe(node)}, but its shape {shape} "
                                 f"(batch {batch}) became {bigger} at batch {other}: no single axis has the "
                                 "batch's size N or a multiple k*N at both batch sizes")
        axes[node] = grew[0] if k == 1 else Fold(grew[0], k)
        if k > 1:
            folds[node] = axes[node]
    if folds:
        axes.update(fold_orders(traced, folds, purpose))
    return axes


def fold_orders(traced: fx.GraphModule, folds: dict, purpose: str) -> dict:
    """{node: its :class:`Fold`, with the ``outer`` its rows follow} for every value of ``folds``
    ({node: batch-major Fold}): the order in which the samples' rows change (the check of the module
    docstring); a value whose rows follow none is refused."""
    try:
        return _fold_orders_in(traced, folds, purpose, torch.float64)
    except _RunFailed as failed:
        own = next((p.dtype for p in traced.parameters() if p.is_floating_point()), torch.float64)
        if own == torch.float64:
            raise
        try:        # a model that casts to its own dtype inside (SigLIP: pixel_values.to(weight.dtype))
            return _fold_orders_in(traced, folds, purpose, own)
        except _RunFailed:
            raise failed from None


class _RunFailed(FBCompileError):
    """The fold check's run of the model failed (on inputs it made up, in the dtype it chose)."""


def _fold_orders_in(traced: fx.GraphModule, folds: dict, purpose: str, dtype: torch.dtype) -> dict:
    """:func:`fold_orders` with the runs on a copy of the model in ``dtype``."""
    n = FOLD_CHECK_BATCH
    try:
        model = copy.deepcopy(traced).to(dtype)
    except Exception as exc:   # noqa: BLE001  (a module that cannot be copied)
        raise FBCompileError(f"{purpose}: checking how {', '.join(node.name for node in folds)} fold the batch needs a "
                             f"{dtype} copy of the model, which failed: {type(exc).__name__}: {exc}") from exc
    by_name = {node.name: node for node in folds}
    generator = torch.Generator().manual_seed(12345)
    base = _inputs(model, n, generator, dtype)
    reference = _values(model, base, by_name, purpose)
    orders = {node: [folds[node]._replace(outer=o) for o in range(1, folds[node].k + 1) if folds[node].k % o == 0]
              for node in folds}                     # the candidates left, batch-major first
    first_failure = {}
    for sample in range(n):
        changed = [x.clone() for x in base]
        for x, other in zip(changed, _inputs(model, n, generator, dtype)):
            _other_sample(x, sample, other)
        values = _values(model, changed, by_name, purpose)
        for name, node in by_name.items():
            fold = folds[node]
            before, after = reference[name], values[name]
            if before.shape[fold.axis] != fold.k * n:
                raise FBCompileError(f"{purpose}: {node.name!r} folds the batch into axis {fold.axis} as {fold.k} rows "
                                     f"per sample, but at batch {n} that axis has size {before.shape[fold.axis]}; the "
                                     f"node: {describe(node)}")
            change = (after - before).abs().movedim(fold.axis, 0).reshape(fold.k * n, -1).amax(1)
            limit = FOLD_CHECK_TOLERANCE * max(float(before.abs().max()), float(after.abs().max()), 1e-300)
            changed = ~(change <= limit)                                    # NaN counts as a change
            for order in list(orders[node]):
                outside = changed.clone()
                outside[order.rows(sample, n)] = False
                if bool(outside.any()):
                    orders[node].remove(order)
                    first_failure.setdefault(node, (sample, outside.nonzero().flatten().tolist()))
    found = {}
    for node, left in orders.items():
        if not left:
            fold, (sample, rows) = folds[node], first_failure[node]
            raise FBCompileError(
                f"{purpose} needs each sample's part of {node.name!r}, whose axis {fold.axis} grows as {fold.k}*batch, "
                f"but its rows follow no (outer, batch, inner) fold: changing sample {sample} of a "
                f"batch of {n} changed its rows {rows[:8]}{' ...' if len(rows) > 8 else ''} outside that sample's "
                f"rows [{sample * fold.k}, {(sample + 1) * fold.k}) (samples folded in another order, or mixed with "
                f"each other, as by batch statistics computed op by op rather than by a BatchNorm); the node: "
                f"{describe(node)}")
        found[node] = left[0]
    return found


def _values(model: fx.GraphModule, inputs: list, by_name: dict, purpose: str) -> dict:
    """{name: value of that node} for one float64 run (from the same random state as every other)."""
    found, nodes = {}, {node.name: node for node in model.graph.nodes}

    class Recorder(fx.Interpreter):
        def arguments(self, canonical: dict) -> dict:
            """A call's canonical arguments in this run: a copied node's record names the nodes and
            attributes of the graph and model it came from, found here by name."""
            return {name: self.env[nodes[value.name]] if isinstance(value, fx.Node)
                    else _attribute(model, value.qualname) if isinstance(value, AttrRef) else value
                    for name, value in canonical.items()}

        def run_node(self, node):
            apart = _apart_call(node)
            value = apart.spec.apart(self.arguments(apart.args)) if apart else super().run_node(node)
            if node.name in by_name:
                found[node.name] = value.detach().clone()
            return value

    try:
        with torch.no_grad(), preserved_state(model), _same_random_state(inputs[0].device if inputs else None):
            Recorder(model).run(*inputs)
    except Exception as exc:   # noqa: BLE001  (the user's model, on inputs we made up)
        dtype = next((x.dtype for x in inputs if x.is_floating_point()), None)
        raise _RunFailed(f"{purpose}: checking how {', '.join(by_name)} fold the batch, the model failed in "
                         f"{dtype or 'its own dtype'} on random inputs of batch {FOLD_CHECK_BATCH}: "
                         f"{type(exc).__name__}: {exc}") from exc
    return found


def _apart_call(node: fx.Node):
    """The canonical call of a node whose op runs with the samples kept apart in the fold check (its
    ``apart``: BatchNorm on fixed statistics, as a module or as the functional call timm's
    BatchNormAct2d traces to), else None."""
    record = node.meta.get(META)
    call = record.call if record is not None else None
    if call is None or call.spec.apart is None or record.is_tuple:
        return None
    return call


def _attribute(model: nn.Module, qualname: str):
    value = model
    for name in qualname.split("."):
        value = getattr(value, name)
    return value


@contextlib.contextmanager
def _same_random_state(device):
    """One run starting from the same random state as every other: the CPU RNG (forked by
    ``preserved_state``) and the RNG of the model's ``device`` (forked here) are put back after it,
    so all runs draw the same dropout masks and the caller's random state is left as it was."""
    if device is None or device.type == "cpu":
        yield
        return
    index = device.index if device.index is not None else torch.get_device_module(device.type).current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type):
        yield


def _placeholders(traced: fx.GraphModule) -> list:
    return [node for node in traced.graph.nodes if node.op == "placeholder"]


def example_batch(traced: fx.GraphModule) -> int:
    shapes = [info(node).shape for node in _placeholders(traced)]
    if not shapes or not shapes[0]:
        raise FBCompileError("direct feedback and local heads need a model input with a batch dimension (dim 0)")
    return shapes[0][0]


def _inputs(traced: fx.GraphModule, batch: int, generator: torch.Generator, floats=None) -> list:
    """Random inputs of batch size ``batch`` shaped like the example's: floating inputs N(0, 1) (in
    ``floats`` when given, else their own dtype); integer and bool inputs rows drawn from the
    example's own (one drawn row per sample for all of them: token ids keep their special tokens and
    a mask stays its sequence's), or 0 or 1 (valid indices of any embedding) where the example is
    not known; on the device of the model's parameters."""
    device = next((p.device for p in traced.parameters()), torch.device("cpu"))
    inputs, rows = [], torch.randint(0, 2 ** 31 - 1, (batch,), generator=generator)
    for node in _placeholders(traced):
        record = info(node)
        shape, dtype = (batch, *record.shape[1:]), record.dtype or torch.long
        example = node.meta.get(EXAMPLE_ROWS)
        if dtype.is_floating_point:
            value = torch.randn(shape, device="cpu", generator=generator, dtype=floats or dtype)
        elif example is not None and tuple(example.shape[1:]) == shape[1:]:
            value = example[rows % example.shape[0]]
        else:
            value = torch.randint(0, 2, shape, device="cpu", generator=generator).to(dtype)
        inputs.append(value.to(device))
    return inputs


def _other_sample(x: torch.Tensor, sample: int, other: torch.Tensor) -> None:
    """Replace sample ``sample`` of ``x`` by another one: ``other``'s for floating inputs; integer and
    bool rows rolled by one along their last axis (the same tokens, so as valid as before, in
    another order), a single integer flipped between 0 and 1."""
    if x.is_floating_point():
        x[sample] = other[sample]
    elif x.dim() > 1:
        x[sample] = x[sample].roll(1, -1)
    else:
        x[sample] = (x[sample] == 0).to(x.dtype)


def shapes_at_batch(traced: fx.GraphModule, batch: int, nodes: list) -> dict:
    """{node: its value's shape} when the traced model runs on random inputs of batch size ``batch``
    (its buffers and the random state are left as they were)."""
    inputs = _inputs(traced, batch, torch.Generator().manual_seed(0))
    wanted, shapes = set(nodes), {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node in wanted:
                shapes[node] = tuple(value.shape)
            return value

    try:
        with torch.no_grad(), preserved_state(traced):
            Recorder(traced).run(*inputs)
    except Exception as exc:   # noqa: BLE001  (the user's model, on inputs we made up)
        raise FBCompileError(f"finding the batch axes of {', '.join(n.name for n in nodes)}: the model failed on "
                             f"inputs of batch {batch}: {type(exc).__name__}: {exc}") from exc
    return shapes
