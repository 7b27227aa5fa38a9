"""What a rule sees: one context interface, two implementations.

:class:`ProxyContext` is used by the compiler: values are fx proxies and every torch call a rule makes
is recorded into the feedback graph. :class:`EagerContext` is used by the verifier and by tests:
values are real tensors. Rules therefore read as plain torch code and are checked on the very
function that the compiler emits.

The interface, for a rule handling forward node ``n``:

- ``ctx.saved(name, index=None)``: a value from the forward pass: a tensor argument of ``n`` by its
  canonical name (``"input"``), ``"output"``, or an extra the op's tapped forward saved
  (``"indices"``, ``"mask"``, ``"rstd"``). Saved values are the same at every batch size, so rules
  take dynamic sizes from them (``ctx.saved("input").shape``) and static sizes from ``ctx.shape``.
- ``ctx.shape(name="output", index=None)``: the static shape seen at compile time (use it for
  non-batch dimensions only: output_padding, pooling geometry).
- ``ctx.saved_shape(name, index=None)``: the run-time shape of a forward value *without* saving the
  value: a value that depends on no model input has its static shape (a tuple), any other is a
  shape tap (key ``(node name, SHAPE)``: the forward returns ``value.shape``, a ``torch.Size``), so
  a rule that needs only a size (``sum_to`` after broadcasting, zeros to scatter into) pins no
  activation until the feedback runs.
- ``ctx.const(name, default)``: a hyperparameter of the call (stride, dim, p, ...);
  ``ctx.sizes(name)`` for a list of them with entries computed at run time (pads).
- ``ctx.param(name)``: a model attribute the call uses (LayerNorm weight, BatchNorm buffers, the
  module itself); ``None`` when the argument is ``None``.
- ``ctx.weight(name)``: the *feedback* weight standing in for forward parameter ``name``: the forward
  weight itself for BP and analytical TP, a fixed random matrix for FA/FWDTP, a trained one for
  learned feedback. Only transposed-weight rules ask for this.
- ``ctx.call(fn, *args, **kwargs)``: call a helper as one graph node (no tracing into it).
- ``ctx.call_once(fn, *args)``: the same, but a call of ``fn`` with the same arguments already made
  at this node in this feedback graph is reused: one fused kernel whose results both the rule and
  the op's weight-gradient formula read (BatchNorm's ``native_batch_norm_backward``, a
  convolution's ``convolution_backward``).
- ``ctx.with_param_grads``: whether the graph being built also emits this node's weight gradients
  from the same ``g`` (error modes, an op with parameters): only then is a fused kernel computing
  both worth calling (False in target modes and in the verifier, which evaluate the rule alone).
- ``ctx.feedback_dropped(name)``: whether the feedback for that argument is usually thrown away (a
  model input; in the cut modes a value from another unit), where such a fused kernel would only
  add work that pruning could otherwise remove.
- ``ctx.is_active(name, index=None)``: whether that argument carries an activation.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx

from .errors import RuleError
from .trace import AttrRef, OpCall, info

OUTPUT = "output"
SHAPE = "#shape"        # tap key extra of a shape tap: (node name, SHAPE) -> the value's torch.Size


def tap_name(node: fx.Node, what: str, index: int | None = None) -> tuple:
    """Key of the forward value that ``ctx.saved(what, index)`` refers to: ``(node name, None)`` for
    a graph value (the argument's producer, or the node itself for ``"output"``) and
    ``(node name, extra)`` for an extra the op's tapped forward saves."""
    if what != OUTPUT and what in info(node).call.spec.extras:
        return (node.name, what)
    return (_source(node, what, index).name, None)


def _source(node: fx.Node, what: str, index: int | None = None) -> fx.Node:
    """The forward node whose value argument ``what`` (or ``"output"``) of ``node`` is."""
    call: OpCall = info(node).call
    if what == OUTPUT:
        return node
    value = call.args.get(what)
    if index is not None:
        value = value[index]
    if not isinstance(value, fx.Node):
        raise RuleError(f"rule for {node.format_node()} asked for saved({what!r}) but that argument is "
                        f"not a graph value (it is {value!r}); use ctx.const or ctx.param")
    return value


class RuleContext:
    """Shared, mode-independent part: static facts about the forward node."""

    def __init__(self, node: fx.Node):
        self.node = node
        self.op_call: OpCall = info(node).call
        self.name = node.name

    @property
    def module(self):
        return self.op_call.module

    def const(self, name: str, default: Any = None) -> Any:
        value = self.op_call.args.get(name, default)
        if isinstance(value, (fx.Node, AttrRef)):
            raise RuleError(f"rule for {self.node.format_node()}: argument {name!r} is a runtime value, "
                            "not a constant; it cannot be used as a hyperparameter")
        return value

    def sizes(self, name: str, default: Any = None) -> Any:
        """A list hyperparameter (pads, counts) whose entries may be computed at run time
        (``F.pad(x, [0, n - x.shape[-1]])``): those entries are read from the forward."""
        value = self.const(name, default)
        if not isinstance(value, (list, tuple)):
            return value
        return type(value)(map(self.run_time, value))

    def has(self, name: str) -> bool:
        return self.op_call.args.get(name) is not None

    def is_active(self, name: str, index: int | None = None) -> bool:
        return any(arg == name and where == index for arg, where, _ in self.op_call.active)

    def shape(self, name: str = OUTPUT, index: int | None = None) -> tuple:
        if name == OUTPUT:
            return info(self.node).shape
        value = self.op_call.args[name]
        if index is not None:
            value = value[index]
        if isinstance(value, fx.Node):
            return info(value).shape
        if isinstance(value, AttrRef):
            return tuple(value.value.shape)
        raise RuleError(f"rule for {self.node.format_node()}: argument {name!r} has no shape")

    def dtype(self):
        return info(self.node).dtype

    def _attr_name(self, name: str) -> str | None:
        value = self.op_call.args.get(name)
        if value is None:
            return None
        if isinstance(value, AttrRef):
            return value.qualname
        if isinstance(value, fx.Node) and value.op == "get_attr":
            return value.target
        raise RuleError(f"rule for {self.node.format_node()}: argument {name!r} is not a model attribute")

    def computed(self, name: str) -> bool:
        """Whether argument ``name`` is a weight computed from parameters (``self.w.t()``, a
        weight-normalised kernel) rather than a parameter itself: :meth:`param` and :meth:`weight`
        then give its forward value."""
        value = self.op_call.args.get(name)
        return isinstance(value, fx.Node) and value.op != "get_attr"

    # mode-specific
    def saved(self, name: str, index: int | None = None):
        raise NotImplementedError

    def saved_value(self, source: fx.Node):
        """The forward value of ``source``, a node this op reads inside an argument's structure (a
        slice bound computed at run time, ``x[..., : x.shape[-1] // 2]``)."""
        raise NotImplementedError

    def run_time(self, value):
        """``value`` with what the graph computes at run time read from the forward: a graph value
        (a size, ``n - x.shape[-1]``) or a slice's bounds (``x[..., : x.shape[-1] // 2]``)."""
        if isinstance(value, slice):
            return slice(self.run_time(value.start), self.run_time(value.stop), self.run_time(value.step))
        return self.saved_value(value) if isinstance(value, fx.Node) else value

    def saved_shape(self, name: str, index: int | None = None):
        """The run-time shape of argument ``name`` (or ``"output"``) without saving its value: the
        static shape when the value depends on no model input, else a shape tap."""
        source = _source(self.node, name, index)
        if info(source).is_tuple:
            raise RuleError(f"rule for {self.node.format_node()} asked for saved_shape({name!r}), but "
                            f"{source.name} is a tuple of values, not one tensor")
        if not info(source).from_input:
            return tuple(info(source).shape)
        return self._shape_tap(source)

    def _shape_tap(self, source: fx.Node):
        raise NotImplementedError

    def call_once(self, fn: Callable, *args):
        return self.call(fn, *args)

    @property
    def with_param_grads(self) -> bool:
        return False

    def feedback_dropped(self, name: str) -> bool:
        """Whether feedback for argument ``name`` is usually thrown away, so a fused kernel computing
        it with the weight gradients would waste work and keep dead inputs alive: a model input
        (learners drop its error), or in a cut mode a value from outside this node's unit."""
        value = self.op_call.args.get(name)
        return isinstance(value, fx.Node) and value.op == "placeholder"

    def param(self, name: str):
        raise NotImplementedError

    def weight(self, name: str):
        raise NotImplementedError

    def call(self, fn: Callable, *args, **kwargs):
        raise NotImplementedError

    def weight_without_slot(self) -> None:
        """Note that this node's input feedback goes through the forward value of a weight made of
        parameters that has no feedback slot (a weight computed from parameters, a parameter operand
        of einsum or of an op differentiated by autograd): learners whose feedback weights stand in
        for the forward weights refuse the program (:class:`~fbcompile.runtime.feedback_weights.FeedbackWeights`)."""

    def forward_args(self) -> dict:
        """Every canonical argument as a value: graph values saved, model attributes, constants."""
        resolved = {}
        for name, value in self.op_call.args.items():
            if isinstance(value, (list, tuple)):
                resolved[name] = type(value)(self._resolve(name, v, i) for i, v in enumerate(value))
            else:
                resolved[name] = self._resolve(name, value, None)
        return resolved

    def _resolve(self, name, value, index):
        if isinstance(value, slice):
            return self.run_time(value)
        if isinstance(value, fx.Node):
            return self.param(name) if value.op == "get_attr" and index is None else self.saved(name, index)
        if isinstance(value, AttrRef):
            return self.param(name)
        return value

    def module_ref(self):
        """The nn.Module of a call_module node (for helpers that read live state like .training)."""
        raise NotImplementedError


class EagerContext(RuleContext):
    """Rules on real tensors. ``values`` maps forward-program node names to values (see
    :func:`tap_name`); ``weights`` optionally maps ``(node name, param name)`` to a feedback weight."""

    def __init__(self, node: fx.Node, values: dict, root: torch.nn.Module, weights: dict | None = None):
        super().__init__(node)
        self.values, self.root, self.weights = values, root, weights or {}

    def saved(self, name, index=None):
        return self.values[tap_name(self.node, name, index)]

    def saved_value(self, source):
        return self.values[(source.name, None)]

    def _shape_tap(self, source):
        return self.values[(source.name, None)].shape

    def param(self, name):
        if self.computed(name):
            return self.saved(name)
        qualname = self._attr_name(name)
        return None if qualname is None else _get_attr(self.root, qualname)

    def weight(self, name):
        if (self.node.name, name) in self.weights:
            return self.weights[(self.node.name, name)]
        return self.param(name)

    def call(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)

    def module_ref(self):
        return self.op_call.module


class ProxyContext(RuleContext):
    """Rules on fx proxies: every torch call is recorded into ``builder``'s feedback graph."""

    def __init__(self, node: fx.Node, builder):
        super().__init__(node)
        self.builder = builder

    def saved(self, name, index=None):
        return self.builder.tap(tap_name(self.node, name, index))

    def saved_value(self, source):
        return self.builder.tap((source.name, None))

    def _shape_tap(self, source):
        return self.builder.tap((source.name, SHAPE))

    @property
    def with_param_grads(self) -> bool:
        return self.builder.mode == "error" and bool(self.op_call.params)

    def feedback_dropped(self, name):
        value = self.op_call.args.get(name)
        unit_of = self.builder.partition.unit_of
        crosses = isinstance(value, fx.Node) and unit_of.get(value) is not unit_of.get(self.node)
        return super().feedback_dropped(name) or (self.builder.cut and crosses)

    def call_once(self, fn, *args):
        key = (self.node.name, fn, tuple(a.node if isinstance(a, fx.Proxy) else repr(a) for a in args))
        memo = self.builder.call_memo
        if key not in memo:
            memo[key] = self.call(fn, *args)
        return memo[key]

    def param(self, name):
        if self.computed(name):
            return self.saved(name)
        qualname = self._attr_name(name)
        return None if qualname is None else self.builder.attr(qualname)

    def weight_without_slot(self):
        self.builder.unslotted_weights.append(self.node.name)

    def weight(self, name):
        if self.computed(name):
            # a weight computed from parameters (F.linear(x, self.w.t())): the forward value; no
            # slot, so feedback-weight learners refuse the program (FeedbackWeights)
            self.weight_without_slot()
            return self.saved(name)
        qualname = self._attr_name(name)
        if qualname is None:
            return None
        if name not in self.op_call.params:
            # a buffer or constant (a blur-pool filter): a fixed operator, not a learned weight, so
            # no slot; every learner feeds back through its own value, as through a pooling
            return self.builder.attr(qualname)
        return self.builder.slot(self.node, name)

    def call(self, fn, *args, **kwargs):
        return self.builder.tracer.create_proxy("call_function", fn, args, kwargs)

    def module_ref(self):
        return self.builder.attr(self.node.target)


def _get_attr(root: torch.nn.Module, qualname: str):
    obj = root
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
