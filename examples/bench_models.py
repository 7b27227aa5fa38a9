"""Real-size convnets: step time and peak tensor memory of compiled learners relative to autograd.

    python examples/bench_models.py [--models resnet18,mobilenetv2] [--configs bp,dtp,dfa,drtp,drtp-in-step,bp+inductor]
                                    [--rounds 10] [--batch 32] [--threads 2] [--skip-time] [--skip-memory]
                                    [--autocast bfloat16]

ResNet-18 and MobileNetV2 as torchvision defines them (fbcompile.zoo_models; torchvision is not
needed), 3x32x32 inputs, batch 32, train mode (BatchNorm on batch statistics, MobileNetV2's dropout
on), cross-entropy, ``--threads`` torch threads (2 by default). Every configuration trains its own
copy of the model (same seed) on the same batch; "drtp" runs update-unlocked (its default) and adds
its updates to ``.grad`` like the others; "drtp-in-step" applies each unit's update inside the step
with plain SGD (``learner.step(..., optimizer=)``, :mod:`fbcompile.runtime.in_step`), so the step
holds no gradient per parameter: it runs the step twice (a checking pass, then the applying pass)
so that a failed step still changes nothing; "mf" and "mf-in-step" are Mono-Forward (paper 004) the
same two ways. ``--autocast DTYPE``: every configuration, the autograd baseline included, is
compiled and run under ``torch.autocast`` (mixed precision; :func:`fbcompile.autocast_guard.mixed_precision`).

1. Time: the plain autograd step (``.grad`` cleared, forward, backward) and every configuration of
   one model interleaved in this one process (:func:`fbcompile.bench.interleaved_times`), medians
   (``--min``: fastest rounds).
2. Memory: the peak of the profiler's tensor-memory ledger (:func:`fbcompile.bench.memory_ledger`)
   during one step after a warm-up step, each configuration in its own fresh process
   (:func:`fbcompile.bench.model_memory`).

3. ``--convs``: per conv shape of the two models, the input and weight gradients as one
   aten.convolution_backward (what the conv rule emits in error modes, and what autograd runs)
   against conv_transpose + a weight-only convolution_backward, interleaved; checks bitwise equality
   with autograd.

Issue 14's goals (ResNet-18): bp <= 1.05 x time and memory, dtp <= 1.25 x time and <= 1.30 x
memory, dfa and drtp <= 0.75 x time, update-unlocked drtp <= 0.35 x memory (below the .grad tensors' own
share unless the updates are applied in the step: drtp-in-step); MobileNetV2 bp <= 1.10 x
time and memory. Timings depend on machine load: the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fbcompile.autocast_guard import AUTOCAST_DTYPES
from fbcompile.bench import MODEL_CONFIGS, in_subprocess, interleaved_times, model_step

MODELS = {"resnet18": "resnet18-imagenet", "mobilenetv2": "mobilenet-v2"}
GOALS = {("resnet18", "bp"): (1.05, 1.05), ("resnet18", "dtp"): (1.25, 1.30), ("resnet18", "dfa"): (0.75, None),
         ("resnet18", "drtp"): (0.75, 0.35), ("resnet18", "drtp-in-step"): (None, 0.35),
         ("mobilenetv2", "bp"): (1.10, 1.10)}


def time_ratios(model: str, configs: list, rounds: int, batch: int, statistic=statistics.median,
                autocast: str | None = None) -> dict:
    """{configuration: (ms per step, ratio to autograd)} for one model, interleaved."""
    steps = {}
    for config in ["autograd"] + configs:
        start = time.perf_counter()
        steps[config] = model_step(MODELS[model], config, batch=batch, autocast=autocast)
        steps[config]()
        print(f"  {model} {config}: built, first step {time.perf_counter() - start:.2f} s", flush=True)
    times = interleaved_times(steps, rounds=rounds, warmup=2, statistic=statistic)
    return {c: (t * 1e3, t / times["autograd"]) for c, t in times.items()}


def memory_ratios(model: str, configs: list, batch: int, threads: int, autocast: str | None = None) -> dict:
    """{configuration: (peak MB, ratio to autograd)}, each in a fresh process."""
    peaks = {}
    for config in ["autograd"] + configs:
        peak, net = in_subprocess("fbcompile.bench", "model_memory", MODELS[model], config, [3, 32, 32], batch, threads,
                                  autocast)
        peaks[config] = peak
        print(f"  {model} {config}: peak {peak / 2 ** 20:.1f} MB (net {net / 2 ** 20:.1f} MB)", flush=True)
    return {c: (p / 2 ** 20, p / peaks["autograd"]) for c, p in peaks.items()}


#: name -> (batch, in channels, out channels, spatial size, kernel, stride, groups)
CONV_CASES = {"resnet 3x3 64x8x8": (32, 64, 64, 8, 3, 1, 1), "resnet 3x3 s2 ->128": (32, 64, 128, 8, 3, 2, 1),
              "mbv2 dw 96x8x8": (32, 96, 96, 8, 3, 1, 96), "mbv2 dw s2 144x8x8": (32, 144, 144, 8, 3, 2, 144),
              "mbv2 dw 32x16x16": (32, 32, 32, 16, 3, 1, 32), "mbv2 1x1 96->576 4x4": (32, 96, 576, 4, 1, 1, 1)}


def conv_backward_paths(rounds: int = 15) -> None:
    """Median ms of the fused and the split conv backward per case, and fused == autograd bitwise."""
    import torch.nn.functional as F
    aten = torch.ops.aten
    for name, (n, cin, cout, hw, k, s, groups) in CONV_CASES.items():
        x, w, p = torch.randn(n, cin, hw, hw), torch.randn(cout, cin // groups, k, k), k // 2
        g = torch.randn_like(F.conv2d(x, w, None, s, p, 1, groups))
        padding = hw + 2 * p - ((g.shape[-1] - 1) * s + k)
        backward = lambda mask: aten.convolution_backward(g, x, w, None, [s, s], [p, p], [1, 1], False, [0, 0],
                                                          groups, mask)
        split = lambda: (F.conv_transpose2d(g, w, None, s, p, padding, groups), backward([False, True, False])[1])
        fused = lambda: backward([True, True, False])[:2]
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        reference = torch.autograd.grad(F.conv2d(xg, wg, None, s, p, 1, groups), (xg, wg), g)
        same = all(torch.equal(a, b) for a, b in zip(fused(), reference))
        times = interleaved_times({"split": split, "fused": fused}, rounds=rounds, warmup=2)
        print(f"{name:22s} split {times['split'] * 1e3:7.2f} ms  fused {times['fused'] * 1e3:7.2f} ms  "
              f"fused == autograd bitwise: {same}", flush=True)


def _goal(model, config, which):
    goal = GOALS.get((model, config), (None, None))[which]
    return "" if goal is None else f"<= {goal:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--configs", default=",".join(MODEL_CONFIGS),
                        help="comma-separated learner configurations; CONFIG+BACKEND compiles its feedback modules "
                             "with that torch.compile backend (e.g. bp+inductor; fbcompile.backends)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--convs", action="store_true", help="only compare the conv backward formulations")
    parser.add_argument("--min", action="store_true", help="report each configuration's fastest round instead of "
                        "the median (on a machine busy with other work)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--autocast", choices=AUTOCAST_DTYPES, default=None,
                        help="compile and run every configuration, the baseline included, under torch.autocast")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = args.configs.split(",")
    unknown = [c for c in configs if c.partition("+")[0] not in MODEL_CONFIGS] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) or configuration(s): {', '.join(unknown)}")
    print(f"load average before: {os.getloadavg()}; {torch.get_num_threads()} threads, batch {args.batch}")
    if args.convs:
        conv_backward_paths()
        return
    for model in args.models.split(","):
        statistic = min if args.min else statistics.median
        times = {} if args.skip_time else time_ratios(model, configs, args.rounds, args.batch, statistic, args.autocast)
        memory = {} if args.skip_memory else memory_ratios(model, configs, args.batch, args.threads, args.autocast)
        precision = f", torch.autocast {args.autocast}" if args.autocast else ""
        print(f"\n## {model} ({MODELS[model]}), 3x32x32, batch {args.batch}, train mode{precision}")
        print(f"{'configuration':14s} {'ms/step':>9s} {'time x ag':>10s} {'goal':>8s} {'peak MB':>9s} "
              f"{'mem x ag':>9s} {'goal':>8s}")
        for config in ["autograd"] + configs:
            ms, ratio = times.get(config, (float("nan"), float("nan")))
            mb, mem = memory.get(config, (float("nan"), float("nan")))
            print(f"{config:14s} {ms:9.1f} {ratio:10.3f} {_goal(model, config, 0):>8s} {mb:9.1f} {mem:9.3f} "
                  f"{_goal(model, config, 1):>8s}", flush=True)
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
