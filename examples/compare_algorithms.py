"""Every registered learning algorithm on the same MLP and data, over three seeds.

    python examples/compare_algorithms.py [ALGO ...]   # a few minutes for all; writes compare.png

The list of algorithms comes from the registry (``fbcompile.runtime.ALGORITHMS``), so algorithms
added later show up here too. Each (algorithm, seed) run builds a fresh model with that seed,
trains it with the same optimizer and batches, and reports the final test accuracy; the table shows
mean +- sample std over seeds. The same as ``fbcompile compare --algos ... --seeds 3``.
FBCOMPILE_EXAMPLE_QUICK=1 makes it a seconds-long run.
"""
import os
import statistics
import sys
from dataclasses import replace

import torch

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.models import build_model
from fbcompile.plots import comparison_bars
from fbcompile.runtime import ALGORITHMS
from fbcompile.training import Trainer

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))
SEEDS, EPOCHS = (1, 1) if QUICK else (3, 8)
algorithms = sys.argv[1:] or list(ALGORITHMS)
data = load_dataset("digits")
if QUICK:
    data = replace(data, train_x=data.train_x[:256], train_y=data.train_y[:256])


def final_accuracy(algorithm: str, seed: int) -> float:
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, 10, width=128, depth=3)
    learner = fbcompile.learner(fbcompile.compile(model, data.train_x[:2]), algorithm, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    trainer = Trainer(learner, optimizer, data, batch_size=64, seed=seed, progress=False, log=None)
    return 100 * trainer.fit(EPOCHS)[-1]["test_accuracy"]


results = {}
for algorithm in algorithms:
    accuracies = [final_accuracy(algorithm, seed) for seed in range(SEEDS)]
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    results[algorithm] = (statistics.fmean(accuracies), std)
    print(f"{algorithm:12s} {results[algorithm][0]:6.2f}% +- {std:5.2f}   seeds: "
          + ", ".join(f"{a:.1f}" for a in accuracies), flush=True)

print("wrote", comparison_bars(results, "compare.png", title=f"MLP on digits, {EPOCHS} epochs, {SEEDS} seeds"))
