"""One unit's own share of a parameter gradient that several units contribute to.

A parameter theta used by several units (a module called twice, tied weights) gets, in the
"unit_error" graph, the sum of every use's local gradient (the fan-out sum of its parts)::

    g_theta(delta_1, ..., delta_U) = sum_u J_{F_u, theta}^T delta_u,

delta_u being the signal placed on unit u's outputs (the graph's ("cut", output) inputs), each
term through unit u's own error maps only (the cut mode stops every error at the unit's inputs).
A direct learner needs the terms one by one: in update-unlocked execution unit u is updated before
a later unit's delta exists, and unit u's graph must read only its own deltas and taps.

Every node of the graph is a *linear* function of the deltas, given the taps and weights: an error
map is J_G applied to its incoming error, a weight-gradient formula is linear in the error at the
op's output, and the fan-out sums add such values. So unit u's share is the same graph evaluated
with every other unit's delta set to zero::

    g_theta^(u) = g_theta(0, ..., delta_u, ..., 0),      sum_u g_theta^(u) = g_theta,

and :func:`own_share` builds it symbolically: a node that reads no other unit's delta is kept as
it is; a node that reads only other units' deltas is zero and disappears; a *mixed* node (a sum of
both kinds of term, or a parameter path such as ``w.t()`` shared by two units, which maps the
sum) is re-emitted on its arguments' shares. A zero argument drops out of ``a + b`` and ``a - b``;
a node whose every delta-dependent argument is zero is zero (linearity); any other op with a zero
argument would need a zero tensor of a shape only the other unit's delta knows, so it raises
:class:`InseparableShare` naming the node.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import FBCompileError
from .prune import GradientSubgraph

_ADD = (operator.add, torch.add)
_SUB = (operator.sub, torch.sub)


class InseparableShare(FBCompileError):
    """The gradient graph mixes two units' deltas in an op whose share cannot be emitted."""


class _Zero:
    """The symbolic value of a node that reads only other units' deltas."""


ZERO = _Zero()


def own_share(subgraph: GradientSubgraph, own: set) -> GradientSubgraph:
    """``subgraph`` restricted to the deltas of ``own`` (node names of the unit's outputs): every
    other ("cut", name) input set to zero and removed. A gradient that is zero for this unit is
    returned as None. Unchanged (the same object) when the subgraph reads no other unit's delta."""
    foreign = [i for i, (kind, key) in enumerate(subgraph.inputs) if kind == "cut" and key not in own]
    if not foreign:
        return subgraph
    old = subgraph.module.graph
    placeholders = [n for n in old.nodes if n.op == "placeholder"]
    cut = {node: ("foreign" if i in foreign else "own") for i, node in enumerate(placeholders)
           if subgraph.inputs[i][0] == "cut"}
    reads, env, graph = {}, {}, fx.Graph()
    for node in old.nodes:
        reads[node] = set().union({cut[node]} if node in cut else set(), *(reads[n] for n in node.all_input_nodes))
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: None if env[n] is ZERO else env[n]))
        elif "foreign" not in reads[node]:
            env[node] = graph.node_copy(node, env.__getitem__)
        elif "own" not in reads[node]:
            env[node] = ZERO
        else:
            env[node] = _mixed(graph, node, env)
    inputs = [source for source, node in zip(subgraph.inputs, placeholders) if node in env and env[node] is not ZERO]
    module = fx.GraphModule(subgraph.module, graph, class_name=type(subgraph.module).__name__)
    module.graph.eliminate_dead_code()
    kept = []
    for node, source in zip([n for n in module.graph.nodes if n.op == "placeholder"], inputs):
        if node.users:
            kept.append(source)
        else:
            module.graph.erase_node(node)
    module.recompile()
    return GradientSubgraph(module, tuple(kept), subgraph.params)


def _mixed(graph: fx.Graph, node: fx.Node, env: dict):
    """The share of a node reading both this unit's and other units' deltas."""
    zero = [n for n in node.all_input_nodes if env[n] is ZERO]
    if not zero:
        return graph.node_copy(node, env.__getitem__)
    if node.op == "call_function" and not node.kwargs and len(node.args) == 2 and node.target in _ADD + _SUB:
        left, right = (env[a] if isinstance(a, fx.Node) else a for a in node.args)
        if right is ZERO:
            return left
        if left is ZERO:
            return right if node.target in _ADD else graph.call_function(operator.neg, (right,))
    raise InseparableShare(f"{node.format_node()} combines the deltas of several units in an op whose "
                           "per-unit share cannot be formed (only sums and differences of the units' terms can)")
