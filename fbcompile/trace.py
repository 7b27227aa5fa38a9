"""Tracing: torch.fx symbolic trace, value propagation and canonicalisation.

After :func:`trace_model` every node of the returned GraphModule carries one metadata entry,
``node.meta["fbcompile"]``, a :class:`NodeInfo`: what the node is (input, parameter, op, ...),
whether it carries an *active* tensor (one that depends on a model input), its shape and dtype from
running the example inputs, and for ops the canonical :class:`OpCall`. Nothing else is stored on
nodes.
"""
from __future__ import annotations

import contextlib
import operator
import os
import traceback
import warnings
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
    role: str                      # input | param | buffer | constant | op | select | value | output
    active: bool = False
    shape: tuple | None = None     # tensors; for tuples a tuple of shapes
    dtype: torch.dtype | None = None
    is_tuple: bool = False
    call: OpCall | None = None
    select_index: int | None = None
    source: str = ""
    unit: int | None = None
    problem: str | None = field(default=None, repr=False)


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


def trace_model(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """Symbolically trace ``model``, run ``example_inputs`` through it to record shapes, and
    canonicalise every node. The model's parameters, buffers and RNG state are left unchanged."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = _failure_line(exc)
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            + (f"  at {where}\n" if where else "") +
            "hint: symbolic tracing cannot follow Python control flow that depends on tensor values "
            "(if x.sum() > 0, loops over x.shape[0] of a traced value, ...). Move that logic out of "
            "forward(), make the branch depend on constructor arguments, or wrap the offending "
            "submodule in a module class that fbcompile has a rule for.") from exc
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    _propagate(gm, model, example_inputs)
    _canonicalise(gm, model)
    return gm


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
            node.meta[META] = _value_info(node, value, params)
            return value

    with preserved_state(model), torch.no_grad():
        Recorder(gm).run(*example_inputs)


def _value_info(node: fx.Node, value, param_ids: set) -> NodeInfo:
    is_tensor = isinstance(value, torch.Tensor)
    is_tuple = isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, torch.Tensor) for v in value)
    if node.op == "placeholder":
        role = "input"
    elif node.op == "get_attr":
        role = "param" if id(value) in param_ids else ("buffer" if is_tensor else "constant")
    elif node.op == "output":
        role = "output"
    else:
        role = "op"
    upstream = [n for n in node.all_input_nodes if META in n.meta]
    active = (role == "input" and is_tensor) or (
        role == "op" and (is_tensor or is_tuple) and any(info(n).active for n in upstream))
    record = NodeInfo(role=role, active=active, is_tuple=is_tuple, source=user_line(node))
    if is_tensor:
        record.shape, record.dtype = tuple(value.shape), value.dtype
    elif is_tuple:
        record.shape, record.dtype = tuple(tuple(v.shape) for v in value), value[0].dtype
    return record


def _canonicalise(gm: fx.GraphModule, model: nn.Module) -> None:
    """Attach an :class:`OpCall` to every active op node (or a ``problem`` when there is none)."""
    names = _qualified_names(model)
    for node in gm.graph.nodes:
        record = info(node)
        if record.role != "op" or not record.active:
            if record.role == "op":
                record.role = "value"  # shapes, sizes, constants computed in forward
            continue
        if node.target is operator.getitem and info(node.args[0]).is_tuple:
            record.role, record.select_index = "select", node.args[1]
            continue
        try:
            record.call = _bind(node, gm, names)
        except FBCompileError as exc:
            record.problem = str(exc)


def _qualified_names(model: nn.Module) -> dict[int, str]:
    names = {}
    for kind in (model.named_modules(), model.named_parameters(), model.named_buffers()):
        for name, obj in kind:
            names.setdefault(id(obj), name)
    return names


def _bind(node: fx.Node, gm: fx.GraphModule, names: dict[int, str]) -> OpCall:
    module = None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        spec, inplace = lookup_module(module), False
        if spec is None:
            raise FBCompileError(f"no op is declared for module class {type(module).__name__}")
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
                if record.active:
                    active.append((name, where, item))
                elif record.role == "param" and where is None:
                    params[name] = item.target
                elif _derived_params(item):
                    warnings.warn(
                        f"{describe(node)}\n  argument {name!r} is computed from parameter(s) "
                        f"{', '.join(_derived_params(item))} outside the feedback graph: propagate_error "
                        "gives them no gradient there (target-mode local losses do). Pass the parameter "
                        "to the op directly to get it.", stacklevel=4)
            elif isinstance(item, AttrRef) and isinstance(item.value, nn.Parameter) and where is None:
                params[name] = item.qualname
    return OpCall(spec, args, params, inplace, module, active)


def _derived_params(node: fx.Node) -> list[str]:
    """Parameters a non-active computed value (``self.w.t()``, ``self.g.sum()``) is made from."""
    found, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current in seen or META not in current.meta:
            continue
        seen.add(current)
        record = info(current)
        if record.role == "param" and current is not node:
            found.append(current.target)
        elif record.role == "value":
            stack.extend(current.all_input_nodes)
    return sorted(found)


def _declared_class(spec: OpSpec, module: nn.Module) -> type:
    for cls in type(module).__mro__:
        if cls in spec.modules:
            return cls
    raise AssertionError(type(module))


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
