"""Node metadata and value propagation.

After capture (:mod:`fbcompile.capture`), :func:`propagate` and canonicalization
(:mod:`fbcompile.canonical`), every node of the traced GraphModule carries one metadata entry,
``node.meta["fbcompile"]``, a :class:`NodeInfo`: what the node is (input, parameter, op, ...),
whether it is *active* (carries feedback), its shape and dtype from running the example inputs, and
for ops the canonical :class:`OpCall`. Nothing else is stored on nodes.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .buffer_writes import BufferWrites
from .tensor_attributes import state_tensors
from .errors import FBCompileError
from .mutation import WriteCheck
from .ops import OpSpec

META = "fbcompile"
_TORCH_DIR = os.path.dirname(torch.__file__)


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

#: node.meta key of an integer or boolean input's example value (token ids, masks): runs on inputs
#: made up for another batch size draw their rows from it (batch_layout), since random ids lose what
#: the model relies on (BART's classifier reads the hidden state at each sequence's end token)
EXAMPLE_ROWS = "fbcompile_example_rows"

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


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run something on ``model`` with its buffers (BatchNorm statistics, counters) on private copies
    of their data and the CPU RNG forked. Each buffer object keeps its identity and points at a
    copy for the block, so whatever holds the object reads and writes the copy: the model's
    modules, and the graph modules of a program, whose ``get_attr`` containers hold the buffer
    objects themselves (a functional ``F.batch_norm(x, self.running_mean, ...)``). Afterwards each
    buffer's own memory is back, never written, and its version counter as it was: autograd may
    have saved it (a BatchNorm backward reads the running statistics). Plain tensor attributes
    (:mod:`fbcompile.tensor_attributes`) are treated the same way."""
    buffers = list({id(t): t for _, t in state_tensors(model)}.values())
    saved = [(b, b.data, b._version) for b in buffers]
    for buffer in buffers:
        buffer.data = buffer.detach().clone()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for buffer, data, _ in saved:
                buffer.data = data
            torch._C._autograd._unsafe_set_version_counter(buffers, [version for _, _, version in saved])


def propagate(gm: fx.GraphModule, model: nn.Module, example_inputs: tuple) -> None:
    """Record role, activity, shape and dtype of every node by running the example inputs; refuse
    an in-place write that a later read would miss (:class:`~fbcompile.mutation.WriteCheck`) and a
    write to a buffer that a program cannot keep (:class:`~fbcompile.buffer_writes.BufferWrites`)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise FBCompileError(f"{type(model).__name__}.forward takes {len(placeholders)} input(s) "
                             f"({', '.join(p.name for p in placeholders)}) but {len(example_inputs)} "
                             "example input(s) were given")
    params = {id(p) for p in model.parameters()}
    writes = WriteCheck(gm.graph)

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            read = writes.before(node, self.env)
            try:
                value = super().run_node(node)
            except Exception as exc:
                raise FBCompileError(f"running the example inputs failed at node {describe(node)}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            node.meta[META] = _value_info(node, value, model, params)
            if node.op == "placeholder" and isinstance(value, torch.Tensor) and value.dim() \
                    and not (value.is_floating_point() or value.is_complex()):
                node.meta[EXAMPLE_ROWS] = value.detach().cpu().clone()     # token ids: see EXAMPLE_ROWS
            buffer_writes.after(node)
            writes.after(node, read, self.env, lambda n: info(n).active)
            return value

    with preserved_state(model), torch.no_grad():
        buffer_writes = BufferWrites(model)     # the versions of the copies the run writes
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
    differentiable = _holds_floating_tensor(value) and not _reads_only_metadata(node)
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


_METADATA_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full"}
_METADATA_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.randn_like,
                       torch.rand_like, torch.randint_like,
                       *(getattr(torch.ops.aten, n).default for n in ("new_zeros", "new_ones", "new_empty", "new_full",
                                                                      "zeros_like", "ones_like", "empty_like", "full_like",
                                                                      "randn_like", "rand_like")),
                       torch.ops.aten.randint_like.default, torch.ops.aten.randint_like.low_dtype}


def _reads_only_metadata(node: fx.Node) -> bool:
    """``x.new_zeros(...)``, ``torch.zeros_like(x)`` and their ATen forms read only the shape, dtype
    and device of ``x``: their value is a constant (zero derivative), whatever ``x`` is (Swin's
    shifted-window mask is built this way)."""
    if node.op == "call_method":
        return node.target in _METADATA_METHODS
    return node.op == "call_function" and node.target in _METADATA_FUNCTIONS


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
