"""Capture: torch.fx symbolic tracing of a model into a GraphModule (the fx front end).

torch.nn's own modules and every module class an op is declared for stay single ``call_module``
nodes; everything else is traced through. ``forward`` arguments after the example inputs are bound
to constants (their defaults, or the values the user passes), so the captured program takes exactly
the example inputs.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import traceback

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.nn.utils import parametrize

from .autocast_guard import autocast_state
from .autograd_functions import custom_functions_refused
from .buffer_writes import count_up, get_attr_buffer, rewrite_counter_increments
from .errors import FBCompileError, UntraceableModelError
from .hook_guard import TENSOR_HOOK_REFUSAL, TENSOR_HOOKS, check_capturable
from .mutation import redirect_in_place_results
from .random_guard import draws_refused
from .tensor_attributes import traced_as_buffers
from .contained_tensors import eager_reads_refused
from .ops import declare_optional_spellings, lookup_module
from .trace import describe, user_line

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class _Tracer(fx.Tracer):
    def __init__(self):
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True
        self.grad_mode, self.autocast = _grad_mode(), autocast_state()

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """Every node, refused when ``forward`` changed the grad mode or autocast around it: fx
        records neither ``torch.no_grad()`` / ``set_grad_enabled`` / ``inference_mode`` blocks, so
        what they stop would get feedback, nor ``torch.autocast`` blocks, so the program would
        compute in another precision than the model (torch.export keeps such blocks apart, and
        names them)."""
        if _grad_mode() != self.grad_mode:
            raise UntraceableModelError("forward changes the grad mode (torch.no_grad(), set_grad_enabled or "
                                        "inference_mode), which torch.fx does not record; the values computed "
                                        "inside would wrongly carry feedback. Compute them outside forward, or "
                                        "use .detach()")
        if autocast_state() != self.autocast:
            raise UntraceableModelError("forward enters or leaves torch.autocast, which torch.fx does not record; "
                                        "the program would compute that block in another precision than the model. "
                                        "Cast explicitly (x.to(torch.bfloat16)), or compile and train inside one "
                                        "torch.autocast context")
        return super().create_node(kind, target, args, kwargs, name, type_expr)

    def create_proxy(self, kind, target, args, kwargs, *rest, **options):
        """Every value, refused when it is a gradient hook's registration (fx would trip over the
        hook function; a program could not run it anyway: :mod:`fbcompile.hook_guard`)."""
        if kind == "call_method" and target in TENSOR_HOOKS:
            raise UntraceableModelError(TENSOR_HOOK_REFUSAL)
        return super().create_proxy(kind, target, args, kwargs, *rest, **options)

    def _filter_traceback_frames(self, user_stack_summary):
        """fx's user frames of a node's stack trace, without :meth:`create_node`'s own frame."""
        frames = super()._filter_traceback_frames(user_stack_summary)
        return traceback.StackSummary.from_list([f for f in frames if f.filename != __file__])

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """torch.nn's own modules, and any module class an op was declared for (a user's custom
        module with a registered rule is one node, not traced through). A parametrized module
        (``nn.utils.parametrizations.weight_norm``) and its parametrizations are traced through, so
        that the weight it computes from its parameters is part of the graph."""
        if parametrize.is_parametrized(m) or ".parametrizations." in f".{qualname}.":
            return False
        if isinstance(m, nn.modules.conv._ConvNd) and m.padding_mode != "zeros":
            return False            # traced through: F.pad in that mode, then the convolution unpadded
        return lookup_module(m) is not None or super().is_leaf_module(m, qualname)


def _grad_mode() -> tuple:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def capture(model: nn.Module, given: int, constants: dict | None = None) -> fx.GraphModule:
    """Symbolically trace ``model`` called with ``given`` example inputs into a GraphModule.

    ``forward`` arguments after the example inputs are constants of the program: those named in
    ``constants`` take that value, the others their defaults (``forward(x, attn_mask=None)`` traced
    from ``model(x)`` is specialised to ``attn_mask=None``, as the user's call would be)."""
    declare_optional_spellings()
    check_capturable(model, "fx")
    tracer = _Tracer()
    fixed = constant_arguments(model, given, constants or {})
    with traced_as_buffers(model) as assigned, eager_reads_refused(model):
        graph = _trace(tracer, model, fixed)
    for where, value in assigned:
        _assigned_counter(graph, where, value, type(model).__name__)
    _drop_specialised(graph, given, model)
    _dtype_methods_as_to(graph)
    _flatten_output(graph)
    rewrite_counter_increments(graph, get_attr_buffer(tracer.root))
    redirect_in_place_results(graph, tracer.root)
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


def _assigned_counter(graph: fx.Graph, where: str, value, model_name: str) -> None:
    """An assignment to model state during the trace, as a :func:`count_up` node where it is a
    counter's ``self.steps += 1`` (which fx records as ``steps + 1`` assigned back: an integer state
    tensor plus a constant, read by nothing later); any other is refused."""
    node = value.node if isinstance(value, fx.Proxy) else None
    if (node is not None and node.op == "call_function" and node.target in (operator.add, operator.iadd)
            and not node.users and len(node.args) == 2 and not node.kwargs
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" and node.args[0].target == where
            and isinstance(node.args[1], int) and not isinstance(node.args[1], bool)):
        node.target = count_up
        return
    line = user_line(node) if node is not None else ""
    raise UntraceableModelError(
        f"{model_name}.forward assigns {'a traced value' if node is not None else type(value).__name__} to "
        f"{where!r}; a program cannot keep assignments to the model's parameters, buffers or tensor attributes "
        "(only BatchNorm's running statistics and counters, self.counter += 1). Update it outside forward "
        "(e.g. after the optimizer step)" + (f"\n  at {line}" if line else ""))


def _trace(tracer: _Tracer, model: nn.Module, fixed: dict) -> fx.Graph:
    """``tracer.trace(model)``; an exception becomes an UntraceableModelError naming the line."""
    try:
        with custom_functions_refused("torch.fx"), draws_refused(type(model).__name__, "torch.fx"):
            return tracer.trace(model, concrete_args=fixed or None)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError, ...
        where = _failure_line(exc)
        if isinstance(exc, UntraceableModelError):       # our own refusal: its reason, without fx's hint
            raise UntraceableModelError(f"torch.fx could not trace {type(model).__name__}: {exc}"
                                        + (f"\n  at {where}" if where else "")) from exc
        raise UntraceableModelError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}\n"
            + (f"  at {where}\n" if where else "") +
            "hint: symbolic tracing cannot follow Python control flow that depends on tensor values "
            "(if x.sum() > 0, loops over x.shape[0] of a traced value, ...). Move that logic out of "
            "forward(), make the branch depend on constructor arguments, or wrap the offending "
            "submodule in a module class that fbcompile has a rule for.") from exc


_DTYPE_METHODS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_methods_as_to(graph: fx.Graph) -> None:
    """``x.float()``, ``x.double()``, ``x.half()``, ``x.bfloat16()`` written as ``x.to(dtype)``, the
    spelling the cast op binds (torch.export records them as ``aten.to`` already)."""
    for node in graph.nodes:
        if node.op == "call_method" and node.target in _DTYPE_METHODS and len(node.args) == 1 and not node.kwargs:
            node.target, node.args = "to", (node.args[0], _DTYPE_METHODS[node.target])


def _flatten_output(graph: fx.Graph) -> None:
    """A dict, nested or partly constant output (Hugging Face's ``{'logits': ...}``, torchvision
    segmentation's ``OrderedDict``, ``(logits, None)``) returned as the flat tuple of its graph values
    in pytree order, as the torch.export front end returns it; a tensor or a flat tuple or list of
    graph values stays as it is."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if isinstance(value, fx.Node) or (isinstance(value, (tuple, list)) and all(isinstance(v, fx.Node) for v in value)):
        return
    leaves, _ = pytree.tree_flatten(value)
    nodes = tuple(leaf for leaf in leaves if isinstance(leaf, fx.Node))
    output.args = (nodes[0] if len(nodes) == 1 else nodes,)


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
    the program takes exactly the example inputs, every one required (a default such as Hugging
    Face's ``pixel_values=None`` is dropped: generated programs add arguments after the inputs)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[:given]:
        node.args = ()
    placeholders = placeholders[given:]
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
              if _TORCH_DIR not in f.filename and _PACKAGE_DIR not in f.filename and f.filename != contextlib.__file__]
    if not frames:
        return ""
    f = frames[-1]
    return f'File "{f.filename}", line {f.lineno}, in {f.name}' + (f": {f.line.strip()}" if f.line else "")
