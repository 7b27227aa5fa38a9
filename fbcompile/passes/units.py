"""Group forward nodes into TP units.

A unit is the granularity of target propagation: targets are placed on unit outputs, difference
correction acts per unit, and each unit's parameters learn from their own local loss
||F_u(h_in) - t_out||^2 / (2 beta). Groupings:

- ``"layer"`` (default): every op that holds weights starts a unit (:func:`starts_unit`, read off
  the op's traits: Linear, Conv, Embedding, MultiheadAttention, LayerNorm, any user-declared op with
  a ``weight`` argument); every other op joins the newest unit among its inputs' units (so a unit
  only reads units created before it and units run in index order), so Linear-tanh,
  Conv-BN-ReLU-MaxPool and a residual add with its activation form one unit. A pre-norm LayerNorm
  starts its sub-block's unit, so no local loss differentiates through a LayerNorm's input (where
  the feedback freezes its statistics). Ops before the first such op form parameter-free units. A
  value made from parameters and the input's sizes alone, with no axis of the batch's size (a
  position embedding interpolated to the feature map), joins the unit of its first reader.
- ``"op"``: every op is its own unit.
- ``"module"``: ops inside the same child module of the model (``model.<name>``, one level below the
  root, or ``depth`` levels with ``("module", depth)``) form one unit; ops outside any child module
  join the newest unit among their inputs' units.
- a callable ``node -> key``: nodes with equal keys form one unit.

Whatever the grouping, a tuple value (``split``, ``unbind``, a module's tuple output) stays inside
its unit: the selects of its elements and the ops that read it whole join the unit that made it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import fx

from ..errors import OptionError, choices_text
from ..trace import info

GROUPINGS = ("layer", "op", "module")


@dataclass(eq=False)
class Unit:
    index: int
    nodes: list = field(default_factory=list)     # op and select nodes, topological order
    inputs: list = field(default_factory=list)    # active values produced outside, used inside
    outputs: list = field(default_factory=list)   # values used outside the unit or returned
    params: list = field(default_factory=list)    # qualified parameter names

    @property
    def name(self) -> str:
        ops = [n.name for n in self.nodes if info(n).role == "op"]
        return "+".join(ops[:3]) + ("+..." if len(ops) > 3 else "")


@dataclass(eq=False)
class Partition:
    units: list
    unit_of: dict          # fx.Node -> Unit
    grouping: object
    boundary: list = field(default_factory=list)   # active model inputs, then unit outputs in graph order


def partition(gm: fx.GraphModule, grouping="layer") -> Partition:
    """Assign every active op node of ``gm`` to a :class:`Unit`."""
    key_of = _key_function(grouping)
    nodes = [n for n in gm.graph.nodes if info(n).role in ("op", "select") and info(n).from_input]
    unit_of, by_key, units = {}, {}, []

    def new_unit():
        units.append(Unit(len(units)))
        return units[-1]

    batch = next((info(n).shape[0] for n in gm.graph.nodes if n.op == "placeholder" and info(n).shape
                  and not info(n).is_tuple and len(info(n).shape)), None)
    shared = []         # values without a batch axis made from parameters: they join their first reader's unit
    for node in nodes:
        producers = [unit_of[p] for p in node.all_input_nodes if p in unit_of]
        latest = max(producers, key=lambda u: u.index) if producers else None
        tuples = [p for p in node.all_input_nodes if p in unit_of and info(p).is_tuple]
        if grouping == "layer" and not producers and _shared_by_the_batch(node, batch, shared):
            shared.append(node)
            continue
        if tuples:          # a tuple value never crosses a unit boundary: selects and whole-tuple
            unit = unit_of[tuples[-1]]     # consumers (cat(parts), stack(unbind(x))) join its unit
        else:
            key = key_of(node)
            if key is _FOLLOW:
                unit = latest or new_unit()
            elif key is _LEAD:
                unit = new_unit()
            else:
                unit = by_key.get(key) or by_key.setdefault(key, new_unit())
        unit.nodes.append(node)
        unit_of[node] = unit
    _join_readers(gm, shared, unit_of, new_unit)
    _connect(gm, units, unit_of)
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and info(n).active]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    outputs = sorted({n for unit in units for n in unit.outputs}, key=order.__getitem__)
    return Partition(units, unit_of, grouping, inputs + outputs)


_FOLLOW, _LEAD = object(), object()


def _shared_by_the_batch(node: fx.Node, batch, shared: list) -> bool:
    """Whether ``node`` is computed from parameters (and sizes of the input) alone and has no axis of
    the batch's size: one value for every sample, such as a position embedding interpolated to the
    feature map's size under torch.fx (timm's HieraDet), an activation only through the sizes it
    reads. As a unit of its own it would be a unit output without a batch axis, which direct
    projections and Mono-Forward's heads cannot take; it joins the unit that reads it instead."""
    record = info(node)
    if record.is_tuple or record.shape is None or batch is None or batch in record.shape:
        return False
    sources = node.all_input_nodes
    parameter_like = [src in shared or info(src).role == "param" or info(src).param_only for src in sources]
    sizes_or_constants = [info(src).role in ("value", "constant") for src in sources]
    return any(parameter_like) and all(p or c for p, c in zip(parameter_like, sizes_or_constants))


def _join_readers(gm: fx.GraphModule, shared: list, unit_of: dict, new_unit) -> None:
    """Put each value of ``shared`` in the unit of its first reader (last values first, so a chain
    of them follows its reader), in graph order within that unit."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in reversed(shared):
        readers = sorted((user for user in node.users if user in unit_of), key=order.__getitem__)
        unit = unit_of[readers[0]] if readers else new_unit()
        unit.nodes.append(node)
        unit.nodes.sort(key=order.__getitem__)
        unit_of[node] = unit


def path_parameters(node: fx.Node) -> list:
    """The trainable parameters a parameter-path value (``self.cls_token.expand(b, -1, -1)``) is
    computed from: they learn with the unit that reads the value."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current in seen or not info(current).param_only:
            continue
        seen.add(current)
        if info(current).role == "param":
            found.append(current.target)
        else:
            call = info(current).call
            found.extend(call.params.values() if call is not None else ())
            stack.extend(current.all_input_nodes)
    return sorted(set(found))


def _carries_feedback(user: fx.Node) -> bool:
    """Whether ``user`` sends feedback back to its inputs: an active op or tuple element. A consumer
    that only reads metadata (``h.size(0)``, ``h.shape``, ``h.dtype``) computes no active value, so
    it never makes ``h`` a unit output (a spurious output would add a second local loss on h)."""
    return user.op != "output" and info(user).from_input and info(user).role in ("op", "select")


# Channel normalisations rescale each channel of the layer that feeds them (Conv-BN-ReLU is one
# layer; instance norm likewise), and so do PReLU's per-channel slopes (Conv-PReLU): they hold
# weights (a per-channel gain) yet join their producer's unit. Matched by the torch function the op
# spells, as canonicalisation matches every spelling: by identity.
CHANNEL_NORMALISATIONS = (F.batch_norm, F.group_norm, F.instance_norm, F.prelu)
# Losses whose ``weight`` argument weighs the classes: no layer's weight, so they start no unit.
CLASS_WEIGHTED_LOSSES = (F.cross_entropy, F.nll_loss, F.binary_cross_entropy, F.binary_cross_entropy_with_logits)


def starts_unit(spec) -> bool:
    """Whether an op starts a unit under the "layer" grouping: it holds weights (``spec.weights``,
    the ``weight``/``*_weight`` arguments of its signature) and is neither a channel normalisation
    nor a class-weighted loss."""
    return bool(spec.weights) and not any(fn in CHANNEL_NORMALISATIONS + CLASS_WEIGHTED_LOSSES
                                          for fn in spec.functions)


def _key_function(grouping):
    if callable(grouping):
        return grouping
    depth = 1
    if isinstance(grouping, tuple) and len(grouping) == 2 and grouping[0] == "module":
        grouping, depth = grouping
        if not isinstance(depth, int) or depth < 1:
            raise OptionError(f"units=('module', depth): depth must be a positive int, got {depth!r}")
    if grouping == "op":
        return lambda node: _LEAD
    if grouping == "layer":
        return lambda node: _LEAD if starts_unit(info(node).call.spec) else _FOLLOW
    if grouping == "module":
        return lambda node: _module_key(node, depth)
    raise OptionError(f"units={grouping!r} is not a grouping; use {choices_text(GROUPINGS)}, "
                      "('module', depth) or a callable node -> key")


def _module_key(node: fx.Node, depth: int):
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values()] if stack else []
    if node.op == "call_module":
        paths = paths or [node.target]
    if not paths:
        return _FOLLOW
    path = paths[-1].split(".")
    return ("module", ".".join(path[:depth]))


def _connect(gm: fx.GraphModule, units: list, unit_of: dict) -> None:
    returned = set(next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes)
    for unit in units:
        members = set(unit.nodes)
        for node in unit.nodes:
            for src in node.all_input_nodes:
                if info(src).from_input and src not in members and src not in unit.inputs:
                    unit.inputs.append(src)
                elif info(src).param_only and src.op != "get_attr":
                    unit.params.extend(q for q in path_parameters(src) if q not in unit.params)
            used_outside = any(u not in members and _carries_feedback(u) for u in node.users)
            if (used_outside or node in returned) and node not in unit.outputs:
                unit.outputs.append(node)
            call = info(node).call
            for qualname in (call.params.values() if call else ()):
                if qualname not in unit.params:
                    unit.params.append(qualname)
