"""Direct feedback learners: DFA, sDFA, DRTP and shallow learning (DDTP lives in :mod:`.direct_ddtp`).

Notation: unit u with output h_u (per-sample shape S_u), e = dL/dh_L for the model output h_L
(dL/da_L for logits with softmax cross-entropy), y* the one-hot label, N the batch size, B_u the
fixed random projection of unit u (C x prod(S_u), see :mod:`fbcompile.passes.direct`). Every
hidden unit learns from a signal delta_u placed on its output and pulled back through its OWN
forward only (its input is detached), so for Linear+f: dW_u = [delta_u * f'(a_u)]^T h_in::

    dfa:      delta_u = e B_u
    sdfa:     delta_u = sign(e) B_u / N
    drtp:     delta_u = -y* B_u / N
    shallow:  hidden units do not learn

Signs are those of ``.grad`` (the optimizer subtracts it). Paper 001 writes e = y* - y_K (minus our
e) and ascends; its DRTP rule W += eta (B^T y* * f') x^T is ``.grad = -(B^T y* * f') x^T`` here: y*
stands in for sign(y* - y_K) = -sign(e), the output-side error sign known from the label alone.

Batch scaling (``batch_scaling``, sdfa and drtp): "mean" (default) divides the sign / target
signal by N, so hidden updates average over the batch like the gradient of a mean-reduced loss;
"none" is paper 001's reference code, which projects sign(e) and y* as they are (hidden updates are
summed over the batch, N times larger). DFA's e already carries the loss's own reduction.

The output unit(s) learn from the loss's local gradient e (paper 001 Alg. 1, last layer), whatever
the algorithm. Shallow learning leaves hidden parameters out of the update, so their ``.grad`` is
never written (it stays None after ``zero_grad()``; optimizers then skip them).

Execution (``execution``, drtp and shallow): "unlocked" (default) runs the units one by one; each
hidden unit computes its update right after its forward and its activations are freed as soon as
the next unit has read them, so live memory does not grow with depth (the
hidden signal needs only the label). "stored" runs one forward that keeps what every unit's local
backward reads and then one local backward per unit -- the path DFA and sDFA always take, since
they need the output error; it never runs a backward chain through the network either. Both give
the same updates. Update-unlocked, each hidden unit's update is handed over as soon as it is made
(:meth:`DirectLearner.unit_done`): data parallel, its all-reduce starts; with in-step updates
(``step(..., optimizer=)``, :mod:`.in_step`) it is applied and freed, so the step holds no update
per parameter either.

Parameters shared across units (a module called twice, tied weights): with L_u the local loss of
unit u, whose gradient at the unit's output is delta_u (L_u = <h_u, delta_u> with delta_u held
constant; DDTP's ||h_u - t_u||^2 / (2 beta)), and the unit's input detached, a parameter theta gets

    dtheta = sum over the units u that use theta of dL_u/dtheta = sum_u J_{F_u, theta}^T delta_u,

each term through unit u's own forward F_u only (no credit through another unit), exactly as an
unshared parameter gets its unit's term. The autograd executors get each term from the unit's own
backward (its graph starts at the detached unit input, so it reaches theta only through the unit's
own uses) and add them; the compiled ones read each unit's term off its own gradient graph
(:func:`~fbcompile.passes.unit_share.own_share`) and add them; where a unit's term cannot be
separated there, the autograd executor of the same kind runs instead. An update-unlocked step
hands a shared parameter's update to data-parallel communication only after its last unit.

Executors (chosen once, at construction; ``StepResult.details["executor"]``): "compiled-stored"
and "compiled-unlocked" run without autograd (``self.compiled``) when every error map inside the
units is exact (:attr:`FeedbackProgram.exact_within_units`) and the output units output only model
outputs (and every shared parameter's terms separate per unit); "stored" and "update-unlocked"
are the autograd paths. Compiled (:mod:`.direct_compiled`),
the forward runs under no_grad and saves the taps of the compiled "unit_error" graph, and every
update after it comes from one generated graph that makes each delta and pulls it back through its
unit's pruned gradient graph
(:func:`~fbcompile.passes.direct_graph.build_direct_gradients`); update-unlocked, one generated
module runs the units' forwards with each hidden unit's update right after its own forward
(:func:`~fbcompile.passes.direct_graph.build_unlocked_step`) and the output units' updates, once e
is known, come from the same generated graph the stored path uses. Otherwise (autograd) the units
run one by one with :meth:`FeedbackProgram.run_units` and each unit's update is a backward through
its own graph, its input detached.
"""
from __future__ import annotations

import torch

from ..errors import FBCompileError, OptionError
from ..passes.direct import PROJECTION_FANS, PROJECTION_INITS, plan_direct
from ..passes.forward import build_forward
from ..program import as_tuple
from .base import Executor, Learner, StepResult, detached_output, model_device
from .direct_compiled import COMPILED_STORED, COMPILED_UNLOCKED, accumulate, batch_size
from .losses import scalar_loss
from .direct_signals import DirectProjections, Signal, check_projection_memory, flat_error, label_signal
from .options import Option, non_negative, one_of
from .registry import register_algorithm
from .unit_order import completed_by, execution_order

PROJECTION_OPTIONS = {
    "projection_init": Option("he_uniform", one_of(*PROJECTION_INITS),
                              "B init: he_uniform U(+-sqrt(6/n)), xavier_uniform, uniform, normal"),
    "projection_fan": Option("features", one_of(*PROJECTION_FANS),
                             "n of he_uniform: 'features' = prod(unit output shape) (reference code), "
                             "'signal' = output signal dimension C"),
    "projection_scale": Option(None, lambda v: None if v is None else non_negative(v),
                               "bound of 'uniform' / std of 'normal' (required by and only for those)"),
    "projection_memory_gb": Option(2.0, non_negative, "refuse projections B_u larger than this in all (C x S_u "
                                                      "each: a dense output such as a segmentation map makes C large)"),
}
BATCH_SCALING = {"batch_scaling": Option("mean", one_of("mean", "none"),
                                         "'mean': hidden sign/target signal divided by the batch size; "
                                         "'none': paper 001's reference code (summed over the batch)")}
EXECUTION = {"execution": Option("unlocked", one_of("unlocked", "stored"),
                                 "'unlocked': update each unit right after its forward and free it; "
                                 "'stored': keep one forward's activations, one local backward")}


class DirectLearner(Learner):
    """Shared machinery: the direct plan and the four executors (compiled or autograd, stored or
    update-unlocked).

    Subclasses define :meth:`signal`; those whose signal needs no output offer the ``execution``
    option; ``hidden_learn = False`` is shallow learning. A subclass whose hidden delta is not
    ``s B_u`` with fixed B_u (DDTP) overrides :meth:`delta` AND :meth:`choose_executor` (the compiled
    executors build s B_u into their generated graphs), and :meth:`make_projections` if its
    matrices differ."""

    hidden_learn = True
    OPTIONS: dict = {}

    def __init__(self, program, **options):
        super().__init__(program, **options)
        self.plan = plan_direct(program.traced, program.partition, program.params)
        planned, outputs = {n for names in self.plan.params.values() for n in names}, set(program.outputs)
        self.unplanned = [(q, program.params[q]) for u in program.partition.units
                          if self.hidden_learn or any(node in outputs for node in u.nodes)
                          for q in u.params if q not in planned]
        self._fused = {}
        self.order = None           # unit indices in execution order, for update-unlocked execution
        self._final_updates = None  # final_updates(), found at the first update-unlocked step
        if self.options.get("execution") == "unlocked":
            stages = execution_order(program, program.unit_forwards(), self.name, "; or use execution='stored'")
            self.order = [stage.unit.index for stage in stages]
        self._stored_forward = None
        if "projection_init" in self.OPTIONS:
            _check_projection_scale(self.name, self.options, options)
        self.projections = self.make_projections()
        self.compiled = not self.choose_executor().autograd   # the executor, and the executable it runs
        # (the stored forward saves what the compiled "unit_error" graph reads)

    def make_projections(self, trainable: bool = False) -> DirectProjections | None:
        """The C x S_u matrices B_u of the plan (None for an algorithm without projection options)."""
        if "projection_init" not in self.OPTIONS:
            return None
        o = self.options
        check_projection_memory(self.name, self.plan, o["projection_memory_gb"])
        return DirectProjections(self.plan, init=o["projection_init"], fan=o["projection_fan"],
                                 scale=o["projection_scale"], seed=o["seed"],
                                 trainable=trainable).to(model_device(self.model))

    # -- executors --------------------------------------------------------------------------------
    def choose_executor(self, compiled: bool = True) -> Executor:
        """The compiled executors where every error map inside the units is exact and the output
        units output only model outputs (their delta is e); else the autograd ones. "unlocked" or
        "stored" by the ``execution`` option (stored where the algorithm has none)."""
        unlocked = self.options.get("execution") == "unlocked"
        program = self.program
        if compiled and program.exact_within_units and all(
                set(program.partition.units[u].outputs) <= set(program.outputs) for u in self.plan.output_units) \
                and self._shares_separate():
            return COMPILED_UNLOCKED if unlocked else COMPILED_STORED
        return UPDATE_UNLOCKED if unlocked else STORED

    def _shares_separate(self) -> bool:
        """Whether every trained unit's compiled gradient graph reads only its own deltas (always
        true without shared parameters, where nothing is built to find out)."""
        return not self.plan.shared or not set(self.program.unit_gradients().refused) & set(self.trained_units())

    @property
    def compiled(self) -> bool:
        """Whether the chosen executor runs without autograd."""
        return not self.executor.autograd

    @compiled.setter
    def compiled(self, value: bool) -> None:
        """Tests compare the paths: False switches to the autograd executor of the same kind."""
        chosen = self.choose_executor(compiled=bool(value))
        if bool(value) and chosen.autograd:
            refused = self.program.unit_gradients().refused if self.plan.shared else {}
            why = [f"; {refused[unit]}" for unit in self.trained_units() if unit in refused]
            raise FBCompileError(f"algorithm {self.name!r} has no compiled executor for this program{''.join(why[:1])}")
        self.executor = chosen
        self.executable = self.program.executable("unit_error") if self.compiled else self.program.executable()

    # -- hooks ------------------------------------------------------------------------------------
    def signal(self, errors: tuple | None, output, targets, batch: int) -> Signal | None:
        raise FBCompileError(f"{type(self).__qualname__} must implement signal()")

    def delta(self, projection, signal: Signal) -> torch.Tensor:
        return self.projections.project(projection.index, signal)

    def before_forward(self, inputs) -> bool:
        """Runs before the stored forward; True if it already did :meth:`before_update`'s work."""
        return False

    def before_update(self, inputs, output, values: dict, signal: Signal) -> None:
        """Runs after the stored forward, before the hidden deltas (DDTP trains its feedback here)."""

    # -- the autograd executors' paths -------------------------------------------------------------
    def _projection_list(self) -> list:
        """The B_u parameter objects (bound into the generated update graphs)."""
        return [] if self.projections is None else list(self.projections.weights)

    def trained_units(self) -> tuple:
        return self.plan.output_units + (self.plan.hidden_units if self.hidden_learn else ())

    def updated_params(self) -> set:
        """Names of the model parameters this learner updates."""
        return set(self._trainable([name for unit in self.trained_units() for name in self.plan.params[unit]]))

    def stored_forward(self):
        """The model with every unit's input detached, returning ``(output, (), values of the
        projected unit outputs)``; unlike ``Executable.local_forward()`` it keeps no feedback taps alive."""
        if self._stored_forward is None:
            nodes = {n.name: n for n in self.program.traced.graph.nodes}
            self._stored_forward = build_forward(self.program.traced, [], self.program.partition, True,
                                                 [nodes[p.node] for p in self.plan.projections])
        return self._stored_forward

    def _stored(self, inputs, targets, loss_fn):
        """One forward keeping each unit's local graph, then one local backward per unit, through
        that unit's own graph only (unit inputs are detached: no error crosses a unit boundary).
        Units are visited from the output down and each graph (and delta) is freed after its
        backward, so the deltas never all live at once (one backward from every unit at once would
        hold them together: twice BP's peak memory on a deep, wide MLP)."""
        plan = self.plan
        prepared = self.before_forward(inputs)
        output, _, projected = self.stored_forward()(*inputs)
        loss, errors, updates = self._output_update(output, targets, loss_fn)
        if self.hidden_learn and plan.projections:
            values = dict(zip((p.node for p in plan.projections), projected))
            del projected
            signal = self.signal(errors, output, targets, batch_size(inputs, output))
            if not prepared:
                self.before_update(inputs, output, {n: v.detach() for n, v in values.items()}, signal)
            for unit in reversed(plan.hidden_units):
                projections = plan.of_unit(unit)
                self._unit_update(unit, [values.pop(p.node) for p in projections], projections, signal, updates,
                                  retain=self._shares_graph(plan.params[unit]))
        return self._result(loss, output), updates

    def _unit_update(self, unit: int, outputs: list, projections: list, signal: Signal, updates: dict,
                     retain: bool = False) -> None:
        """Add unit ``unit``'s update: its projected signals pulled back through its own graph
        (``retain``: keep the graph's saved tensors, see :meth:`_shares_graph`)."""
        names = self._trainable(self.plan.params[unit])
        grads = torch.autograd.grad(outputs, [self.program.params[n] for n in names],
                                    [self.delta(p, signal) for p in projections], allow_unused=True,
                                    retain_graph=retain)
        accumulate(updates, names, grads)

    def _trainable(self, names) -> list:
        """Of ``names``, those that require grad now (frozen since the learner was built: no update)."""
        return [n for n in names if self.program.params[n].requires_grad]

    def _shares_graph(self, names) -> bool:
        """Whether, in the stored forward, a unit with parameters ``names`` may share graph nodes
        with another unit's backward (a parameter path such as ``w.t()`` computed once and read by
        both): then a backward through them must not free their saved tensors (each unit's graph
        is still freed with its outputs). Update-unlocked stages recompute such paths per unit."""
        return any(name in self.plan.shared for name in names)

    def _unlocked(self, inputs, targets, loss_fn):
        """Units one after another; a hidden unit's update is computed inside ``visit``, right after
        its forward, and its graph and input are released before the next unit runs."""
        program, plan = self.program, self.plan
        signal = self.signal(None, None, targets, batch_size(inputs, None)) if self.hidden_learn else None
        learning = set(self.trained_units())
        stages = [program.unit_forwards()[index] for index in self.order]
        needs_graph = [stage.unit.index in learning for stage in stages]
        updates, position = {}, [0]

        def visit(stage, unit_inputs, unit_outputs):
            index = stage.unit.index
            if self.hidden_learn and index in plan.hidden_units:
                by_node = dict(zip((n.name for n in stage.outputs), unit_outputs))
                projections = plan.of_unit(index)
                self._unit_update(index, [by_node[p.node] for p in projections], projections, signal, updates)
                self.unit_done(index, updates)
            position[0] += 1
            if position[0] < len(stages):          # grad mode of the next unit's forward
                torch.set_grad_enabled(needs_graph[position[0]])

        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(needs_graph[0] if stages else previous)
            output = program.run_units(inputs, visit, stages=stages)
        finally:
            torch.set_grad_enabled(previous)
        loss, _, output_updates = self._output_update(output, targets, loss_fn)
        for name, update in output_updates.items():
            accumulate(updates, [name], [update])
        return self._result(loss, output), updates

    def unit_done(self, index: int, updates: dict) -> None:
        """Update-unlocked executors call this right after hidden unit ``index``'s update was added
        to ``updates``: the parameters it completes are handed to :meth:`launch_update` (data
        parallel: their all-reduce overlaps the next units; in-step updates: checked or applied,
        and taken out of ``updates``)."""
        self.launch_update(self.final_updates()[index], updates)

    def final_updates(self) -> dict:
        """{hidden unit: its parameters whose update is complete once it has run} in update-unlocked
        execution (``self.order``, the output units' updates last): a shared parameter is complete
        after the last unit using it, and never before the output units when one of them uses it.
        Fixed by the plan and the order, so found once per learner (every step asks for it)."""
        if self._final_updates is None:
            self._final_updates = self._find_final_updates()
        return self._final_updates

    def _find_final_updates(self) -> dict:
        plan = self.plan
        uses = [(index, plan.params[index]) for index in self.order if index in plan.hidden_units]
        done = completed_by(uses + [(None, plan.params[index]) for index in plan.output_units])
        return {index: done.get(index, []) for index in plan.hidden_units}

    def _output_update(self, output, targets, loss_fn) -> tuple:
        """(loss, e = dL/d outputs, the output units' update), from ONE backward of the loss that
        stops at the output units' detached inputs: the output units learn from their local gradient."""
        outs = as_tuple(output)
        names = self._trainable([name for unit in self.plan.output_units for name in self.plan.params[unit]])
        with torch.enable_grad():
            loss = scalar_loss(loss_fn, outs, targets)
            grads = torch.autograd.grad(loss, [*outs, *(self.program.params[n] for n in names)], allow_unused=True,
                                        retain_graph=self._shares_graph(names))
        errors = tuple(g if g is not None else torch.zeros_like(o) for g, o in zip(grads, outs))
        updates = {}
        accumulate(updates, names, grads[len(outs):])
        return loss.detach(), errors, updates

    def _result(self, loss, output) -> StepResult:
        return StepResult(float(loss), detached_output(output), {"execution": self.options.get("execution", "stored")})

    # -- state ------------------------------------------------------------------------------------

    def extra_state(self) -> dict:
        return {} if self.projections is None else {"projections": self.projections.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.projections is not None:
            self.projections.load_state_dict(state["projections"])


def _stored_with_graph(learner, inputs, targets, loss_fn):
    with torch.enable_grad():
        return learner._stored(inputs, targets, loss_fn)


STORED = Executor("stored", _stored_with_graph, doc="one forward keeping each unit's graph, one local backward per unit")
UPDATE_UNLOCKED = Executor("update-unlocked", DirectLearner._unlocked, hands_over=True,
                           doc="units one by one, each hidden unit's local backward right after its forward")


def _check_projection_scale(algorithm: str, options: dict, given: dict) -> None:
    init = options["projection_init"]
    if init in ("uniform", "normal") and options["projection_scale"] is None:
        raise OptionError(f"projection_init={init!r} of algorithm {algorithm!r} needs projection_scale "
                          "(the bound of 'uniform' or the std of 'normal')")
    if init not in ("uniform", "normal") and "projection_scale" in given:
        raise OptionError(f"option 'projection_scale' of algorithm {algorithm!r} applies only to "
                          f"projection_init='uniform' or 'normal', not {init!r}")
    if init not in ("he_uniform",) and "projection_fan" in given:
        raise OptionError(f"option 'projection_fan' of algorithm {algorithm!r} applies only to "
                          f"projection_init='he_uniform', not {init!r}")


@register_algorithm
class DirectFeedbackAlignment(DirectLearner):
    """DFA (Nokland 2016): delta_u = e B_u."""
    name = "dfa"
    linear_in_loss = True
    OPTIONS = {**PROJECTION_OPTIONS}

    def signal(self, errors, output, targets, batch):
        return Signal(batch, dense=flat_error(errors))


@register_algorithm
class SignDirectFeedbackAlignment(DirectLearner):
    """sDFA (paper 001 section 2.1): delta_u = sign(e) B_u / N (batch_scaling='mean')."""
    name = "sdfa"
    OPTIONS = {**PROJECTION_OPTIONS, **BATCH_SCALING}

    def signal(self, errors, output, targets, batch):
        scale = 1.0 / batch if self.options["batch_scaling"] == "mean" else 1.0
        return Signal(batch, dense=torch.sign(flat_error(errors)) * scale)


@register_algorithm
class DirectRandomTargetProjection(DirectLearner):
    """DRTP (paper 001 Alg. 1): delta_u = -y* B_u / N (batch_scaling='mean'); needs no output, so it
    runs update-unlocked by default."""
    name = "drtp"
    OPTIONS = {**PROJECTION_OPTIONS, **BATCH_SCALING, **EXECUTION}

    def signal(self, errors, output, targets, batch):
        scale = 1.0 / batch if self.options["batch_scaling"] == "mean" else 1.0
        return label_signal(targets, self.plan.signal_dim, batch, -scale, self.name)


@register_algorithm
class ShallowLearning(DirectLearner):
    """Shallow learning: hidden units frozen (never written to .grad), the output unit learns."""
    name = "shallow"
    linear_in_loss = True
    hidden_learn = False
    OPTIONS = {**EXECUTION}

