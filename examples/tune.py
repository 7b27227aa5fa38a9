"""Sweep of learning settings on digits: where the papers give nothing for a model family (or their
MNIST values do not carry over to a minutes-long digits run), this is how fbcompile's "ours" values
in fbcompile/recommended.py were chosen.

    python examples/tune.py --algos drtp --models mlp,lenet,mixer --grid lr=1e-3,3e-3,1e-2 --grid loss=bce,cross_entropy
    python examples/tune.py --algos sdfa --grid lr=3e-4,1e-3,3e-3 --seeds 0,1 --test   # report test accuracy

Protocol (reproducible; the grid and seeds are printed first):
- data: scikit-learn's digits, fbcompile's fixed split; the sweep trains on the first 80% of the
  training split and scores the last 20% (validation), never the test set (unless --test);
- models: the demo's three (fbcompile/cli/demo.py MODELS: MLP 64-3x128-10 tanh, LeNet-5, MLP-Mixer),
  and ``mlp-p004``, paper 004's MLP shape (two hidden layers of 50 ReLU units) for the MF / MF-DD
  comparison (issue 15: MF-DD within 5 points of MF at the same epochs);
- training: the demo's budget (10 epochs, batch 64) through the same RunConfig path as
  ``fbcompile train``; every value not swept is the current recommendation (fbcompile.recommended);
- a grid key that is a RunConfig field (lr, optimizer, loss, condition, epochs) sets that field;
  ``hidden_lr_scale`` (direct learners only: dfa, sdfa, drtp, shallow) gives the hidden units' parameters
  the learning rate lr x scale and the output units' the lr (an optimizer setting, not a learner
  option: with Adam, scaling a unit's update does not change its step); any other key is a learner
  option;
- result: mean validation accuracy over the seeds per grid point; the best point per (model,
  algorithm) is printed last. Runs go to --jobs worker processes with one torch thread each.
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

FIELDS = ("lr", "optimizer", "loss", "condition", "epochs")
SWEEP_ONLY = ("hidden_lr_scale",)
# Models beyond the demo's: name -> (title, MODEL spec, model options).
EXTRA_MODELS = {"mlp-p004": ("MLP 64-2x50-10 ReLU (paper 004's shape)", "mlp",
                             {"width": 50, "depth": 2, "act": "relu"})}


def model_spec(name: str) -> tuple:
    """(title, MODEL spec, model options) of a demo model or one of :data:`EXTRA_MODELS`."""
    from fbcompile.cli.demo import MODELS
    table = {**MODELS, **EXTRA_MODELS}
    if name not in table:
        raise SystemExit(f"tune.py: unknown model {name!r}; use {', '.join(table)}")
    return table[name]


def parse_grid(items) -> dict:
    from fbcompile.cli.resolve import parse_value
    grid = {}
    for item in items or []:
        key, _, values = item.partition("=")
        grid[key.strip()] = [parse_value(v) for v in values.split(",")]
    return grid


def points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))] or [{}]


def run_one(job: dict) -> dict:
    """Train one (model, algorithm, grid point, seed); return its final validation (or test) accuracy."""
    import torch
    torch.set_num_threads(1)
    from fbcompile.cli.demo import BATCH
    from fbcompile.cli.runs import RunConfig, build_run, load_data, trainer_for
    from fbcompile.data import Dataset
    data = load_data("digits")
    if not job["test"]:
        cut = int(0.8 * data.num_train)
        data = Dataset(name=data.name, train_x=data.train_x[:cut], train_y=data.train_y[:cut],
                       test_x=data.train_x[cut:], test_y=data.train_y[cut:], num_classes=data.num_classes,
                       input_shape=data.input_shape, task=data.task)
    _, spec, model_options = model_spec(job["model"])
    point = job["point"]
    config = RunConfig(model=spec, model_options=model_options, data="digits", algorithm=job["algo"],
                       batch_size=BATCH, seed=job["seed"],
                       options={k: v for k, v in point.items() if k not in FIELDS + SWEEP_ONLY},
                       **{k: v for k, v in point.items() if k in FIELDS})
    started = time.perf_counter()
    try:        # epochs not swept: --epochs x the recommended epochs multiplier, as the demo runs it
        run = build_run(config, data, default_epochs=job["epochs"])
        if "hidden_lr_scale" in point:
            run.optimizer = hidden_scaled_optimizer(run, point["hidden_lr_scale"])
        history = trainer_for(run, progress=False, log=None).fit(run.config.epochs)
        accuracy = history[-1]["test_accuracy"]
    except Exception as exc:        # a failed point is a result too (e.g. a non-finite step)
        return {**job, "accuracy": None, "error": f"{type(exc).__name__}: {str(exc)[:100]}",
                "seconds": time.perf_counter() - started}
    return {**job, "accuracy": accuracy, "error": None, "seconds": time.perf_counter() - started}


def hidden_scaled_optimizer(run, scale: float):
    """The run's optimizer over two groups: the output units' parameters at the run's lr, the
    hidden units' at lr x ``scale`` (0: the hidden units never move, i.e. shallow learning)."""
    from fbcompile.runtime.options import make_optimizer
    plan = getattr(run.learner, "plan", None)
    if plan is None:
        raise ValueError(f"hidden_lr_scale needs a direct learner (dfa, sdfa, drtp, shallow), not {run.config.algorithm}")
    output_names = {name for unit in plan.output_units for name in plan.params[unit]}
    named = dict(run.model.named_parameters())
    groups = [{"params": [p for n, p in named.items() if n in output_names], "lr": run.config.lr},
              {"params": [p for n, p in named.items() if n not in output_names], "lr": run.config.lr * scale}]
    return make_optimizer(run.config.optimizer, groups, run.config.lr, run.config.weight_decay,
                          momentum=run.config.momentum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", required=True, help="comma-separated algorithms")
    parser.add_argument("--models", default="mlp,lenet,mixer",
                        help="demo models, or mlp-p004 (paper 004's MLP shape) (default mlp,lenet,mixer)")
    parser.add_argument("--grid", action="append", metavar="KEY=V1,V2", help="a swept value (repeatable)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10, the demo's)")
    parser.add_argument("--test", action="store_true", help="score the test set instead of the validation split")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    grid = parse_grid(args.grid)
    seeds = [int(s) for s in args.seeds.split(",")]
    algos, models = args.algos.split(","), args.models.split(",")
    for m in models:
        model_spec(m)
    print(f"tune: algorithms {algos}, models {models}, grid {grid or '{} (the recommendation only)'}, "
          f"seeds {seeds}, {args.epochs} epochs (x the recommended epochs multiplier where epochs is not swept), "
          f"batch 64, scored on {'test' if args.test else 'validation (last 20% of the training split)'}",
          flush=True)
    jobs = [{"model": m, "algo": a, "point": p, "seed": s, "epochs": args.epochs, "test": args.test}
            for m in models for a in algos for p in points(grid) for s in seeds]
    results = []
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for r in pool.map(run_one, jobs):
            acc = "failed " + r["error"] if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%"
            print(f"  {r['model']:6s} {r['algo']:12s} {r['point']} seed {r['seed']}: {acc} ({r['seconds']:.1f} s)",
                  flush=True)
            results.append(r)
    print("\nbest per (model, algorithm), mean over seeds:")
    for m in models:
        for a in algos:
            scored = []
            for p in points(grid):
                accs = [r["accuracy"] for r in results if r["model"] == m and r["algo"] == a and r["point"] == p]
                mean = statistics.fmean(x if x is not None else 0.0 for x in accs)
                scored.append((mean, min(x or 0.0 for x in accs), p))
            for mean, worst, p in sorted(scored, key=lambda t: -t[0])[:3]:
                print(f"  {m:6s} {a:12s} {p}: mean {100 * mean:.1f}% (worst seed {100 * worst:.1f}%)")


if __name__ == "__main__":
    main()
