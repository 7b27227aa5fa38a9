"""Direct projections: a pass that gives every hidden unit a fixed random path from the output side.

Direct feedback methods (DFA, sDFA, DRTP, DDTP) skip the layer-wise feedback chain: each hidden unit
``u`` receives an output-side signal s (per sample a vector of the output signal dimension C: the
error e, its sign, the one-hot target y*) through its own matrix B_u, mapped onto the unit's *full*
output shape S_u (features for a Linear unit, channels x height x width after pooling for a conv
unit)::

    delta_u = reshape(s @ B_u, (N, *S_u)),     B_u in R^{C x prod(S_u)}, stored as (C, *S_u)

and learns from delta_u through its own local backward (the unit's input is detached, so no error
ever flows through another unit). The unit's activation derivatives enter through that local
backward: for Linear+f, dW_u = [delta_u * f'(a_u)]^T h_in.

Which units get what (:func:`plan_direct`, a function of the traced graph, its units and which
parameters train; like every function here it never reads the compiled program or the runtime):

- *output units* (a unit producing a model output) learn from the loss's own local gradient;
- *hidden units* (every other unit with parameters that require grad) get one projection per
  unit output value (a unit feeding a skip connection and the next layer has one output, a unit
  whose values leave it twice has two);
- parameter-free units (a leading Flatten) get nothing.

A parameter used by several units (a module called twice, tied weights) is listed under each of
them (``DirectPlan.params``, :attr:`DirectPlan.shared`); its update is the sum of the units' local
gradients, each through its own unit only: with L_u the local loss of unit u (whose input is
detached), dtheta = sum over the units u using theta of dL_u/dtheta, exactly as the units' own
parameters get dL_u/dtheta (see :mod:`fbcompile.runtime.direct`).

S_u is the value's *per-sample* shape (:mod:`.batch_layout`). Where the model folds the batch into
dim 0 together with tokens or windows (a value of shape (N*k, *rest) whose sample i is exactly rows
[i*k, (i+1)*k), verified by running the model), S_u = (k, *rest): B_u is (C, k, *rest) and the
delta s B_u of shape (N, k, *rest) is reshaped to (N*k, *rest), so row i*k + j carries sample i's
signal to its j-th token or window. Folds in another order are refused.

Initialisation of B (:func:`draw_projection`), with n chosen by ``fan``:

- ``"he_uniform"`` (default): U(-sqrt(6/n), sqrt(6/n));
- ``"xavier_uniform"``: U(-sqrt(6/(C + F)), sqrt(6/(C + F))), F = prod(S_u) (``fan`` unused);
- ``"uniform"``: U(-scale, scale); ``"normal"``: N(0, scale^2) (``fan`` unused).

``fan="features"`` (default) takes n = F = prod(S_u), the number of values the projection feeds;
it is what paper 001's reference code gets from ``kaiming_uniform_`` on a (C, *S_u) tensor.
``fan="signal"`` takes n = C, the input dimension of the projection. Each matrix comes from its own
generator, seeded from (seed, projection index), so matrices are separate per unit and reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import fx

from ..errors import FBCompileError, OptionError, choices_text
from ..initialisation import draw
from ..trace import active_outputs, describe, info
from .batch_layout import batch_axes, per_sample_shape, place_batch_axis

PROJECTION_INITS = ("he_uniform", "xavier_uniform", "uniform", "normal")
PROJECTION_FANS = ("features", "signal")


@dataclass(frozen=True)
class Projection:
    """One direct projection: output signal (C) -> the value of ``node`` (per-sample shape ``shape``).
    ``batch_axis`` is the value's batch layout (:mod:`.batch_layout`): an axis, whose removal gives
    ``shape``, or a :class:`~.batch_layout.Fold` ``(axis, k, outer)``, whose axis of size k*N becomes k
    in ``shape``."""
    index: int
    unit: int
    node: str
    shape: tuple
    dtype: torch.dtype = torch.float32
    batch_axis: int | tuple = 0

    @property
    def features(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DirectPlan:
    """Where direct signals go in a program (see the module docstring)."""
    signal_dim: int                 # C: flattened per-sample size of all model outputs
    output_units: tuple             # unit indices trained by their local loss gradient
    hidden_units: tuple             # unit indices that receive direct projections
    projections: tuple              # Projection, in unit order
    params: dict                    # unit index -> trainable parameter qualnames

    def of_unit(self, unit: int) -> list:
        return [p for p in self.projections if p.unit == unit]

    @cached_property
    def shared(self) -> dict:
        """{parameter: the trained units using it} for every parameter more than one unit uses
        (computed once: the plan is frozen, and steps ask for it per unit)."""
        users = {}
        for unit, names in self.params.items():
            for name in names:
                users.setdefault(name, []).append(unit)
        return {name: tuple(units) for name, units in users.items() if len(units) > 1}


def plan_direct(traced: fx.GraphModule, partition, params) -> DirectPlan:
    """The direct-projection plan of the model ``traced`` grouped into ``partition``'s units;
    ``params`` maps each parameter's qualified name to the parameter (only ``requires_grad`` is
    read: frozen parameters get no update, and a unit with none trainable gets nothing)."""
    model_outputs = active_outputs(traced)
    outputs = set(model_outputs)
    sizes = []
    for node in model_outputs:
        shape = _per_sample_shape(node)
        sizes.append(math.prod(shape))
    output_units, hidden_units, hidden_outputs, projections, trained = [], [], [], [], {}
    for unit in partition.units:
        trainable = [q for q in unit.params if params[q].requires_grad]
        if not trainable:
            continue
        trained[unit.index] = trainable
        if any(node in outputs for node in unit.nodes):
            output_units.append(unit.index)
            continue
        hidden_units.append(unit.index)
        hidden_outputs += [(unit.index, node) for node in unit.outputs]
    axes = batch_axes(traced, [node for _, node in hidden_outputs], "direct feedback")
    for unit, node in hidden_outputs:
        projections.append(Projection(len(projections), unit, node.name, _per_sample_shape(node, axes[node]),
                                      info(node).dtype or torch.float32, axes[node]))
    if not output_units:
        raise FBCompileError("direct feedback needs a unit with parameters that produces the model output; "
                             "this program's output is computed by parameter-free ops only")
    return DirectPlan(sum(sizes), tuple(output_units), tuple(hidden_units), tuple(projections), trained)


def _per_sample_shape(node, batch_axis=0) -> tuple:
    record = info(node)
    if record.is_tuple or record.shape is None or len(record.shape) < 1:
        raise FBCompileError(f"direct feedback needs a tensor with a batch dimension at {describe(node)}, "
                             f"got shape {record.shape!r}")
    return per_sample_shape(tuple(record.shape), batch_axis)


def check_projection_options(init: str, fan: str) -> None:
    if init not in PROJECTION_INITS:
        raise OptionError(f"projection_init={init!r} is unknown; use {choices_text(PROJECTION_INITS)}")
    if fan not in PROJECTION_FANS:
        raise OptionError(f"projection_fan={fan!r} is unknown; use {choices_text(PROJECTION_FANS)}")


def draw_projection(rows: int, shape: tuple, *, init: str, fan: str, scale: float, generator: torch.Generator,
                    dtype: torch.dtype) -> torch.Tensor:
    """A (rows, *shape) matrix mapping a rows-dim signal onto values of per-sample ``shape``."""
    check_projection_options(init, fan)
    features = math.prod(shape)
    full = (rows, *shape)
    like = torch.empty(0, dtype=dtype)
    if init == "normal":
        return draw(full, "normal", scale, generator, like)
    if init == "he_uniform":
        bound = math.sqrt(6.0 / (features if fan == "features" else rows))
    elif init == "xavier_uniform":
        bound = math.sqrt(6.0 / (features + rows))
    else:
        bound = scale
    return draw(full, "uniform", bound, generator, like)


def projection_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """The generator of projection ``index`` (``stream`` separates several matrix families)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + 7_919 * (index + 1) + 104_729 * stream) % (2 ** 63))


def draw_projections(plan: DirectPlan, *, init: str, fan: str, scale: float, seed: int) -> list:
    """One B_u of shape (C, *S_u) per projection of ``plan`` (in the dtype of the value it feeds),
    each from its own seeded generator."""
    return [draw_projection(plan.signal_dim, p.shape, init=init, fan=fan, scale=scale,
                            generator=projection_generator(seed, p.index), dtype=p.dtype)
            for p in plan.projections]


def project_dense(signal: torch.Tensor, projection: torch.Tensor, batch_axis=0) -> torch.Tensor:
    """delta = reshape(s B, (N, *S)) for a dense signal s (N, C) and B stored as (C, *S), laid out
    like the value it is the delta of (batch layout ``batch_axis``: for a fold ``(0, k)``,
    S = (k, *rest) and the delta is laid out as (N*k, *rest) in the fold's order)."""
    matrix = projection if projection.dim() == 2 else projection.reshape(projection.shape[0], -1)
    dense = signal if signal.dtype == matrix.dtype else signal.to(matrix.dtype)
    delta = dense @ matrix
    delta = delta if projection.dim() == 2 else delta.reshape(signal.shape[0], *projection.shape[1:])
    return place_batch_axis(delta, batch_axis)


def project_labels(labels: torch.Tensor, factor: float, projection: torch.Tensor, batch_axis=0) -> torch.Tensor:
    """delta = factor * (the row of B of each sample's label): s B for s = factor * one-hot(labels),
    as a row selection (exact, and it never multiplies an entry of B by zero)."""
    scaled = projection * factor if factor != 1.0 else projection
    return place_batch_axis(scaled.index_select(0, labels), batch_axis)
