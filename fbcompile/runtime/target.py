"""Target propagation: TP and DTP with analytic, fixed random or learned feedback.

Output target t_L = h_L - beta dL/dh_L for any loss. TP: t_in = G_u(t_out); DTP (difference
correction): t_in = G_u(t_out) + h_in - G_u(h_out), computed in difference form by the feedback
graph. Each unit's parameters learn from ||F_u(h_in) - t_out||^2 / (2 beta) with its input
detached, which gives updates on the scale of the loss gradient (analytic DTP with beta -> 0 is BP).

The step runs the model once with unit inputs detached, computes all targets with the feedback
graph without autograd, then turns the per-unit deltas (h - t) / beta into every parameter's local
gradient at once: through the compiled "unit_error" graph (each unit's own backward from the
compiled rules, no autograd at all) when every error map inside the units is exact
(:attr:`FeedbackProgram.exact_within_units`), else by ONE multi-root ``autograd.grad`` through the
unit-local graphs recorded by that forward. No layer is re-run; the model is never copied.

Feedback sources: ``"analytic"`` (the program's condition: T is TJML-DTP, paper 002 Alg. 2; P and I
use (pseudo-)inverses), ``"random"`` (FWDTP: fixed random feedback weights, never trained) and the
learned ``"lrl"``, ``"drl"``, ``"ldrl"``: feedback weights trained every step, before the forward
update, by the reconstruction loss of that name (see :mod:`.reconstruction`) with their own optimizer.
"""
from __future__ import annotations

import torch

from ..errors import NonFiniteError, OptionError, choices_text
from ..program import as_tuple
from ..trace import depends_on_parameters
from .base import Executor, Learner, StepResult
from .finite import all_finite
from .losses import output_error
from ..initialisation import INITS
from .feedback_weights import UNSLOTTED, UNSLOTTED_HELP, FeedbackWeights
from .options import Option, boolean, make_optimizer, non_negative, one_of, optimizer_option, positive, positive_int
from .reconstruction import cut_reconstruction, difference_reconstruction
from .registry import register_algorithm
from .transaction import load_optimizer_state

LEARNED = ("lrl", "drl", "ldrl")
SOURCES = ("analytic", "random") + LEARNED
DEFAULT_FEEDBACK_STEPS = {"lrl": 1, "drl": 1, "ldrl": 20}
_LEARNED_ONLY = ("sigma", "feedback_steps", "feedback_lr", "feedback_weight_decay", "feedback_optimizer",
                 "input_feedback")
_WEIGHTED_ONLY = ("feedback_init", "feedback_scale", "unslotted")


@register_algorithm
class TargetPropagation(Learner):
    """Target propagation: t_in = G_u(t_out) from t_L = h_L - beta dL/dh_L; local losses per unit."""
    name = "tp"
    difference = False
    difference_mode = "difference"
    OPTIONS = {
        "beta": Option(0.1, positive, "output target step: t_L = h_L - beta dL/dh_L"),
        "feedback": Option("analytic", one_of(*SOURCES), "where the feedback weights come from"),
        "units": Option(None, one_of(None, "layer", "op", "module"), "TP unit grouping (default: the program's)"),
        "hadamard": Option(False, boolean, "activation feedback sigma(sigma'(x) * t) (paper 002 eq. 29)"),
        "correction": Option("op", one_of("op", "unit"), "DTP difference correction at every op or per unit"),
        "feedback_init": Option("kaiming", one_of(*INITS[:-1], "forward"), "initial feedback weights"),
        "feedback_scale": Option(1e-3, non_negative, "scale for feedback_init 'uniform'/'normal' (FWDTP: 1e-3)"),
        "unslotted": Option("refuse", one_of(*UNSLOTTED), UNSLOTTED_HELP),
        "sigma": Option(0.1, positive, "noise std of the reconstruction losses"),
        "feedback_steps": Option(None, lambda v: None if v is None else positive_int(v),
                                 "feedback training iterations per batch (lrl 1, drl 1, ldrl 20)"),
        "feedback_lr": Option(1e-3, positive, "learning rate of the feedback optimizer"),
        "feedback_weight_decay": Option(0.0, non_negative, "weight decay of feedback weights (Tikhonov term)"),
        "feedback_optimizer": optimizer_option("feedback weights"),
        "input_feedback": Option(False, boolean, "also train the feedback into the model inputs"),
    }

    def __init__(self, program, **options):
        super().__init__(program, **options)
        o = self.options
        source = o["feedback"]
        _refuse_inapplicable(self.name, source, options)
        if not self.difference and "correction" in options:
            raise OptionError("option 'correction' applies only to algorithm 'dtp' (TP has no difference correction)")
        if o["units"] is not None or o["hadamard"]:
            program = program.recompile(units=o["units"], variants=("hadamard",) if o["hadamard"] else None)
            self.program = program
        self.feedback = None
        if source != "analytic":
            self.feedback = FeedbackWeights(program, init=o["feedback_init"], scale=o["feedback_scale"],
                                            seed=o["seed"], trainable=source in LEARNED, unslotted=o["unslotted"])
        self.feedback_optimizer = None
        if source in LEARNED:
            self.feedback_optimizer = make_optimizer(o["feedback_optimizer"], list(self.feedback.parameters()),
                                                     o["feedback_lr"], o["feedback_weight_decay"])
            self.feedback_steps = o["feedback_steps"] or DEFAULT_FEEDBACK_STEPS[source]
        # every feedback graph a step runs, emitted now: the forward saves what all of them read
        modes = [self.difference_mode if self.difference else "target"]
        if source in LEARNED and source != "drl":
            modes.append("unit_target")
        # local gradients without autograd (compiled unit_error graph) where the units' error maps are exact
        self.executor = self.choose_executor()
        if self.executor is COMPILED_LOCAL:
            modes.append("unit_error")
        self.executable = program.executable(*modes)

    def choose_executor(self, compiled: bool = True) -> Executor:
        """"compiled-local" (each unit's backward from the compiled unit_error graph) where every
        error map inside the units is exact and the feedback is not trained on the step's forward;
        else "autograd-local" (one multi-root autograd backward through the unit-local graphs)."""
        exact = compiled and self.feedback_optimizer is None and self.program.exact_within_units
        return COMPILED_LOCAL if exact else AUTOGRAD_LOCAL

    @property
    def compiled_local(self) -> bool:
        return self.executor is COMPILED_LOCAL

    @compiled_local.setter
    def compiled_local(self, value: bool) -> None:
        """Tests compare the paths: False switches to the autograd executor (True is the default choice)."""
        if value and self.choose_executor() is not COMPILED_LOCAL:
            raise OptionError(f"algorithm {self.name!r} cannot compute local gradients without autograd here")
        self.executor = self.choose_executor(compiled=bool(value))

    def parameters(self):
        return list(self.feedback.parameters()) if self.feedback is not None and self.feedback_optimizer else []

    def weights(self):
        return None if self.feedback is None else self.feedback.mapping()

    # -- one step -------------------------------------------------------------------------------
    def local_step(self, inputs, targets, loss_fn, compiled: bool):
        """Targets from the feedback graph, then every unit's local gradient (see the module docstring).

        Memory: the taps are handed to the feedback graph, which frees each after its last reader;
        only those the compiled local backward reads ("unit_error") stay, and none for the autograd
        one (autograd keeps its own). Each target is replaced by its delta
        delta_u = (h_u - t_u) / beta (difference form: -(t_u - h_u) / beta) one at a time, so targets
        and deltas never all live at once, and the deltas are handed to the local backward.
        ``last["delta_norms"]`` keeps ||delta_u||_F per unit output (floats), never the tensors."""
        program, beta = self.program, self.options["beta"]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not compiled):
            output, taps, boundary_values = self.executable.local_forward()(*inputs)
        taps = list(taps)
        loss, errors = output_error(output, targets, loss_fn)
        if self.feedback_optimizer is not None:
            self.train_feedback(inputs, taps, dict(zip(program.boundary, boundary_values)))
        mode = self.difference_mode if self.difference else "target"
        with torch.no_grad():
            fed = ([-beta * e for e in errors] if self.difference
                   else [o.detach() - beta * e for o, e in zip(as_tuple(output), errors)])
            feedback = list(self.executable.run_feedback(mode, fed, taps, self.weights(), returns="units",
                                                         keep_for=("unit_error",) if compiled else ())[0])
            if not all_finite(feedback):
                bad = [n.name for n, f in zip(program.boundary, feedback)
                       if f is not None and not torch.isfinite(f).all()]
                raise NonFiniteError(f"non-finite targets at {', '.join(bad)} (beta={beta}); nothing was changed")
            deltas = {}
            for i, (node, h) in enumerate(zip(program.boundary, boundary_values)):
                f, feedback[i] = feedback[i], None
                if f is not None and node.op != "placeholder":
                    deltas[node.name] = f * (-1.0 / beta) if self.difference else (h.detach() - f) / beta
                f = None
            norms = [torch.linalg.vector_norm(d) for d in deltas.values()]
            self.last["delta_norms"] = dict(zip(deltas, torch.stack(norms).tolist() if norms else []))
        trainable = [n for n, p in program.params.items() if p.requires_grad]
        if compiled:            # each unit's local backward through the compiled unit_error graph
            missing = {n.name: h for n, h in zip(program.boundary, boundary_values) if n.name not in deltas}
            boundary_values = None
            local = self.executable.unit_gradients(deltas, missing, taps, hand_over=True)
            updates = {n: local[n] for n in trainable if local.get(n) is not None}
        else:                   # one multi-root autograd backward through the unit-local graphs
            roots = {n.name: h for n, h in zip(program.boundary, boundary_values) if h.requires_grad}
            deltas = {name: d for name, d in deltas.items() if name in roots}
            grads = torch.autograd.grad([roots[n] for n in deltas], [program.params[n] for n in trainable],
                                        list(deltas.values()), allow_unused=True)
            updates = {n: g for n, g in zip(trainable, grads) if g is not None}
        return StepResult(float(loss), output.detach() if torch.is_tensor(output) else output), updates

    # -- learned feedback -------------------------------------------------------------------------
    def trained_units(self) -> set:
        """Units whose feedback weights are trained: those that send targets to a value computed
        with parameters (targets for raw inputs are useless unless ``input_feedback``)."""
        units = set()
        for unit in self.program.units:
            has_weights = any(self.program.partition.unit_of.get(n) is unit for n in self._slot_nodes())
            reads_hidden = any(depends_on_parameters(src) for src in unit.inputs)
            if has_weights and (reads_hidden or self.options["input_feedback"]):
                units.add(unit.index)
        return units

    def _slot_nodes(self):
        names = {key[0] for key in self.feedback.keys}
        return [n for n in self.program.traced.graph.nodes if n.name in names]

    def train_feedback(self, inputs, taps, values: dict) -> None:
        taps = tuple(t.detach() if torch.is_tensor(t) else t for t in taps)
        trained, source, sigma = self.trained_units(), self.options["feedback"], self.options["sigma"]
        record = {}
        for _ in range(self.feedback_steps):
            self.feedback_optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                if source == "drl":
                    record = self._drl_step(inputs, taps, values, trained, sigma)
                else:
                    losses = cut_reconstruction(self.executable, source, inputs, taps, values, self.feedback.mapping(),
                                                trained, sigma, self.generator)
                    if losses:
                        sum(losses.values()).backward()
                    record = {u: float(v.detach()) for u, v in losses.items()}
            for p in self.feedback.parameters():
                if p.grad is not None and not torch.isfinite(p.grad).all():
                    raise NonFiniteError("non-finite feedback-weight gradient in the reconstruction loss; "
                                         "lower feedback_lr or sigma")
            self.feedback_optimizer.step()
        self.last["reconstruction"] = record

    def _drl_step(self, inputs, taps, values, trained, sigma) -> dict:
        record = {}
        weights = self.feedback.mapping()
        for unit in self.program.units:
            if unit.index not in trained:
                continue
            params = [p for p in self.feedback.of_units({unit.index}) if p.requires_grad]
            for source in unit.inputs:
                if not depends_on_parameters(source) and not self.options["input_feedback"]:
                    continue
                loss = difference_reconstruction(self.executable, inputs, taps, values, weights, source, sigma,
                                                 self.generator, self.difference_mode)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad + g
                record[unit.index] = record.get(unit.index, 0.0) + float(loss.detach())
        return record

    # -- state ----------------------------------------------------------------------------------
    def extra_state(self):
        state = {}
        if self.feedback is not None:
            state["feedback"] = self.feedback.state_dict()
        if self.feedback_optimizer is not None:
            state["feedback_optimizer"] = self.feedback_optimizer.state_dict()
        return state

    def load_extra_state(self, state):
        if self.feedback is not None:
            self.feedback.load_state_dict(state["feedback"])
        if self.feedback_optimizer is not None:
            load_optimizer_state(self.feedback_optimizer, state["feedback_optimizer"])


@register_algorithm
class DifferenceTargetPropagation(TargetPropagation):
    """Difference target propagation: t_in = G(t_out) + h_in - G(h_out) (TJML-DTP with analytic feedback)."""
    name = "dtp"
    difference = True

    @property
    def difference_mode(self) -> str:
        return "difference" if self.options["correction"] == "op" else "unit_difference"


COMPILED_LOCAL = Executor("compiled-local", lambda learner, *args: learner.local_step(*args, compiled=True),
                          autograd=False, doc="targets, then each unit's backward from the compiled unit_error graph")
AUTOGRAD_LOCAL = Executor("autograd-local", lambda learner, *args: learner.local_step(*args, compiled=False),
                          doc="targets, then one multi-root autograd backward through the unit-local graphs")


def _refuse_inapplicable(algorithm: str, source: str, given: dict) -> None:
    for name in given:
        if name in _LEARNED_ONLY and source not in LEARNED:
            raise OptionError(f"option {name!r} of algorithm {algorithm!r} applies only to learned feedback "
                              f"(feedback={choices_text(LEARNED)}), not feedback={source!r}")
        if name in _WEIGHTED_ONLY and source == "analytic":
            raise OptionError(f"option {name!r} of algorithm {algorithm!r} does not apply to feedback='analytic' "
                              f"(it sets feedback weights for {choices_text(('random',) + LEARNED)})")
