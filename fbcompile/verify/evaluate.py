"""The functions verification differentiates: for a node or a unit, the forward map F of its active
inputs and the feedback map G (the rules' error maps), both at the forward operating point.

:func:`forward_values` runs the traced model eagerly and records every value (and every extra a
tapped op saves), keyed like rules' saved values (:func:`fbcompile.context.tap_name`). A
:class:`Problem` then packages F and G for one node or unit, over the whole batch or over one sample
(``sample=b``) when the computation is batch-local: the Jacobian over a batch of independent
samples is block diagonal, so its Frobenius norms add up over per-sample blocks.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx

from ..context import EagerContext
from ..trace import info, preserved_state


def forward_values(program, inputs: tuple) -> dict:
    """Every forward value by key ``(node name, None)`` and every extra by ``(node name, extra)``."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            call = info(node).call
            if call is not None and (call.inplace or call.spec.tapped is not None):
                args = EagerContext(node, values, program.model).forward_args()
                if call.spec.tapped is not None:
                    result = call.spec.run(call.spec.tapped, args)
                    value = result[0]
                    for extra, item in zip(call.spec.extras, result[1:]):
                        values[(node.name, extra)] = item
                else:
                    value = call.spec.run(call.spec.apply, args)
            else:
                value = super().run_node(node)
            values[(node.name, None)] = value
            return value

    with preserved_state(program.model), torch.no_grad():
        Recorder(program.traced).run(*inputs)
    return values


class SampleValues(Mapping):
    """``values`` with the batch-carrying entries cut to sample ``b`` (kept as a batch of one)."""

    def __init__(self, values: dict, batch_keys: set, b: int):
        self.values, self.batch_keys, self.b = values, batch_keys, b

    def __getitem__(self, key):
        value = self.values[key]
        if key not in self.batch_keys:
            return value
        if isinstance(value, (tuple, list)):       # split / chunk outputs: cut every piece
            return type(value)(v[self.b:self.b + 1] if isinstance(v, torch.Tensor) else v for v in value)
        return value[self.b:self.b + 1] if isinstance(value, torch.Tensor) else value

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


@dataclass
class Problem:
    """F: active inputs -> outputs and G: output feedback -> input feedback, flattened."""
    label: str
    inputs: list            # input tensors (the operating point)
    output_shapes: list
    forward: object         # f(*inputs) -> tuple of outputs
    feedback: object        # g(*output_feedback) -> tuple of input feedback (zeros where none)

    @property
    def n_in(self):
        return sum(x.numel() for x in self.inputs)

    @property
    def n_out(self):
        return sum(math.prod(s) for s in self.output_shapes)


def _replay(call, node_name, values, args):
    spec = call.spec
    if spec.replay is not None:
        extras = {e: values[(node_name, e)] for e in spec.extras}
        positional, keywords = spec.split(args)
        return spec.replay(extras, *positional, **keywords)
    return spec.run(spec.apply, args)


def _with_inputs(args: dict, active: list, xs) -> dict:
    args = dict(args)
    for (arg, index, _), x in zip(active, xs):
        if index is None:
            args[arg] = x
        else:
            items = list(args[arg])
            items[index] = x
            args[arg] = type(args[arg])(items)
    return args


def _feedback_list(call, feedback: dict, like: list) -> tuple:
    out = []
    for (arg, index, _), x in zip(call.active, like):
        value = feedback.get(arg)
        if value is not None and index is not None:
            value = value[index]
        out.append(torch.zeros_like(x) if value is None else value)
    return tuple(out)


def node_problem(program, node: fx.Node, values: dict, sample: int | None = None) -> Problem:
    call, rule = info(node).call, program.rules[node]
    if sample is not None:
        keys = {(n.name, None) for _, _, n in call.active} | {(node.name, None)}
        keys |= {(node.name, e) for e in call.spec.extras}
        values = SampleValues(values, keys, sample)
    ctx = EagerContext(node, values, program.model)
    args = ctx.forward_args()
    xs = [values[(src.name, None)] for _, _, src in call.active]
    is_tuple = info(node).is_tuple
    output = values[(node.name, None)]

    # integer pieces of a tuple output (max(dim)'s indices) carry no derivative: F and G skip them
    pieces = list(output) if is_tuple else [output]
    keep = [o.is_floating_point() or o.is_complex() for o in pieces]

    def forward(*inputs):
        result = _replay(call, node.name, values, _with_inputs(args, call.active, inputs))
        return tuple(r for r, k in zip(result, keep) if k) if is_tuple else (result,)

    def feedback(*gs):
        given = iter(gs)
        full = [next(given) if k else None for k in keep]
        return _feedback_list(call, rule.error(ctx, full if is_tuple else full[0]), xs)

    shapes = [tuple(o.shape) for o, k in zip(pieces, keep) if k]
    return Problem(node.name, xs, shapes, forward, feedback)


def unit_problem(program, unit, values: dict, sample: int | None = None) -> Problem:
    """F and G of a whole unit: from its inputs to its outputs, through every node of the unit."""
    members = set(unit.nodes)
    if sample is not None:
        keys = {(n.name, None) for n in list(unit.nodes) + list(unit.inputs)}
        keys |= {(n.name, e) for n in unit.nodes if info(n).role == "op" for e in info(n).call.spec.extras}
        values = SampleValues(values, keys, sample)
    xs = [values[(n.name, None)] for n in unit.inputs]

    def forward(*inputs):
        env = dict(zip(unit.inputs, inputs))
        for node in unit.nodes:
            record = info(node)
            if record.role == "select":
                env[node] = env[node.args[0]][record.select_index]
                continue
            ctx = EagerContext(node, values, program.model)
            active_values = [env.get(src, values[(src.name, None)]) for _, _, src in record.call.active]
            env[node] = _replay(record.call, node.name, values,
                                _with_inputs(ctx.forward_args(), record.call.active, active_values))
        return tuple(env[o] for o in unit.outputs)

    def feedback(*gs):
        contribs = {o: [g] for o, g in zip(unit.outputs, gs)}
        tuple_parts = {}
        for node in reversed(unit.nodes):
            record = info(node)
            if record.is_tuple:
                parts = tuple_parts.get(node, {})
                incoming = [_total(parts.get(i, [])) for i in range(len(record.shape))]
                if all(p is None for p in incoming):
                    continue
            else:
                incoming = _total(contribs.get(node, []))
                if incoming is None:
                    continue
            if record.role == "select":
                tuple_parts.setdefault(node.args[0], {}).setdefault(record.select_index, []).append(incoming)
                continue
            ctx = EagerContext(node, values, program.model)
            like = [values[(src.name, None)] for _, _, src in record.call.active]
            fb = _feedback_list(record.call, program.rules[node].error(ctx, incoming), like)
            for (_, _, src), value in zip(record.call.active, fb):
                if src in members or src in unit.inputs:
                    contribs.setdefault(src, []).append(value)
        return tuple(_total(contribs.get(i, [])) if contribs.get(i) else torch.zeros_like(x)
                     for i, x in zip(unit.inputs, xs))

    shapes = [tuple(values[(o.name, None)].shape) for o in unit.outputs]
    return Problem(f"unit {unit.index} ({unit.name})", xs, shapes, forward, feedback)


def _total(parts: list):
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def batch_local(program, node: fx.Node, batch: int) -> bool:
    """Whether ``node`` maps each sample independently, so its Jacobian is block diagonal over the
    batch: every active input and every output (each piece of a tuple) has the batch as its leading
    dim, no other graph tensor it reads does (a per-sample constant could not be cut), and the op
    does not declare that this call mixes samples (``batch_local(ctx)`` of :func:`declare_op`:
    reductions, concatenation or transposition over dim 0, BatchNorm with batch statistics).
    Anything else is measured over the whole batch, which is always correct."""
    record = info(node)
    shapes = [info(src).shape for _, _, src in record.call.active]
    shapes += list(record.shape) if record.is_tuple else [record.shape]
    if any(not s or s[0] != batch for s in shapes):
        return False
    if batch == 1:
        return True
    active = {id(src) for _, _, src in record.call.active}
    for value in record.call.args.values():
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(item, fx.Node) and id(item) not in active and record.shape and not record.is_tuple:
                shape = info(item).shape
                if shape and not isinstance(shape[0], tuple) and len(shape) == len(record.shape) and shape[0] == batch:
                    return False
    local = record.call.spec.batch_local
    return True if local is None else bool(local(EagerContext(node, {}, program.model)))
