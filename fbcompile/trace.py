"""Tracing: torch.fx symbolic trace, value propagation and canonicalisation.

After :func:`trace_model` every node of the returned GraphModule carries one metadata entry,
``node.meta["fbcompile"]``, a :class:`NodeInfo`: what the node is (input, parameter, op, ...),
whether it carries an *active* tensor (one that depends on a model input), its shape and dtype from
running the example inputs, and for ops the canonical :class:`OpCall`. Nothing else is stored on
nodes.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import FBCompileError, UntraceableModelError
from .ops import OpSpec, lookup_callable, lookup_module, tensor_method

META = "fbcompile"
_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class AttrRef:
    """An attribute of the model reached through a module (``fc1.weight``); ``value`` is the object."""
    qualname: str
    value: Any


@dataclass(eq=False)
class OpCall:
    """A node in canonical form: the op, its arguments bound to the op's canonical signature."""
    spec: OpSpec
    args: dict[str, Any]
    params: dict[str, str]
    inplace: bool
    module: nn.Module | None
    active: list[tuple[str, int | None, fx.Node]]  # (argument, list index or None, node)

    def arg(self, name: str, default=None):
        return self.args.get(name, default)


@dataclass(eq=False)
class NodeInfo:
    """What tracing learned about one node.

    ``active``: the value carries feedback: it holds floating-point tensors computed from a model
    input or from a trainable parameter, whatever its Python type (tensor, tuple, list).
    ``from_input``: it depends on a model input. An active value that does not (``param_only``:
    a class token expanded to the batch, a transposed weight, a layer scale reshaped) is part of a
    parameter path: error mode sends feedback down it into the parameters; targets never go there.
    """
    role: str                      # input | param | buffer | constant | op | select | value | output
    active: bool = False
    shape: tuple | None = None     # tensors; for tuples a tuple of shapes (None for a None element)
    dtype: torch.dtype | None = None
    is_tuple: bool = False
    call: OpCall | None = None
    select_index: int | tuple | None = None   # a getitem on a tuple: the element, or elements for a slice
    source: str = ""
    unit: int | None = None
    from_input: bool = False
    input_dependent: bool = False  # computed from a model input, whatever the dtype (token ids, sizes)
    problem: str | None = field(default=None, repr=False)

    @property
    def param_only(self) -> bool:
        return self.active and not self.from_input


def info(node: fx.Node) -> NodeInfo:
    return node.meta[META]


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """torch.nn's own modules, and any module class an op was declared for (a user's custom
        module with a registered rule is one node, not traced through)."""
        return lookup_module(m) is not None or super().is_leaf_module(m, qualname)


def user_line(node: fx.Node) -> str:
    """The innermost user source line that produced ``node`` (from fx's recorded stack trace),
    skipping frames inside torch itself; ``""`` when fx recorded none."""
    lines = [ln.strip() for ln in (node.stack_trace or "").strip().splitlines()]
    frames = [(ln, lines[i + 1] if i + 1 < len(lines) and not lines[i + 1].startswith("File ") else "")
              for i, ln in enumerate(lines) if ln.startswith("File ")]
    outside = [f for f in frames if _TORCH_DIR not in f[0]]
    frame = outside[-1] if outside else (frames[0] if frames else None)
    if frame is None:
        return ""
    return f"{frame[0]}: {frame[1]}" if frame[1] else frame[0]


def describe(node: fx.Node) -> str:
    """``node.format_node()`` plus the user code line, for error messages."""
    line = user_line(node) if isinstance(node, fx.Node) else ""
    text = node.format_node() if isinstance(node, fx.Node) else str(node)
    return f"{text}" + (f"\n      at {line}" if line else "")


def trace_model(model: nn.Module, example_inputs: tuple, constants: dict | None = None) -> fx.GraphModule:
    """Symbolically trace ``model``, run ``example_inputs`` through it to record shapes, and
    canonicalise every node. The model's parameters, buffers and RNG state are left unchanged.

    ``forward`` arguments after the example inputs are constants of the program: those named in
    ``constants`` take that value, the others their defaults (``forward(x, attn_mask=None)`` traced
    from ``model(x)`` is specialised to ``attn_mask=None``, as the user's call would be)."""
    tracer = _Tracer()
    fixed = constant_arguments(model, len(example_inputs), constants or {})
    try:
        graph = tracer.trace(model, concrete_args=fixed or None)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = _failure_line(exc)
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            + (f"  at {where}\n" if where else "") +
            "hint: symbolic tracing cannot follow Python control flow that depends on tensor values "
            "(if x.sum() > 0, loops over x.shape[0] of a traced value, ...). Move that logic out of "
            "forward(), make the branch depend on constructor arguments, or wrap the offending "
            "submodule in a module class that fbcompile has a rule for.") from exc
    _drop_specialised(graph, len(example_inputs), model)
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    _propagate(gm, model, example_inputs)
    _canonicalise(gm, model)
    return gm


def constant_arguments(model: nn.Module, given: int, constants: dict) -> dict:
    """{name: value} for the ``forward`` parameters after the first ``given`` positional ones."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    later = params[given:]
    unknown = sorted(set(constants) - {p.name for p in later})
    if unknown:
        raise FBCompileError(f"{type(model).__name__}.forward has no argument {', '.join(map(repr, unknown))} "
                             f"after its {given} example input(s) (its arguments: "
                             f"{', '.join(p.name for p in params)})")
    fixed = {}
    for p in later:
        value = constants.get(p.name, p.default)
        if value is p.empty:
            raise FBCompileError(f"{type(model).__name__}.forward takes {len(params)} input(s) "
                                 f"({', '.join(q.name for q in params)}) but {given} example input(s) were "
                                 f"given, and {p.name!r} has no default: pass it as an example input")
        if isinstance(value, torch.Tensor):
            raise FBCompileError(f"argument {p.name!r} of {type(model).__name__}.forward is a tensor: pass it "
                                 "as an example input, not as a constant")
        fixed[p.name] = value
    return fixed


_GUARDS = (torch._assert, torch.fx._symbolic_trace._assert_is_none, operator.eq)


def _drop_specialised(graph: fx.Graph, given: int, model: nn.Module) -> None:
    """Remove the placeholders fx keeps for specialised arguments, with the guards that check them:
    the program takes exactly the example inputs."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][given:]
    for node in reversed(placeholders):
        guards, stack = [], list(node.users)
        while stack:
            user = stack.pop()
            if user.op != "call_function" or user.target not in _GUARDS:
                raise FBCompileError(f"{type(model).__name__}.forward uses the constant argument {node.target!r} "
                                     f"as a value at {describe(user)}; pass it as an example input")
            guards.append(user)
            stack.extend(user.users)
        for guard in sorted(set(guards), key=lambda g: -list(graph.nodes).index(g)):
            graph.erase_node(guard)
        graph.erase_node(node)


def _failure_line(exc: BaseException) -> str:
    """The innermost user frame of a tracing failure (``File ..., line n, in forward: code``)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if _TORCH_DIR not in f.filename and _PACKAGE_DIR not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}' + (f": {f.line.strip()}" if f.line else "")


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run something on ``model`` with its buffers (BatchNorm statistics) swapped for copies and
    the CPU RNG forked. Afterwards the original buffer tensors are back, never written in place:
    autograd may have saved them (a train-mode BatchNorm backward reads the running statistics)."""
    swapped = []
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                swapped.append((module, name, buf))
                module._buffers[name] = buf.detach().clone()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for module, name, buf in swapped:
                module._buffers[name] = buf


def _propagate(gm: fx.GraphModule, model: nn.Module, example_inputs: tuple) -> None:
    """Record role, activity, shape and dtype of every node by running the example inputs."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise FBCompileError(f"{type(model).__name__}.forward takes {len(placeholders)} input(s) "
                             f"({', '.join(p.name for p in placeholders)}) but {len(example_inputs)} "
                             "example input(s) were given")
    params = {id(p) for p in model.parameters()}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            try:
                value = super().run_node(node)
            except Exception as exc:
                raise FBCompileError(f"running the example inputs failed at node {describe(node)}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            node.meta[META] = _value_info(node, value, model, params)
            return value

    with preserved_state(model), torch.no_grad():
        Recorder(gm).run(*example_inputs)


def _value_info(node: fx.Node, value, model: nn.Module, param_ids: set) -> NodeInfo:
    is_tensor = isinstance(value, torch.Tensor)
    is_tuple = (isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
                and all(v is None or isinstance(v, torch.Tensor) for v in value))
    if node.op == "placeholder":
        role = "input"
    elif node.op == "get_attr":
        role = "param" if id(value) in param_ids else ("buffer" if is_tensor else "constant")
    elif node.op == "output":
        role = "output"
    else:
        role = "op"
    upstream = [info(n) for n in node.all_input_nodes if META in n.meta]
    differentiable = _holds_floating_tensor(value)
    reads_param = role == "op" and (any(u.role == "param" or u.param_only for u in upstream) or _owns_trainable(node, model))
    input_dependent = role == "input" or (role == "op" and any(u.input_dependent for u in upstream))
    # an activation: differentiable and computed from an activation, or a parameter looked up by
    # input-dependent integers (an embedding of token ids starts the activations of a text model)
    from_input = differentiable and (
        (role == "input") or (role == "op" and (any(u.active and u.from_input for u in upstream)
                                                or (reads_param and input_dependent))))
    from_param = differentiable and ((role == "param" and value.requires_grad) or reads_param)
    record = NodeInfo(role=role, active=from_input or from_param, is_tuple=is_tuple, source=user_line(node),
                      from_input=from_input, input_dependent=input_dependent)
    if is_tensor:
        record.shape, record.dtype = tuple(value.shape), value.dtype
    elif is_tuple:
        record.shape = tuple(None if v is None else tuple(v.shape) for v in value)
        record.dtype = next(v.dtype for v in value if v is not None)
    return record


def _holds_floating_tensor(value) -> bool:
    """Whether ``value`` (a tensor, or tuples/lists/dicts of them at any depth) holds a floating-point
    or complex tensor: integer and boolean tensors (token ids, masks, indices) carry no feedback."""
    if isinstance(value, torch.Tensor):
        return value.is_floating_point() or value.is_complex()
    if isinstance(value, (tuple, list)):
        return any(_holds_floating_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_floating_tensor(v) for v in value.values())
    return False


def _owns_trainable(node: fx.Node, model: nn.Module) -> bool:
    """A call_module node whose module holds trainable parameters (nn.Embedding on integer ids is
    active through its weight although none of its arguments is)."""
    if node.op != "call_module":
        return False
    return any(p.requires_grad for p in model.get_submodule(node.target).parameters())


def _canonicalise(gm: fx.GraphModule, model: nn.Module) -> None:
    """Attach an :class:`OpCall` to every active op node (or a ``problem`` when there is none)."""
    names = _qualified_names(model)
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
        try:
            record.call = _bind(node, gm, names)
        except FBCompileError as exc:
            record.problem = str(exc)


_NAMED_ELEMENTS = {"values": 0, "indices": 1}   # torch.return_types of max, min, sort, topk, ...


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


def _element_index(index, length: int):
    """A getitem index into a tuple of ``length`` elements as a non-negative int, or a tuple of them
    for a slice (``parts[-1]`` is element ``length - 1``; ``parts[1:]`` is elements 1..length-1)."""
    if isinstance(index, slice) and all(v is None or isinstance(v, int) for v in (index.start, index.stop, index.step)):
        return tuple(range(length)[index])
    if isinstance(index, int) and -length <= index < length:
        return index % length
    raise FBCompileError(f"index {index!r} into a tuple of {length} values is not a constant int or slice "
                         "within range")


def _qualified_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for kind in (model.named_modules(), model.named_parameters(), model.named_buffers()):
        for name, obj in kind:
            names.setdefault(id(obj), name)
    return names


_RECURRENT = (nn.RNNBase, nn.RNNCellBase)
RECURRENT_HINT = (": recurrent modules (nn.RNN, nn.LSTM, nn.GRU and their cells) are not supported; fbcompile "
                  "has no feedback rule through time")


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


def depends_on_parameters(node: fx.Node) -> bool:
    """Whether a forward value is computed from some model parameter (feedback into it is useless
    for learning otherwise)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        record = info(current)
        if record.role == "param" or (record.call is not None and record.call.params):
            return True
        stack.extend(current.all_input_nodes)
    return False


def active_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """The active tensors the model returns, flattened in order (tensor, tuple or list output)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    flat = list(out) if isinstance(out, (tuple, list)) else [out]
    return [n for n in flat if isinstance(n, fx.Node) and info(n).active]


def output_structure(gm: fx.GraphModule):
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return type(out) if isinstance(out, (tuple, list)) else None
