"""Step time of compiled learners relative to plain autograd backprop on the same model and batch.

    python examples/bench_runtime.py [--rounds 30]

Configurations run interleaved (fbcompile.bench.interleaved_times). Targets (issue 3): compiled
"bp" <= 1.10 x autograd, analytic "dtp" <= 1.30 x; and the cost of L-DRL feedback training
(20 feedback steps per batch) relative to analytic DTP (paper 002 reports x3.45 to x14.29).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.bench import autograd_step, format_ratio_table, interleaved_times, learner_step
from fbcompile.models import build_model

CASES = {  # key: (model, input shape, options, description)
    "mlp": ("mlp", (784,), {}, "MLP 784-5x256-10"),
    "lenet": ("lenet", (1, 32, 32), {}, "LeNet-5, 1x32x32"),
    "mixer": ("mixer", (3, 32, 32), {}, "MLP-Mixer, 3x32x32, patch 4, dim 64, 2 blocks"),
}


def step_functions(name, shape, options, batch):
    torch.manual_seed(0)
    model = build_model(name, shape, 10, **options)
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    program = fbcompile.compile(model, x)
    step = lambda learner: learner_step(learner, x, y, F.cross_entropy)
    return {
        "autograd bp": autograd_step(model, x, y, F.cross_entropy),
        "compiled bp": step(fbcompile.learner(program, "bp")),
        "dtp analytic": step(fbcompile.learner(program, "dtp", beta=0.1)),
        "dtp ldrl (20 fb steps)": step(fbcompile.learner(program, "dtp", feedback="ldrl", feedback_steps=20)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    args = parser.parse_args(argv)
    targets = {"compiled bp": "<= 1.10", "dtp analytic": "<= 1.30"}
    for case in args.cases.split(","):
        name, shape, options, description = CASES[case]
        functions = step_functions(name, shape, options, args.batch)
        slow = {k: functions.pop(k) for k in ["dtp ldrl (20 fb steps)"]}
        times = interleaved_times(functions, rounds=args.rounds)
        times.update(interleaved_times({**slow, "dtp analytic": functions["dtp analytic"]},
                                       rounds=max(3, args.rounds // 5), warmup=1))
        print(f"\n## {description}, batch {args.batch} ({torch.get_num_threads()} threads)")
        print(format_ratio_table(times, "autograd bp", targets))
        print(f"L-DRL / analytic DTP step time: x{times['dtp ldrl (20 fb steps)'] / times['dtp analytic']:.2f} "
              "(paper 002: x3.45 to x14.29 feedback-training speed-up of TJML-DTP over LDRL)")


if __name__ == "__main__":
    main()
