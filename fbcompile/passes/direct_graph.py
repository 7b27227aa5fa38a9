"""One generated graph for every local update of a direct learner's step, after its forward.

The compiled direct paths (:mod:`fbcompile.runtime.direct`) give the output units e and every
hidden unit its delta from the output-side signal and its projection B_u
(:func:`~fbcompile.passes.direct.project_dense` for a dense signal s, ``reshape(s B_u)``;
:func:`~fbcompile.passes.direct.project_labels` for class labels, a row selection of factor * B_u),
and pull each back through the unit's own pruned "unit_error" graph
(:meth:`FeedbackProgram.unit_gradient_graph`). Per unit that is a handful of small ops; driven from
Python each also pays argument gathering and a module call. This pass inlines all of it into one
GraphModule, in the same order (output units, then hidden units from the last to the first), so a
step makes every update with one call. fx frees each value after its last use, so a delta lives only
while its own unit is processed, as before. The projections B_u are attributes of the generated
modules (the learner's own parameter objects, so in-place changes such as ``load_state_dict`` are
seen).

Inputs of the module, in the order of ``DirectGradientGraph.inputs``: ("signal", None) the dense
(N, C) signal, or ("labels", None) and ("factor", None); ("error", i) dL/d(model output i);
("tap", key) a forward tap.

Update-unlocked execution (:func:`build_update_stages`) fuses the other way: each hidden unit's
stage runs its forward and then its update in one module, ``(unit inputs, signal) -> (unit
outputs, gradients)``, so its activations are never handed back to Python at all.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from .direct import DirectPlan, project_dense, project_labels

SIGNAL_INPUTS = {False: ("signal",), True: ("labels", "factor")}     # labels? -> placeholder names


@dataclass(frozen=True)
class DirectGradientGraph:
    """``module(*args)`` returns one gradient per entry of ``params`` (a name repeats when two units
    share a parameter; the learner sums them); ``inputs`` says what each argument is."""
    module: fx.GraphModule
    inputs: tuple
    params: tuple


def build_direct_gradients(program, plan: DirectPlan, projections: list, *, hidden: bool,
                           labels: bool) -> DirectGradientGraph:
    """The fused update graph of ``plan``: the output units, and the hidden units when ``hidden``
    (``projections[p]`` is B of projection p; with a label signal when ``labels``, else dense)."""
    hidden_units = list(reversed(plan.hidden_units)) if hidden else []
    units = list(plan.output_units) + hidden_units
    subgraphs = {unit: program.unit_gradient_graph(unit) for unit in units}
    graph, inputs = fx.Graph(), []

    def placeholder(source, name):
        inputs.append(source)
        return graph.placeholder(name)

    signal = tuple(placeholder((name, None), name) for name in SIGNAL_INPUTS[labels]) if hidden_units else ()
    errors = {node.name: placeholder(("error", i), f"error_{i}") for i, node in enumerate(program.outputs)}
    taps = {}
    for subgraph in subgraphs.values():
        for kind, key in subgraph.inputs:
            if kind == "tap" and key not in taps:
                taps[key] = placeholder(("tap", key), "tap_" + "_".join(str(k) for k in key if k is not None))

    grads, names, bound = [], [], {}
    for unit in units:
        deltas = errors if unit in plan.output_units else _emit_deltas(graph, plan, unit, signal, projections,
                                                                        labels, bound)
        unit_grads, unit_names = _inline(graph, subgraphs[unit], deltas, taps, plan.params[unit])
        grads.extend(unit_grads)
        names.extend(unit_names)
    graph.output(tuple(grads))
    root = {**_attributes(graph, program.feedback_graph("unit_error").module), **bound}
    return DirectGradientGraph(_pruned_module(root, graph, "DirectGradients"), tuple(inputs), tuple(names))


@dataclass(frozen=True)
class UpdateStage:
    """A unit's forward fused with its local update, for update-unlocked execution:
    ``module(*unit inputs, *signal) -> (unit outputs, gradients of params)``, the signal being the
    values :data:`SIGNAL_INPUTS` names; ``inputs``/``outputs`` are the unit stage's (forward
    nodes), as :meth:`FeedbackProgram.run_units` expects."""
    unit: object
    module: fx.GraphModule
    inputs: list
    outputs: list
    params: tuple


def build_update_stages(program, plan: DirectPlan, projections: list, *, labels: bool) -> list:
    """Per unit in order: hidden units of ``plan`` as :class:`UpdateStage`, every other unit its
    tapped stage (``program.unit_forwards(tapped=True)``) unchanged."""
    stages = []
    for stage in program.unit_forwards(tapped=True):
        if stage.unit.index not in plan.hidden_units:
            stages.append(stage)
            continue
        graph, bound = fx.Graph(), {}
        value_map = {node: graph.placeholder(node.name) for node in stage.module.graph.nodes if node.op == "placeholder"}
        signal = tuple(graph.placeholder(name) for name in SIGNAL_INPUTS[labels])
        outputs, tap_values = graph.graph_copy(stage.module.graph, value_map)
        taps = dict(zip(stage.taps, tap_values))
        subgraph = program.unit_gradient_graph(stage.unit.index)
        deltas = _emit_deltas(graph, plan, stage.unit.index, signal, projections, labels, bound)
        grads, names = _inline(graph, subgraph, deltas, taps, plan.params[stage.unit.index])
        graph.output((outputs, tuple(grads)))
        root = {**_attributes(graph, stage.module, program.feedback_graph("unit_error").module), **bound}
        module = _pruned_module(root, graph, f"UnitUpdate{stage.unit.index}")
        stages.append(UpdateStage(stage.unit, module, stage.inputs, stage.outputs, names))
    return stages


def _emit_deltas(graph: fx.Graph, plan: DirectPlan, unit: int, signal: tuple, projections: list, labels: bool,
                 bound: dict) -> dict:
    """delta nodes of ``unit``'s projections; each B_u becomes an attribute, recorded in ``bound``."""
    project = project_labels if labels else project_dense
    deltas = {}
    for p in plan.of_unit(unit):
        name = f"projection_{p.index}"
        bound[name] = projections[p.index]
        deltas[p.node] = graph.call_function(project, (*signal, graph.get_attr(name)), name=f"delta_{p.index}")
    return deltas


def _inline(graph: fx.Graph, subgraph, deltas: dict, taps: dict, trainable) -> tuple:
    """Copy ``subgraph``'s nodes into ``graph``, its cut inputs reading ``deltas`` and its taps
    ``taps``; returns (gradient nodes, parameter names) of the ``trainable`` parameters only."""
    placeholders = [n for n in subgraph.module.graph.nodes if n.op == "placeholder"]
    value_map = {node: deltas[key] if kind == "cut" else taps[key] for node, (kind, key) in zip(placeholders, subgraph.inputs)}
    kept = [(g, name) for g, name in zip(graph.graph_copy(subgraph.module.graph, value_map), subgraph.params)
            if name in trainable]
    return [g for g, _ in kept], tuple(name for _, name in kept)


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
