"""Pruned copies of a feedback graph: only the outputs a caller wants, and the work they need.

A feedback graph returns ``(boundary values, parameter gradients)`` for the whole model. Callers
often want less: DTP's targets never need the feedback into the model input (for an MLP that is a
batch x 256 x 784 matmul), and a direct learner visiting one unit at a time wants that unit's
parameter gradients only. Dropping outputs and then dead code removes the work; dropping the
inputs nothing reads any more also removes the cost of gathering them on every call.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from torch import fx

from ..errors import FBCompileError
from .feedback import FeedbackGraph


def prune_outputs(graph: FeedbackGraph, returns: str, parameter_free: frozenset) -> fx.GraphModule:
    """A copy of ``graph.module`` whose boundary outputs are None where not wanted (``returns``
    "units": the positions in ``parameter_free``; "params": every boundary value), with only the work
    the rest needs; it takes the same arguments as ``graph.module``."""
    if returns not in ("units", "params"):
        raise FBCompileError(f"returns={returns!r}; use 'all', 'units' or 'params'")
    values, grads = _output_node(graph.module.graph).args[0]
    kept = [None if (returns == "params" or i in parameter_free) else v for i, v in enumerate(values)]
    wanted = [n for n in (*kept, *grads) if isinstance(n, fx.Node)]
    new, env = copy_needed(graph.module.graph, wanted, every_placeholder=True)
    new.output(fx.node.map_arg((tuple(kept), tuple(grads)), env.__getitem__))
    return fx.GraphModule(graph.module, new)


@dataclass(frozen=True)
class GradientSubgraph:
    """The part of a feedback graph computing the gradients of ``params`` only.

    ``module(*args)`` returns one gradient per name in ``params`` (None where the graph has none);
    ``args`` are the graph inputs it still reads, in the order of ``inputs`` (entries of
    :attr:`FeedbackGraph.inputs`, e.g. ("cut", node name) or ("tap", key))."""
    module: fx.GraphModule
    inputs: tuple
    params: tuple


def gradient_subgraph(graph: FeedbackGraph, params) -> GradientSubgraph:
    """Prune ``graph`` to the gradients of ``params`` and drop the inputs that are no longer read.

    Only what those gradients need is copied (:func:`copy_needed`): a direct learner builds one
    subgraph per unit, and copying the whole graph each time made that quadratic in the model's
    size (timm's Sequencer, its LSTMs unrolled: minutes)."""
    wanted = tuple(params)
    unknown = [name for name in wanted if name not in graph.params]
    if unknown:
        raise FBCompileError(f"the {graph.mode!r} feedback graph returns no gradient for {unknown}")
    source = graph.module.graph
    by_name = dict(zip(graph.params, _output_node(source).args[0][1]))
    results = tuple(by_name[name] for name in wanted)
    new, env = copy_needed(source, [r for r in results if isinstance(r, fx.Node)])
    new.output(tuple(env[r] if isinstance(r, fx.Node) else r for r in results))
    placeholders = source.find_nodes(op="placeholder")            # in graph order, as graph.inputs
    inputs = tuple(source_input for node, source_input in zip(placeholders, graph.inputs) if node in env)
    module = fx.GraphModule(graph.module, new)
    return GradientSubgraph(module, inputs, wanted)


def copy_needed(graph: fx.Graph, roots: list, every_placeholder: bool = False) -> tuple[fx.Graph, dict]:
    """A new graph of the nodes ``roots`` depend on, with the impure ones (in-place writes) and what
    they depend on, as dead-code elimination would keep them, in their order; no output node.
    Returns it and the map from old nodes to new (placeholders nothing needs are left out, unless
    ``every_placeholder``: the copy then takes the same arguments as ``graph``)."""
    needed, stack = set(), list(roots) + _impure_nodes(graph)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    new, env = fx.Graph(), {}
    for node in graph.nodes:
        if node in needed or (every_placeholder and node.op == "placeholder"):
            env[node] = new.node_copy(node, env.__getitem__)
    return new, env


_IMPURE = weakref.WeakKeyDictionary()     # fx.Graph -> its impure nodes (a feedback graph never changes once emitted)


def _impure_nodes(graph: fx.Graph) -> list:
    if graph not in _IMPURE:
        _IMPURE[graph] = [n for n in graph.nodes if n.op not in ("placeholder", "output") and n.is_impure()]
    return _IMPURE[graph]


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in graph.nodes if n.op == "output")
