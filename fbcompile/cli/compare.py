"""``fbcompile compare``: several algorithms on the same model and data over several seeds.

``--algos bp,dtp,fa`` names registered algorithms; an entry may carry its own options after colons,
e.g. ``dtp:feedback=ldrl:beta=0.5``. Options given with --beta / --option go to every listed
algorithm that has them. Values left out (--lr, --optimizer, --loss, --condition, --epochs, learner
options) are each algorithm's recommended settings for the model's family (`fbcompile algorithms
ALGO`); DIR/compare.json records every algorithm's resolved configuration and provenance. Prints a
mean +/- std table (sample std over seeds) and writes
DIR/compare.json, DIR/compare.png (bars) and DIR/curves.png (mean curves per algorithm).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from ..errors import OptionError
from ..explain import format_table
from . import arguments, resolve
from .runs import build_run, check_divisible, check_positive, launched, load_data, trainer_for

EPOCHS = 5          # default epochs per run, x each algorithm's recommended epochs multiplier


def add_parser(commands):
    parser = commands.add_parser("compare", help="several algorithms x seeds: mean +/- std table and plot",
                                 description=arguments.description(__doc__))
    arguments.add_model(parser, recommended=True)
    arguments.add_data(parser)
    parser.add_argument("--algos", default="bp,dtp,fa", metavar="A,B,...",
                        help="algorithms, each optionally with :key=value options (default bp,dtp,fa)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per algorithm: --seed, --seed+1, ... (default 3)")
    arguments.add_learner(parser)
    arguments.add_training(parser, epochs=EPOCHS)
    parser.add_argument("--out", metavar="DIR", help="output directory (default runs/compare-MODEL-DATA)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
    return parser


def parse_algos(text: str) -> list[tuple[str, str, dict]]:
    """``"bp,dtp:beta=0.5"`` -> ``[("bp", "bp", {}), ("dtp:beta=0.5", "dtp", {"beta": 0.5})]``."""
    entries = []
    for token in resolve.split_list(text, "--algos"):
        name, *pairs = token.split(":")
        resolve.check_algorithms([name])
        entries.append((token, name, resolve.parse_pairs(pairs, f"--algos {name}:")))
    if len({label for label, _, _ in entries}) != len(entries):
        raise OptionError(f"--algos {text!r} lists an algorithm twice")
    return entries


def run(args) -> int:
    """Under torchrun every run is data parallel over the launched processes; rank 0 reports."""
    with launched() as group:
        return _run(args, group)


def _run(args, group) -> int:
    from tqdm.auto import tqdm
    check_positive("--seeds", args.seeds)
    check_divisible(args.batch_size, group)
    entries = parse_algos(args.algos)
    shared = resolve.learner_options(args)
    unused = [k for k in shared if not any(k in resolve.options_for(name, shared) for _, name, _ in entries)]
    if unused:
        raise OptionError(f"option {unused[0]!r} applies to none of {', '.join(n for _, n, _ in entries)} "
                          "(see `fbcompile algorithms ALGO`)")
    out = Path(args.out or f"runs/compare-{Path(args.model).stem}-{args.data.replace(':', '-').replace('/', '_')}")
    dataset = load_data(args.data, seed=args.data_seed, subset=args.subset)
    print(f"{dataset.describe()}\ncomparing {', '.join(l for l, _, _ in entries)} on {args.model}, "
          f"{args.seeds} seed(s), {args.epochs or f'{EPOCHS} x multiplier'} epoch(s), recommended settings unless "
          f"given; writing to {out}/", flush=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    histories = {label: [] for label, _, _ in entries}
    configs = {}
    warned = set()

    def warn(line):
        if line not in warned:
            warned.add(line)
            print(line, file=sys.stderr, flush=True)
    with tqdm(total=len(entries) * len(seeds), desc="runs", disable=args.no_progress, unit="run") as bar:
        for label, name, own in entries:
            for seed in seeds:
                bar.set_postfix_str(f"{label} seed {seed}")
                options = {**resolve.options_for(name, shared), **own}
                run_ = build_run(arguments.run_config(args, name, options=options, seed=seed), dataset,
                                 warn=warn, default_epochs=EPOCHS, process_group=group)
                configs.setdefault(label, run_.config.to_dict())
                histories[label].append(trainer_for(run_, progress=False, log=None).fit(run_.config.epochs))
                bar.update(1)
    if group is not None and run_.learner.communicator.rank != 0:
        return 0                        # rank 0 evaluated, and reports
    summary = summarize(histories, dataset.task)
    print(summary_table(summary, dataset.task, len(seeds)))
    print(f"\nwrote {', '.join(map(str, write_outputs(out, summary, histories, args, dataset.task, configs)))}")
    return 0


def _mean_std(values: list) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(histories: dict, task: str) -> dict:
    """label -> {"test_accuracy" or "test_loss": (mean, std), "train_loss": (mean, std), "seconds": ...}."""
    metric = "test_accuracy" if task == "classification" else "test_loss"
    summary = {}
    for label, runs in histories.items():
        finals = [h[-1] for h in runs]
        summary[label] = {metric: _mean_std([f[metric] for f in finals]),
                          "train_loss": _mean_std([f["train_loss"] for f in finals]),
                          "seconds": _mean_std([r["seconds"] for h in runs for r in h])}
    return summary


def summary_table(summary: dict, task: str, seeds: int) -> str:
    metric = "test_accuracy" if task == "classification" else "test_loss"
    scale, unit = (100, "%") if task == "classification" else (1, "")
    rows = []
    for label, values in summary.items():
        mean, std = values[metric]
        rows.append({"algorithm": label, metric.replace("_", " "): f"{scale * mean:.2f}{unit} +- {scale * std:.2f}",
                     "train loss": "{:.4f} +- {:.4f}".format(*values["train_loss"]),
                     "s/epoch": f"{values['seconds'][0]:.2f}"})
    columns = ["algorithm", metric.replace("_", " "), "train loss", "s/epoch"]
    return f"Final epoch, mean +- std over {seeds} seed(s)\n" + format_table(rows, columns)


def mean_history(runs: list) -> list:
    """Per-epoch means of several runs' records (numeric fields only)."""
    keys = ("train_loss", "test_loss", "train_accuracy", "test_accuracy", "seconds")
    mean = []
    for records in zip(*runs):
        row = {"epoch": records[0]["epoch"]}
        for key in keys:
            values = [r[key] for r in records if r.get(key) is not None]
            row[key] = statistics.fmean(values) if values else None
        mean.append(row)
    return mean


def write_outputs(out: Path, summary: dict, histories: dict, args, task: str, configs: dict | None = None) -> list:
    from ..plots import comparison_bars, training_curves
    out.mkdir(parents=True, exist_ok=True)
    metric = "test_accuracy" if task == "classification" else "test_loss"
    scale = 100 if task == "classification" else 1
    bars = {label: (scale * v[metric][0], scale * v[metric][1]) for label, v in summary.items()}
    epochs = args.epochs or "recommended"
    title = f"{args.model} on {args.data}, {epochs} epochs, {args.seeds} seeds"
    written = [comparison_bars(bars, out / "compare.png", title=title,
                               ylabel="test accuracy (%)" if task == "classification" else "test loss")]
    written.append(training_curves({label: mean_history(runs) for label, runs in histories.items()},
                                   out / "curves.png", title=title + " (means)"))
    payload = {"model": args.model, "data": args.data, "epochs": epochs, "seeds": args.seeds,
               "summary": summary, "histories": histories, "configs": configs or {}}
    (out / "compare.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return written + [out / "compare.json"]
