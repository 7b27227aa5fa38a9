"""Test accuracy of direct feedback learners next to BP and FA, on digits and MNIST-1D, MLP and CNN.

    python examples/direct_results.py                 # the table (about 10 minutes on 2 cores)
    python examples/direct_results.py --tune          # re-select the learning rates on a validation split
    python examples/direct_results.py --quick         # 1 seed, a third of the epochs (a smoke test)

Models (tanh everywhere, as in papers 001 and 003):
- MLP: input - 3 x 256 tanh - 10.
- CNN: paper 001's MNIST CONV network at this scale: conv 32 kernels of 5 (padding 2) - tanh -
  max-pool 2 - Linear 256 tanh - 10 (Conv2d on digits' 8x8 images, Conv1d on MNIST-1D's 40 samples).

Training: Adam (default betas), batch 64, a fixed per-algorithm learning rate (``LEARNING_RATES``,
chosen by ``--tune``: best validation accuracy over ``GRID`` after the same number of epochs, seed 0,
the last 20% of the training split held out), cross-entropy on logits (so e = dL/dlogits, and DRTP's y* is paper 001's surrogate
for -sign(e)). DDTP variants first train their feedback alone for one epoch (paper 003 pre-trains it
for six), then one DRL step per batch. BP is plain autograd; FA is ``fbcompile.learner(.., "fa")``.
The table reports mean +- std over seeds of the test accuracy after the last epoch. Runs are spread
over worker processes with one torch thread each.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.data import batches, load_dataset
from fbcompile.models import build_model

ALGORITHMS = ["bp", "fa", "dfa", "sdfa", "drtp", "shallow", "ddtp-linear", "ddtp-rhl"]
DATASETS = {"digits": 20, "mnist1d": 20}        # name -> epochs
MODELS = ["mlp", "cnn"]
GRID = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
# (dataset, model) -> algorithm -> Adam learning rate, from `--tune` (see the module docstring).
LEARNING_RATES = {
    ("digits", "mlp"): {"bp": 1e-2, "fa": 1e-2, "dfa": 3e-3, "sdfa": 1e-3, "drtp": 1e-2, "shallow": 1e-2,
                        "ddtp-linear": 3e-3, "ddtp-rhl": 3e-3},
    ("digits", "cnn"): {"bp": 1e-3, "fa": 1e-2, "dfa": 3e-3, "sdfa": 1e-2, "drtp": 1e-2, "shallow": 1e-2,
                        "ddtp-linear": 1e-3, "ddtp-rhl": 1e-3},
    ("mnist1d", "mlp"): {"bp": 3e-3, "fa": 3e-3, "dfa": 3e-3, "sdfa": 3e-4, "drtp": 3e-4, "shallow": 1e-2,
                         "ddtp-linear": 3e-3, "ddtp-rhl": 3e-3},
    ("mnist1d", "cnn"): {"bp": 1e-2, "fa": 1e-3, "dfa": 3e-3, "sdfa": 3e-3, "drtp": 3e-3, "shallow": 1e-2,
                         "ddtp-linear": 3e-3, "ddtp-rhl": 3e-3},
}


def cnn(input_shape, classes=10, channels=32, hidden=256):
    spatial = len(input_shape) - 1
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if spatial == 2 else (nn.Conv1d, nn.MaxPool1d)
    flat = channels * math.prod(s // 2 for s in input_shape[1:])
    return nn.Sequential(conv(input_shape[0], channels, 5, padding=2), nn.Tanh(), pool(2), nn.Flatten(),
                         nn.Linear(flat, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def make_model(name, input_shape):
    if name == "mlp":
        return build_model("mlp", input_shape, 10, width=256, depth=3, act="tanh")
    return cnn(input_shape)


def accuracy(model, x, y, batch=1000) -> float:
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return correct / len(x)


def train(dataset: str, model_name: str, algorithm: str, seed: int, lr: float, epochs: int,
          validation: bool = False) -> float:
    """Test (or, with ``validation``, held-out) accuracy after ``epochs`` epochs."""
    torch.set_num_threads(1)
    data = load_dataset(dataset)
    x, y, test_x, test_y = data.train_x, data.train_y, data.test_x, data.test_y
    if validation:
        cut = int(0.8 * len(x))
        x, y, test_x, test_y = x[:cut], y[:cut], x[cut:], y[cut:]
    torch.manual_seed(seed)
    model = make_model(model_name, data.input_shape)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    if algorithm == "bp":
        def step(xb, yb):
            F.cross_entropy(model(xb), yb).backward()
    else:
        learner = fbcompile.learner(fbcompile.compile(model, x[:2]), algorithm, seed=seed)
        step = lambda xb, yb: learner.step(xb, yb, F.cross_entropy)
        if algorithm.startswith("ddtp"):
            for xb, _ in batches(x, y, 64, shuffle=True, generator=generator):
                learner.train_feedback(xb)
    for _ in range(epochs):
        for xb, yb in batches(x, y, 64, shuffle=True, generator=generator):
            optimizer.zero_grad(set_to_none=True)
            step(xb, yb)
            optimizer.step()
    return accuracy(model, test_x, test_y)


def _run(job):
    started = time.perf_counter()
    return job, train(*job), time.perf_counter() - started


def run_jobs(jobs, workers):
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_run, jobs))


def table(results: dict, seeds: int) -> str:
    columns = [(d, m) for d in DATASETS for m in MODELS]
    lines = [f"| algorithm | {' | '.join(f'{d} {m}' for d, m in columns)} |",
             "|---|" + "---|" * len(columns)]
    for algorithm in ALGORITHMS:
        cells = []
        for column in columns:
            values = [100 * v for v in results.get((*column, algorithm), [])]
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{values[0]:.1f}")
            else:
                cells.append(f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f}")
        lines.append(f"| {algorithm} | {' | '.join(cells)} |")
    return "\n".join(lines) + f"\n\ntest accuracy (%), mean +- std over {seeds} seed(s)"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--quick", action="store_true", help="1 seed, a third of the epochs")
    parser.add_argument("--tune", action="store_true", help="select learning rates on a validation split")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args(argv)
    algorithms, datasets = args.algorithms.split(","), {d: DATASETS[d] for d in args.datasets.split(",")}
    started = time.perf_counter()
    if args.tune:
        jobs = [(d, m, a, 0, lr, epochs, True) for d, epochs in datasets.items() for m in MODELS
                for a in algorithms for lr in GRID]
        best = {}
        for (d, m, a, _, lr, _, _), acc, _ in run_jobs(jobs, args.workers):
            if acc > best.get((d, m, a), (-1, None))[0]:
                best[(d, m, a)] = (acc, lr)
        for d in datasets:
            for m in MODELS:
                print(f'("{d}", "{m}"): ' + "{" + ", ".join(f'"{a}": {best[(d, m, a)][1]:g}' for a in algorithms) + "},")
                print("   validation accuracy: " + ", ".join(f"{a} {100 * best[(d, m, a)][0]:.1f}" for a in algorithms))
    else:
        seeds = 1 if args.quick else args.seeds
        jobs = [(d, m, a, seed, LEARNING_RATES[(d, m)][a], epochs // 3 if args.quick else epochs)
                for d, epochs in datasets.items() for m in MODELS for a in algorithms for seed in range(seeds)]
        results, seconds = {}, {}
        for (d, m, a, *_), acc, elapsed in run_jobs(jobs, args.workers):
            results.setdefault((d, m, a), []).append(acc)
            seconds[a] = seconds.get(a, 0.0) + elapsed
        print(table(results, seeds))
        print("training seconds per algorithm (all runs): " + ", ".join(f"{a} {s:.0f}" for a, s in seconds.items()))
    print(f"wall time {time.perf_counter() - started:.0f} s, {args.workers} worker(s), "
          "load average %.2f %.2f %.2f" % os.getloadavg())


if __name__ == "__main__":
    main()
