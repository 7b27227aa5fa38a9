"""One generated graph for every local update of a direct learner's step, after its forward.

The compiled direct paths (:mod:`fbcompile.runtime.direct`) give the output units e and every
hidden unit its delta from the output-side signal and its projection B_u
(:func:`~fbcompile.passes.direct.project_dense` for a dense signal s, ``reshape(s B_u)``;
:func:`~fbcompile.passes.direct.project_labels` for class labels, a row selection of factor * B_u),
and pull each back through the unit's own pruned "unit_error" graph (:meth:`UnitGradients.graph`).
Per unit that is a handful of small ops; driven from Python each also pays argument gathering and a
module call. This pass inlines all of it into one
GraphModule, in the same order (output units, then hidden units from the last to the first), so a
step makes every update with one call. fx frees each value after its last use, so a delta lives only
while its own unit is processed, as before. The projections B_u are attributes of the generated
modules (the learner's own parameter objects, so in-place changes such as ``load_state_dict`` are
seen).

Inputs of the module, in the order of ``DirectGradientGraph.inputs``: ("signal", None) the dense
(N, C) signal, or ("labels", None) and ("factor", None); ("error", i) dL/d(model output i);
("tap", key) a forward tap.

Update-unlocked execution (:func:`build_unlocked_step`) fuses the other way: the units' forwards in
order, each hidden unit's update right after its own forward, all in one module, so activations are
never handed back to Python at all.

Every function here is a function of immutable inputs: the traced graph, its units, the emitted
"unit_error" feedback graph (gathered once into :class:`UnitGradients` by :func:`unit_gradients`),
the direct plan and the projections. None reads the compiled program or the runtime; the program
only caches :func:`unit_gradients` (``FeedbackProgram.unit_gradients()``) for the learners.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import fx, nn
from torch.fx.node import has_side_effect

from ..errors import FBCompileError
from ..trace import active_outputs
from .direct import DirectPlan, project_dense, project_labels
from .feedback import FeedbackGraph
from .forward import build_unit_forwards
from .prune import GradientSubgraph, gradient_subgraph
from .unit_share import InseparableShare, own_share

SIGNAL_INPUTS = {False: ("signal",), True: ("labels", "factor")}     # labels? -> placeholder names


@dataclass(frozen=True, eq=False)
class UnitGradients:
    """Each unit's own backward as a graph, and each unit's forward saving what that backward reads.

    ``pruned[u]``: the "unit_error" graph pruned to unit u's parameter gradients, for every unit
    (read them through :meth:`graph`, which checks them); ``stages``: the units' forwards in unit
    order (:class:`~fbcompile.passes.forward.UnitStage`), each returning ``(outputs, taps)`` with
    ``stage.taps`` the tap keys its unit's gradient graph reads; ``inputs`` / ``outputs``: the
    model's input placeholders and output nodes; ``traced`` and ``feedback`` (the "unit_error"
    module): where the attributes the graphs read live; ``slot_params``: slot key -> qualified name
    of the forward weight a rule's ``ctx.weight`` stands for (a unit's own gradient is the true
    local gradient, so inside a unit every feedback weight is the forward weight). A parameter
    used by several units gets in ``pruned[u]`` unit u's share of its gradient only
    (:func:`~fbcompile.passes.unit_share.own_share`); ``refused`` maps a unit whose share cannot
    be separated to the reason (its graph is then refused when asked for)."""
    inputs: tuple
    outputs: tuple
    pruned: dict
    stages: tuple
    traced: fx.GraphModule
    feedback: fx.GraphModule
    slot_params: dict
    refused: dict = field(default_factory=dict)

    def graph(self, unit: int) -> GradientSubgraph:
        """Unit ``unit``'s gradient graph: given delta_u at the unit's outputs, dL_u/dtheta =
        J_{F_u,theta}^T delta_u through the unit's own error maps. It may read only that unit's
        deltas ("cut" inputs), taps and weights ("slot", bound to the forward weight); anything
        else cannot be bound into a fused update graph, so such a unit is an
        :class:`FBCompileError` when asked for (a frozen unit nobody asks for is no error)."""
        if unit in self.refused:
            raise FBCompileError(self.refused[unit])
        subgraph = self.pruned[unit]
        other = [source for source in subgraph.inputs if source[0] not in ("cut", "tap", "slot")]
        if other:
            raise FBCompileError(f"unit {unit}'s gradient graph reads {other}; unit gradients take only "
                                 "unit-output deltas and taps")
        return subgraph


def unit_gradients(traced: fx.GraphModule, partition, unit_error: FeedbackGraph) -> UnitGradients:
    """:class:`UnitGradients` of ``traced`` grouped into ``partition``, from its emitted "unit_error"
    graph (a unit without parameters gets an empty gradient graph)."""
    pruned, refused = {}, {}
    for unit in partition.units:
        try:
            pruned[unit.index] = _unit_subgraph(unit_error, unit)
        except InseparableShare as exc:
            pruned[unit.index] = _empty_subgraph(unit)
            refused[unit.index] = (f"unit {unit.index} ({unit.name}) shares parameters with other units and its "
                                   f"share of their gradients cannot be separated in the compiled graph: {exc}")
    taps = {unit.index: [key for kind, key in pruned[unit.index].inputs if kind == "tap"]
            for unit in partition.units if unit.params}
    stages = build_unit_forwards(traced, partition, taps)
    inputs = tuple(n for n in traced.graph.nodes if n.op == "placeholder")
    return UnitGradients(inputs, tuple(active_outputs(traced)), pruned, tuple(stages), traced, unit_error.module,
                         dict(unit_error.slot_params), refused)


def _unit_subgraph(unit_error: FeedbackGraph, unit) -> GradientSubgraph:
    """The "unit_error" graph pruned to ``unit``'s parameters and restricted to its own deltas: a
    parameter other units use too gets this unit's term of its gradient only."""
    wanted = [q for q in unit.params if q in unit_error.params]
    if not wanted:
        return _empty_subgraph(unit)
    return own_share(gradient_subgraph(unit_error, wanted), {node.name for node in unit.outputs})


def _empty_subgraph(unit) -> GradientSubgraph:
    graph = fx.Graph()
    graph.output(())
    return GradientSubgraph(fx.GraphModule(nn.Module(), graph, class_name=f"Unit{unit.index}Gradients"), (), ())


@dataclass(frozen=True)
class DirectGradientGraph:
    """``module(*args)`` returns one gradient per entry of ``params`` (a name repeats when two units
    share a parameter, each entry that unit's share; the learner sums them; None where a unit's
    share is zero); ``inputs`` says what each argument is."""
    module: fx.GraphModule
    inputs: tuple
    params: tuple


def build_direct_gradients(gradients: UnitGradients, plan: DirectPlan, projections: list, *, hidden: bool,
                           labels: bool) -> DirectGradientGraph:
    """The fused update graph of ``plan``: the output units, and the hidden units when ``hidden``
    (``projections[p]`` is B of projection p; with a label signal when ``labels``, else dense)."""
    hidden_units = list(reversed(plan.hidden_units)) if hidden else []
    units = list(plan.output_units) + hidden_units
    subgraphs = {unit: gradients.graph(unit) for unit in units}
    graph, inputs = fx.Graph(), []

    def placeholder(source, name):
        inputs.append(source)
        return graph.placeholder(name)

    signal = tuple(placeholder((name, None), name) for name in SIGNAL_INPUTS[labels]) if hidden_units else ()
    errors = {node.name: placeholder(("error", i), f"error_{i}") for i, node in enumerate(gradients.outputs)}
    taps = {}
    for subgraph in subgraphs.values():
        for kind, key in subgraph.inputs:
            if kind == "tap" and key not in taps:
                taps[key] = placeholder(("tap", key), _identifier("tap", *key))

    grads, names, bound = [], [], {}
    for unit in units:
        deltas = errors if unit in plan.output_units else _emit_deltas(graph, plan, unit, signal, projections,
                                                                        labels, bound)
        unit_grads, unit_names = _inline(graph, subgraphs[unit], deltas, taps, plan.params[unit],
                                         gradients.slot_params)
        grads.extend(unit_grads)
        names.extend(unit_names)
    graph.output(tuple(grads))
    root = {**_attributes(graph, gradients.feedback, gradients.traced), **bound}
    return DirectGradientGraph(_pruned_module(root, graph, "DirectGradients"), tuple(inputs), tuple(names))


@dataclass(frozen=True)
class UnlockedStep:
    """The update-unlocked step of a direct learner up to the output error, as one module:
    ``module(*model inputs, *signal, unit_done) -> (model outputs, output-unit taps)``, the signal
    being the values :data:`SIGNAL_INPUTS` names (none without hidden updates). Right after each
    hidden unit's update the module calls ``unit_done(index, names, grads)`` (unit index, its
    trained parameters' names, their gradients, see :func:`hand_over`), so the caller sees every
    update while the next unit runs and can release it at once; ``taps`` keys the second output
    (what the output units' update reads once e is known)."""
    module: fx.GraphModule
    taps: tuple


@has_side_effect
def hand_over(unit_done, index: int, names: tuple, *grads) -> None:
    """The generated step's call after hidden unit ``index``'s update: ``unit_done(index, names,
    grads)``. Marked side-effectful so dead-code elimination keeps it although nothing reads its result."""
    unit_done(index, names, grads)


def build_unlocked_step(gradients: UnitGradients, plan: DirectPlan, projections: list, order: list, *,
                        hidden: bool, labels: bool) -> UnlockedStep:
    """The units' forwards (``gradients.stages``) in ``order`` (unit indices, each
    unit after the units whose outputs it reads), each hidden unit's
    forward followed at once by its update when ``hidden``: its deltas from the signal and B_u
    (``projections[p]``) pulled back through its pruned gradient graph and handed to ``unit_done``.
    fx frees every value after its last use, so a unit's activations die as soon as its update and
    the next unit's forward have read them, and its gradients as soon as ``unit_done`` returns
    unless the caller keeps them: live memory does not grow with depth, as with one module per unit,
    minus the Python between units."""
    graph, bound = fx.Graph(), {}
    env = {node: graph.placeholder(node.name) for node in gradients.inputs}
    signal = tuple(graph.placeholder(name) for name in SIGNAL_INPUTS[labels]) if hidden else ()
    unit_done = graph.placeholder("unit_done")
    taps = {}
    stages = gradients.stages
    for stage in (stages[index] for index in order):
        index = stage.unit.index
        placeholders = [n for n in stage.module.graph.nodes if n.op == "placeholder"]
        value_map = dict(zip(placeholders, (env[src] for src in stage.inputs)))
        outputs, tap_values = graph.graph_copy(stage.module.graph, value_map)
        env.update(zip(stage.outputs, outputs))
        unit_taps = dict(zip(stage.taps, tap_values))
        if index in plan.output_units:
            taps.update(unit_taps)
        elif hidden and index in plan.hidden_units:
            deltas = _emit_deltas(graph, plan, index, signal, projections, labels, bound)
            unit_grads, unit_names = _inline(graph, gradients.graph(index), deltas, unit_taps,
                                             plan.params[index], gradients.slot_params)
            if unit_grads:
                graph.call_function(hand_over, (unit_done, index, unit_names, *unit_grads))
    graph.output((tuple(env[node] for node in gradients.outputs), tuple(taps.values())))
    root = {**_attributes(graph, gradients.traced, gradients.feedback), **bound}
    module = _pruned_module(root, graph, "UnlockedStep")
    return UnlockedStep(module, tuple(taps))


def _emit_deltas(graph: fx.Graph, plan: DirectPlan, unit: int, signal: tuple, projections: list, labels: bool,
                 bound: dict) -> dict:
    """delta nodes of ``unit``'s projections; each B_u becomes an attribute, recorded in ``bound``."""
    project = project_labels if labels else project_dense
    deltas = {}
    for p in plan.of_unit(unit):
        name = f"projection_{p.index}"
        bound[name] = projections[p.index]
        deltas[p.node] = graph.call_function(project, (*signal, graph.get_attr(name), p.batch_axis),
                                             name=f"delta_{p.index}")
    return deltas


def _inline(graph: fx.Graph, subgraph, deltas: dict, taps: dict, trainable, slot_params: dict) -> tuple:
    """Copy ``subgraph``'s nodes into ``graph``, its cut inputs reading ``deltas``, its taps ``taps``
    and its slots the forward weights (``slot_params``); returns (gradient nodes, parameter names)
    of the ``trainable`` parameters only."""
    placeholders = [n for n in subgraph.module.graph.nodes if n.op == "placeholder"]
    sources = {"cut": deltas.__getitem__, "tap": taps.__getitem__,
               "slot": lambda key: graph.get_attr(slot_params[key])}
    value_map = {node: sources[kind](key) for node, (kind, key) in zip(placeholders, subgraph.inputs)}
    kept = [(g, name) for g, name in zip(graph.graph_copy(subgraph.module.graph, value_map), subgraph.params)
            if name in trainable]
    return [g for g, _ in kept], tuple(name for _, name in kept)


def _identifier(*parts) -> str:
    """A Python name for a placeholder from the parts of a key (a tap extra such as "#shape" is
    not one), e.g. ("tap", "_2", "#shape") -> "tap__2__shape"."""
    return re.sub(r"\W", "_", "_".join(str(part) for part in parts if part is not None))


def _pruned_module(root: dict, graph: fx.Graph, name: str) -> fx.GraphModule:
    """The GraphModule of ``graph`` without the nodes nothing returned needs (the inlined
    gradients of frozen parameters)."""
    module = fx.GraphModule(root, graph, class_name=name)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _attributes(graph: fx.Graph, *sources: nn.Module) -> dict:
    """{target: module or tensor} for the call_module / get_attr nodes of ``graph`` found in
    ``sources`` (the first that has it), for a dict root of :class:`fx.GraphModule`."""
    found = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr") or node.target in found:
            continue
        for source in sources:
            value = _lookup(source, node.target, node.op == "call_module")
            if value is not None:
                found[node.target] = value
                break
    return found


def _lookup(module: nn.Module, qualname: str, is_module: bool):
    *path, name = qualname.split(".")
    for part in path:
        module = module._modules.get(part) if module is not None else None
    if module is None:
        return None
    return module._modules.get(name) if is_module else getattr(module, name, None)
