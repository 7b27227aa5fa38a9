"""The never-silent check: the feedback graph writes a gradient for exactly the parameters autograd
would reach from the model's outputs.

Autograd reaches a trainable parameter when a chain of differentiable (active) values leads from it
to an output: a parameter read directly by an op (``call.params``), held by a module the graph
calls, or read through a parameter path (``cat([cls_token.expand(b, -1, -1), x])``). The error-mode
feedback graph must return a gradient for each of them and for nothing else. A difference means a
rule, a module binder or the activity analysis lost a path; it is reported with the node where the
parameter enters the graph, never left as a silently untrained layer.
"""
from __future__ import annotations

from torch import fx, nn

from ..errors import FBCompileError
from ..trace import active_outputs, describe, info


def reached_parameters(gm: fx.GraphModule, model: nn.Module) -> dict[str, fx.Node]:
    """{qualified name: the node that reads it} for every trainable parameter on a differentiable
    path to an active output, found by walking the traced graph backwards through active values."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    reached, stack, seen = {}, list(active_outputs(gm)), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for name in _parameters_read(node, model):
            if name in trainable:
                reached.setdefault(name, node)
        shape_only = _shape_only_inputs(node)
        stack.extend(src for src in node.all_input_nodes if info(src).active and src not in shape_only)
    return reached


def _shape_only_inputs(node: fx.Node) -> set:
    """The nodes ``node`` reads only for their shape or dtype (``OpSpec.shape_only``)."""
    call = info(node).call
    if call is None:
        return set()
    return {value for name, value in call.args.items() if name in call.spec.shape_only and isinstance(value, fx.Node)}


def _parameters_read(node: fx.Node, model: nn.Module) -> list[str]:
    record = info(node)
    if record.role == "param":
        return [node.target]
    if node.op == "call_module":
        prefix = f"{node.target}." if node.target else ""
        return [prefix + name for name, _ in model.get_submodule(node.target).named_parameters()]
    return list(record.call.params.values()) if record.call is not None else []


def check_parameter_coverage(gm: fx.GraphModule, model: nn.Module, written: list) -> None:
    """Raise :class:`FBCompileError` unless the trainable parameters among ``written`` (those the
    error-mode feedback graph returns gradients for) are exactly the parameters autograd reaches."""
    reached = reached_parameters(gm, model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(reached) - set(written))
    extra = sorted(set(written) & trainable - set(reached))
    if not missing and not extra:
        return
    lines = [f"  {name}: read at {describe(reached[name])}" for name in missing]
    lines += [f"  {name}: written by the feedback graph but not reached by autograd" for name in extra]
    raise FBCompileError(
        f"the feedback graph of {type(model).__name__} would leave {len(missing)} parameter(s) that autograd "
        f"trains without a gradient" + (f" and write {len(extra)} it does not reach" if extra else "") +
        ":\n" + "\n".join(lines) + "\nThis is a bug in a rule or in fbcompile's analysis of that node; "
        "nothing was compiled.")
