"""The compiled executors of the direct learners (:mod:`.direct`): every update without autograd.

"compiled-stored": one forward under no_grad keeping the taps of the compiled "unit_error" graph,
then every update from one generated graph that makes each delta and pulls it back through its
unit's pruned gradient graph (:func:`~fbcompile.passes.direct_graph.build_direct_gradients`).
"compiled-unlocked": one generated module runs the units' forwards with each hidden unit's update
right after its own forward (:func:`~fbcompile.passes.direct_graph.build_unlocked_step`); the
output units' updates, once e is known, come from the generated graph the stored path uses.
The generated modules are built once per learner and kind of signal (``learner._fused``).
"""
from __future__ import annotations

import torch

from ..passes.boxed import with_boxed_module
from ..passes.direct_graph import build_direct_gradients, build_unlocked_step
from ..program import as_tuple
from .base import Executor
from .direct_signals import Signal
from .losses import output_error


def compiled_stored(learner, inputs, targets, loss_fn):
    """The stored path without autograd: one forward (no graph) keeping the values the compiled
    "unit_error" graph reads, then every update from one generated graph: e for the output units,
    delta_u for the hidden ones, each delta made just before its unit and freed after it, so the
    deltas never all live at once; the taps are handed over, each freed after its last reader."""
    with torch.no_grad():
        output, taps = learner.executable.run_forward(inputs)
    taps = dict(zip(learner.executable.taps, taps))
    loss, errors = output_error(output, targets, loss_fn)
    hidden = learner.hidden_learn and bool(learner.plan.projections)
    signal = learner.signal(errors, output, targets, batch_size(inputs, output)) if hidden else None
    updates = {}
    fused_update(learner, updates, hidden, errors, signal, taps)
    return learner._result(loss, output), updates


def fused_update(learner, updates: dict, hidden: bool, errors: tuple, signal: Signal | None, taps: dict) -> None:
    """Add to ``updates`` what the generated update graph gives: the output units' from
    ``errors`` and, when ``hidden``, the hidden units' from ``signal``; ``taps`` (key -> forward tap)
    is handed over, emptied, to the boxed graph: each tap is freed after its last reader."""
    labels = signal is not None and signal.labels is not None
    key = (hidden, labels)
    if key not in learner._fused:
        learner._fused[key] = with_boxed_module(build_direct_gradients(
            learner.program.unit_gradients(), learner.plan, learner._projection_list(), hidden=hidden, labels=labels))
    fused, args = learner._fused[key], []
    for kind, name in fused.inputs:
        if kind == "tap":
            args.append(taps[name])
        elif kind == "error":
            args.append(errors[name])
        else:                                   # "signal", "labels" or "factor"
            args.append(getattr(signal, "dense" if kind == "signal" else kind))
    taps.clear()
    with torch.no_grad():
        grads = fused.module.forward(args)      # our own module: no hooks to run; empties ``args``
    accumulate(updates, fused.params, grads)


def compiled_unlocked(learner, inputs, targets, loss_fn):
    """The update-unlocked path without autograd: one generated module runs the units' forwards,
    each hidden unit's update right after its own forward, so a unit's activations are freed as
    soon as the next unit has read them. Each hidden update is handed over as it is made
    (:meth:`DirectLearner.unit_done`: data parallel, its all-reduce starts; with in-step updates,
    it is checked or applied and freed). The module returns the taps the output units' update
    needs, which wait for e."""
    signal = learner.signal(None, None, targets, batch_size(inputs, None)) if learner.hidden_learn else None
    labels = signal is not None and signal.labels is not None
    key = ("unlocked", signal is not None, labels)
    if key not in learner._fused:
        learner._fused[key] = build_unlocked_step(learner.program.unit_gradients(), learner.plan,
                                                  learner._projection_list(), learner.order,
                                                  hidden=signal is not None, labels=labels)
    fused = learner._fused[key]
    extra = () if signal is None else (signal.labels, signal.factor) if labels else (signal.dense,)
    updates = {}

    def unit_done(index, names, grads):
        accumulate(updates, names, grads)
        learner.unit_done(index, updates)

    with torch.no_grad():
        outputs, tap_values = fused.module.forward(*inputs, *extra, unit_done)     # our own module: no hooks
    output = outputs[0] if len(outputs) == 1 else outputs
    loss, errors = output_error(output, targets, loss_fn)
    fused_update(learner, updates, False, errors, None, dict(zip(fused.taps, tap_values)))
    return learner._result(loss, output), updates


COMPILED_STORED = Executor("compiled-stored", compiled_stored, autograd=False,
                           doc="one no-grad forward keeping the taps, then one generated update graph")
COMPILED_UNLOCKED = Executor("compiled-unlocked", compiled_unlocked, autograd=False, hands_over=True,
                             doc="one generated module: each unit's forward, then its update")


def batch_size(inputs, output) -> int:
    first = as_tuple(output)[0] if output is not None else inputs[0]
    return int(first.shape[0])


def accumulate(updates: dict, names, grads) -> None:
    for name, grad in zip(names, grads):
        if grad is not None:
            updates[name] = grad if name not in updates else updates[name] + grad
