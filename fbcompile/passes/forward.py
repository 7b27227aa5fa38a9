"""Build forward programs from the traced model.

Every forward program runs the model's own nodes (modules keep their live state: BatchNorm
statistics update in train mode, ``.train()`` / ``.eval()`` apply) with three rewrites:

- in-place spellings (``relu_``, ``+=``, ``nn.ReLU(inplace=True)``) run out of place, so no saved
  activation is ever overwritten;
- ops with a tapped forward (max-pool, dropout, LayerNorm) call it, and its extras (indices, mask,
  statistics) become available as taps;
- ATen spellings autograd cannot differentiate (``aten.copy``, torch.export's item assignment) call
  the op's ``apply``, so learners that differentiate the forward (Mono-Forward's local losses) can.

Variants:

- :func:`build_forward`: ``(model output, taps)``; with ``detach_units=True`` each unit's inputs
  are detached inside the unit, so the autograd graph of a unit output reaches only its own unit's
  parameters (one multi-root backward then applies every unit's local loss at once), and the
  graph-connected values of ``returned`` nodes come back as a third output.
- :func:`build_cut_forward`: every unit evaluated on its own inputs, given as arguments
  ``F_u(x_u)`` for all units at once (feedback training: reconstruction losses).
- :func:`build_resume_forward`: the model output as a function of one intermediate value
  (DRL and Gauss-Newton diagnostics); nodes that only fed that value are dropped.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..context import SHAPE
from ..errors import FBCompileError
from ..ops import lookup_aten
from ..trace import AttrRef, active_outputs, info


def _differentiable(node: fx.Node) -> bool:
    spelling = lookup_aten(node.target)
    return spelling is None or spelling.differentiable


class _Copier:
    """Copies the traced graph node by node into ``graph``; ``source(user, src)`` may substitute
    the value a user reads for ``src``."""

    def __init__(self, gm: fx.GraphModule, source=None):
        self.gm, self.graph = gm, fx.Graph()
        self.env, self.extras, self.attrs = {}, {}, {}
        self.source = source or (lambda user, src: self.env[src])

    def get_attr(self, qualname):
        if qualname not in self.attrs:
            self.attrs[qualname] = self.graph.get_attr(qualname)
        return self.attrs[qualname]

    def copy(self, node: fx.Node):
        call = info(node).call
        transform = lambda src: self.source(node, src)
        if call is not None and (call.inplace or call.spec.tapped is not None or not _differentiable(node)):
            args, kwargs = call.spec.split(_canonical_arguments(call, transform, self.get_attr))
            if call.spec.tapped is not None:
                result = self.graph.call_function(call.spec.tapped, args, kwargs, name=f"{node.name}_tapped")
                self.env[node] = self.graph.call_function(operator.getitem, (result, 0), name=node.name)
                for i, extra in enumerate(call.spec.extras):
                    self.extras[(node.name, extra)] = self.graph.call_function(
                        operator.getitem, (result, i + 1), name=f"{node.name}_{extra}")
            else:
                self.env[node] = self.graph.call_function(call.spec.apply, args, kwargs, name=node.name)
        else:
            self.env[node] = self.graph.node_copy(node, transform)
        return self.env[node]

    def finish(self, outputs, class_suffix: str, prune: bool = True) -> fx.GraphModule:
        """The GraphModule returning ``outputs``; with ``prune``, nodes that do not contribute to
        them are dropped (a second code generation, so the main forward skips it)."""
        self.graph.output(outputs)
        module = fx.GraphModule(self.gm, self.graph, class_name=f"{type(self.gm).__name__}{class_suffix}")
        if prune:
            module.graph.eliminate_dead_code()
            module.graph.lint()
            module.recompile()
        return module

    def model_output(self):
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        return fx.node.map_arg(out_node.args[0], lambda n: self.env[n])


def detach_values(value):
    """``value`` detached: a tensor, or each tensor of a tuple/list (a split's pieces read whole by
    another unit's ``cat``)."""
    if isinstance(value, (tuple, list)):
        return type(value)(v.detach() if isinstance(v, torch.Tensor) else v for v in value)
    return value.detach()


def build_forward(gm: fx.GraphModule, taps: list, partition=None, detach_units: bool = False,
                  returned: list | None = None) -> fx.GraphModule:
    """``taps`` are keys ``(node name, extra or None)``; ``returned`` lists forward nodes whose
    (graph-connected) values are returned as a third output, in order."""
    detached = {}

    def source(user, src):
        value = copier.env[src]
        unit = partition.unit_of.get(user) if detach_units else None
        if unit is None or not info(src).from_input or src.op == "placeholder" or partition.unit_of.get(src) is unit:
            return value
        key = (src, unit.index)
        if key not in detached:
            detached[key] = copier.graph.call_function(detach_values, (value,), name=f"{src.name}_in_u{unit.index}")
        return detached[key]

    copier = _Copier(gm, source)
    for node in gm.graph.nodes:
        if node.op != "output":
            copier.copy(node)
    values = {node.name: value for node, value in copier.env.items()}
    tap_values = tuple(_tap_value(copier, values, None, key) for key in taps)
    outputs = (copier.model_output(), tap_values)
    if returned is not None:
        outputs += (tuple(copier.env[n] for n in returned),)
    return copier.finish(outputs, "Forward", prune=False)


def build_cut_forward(gm: fx.GraphModule, partition) -> tuple[fx.GraphModule, list, list]:
    """``F_u(x_u)`` for every unit at once. Returns the module (arguments: the model inputs, then
    one value per key of ``inputs``), ``inputs`` = [(unit index, source node)] and
    ``outputs`` = [(unit index, output node)] in the order of its returned tuple."""
    cut_inputs, keys = {}, []

    def source(user, src):
        unit = partition.unit_of.get(user)
        if unit is None or not info(src).from_input or partition.unit_of.get(src) is unit:
            return copier.env[src]
        return cut_inputs[(unit.index, src)]

    copier = _Copier(gm, source)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            copier.copy(node)
    for unit in partition.units:
        for src in unit.inputs:
            keys.append((unit.index, src))
            cut_inputs[(unit.index, src)] = copier.graph.placeholder(f"x_u{unit.index}_{src.name}")
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "output"):
            copier.copy(node)
    outs = [(unit.index, o) for unit in partition.units for o in unit.outputs]
    return copier.finish(tuple(copier.env[o] for _, o in outs), "UnitForward"), keys, outs


def build_resume_forward(gm: fx.GraphModule, start: fx.Node) -> fx.GraphModule:
    """The model's active outputs as a function of the model inputs and a replacement value for
    ``start`` (arguments: model inputs, then the replacement)."""
    copier = _Copier(gm)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            copier.copy(node)
    replacement = copier.graph.placeholder(f"{start.name}_value")
    copier.env[start] = replacement
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node is start:
            copier.env[node] = replacement
        else:
            copier.copy(node)
    return copier.finish(tuple(copier.env[o] for o in active_outputs(gm)), "Resume")


def _canonical_arguments(call, transform, get_attr) -> dict:
    """Canonical arguments for ``apply`` / ``tapped``: graph values mapped, model attributes fetched."""

    def one(value):
        if isinstance(value, fx.Node):
            return transform(value)
        if isinstance(value, AttrRef):
            return get_attr(value.qualname)
        return value

    return {name: type(value)(one(v) for v in value) if isinstance(value, (list, tuple)) else one(value)
            for name, value in call.args.items()}


def build_unit_forwards(gm: fx.GraphModule, partition, taps: dict | None = None) -> list:
    """One GraphModule per unit, in unit order, for update-unlocked execution: unit ``u``'s module
    takes the values listed in ``stage.inputs`` (forward nodes produced outside the unit: other
    units' outputs, model inputs, shape values) and returns ``stage.outputs``: the unit's outputs,
    then any other value of the unit that another unit reads (only for its metadata, such as
    ``h.size(0)``, so it is no unit output; the reader still needs the tensor to ask).
    Parameter-free helper nodes outside every unit (sizes, shapes) are recomputed inside the unit
    that reads them. With ``taps`` (unit index -> tap keys ``(node name, extra or None)`` of values
    the unit's forward computes or reads) every module returns ``(outputs, tap values)`` instead,
    the keys listed in ``stage.taps``: what a compiled local backward of the unit needs."""
    effects = _side_effects_by_unit(gm, partition)
    plans = [_stage_plan(gm, unit, partition, effects.get(unit.index, ())) for unit in partition.units]
    read_elsewhere = {src for _, _, inputs in plans for src in inputs}
    stages = []
    for unit, order, inputs in plans:
        returned = list(unit.outputs) + [n for n in unit.nodes if n in read_elsewhere and n not in unit.outputs]
        copier = _Copier(gm)
        for src in inputs:
            copier.env[src] = copier.graph.placeholder(src.name)
        for node in gm.graph.nodes:
            if node.op == "get_attr" and any(node in m.all_input_nodes for m in order):
                copier.copy(node)
        for node in order:
            copier.copy(node)
        outputs = tuple(copier.env[o] for o in returned)
        keys = None if taps is None else list(taps.get(unit.index, ()))
        if keys is not None:
            by_name = {node.name: value for node, value in copier.env.items()}
            outputs = (outputs, tuple(_tap_value(copier, by_name, unit, key) for key in keys))
        module = copier.finish(outputs, f"Unit{unit.index}")
        stages.append(UnitStage(unit, module, inputs, returned, keys))
    return stages


def _side_effects_by_unit(gm: fx.GraphModule, partition) -> dict:
    """{unit index: side-effectful nodes in no unit (a buffer's counter, :mod:`fbcompile.buffer_writes`)}:
    each runs in the unit whose first node follows it in graph order (the last unit after them all),
    so the unit forwards together make every state change the whole forward makes, once."""
    effects, pending = {}, []
    for node in gm.graph.nodes:
        unit = partition.unit_of.get(node)
        if unit is None and node.op == "call_function" and node.is_impure():
            pending.append(node)
        elif unit is not None and pending:
            effects.setdefault(unit.index, []).extend(pending)
            pending = []
    if pending:
        effects.setdefault(partition.units[-1].index, []).extend(pending)
    return effects


def _stage_plan(gm: fx.GraphModule, unit, partition, effects=()) -> tuple:
    """(unit, the nodes its forward runs in graph order, the values it reads from outside)."""
    members = _with_helpers(list(unit.nodes) + list(effects), partition)
    order = [n for n in gm.graph.nodes if n in members]
    inputs = []
    for node in order:
        for src in node.all_input_nodes:
            if src not in members and src.op != "get_attr" and src not in inputs:
                inputs.append(src)
    return unit, order, inputs


def _tap_value(copier: _Copier, by_name: dict, unit, key: tuple) -> fx.Node:
    """The forward program's node for tap ``key``: a value, an extra of a tapped forward, or a shape
    tap ``(node name, SHAPE)`` (the value's ``.shape``, so the value itself is not kept)."""
    value = copier.extras.get(key) if key[1] not in (None, SHAPE) else by_name.get(key[0])
    if value is None:
        where = "the forward" if unit is None else f"unit {unit.index}'s forward"
        raise FBCompileError(f"{where} neither computes nor reads the value {key} its feedback needs")
    if key[1] == SHAPE:
        if key not in copier.extras:
            copier.extras[key] = copier.graph.call_function(getattr, (value, "shape"), name=f"{key[0]}_shape")
        return copier.extras[key]
    return value


class UnitStage:
    """A unit's own forward: ``module(*values of inputs) -> tuple of values of outputs``, or
    ``(outputs, values of the taps)`` when ``taps`` lists tap keys."""

    def __init__(self, unit, module, inputs, outputs, taps=None):
        self.unit, self.module, self.inputs, self.outputs, self.taps = unit, module, inputs, outputs, taps

    def __repr__(self):
        return f"UnitStage({self.unit.index}: {[n.name for n in self.inputs]} -> {[n.name for n in self.outputs]})"


def _with_helpers(nodes: list, partition) -> set:
    """``nodes`` plus the helper nodes in no unit they depend on: parameter-free values (sizes,
    shapes) and parameter paths (an expanded class token), recomputed inside the unit."""
    members, stack = set(nodes), list(nodes)
    while stack:
        node = stack.pop()
        for src in node.all_input_nodes:
            record = info(src)
            helper = record.role == "value" or (record.role in ("op", "select") and record.param_only)
            if src not in members and src not in partition.unit_of and helper:
                members.add(src)
                stack.append(src)
    return members
