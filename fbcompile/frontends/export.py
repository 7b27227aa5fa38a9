"""The torch.export front end: ``torch.export.export(model, args, strict=False)`` (training IR, the
model's current train/eval mode) rewritten into the form the fx front end produces.

The exported program lifts parameters, buffers and tensor constants to placeholders. They are
mapped back to the model's own objects: a parameter placeholder becomes ``get_attr`` of its
qualified name in ``model.named_parameters()`` (the very ``nn.Parameter``, so ``.grad`` lands on the
user's parameters and ``state_dict()`` round trips), a buffer ``get_attr`` of its name in
``named_buffers()``. The program's placeholders are then exactly the example inputs, its nodes ATen
overloads that :mod:`fbcompile.aten_spellings` binds to canonical ops.

Dropout modules become ``call_module`` nodes of the user's ``nn.Dropout`` the same way, so that
``train()`` / ``eval()`` switch them as in the fx front end.

BatchNorm: training IR writes ``nn.BatchNorm2d`` as ``aten.batch_norm`` updating the running
statistics in place, plus ``aten.add_`` on ``num_batches_tracked``. Both are replaced by one
``call_module`` node of the user's BatchNorm module, which then updates its own buffers exactly as
the model's forward would (and verification can run it on copies of them). A counter incremented
in place (an integer buffer += a constant, as timm's ``BatchNormAct2d`` counts its batches) becomes
a ``count_up`` node (:mod:`fbcompile.buffer_writes`). Any other in-place write to a buffer is
refused: the compiled programs could not keep it away from the user's state.

Every node keeps export's ``stack_trace`` metadata, so ``explain()``, ``coverage()`` and errors
show the user's source line.
"""
from __future__ import annotations

import inspect
import operator

import torch
from torch import fx, nn
from torch.export.graph_signature import InputKind, OutputKind

from ..autocast_guard import autocast_state
from ..autograd_functions import check_recorded_functions, custom_functions_recorded
from ..buffer_writes import count_up, counter_increment
from ..input_shapes import META as SHAPES_META, exported_input_shapes
from ..errors import FBCompileError
from ..hook_guard import refuse_hooks_on_called_module, tensor_hooks_refused
from ..random_guard import draws_refused
from ..ops import lookup_module
from .recurrent import recurrent_modules_unrolled

aten = torch.ops.aten
_DROPPED = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default}
_BATCH_NORM = aten.batch_norm.default


def export_program(model: nn.Module, example_inputs: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """``torch.export.export(model, example_inputs, kwargs, strict=False)`` with the batch dimension
    (dim 0 of every example input) exported as ``Dim.AUTO``: sizes computed from it stay graph values,
    so the program runs on other batch sizes (as fx programs do), unless the model specialises it.
    Its failure is raised as it is (the caller words the error). Model state is left as it was.
    A custom autograd Function whose backward is not its forward's derivative is refused
    (:mod:`fbcompile.autograd_functions`); recurrent modules are unrolled over time
    (:mod:`fbcompile.frontends.recurrent`)."""
    batch = {0: torch.export.Dim.AUTO}
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    if tensors and all(x.shape[0] == 1 for x in tensors):
        # torch.export specialises a size-1 dim: trace on the sample repeated twice, so the batch stays
        # a graph value (the captured program is the model's path for batches of 2 or more)
        example_inputs = tuple(torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
                               for x in example_inputs)
    dynamic = tuple(batch if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in example_inputs)
    if kwargs:
        names = [p for p in inspect.signature(model.forward).parameters][:len(example_inputs)]
        dynamic = {**dict(zip(names, dynamic)), **{k: None for k in kwargs}}
    with custom_functions_recorded() as functions, recurrent_modules_unrolled(model), \
            draws_refused(type(model).__name__, "torch.export"), tensor_hooks_refused(type(model).__name__):
        exported = torch.export.export(model, tuple(example_inputs), kwargs=kwargs or None, strict=False,
                                       dynamic_shapes=dynamic)
    check_recorded_functions(functions)
    if _writes_through_views(exported) and not any(n.target in _BATCH_NORMS for n in exported.graph.nodes):
        exported = exported.run_decompositions({})      # functional: slice_scatter, select_scatter, copy
    return exported


_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit.default,
                aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default}


def _writes_through_views(ep: torch.export.ExportedProgram) -> bool:
    """Whether an in-place op of the training IR writes into a view of a tensor computed from a model
    input or parameter (item assignment ``h[:, 0] = v``, ``h[:, :2].mul_(2)``, ``h.t().mul_(3)``).
    Such a program is made functional (``run_decompositions({})``: writes into copies,
    ``slice_scatter`` and the like, which the rule library covers), unless it holds a BatchNorm, whose
    functional form the export front end does not map back to the module: that program keeps its
    writes and is refused naming them. Writes into constants (a mask filled in place) keep the
    program as it is: they run as written."""
    kinds = {spec.arg.name: spec.kind for spec in ep.graph_signature.input_specs}
    live = set()        # nodes computed from a user input or a parameter
    for node in ep.graph.nodes:
        if node.op == "placeholder":
            if kinds.get(node.name) in (InputKind.USER_INPUT, InputKind.PARAMETER):
                live.add(node)
            continue
        if any(source in live for source in node.all_input_nodes):
            live.add(node)
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and node.args:
            first = target._schema.arguments[0] if target._schema.arguments else None
            if first is not None and first.alias_info is not None and first.alias_info.is_write and \
                    _is_view(node.args[0]) and node in live:
                return True
    return False


def _is_view(value) -> bool:
    if not isinstance(value, fx.Node) or not isinstance(value.target, torch._ops.OpOverload):
        return False
    returns = value.target._schema.returns
    return bool(returns) and returns[0].alias_info is not None and not returns[0].alias_info.is_write


def from_exported(model: nn.Module, ep: torch.export.ExportedProgram, given: int) -> fx.GraphModule:
    """The exported program as a GraphModule over the model's own parameters and buffers."""
    copy = _ProgramCopy(model, ep)
    _drop_copies_onto_themselves(ep.graph_module.graph, copy.kinds)
    for node in ep.graph_module.graph.nodes:
        copy.node(node, ep.graph_module)
    if copy.user_inputs != given:
        raise FBCompileError(f"the exported program of {type(model).__name__} takes {copy.user_inputs} tensor "
                             f"input(s) but {given} example input(s) were given (non-tensor inputs are specialised)")
    graph = copy.graph
    for node in reversed(list(graph.nodes)):   # unused lifted values, and size arithmetic of dropped guards
        if not node.users and (node.op == "get_attr" or (node.op == "call_function" and _symbolic(node))):
            graph.erase_node(node)
    root = {n.target: (copy.attrs[n.target] if n.op == "get_attr" else model.get_submodule(n.target))
            for n in graph.nodes if n.op in ("get_attr", "call_module")}
    graph.lint()
    traced = fx.GraphModule(root, graph, class_name=type(model).__name__)
    traced.meta[SHAPES_META] = exported_input_shapes(ep, type(model).__name__)
    return traced


class _ProgramCopy:
    """Copies an exported program's nodes into ``graph``, mapping lifted parameters and buffers back
    to the model's own objects (``env``: exported node -> new node). Blocks that turn autocast off
    are copied inline (:mod:`fbcompile.autocast_guard`)."""

    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram):
        self.model, self.sig = model, ep.graph_signature
        self.kinds = {spec.arg.name: spec for spec in self.sig.input_specs}
        self.constants = ep.constants
        self.batch_norms = _module_batch_norms(model, ep.graph_module.graph, self.kinds)
        self.counters = {f"{q}.num_batches_tracked" for q in self.batch_norms.values()}
        self.graph, self.env, self.attrs = fx.Graph(), {}, {}
        # a tied parameter (GPT-2's lm_head.weight is transformer.wte.weight) may be lifted under any
        # of its names: use the one named_parameters() / named_buffers() gives, as everything else does
        self.canonical = {id(v): name for name, v in [*model.named_parameters(), *model.named_buffers()]}
        self.user_inputs = 0

    def node(self, node: fx.Node, owner: nn.Module) -> None:
        if node.op == "placeholder":
            self.placeholder(node)
        elif node.op == "output":
            outputs = [self.env[o] for o, spec in zip(node.args[0], self.sig.output_specs)  # None, constants dropped
                       if spec.kind == OutputKind.USER_OUTPUT and isinstance(o, fx.Node)]
            self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        elif node.op == "call_function":
            self.call(node, owner)
        elif not (node.op == "get_attr" and node.users and all(map(_autocast_off, node.users))):
            raise FBCompileError(f"the exported program of {type(self.model).__name__} holds {node.op} node "
                                 f"{node.format_node()} ({_kept_block(node)}); fbcompile supports straight-line "
                                 "exported programs only" + _line(next(iter(node.users), node)))

    def placeholder(self, node: fx.Node) -> None:
        spec, graph = self.kinds[node.name], self.graph
        if spec.kind == InputKind.USER_INPUT:
            self.env[node] = graph.placeholder(node.name)
            self.user_inputs += 1
            return
        if spec.kind == InputKind.PARAMETER:
            value = self.model.get_parameter(spec.target)
        elif spec.kind == InputKind.BUFFER:
            value = self.model.get_buffer(spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            value = self.constants[spec.target]
        else:
            raise FBCompileError(f"torch.export lifted {node.name} as a {spec.kind.name}, which fbcompile "
                                 "cannot map back to the model")
        qualname = (self.canonical.get(id(value), spec.target) if spec.kind != InputKind.CONSTANT_TENSOR
                    else f"_export_constant_{len(self.attrs)}")
        self.attrs[qualname] = value
        self.env[node] = graph.get_attr(qualname)
        self.env[node].meta.update(node.meta)

    def call(self, node: fx.Node, owner: nn.Module) -> None:
        env, graph = self.env, self.graph
        if node.target in _DROPPED and not node.users:
            return
        if _autocast_off(node):
            env[node] = self.inline_block(node, owner)
            return
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node) \
                and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]        # an output of an inlined block
            return
        module_call = self.batch_norms.get(node) or _dropout_module(self.model, node)
        if module_call is not None:
            refuse_hooks_on_called_module(self.model.get_submodule(module_call), module_call)
            env[node] = graph.call_module(module_call, (env[node.args[0]],))
            env[node].meta.update(node.meta)
            return
        if node.target in _DECOMPOSED:
            env[node] = _DECOMPOSED[node.target](graph, node, env)
            return
        written = _buffer_written(node, self.kinds)
        if written is not None:
            if written in self.counters and not node.users:
                return   # num_batches_tracked += 1: the BatchNorm module does it
            if counter_increment(node, self.buffer_of) is not None:
                env[node] = graph.call_function(count_up, (env[node.args[0]], node.args[1]))
                env[node].meta.update(node.meta)
                return
            raise FBCompileError(f"{node.format_node()} writes buffer {written!r} in place; the export front "
                                 f"end supports in-place buffer updates only inside nn.BatchNorm modules and "
                                 f"counters (an integer buffer += a constant)" + _line(node))
        env[node] = graph.node_copy(node, lambda n: env[n])

    def buffer_of(self, value: fx.Node):
        """(qualified name, tensor) of the buffer or tensor attribute an exported placeholder is, else None."""
        spec = self.kinds.get(value.name)
        if value.op != "placeholder" or spec is None or spec.kind not in _STATE:
            return None
        return spec.target, (self.model.get_buffer(spec.target) if spec.kind == InputKind.BUFFER
                             else self.constants[spec.target])

    def inline_block(self, node: fx.Node, owner: nn.Module) -> tuple:
        """The nodes of a ``torch.autocast(enabled=False)`` block, copied in place of the block: the
        values of its outputs. Exact with autocast off, the state of the capture, which every run
        of the program checks (:mod:`fbcompile.autocast_guard`); refused in a capture under autocast.
        A BatchNorm inside one is refused (its module mapping is top-level)."""
        if any(enabled for enabled, _ in autocast_state()):
            raise FBCompileError("forward turns torch.autocast off in a block, and this capture runs under autocast: "
                                 "the program cannot keep that block at full precision. Compile and train without "
                                 "torch.autocast, or cast explicitly" + _line(next(iter(node.users), node)))
        block = getattr(owner, node.args[4].target)
        operands = iter(node.args[5:])
        for inner in block.graph.nodes:
            if inner.op == "placeholder":
                self.env[inner] = self.env[next(operands)]
            elif inner.op == "output":
                return tuple(self.env[o] for o in inner.args[0])
            elif inner.target in _BATCH_NORMS:
                raise FBCompileError("a BatchNorm inside a torch.autocast(enabled=False) block is not supported "
                                     "by the export front end: move it out of the block" + _line(inner))
            else:
                self.node(inner, block)
        raise AssertionError("an exported block without an output node")


def _autocast_off(node: fx.Node) -> bool:
    """Whether ``node`` is torch.export's call of a ``torch.autocast(..., enabled=False)`` block."""
    return node.op == "call_function" and getattr(node.target, "__name__", "") == "wrap_with_autocast" \
        and len(node.args) > 4 and node.args[2] is False


_KEPT_BLOCKS = {"wrap_with_autocast": "a torch.autocast block inside forward",
                "wrap_with_set_grad_enabled": "a torch.no_grad() / set_grad_enabled block inside forward",
                "cond": "torch.cond control flow", "while_loop": "a torch.while_loop"}


def _kept_block(node: fx.Node) -> str:
    """What torch.export kept as the submodule ``node`` reads: the higher-order op calling it."""
    for user in node.users:
        name = getattr(user.target, "__name__", str(user.target))
        if name in _KEPT_BLOCKS:
            return f"{_KEPT_BLOCKS[name]}, kept by torch.export as a submodule"
    return "control flow or a submodule call kept by torch.export"


def _baddbmm(graph: fx.Graph, node: fx.Node, env: dict) -> fx.Node:
    """``baddbmm(b, X, Y, beta, alpha) = beta b + alpha (X @ Y)`` as ATen calls that have rules
    (``bmm``, ``mul``, ``add``; Bloom's attention scores with its ALiBi bias). With beta = 0 the bias
    is ignored, as baddbmm itself ignores it (even a nan in it)."""
    a = {name: value for name, value in zip(("self", "batch1", "batch2"), node.args)}
    a.update(node.kwargs)
    beta, alpha = a.get("beta", 1), a.get("alpha", 1)

    def emit(target, *args):
        made = graph.call_function(target, tuple(env.get(v, v) if isinstance(v, fx.Node) else v for v in args))
        made.meta.update(node.meta)
        return made

    product = emit(aten.bmm.default, a["batch1"], a["batch2"])
    if alpha != 1:
        product = emit(aten.mul.Tensor, product, alpha)
    if beta == 0:
        return product
    bias = a["self"] if beta == 1 else emit(aten.mul.Tensor, a["self"], beta)
    return emit(aten.add.Tensor, bias, product)


# ATen overloads with no canonical op, rewritten into ones that have (graph, node, env) -> new node
_DECOMPOSED = {aten.baddbmm.default: _baddbmm}


def _symbolic(node: fx.Node) -> bool:
    """A size computation (SymInt / SymBool / plain number value): no side effects."""
    value = node.meta.get("val")
    return value is not None and not isinstance(value, (torch.Tensor, tuple, list))


def _line(node: fx.Node) -> str:
    from ..trace import user_line
    line = user_line(node)
    return f"\n  at {line}" if line else ""


def _drop_copies_onto_themselves(graph: fx.Graph, kinds: dict) -> None:
    """``self.steps += 1`` on a buffer exports as ``add_(steps, 1)`` and then ``copy_(steps, add_)``,
    the assignment back of the same tensor: a copy of the state onto itself, dropped so that the
    increment reads as the counter it is."""
    for node in list(graph.nodes):
        source = node.args[1] if node.target is torch.ops.aten.copy_.default and len(node.args) == 2 else None
        written = _buffer_written(node, kinds) if isinstance(source, fx.Node) else None
        if written is not None and source.args and source.args[0] is node.args[0] \
                and _buffer_written(source, kinds) == written:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


#: lifted inputs that are model state: buffers, and the tensor attributes torch.export lifts as constants
_STATE = (InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def _buffer_written(node: fx.Node, kinds: dict) -> str | None:
    """The qualified name of a buffer or tensor attribute an in-place ATen overload writes, else None."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    for argument, value in zip(schema.arguments, node.args):
        if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, fx.Node):
            spec = kinds.get(value.name)
            if value.op == "placeholder" and spec is not None and spec.kind in _STATE:
                return spec.target
    return None


def _dropout_module(model: nn.Module, node: fx.Node) -> str | None:
    """The qualified name of the user's ``nn.Dropout`` an ``aten.dropout`` node is (innermost module
    of its ``nn_module_stack``, same p and mode), so that ``model.eval()`` / ``.train()`` switch it as
    in the fx front end; None for functional dropout (its mode is the captured one)."""
    if node.target not in (aten.dropout.default, aten.dropout_.default) or len(node.args) != 3:
        return None
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    module = model.get_submodule(path) if path else None
    if type(module) is nn.Dropout and lookup_module(module) is not None \
            and module.inplace == (node.target is aten.dropout_.default) \
            and node.args[1] == module.p and node.args[2] == module.training:
        return path
    return None


def _module_batch_norms(model: nn.Module, graph: fx.Graph, kinds: dict) -> dict:
    """{aten.batch_norm node: qualified name of the nn BatchNorm module it is}: every argument is
    that module's own parameter, buffer or hyperparameter (training flag included)."""
    found = {}
    for node in graph.nodes:
        if node.target is not _BATCH_NORM:
            continue
        names = [kinds[a.name].target if isinstance(a, fx.Node) and a.name in kinds and a.op == "placeholder"
                 else a for a in node.args[1:5]]
        owners = {n.rpartition(".")[0] for n in names if isinstance(n, str)}
        if len(owners) != 1:
            continue
        qualname = owners.pop()
        module = model.get_submodule(qualname) if qualname else None
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or lookup_module(module) is None \
                or module.momentum is None:
            continue
        prefix = f"{qualname}." if qualname else ""
        expected = [prefix + "weight" if module.affine else None, prefix + "bias" if module.affine else None,
                    prefix + "running_mean" if module.track_running_stats else None,
                    prefix + "running_var" if module.track_running_stats else None]
        training = module.training or not module.track_running_stats
        if names == expected and node.args[5] == training and node.args[7] == module.eps and \
                (not training or node.args[6] == module.momentum):
            found[node] = qualname
    return found
