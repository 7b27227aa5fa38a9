"""Attach a Mono-Forward class head to every trainable unit (paper 004, sections 2.1 and 4.4).

For unit l with head activation a_l (the *attachment point*), the head gives class scores

    G_l = z_l M_l,   M_l in R^{n x m} trainable (m classes),

where z_l depends on the shape of a_l (batch dim first):

- flat ``(B, n)``: z_l = a_l;
- spatial ``(B, C, *S)`` (conv): each channel c is projected by a fixed random A_c in R^{d x HW}
  (HW = prod(S)) with entries N(0, 1/HW), z_l = concat_c(A_c u_c) in R^{C d}. The variance 1/HW keeps
  Var(z_i) = E[u_j^2] independent of the resolution (paper 004, App. B). Channels with HW <= d are
  flattened instead (a projection could only lift them into a rank-HW subspace of R^d);
- a value that folds the batch into dim 0 with tokens or windows, (B*k, *rest) with sample b in rows
  [b*k, (b+1)*k) (verified by running the model, :mod:`.batch_layout`), is read per sample as
  (B, k, *rest): flat when rest is small, else each of its k rows projected as a channel;
- ``output_head="model"``: a unit returning the model's output of shape (B, classes) is scored by
  that output itself (no M): the model's own classifier is its head. An output of shape
  (B, ..., classes), class scores per position (per-token logits), is refused: every head
  classifies whole samples.

Attachment (``attach``): ``"pre_pool"`` (default, the paper's choice: after the activation, before
pooling; the spatial sizes of its Table 4 are the pre-pool ones) walks back from the unit's output
over trailing pooling and reshaping ops to the input of the earliest pooling op (before the pad of a
"same" pooling, whose -inf border no head can read); ``"output"`` uses
the unit output (the last one in graph order when there are several). The walk also passes trailing
dropout (``conv -> relu -> pool -> flatten -> dropout`` attaches at the relu, as without dropout).
Shapes come from the traced graph; heads, projections and their seeds are separate per unit.

Initialisation of M (``init``): ``"paper"`` reproduces the reference code (``kaiming_uniform_(a=
sqrt(5))`` on its layouts): U(+-1/sqrt(n)) for flat heads, U(+-1/sqrt(m)) for projected ones;
``"uniform"``: U(+-1/sqrt(n)) always; ``"zeros"``.

:func:`attach_heads`, a function of the traced graph, its units, their forwards and the parameters
(never of the compiled program or the runtime), returns :class:`Heads` (an ``nn.Module``: M as
parameters, A as buffers, so its state_dict holds both) and one :class:`HeadStage` per unit: the
unit's own forward returning ``(*unit outputs, a_l)`` and a ``probe`` returning only a_l (dead code
after the attachment point, e.g. the pooling, removed) for re-evaluating the local loss with
perturbed parameters.
"""
from __future__ import annotations

import math

import torch
from torch import fx, nn

from ..errors import FBCompileError, OptionError, choices_text
from ..trace import active_outputs, info
from .batch_layout import batch_axes, gather_samples, per_sample_shape
from .forward import build_unit_forwards

ATTACH_POINTS = ("pre_pool", "output")
HEAD_INITS = ("paper", "uniform", "zeros")
OUTPUT_HEADS = ("model", "linear")
POOLING = frozenset({"max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
                     "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                     "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"})
RESHAPING = frozenset({"view", "flatten", "unflatten", "squeeze", "unsqueeze", "identity"})
DROPOUT = frozenset({"dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
                     "feature_alpha_dropout"})
WALKED_OVER = POOLING | RESHAPING | DROPOUT


class Head(nn.Module):
    """The class head of one unit: ``scores(features(a))``. ``weight`` (M, trainable) is None for a
    unit scored by the model's own output; ``projection`` (A, a fixed buffer) is None for flat heads."""

    def __init__(self, unit, node: fx.Node, shape: tuple, weight, projection, batch_axis=0):
        super().__init__()
        self.unit, self.node, self.shape, self.batch_axis = unit, node, tuple(shape), batch_axis
        self.weight = weight
        self.register_buffer("projection", projection)

    @property
    def index(self) -> int:
        return self.unit.index

    def features(self, a: torch.Tensor) -> torch.Tensor:
        """z: (B, n). Spatial values are projected per channel: z[b, c*d + i] = sum_s A[c, i, s] u[b, c, s]
        (``a`` gathered into (B, *shape) first when its samples run along another axis or are folded
        into dim 0 with tokens or windows: a (B*k, *rest) value becomes (B, k, *rest))."""
        axis, fold = self.batch_axis[:2] if isinstance(self.batch_axis, tuple) else (self.batch_axis, 1)
        a = gather_samples(a, self.batch_axis) if a.dim() > axis and a.shape[axis] % fold == 0 else a
        if tuple(a.shape[1:]) != self.shape:
            raise FBCompileError(f"the head of unit {self.index} ({self.node.name!r}) was built for values of "
                                 f"shape (batch, {', '.join(map(str, self.shape))}) from the traced example, got "
                                 f"{tuple(a.shape)}; compile the model with an example of the shape you train on")
        if self.projection is None:
            return a.reshape(a.shape[0], -1)
        u = a.reshape(a.shape[0], self.shape[0], -1)
        return torch.einsum("bcs,cds->bcd", u, self.projection).reshape(a.shape[0], -1)

    def scores(self, z: torch.Tensor) -> torch.Tensor:
        return z if self.weight is None else z @ self.weight

    def extra_repr(self) -> str:
        kind = "scored by the model output" if self.weight is None else f"M {tuple(self.weight.shape)}"
        proj = "" if self.projection is None else f", A {tuple(self.projection.shape)}"
        return f"unit {self.index} at {self.node.name!r}: {kind}{proj}"


class Heads(nn.Module):
    """All heads of a program, in unit order (iterate over it). ``state_dict()`` holds every M
    (``units.<unit>.weight``) and A (``units.<unit>.projection``); ``parameters()`` are the M."""

    def __init__(self, heads: list):
        super().__init__()
        self.units = nn.ModuleDict({str(head.index): head for head in heads})

    def __iter__(self):
        return iter(self.units.values())

    def __len__(self):
        return len(self.units)


class HeadStage:
    """A unit's forward with its head: ``module(*inputs) -> (*outputs, a)``, ``probe(*inputs) -> a``.
    ``head`` is None for units without trainable parameters (they only run)."""

    def __init__(self, stage, module, probe, head):
        self.unit, self.inputs, self.outputs = stage.unit, stage.inputs, stage.outputs
        self.module, self.probe, self.head = module, probe, head

    def __repr__(self):
        return f"HeadStage({self.unit.index}: {[n.name for n in self.inputs]} -> {[n.name for n in self.outputs]}, " \
               f"{self.head})"


def attach_heads(traced: fx.GraphModule, partition, stages: list, params: dict, classes: int, *, d: int = 16,
                 attach: str = "pre_pool", init: str = "paper", output_head: str = "model",
                 seed: int = 0) -> tuple[Heads, list]:
    """Heads for every unit of ``partition`` with trainable parameters and the :class:`HeadStage` of
    every unit. ``stages``: the units' own forwards (:func:`~fbcompile.passes.forward.build_unit_forwards`
    of ``traced`` without taps), run as they are by units without a head; ``params``: qualified
    name -> parameter (``requires_grad`` says which units train; the first one's device is the
    heads')."""
    _check(classes, d, attach, init, output_head)
    if output_head == "model":
        _refuse_per_position_scores(traced, classes)
    device = next((p.device for p in params.values()), torch.device("cpu"))
    trained = {u.index for u in partition.units if any(params[p].requires_grad for p in u.params)}
    model_outputs = {n for n in active_outputs(traced) if _shape(n) is not None and _shape(n)[1:] == (classes,)}
    attached = {}                     # unit index -> (attachment node, scored by its own model output)
    for unit in partition.units:
        if unit.index in trained:
            own = [n for n in unit.outputs if n in model_outputs] if output_head == "model" else []
            attached[unit.index] = (own[-1], True) if own else (attachment_node(unit, attach), False)
    axes = batch_axes(traced, [node for node, _ in attached.values()], "Mono-Forward's heads")
    tapped = build_unit_forwards(traced, partition,
                                 {index: [(node.name, None)] for index, (node, _) in attached.items()})
    heads, head_stages = [], []
    for stage, with_attachment in zip(stages, tapped):
        unit = stage.unit
        if unit.index not in attached:
            head_stages.append(HeadStage(stage, stage.module, None, None))
            continue
        node, own = attached[unit.index]
        head = _make_head(unit, node, axes[node], None if own else classes, d, init, seed, device)
        module, probe = _head_modules(with_attachment)
        heads.append(head)
        head_stages.append(HeadStage(stage, module, probe, head))
    if not heads:
        raise FBCompileError("Mono-Forward needs at least one unit with trainable parameters; this model has none")
    return Heads(heads), head_stages


def _refuse_per_position_scores(traced: fx.GraphModule, classes: int) -> None:
    """A model output (B, ..., classes) with dims besides the batch and the classes holds class
    scores per position (a language model's per-token logits): as its own head (``output_head=
    "model"``) it would classify positions, while every head classifies whole samples (one target
    per sample, paper 004). Refused, naming the shape."""
    for node in active_outputs(traced):
        shape = _shape(node)
        if shape is not None and len(shape) > 2 and shape[-1] == classes:
            raise FBCompileError(
                f"Mono-Forward's heads classify whole samples (one target per sample: shape (batch,) or (batch, "
                f"classes)), but the model output {node.name!r} has shape {shape}: class scores per position "
                f"(classes={classes} with {len(shape) - 2} dim(s) besides the batch), as a language model's "
                "per-token logits. Reduce the output to (batch, classes) (e.g. pool over the positions) or train "
                "with another learner (bp, fa, dfa, drtp, dtp); if the output holds features for a head to "
                "classify whole samples, pass output_head='linear'")


def attachment_node(unit, attach: str) -> fx.Node:
    """The value a unit's head reads (see the module docstring)."""
    order = {n: i for i, n in enumerate(unit.nodes)}
    node = max(unit.outputs, key=lambda n: order.get(n, -1))
    if attach == "output":
        return node
    found, members = None, set(unit.nodes)
    while node in members and info(node).call is not None and info(node).call.spec.name in WALKED_OVER:
        sources = [src for _, _, src in info(node).call.active]
        if len(sources) != 1:
            break
        if info(node).call.spec.name in POOLING:
            found = _before_padding(sources[0], members)
        node = sources[0]
    return found if found is not None else max(unit.outputs, key=lambda n: order.get(n, -1))


def _before_padding(node: fx.Node, members: set) -> fx.Node:
    """A pooling's input, or the input of the pad that makes it (timm's "same" max pooling pads
    with -inf, which no head can read): the activation before padding."""
    call = info(node).call if node in members else None
    if call is None or call.spec.name != "pad":
        return node
    sources = [src for _, _, src in call.active]
    return sources[0] if len(sources) == 1 else node


def _shape(node: fx.Node):
    shape = info(node).shape
    return tuple(shape) if shape is not None and not info(node).is_tuple else None


def _make_head(unit, node, batch_axis, classes, d, init, seed, device) -> Head:
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        raise FBCompileError(f"unit {unit.index}: the head attachment {node.format_node()} is not a tensor with a "
                             f"batch dimension (shape {info(node).shape}); choose another attach point")
    rest, dtype = per_sample_shape(shape, batch_axis), info(node).dtype
    if classes is None:
        return Head(unit, node, rest, None, None, batch_axis)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + unit.index)
    projection, spatial = None, math.prod(rest[1:]) if len(rest) > 1 else 1
    if len(rest) > 1 and spatial > d:
        projection = torch.randn(rest[0], d, spatial, device="cpu", generator=generator, dtype=dtype) / math.sqrt(spatial)
        features = rest[0] * d
    else:
        features = math.prod(rest)
    if init == "zeros":
        weight = torch.zeros(features, classes, dtype=dtype)
    else:
        bound = 1.0 / math.sqrt(classes if (init == "paper" and projection is not None) else features)
        weight = (torch.rand(features, classes, device="cpu", generator=generator, dtype=dtype) * 2 - 1) * bound
    projection = projection.to(device) if projection is not None else None
    return Head(unit, node, rest, nn.Parameter(weight.to(device)), projection, batch_axis)


def _head_modules(stage) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(unit outputs + attachment value, attachment value only) as GraphModules over the unit's inputs,
    from the unit's forward that returns ``(outputs, (attachment value,))`` (its one tap). The value
    is found by the traced node, never by the name of a generated node: a module attribute fetched for
    a tapped op (Dropout's ``training`` flag) can take the name the op's traced node had."""
    made = []
    for with_outputs in (True, False):
        graph = fx.Graph()
        outputs, (attachment,) = graph.graph_copy(stage.module.graph, {})
        graph.output((*outputs, attachment) if with_outputs else attachment)
        module = fx.GraphModule(stage.module, graph, class_name=f"Unit{stage.unit.index}Head")
        module.graph.eliminate_dead_code()
        module.recompile()
        made.append(module)
    return made[0], made[1]


def _check(classes, d, attach, init, output_head) -> None:
    for name, value in (("classes", classes), ("d", d)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise OptionError(f"heads: {name}={value!r} must be an int >= 1")
    for name, value, valid in (("attach", attach, ATTACH_POINTS), ("head_init", init, HEAD_INITS),
                               ("output_head", output_head, OUTPUT_HEADS)):
        if value not in valid:
            raise OptionError(f"heads: {name}={value!r} must be {choices_text(valid)}")
