"""Emit the feedback graph: a reverse walk over the forward graph, one rule per node.

Three modes share the walk and differ in what flows backwards:

- ``"error"``: an error e, mapped by each rule's linear ``error`` map (J_G e). Parametric nodes also
  emit their weight gradients from the error at their output (the op's ``param_grads`` formula,
  else a local autograd vjp). With exact T rules this is backpropagation.
- ``"target"`` (TP): a target t, mapped by each rule's target map G: t_in = G(t_out).
- ``"difference"`` (DTP): the difference d = t - h with difference correction at every op,
  t_in = G_k(t_out) + h_in - G_k(h_out): affine rules map d linearly (``error``), a non-linear rule
  k gives d_in = G_k(h_k + d_out) - G_k(h_k) at its own forward output h_k. With exact T rules this
  tends to backpropagation as beta -> 0 whatever the unit grouping.
- ``"unit_difference"``: difference correction per unit, t_in = G_u(t_out) + h_in - G_u(h_out), i.e.
  d_in = G_u(h_out + d_out) - G_u(h_out). A non-linear rule k is evaluated at the *base* b_k =
  (G-chain of the unit applied to the unit's forward outputs) at k's output: the forward value itself
  when k ends its unit, else computed through the unit's own target maps (a skip connection inside
  the unit makes b_k differ from k's forward output).

Fan-out (a value used k > 1 times) gets one explicit sum of its incoming feedback. Tuple-valued
nodes (split, chunk) collect a list with one entry per element, filled through their getitem users.
The walk and its fan-out sums are :mod:`fbcompile.passes.walk`'s, shared with verification's
eager per-unit feedback map.

The emitted graph takes, in placeholder order: the feedback at each model output, then the saved
forward values ("taps") and feedback weights ("slots") the rules asked for. It returns
``(boundary feedback, parameter gradients)`` for :attr:`FeedbackGraph.boundary` and
:attr:`FeedbackGraph.params`.

Two cut modes stop the feedback at unit boundaries: every unit's rules are applied to its own
arguments (one per unit output) and the result at each unit input is returned per (unit, input)
instead of flowing on. ``"unit_target"`` applies the target maps G_u (reconstruction losses of
learned feedback evaluate G_u(F_u(h_u + eps)) for all units in one pass); ``"unit_error"`` the
error maps with their weight gradients: given delta_u at each unit's outputs it returns every
parameter's local gradient, the unit inputs' errors being dropped (DTP's local losses).
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ..context import SHAPE, ProxyContext
from ..errors import FBCompileError, RuleError
from ..ops import param_vjp
from ..trace import META, active_outputs, describe, info
from .walk import FanIn, left_sum, walk_back

MODES = ("error", "target", "difference")
CUT_MODES = {"unit_target": "target", "unit_error": "error"}     # cut mode -> the mode its rules run in
UNIT_DIFFERENCE = "unit_difference"
ERROR_MODES = ("error", "unit_error")     # the error family: every other mode is a target mode


def family_of(mode: str) -> str:
    """The rule family feedback mode ``mode`` draws its rules from: "error" for error propagation
    (the "error" and "unit_error" graphs), "target" for TP/DTP targets and differences."""
    return "error" if mode in ERROR_MODES else "target"


_OUTPUT_LABEL = {"error": "grad", "target": "target", "difference": "delta"}


@dataclass(eq=False)
class FeedbackGraph:
    module: fx.GraphModule
    mode: str
    inputs: list                      # ("output", i) | ("cut", node name) | ("tap", key) | ("slot", (node, param))
    boundary: list                    # forward nodes whose feedback is returned, in order
    params: list                      # qualified names of returned parameter gradients
    emitted: dict = field(default_factory=dict)   # forward node name -> feedback node names
    slot_params: dict = field(default_factory=dict)  # slot key -> qualified name of the forward weight
    unslotted_weights: list = field(default_factory=list)  # nodes feeding back through a parameter weight without a slot


class _NamingTracer(GraphAppendingTracer):
    """Appends to the feedback graph, naming nodes after the forward node and labelling them."""

    def __init__(self, graph):
        super().__init__(graph)
        self.prefix, self.label = "fb", {}
        self.created = []

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        if name is None:
            short = target if isinstance(target, str) else getattr(target, "__name__", "op")
            name = f"{self.prefix}_{short.strip('_')}"
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        node.meta[META] = dict(self.label)
        self.created.append(node)
        return node


class FeedbackBuilder:
    def __init__(self, gm: fx.GraphModule, rules: dict, partition, mode: str):
        self.cut, self.unit_correction = mode in CUT_MODES, mode == UNIT_DIFFERENCE
        self.emitted_mode = mode
        # error maps walk parameter paths down to the parameters; targets stay on activations
        self.reaches_params = mode in ("error", "unit_error")
        mode = {**CUT_MODES, UNIT_DIFFERENCE: "difference"}.get(mode, mode)
        self.gm, self.rules, self.partition, self.mode = gm, rules, partition, mode
        self.cut_parts = defaultdict(list)
        self.graph = fx.Graph()
        self.tracer = _NamingTracer(self.graph)
        self.taps, self.slots, self.attrs, self.slot_params = {}, {}, {}, {}
        self.call_memo = {}           # ProxyContext.call_once: (node, fn, arguments) -> its one call
        self.unslotted_weights = []
        self.fanin = FanIn(self._sum, lambda node: self._label(node, None, "fanout"))
        self.base_memo, self.at_base_memo = {}, {}
        self.param_parts = defaultdict(list)
        self.emitted = defaultdict(list)
        self._last_placeholder = None

    # -- graph inputs -------------------------------------------------------------------------
    def _placeholder(self, name: str, key) -> Proxy:
        where = (self.graph.inserting_after(self._last_placeholder) if self._last_placeholder
                 else self.graph.inserting_before(None if not len(self.graph.nodes) else next(iter(self.graph.nodes))))
        with where:
            node = self.graph.placeholder(name)
        node.meta[META] = {"input": key}
        self._last_placeholder = node
        return Proxy(node, self.tracer)

    def tap(self, key: tuple) -> Proxy:
        if key not in self.taps:
            node_name, extra = key
            name = f"{node_name}_shape" if extra == SHAPE else f"{node_name}_{extra}" if extra else f"h_{node_name}"
            self.taps[key] = self._placeholder(name, ("tap", key))
        return self.taps[key]

    def slot(self, node: fx.Node, param: str) -> Proxy:
        key = (node.name, param)
        if key not in self.slots:
            self.slots[key] = self._placeholder(f"fbw_{node.name}_{param}", ("slot", key))
            self.slot_params[key] = info(node).call.params[param]
        return self.slots[key]

    def attr(self, qualname: str) -> Proxy:
        if qualname not in self.attrs:
            self.attrs[qualname] = self.tracer.create_proxy("get_attr", qualname, (), {})
        return self.attrs[qualname]

    # -- the walk -----------------------------------------------------------------------------
    def build(self) -> FeedbackGraph:
        label = _OUTPUT_LABEL[self.mode]
        if self.cut:
            for unit in self.partition.units:
                for out in unit.outputs:
                    self.fanin.add(out, self._placeholder(f"{label[0]}_{out.name}", ("cut", out.name)))
        else:
            for i, out in enumerate(active_outputs(self.gm)):
                self.fanin.add(out, self._placeholder(f"{label}_{out.name}", ("output", i)))
        walked = [n for n in self.gm.graph.nodes
                  if info(n).active and not (info(n).param_only and not self.reaches_params)]
        walk_back(walked, self.fanin, self._emit, lambda node, g: self.param_parts[node.target].append(g))
        boundary = self.partition.boundary
        self._label(None, None, "output")
        if self.cut:
            boundary = [(unit.index, src) for unit in self.partition.units for src in unit.inputs]
            values = tuple(_unwrap(self._sum(self.cut_parts[key], f"{key[1].name}_u{key[0]}")) for key in boundary)
        else:
            values = tuple(_unwrap(self.external(n)) for n in boundary)
        params = sorted(self.param_parts)
        grads = tuple(_unwrap(self._sum(self.param_parts[p], f"grad_{p.replace('.', '_')}")) for p in params)
        self.graph.output((values, grads))
        self.graph.lint()
        module = fx.GraphModule(self.gm, self.graph, class_name=f"{type(self.gm).__name__}Feedback")
        inputs = [n.meta[META]["input"] for n in self.graph.nodes if n.op == "placeholder"]
        emitted = {name: [n.name for n in nodes] for name, nodes in self.emitted.items()}
        return FeedbackGraph(module, self.emitted_mode, inputs, boundary, params, emitted, dict(self.slot_params),
                             sorted(set(self.unslotted_weights)))

    def _emit(self, node: fx.Node) -> None:
        g = self.incoming(node)
        if g is None:
            return
        rule = self.rules[node]
        ctx = ProxyContext(node, self)
        self._label(node, rule, "feedback")
        if self.mode == "error":
            feedback = _checked(rule, node, lambda: rule.error(ctx, g))
        elif self.mode == "target":
            feedback = _checked(rule, node, lambda: rule.target_map()(ctx, g))
        else:
            feedback = _checked(rule, node, lambda: self._difference(node, rule, ctx, g))
        self._distribute(node, rule, feedback)
        if self.mode == "error" and info(node).call.params:
            self._param_grads(node, ctx, g)

    def _difference(self, node, rule, ctx, d):
        if rule.linear:
            return rule.error(ctx, d)
        base_out = self._base(node)
        at_base = self._target_at_base(node)
        self._label(node, rule, "feedback")
        moved = rule.target(ctx, _zip_map(operator.add, base_out, d))
        return {k: _zip_map(operator.sub, moved[k], at_base[k]) for k in moved}

    def _base(self, value: fx.Node):
        """G-chain of ``value``'s unit, applied to the unit's forward outputs, at ``value``."""
        if value in self.base_memo:
            return self.base_memo[value]
        if not self.unit_correction:
            return self.tap((value.name, None))
        unit = self.partition.unit_of.get(value)
        record = info(value)
        if record.is_tuple:
            parts = [None] * len(record.shape)
            for user in value.users:
                if self.partition.unit_of.get(user) is unit and info(user).role == "select":
                    parts[info(user).select_index] = self._base(user)
            base = parts
        else:
            parts = []
            if unit is None or value in unit.outputs:
                parts.append(self.tap((value.name, None)))
            for user in value.users:
                if self.partition.unit_of.get(user) is unit and info(user).role == "op":
                    parts.extend(v for v in self._base_entries(user, value) if v is not None)
            base = self._neutral_sum(parts, value, f"base_{value.name}")
        self.base_memo[value] = base
        return base

    def _neutral_sum(self, parts: list, value: fx.Node, name: str):
        """Targets b_1..b_k for one value h combined as h + sum_i (b_i - h): each consumer's target
        moves h by its own difference, so k consumers that all return h give h (a plain sum would
        give k h, and every non-linear rule upstream would be evaluated at the wrong point)."""
        total = self._sum(parts, name)
        if len(parts) < 2:
            return total
        extra = self.tracer.create_proxy("call_function", operator.mul, (self.tap((value.name, None)), len(parts) - 1), {})
        return self.tracer.create_proxy("call_function", operator.sub, (total, extra), {}, name=f"{name}_neutral")

    def _base_entries(self, user: fx.Node, value: fx.Node) -> list:
        """What ``user``'s target map, applied at its base, gives ``value``. An affine op joining
        several activations (a residual add) maps its output target to each operand as
        h_i + J_i^T (b - h) with the other operands held at their forward values: its plain target map
        would hand the whole sum b to every operand, and a non-linear rule upstream would then be
        evaluated at the sum instead of at its own output."""
        rule = self.rules[user]
        joined = sum(1 for _, _, src in info(user).call.active if info(src).from_input) > 1
        if not (rule.linear and joined and not info(user).is_tuple):
            return self._entries_for(user, self._target_at_base(user), value)
        if user not in self.at_base_memo:
            moved = self.tracer.create_proxy("call_function", operator.sub, (self._base(user), self.tap((user.name, None))), {})
            self._label(user, rule, "base")
            self.at_base_memo[user] = _checked(rule, user, lambda: rule.error(ProxyContext(user, self), moved))
        return [None if d is None else self.tracer.create_proxy("call_function", operator.add,
                                                                (self.tap((value.name, None)), d), {})
                for d in self._entries_for(user, self.at_base_memo[user], value)]

    def _target_at_base(self, node: fx.Node):
        if node not in self.at_base_memo:
            rule = self.rules[node]
            base_out = self._base(node)
            self._label(node, rule, "base")
            self.at_base_memo[node] = _checked(rule, node, lambda: rule.target_map()(ProxyContext(node, self), base_out))
        return self.at_base_memo[node]

    def _entries_for(self, node, feedback: dict, src: fx.Node) -> list:
        entries = []
        for arg, index, active in info(node).call.active:
            if active is src:
                value = feedback.get(arg)
                entries.append(value[index] if index is not None and value is not None else value)
        return entries

    def _distribute(self, node, rule, feedback) -> None:
        if not isinstance(feedback, dict):
            raise RuleError(f"rule {rule.name} returned {type(feedback).__name__} for {node.format_node()}; "
                            "rules return a dict {argument name: feedback}")
        for arg, index, src in info(node).call.active:
            if info(src).param_only and not self.reaches_params:
                continue
            if arg not in feedback and info(src).param_only:
                feedback[arg] = self._parameter_path_grad(node, arg)
            if arg not in feedback:
                raise RuleError(f"rule {rule.name} gave no feedback for active argument {arg!r} of "
                                f"{node.format_node()}")
            value = feedback[arg]
            if index is not None and value is not None:
                value = value[index]
            if value is None:
                continue
            value = self._in_dtype_of(src, node, value)
            unit = self.partition.unit_of.get(node)
            if self.cut and self.partition.unit_of.get(src) is not unit and not info(src).param_only:
                self.cut_parts[(unit.index, src)].append(value)
            else:
                self.fanin.add(src, value, origin=node)

    def _in_dtype_of(self, src: fx.Node, node: fx.Node, value):
        """Feedback for ``src`` in ``src``'s dtype (:func:`promoted_operand_dtype`)."""
        dtype = promoted_operand_dtype(src, node)
        return value if dtype is None else self.tracer.create_proxy("call_function", cast_feedback, (value, dtype), {})

    def _parameter_path_grad(self, node, arg: str):
        """The error at argument ``arg`` of ``node`` when the rule only maps into activations and
        ``arg`` is computed from parameters (``F.linear(x, self.w.t())``): the op's vjp with respect
        to that argument, one graph node."""
        ctx = ProxyContext(node, self)
        g = self.incoming(node)
        self._label(node, self.rules[node], "param_grad")
        return _checked(self.rules[node], node,
                        lambda: ctx.call(param_vjp, ctx.op_call.spec.name, ctx.forward_args(), (arg,), g)[0],
                        "parameter-path vjp")

    def _param_grads(self, node, ctx, g) -> None:
        call = info(node).call
        self._label(node, self.rules[node], "param_grad")
        grads = _checked(self.rules[node], node, lambda: call.spec.param_grads(ctx, g), "weight-gradient formula")
        for role, qualname in call.params.items():
            if grads.get(role) is not None:
                self.param_parts[qualname].append(grads[role])

    # -- accumulation (the fan-out sums of :class:`~fbcompile.passes.walk.FanIn`) -----------------
    def external(self, node: fx.Node):
        """The feedback at ``node`` from consumers outside its unit (and the model output): what a
        unit output's local loss is given. Feedback from consumers inside the unit already reaches
        the unit's parameters through the unit's own backward; counting it at the output as well
        would give those paths twice (a unit output that another member of its unit also reads, as
        in a dense block's cat). For a value outside every unit (a model input) it is the total."""
        unit = self.partition.unit_of.get(node)
        if info(node).is_tuple:
            parts = [self._external_sum(node, i, unit) for i in range(len(info(node).shape))]
            return parts if any(p is not None for p in parts) else None
        return self._external_sum(node, None, unit)

    def _external_sum(self, node, index, unit):
        origins = self.fanin.origins.get((node, index), [])
        inside = [o is not None and self.partition.unit_of.get(o) is unit for o in origins]
        if unit is None or not any(inside):
            total = self.incoming(node)
            return total[index] if index is not None and total is not None else total
        parts = [v for v, internal in zip(self.fanin.parts[(node, index)], inside) if not internal]
        self._label(node, None, "fanout")
        return self._sum(parts, f"{node.name}{'' if index is None else f'_{index}'}_external")

    def incoming(self, node: fx.Node):
        """The summed feedback arriving at ``node`` (a list for tuple-valued nodes), or None."""
        return self.fanin.incoming(node)

    def _sum(self, parts: list, name: str):
        """One graph node per addition, all named ``name`` (fx numbers repeats)."""
        return left_sum(parts, lambda total, part: self.tracer.create_proxy(
            "call_function", operator.add, (total, part), {}, name=name))

    def _label(self, node, rule, role) -> None:
        self.tracer.prefix = node.name if node is not None else "fb"
        self.tracer.label = {"source": node.name if node is not None else None,
                             "rule": rule.name if rule is not None else None, "role": role}
        if node is not None:
            self.emitted.setdefault(node.name, [])
        self.tracer.created = self.emitted[node.name] if node is not None else []


def _unwrap(value):
    if isinstance(value, Proxy):
        return value.node
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


def _zip_map(fn, a, b):
    if isinstance(a, list):
        return [None if x is None or y is None else fn(x, y) for x, y in zip(a, b)]
    return fn(a, b)


def _checked(rule, node, emit, what: str = "rule"):
    """Run ``emit`` (a rule on proxies); an unexpected failure becomes a RuleError naming the node."""
    try:
        return emit()
    except FBCompileError:
        raise
    except Exception as exc:
        raise RuleError(f"{what} of {rule.name} failed on {describe(node)}: {type(exc).__name__}: {exc}") from exc


def emit_feedback(gm: fx.GraphModule, rules: dict, partition, mode: str) -> FeedbackGraph:
    if mode not in MODES + tuple(CUT_MODES) + (UNIT_DIFFERENCE,):
        raise RuleError(f"unknown feedback mode {mode!r}; modes: {', '.join(MODES + tuple(CUT_MODES) + (UNIT_DIFFERENCE,))}")
    return FeedbackBuilder(gm, rules, partition, mode).build()


def promoted_operand_dtype(src: fx.Node, node: fx.Node):
    """The dtype that feedback for operand ``src`` of ``node`` must be cast to, or None when the traced
    dtypes agree. An op that promotes its operands (a float32 score plus a float64 mask is float64)
    hands each operand feedback in the result's dtype; autograd's engine casts every gradient to its
    input's dtype, and so do the feedback graphs (one cast, only where the dtypes differ)."""
    want, have = info(src).dtype, info(node).dtype
    if info(src).is_tuple or info(node).is_tuple or want is None or have is None or want == have:
        return None
    return want


def cast_feedback(value, dtype):
    """``value`` in ``dtype`` (feedback for an operand its op promoted; a real one keeps the real part)."""
    return (value.real if value.is_complex() and not dtype.is_complex else value).to(dtype)
