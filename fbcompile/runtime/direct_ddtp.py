"""Direct difference target propagation (paper 003 sections 3.3 and 4, Fig. 3): DDTP-linear, DDTP-RHL.

Output target t_L = h_L - beta e (e = dL/dh_L). Every hidden unit u gets its target through a
direct feedback map g_u from the output, with difference correction::

    t_u = h_u + g_u(t_L) - g_u(h_L)

and learns from ||h_u - t_u||^2 / (2 beta) with its input detached, i.e. from the signal
delta_u = (h_u - t_u) / beta = (g_u(h_L) - g_u(h_L - beta e)) / beta on its output (the scale of the
loss gradient; as beta -> 0, delta_u -> J_{g_u}(h_L) e). The output unit learns from e itself
(its target is t_L).

- ``ddtp-linear``: g_u(y) = y Q_u, Q_u in R^{C x prod(S_u)}, so delta_u = e Q_u exactly (beta
  cancels): DFA with a trained Q_u in place of the fixed B_u.
- ``ddtp-rhl``: a fixed random wide hidden feedback layer h_fb = tanh(y R), R in R^{C x W}
  (W = ``feedback_hidden``, default 1024), and g_u(y) = act(h_fb Q_u + b_u) with trained
  Q_u in R^{W x prod(S_u)}, b_u; act is tanh (paper 003) or ``feedback_activation="linear"``.

Feedback training, DRL (paper 003 eq. 10 with direct maps), every step before the forward update
(``feedback_steps`` iterations, own optimizer ``feedback_optimizer`` with ``feedback_lr``): for
each hidden unit output h_u, noise eps ~ N(0, sigma^2 I) is sent through the rest of the network,
y~ = f_{u,L}(h_u + eps), and back through the unit's difference-corrected feedback::

    L_u = mean over the batch of || g_u(y~) - g_u(h_L) - eps ||^2 / sigma^2

whose minimiser has J_{g_u} = J_{f_{u,L}}^+ (Gauss-Newton targets) as sigma -> 0; the Tikhonov term
of eq. 10 is applied as weight decay (``feedback_weight_decay``). Q_u and R are drawn like the other
direct learners' projections (``projection_init``/``projection_fan``, n = prod(S_u) or the map's
input size), so an untrained DDTP-linear with the same seed is exactly DFA.
:meth:`train_feedback` trains the feedback alone (paper 003 pre-trains it for several epochs).
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import FBCompileError, NonFiniteError
from ..passes.direct import draw_projection, place_batch_axis, projection_generator
from ..program import as_tuple
from ..trace import preserved_state
from .base import model_device
from .finite import all_finite
from .direct import PROJECTION_OPTIONS, STORED, DirectLearner
from .direct_signals import Signal, flat_error
from .options import Option, make_optimizer, non_negative, one_of, optimizer_option, positive, positive_int
from .registry import register_algorithm
from .transaction import load_optimizer_state

FEEDBACK_OPTIONS = {
    "sigma": Option(0.1, positive, "noise std of the difference reconstruction loss (DRL)"),
    "feedback_steps": Option(1, positive_int, "DRL iterations per batch, before the forward update"),
    "feedback_lr": Option(1e-3, positive, "learning rate of the feedback optimizer"),
    "feedback_weight_decay": Option(0.0, non_negative, "weight decay of Q (DRL's Tikhonov term)"),
    "feedback_optimizer": optimizer_option("feedback parameters"),
}


class RandomHiddenLayerFeedback(nn.Module):
    """g_u(y) = act(tanh(y R) Q_u + b_u) for every projection u of a plan; R fixed, Q_u and b_u trained."""

    def __init__(self, plan, *, width: int, activation: str, init: str, fan: str, scale, seed: int):
        super().__init__()
        scale = 1.0 if scale is None else scale
        dtype = plan.projections[0].dtype if plan.projections else torch.float32
        draw = lambda rows, shape, gen: draw_projection(rows, shape, init=init, fan=fan, scale=scale, generator=gen,
                                                        dtype=dtype)
        self.activation, self.shapes = activation, [p.shape for p in plan.projections]
        self.register_buffer("R", draw(plan.signal_dim, (width,), projection_generator(seed, 0, stream=2)))
        self.Q = nn.ParameterList([nn.Parameter(draw(width, p.shape, projection_generator(seed, p.index, stream=1)))
                                   for p in plan.projections])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(p.features, dtype=dtype)) for p in plan.projections])

    def hidden(self, y: torch.Tensor) -> torch.Tensor:
        return torch.tanh(y.to(self.R.dtype) @ self.R)

    def forward(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        q = self.Q[index]
        z = torch.addmm(self.b[index], hidden, q.reshape(q.shape[0], -1))
        return torch.tanh(z) if self.activation == "tanh" else z


class DirectDifferenceTargetPropagation(DirectLearner):
    """Shared by DDTP-linear and DDTP-RHL: the signal, DRL feedback training and its optimizer.
    Executor "stored" always: the feedback is trained on the stored unit outputs before the hidden
    deltas, which come from the trained maps (not from fixed B_u, as the compiled executors build)."""

    def __init__(self, program, **options):
        super().__init__(program, **options)
        o = self.options
        self.feedback_maps = self.make_feedback().to(model_device(self.model))
        # A model without hidden units to project to (its trained units all produce model outputs)
        # has no feedback to train: its output units learn from e alone, as in every direct learner.
        # The fused kernel: the feedback maps of DDTP-RHL are several times larger than the model.
        self.feedback_optimizer = None if not self.plan.projections else make_optimizer(
            o["feedback_optimizer"], self.parameters(), o["feedback_lr"], o["feedback_weight_decay"], fused=True)

    def choose_executor(self, compiled: bool = False):
        return STORED

    def make_projections(self, trainable: bool = True):
        return super().make_projections(trainable=True)

    def make_feedback(self) -> nn.Module:
        raise FBCompileError(f"{type(self).__qualname__} must implement make_feedback()")

    def difference(self, index: int, moved: torch.Tensor, reference: torch.Tensor, signal: Signal) -> torch.Tensor:
        """g_u(moved) - g_u(reference), flattened to (N, prod(S_u))."""
        raise FBCompileError(f"{type(self).__qualname__} must implement difference()")

    def parameters(self):
        return [p for p in self.feedback_maps.parameters() if p.requires_grad]

    def signal(self, errors, output, targets, batch):
        flat = torch.cat([o.detach().reshape(o.shape[0], -1) for o in as_tuple(output)], dim=1)
        return Signal(batch, dense=flat_error(errors), output=flat)

    def before_forward(self, inputs):
        """With buffers (BatchNorm), DRL's probe forwards restore them in place, which would
        invalidate the saved graph of a forward taken earlier: then train the feedback first, on a
        separate no-grad forward with the same buffers and RNG state (hence the same values)."""
        if not self.buffers or self.feedback_optimizer is None:
            return False
        self._train_feedback(inputs, *self._clean_forward(inputs))
        return True

    def before_update(self, inputs, output, values, signal):
        self._train_feedback(inputs, {n: v.detach() for n, v in values.items()}, signal)

    def _clean_forward(self, inputs) -> tuple:
        with torch.no_grad(), preserved_state(self.model):
            output, _, projected = self.stored_forward()(*inputs)
        values = dict(zip((p.node for p in self.plan.projections), projected))
        batch = int(as_tuple(output)[0].shape[0])
        return values, Signal(batch, output=torch.cat([o.reshape(batch, -1) for o in as_tuple(output)], dim=1))

    # -- DRL --------------------------------------------------------------------------------------
    def train_feedback(self, inputs) -> dict:
        """Train the feedback maps alone on one batch (``feedback_steps`` DRL iterations), leaving the
        model (parameters, .grad, buffers) untouched; returns {unit index: reconstruction loss}."""
        inputs = as_tuple(inputs)
        if self.feedback_optimizer is None:
            return {}
        with self.transaction(inputs=inputs):
            self._train_feedback(inputs, *self._clean_forward(inputs))
        return dict(self.last["reconstruction"])

    def _train_feedback(self, inputs, values: dict, signal: Signal) -> None:
        sigma, record = self.options["sigma"], {}
        for _ in range(self.options["feedback_steps"]):
            self.feedback_optimizer.zero_grad(set_to_none=True)
            record = {}
            for projection in self.plan.projections:
                loss = self._reconstruction(inputs, values[projection.node], projection, signal, sigma)
                loss.backward()
                record[projection.unit] = record.get(projection.unit, 0.0) + float(loss.detach())
            if not all_finite([p.grad for p in self.parameters()]):
                raise NonFiniteError("non-finite feedback gradient in DDTP's reconstruction loss; nothing was "
                                         "changed (lower feedback_lr or sigma, or check the inputs)")
            self.feedback_optimizer.step()
        self.feedback_optimizer.zero_grad(set_to_none=True)
        self.last["reconstruction"] = record

    def _reconstruction(self, inputs, value, projection, signal: Signal, sigma: float) -> torch.Tensor:
        noise = torch.randn((signal.batch, *projection.shape), device="cpu", generator=self.generator, dtype=value.dtype)
        noise = noise.to(value.device) * sigma               # per sample, batch first
        with torch.no_grad(), preserved_state(self.model):
            moved = self.program.resume_forward(projection.node)(
                *inputs, value + place_batch_axis(noise, projection.batch_axis))
        moved = torch.cat([m.reshape(signal.batch, -1) for m in moved], dim=1)
        with torch.enable_grad():
            reconstructed = self.difference(projection.index, moved, signal.output, signal)
            return ((reconstructed - noise.reshape(signal.batch, -1)) ** 2).sum(1).mean() / sigma ** 2

    # -- state ------------------------------------------------------------------------------------
    def extra_state(self):
        state = {"feedback_maps": self.feedback_maps.state_dict()}
        if self.feedback_optimizer is not None:
            state["feedback_optimizer"] = self.feedback_optimizer.state_dict()
        return state

    def load_extra_state(self, state):
        self.feedback_maps.load_state_dict(state["feedback_maps"])
        if self.feedback_optimizer is not None:
            load_optimizer_state(self.feedback_optimizer, state["feedback_optimizer"])


@register_algorithm
class DirectDifferenceTargetPropagationLinear(DirectDifferenceTargetPropagation):
    """DDTP-linear: g_u(y) = y Q_u; delta_u = e Q_u."""
    name = "ddtp-linear"
    OPTIONS = {**PROJECTION_OPTIONS, **FEEDBACK_OPTIONS}

    def make_feedback(self):
        return self.projections

    def difference(self, index, moved, reference, signal):
        return (moved - reference).to(self.projections.flat(index).dtype) @ self.projections.flat(index)

    def delta(self, projection, signal):
        with torch.no_grad():
            return self.projections.project(projection.index, signal)


@register_algorithm
class DirectDifferenceTargetPropagationRHL(DirectDifferenceTargetPropagation):
    """DDTP-RHL: g_u(y) = tanh(tanh(y R) Q_u + b_u); delta_u = (g_u(h_L) - g_u(h_L - beta e)) / beta."""
    name = "ddtp-rhl"
    OPTIONS = {**PROJECTION_OPTIONS, **FEEDBACK_OPTIONS,
               "feedback_weight_decay": Option(1e-3, non_negative, "weight decay of Q_u, b_u (DRL's Tikhonov term)"),
               "beta": Option(0.1, positive, "output target step: t_L = h_L - beta dL/dh_L"),
               "feedback_hidden": Option(1024, positive_int, "width W of the fixed random hidden feedback layer"),
               "feedback_activation": Option("tanh", one_of("tanh", "linear"), "output nonlinearity of g_u")}

    def make_projections(self, trainable: bool = True):
        return None                  # its maps hold R, Q_u, b_u instead of C x S_u matrices

    def make_feedback(self):
        o = self.options
        return RandomHiddenLayerFeedback(self.plan, width=o["feedback_hidden"], activation=o["feedback_activation"],
                                         init=o["projection_init"], fan=o["projection_fan"],
                                         scale=o["projection_scale"], seed=o["seed"])

    def _hidden(self, y, signal: Signal, key: str):
        if key not in signal.cache:
            signal.cache[key] = self.feedback_maps.hidden(y)
        return signal.cache[key]

    def difference(self, index, moved, reference, signal):
        maps = self.feedback_maps               # both through one product: one Q-gradient product too
        both = maps(index, torch.cat([maps.hidden(moved), self._hidden(reference, signal, "output")]))
        return both[:len(moved)] - both[len(moved):]

    def delta(self, projection, signal):
        beta = self.options["beta"]
        with torch.no_grad():
            if "both" not in signal.cache:
                target = signal.output - beta * signal.dense.to(signal.output.dtype)
                signal.cache["both"] = torch.cat([self._hidden(signal.output, signal, "output"),
                                                  self.feedback_maps.hidden(target)])
            both = self.feedback_maps(projection.index, signal.cache["both"])
            here, there = both[:signal.batch], both[signal.batch:]
            return place_batch_axis(((here - there) / beta).reshape(signal.batch, *projection.shape),
                                    projection.batch_axis)
