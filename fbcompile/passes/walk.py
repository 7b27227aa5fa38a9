"""The reverse walk over a forward graph and its fan-out sums, shared by every place that sends
feedback backwards: the feedback-graph emitter (:mod:`fbcompile.passes.feedback`, on fx proxies)
and verification's per-unit feedback map (:mod:`fbcompile.verify.evaluate`, on tensors).

Feedback flows from a value's consumers to the value. A value h read by k consumers receives k
contributions c_1..c_k and its feedback is their sum, taken in arrival order,

    g_h = (...((c_1 + c_2) + c_3) + ...) + c_k,

so that the emitted graph and the eager evaluation add the same terms in the same order (the
same floating-point result). A tuple value (``split``, ``chunk``, a module's tuple output) collects
one such sum per element: contributions arrive per element, from the ``getitem`` selects of its
elements (``parts[i]``, or a slice ``parts[1:]`` whose feedback is one entry per selected element)
or from a consumer that reads the whole tuple (a list, None where that element gets nothing).

Visiting nodes in reverse topological order (:func:`walk_back`) every consumer of a value has sent
its contribution before the value itself is visited, so :meth:`FanIn.incoming` is final when first
asked and is computed once.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from torch import fx

from ..trace import info


def left_sum(parts: list, add: Callable):
    """c_1 + c_2 + ... + c_k, folded from the left with ``add``; None when ``parts`` is empty."""
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = add(total, part)
    return total


class FanIn:
    """The feedback contributions arriving at each forward value during a reverse walk.

    ``total(parts, name)`` adds a value's contributions (``name`` names the sum where the sum is a
    graph node: ``"<node>_sum"``, ``"<node>_<i>_sum"`` for tuple element i); ``announce(node)``, if
    given, runs before a value's sum is first formed (the emitter labels the nodes it creates).
    ``parts[(node, element or None)]`` lists the contributions in arrival order and
    ``origins[...]`` the consumer each came from (None: the model output or a caller's seed)."""

    def __init__(self, total: Callable, announce: Callable | None = None):
        self.total, self.announce = total, announce
        self.parts, self.origins = defaultdict(list), defaultdict(list)
        self._incoming = {}

    def add(self, node: fx.Node, value, index=None, origin: fx.Node | None = None) -> None:
        """Record feedback ``value`` for ``node`` (element ``index`` of a tuple value) sent by
        ``origin``. Feedback for a whole tuple value is a list, split per element (None entries
        carry nothing)."""
        if info(node).is_tuple and index is None:
            for i, item in enumerate(value):
                if item is not None:
                    self.add(node, item, index=i, origin=origin)
            return
        self.parts[(node, index)].append(value)
        self.origins[(node, index)].append(origin)

    def select(self, node: fx.Node, g) -> None:
        """Feedback ``g`` of a select ``node = tuple[index]`` goes to that element of the tuple; of a
        slice (``index`` a tuple of element positions), entry j of ``g`` to element ``index[j]``."""
        index = info(node).select_index
        if isinstance(index, tuple):
            for element, part in zip(index, g):
                if part is not None:
                    self.add(node.args[0], part, index=element, origin=node)
        else:
            self.add(node.args[0], g, index=index, origin=node)

    def incoming(self, node: fx.Node):
        """The summed feedback at ``node`` (a list with None where nothing arrived for tuple
        values, None when nothing arrived at all), formed once."""
        if node in self._incoming:
            return self._incoming[node]
        if self.announce is not None:
            self.announce(node)
        if info(node).is_tuple:
            sums = [self.total(self.parts.get((node, i), []), f"{node.name}_{i}_sum")
                    for i in range(len(info(node).shape))]
            value = sums if any(s is not None for s in sums) else None
        else:
            value = self.total(self.parts.get((node, None), []), f"{node.name}_sum")
        self._incoming[node] = value
        return value


def walk_back(nodes: Iterable[fx.Node], fanin: FanIn, visit_op: Callable, visit_param: Callable | None = None) -> None:
    """Visit ``nodes`` (a graph's nodes in topological order, or a subset such as one unit's) from
    the last to the first: a select hands its incoming feedback to its tuple's element
    (:meth:`FanIn.select`); an op calls ``visit_op(node)``, which reads ``fanin.incoming(node)`` and
    adds what its rule sends to its arguments; a parameter calls ``visit_param(node, incoming)``
    when feedback reached it. Other nodes (constants, shapes, placeholders) are passed over."""
    for node in reversed(list(nodes)):
        role = info(node).role
        if role == "select":
            g = fanin.incoming(node)
            if g is not None:
                fanin.select(node, g)
        elif role == "op":
            visit_op(node)
        elif role == "param" and visit_param is not None:
            g = fanin.incoming(node)
            if g is not None:
                visit_param(node, g)
