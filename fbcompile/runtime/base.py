"""The learner contract shared by every algorithm: a template method around a transaction.

``learner.step(inputs, targets, loss_fn)`` computes the parameter updates of one batch and adds
them to the model parameters' ``.grad`` (on the scale of the gradient of ``loss_fn``), so any
optimizer, scheduler, clipping or all-reduce applies unchanged. It returns a :class:`StepResult`.
The steps of ``step`` are fixed here; an algorithm fills in :meth:`Learner.compute`::

    step:  transaction( compute -> {parameter: update} -> check finite )  ->  add updates to .grad

``compute`` either is the algorithm's own method (a learner with one way to run) or runs the
learner's :class:`Executor`, a small named execution path ("feedback-graph", "compiled-local",
"autograd-local", "compiled-stored", "update-unlocked", ...) chosen once by
:meth:`Learner.choose_executor`; its name is recorded in ``StepResult.details["executor"]``.

A step is a transaction (:mod:`.transaction`): updates are computed into temporaries, checked to
be finite, and only then written. If anything fails (non-finite targets or updates, a singular
inverse, a bad shape) the step raises and leaves the model's parameters, ``.grad``, buffers and all
learner state (what it owns: auxiliary weights, their optimizer, random generators, extra state)
exactly as they were.

In-step updates (``step(..., optimizer=)``, :mod:`.in_step`, update-unlocked learners only): each
unit's update is applied by the optimizer as soon as it is made instead of being added to
``.grad``; a checking pass first keeps the failed-step guarantee.

Data parallel (``process_group=``, :mod:`.distributed`): each rank computes on its shard, the step's
failure is agreed across ranks inside the transaction, and the updates written to ``.grad`` are the
ranks' mean (1/R) sum_r U_r -- the whole batch's update for equal shards.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import FBCompileError, OptionError
from ..program import accumulate_grads, as_tuple
from ..tensor_attributes import state_tensors
from .options import Option, integer, parse_options
from .registry import other_algorithms_with
from .distributed import resolve_group
from .finite import check_finite
from .transaction import Transaction, owned_state

COMMON_OPTIONS = {"seed": Option(0, integer, "seed of the learner's random generators (feedback weights, noise)")}


@dataclass
class StepResult:
    loss: float
    output: torch.Tensor
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Executor:
    """One execution path of a learner: ``run(learner, inputs, targets, loss_fn)`` returns
    ``(StepResult, {parameter name: update})``; ``autograd`` says whether it records an autograd graph.
    ``run=None`` means the learner's own :meth:`Learner.compute` is the path."""
    name: str
    run: Callable | None = None
    autograd: bool = True
    doc: str = ""
    hands_over: bool = False    # hands each unit's final update to launch_update as it is made


OWN_COMPUTE = Executor("compute", None, doc="the learner's own compute()")


class Learner:
    """Base class. Subclasses set ``name`` and ``OPTIONS`` and either implement :meth:`compute` or
    choose an :class:`Executor` in :meth:`choose_executor`."""

    name = "learner"
    OPTIONS: dict = {}
    linear_in_loss = False      # every update a linear map of e = dL/dy (loss scaling is exact: .loss_scaling)

    def __init__(self, program, process_group=None, **options):
        self.options = parse_options(self.name, {**COMMON_OPTIONS, **self.OPTIONS}, options,
                                     elsewhere=other_algorithms_with(self.name))
        self.program = program
        self.model = program.model
        self.generator = torch.Generator().manual_seed(self.options["seed"])
        self.steps = 0
        self.last = {}
        self.buffers = dict(state_tensors(self.model))      # buffers and tensor attributes: rolled back
        self.unplanned = ()         # see check_set_up
        self._executor = None
        self.sink = None            # in-step updates: takes each unit's update as it is handed over
        self.communicator = None
        group = resolve_group(process_group)
        if group is not None:
            from .distributed import Communicator
            self.communicator = Communicator(self, group)

    # -- the contract ---------------------------------------------------------------------------
    def step(self, inputs, targets, loss_fn, optimizer: torch.optim.Optimizer | None = None,
             scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """One step: the updates added to ``.grad``; with ``optimizer``, applied by it inside the
        step unit by unit instead (update-unlocked learners only, see :mod:`.in_step`); with
        ``scaler``, the updates of the loss scaled for float16 (:mod:`.loss_scaling`)."""
        inputs = as_tuple(inputs)
        if scaler is not None:
            if optimizer is not None:
                raise OptionError("step(..., optimizer=, scaler=): in-step updates apply each unit's update at once, "
                                  "before a loss scaler could check them all; pass one of the two")
            from .loss_scaling import scaled_step
            return scaled_step(self, inputs, targets, loss_fn, scaler)
        if optimizer is not None:
            from .in_step import applied_step
            return applied_step(self, inputs, targets, loss_fn, optimizer)
        with self.transaction(inputs=inputs):
            result, grads = self.checked_compute(inputs, targets, loss_fn)
        return self.finish_step(result, grads)

    def finish_step(self, result: StepResult, grads: dict) -> StepResult:
        """The end of a step: its updates ``grads`` added to ``.grad``, the step counted, the
        executor recorded (a plain step and a loss-scaled one, :mod:`.loss_scaling`)."""
        result.details.setdefault("executor", self.executor.name)
        accumulate_grads(self.program.params, list(grads), list(grads.values()))
        self.steps += 1
        return result

    def checked_compute(self, inputs: tuple, targets, loss_fn) -> tuple[StepResult, dict]:
        """:meth:`compute` and the finiteness check; with a process group, on this rank's shard and
        agreed across the ranks (a failure anywhere raises everywhere), the updates the ranks' mean.
        Call it inside the step's transaction."""
        def local(loss):
            result, grads = self.compute(inputs, targets, loss)
            check_finite(grads, result)
            return result, grads
        if self.communicator is None:
            return local(loss_fn)
        return self.communicator.run_step(local, loss_fn, int(inputs[0].shape[0]) if inputs[0].dim() else 1,
                                          shared_loss=self.targets_from_error)

    @property
    def targets_from_error(self) -> bool:
        """Whether the update depends on the output error e beyond linearly: learners that form an
        output target t_L = h_L - beta e (those with option ``beta``), then propagate it through
        nonlinear maps. Data parallel, their ranks compute with their share of the global loss."""
        return "beta" in self.OPTIONS

    def launch_update(self, names, updates: dict) -> None:
        """Hook for update-unlocked executors: the updates of ``names`` in ``updates`` are final for
        this step; with a process group their all-reduce starts now and overlaps what follows; with
        in-step updates (:mod:`.in_step`) they are taken out of ``updates``, checked and applied."""
        if self.sink is not None:
            self.sink.take(names, updates)
        elif self.communicator is not None:
            self.communicator.launch(list(names), updates)

    def average(self, tensors: list) -> list:
        """The ranks' mean of ``tensors`` during a step (one process: the tensors themselves); for
        estimates applied before the step ends (MF-DD's immediate updates)."""
        if self.communicator is None or not self.communicator.active:
            return list(tensors)
        return self.communicator.average_checked(list(tensors))

    @property
    def world_size(self) -> int:
        return 1 if self.communicator is None else self.communicator.world

    def compute(self, inputs: tuple, targets, loss_fn) -> tuple[StepResult, dict]:
        """(result, {parameter name: update}) without touching ``.grad``; may update auxiliary state.
        By default the chosen executor's path."""
        executor = self.executor
        if executor.run is None:
            raise FBCompileError(f"learner {type(self).__qualname__} ({self.name!r}) implements neither compute() "
                                 "nor choose_executor()")
        result, updates = executor.run(self, inputs, targets, loss_fn)
        result.details.setdefault("executor", executor.name)
        return result, updates

    # -- execution paths --------------------------------------------------------------------------
    def choose_executor(self) -> Executor:
        """This learner's execution path, chosen once (subclasses with several paths override it and
        choose at the end of their construction). Default: the learner's own :meth:`compute`."""
        return OWN_COMPUTE

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            self._executor = self.choose_executor()
        return self._executor

    @executor.setter
    def executor(self, executor: Executor) -> None:
        self._executor = executor

    # -- what the learner owns ------------------------------------------------------------------
    def parameters(self) -> list:
        """The learner's auxiliary trainable parameters (never the model's)."""
        return []

    @property
    def step_writes_state(self) -> bool:
        """Whether a step can change this learner's state: it owns trainable tensors or an optimizer,
        or a module of its own draws random numbers. Derived from what the learner owns (see
        :func:`.transaction.owned_state`); a failed step's rollback does not depend on it."""
        return owned_state(self).writable

    def predict(self, inputs):
        with torch.no_grad():
            return self.model(*as_tuple(inputs))

    def diagnostics(self, inputs, targets, loss_fn):
        from .diagnostics import diagnose
        return diagnose(self, as_tuple(inputs), targets, loss_fn)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"algorithm": self.name, "options": dict(self.options), "steps": self.steps,
                "generator": self.generator.get_state(), **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("algorithm") != self.name:
            raise FBCompileError(f"state of algorithm {state.get('algorithm')!r} cannot be loaded into a "
                                 f"{self.name!r} learner")
        missing = [key for key in ("steps", "generator") if key not in state]
        if missing:
            raise FBCompileError(f"the learner state lacks {', '.join(missing)}: not a state_dict() of a learner")
        self.steps = state["steps"]
        self.generator.set_state(state["generator"])
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    # -- transactions ---------------------------------------------------------------------------
    def transaction(self, always_restore: bool = False, inputs: tuple | None = None) -> Transaction:
        """Snapshot what this learner owns and the model's buffers; restore them if the block raises
        (or always, for ``always_restore``). First, before anything can change, the program's
        check that the model is the one captured, its training flags and hooks, and the batch size
        of ``inputs`` (every step, diagnostic and feedback training opens one)."""
        self.program.check_model(inputs)
        self.check_set_up()
        return Transaction(self, always_restore)

    def check_set_up(self) -> None:
        """Raise when a parameter that was frozen when the learner was built requires grad now, and
        the learner would train it but set up nothing for it then (``self.unplanned``, (name,
        parameter) pairs: a direct learner's projections and a Mono-Forward learner's heads are made
        for the units trainable at construction). Unfreezing it would otherwise leave it untrained."""
        late = [name for name, param in self.unplanned if param.requires_grad]
        if late:
            raise FBCompileError(
                f"parameter {late[0]!r} was frozen (requires_grad=False) when learner {self.name!r} was built and "
                "requires grad now; the learner set up its feedback for the parameters trainable then, so it would "
                "not train this one. Build the learner again after unfreezing (or freeze it again)")


def model_device(model) -> torch.device:
    """The device of the model's parameters (or buffers): where a learner's own tensors (random
    projections, feedback maps) must live. They are drawn on the CPU from seeded generators, so the
    same seed gives the same matrices on every device."""
    tensor = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def detached_output(output):
    """The model output (a tensor or a tuple of tensors) detached, for :class:`StepResult`."""
    return output.detach() if torch.is_tensor(output) else tuple(o.detach() if torch.is_tensor(o) else o
                                                                 for o in output)
