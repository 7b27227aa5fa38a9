"""Build the forward program: the traced model, returning the values the feedback graph needs.

The forward GraphModule runs the model's own nodes (modules keep their live state: BatchNorm
statistics update in train mode, ``.train()`` / ``.eval()`` apply) with two rewrites:

- in-place spellings (``relu_``, ``+=``, ``nn.ReLU(inplace=True)``) run out of place, so no saved
  activation is ever overwritten;
- ops with a tapped forward (max-pool, dropout, LayerNorm) call it, and its extras (indices, mask,
  statistics) become available as taps.

It returns ``(model output, taps)`` and, when built with a partition (``detach_units=True``), the
unit *inputs* are detached inside each unit, so each unit output's autograd graph reaches only its
own unit's parameters: one multi-root ``backward`` then applies every unit's local loss at once.
"""
from __future__ import annotations

import operator

from torch import fx, nn

from ..trace import AttrRef, info


def build_forward(gm: fx.GraphModule, taps: list, partition=None, detach_units: bool = False,
                  returned: list | None = None) -> fx.GraphModule:
    """``taps`` are keys ``(node name, extra or None)``; ``returned`` lists forward nodes whose
    (graph-connected) values are returned as a third output, in order."""
    graph = fx.Graph()
    env, extras, detached = {}, {}, {}
    attrs = {}

    def get_attr(qualname):
        if qualname not in attrs:
            attrs[qualname] = graph.get_attr(qualname)
        return attrs[qualname]

    def arg_for(user):
        unit = partition.unit_of.get(user) if (partition is not None and detach_units) else None

        def transform(src):
            value = env[src]
            if unit is None or not info(src).active or partition.unit_of.get(src) is unit or src.op == "placeholder":
                return value
            key = (src, unit.index)
            if key not in detached:
                detached[key] = graph.call_method("detach", (value,), name=f"{src.name}_in_u{unit.index}")
            return detached[key]
        return transform

    for node in gm.graph.nodes:
        record = info(node)
        call = record.call
        if node.op == "output":
            continue
        if call is not None and (call.inplace or call.spec.tapped is not None):
            args, kwargs = call.spec.split(_canonical_arguments(call, arg_for(node), get_attr))
            if call.spec.tapped is not None:
                result = graph.call_function(call.spec.tapped, args, kwargs, name=f"{node.name}_tapped")
                env[node] = graph.call_function(operator.getitem, (result, 0), name=node.name)
                for i, extra in enumerate(call.spec.extras):
                    extras[(node.name, extra)] = graph.call_function(
                        operator.getitem, (result, i + 1), name=f"{node.name}_{extra}")
            else:
                env[node] = graph.call_function(call.spec.apply, args, kwargs, name=node.name)
        else:
            env[node] = graph.node_copy(node, arg_for(node))
    by_name = {n.name: n for n in gm.graph.nodes}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    model_out = fx.node.map_arg(out_node.args[0], lambda n: env[n])
    tap_values = tuple(extras[key] if key[1] else env[by_name[key[0]]] for key in taps)
    outputs = (model_out, tap_values)
    if returned is not None:
        outputs += (tuple(env[n] for n in returned),)
    graph.output(outputs)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"{type(gm).__name__}Forward")


def _canonical_arguments(call, transform, get_attr) -> dict:
    """Canonical arguments for ``apply`` / ``tapped``: graph values mapped, model attributes fetched."""

    def one(value):
        if isinstance(value, fx.Node):
            return transform(value)
        if isinstance(value, AttrRef):
            return get_attr(value.qualname)
        if isinstance(value, nn.Module):
            raise AssertionError("module binders must return model attributes as AttrRef")
        return value

    kwargs = {}
    for name, value in call.args.items():
        kwargs[name] = type(value)(one(v) for v in value) if isinstance(value, (list, tuple)) else one(value)
    return kwargs
