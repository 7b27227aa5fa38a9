"""One training run, described by plain data (so it can be saved in a checkpoint) and built from it.

:class:`RunConfig` is what ``fbcompile train`` records; :func:`build_run` turns it into the dataset,
model, compiled program, learner, optimizer and loss, the same way on a fresh start and on resume.

Values the user leaves out (``None``: optimizer, lr, loss, condition, epochs, and every learner
option the algorithm has a recommendation for) are filled by :func:`apply_recommended` from
:func:`fbcompile.recommended`; ``RunConfig.provenance`` records, per value, where it came from
(``user`` or the recommendation's source), and config.json keeps it.

Under ``torchrun`` (:func:`launched`) the command runs data parallel: one process group (gloo: the
CLI's models live on the CPU), one learner per rank with ``process_group="world"``, the global
batch sharded by the trainer; ranks other than 0 print nothing (their errors are agreed with rank 0's
and printed there) and ``RunConfig.world_size`` records the number of processes.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from .. import compile as compile_program
from .. import learner as make_learner
from ..autocast_guard import mixed_precision
from ..data import Dataset, load_dataset
from ..errors import FBCompileError, OptionError
from ..runtime.base import model_device
from ..runtime.options import make_optimizer
from . import resolve


@dataclass
class RunConfig:
    """Everything that defines a run; JSON-serialisable."""
    model: str = "mlp"
    data: str = "digits"
    algorithm: str = "bp"
    options: dict = field(default_factory=dict)
    model_options: dict = field(default_factory=dict)
    input_shape: list | None = None
    condition: str | None = None        # None: the algorithm's recommended condition
    variants: list = field(default_factory=list)
    frontend: str = "auto"              # fx, export or auto (fbcompile.frontends)
    epochs: int | None = None           # None: default_epochs x the recommended epochs multiplier
    batch_size: int = 64
    lr: float | None = None             # None: recommended
    optimizer: str | None = None        # None: recommended
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    data_seed: int = 0
    subset: int | None = None
    diagnostics: bool = False
    predict: dict = field(default_factory=dict)
    loss: str | None = None             # None: recommended ("cross_entropy", or "bce" for DRTP)
    family: str | None = None           # model family the recommendation was taken for
    provenance: dict = field(default_factory=dict)    # value -> "user" or its source
    world_size: int = 1                 # processes of the (latest) run; batch_size is the global batch
    in_step_updates: bool = False       # learner.step(optimizer=): updates applied inside the step
    autocast: str | None = None         # "bfloat16" / "float16": compiled and trained under torch.autocast

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def label(self) -> str:
        """``dtp(beta=0.5)``: the algorithm with the options the user gave (seed left out)."""
        shown = {k: v for k, v in self.options.items() if k != "seed"
                 and self.provenance.get(f"option.{k}", "user") == "user"}
        return self.algorithm + (f"({', '.join(f'{k}={v}' for k, v in shown.items())})" if shown else "")


@dataclass
class Run:
    config: RunConfig
    dataset: Dataset
    model: Any
    program: Any
    learner: Any
    optimizer: Any
    loss_fn: Any


def load_data(spec: str, *, seed: int = 0, subset: int | None = None) -> Dataset:
    """``load_dataset`` plus an optional cut of the training set to its first ``subset`` samples."""
    dataset = load_dataset(spec, seed=seed)
    if subset is None or subset >= dataset.num_train:
        return dataset
    if subset < 1:
        raise OptionError(f"--subset must be >= 1, got {subset}")
    return Dataset(name=dataset.name, train_x=dataset.train_x[:subset], train_y=dataset.train_y[:subset],
                   test_x=dataset.test_x, test_y=dataset.test_y, num_classes=dataset.num_classes,
                   input_shape=dataset.input_shape, task=dataset.task)


def input_shape_for(config: RunConfig, dataset: Dataset) -> tuple:
    if config.input_shape is None:
        return tuple(dataset.input_shape)
    shape = tuple(config.input_shape)
    if shape != tuple(dataset.input_shape):
        raise OptionError(f"--input-shape {','.join(map(str, shape))} does not match the data: {dataset.describe()}")
    return shape


def build_program(spec: str, input_shape, num_classes: int, *, model_options=None, seed: int = 0,
                  condition: str = "T", variants=(), example: torch.Tensor | None = None,
                  dtype=torch.float32, frontend: str = "auto", autocast: str | None = None):
    """(model, program): MODEL built, checked on an example batch and compiled (under torch.autocast
    when ``autocast`` names a dtype: the program then runs only under it)."""
    model = resolve.build(spec, input_shape, num_classes, model_options, seed=seed).to(dtype)
    if example is None:
        example = torch.randn(2, *input_shape, device="cpu", generator=torch.Generator().manual_seed(seed))
    example = example.to(model_device(model), dtype)     # the model's device (torch's default)
    resolve.check_forward(model, example, spec)
    with mixed_precision(example.device.type, autocast):
        return model, compile_program(model, example, condition=condition, variants=tuple(variants),
                                      frontend=frontend)


TP_CONDITION_T = ("plain TP (no difference correction) with condition T propagates targets through "
                  "transposes, which are no inverses of the forward ops: it does not learn; use --condition P "
                  "(pseudo-inverse feedback, the recommended setting) or dtp")


def apply_recommended(config: RunConfig, dataset: Dataset | None = None, *, default_epochs: int = 10,
                      warn=None) -> RunConfig:
    """Fill the values ``config`` leaves open from :func:`fbcompile.recommended` for its algorithm and
    model family, and record every value's origin in ``config.provenance`` (in place; returned).

    A value already set counts as the user's. Learner options: the recommendation's, overridden by
    the user's (``config.options``). A resolved config (one with a provenance: a checkpoint's) is
    left unchanged. Plain TP under condition T is warned about (``warn(line)``, else a
    UserWarning): it needs an (approximate) inverse."""
    from ..recommended import model_family, recommended
    resolve.check_algorithms([config.algorithm])
    if config.provenance:
        return config
    if config.family is None:
        if config.model in resolve.BUILTIN_MODELS:
            config.family = model_family(config.model)
        else:
            shape = tuple(config.input_shape or (dataset.input_shape if dataset is not None else ()))
            classes = dataset.num_classes if dataset is not None else 10
            config.family = model_family(resolve.build(config.model, shape, classes, config.model_options,
                                                       seed=config.seed))
    rec = recommended(config.algorithm, config.family)
    provenance = dict(config.provenance)
    if config.loss is None and dataset is not None and dataset.task != "classification":
        config.loss, provenance["loss"] = "mse", "regression data"
    for name, setting in (("optimizer", rec.optimizer), ("lr", rec.lr), ("loss", rec.loss),
                          ("condition", rec.condition)):
        if getattr(config, name) is None:
            setattr(config, name, setting.value)
            provenance.setdefault(name, setting.source)
        else:
            provenance.setdefault(name, "user")
    if config.epochs is None:
        config.epochs = max(1, round(default_epochs * rec.epochs_multiplier.value))
        provenance.setdefault("epochs", f"{default_epochs} x epochs_multiplier {rec.epochs_multiplier.value} "
                                        f"({rec.epochs_multiplier.source})")
    else:
        provenance.setdefault("epochs", "user")
    options = {}
    for name, setting in rec.options.items():
        if name not in config.options:
            options[name] = setting.value
            provenance.setdefault(f"option.{name}", setting.source)
    for name, value in config.options.items():
        options[name] = value
        provenance.setdefault(f"option.{name}", "user")
    config.options = options
    config.provenance = provenance
    if config.algorithm == "tp" and config.condition == "T":
        if warn is None:
            import warnings
            warnings.warn(TP_CONDITION_T, UserWarning, stacklevel=3)
        else:
            warn(f"warning: {TP_CONDITION_T}")
    return config


def build_run(config: RunConfig, dataset: Dataset | None = None, *, warn=None, default_epochs: int = 10,
              process_group=None) -> Run:
    """Build (or rebuild, for resume) every object of a run from its configuration (values left
    open are filled by :func:`apply_recommended` first)."""
    resolve.check_algorithms([config.algorithm])
    if dataset is None:
        dataset = load_data(config.data, seed=config.data_seed, subset=config.subset)
    apply_recommended(config, dataset, warn=warn, default_epochs=default_epochs)
    shape = input_shape_for(config, dataset)
    model, program = build_program(config.model, shape, dataset.num_classes, model_options=config.model_options,
                                   seed=config.seed, condition=config.condition, variants=config.variants,
                                   frontend=config.frontend, autocast=config.autocast,
                                   example=dataset.train_x[:2])
    _check_outputs(model, dataset, config.model)
    options = {"seed": config.seed, **config.options}
    learner = make_learner(program, config.algorithm, **options,
                           **({} if process_group is None else {"process_group": process_group}))
    if config.predict:
        _check_predict(learner, config.predict, dataset.train_x[:2])
    optimizer = make_optimizer(config.optimizer, model.parameters(), config.lr, config.weight_decay,
                               momentum=config.momentum)
    return Run(config, dataset, model, program, learner, optimizer, loss_for(config, dataset))


def loss_for(config: RunConfig, dataset: Dataset):
    """The run's loss: MSE for regression; for classification the configured convention."""
    from ..recommended import loss_function
    if dataset.task != "classification" or config.loss == "mse":
        return resolve.loss_for(dataset.task)
    return loss_function(config.loss or "cross_entropy")


def _check_outputs(model, dataset: Dataset, spec: str) -> None:
    """The model must return (batch, classes) for classification, (batch, outputs) for regression."""
    training = model.training
    with torch.no_grad():
        output = model.eval()(dataset.train_x[:2])      # eval: BatchNorm statistics stay untouched
    model.train(training)
    if tuple(output.shape) != (2, dataset.num_classes):
        what = "classes" if dataset.task == "classification" else "regression outputs"
        raise OptionError(f"model {spec!r} returns shape {tuple(output.shape)} for a batch of 2, but "
                          f"{dataset.name} has {dataset.num_classes} {what}: it should return (2, {dataset.num_classes}) "
                          "(a model class receives num_classes when its constructor takes that argument)")


def _check_predict(learner, options: dict, example) -> None:
    """Fail before training when ``learner.predict`` does not take ``options`` (or rejects them)."""
    accepted = resolve.accepted_keywords(learner.predict)
    unknown = [k for k in options if accepted is not None and k not in accepted]
    if unknown:
        raise OptionError(f"--predict-{unknown[0]} does not apply to algorithm {learner.name!r} (its predict() "
                          f"takes {', '.join(sorted(accepted - {'inputs'})) or 'no options'})")
    learner.predict(example, **options)


def trainer_for(run: Run, **kwargs):
    """A :class:`~fbcompile.training.Trainer` for ``run`` (kwargs: out_dir, progress, log, ...)."""
    from ..training import Trainer
    c = run.config
    torch.manual_seed(c.seed)
    return Trainer(run.learner, run.optimizer, run.dataset, loss_fn=run.loss_fn, batch_size=c.batch_size,
                   seed=c.seed, config=c.to_dict(), diagnostics=c.diagnostics, predict=c.predict,
                   in_step_updates=c.in_step_updates, autocast=c.autocast, **kwargs)


def check_positive(name: str, value, minimum=1) -> None:
    if value is not None and value < minimum:
        raise FBCompileError(f"{name} must be >= {minimum}, got {value}")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def launched():
    """The process group of a torchrun launch (None when not launched so): initialised on entry
    (gloo), destroyed on exit. Ranks other than 0 print nothing from here on, errors included: a
    step's failure is agreed across the ranks and printed by rank 0, once."""
    if not under_torchrun():
        yield None
        return
    import torch._dynamo  # noqa: F401  (before the group exists: see below)
    import torch.distributed as dist
    # Importing torch._dynamo after init_process_group leaves references to the default group that
    # destroy_process_group() cannot clear, so gloo's worker threads outlive it; at interpreter exit
    # one of them may still be releasing the barrier's tensors and aborts the rank ("terminate called
    # without an active exception"). compile() imports torch._dynamo, so it is imported here first.
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.get_rank() != 0:             # for the rest of this process: its error is printed by rank 0
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:
        yield "world"
        dist.barrier()         # no rank tears gloo down while another is still in a collective
    finally:
        dist.destroy_process_group()


def world_size(process_group) -> int:
    if process_group is None:
        return 1
    import torch.distributed as dist
    return dist.get_world_size()


def check_divisible(batch_size: int, process_group) -> None:
    """The global batch must give every rank at least one sample."""
    size = world_size(process_group)
    if batch_size < size:
        raise FBCompileError(f"--batch-size {batch_size} is the global batch, split across {size} processes; "
                             f"it must be at least {size}")
