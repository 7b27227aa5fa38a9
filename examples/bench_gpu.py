"""Real-size convnets on an accelerator: step time, images/s and peak memory of compiled learners
relative to plain autograd backprop, on the same card, model and batch.

    python examples/bench_gpu.py [--device cuda] [--models resnet18,mobilenetv2] [--batches 32,256]
                                 [--configs bp,dtp,dfa,drtp] [--rounds 20] [--autocast bfloat16]

For each model and batch, every configuration trains its own copy of the model (same seed) on the
same batch (3x32x32, 10 classes, train mode, cross-entropy). Time: all configurations interleaved in
this process (:func:`fbcompile.bench.interleaved_times`), each call ended by a device synchronise,
medians. Memory: ``torch.cuda.max_memory_allocated`` during one step after a warm-up step, minus what
was allocated before it (the model, its copy of the batch, the learner's state), so the figure is the
step's own peak. On CPU (``--device cpu``) only the times are reported. ``--autocast DTYPE``: every
configuration, the autograd baseline included, is compiled and run under ``torch.autocast``.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.autocast_guard import AUTOCAST_DTYPES, mixed_precision, under_mixed_precision
from fbcompile.bench import IN_STEP, MODEL_CONFIGS, in_step_optimizer, interleaved_times
from fbcompile.models import build_model

MODELS = {"resnet18": "resnet18-imagenet", "mobilenetv2": "mobilenet-v2"}


def make_step(model_name: str, config: str, batch: int, device: torch.device, seed: int = 0, autocast=None):
    """One training step of ``config`` ("autograd" or a key of MODEL_CONFIGS, optionally +BACKEND) on
    a fresh, seeded copy; with ``autocast`` (a dtype name) compiled and run under torch.autocast."""
    torch.manual_seed(seed)
    model = build_model(MODELS[model_name], (3, 32, 32), 10).train().to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    params = list(model.parameters())
    if config == "autograd":
        def run():
            F.cross_entropy(model(x), y).backward()
    else:
        name, _, backend = config.partition("+")           # "bp+inductor": feedback modules compiled
        algorithm, options = MODEL_CONFIGS[name]
        with mixed_precision(device.type, autocast):
            program = fbcompile.compile(model, x[:2], backend=backend or None)
        learner = fbcompile.learner(program, algorithm, seed=seed, **options)
        optimizer = in_step_optimizer(model) if name.endswith(IN_STEP) else None   # updates applied in the step

        def run():
            learner.step(x, y, F.cross_entropy, optimizer=optimizer)

    run = under_mixed_precision(run, device.type, autocast)

    def step():
        for p in params:
            p.grad = None
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return step


def peak_bytes(step, device) -> int:
    """The step's own peak of allocated device memory (after a warm-up step)."""
    step()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    return torch.cuda.max_memory_allocated(device) - before


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default="32,256")
    parser.add_argument("--configs", default=",".join(MODEL_CONFIGS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--autocast", choices=AUTOCAST_DTYPES, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    configs = ["autograd"] + args.configs.split(",")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    if args.autocast:
        print(f"every configuration, autograd included, under torch.autocast({device.type!r}, {args.autocast})")
    print("| model | batch | learner | ms/step | time x autograd | images/s | peak MB | memory x autograd |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            steps = {c: make_step(model_name, c, batch, device, autocast=args.autocast) for c in configs}
            times = interleaved_times(steps, rounds=args.rounds, warmup=3)
            peaks = {c: peak_bytes(s, device) for c, s in steps.items()} if device.type == "cuda" else {}
            for c in configs:
                t = times[c]
                memory = (f"{peaks[c] / 2 ** 20:.1f} | {peaks[c] / peaks['autograd']:.2f}" if peaks else "- | -")
                print(f"| {model_name} | {batch} | {c} | {t * 1e3:.2f} | {t / times['autograd']:.2f} | "
                      f"{batch / t:.0f} | {memory} |", flush=True)
            del steps


if __name__ == "__main__":
    main()
