"""Test accuracy of target- and error-propagation learners on data that works offline.

    python examples/target_results.py                  # digits + MNIST-1D, MLP + CNN, 3 seeds
    python examples/target_results.py --quick          # one seed, few epochs (smoke run)

Algorithms (issue 3): BP (plain autograd), TJML-DTP (dtp with analytic condition-T feedback),
DTP-LDRL, DTP-DRL, FWDTP (dtp with fixed random feedback) and FA. Every run uses the same model
initialisation per seed, the same data order and Adam; learner hyperparameters are in ALGORITHMS.
Prints a markdown table of mean +- std test accuracy (%) over seeds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.data import batches, load_dataset
from fbcompile.models import build_model

ALGORITHMS = {   # label: (algorithm, options)
    "BP (autograd)": (None, {}),
    "TJML-DTP": ("dtp", {"beta": 0.1}),
    "DTP-LDRL": ("dtp", {"beta": 0.1, "feedback": "ldrl", "feedback_steps": 5, "feedback_lr": 1e-3}),
    "DTP-DRL": ("dtp", {"beta": 0.1, "feedback": "drl", "feedback_lr": 1e-3, "feedback_weight_decay": 1e-4}),
    "FWDTP": ("dtp", {"beta": 0.1, "feedback": "random"}),
    "FA": ("fa", {}),
}
MODELS = {  # (dataset, kind) -> (builder name, options)
    ("digits", "MLP"): ("mlp", {"width": 128, "depth": 3, "act": "tanh"}),
    ("digits", "CNN"): ("lenet", {"act": "tanh"}),
    ("mnist1d", "MLP"): ("mlp", {"width": 256, "depth": 3, "act": "tanh"}),
    ("mnist1d", "CNN"): ("conv1d", {"act": "tanh"}),
}


def accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return 100.0 * correct


def run(dataset, kind, label, seed, epochs, batch_size, lr) -> float:
    builder, options = MODELS[(dataset.name, kind)]
    torch.manual_seed(seed)
    model = build_model(builder, dataset.input_shape, dataset.num_classes, **options)
    algorithm, learner_options = ALGORITHMS[label]
    learner = None
    if algorithm is not None:
        program = fbcompile.compile(model, dataset.train_x[:2])
        learner = fbcompile.learner(program, algorithm, seed=seed, **learner_options)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in batches(dataset.train_x, dataset.train_y, batch_size, shuffle=True, generator=order):
            optimizer.zero_grad()
            if learner is None:
                F.cross_entropy(model(x), y).backward()
            else:
                learner.step(x, y, F.cross_entropy)
            optimizer.step()
    return accuracy(model, dataset.test_x, dataset.test_y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist1d")
    parser.add_argument("--models", default="MLP,CNN")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    labels = args.algorithms.split(",")
    print(f"| dataset | model | {' | '.join(labels)} |")
    print("|" + "---|" * (len(labels) + 2))
    for name in args.datasets.split(","):
        dataset = load_dataset(name)
        for kind in args.models.split(","):
            cells = []
            for label in labels:
                start = time.perf_counter()
                scores = [run(dataset, kind, label, seed, args.epochs, args.batch_size, args.lr)
                          for seed in range(args.seeds)]
                spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
                cells.append(f"{statistics.mean(scores):.2f} +- {spread:.2f} ({time.perf_counter() - start:.0f}s)")
            print(f"| {name} | {kind} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
