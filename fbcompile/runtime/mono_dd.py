"""``"mf-dd"``: Mono-Forward with directional-derivative gradients (MF+DD, paper 004, Algorithm 1).

The local loss L_l of every unit (see :mod:`.mono_forward`) is differentiated without autograd:
the unit's parameters are split into chunks (:func:`~.mono_directional.unit_chunks`: whole output
channels with their bias and BatchNorm scale/shift, at most ``chunk_size`` = C_max entries), the
head M_l into chunks of whole rows, and each chunk's gradient is estimated from 2P forward
evaluations of the unit alone (:func:`~.mono_directional.directional_gradient`):

    g^ = (n/P) sum_p [(L(w + eps v^_p) - L(w - eps v^_p)) / (2 eps)] v^_p.

Chunks are processed one after another, the whole step runs under ``torch.no_grad()`` (so it works
inside the user's ``no_grad`` too), and every perturbed pass is followed by restoring the running
statistics of the unit's BatchNorms, so after a step they equal those of one clean forward. Every
pass of a unit (clean and perturbed) starts from the same random state, so a train-mode dropout
draws the clean pass's mask in each: the central differences then see the parameters' change alone
(fresh masks would add a difference of order 1, divided by 2 eps, to each D_p).

Update modes (``update``):

- ``"accumulate"`` (default): every chunk is estimated at the current parameters; the estimates go
  to the model's ``.grad`` (on the scale of dL_l/dW) for the user's optimizer and to the heads'
  optimizer. This is the default because it keeps the learner contract of every other algorithm
  (any optimizer, scheduler, clipping or all-reduce applies; Adam, which paper 004 sec. 6.2 proposes
  against the estimator's noise, is one line), and it makes the estimate directly comparable with
  the autograd gradient of "mf" (diagnostics).
- ``"immediate"`` (paper-faithful): sequential block-coordinate SGD. Each chunk of W_l is updated,
  w <- w - lr g^, before the next chunk is estimated; then the clean forward of unit l runs with the
  updated weights (Algorithm 1, line 25), its features train M_l chunk by chunk (w <- w - head_lr g^),
  and its output feeds unit l+1. The learner applies these steps itself at the end of ``step``; the
  model's ``.grad`` is not written, so the user's optimizer must not step these parameters again.
  ``compute`` itself leaves the parameters unchanged (it restores them and returns the summed chunk
  estimates), so failed steps and diagnostics change nothing.

Data parallel (``process_group=``): every rank draws the same directions v_p (the same seeded
generator) and estimates on its shard; the estimate is linear in the losses, so the ranks' mean of
g^ is the whole batch's estimate. "accumulate" averages the summed estimates at the end of the step
(and the heads' gradients before their optimizer steps); "immediate" averages each chunk's estimate
before applying it, so every rank takes the same step and the ranks stay identical.
"""
from __future__ import annotations

import torch

from ..errors import NonFiniteError, OptionError
from ..program import as_tuple
from .base import Executor
from .mono_directional import RandomState, directional_gradient, read, row_chunks, unit_chunks, write
from .mono_forward import HEAD_OPTIONS, MonoForwardBase
from .options import Option, one_of, positive, positive_int
from .registry import register_algorithm

UPDATE_MODES = ("accumulate", "immediate")

DD_OPTIONS = {
    "directions": Option(4, positive_int, "P: random directions per chunk (2P forward passes each)"),
    "eps": Option(1e-3, positive, "step of the central differences"),
    "chunk_size": Option(50_000, positive_int, "C_max: most parameters perturbed together"),
    "update": Option("accumulate", one_of(*UPDATE_MODES),
                     "'accumulate' into .grad (default) or 'immediate' per-chunk SGD (paper 004, Algorithm 1)"),
    "lr": Option(1e-3, positive, "update='immediate': SGD step on the model's parameters"),
}


@register_algorithm
class MonoForwardDD(MonoForwardBase):
    name = "mf-dd"
    OPTIONS = {**HEAD_OPTIONS, **DD_OPTIONS}

    def __init__(self, program, **options):
        immediate = options.get("update", "accumulate") == "immediate"
        if not immediate and "lr" in options:
            raise OptionError("option 'lr' of algorithm 'mf-dd' applies only to update='immediate' (with "
                              "update='accumulate' the user's optimizer steps the model's parameters)")
        if immediate and "head_optimizer" in options:
            raise OptionError("option 'head_optimizer' of algorithm 'mf-dd' applies only to update='accumulate' "
                              "(update='immediate' steps the heads by per-chunk SGD with head_lr)")
        super().__init__(program, **options)
        self.immediate = immediate
        size = self.options["chunk_size"]
        self._unit_chunks = None
        self.head_chunks = {h.index: row_chunks("weight", *h.weight.shape, size) for h in self.heads
                            if h.weight is not None}
        self._final = {}

    @property
    def chunks(self) -> dict:
        """Unit index -> the chunks of its parameters that require grad now: made again when a
        parameter was frozen or unfrozen since (perturbing a frozen one, "immediate" stepped it)."""
        key = tuple(p.requires_grad for p in self.program.params.values())
        if self._unit_chunks is None or self._unit_chunks[0] != key:
            size = self.options["chunk_size"]
            self._unit_chunks = (key, {s.unit.index: unit_chunks(s.unit, self.program.params, size)
                                       for s in self.stages if s.head})
        return self._unit_chunks[1]

    def _make_head_optimizer(self):
        return None if self.options["update"] == "immediate" else super()._make_head_optimizer()

    # -- one step -------------------------------------------------------------------------------
    def step(self, inputs, targets, loss_fn, optimizer=None, scaler=None):
        if not self.immediate or optimizer is not None or scaler is not None:    # refused by the base class
            return super().step(inputs, targets, loss_fn, optimizer, scaler)
        inputs = as_tuple(inputs)
        with self.transaction(inputs=inputs):
            result, updates = self.checked_compute(inputs, targets, loss_fn)
            with torch.no_grad():
                for name, value in self._final.items():
                    self.program.params[name].copy_(value)
        self._final = {}
        self.steps += 1
        return result

    def choose_executor(self):
        return DIRECTIONAL

    def directional(self, inputs, targets, loss_fn):
        params, self._final = self.program.params, {}
        updates, losses, head_grads = {}, {}, {}
        names = [n for s in self.stages if s.head for n in self.trained_params(s)]
        start = {n: params[n].detach().clone() for n in names} if self.immediate else {}
        with torch.no_grad():
            try:
                output = self.run(inputs, lambda stage, values: self._unit(stage, values, targets, loss_fn,
                                                                            updates, losses, head_grads))
                self._final = {n: params[n].detach().clone() for n in start}
            finally:
                for name, value in start.items():
                    params[name].copy_(value)
            self.apply_head_grads(head_grads)
        passes = 2 * self.options["directions"] * (sum(map(len, self.chunks.values())) +
                                                   sum(map(len, self.head_chunks.values())))
        return self.result(output, losses, perturbed_passes=passes), updates

    def _unit(self, stage, values, targets, loss_fn, updates, losses, head_grads):
        """Estimate (and in immediate mode apply) the updates of one unit; return its clean outputs."""
        head = stage.head
        if head is None:
            return stage.module(*values)
        params = self.program.params
        start, end = RandomState(values), None    # every pass of the unit replays the same dropout masks
        if not self.immediate:
            *outputs, a = stage.module(*values)     # the clean pass at the current weights
            end = RandomState(values)
        buffers = list({id(b): b for _, b in stage.probe.named_buffers()}.values())
        saved = [b.clone() for b in buffers]

        def unit_loss():
            start.restore()
            try:
                return self.local_loss(head, stage.probe(*values), targets, loss_fn)
            finally:
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)

        for chunk in self.chunks[stage.unit.index]:
            g = self._estimate(chunk, params, unit_loss)
            if self.immediate:       # data parallel: every rank applies the ranks' mean estimate
                self._check(g, f"unit {stage.unit.index}")
                g, = self.average([g])
            for name, _, _ in chunk.pieces:
                if name not in updates:
                    updates[name] = torch.zeros_like(params[name])
            chunk.scatter(g, updates)
            if self.immediate:
                chunk.write(params, chunk.read(params) - self.options["lr"] * g)
        if self.immediate:
            start.restore()
            *outputs, a = stage.module(*values)     # the clean pass with the updated weights
        else:
            end.restore()                           # later units draw as after one clean pass
        z = head.features(a)
        losses[stage.unit.index] = float(self.local_loss(head, a, targets, loss_fn))
        if head.weight is not None:
            grad = self._head_gradient(head, z, targets, loss_fn)
            if not self.immediate:
                head_grads[head] = grad
        return outputs

    def _head_gradient(self, head, z, targets, loss_fn) -> torch.Tensor:
        """Row-chunk estimates of dL/dM at fixed features z (in immediate mode applied chunk by chunk)."""
        tensors, total = {"weight": head.weight}, {"weight": torch.zeros_like(head.weight)}
        for chunk in self.head_chunks[head.index]:
            g = self._estimate(chunk, tensors, lambda: self.scores_loss(z @ head.weight, targets, loss_fn))
            if self.immediate:
                self._check(g, f"the head of unit {head.index}")
                g, = self.average([g])
            chunk.scatter(g, total)
            if self.immediate:
                chunk.write(tensors, chunk.read(tensors) - self.options["head_lr"] * g)
        return total["weight"]

    def _estimate(self, chunk, tensors: dict, loss) -> torch.Tensor:
        """Directional estimate for one chunk of ``tensors``; the chunk is restored afterwards."""
        views = chunk.views(tensors)
        w = read(views)

        def loss_at(point):
            write(views, point)
            return loss()

        try:
            return directional_gradient(loss_at, w, self.options["directions"], self.options["eps"], self.generator)
        finally:
            write(views, w)

    @staticmethod
    def _check(g: torch.Tensor, where: str) -> None:
        if not torch.isfinite(g).all():
            raise NonFiniteError(f"non-finite directional estimate at {where}; nothing was changed (lower lr, "
                                 "head_lr or eps, or check the inputs)")


DIRECTIONAL = Executor("directional", MonoForwardDD.directional, autograd=False,
                       doc="units one by one, each chunk's gradient from 2P perturbed forwards (no autograd)")
