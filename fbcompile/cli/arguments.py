"""Argument groups shared by the subcommands, and their translation into a :class:`RunConfig`."""
from __future__ import annotations

import argparse

from ..autocast_guard import AUTOCAST_DTYPES
from ..data import spec_help
from ..runtime.base import model_device
from ..runtime.options import OPTIMIZER_CLASSES
from . import resolve
from .runs import RunConfig, check_positive


RECOMMENDED = "the algorithm's recommended value, see `fbcompile algorithms ALGO`"


def add_model(parser: argparse.ArgumentParser, *, positional: bool = False, recommended: bool = False) -> None:
    """``recommended``: --condition defaults to the algorithm's recommended condition (train,
    compare, bench, which train with an algorithm) instead of T."""
    group = parser.add_argument_group("model")
    if positional:
        group.add_argument("model", metavar="MODEL", help=f"the model: {resolve.model_help()}")
    else:
        group.add_argument("--model", default="mlp", metavar="MODEL",
                           help=f"the model (default mlp): {resolve.model_help()}")
    group.add_argument("--input-shape", metavar="SHAPE", help="input shape without the batch dimension, e.g. "
                       "1,28,28 (default: from the data, or the built-in model's usual shape)")
    group.add_argument("--model-option", action="append", metavar="KEY=VALUE",
                       help="keyword argument of the model constructor, e.g. width=128 (repeatable)")
    group.add_argument("--condition", default=None if recommended else "T", choices=["T", "P", "I"],
                       help="Jacobian matching condition of the feedback rules (default "
                            f"{RECOMMENDED + ': T, P for tp' if recommended else 'T'})")
    group.add_argument("--variant", action="append", default=[], metavar="NAME",
                       help="prefer an alternative rule where one exists (repeatable): exact-statistics "
                            "(LayerNorm / train-mode BatchNorm through their full Jacobian), hadamard "
                            "(activation targets of paper 002 eq. 29)")
    group.add_argument("--frontend", default="auto", choices=["auto", "fx", "export"],
                       help="how the model is captured: fx (torch.fx tracing), export (torch.export, training "
                            "IR, in the model's train/eval mode) or auto (fx, else export; default)")


def add_data(parser: argparse.ArgumentParser, *, default: str | None = "digits") -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", default=default, metavar="DATA",
                       help=f"dataset{f' (default {default})' if default else ''}: {spec_help()}")
    group.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic datasets (default 0)")
    group.add_argument("--subset", type=int, metavar="N", help="train on the first N training samples only")


def add_learner(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("learner options (see `fbcompile algorithms` for each algorithm's)")
    group.add_argument("--beta", type=float, help="output target step of target propagation")
    group.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="any learner option, e.g. --option feedback=ldrl --option feedback_steps=5 "
                            "(values are Python literals, bare words are strings; repeatable)")
    group.add_argument("--predict-mode", metavar="MODE",
                       help="passed to learner.predict(mode=...), e.g. cumulative for Mono-Forward")


def add_training(parser: argparse.ArgumentParser, *, epochs: int = 10) -> None:
    group = parser.add_argument_group("training (values left out: the algorithm's recommended settings, with "
                                      "their sources in DIR/config.json)")
    group.add_argument("--epochs", type=int, default=None,
                       help=f"number of epochs (default {epochs} x the algorithm's recommended epochs multiplier)")
    group.add_argument("--batch-size", type=int, default=64, help="minibatch size (default 64)")
    group.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {RECOMMENDED})")
    group.add_argument("--optimizer", default=None, choices=sorted(OPTIMIZER_CLASSES),
                       help=f"optimizer of the model parameters (default: {RECOMMENDED})")
    group.add_argument("--loss", default=None, choices=["cross_entropy", "bce"],
                       help="classification loss: cross_entropy (softmax) or bce (sigmoid outputs + binary "
                            f"cross-entropy, paper 001) (default: {RECOMMENDED})")
    group.add_argument("--momentum", type=float, default=0.0, help="momentum for sgd and rmsprop (default 0)")
    group.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    group.add_argument("--seed", type=int, default=0, help="seed of model, learner and shuffling (default 0)")
    group.add_argument("--in-step-updates", action="store_true",
                       help="apply each unit's update inside the step as soon as it is made (update-unlocked "
                            "drtp, shallow and mf only): no gradient per parameter is held, for about twice the step time")
    add_autocast(group)


def add_autocast(parser) -> None:
    parser.add_argument("--autocast", choices=AUTOCAST_DTYPES, default=None,
                        help="mixed precision: compile and run every step under torch.autocast with this dtype "
                             "on the model's device")


def model_options(args) -> dict:
    return resolve.parse_pairs(args.model_option, "--model-option")


def input_shape(args):
    return list(resolve.parse_shape(args.input_shape)) if args.input_shape else None


def run_config(args, algorithm: str, *, options: dict | None = None, seed: int | None = None) -> RunConfig:
    """The :class:`RunConfig` of one algorithm from parsed train/compare arguments."""
    for name in ("epochs", "batch_size"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name))
    check_positive("--subset", args.subset)
    predict = {"mode": args.predict_mode} if getattr(args, "predict_mode", None) else {}
    return RunConfig(model=args.model, data=args.data, algorithm=algorithm,
                     options=resolve.learner_options(args) if options is None else options,
                     model_options=model_options(args), input_shape=input_shape(args), condition=args.condition,
                     variants=list(args.variant), frontend=getattr(args, "frontend", "auto"),
                     epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                     loss=getattr(args, "loss", None),
                     momentum=args.momentum, weight_decay=args.weight_decay,
                     seed=args.seed if seed is None else seed, data_seed=args.data_seed, subset=args.subset,
                     diagnostics=getattr(args, "diagnostics", False), predict=predict,
                     in_step_updates=getattr(args, "in_step_updates", False),
                     autocast=getattr(args, "autocast", None))


def model_from_args(args, *, dtype=None, batch: int = 2):
    """(model, example batch) for inspect, verify and bench: the input shape and class count come
    from ``--input-shape``, else ``--data``, else the built-in model's usual shape, else the model's
    first Linear layer. The model has run once on the example (a wrong shape fails here)."""
    import torch

    from .runs import load_data
    dtype = dtype or torch.float32
    seed = getattr(args, "seed", 0)
    num_classes, example, shape = getattr(args, "num_classes", None) or 10, None, None
    if getattr(args, "data", None):
        dataset = load_data(args.data, seed=getattr(args, "data_seed", 0))
        num_classes, shape = dataset.num_classes, tuple(dataset.input_shape)
        example = dataset.train_x[:batch]
    if args.input_shape:
        given = resolve.parse_shape(args.input_shape)
        if shape is not None and given != shape:
            raise resolve.OptionError(f"--input-shape {args.input_shape} does not match --data {args.data} "
                                      f"(inputs {','.join(map(str, shape))})")
        shape = given
    if shape is None:
        shape = infer_shape(args.model, model_options(args))
    if example is None:
        example = torch.randn(batch, *shape, device="cpu", generator=torch.Generator().manual_seed(seed))
    model = resolve.build(args.model, shape, num_classes, model_options(args), seed=seed).to(dtype)
    example = example.to(model_device(model), dtype)     # the model's device (torch's default)
    resolve.check_forward(model, example, args.model)
    return model, example


def program_from_args(args, *, dtype=None, batch: int = 2):
    """(model, program, example batch): :func:`model_from_args`, compiled under ``--condition`` and
    ``--variant``."""
    from .. import compile as compile_program
    model, example = model_from_args(args, dtype=dtype, batch=batch)
    return model, compile_program(model, example, condition=args.condition, variants=tuple(args.variant),
                                  frontend=getattr(args, "frontend", "auto")), example


def infer_shape(spec: str, options: dict) -> tuple:
    """The input shape of a MODEL given neither --input-shape nor --data."""
    from torch import nn
    factory = resolve.model_factory(spec)
    shape = resolve.default_input_shape(spec, factory)
    if shape is not None:
        return shape
    accepted = resolve.accepted_keywords(factory)
    if accepted is not None and "input_shape" not in accepted:
        model = resolve.build(spec, (), 10, options)
        first = next((m for m in model.modules() if getattr(m, "weight", None) is not None), None)
        if isinstance(first, nn.Linear):
            return (first.in_features,)
        what = f"its first layer is {type(first).__name__}" if first is not None else "it has no layers"
    else:
        what = "its constructor takes input_shape"
    raise resolve.OptionError(f"cannot tell the input shape of model {spec!r} ({what}); pass --input-shape, "
                              "e.g. --input-shape 1,28,28, or --data")


def description(doc: str) -> str:
    """A subcommand's --help text: its module docstring's second paragraph, without reST quotes."""
    return doc.split("\n\n")[1].replace("``", "")
