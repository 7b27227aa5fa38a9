"""The functions verification differentiates: for a node or a unit, the forward map F of its inputs
and the feedback map G (the rules' error maps), both at the forward operating point.

:func:`forward_values` runs the traced model eagerly and records every value (and every extra a
tapped op saves), keyed like rules' saved values (:func:`fbcompile.context.tap_name`). A
:class:`Problem` then packages F and G for one node or unit, over the whole batch or over one sample
(``sample=b``) when the computation is batch-local: the Jacobian over a batch of independent
samples is block diagonal, so its Frobenius norms add up over per-sample blocks.

Values of any structure. A Problem's inputs and outputs are flat lists of floating tensors: a tuple
value (``h.unbind(1)`` read whole by ``torch.stack``, a slice ``parts[1:]`` of a tuple) contributes
its floating elements in order; its None elements and integer pieces (``max(dim)``'s indices) carry
no derivative and are held at their forward values (:func:`pieces`, :func:`rebuild`). Integer
model inputs (token ids) are never active, so they are constants of every Problem.

Two paths per node (:func:`node_paths`):

- ``"activation"``: F maps the node's arguments that depend on a model input (its activations) to
  its output; the arguments computed from parameters only are held at their forward values. This
  is the map the JML conditions are about: target modes send targets through it.
- ``"parameter"``: error mode sends feedback from the node into parameters (a class token
  ``self.cls.expand(b, -1, -1)``, a weight ``self.w.t()``, an embedding of token ids): F maps the
  node's arguments computed from parameters only and, when no argument is an activation, the
  parameters it reads, to its output (a Linear's weight gradient is not part of it: its
  activation input makes it an activation node); G is what error mode computes there: the
  rule's error map for those arguments (the op's vjp where the rule has none, as the compiler
  emits it) and the op's weight-gradient formula ``param_grads`` for the parameters. Those are
  gradients whatever the program's condition, so they are held to J_G = J_F^T, with J_F^T taken
  from the vjp of F only (``Problem.vjp_only``): the reference is autograd's gradient, which for
  ``nn.Embedding(padding_idx=p)`` leaves row p out although the forward reads it, so forward-mode
  columns of J_F would disagree with it there. The autograd
  fallbacks (:func:`fbcompile.ops.param_vjp`, ``autograd_param_grads``) are evaluated with
  ``torch.func.vjp`` of the same ``apply``: identical math, and ``torch.autograd.grad`` cannot run
  inside verification's functorch transforms.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx
from torch.func import jvp, vjp

from ..context import EagerContext
from ..errors import FBCompileError
from ..ops import autograd_param_grads, substituted
from ..passes.walk import FanIn, left_sum, walk_back
from ..passes.feedback import cast_feedback, promoted_operand_dtype
from ..trace import describe, info, preserved_state

ACTIVATION, PARAMETER = "activation", "parameter"


def forward_values(program, inputs: tuple) -> dict:
    """Every forward value by key ``(node name, None)`` and every extra by ``(node name, extra)``."""
    values = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            call = info(node).call
            if call is not None and (call.inplace or call.spec.tapped is not None):
                args = EagerContext(node, values, program.model).forward_args()
                if call.spec.tapped is not None:
                    result = call.spec.run(call.spec.tapped, args)
                    value = result[0]
                    for extra, item in zip(call.spec.extras, result[1:]):
                        values[(node.name, extra)] = item
                else:
                    value = call.spec.run(call.spec.apply, args)
            else:
                value = super().run_node(node)
            values[(node.name, None)] = value
            return value

    with preserved_state(program.model), torch.no_grad():
        Recorder(program.traced).run(*inputs)
    return values


class SampleValues(Mapping):
    """``values`` with the batch-carrying entries cut to sample ``b`` (kept as a batch of one)."""

    def __init__(self, values: dict, batch_keys: set, b: int):
        self.values, self.batch_keys, self.b = values, batch_keys, b

    def __getitem__(self, key):
        value = self.values[key]
        if key not in self.batch_keys:
            return value
        if isinstance(value, (tuple, list)):       # split / chunk outputs: cut every piece
            return type(value)(v[self.b:self.b + 1] if isinstance(v, torch.Tensor) else v for v in value)
        return value[self.b:self.b + 1] if isinstance(value, torch.Tensor) else value

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


@dataclass
class Problem:
    """F: inputs -> outputs and G: output feedback -> input feedback, over flat lists of tensors."""
    label: str
    inputs: list            # input tensors (the operating point)
    output_shapes: list
    forward: object         # f(*inputs) -> tuple of outputs
    feedback: object        # g(*output_feedback) -> tuple of input feedback (zeros where none)
    vjp_only: bool = False  # J_F^T from vjp of F only (autograd's convention), never from jvp columns
    complex_outputs: tuple = ()     # per output: complex (measured in real coordinates, see below)

    def __post_init__(self):    # a copy (expand) may alias its elements: forward AD cannot take it as a primal
        self.inputs = [x if x.is_contiguous() else x.contiguous() for x in self.inputs]
        if any(self.complex_outputs) or any(x.is_complex() for x in self.inputs):
            self._in_real_coordinates()

    def _in_real_coordinates(self) -> None:
        """Complex inputs and outputs as their real pairs (``view_as_real``): z = a + ib is (a, b), and
        its feedback in autograd's convention dL/da + i dL/db is (dL/da, dL/db), so J_F and J_G are
        the real Jacobians of F and G over those coordinates and every metric measures them."""
        complex_in = [x.is_complex() for x in self.inputs]
        complex_out = list(self.complex_outputs) or [False] * len(self.output_shapes)
        forward, feedback = self.forward, self.feedback
        self.inputs = list(_as_real(self.inputs, complex_in))
        self.output_shapes = [tuple(s) + (2,) if c else s for s, c in zip(self.output_shapes, complex_out)]
        self.forward = lambda *xs: _as_real(forward(*_as_complex(xs, complex_in)), complex_out)
        self.feedback = lambda *gs: _as_real(feedback(*_as_complex(gs, complex_out)), complex_in)

    @functools.cached_property
    def reverse_only(self) -> bool:
        """Whether J_F must come from the vjp of F: ``vjp_only``, or F calls an op torch has no
        forward-mode derivative for (cdist, grid_sample), found by one jvp at a zero tangent."""
        if self.vjp_only:
            return True
        try:
            jvp(self.forward, tuple(self.inputs), tuple(torch.zeros_like(x) for x in self.inputs))
        except NotImplementedError as exc:
            if "forward AD" not in str(exc):
                raise
            return True
        return False

    @property
    def n_in(self):
        return sum(x.numel() for x in self.inputs)

    @property
    def n_out(self):
        return sum(math.prod(s) for s in self.output_shapes)


def _as_real(values, flags) -> tuple:
    """Each value whose flag is set as its real pair (a real one with imaginary part zero)."""
    return tuple(torch.view_as_real(v.resolve_conj() if v.is_complex() else torch.complex(v, torch.zeros_like(v)))
                 if flag else v for v, flag in zip(values, flags))


def _as_complex(values, flags) -> tuple:
    return tuple(torch.view_as_complex(v.contiguous()) if flag else v for v, flag in zip(values, flags))


# -- values of any structure ------------------------------------------------------------------
def _floating(value) -> bool:
    return isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())


def pieces(value) -> list:
    """The tensors ``value`` carries derivatives in, in order: itself, or a tuple's floating elements."""
    return [v for v in (value if isinstance(value, (tuple, list)) else (value,)) if _floating(v)]


def rebuild(value, given):
    """``value`` with its :func:`pieces` taken, in order, from the iterator ``given``."""
    if isinstance(value, (tuple, list)):
        return type(value)(next(given) if _floating(v) else v for v in value)
    return next(given) if _floating(value) else value


def output_feedback(value, given) -> object:
    """Feedback for forward value ``value`` from the iterator ``given`` (one tensor per piece), in the
    form rules take: a tensor, or a list with None at a tuple's None elements and integer pieces."""
    if isinstance(value, (tuple, list)):
        return [next(given) if _floating(v) else None for v in value]
    return next(given)


def feedback_pieces(value, feedback) -> list:
    """``feedback`` for ``value`` (a tensor, or one entry per tuple element, None where none came) as
    tensors matching :func:`pieces` of ``value``, zeros where no feedback arrived."""
    if isinstance(value, (tuple, list)):
        parts = feedback if feedback is not None else [None] * len(value)
        return [torch.zeros_like(v) if f is None else f for v, f in zip(value, parts) if _floating(v)]
    return [torch.zeros_like(value) if feedback is None else feedback] if _floating(value) else []


# -- one node ------------------------------------------------------------------------------------
def node_paths(node: fx.Node) -> list:
    """The paths of ``node`` that verification measures: "activation" when an argument depends on a
    model input, "parameter" when error mode sends feedback from it into parameters: through an
    argument computed from parameters only, or straight into the parameters it reads when no
    argument is an activation (a class token's expand, an embedding of token ids, ``self.w.t()``)."""
    active, params = _sources(node, ACTIVATION), _sources(node, PARAMETER)
    paths = ([ACTIVATION] if active[0] else []) + ([PARAMETER] if params[0] or params[1] else [])
    if not paths:
        raise FBCompileError(f"verify: node {describe(node)} has a rule but no argument or parameter "
                             "that feedback could reach")
    return paths


def _sources(node: fx.Node, path: str) -> tuple[list, list]:
    """(active arguments, parameter roles) that are the inputs of ``node``'s ``path``."""
    call = info(node).call
    activations = [a for a in call.active if info(a[2]).from_input]
    if path == ACTIVATION:
        return activations, []
    return [a for a in call.active if info(a[2]).param_only], ([] if activations else list(call.params))


def _replay(call, node_name, values, args):
    spec = call.spec
    if spec.replay is not None:
        extras = {e: values[(node_name, e)] for e in spec.extras}
        positional, keywords = spec.split(args)
        return spec.replay(extras, *positional, **keywords)
    return spec.run(spec.apply, args)


def _with_inputs(args: dict, active: list, xs) -> dict:
    return substituted(args, [(arg, index) for arg, index, _ in active], xs)


def apply_vjp(call, args: dict, roles, g) -> tuple:
    """<apply(args), g> differentiated with respect to the arguments ``roles``, by ``torch.func``
    (the math of :func:`fbcompile.ops.param_vjp`, usable inside functorch transforms)."""
    spec = call.spec
    _, pullback = vjp(lambda *xs: spec.run(spec.apply, {**args, **dict(zip(roles, xs))}),
                      *[args[r] for r in roles])
    return pullback(g)


def _param_grads(call, ctx, args, g) -> dict:
    if call.spec.param_grads is autograd_param_grads:
        roles = tuple(call.params)
        return dict(zip(roles, apply_vjp(call, args, roles, g)))
    return call.spec.param_grads(ctx, g)


def node_problem(program, node: fx.Node, values: dict, sample: int | None = None,
                 path: str = ACTIVATION) -> Problem:
    """F and G of ``node``'s ``path`` (see the module docstring) at the forward values."""
    call, rule = info(node).call, program.rules[node]
    if sample is not None:
        keys = {(n.name, None) for _, _, n in call.active if info(n).from_input} | {(node.name, None)}
        keys |= {(node.name, e) for e in call.spec.extras}
        values = SampleValues(values, keys, sample)
    ctx = EagerContext(node, values, program.model)
    args = ctx.forward_args()
    active, roles = _sources(node, path)
    given = [values[(src.name, None)] for _, _, src in active] + [args[r] for r in roles]
    output = values[(node.name, None)]

    def forward(*flat):
        new = iter(flat)
        new = [rebuild(v, new) for v in given]
        replaced = {**_with_inputs(args, active, new[:len(active)]), **dict(zip(roles, new[len(active):]))}
        return tuple(pieces(_replay(call, node.name, values, replaced)))

    def feedback(*gs):
        g = output_feedback(output, iter(gs))
        fb = rule.error(ctx, g)
        out = []
        for (arg, index, src), value in zip(active, given):
            part = fb.get(arg)
            if arg not in fb and info(src).param_only:    # as the compiler's parameter-path vjp
                part = apply_vjp(call, args, (arg,), g)[0]
            out += feedback_pieces(value, part[index] if index is not None and part is not None else part)
        grads = _param_grads(call, ctx, args, g) if roles else {}
        for role, value in zip(roles, given[len(active):]):
            out += feedback_pieces(value, grads.get(role))
        return tuple(out)

    suffix = "" if path == ACTIVATION else f" ({path} path)"
    return Problem(node.name + suffix, [p for v in given for p in pieces(v)],
                   [tuple(p.shape) for p in pieces(output)], forward, feedback, vjp_only=path == PARAMETER,
                   complex_outputs=tuple(p.is_complex() for p in pieces(output)))


# -- one unit ------------------------------------------------------------------------------------
def _select(value, index):
    return tuple(value[i] for i in index) if isinstance(index, tuple) else value[index]


def unit_problem(program, unit, values: dict, sample: int | None = None) -> Problem:
    """F and G of a whole unit: from its inputs to its outputs, through every node of the unit.
    Parameter-path values the unit reads are held at their forward values."""
    members = set(unit.nodes)
    if sample is not None:
        keys = {(n.name, None) for n in list(unit.nodes) + list(unit.inputs)}
        keys |= {(src.name, None) for n in unit.nodes if info(n).role == "op" for _, _, src in info(n).call.active}
        keys |= {(n.name, e) for n in unit.nodes if info(n).role == "op" for e in info(n).call.spec.extras}
        values = SampleValues(values, keys, sample)
    given = [values[(n.name, None)] for n in unit.inputs]
    outputs = [values[(o.name, None)] for o in unit.outputs]

    def forward(*flat):
        new = iter(flat)
        env = {n: rebuild(v, new) for n, v in zip(unit.inputs, given)}
        for node in unit.nodes:
            record = info(node)
            if record.role == "select":
                env[node] = _select(env[node.args[0]], record.select_index)
                continue
            ctx = EagerContext(node, values, program.model)
            active_values = [env.get(src, values[(src.name, None)]) for _, _, src in record.call.active]
            env[node] = _replay(record.call, node.name, values,
                                _with_inputs(ctx.forward_args(), record.call.active, active_values))
        return tuple(p for o in unit.outputs for p in pieces(env[o]))

    def feedback(*gs):
        """The unit's error maps chained by the shared reverse walk (:mod:`fbcompile.passes.walk`),
        as the emitted feedback graph chains them: fan-out sums in the same order."""
        fanin = FanIn(lambda parts, _name: left_sum(parts, operator.add))
        new = iter(gs)
        for o, value in zip(unit.outputs, outputs):
            fanin.add(o, output_feedback(value, new))

        def visit(node):
            incoming = fanin.incoming(node)
            if incoming is None:
                return
            fb = program.rules[node].error(EagerContext(node, values, program.model), incoming)
            for arg, index, src in info(node).call.active:
                part = fb.get(arg)
                if (src in members or src in unit.inputs) and part is not None:
                    part = part[index] if index is not None else part
                    dtype = promoted_operand_dtype(src, node)
                    fanin.add(src, part if dtype is None else cast_feedback(part, dtype), origin=node)

        walk_back(unit.nodes, fanin, visit)
        return tuple(p for n, v in zip(unit.inputs, given) for p in feedback_pieces(v, fanin.incoming(n)))

    shapes = [tuple(p.shape) for value in outputs for p in pieces(value)]
    return Problem(f"unit {unit.index} ({unit.name})", [p for v in given for p in pieces(v)], shapes,
                   forward, feedback, complex_outputs=tuple(p.is_complex() for value in outputs for p in pieces(value)))


def _leading(shape) -> list:
    """The tensor shapes of a value: its shape, or each tensor element's of a tuple (None skipped)."""
    if shape and isinstance(shape[0], tuple) or (shape and shape[0] is None):
        return [s for s in shape if s is not None]
    return [shape]


def batch_local(program, node: fx.Node, batch: int) -> bool:
    """Whether ``node`` maps each sample independently, so its Jacobian is block diagonal over the
    batch: every active input and every output (each tensor of a tuple) has the batch as its
    leading dim, no other graph tensor it reads does (a per-sample constant could not be cut), and
    the op does not declare that this call mixes samples (``batch_local(ctx)`` of
    :func:`declare_op`: reductions, concatenation or transposition over dim 0, BatchNorm with batch
    statistics). Anything else is measured over the whole batch, which is always correct."""
    record = info(node)
    shapes = [s for _, _, src in record.call.active for s in _leading(info(src).shape)]
    shapes += _leading(record.shape)
    if any(not s or s[0] != batch for s in shapes):
        return False
    if batch == 1:
        return True
    active = {id(src) for _, _, src in record.call.active}
    for value in record.call.args.values():
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(item, fx.Node) and id(item) not in active and record.shape and not record.is_tuple:
                shape = info(item).shape
                if shape and not isinstance(shape[0], tuple) and len(shape) == len(record.shape) and shape[0] == batch:
                    return False
    local = record.call.spec.batch_local
    return True if local is None else bool(local(EagerContext(node, {}, program.model)))
