"""Benchmark helpers: interleaved step timing and deterministic peak tensor memory.

Ratios are always measured in one run against a baseline on the same model and batch (plain
autograd backprop), never against numbers from another run.

- :func:`interleaved_times`: runs every configuration once per round, in rotating order, for
  ``rounds`` rounds after ``warmup`` rounds, and reports the median seconds per call of each. Running
  them interleaved spreads machine noise (other processes, frequency changes) over all of them.
- :func:`peak_tensor_memory`: one call of ``fn`` under ``torch.profiler`` with
  ``profile_memory=True``; the events' *self* CPU memory (allocations positive, frees negative; an
  op's total would count its children's allocations again) are summed in time order and the
  maximum of that running sum is the peak of live tensor memory the call added. It does not depend
  on allocator caching or thread settings, unlike max RSS. Measure each configuration in its own
  fresh process (:func:`in_subprocess`) so nothing else is live.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from typing import Callable

from .autocast_guard import mixed_precision, under_mixed_precision
from .errors import BenchmarkError


def interleaved_times(configurations: dict[str, Callable], *, rounds: int = 20, warmup: int = 3,
                      min_sample: float = 0.05, statistic: Callable = statistics.median) -> dict:
    """{name: median seconds per call}, configurations run interleaved in rotating order.

    One sample of a configuration times as many consecutive calls as fill ``min_sample`` seconds
    (counted during warm-up), so millisecond steps are not measured one timer read at a time.
    ``statistic`` summarises the samples (``min``: the least disturbed sample, on a busy machine)."""
    names = list(configurations)
    calls = {name: 1 for name in names}
    samples = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(calls[name]):
                configurations[name]()
            elapsed = (time.perf_counter() - start) / calls[name]
            if round_index < warmup:
                calls[name] = max(1, min(1000, int(min_sample / max(elapsed, 1e-9))))
            else:
                samples[name].append(elapsed)
    return {name: statistic(values) for name, values in samples.items()}


def ratios(times: dict, baseline: str) -> dict:
    return {name: t / times[baseline] for name, t in times.items()}


def autograd_step(model, x, y, loss_fn) -> Callable:
    """The baseline: one plain autograd backprop step (``.grad`` cleared, forward, backward)."""
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        loss_fn(model(x), y).backward()
    return step


def in_step_optimizer(model):
    """The optimizer the benchmarks' in-step configurations apply their updates with: plain SGD at a
    small rate (no state, no temporaries: the step's own memory is what is measured)."""
    import torch
    return torch.optim.SGD(model.parameters(), lr=1e-4)


def learner_step(learner, x, y, loss_fn, optimizer=None) -> Callable:
    """One ``learner.step`` with the model's ``.grad`` cleared first, as :func:`autograd_step`;
    with ``optimizer``, the step applies its updates itself (in-step updates, which leave no ``.grad``)."""
    params = list(learner.model.parameters())

    def step():
        for p in params:
            p.grad = None
        learner.step(x, y, loss_fn, optimizer=optimizer)
    return step


def memory_ledger(fn: Callable) -> tuple[int, int]:
    """(peak, net) bytes of tensor memory during one call of ``fn``: the running sum of the
    profiler's self CPU memory events in time order, its maximum and its final value (what the
    call left allocated, e.g. new ``.grad`` tensors); see the module docstring."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak, running


def peak_tensor_memory(fn: Callable) -> int:
    """Peak bytes of tensor memory live during one call of ``fn`` (:func:`memory_ledger`)."""
    return memory_ledger(fn)[0]


def in_subprocess(module: str, function: str, *args) -> object:
    """Run ``module.function(*args)`` in a fresh Python process and return its JSON result."""
    code = (f"import json, sys; from {module} import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(list(args))], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise BenchmarkError(f"{module}.{function}{args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_ratio_table(times: dict, baseline: str, targets: dict | None = None) -> str:
    """Lines 'name  ms  ratio  (target)' for a benchmark printout."""
    lines = [f"{'configuration':28s} {'ms/step':>9s} {'x ' + baseline:>10s}  target"]
    for name, seconds in times.items():
        target = (targets or {}).get(name, "")
        lines.append(f"{name:28s} {seconds * 1e3:9.2f} {seconds / times[baseline]:10.3f}  {target}")
    return "\n".join(lines)


# -- real-size models (examples/bench_models.py, ``fbcompile bench``) ------------------------------
#: learner configurations of the model benchmark: name -> (algorithm, learner options); a name
#: ending in "-in-step" applies the updates inside the step with plain SGD (``step(optimizer=)``,
#: :mod:`fbcompile.runtime.in_step`), where the others leave them in ``.grad``
MODEL_CONFIGS = {"bp": ("bp", {}), "dtp": ("dtp", {}), "dfa": ("dfa", {}),
                 "drtp": ("drtp", {"execution": "unlocked"}), "drtp-in-step": ("drtp", {"execution": "unlocked"}),
                 "mf": ("mf", {}), "mf-in-step": ("mf", {})}
IN_STEP = "-in-step"


def model_batch(model_name: str, shape=(3, 32, 32), batch: int = 32, num_classes: int = 10, seed: int = 0):
    """``(model in train mode, x, y)`` for built-in ``model_name``, seeded: every configuration gets
    an identical copy and the same batch."""
    import torch

    from .models import build_model
    from .runtime.base import model_device
    torch.manual_seed(seed)
    model = build_model(model_name, shape, num_classes).train()
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, device="cpu", generator=generator)
    y = torch.randint(0, num_classes, (batch,), device="cpu", generator=generator)
    device = model_device(model)                            # torch's default device
    return model, x.to(device), y.to(device)


def model_step(model_name: str, config: str, shape=(3, 32, 32), batch: int = 32, seed: int = 0,
               autocast: str | None = None) -> Callable:
    """One training step of ``config`` ("autograd" or a key of :data:`MODEL_CONFIGS`, optionally
    followed by ``+BACKEND``: its feedback modules under that torch.compile backend, e.g.
    "bp+inductor") on a fresh copy of ``model_name`` with cross-entropy; with ``autocast`` (a dtype
    name), compiled and run under torch.autocast (:func:`fbcompile.autocast_guard.mixed_precision`)."""
    import torch.nn.functional as F

    from . import compile as compile_program
    from . import learner as make_learner
    model, x, y = model_batch(model_name, shape, batch, seed=seed)
    if config == "autograd":
        return under_mixed_precision(autograd_step(model, x, y, F.cross_entropy), x.device.type, autocast)
    config, _, backend = config.partition("+")
    algorithm, options = MODEL_CONFIGS[config]
    with mixed_precision(x.device.type, autocast):
        program = compile_program(model, x[:2], backend=backend or None)
    optimizer = in_step_optimizer(model) if config.endswith(IN_STEP) else None
    step = learner_step(make_learner(program, algorithm, seed=seed, **options), x, y, F.cross_entropy, optimizer)
    return under_mixed_precision(step, x.device.type, autocast)


def model_memory(model_name: str, config: str, shape=(3, 32, 32), batch: int = 32, threads: int = 2,
                 autocast: str | None = None) -> list:
    """``[peak, net]`` tensor bytes of one step of ``config`` after one warm-up step (run it in a fresh
    process: :func:`in_subprocess`)."""
    import torch
    torch.set_num_threads(threads)
    step = model_step(model_name, config, tuple(shape), batch, autocast=autocast)
    step()
    return list(memory_ledger(step))
