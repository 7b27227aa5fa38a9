"""Canonicalization: every active node of a traced graph bound to its canonical op.

``nn.ReLU``, ``F.relu``, ``torch.relu`` and ``x.relu()`` become one :class:`~fbcompile.trace.OpCall`
of op "relu", its arguments bound to the op's canonical signature (module-held parameters and
hyperparameters included); a getitem on a tuple value (``parts[-1]``, ``result.values``) becomes a
select of an element, and a tuple value passed whole to an op (``torch.cat(parts[::-1], 1)``) the
list of its element selects. A node that cannot be bound keeps the reason in ``NodeInfo.problem``.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .errors import FBCompileError
from .ops import OpSpec, get_op, lookup_aten, lookup_callable, lookup_module, tensor_method
from .trace import META, AttrRef, NodeInfo, OpCall, info


def canonicalize(gm: fx.GraphModule, model: nn.Module) -> None:
    """Attach an :class:`OpCall` to every active op node (or a ``problem`` when there is none)."""
    names, rewritten = _qualified_names(model), False
    for node in gm.graph.nodes:
        record = info(node)
        if record.role != "op" or not record.active:
            if record.role == "op":
                record.role = "value"  # shapes, sizes, constants computed in forward
            continue
        if _selects_element(node):
            record.role = "select"
            try:
                record.select_index = _element_index(node.args[1], len(info(node.args[0]).shape))
            except FBCompileError as exc:
                record.problem = str(exc)
            continue
        rewritten = (_spread_tuple_arguments(gm, node) or _complex_part_as_function(node)
                     or _extreme_of_two_as_elementwise(node) or rewritten)
        try:
            record.call = _bind(node, gm, names)
        except FBCompileError as exc:
            record.problem = str(exc)
    if rewritten:
        gm.recompile()      # the graph gained element selects, z.real became torch.real(z), ...


_NAMED_ELEMENTS = {"values": 0, "indices": 1, "min": 0, "max": 1}   # torch.return_types (max, sort, aminmax, ...)


def _selects_element(node: fx.Node) -> bool:
    """``parts[i]`` on a tuple value, or ``result.values`` / ``result.indices`` on a named tuple
    (rewritten to its position, so both spellings are one select)."""
    if not (node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node)
            and info(node.args[0]).is_tuple):
        return False
    if node.target is getattr and node.args[1] in _NAMED_ELEMENTS:
        node.args = (node.args[0], _NAMED_ELEMENTS[node.args[1]])
        node.target = operator.getitem
    return node.target is operator.getitem


def _complex_part_as_function(node: fx.Node) -> bool:
    """``z.real`` / ``z.imag`` (fx records ``getattr``) rewritten to ``torch.real(z)`` / ``torch.imag(z)``,
    so both spellings are one op (:mod:`rules.fourier`). Whether it was one."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("real", "imag"):
        node.target, node.args = getattr(torch, node.args[1]), node.args[:1]
        return True
    return False


_ELEMENTWISE_EXTREMES = {torch.max: torch.maximum, torch.min: torch.minimum, "max": torch.maximum,
                         "min": torch.minimum}


def _extreme_of_two_as_elementwise(node: fx.Node) -> bool:
    """``torch.max(a, b)`` / ``a.max(b)`` of two tensors (and ``min``) rewritten to ``torch.maximum(a, b)``
    / ``torch.minimum``: the same function, which torch.export writes as ``aten.max.other``. Whether
    it was one (``torch.max(x, dim)`` with an integer ``dim`` stays a reduction)."""
    key = node.target if node.op in ("call_function", "call_method") else None
    if key not in _ELEMENTWISE_EXTREMES or len(node.args) != 2 or node.kwargs:
        return False
    other = node.args[1]
    if not (isinstance(other, fx.Node) and META in other.meta and info(other).shape is not None
            and not info(other).is_tuple):
        return False
    node.op, node.target = "call_function", _ELEMENTWISE_EXTREMES[key]
    return True


def _element_index(index, length: int):
    """A getitem index into a tuple of ``length`` elements as a non-negative int, or a tuple of them
    for a slice (``parts[-1]`` is element ``length - 1``; ``parts[1:]`` is elements 1..length-1)."""
    if isinstance(index, slice) and all(v is None or isinstance(v, int) for v in (index.start, index.stop, index.step)):
        return tuple(range(length)[index])
    if isinstance(index, int) and -length <= index < length:
        return index % length
    raise FBCompileError(f"index {index!r} into a tuple of {length} values is not a constant int or slice "
                         "within range")


def _spread_tuple_arguments(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A tuple value passed whole as an argument (``torch.cat(parts, 1)``, ``torch.cat(parts[::-1], 1)``)
    becomes the list of its element selects, so the op binds one graph value per tensor, as for
    ``torch.cat([parts[0], parts[1]], 1)``. Whether there was one."""
    if not any(isinstance(a, fx.Node) and info(a).is_tuple for a in (*node.args, *node.kwargs.values())):
        return False

    def spread(arg):
        if not (isinstance(arg, fx.Node) and info(arg).is_tuple):
            return arg
        whole, elements = info(arg), []
        for index, shape in enumerate(whole.shape):
            with gm.graph.inserting_before(node):
                element = gm.graph.call_function(operator.getitem, (arg, index))
            element.meta[META] = NodeInfo(role="select", active=whole.active and shape is not None, shape=shape,
                                          dtype=whole.dtype, select_index=index, source=whole.source,
                                          from_input=whole.from_input, input_dependent=whole.input_dependent)
            elements.append(element)
        return elements

    node.args = tuple(spread(a) for a in node.args)
    node.kwargs = {k: spread(v) for k, v in node.kwargs.items()}
    return True


def _qualified_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for kind in (model.named_modules(), model.named_parameters(), model.named_buffers()):
        for name, obj in kind:
            names.setdefault(id(obj), name)
    return names


_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
RECURRENT_HINT = (": torch.fx keeps recurrent modules (nn.RNN, nn.LSTM, nn.GRU and their cells) as one call; "
                  "frontend='export' or 'auto' writes them step by step over time")


def _bind(node: fx.Node, gm: fx.GraphModule, names: dict[int, str]) -> OpCall:
    module = None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        spec, inplace = lookup_module(module), False
        if spec is None:
            raise FBCompileError(f"no op is declared for module class {type(module).__name__}"
                                 + (RECURRENT_HINT if isinstance(module, _RECURRENT) else ""))
        extra = spec.modules[_declared_class(spec, module)](module)
        inplace = bool(extra.pop("inplace", False))
        try:
            bound = spec.signature.bind(*node.args, **{**node.kwargs, **extra})
        except TypeError as exc:
            raise FBCompileError(f"cannot bind the arguments of {type(module).__name__} to op "
                                 f"{spec.name!r}: {exc}") from exc
        args = {k: _attr(v, names) for k, v in bound.arguments.items()}
    elif lookup_aten(node.target) is not None:
        spec, inplace, args = _bind_aten(node)
    else:
        target = tensor_method(node.target) if node.op == "call_method" else node.target
        found = lookup_callable(target)
        if found is None:
            shown = f"Tensor.{node.target}" if node.op == "call_method" else getattr(target, "__name__", target)
            raise FBCompileError(f"no op is declared for {node.op} {shown}")
        spec, inplace = found
        try:
            bound = spec.signature.bind(*node.args, **node.kwargs)
        except TypeError as exc:
            raise FBCompileError(f"cannot bind the arguments of {node.format_node()} to op "
                                 f"{spec.name!r}: {exc}") from exc
        args = dict(bound.arguments)
        if args.pop("inplace", False) is True:
            inplace = True
    args.pop("inplace", None)
    params, active = {}, []
    for name, value in args.items():
        if name in spec.shape_only:         # read for its shape or dtype: no parameter, no feedback
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        for index, item in enumerate(items):
            where = index if isinstance(value, (list, tuple)) else None
            if isinstance(item, fx.Node):
                record = info(item)
                if record.role == "param" and where is None:
                    params[name] = item.target
                elif record.active:
                    active.append((name, where, item))
            elif isinstance(item, AttrRef) and isinstance(item.value, nn.Parameter) and where is None:
                params[name] = item.qualname
    return OpCall(spec, args, params, inplace, module, active)


def _bind_aten(node: fx.Node) -> tuple[OpSpec, bool, dict]:
    """An ATen overload (torch.export front end) bound through its adapter in
    :mod:`fbcompile.aten_spellings` to the canonical arguments of its op."""
    spelling = lookup_aten(node.target)
    spec = get_op(spelling.op)
    args = spelling.adapter(node, *node.args, **node.kwargs)
    unknown = sorted(set(args) - set(spec.signature.parameters))
    if unknown:
        raise FBCompileError(f"the adapter of {node.target} gave argument(s) {', '.join(unknown)} that op "
                             f"{spec.name!r} does not take")
    return spec, spelling.inplace, args


def _declared_class(spec: OpSpec, module: nn.Module) -> type:
    for cls in type(module).__mro__:
        if cls in spec.modules:
            return cls
    raise FBCompileError(f"op {spec.name!r} declares no module class that {type(module).__name__} derives from")


def _attr(value, names: dict[int, str]):
    """Wrap model-held tensors and modules from a module binder as :class:`AttrRef`."""
    if isinstance(value, (torch.Tensor, nn.Module)) and id(value) in names:
        return AttrRef(names[id(value)], value)
    return value
