"""``fbcompile train``: train a model with one algorithm, with metrics, checkpoints and plots.

DIR/metrics.jsonl gets one JSON line per epoch, DIR/checkpoint.pt is written atomically after
every epoch, DIR/config.json records the run (with "provenance": where each value came from, the
user or the algorithm's recommended settings and their paper) and DIR/curves.png plots it. Values
left out (--lr, --optimizer, --loss, --condition, --epochs, learner options) are the algorithm's
recommended settings for the model's family (`fbcompile algorithms ALGO`). --resume DIR continues
a stopped run exactly (bitwise) where its last checkpoint left it; with --epochs N it trains on to
N epochs.

Under torchrun (`torchrun --nproc_per_node=N -m fbcompile train ...`) the run is data parallel:
--batch-size is the global batch, split across the N processes; rank 0 alone prints and writes
DIR/; config.json records world_size; --resume continues at any number of processes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import OptionError
from ..training import CHECKPOINT, METRICS, load_checkpoint, read_metrics
from . import arguments
from ..models import BUILTIN_MODELS
from .runs import RunConfig, build_run, check_divisible, launched, trainer_for, world_size

# Flags whose value is part of the saved configuration: --resume refuses them (it would not be
# the same run any more); only --epochs may change.
FIXED = ("model", "data", "algo", "input_shape", "model_option", "condition", "variant", "batch_size", "lr", "optimizer",
         "loss",
         "momentum", "weight_decay", "seed", "data_seed", "subset", "beta", "option", "predict_mode", "diagnostics",
         "in_step_updates", "autocast")


def add_parser(commands):
    parser = commands.add_parser("train", help="train a model with one algorithm (metrics, checkpoints, resume, plots)",
                                 description=arguments.description(__doc__))
    arguments.add_model(parser, recommended=True)
    arguments.add_data(parser)
    parser.add_argument("--algo", default="bp", metavar="ALGO",
                        help="learning algorithm (default bp); list them with `fbcompile algorithms`")
    arguments.add_learner(parser)
    arguments.add_training(parser)
    parser.add_argument("--diagnostics", action="store_true",
                        help="record per-unit angles between each update and the BP gradient every epoch")
    parser.add_argument("--out", metavar="DIR", help="output directory (default runs/MODEL-ALGO-seedS)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run saved in DIR")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plot", action="store_true", help="do not write DIR/curves.png")
    parser.set_defaults(run=run, parser=parser)
    return parser


def run(args) -> int:
    with launched() as group:
        return _run(args, group)


def _run(args, group) -> int:
    if args.resume:
        config, directory, state = _resumed(args)
    else:
        config = arguments.run_config(args, args.algo)
        directory = Path(args.out or f"runs/{Path(config.model).stem}-{config.algorithm}-seed{config.seed}")
        if (directory / CHECKPOINT).exists():
            raise OptionError(f"{directory} already holds a run; continue it with --resume {directory} "
                              "or choose another --out")
        state = None
    check_divisible(config.batch_size, group)
    config.world_size = world_size(group)
    run_ = build_run(config, warn=lambda line: print(line, file=sys.stderr, flush=True), process_group=group)
    lead = run_.learner.world_size == 1 or trainer_rank(run_) == 0
    print(f"{run_.dataset.describe()}\nmodel {config.model}: {type(run_.model).__name__}, "
          f"{sum(p.numel() for p in run_.model.parameters()):,} parameters, {len(run_.program.units)} units; "
          f"algorithm {config.label()}; writing to {directory}/"
          + (f"; {config.world_size} processes, global batch {config.batch_size}" if config.world_size > 1 else ""),
          flush=True)
    print(settings_line(config), flush=True)
    trainer = trainer_for(run_, out_dir=directory, progress=not args.no_progress,
                          log=lambda line: print(line, flush=True))
    if state is not None:
        trainer.restore(state)
        print(f"resumed after epoch {trainer.epoch}", flush=True)
    elif lead:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / METRICS).write_text("")
    if lead:
        (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    history = trainer.fit(config.epochs)
    if lead and not args.no_plot and history:
        from ..plots import training_curves
        path = training_curves(read_metrics(directory / METRICS), directory / "curves.png",
                               title=f"{config.model} on {config.data}, {config.label()}")
        print(f"wrote {directory / METRICS}, {directory / CHECKPOINT} and {path}")
    return 0


def trainer_rank(run_) -> int:
    return run_.learner.communicator.rank


def settings_line(config) -> str:
    """``settings: optimizer='adam', lr=0.003, beta=0.2 [user], ...``: the resolved values, the user's
    marked (the sources of the others are in config.json and `fbcompile algorithms ALGO`)."""
    shown = {"optimizer": config.optimizer, "lr": config.lr, "loss": config.loss, "condition": config.condition,
             "epochs": config.epochs, **{f"option.{k}": v for k, v in config.options.items() if k != "seed"}}
    parts = [f"{k.removeprefix('option.')}={v!r}" + (" [user]" if config.provenance.get(k) == "user" else "")
             for k, v in shown.items()]
    return ("settings: " + ", ".join(parts) + f"\n  (unmarked: recommended for {config.algorithm} on a "
            f"{config.family} model; sources in config.json's provenance)")


def _resumed(args):
    """(config, directory, checkpoint state) of ``--resume DIR``; only --epochs may change."""
    if args.out and Path(args.out) != Path(args.resume):
        raise OptionError("--resume writes into the run's own directory; leave out --out")
    directory = Path(args.resume)
    state = load_checkpoint(directory)
    config = RunConfig.from_dict(state["config"])
    if not config.provenance:         # a checkpoint from before recommended settings: its values as saved
        config.provenance = {"all": "recorded in the checkpoint"}
    _confirm_model_code(args, config, directory)
    given = [name for name in FIXED if given_flag(args, name) and not (name == "model" and args.model == config.model)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise OptionError(f"--resume continues the saved configuration; {flags} cannot change "
                          "(only --epochs can)")
    if given_flag(args, "epochs"):
        config.epochs = args.epochs
    if state["epoch"] >= config.epochs:
        print(f"{directory} has already trained {state['epoch']} of {config.epochs} epochs; "
              "pass --epochs N to train further")
    return config, directory, state


def _confirm_model_code(args, config, directory) -> None:
    """A checkpoint is data and never decides which code runs: a run of a model defined in a Python
    file resumes only when the user names that same file again with --model."""
    if config.model in BUILTIN_MODELS:
        return
    if not given_flag(args, "model") or args.model != config.model:
        raise OptionError(f"the run in {directory} trains the model {config.model!r}, which is code: resuming "
                          f"would import and run it. Repeat --model {config.model} to confirm you trust that file")


def given_flag(args, dest: str) -> bool:
    """Whether the flag storing ``dest`` appears on the command line (``--flag v`` or ``--flag=v``)."""
    strings = [s for a in args.parser._actions if a.dest == dest for s in a.option_strings]
    return any(token == s or token.startswith(s + "=") for token in getattr(args, "argv", []) for s in strings)

