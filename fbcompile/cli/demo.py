"""``fbcompile demo``: the whole tool on scikit-learn's digits, offline, in a few minutes.

Compiles an MLP, a LeNet-style CNN and an MLP-Mixer, verifies their Jacobian matching (float64),
draws their forward and feedback graphs, trains every registered algorithm that applies to each
(BP, TJML-DTP, DRTP, ...) for a few epochs with its recommended settings (fbcompile.recommended:
optimizer, learning rate, options, loss and condition per model family, each with its source; TP
runs with condition P), prints a results table and writes plots, a JSON (with every run's resolved
configuration and provenance) and a Markdown table to the output folder. Runs are spread over
--jobs worker processes.
"""
from __future__ import annotations

import functools
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from ..explain import format_table
from . import arguments, resolve
from .runs import RunConfig

# name -> (title, MODEL spec, model options): small enough for 8x8 digits and a two-core laptop.
MODELS = {
    "mlp": ("MLP 64-3x128-10", "mlp", {"width": 128, "depth": 3}),
    "lenet": ("LeNet-5", "lenet", {}),
    "mixer": ("MLP-Mixer", "mixer", {"patch": 4, "dim": 32, "hidden": 64}),
}
EPOCHS, BATCH = 10, 64           # epochs: x each algorithm's recommended epochs multiplier
# Registered algorithms the demo leaves out unless --algos names them, with the one line saying why.
LEFT_OUT = {"tp": "plain TP (no difference correction) needs an inverse: with condition T it does not learn, and "
                  "with condition P (its recommended setting) the targets turn non-finite on the tanh MLP and "
                  "LeNet (the pseudo-inverse of a narrowing Linear drops h's null-space part, so atanh leaves "
                  "(-1, 1)) and the Mixer's LayerNorm has no condition-P rule; dtp is TP that works "
                  "(--algos tp runs it anyway)"}


def add_parser(commands):
    parser = commands.add_parser("demo", help="compile, verify and train three models on digits (offline, minutes)",
                                 description=arguments.description(__doc__))
    parser.add_argument("--out", default="fbcompile-demo", metavar="DIR", help="output folder (default fbcompile-demo)")
    parser.add_argument("--epochs", type=int, help=f"epochs per run (default {EPOCHS} x the algorithm's "
                                                    "recommended epochs multiplier)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--algos", help="comma-separated algorithms (default: every registered one)")
    parser.add_argument("--subset", type=int, metavar="N", help="train on the first N training samples only")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="worker processes, one torch thread each (default: 2 or the CPU count if less)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: 1 epoch on 128 samples")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    """Under torchrun the training runs are data parallel over the launched processes (one task
    at a time, in this process); rank 0 reports and writes."""
    from .runs import launched
    with launched() as group:
        return _run(args, group)


def _run(args, group) -> int:
    started = time.perf_counter()
    models = resolve.split_list(args.models, "--models")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise resolve.OptionError(f"--models: unknown demo model {unknown[0]!r}; use {', '.join(MODELS)}")
    algos = resolve.check_algorithms(resolve.split_list(args.algos, "--algos") if args.algos
                                     else [a for a in resolve.algorithm_names() if a not in LEFT_OUT])
    epochs, subset = (1, 128) if args.quick else (args.epochs, args.subset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"fbcompile demo: {len(models)} models x {len(algos)} algorithms on digits, "
          f"{epochs or f'{EPOCHS} x multiplier'} epoch(s), recommended settings (`fbcompile algorithms ALGO`), "
          f"{args.jobs} worker(s); writing to {out.resolve()}/", flush=True)
    tasks = [("check", m, str(out)) for m in models]
    tasks += [("train", m, a, epochs, subset) for m in models for a in algos]
    if group is None:
        results = _run_all(tasks, args.jobs)
    else:                               # the checks (which write files) on rank 0 alone
        import torch.distributed as dist
        lead = dist.get_rank() == 0
        report = _report if lead else (lambda result: result)      # rank 0 alone evaluated
        results = [report(run_task(task, group)) for task in tasks if lead or task[0] == "train"]
        if not lead:
            return 0
    checks = {r["model"]: r for r in results if r["kind"] == "check"}
    runs = {(r["model"], r["algorithm"]): r for r in results if r["kind"] == "train"}
    print()
    for model in models:
        c = checks[model]
        print(f"{MODELS[model][0]}: {c['units']} units, {c['params']:,} parameters; Jacobian matching: {c['verdict']}")
    print()
    print(results_table(models, algos, runs))
    if not args.algos:
        for name, why in LEFT_OUT.items():
            print(f"left out: {name}: {why}")
    written = _write_outputs(out, models, algos, checks, runs)
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0 if all(c["ok"] for c in checks.values()) else 1


def _run_all(tasks: list, jobs: int) -> list:
    """Run the tasks inline (jobs=1) or in spawned single-threaded workers, printing each result."""
    jobs = max(1, jobs)
    results = []
    if jobs == 1:
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for task in tasks:
                results.append(_report(run_task(task)))
        finally:
            torch.set_num_threads(threads)
        return results
    # Heavier models first, so the workers finish together.
    order = sorted(tasks, key=lambda t: -list(MODELS).index(t[1]))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_single_thread) as pool:
        for future in as_completed([pool.submit(run_task, task) for task in order]):
            results.append(_report(future.result()))
    return results


def _single_thread() -> None:
    import torch
    torch.set_num_threads(1)


def _report(result: dict) -> dict:
    if result["kind"] == "check":
        print(f"  {MODELS[result['model']][0]:16s} verify: {result['verdict']}", flush=True)
    else:
        print(f"  {MODELS[result['model']][0]:16s} {result['algorithm']:12s} {_cell(result):>8s}  "
              f"({result['seconds']:.1f} s)", flush=True)
    return result


def run_task(task: tuple, process_group=None) -> dict:
    """One demo task in a worker: ("check", model, out) or ("train", model, algo, epochs, subset)."""
    if task[0] == "check":
        return _check(task[1], Path(task[2]))
    return _train(*task[1:], process_group=process_group)


@functools.lru_cache(maxsize=2)
def _data(subset=None):
    """digits, loaded once per worker process."""
    from .runs import load_data
    return load_data("digits", subset=subset)


def _check(model: str, out: Path) -> dict:
    """Compile in float64, verify every rule, draw the graphs."""
    import torch

    from .. import verify
    from ..plots import save_graph
    from .runs import build_program
    from .verify import verdict
    title, spec, options = MODELS[model]
    data = _data()
    net, program = build_program(spec, data.input_shape, data.num_classes, model_options=options,
                                 example=data.train_x[:2], dtype=torch.float64)
    report = verify(program, data.train_x[:2].double(), pinv_limit=0)
    failures = report.failures(1e-8)
    graph = save_graph(program, out / f"graph-{model}.png")
    return {"kind": "check", "model": model, "units": len(program.units), "ok": not failures,
            "params": sum(p.numel() for p in net.parameters()), "verdict": verdict(report, failures, 1e-8),
            "graph": str(graph)}


def _train(model: str, algorithm: str, epochs: int, subset, process_group=None) -> dict:
    from ..errors import FBCompileError
    from .runs import build_run, trainer_for
    _, spec, options = MODELS[model]
    config = RunConfig(model=spec, model_options=options, data="digits", algorithm=algorithm, epochs=epochs,
                       batch_size=BATCH, subset=subset)
    started = time.perf_counter()
    result = {"kind": "train", "model": model, "algorithm": algorithm, "history": [], "error": None,
              "config": config.to_dict()}
    try:
        run_ = build_run(config, _data(subset), default_epochs=EPOCHS, process_group=process_group)
    except FBCompileError as exc:          # the algorithm does not apply to this model
        return {**result, "status": "n/a", "error": str(exc), "seconds": time.perf_counter() - started}
    result["config"] = config.to_dict()
    trainer = trainer_for(run_, progress=False, log=None)
    try:
        result["history"] = trainer.fit(config.epochs)
        result["status"] = "ok"
    except FBCompileError as exc:          # e.g. a non-finite step
        result.update(status="failed", error=str(exc), history=trainer.history)
    result["seconds"] = time.perf_counter() - started
    return result


def _cell(result: dict) -> str:
    if result["status"] != "ok":
        return result["status"]
    return f"{100 * result['history'][-1]['test_accuracy']:.1f}%"


def label(algorithm: str) -> str:
    """The table label: analytic DTP is paper 002's TJML-DTP."""
    return "dtp (TJML-DTP)" if algorithm == "dtp" else algorithm


def results_table(models, algos, runs) -> str:
    rows = []
    for algo in algos:
        row = {"algorithm": label(algo)}
        seconds = []
        for model in models:
            result = runs[(model, algo)]
            row[MODELS[model][0]] = _cell(result)
            if result["status"] == "ok":
                seconds.append(sum(r["seconds"] for r in result["history"]) / len(result["history"]))
        row["s/epoch"] = f"{sum(seconds) / len(seconds):.2f}" if seconds else "-"
        rows.append(row)
    columns = ["algorithm"] + [MODELS[m][0] for m in models] + ["s/epoch"]
    notes = [f"  {label(a)} on {MODELS[m][0]}: {str(runs[(m, a)]['error']).splitlines()[0]}" for m in models
             for a in algos if runs[(m, a)]["status"] != "ok"]
    text = ("Test accuracy on digits after the last epoch, recommended settings (s/epoch: mean over the models)\n"
            + format_table(rows, columns))
    text += "\n\nNot run or failed:\n" + "\n".join(notes) if notes else ""
    short = shortfalls(models, algos, runs)
    return text + ("\n\nBelow 85% (what was tried, what the papers predict):\n" + "\n".join(short) if short else "")


def shortfalls(models, algos, runs) -> list:
    """One line per (algorithm, family) with a run below 85% and a recorded explanation."""
    from ..recommended import SHORTFALLS, model_family
    lines = []
    for algo in algos:
        for model in models:
            result, family = runs[(model, algo)], model_family(MODELS[model][1])
            below = result["status"] == "ok" and result["history"][-1]["test_accuracy"] < 0.85
            if below and (algo, family) in SHORTFALLS:
                lines.append(f"  {label(algo)} on {MODELS[model][0]}: {SHORTFALLS[(algo, family)]}")
    return lines


def _write_outputs(out: Path, models, algos, checks, runs) -> list:
    from ..plots import comparison_bars, training_curves
    written = [checks[m]["graph"] for m in models]
    bars = {MODELS[m][0]: {label(a): (100 * runs[(m, a)]["history"][-1]["test_accuracy"], None)
                           for a in algos if runs[(m, a)]["status"] == "ok"} for m in models}
    written.append(comparison_bars(bars, out / "accuracy.png", title="digits: test accuracy after the last epoch"))
    for m in models:
        curves = {label(a): runs[(m, a)]["history"] for a in algos if runs[(m, a)]["status"] == "ok"}
        if curves:
            written.append(training_curves(curves, out / f"curves-{m}.png", title=f"{MODELS[m][0]} on digits"))
    payload = {"checks": checks, "runs": [runs[(m, a)] for m in models for a in algos]}
    (out / "results.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (out / "results.md").write_text("```\n" + results_table(models, algos, runs) + "\n```\n")
    return written + [out / "results.json", out / "results.md"]
