"""Mono-Forward accuracy: BP vs MF (local autograd) vs MF-DD (directional derivatives, P = 1, 2, 4, 8).

    python examples/mono_forward_results.py                      # digits + MNIST-1D, MLP + CNN, 3 seeds
    python examples/mono_forward_results.py --datasets digits --archs mlp --seeds 1 --epochs digits=5

Models: an MLP (2 hidden ReLU layers of 64) and a CNN of conv3x3-BN-ReLU-maxpool2 blocks (16, 16
channels; 1-D convolutions for MNIST-1D). BP appends a Linear classifier and trains end to end. MF
and MF-DD give every unit its own head (fbcompile.passes.heads: conv units project each channel to
d = 16 dims before pooling). ``--layout paper`` (default, paper 004 App. A): the MF networks are the
blocks alone, so the last block's head is the "final" classifier; ``--layout same``: MF trains the
very model BP trains, its final Linear scored by its own output (output_head="model"). Reported: test
accuracy (%) as mean +- std over seeds, for MF/MF-DD with the final head ("final") and the sum of
all heads ("cumulative"). Every method runs the same epochs and batch size with Adam; learning
rates are flags (defaults from small sweeps on digits: 3e-3 for every model, 1e-2 for the heads).
Runs are spread over ``--workers`` processes of one thread each.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.data import batches, load_dataset

DEFAULT_EPOCHS = {"digits": 20, "mnist1d": 8}


# -- models ---------------------------------------------------------------------------------------------
def mlp(input_shape, classes, width=64, depth=2):
    layers, features = [nn.Flatten()], int(torch.tensor(input_shape).prod())
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, classes))


def cnn(input_shape, classes, channels=(16, 16)):
    """conv3x3-BN-ReLU-maxpool2 blocks (2-D or 1-D by the input shape), then Flatten + Linear."""
    two_d = len(input_shape) == 3
    conv, norm, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if two_d else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
    layers, c, sizes = [], input_shape[0], list(input_shape[1:])
    for width in channels:
        layers += [conv(c, width, 3, padding=1), norm(width), nn.ReLU(), pool(2)]
        c, sizes = width, [s // 2 for s in sizes]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * int(torch.tensor(sizes).prod()), classes))


ARCHS = {"mlp": mlp, "cnn": cnn}


@lru_cache(maxsize=None)
def dataset(name):
    data = load_dataset(name)
    mean, std = data.train_x.mean(), data.train_x.std()
    return data, (data.train_x - mean) / std, (data.test_x - mean) / std


# -- one run --------------------------------------------------------------------------------------------
def run(job: dict) -> dict:
    torch.set_num_threads(1)
    data, train_x, test_x = dataset(job["dataset"])
    torch.manual_seed(job["seed"])
    model = ARCHS[job["arch"]](data.input_shape, data.num_classes)
    if job["method"] != "bp" and job["layout"] == "paper":
        model = model[:-1] if job["arch"] == "mlp" else model[:-2]      # the blocks, without Flatten + classifier
    kind = torch.optim.SGD if job.get("optimizer") == "sgd" else torch.optim.Adam
    optimizer = kind(model.parameters(), lr=job["lr"])
    learner = None
    if job["method"] != "bp":
        options = {"head_lr": job["head_lr"], "seed": job["seed"], "head_optimizer": job.get("optimizer", "adam"),
                   "classes": data.num_classes}
        if job["method"] == "mf-dd":
            options["directions"] = job["directions"]
        learner = fbcompile.learner(fbcompile.compile(model, train_x[:8]), job["method"], **options)
    order = torch.Generator().manual_seed(job["seed"])
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(job["epochs"]):
        model.train()
        for xb, yb in batches(train_x, data.train_y, job["batch"], shuffle=True, generator=order):
            optimizer.zero_grad(set_to_none=True)
            if learner is None:
                F.cross_entropy(model(xb), yb).backward()
            else:
                learner.step(xb, yb, F.cross_entropy)
            optimizer.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    model.eval()
    with torch.no_grad():
        if learner is None:
            scores = {"final": model(test_x)}
        else:
            scores = {mode: learner.predict(test_x, mode=mode) for mode in ("final", "cumulative")}
    accuracy = {mode: 100 * float((s.argmax(1) == data.test_y).float().mean()) for mode, s in scores.items()}
    return {**job, **accuracy, "seconds": seconds, "cpu": cpu}


def jobs(args) -> list:
    out = []
    for name in args.datasets:
        for arch in args.archs:
            for seed in range(args.seeds):
                common = {"dataset": name, "arch": arch, "seed": seed, "epochs": args.epochs[name], "batch": args.batch,
                          "layout": args.layout}
                out.append({**common, "method": "bp", "lr": args.lr_bp, "head_lr": None, "directions": None})
                out.append({**common, "method": "mf", "lr": args.lr_mf, "head_lr": args.head_lr_mf, "directions": None})
                for p in args.directions:
                    out.append({**common, "method": "mf-dd", "lr": args.lr_dd, "head_lr": args.head_lr_dd,
                                "directions": p})
    return sorted(out, key=lambda j: -(j["directions"] or 0))      # longest first, for the pool


# -- tables ---------------------------------------------------------------------------------------------
def label(result) -> str:
    return {"bp": "BP", "mf": "MF (AD)"}.get(result["method"], f"MF-DD P={result['directions']}")


def mean_std(values) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} +- {std:.1f}"


def tables(results: list, args) -> str:
    lines = []
    for name in args.datasets:
        for arch in args.archs:
            rows = [r for r in results if r["dataset"] == name and r["arch"] == arch]
            if not rows:
                continue
            groups = {}
            for r in rows:
                groups.setdefault(label(r), []).append(r)
            mf = groups.get("MF (AD)", [])
            lines += [f"\n### {name}, {arch} ({args.epochs[name]} epochs, batch {args.batch}, {args.seeds} seeds)\n",
                      "| method | final | cumulative | final - MF | cumulative - MF | s / run | CPU s / run |",
                      "|---|---|---|---|---|---|---|"]
            for key, group in groups.items():
                final = [r["final"] for r in group]
                cumulative = [r["cumulative"] for r in group if "cumulative" in r]
                gap = lambda mine, mode: (f"{statistics.mean(mine) - statistics.mean([r[mode] for r in mf]):+.1f}"
                                          if mine and mf and key.startswith("MF-DD") else "")
                lines.append(f"| {key} | {mean_std(final)} | {mean_std(cumulative)} | {gap(final, 'final')} | "
                             f"{gap(cumulative, 'cumulative')} | {statistics.mean(r['seconds'] for r in group):.1f} | "
                             f"{statistics.mean(r['cpu'] for r in group):.1f} |")
    return "\n".join(lines)


def parse_epochs(text: str) -> dict:
    epochs = dict(DEFAULT_EPOCHS)
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        epochs[name] = int(value)
    return epochs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="digits,mnist1d", type=lambda s: s.split(","))
    parser.add_argument("--archs", default="mlp,cnn", type=lambda s: s.split(","))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=parse_epochs, default=dict(DEFAULT_EPOCHS),
                        help="per dataset, e.g. digits=20,mnist1d=8")
    parser.add_argument("--directions", default="1,2,4,8", type=lambda s: [int(p) for p in s.split(",")])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr-bp", type=float, default=3e-3)
    parser.add_argument("--lr-mf", type=float, default=3e-3)
    parser.add_argument("--head-lr-mf", type=float, default=1e-2)
    parser.add_argument("--lr-dd", type=float, default=3e-3)
    parser.add_argument("--head-lr-dd", type=float, default=1e-2)
    parser.add_argument("--layout", default="paper", choices=("paper", "same"),
                        help="MF networks without the classifier (paper 004) or the same model as BP")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    todo = jobs(args)
    start, load = time.perf_counter(), os.getloadavg()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = list(pool.imap_unordered(run, todo))
    print(f"## Mono-Forward test accuracy (%), mean +- std over {args.seeds} seeds; {len(todo)} runs in "
          f"{time.perf_counter() - start:.0f} s on {args.workers} worker(s) of one thread (load average before/after: "
          f"{load[0]:.1f} / {os.getloadavg()[0]:.1f}); {sum(r['cpu'] for r in results):.0f} CPU s in the runs")
    print(f"Adam: BP lr {args.lr_bp}; MF lr {args.lr_mf}, heads {args.head_lr_mf}; MF-DD lr {args.lr_dd}, heads "
          f"{args.head_lr_dd} (update='accumulate', eps=1e-3, C_max=50,000, d=16); layout {args.layout!r}")
    print(tables(results, args))


if __name__ == "__main__":
    main()
