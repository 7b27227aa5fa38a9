"""Direct feedback vs plain autograd backprop: step time and peak tensor memory.

    python examples/bench_direct.py [--rounds 40] [--skip-time] [--skip-memory]

1. Step time (issue 4): DFA and DRTP relative to a plain autograd BP step (``zero_grad``,
   ``cross_entropy(model(x), y).backward()``) on the same 784-5x256-10 tanh MLP and batch of 128,
   all configurations interleaved (:func:`fbcompile.bench.interleaved_times`). Targets: DFA <= 0.82 x
   BP (1.5x faster than BioTorch's DFA at 1.23 x BP) and <= 0.9; DRTP <= 0.9. A last row times DFA
   written out by hand for this MLP without the learner contract (:func:`handwritten_dfa_step`):
   the floor of eager PyTorch here, for reference.
2. Peak tensor memory of ONE step on a 784-16x512-10 tanh MLP at batch 8192, each configuration in
   its own fresh process after one warm-up step (so ``.grad`` is allocated inside the measured step
   in every configuration): :func:`fbcompile.bench.memory_ledger`, the running sum of the profiler
   events' self CPU memory in time order; its maximum is the peak and its final value the step's net
   allocation (the new ``.grad`` tensors), printed as a check. Target: update-unlocked DRTP <= 0.35 x BP.
   "drtp (in-step)" applies each unit's update inside the step with plain SGD
   (``learner.step(..., optimizer=)``), so it holds no ``.grad`` at all.

Timings depend on machine load; the script prints the load average before and after.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.bench import (autograd_step, format_ratio_table, in_step_optimizer, in_subprocess, interleaved_times,
                             learner_step, memory_ledger)
from fbcompile.models import build_model

TIME_TARGETS = {"dfa": "<= 0.82 (0.9)", "drtp (unlocked)": "<= 0.90"}
MEMORY_CONFIGS = ["autograd bp", "drtp (unlocked)", "drtp (in-step)", "drtp (stored)", "shallow (unlocked)", "dfa"]


def _config_step(config: str, model, x, y):
    """The step of ``config``: "autograd bp", or an algorithm name with an optional " (execution)";
    " (in-step)" is update-unlocked with its updates applied inside the step by plain SGD."""
    if config == "autograd bp":
        return autograd_step(model, x, y, F.cross_entropy)
    name, _, mode = config.partition(" (")
    mode = mode.rstrip(")")
    optimizer = in_step_optimizer(model) if mode == "in-step" else None
    options = {"execution": mode} if mode and optimizer is None else {}
    learner = fbcompile.learner(fbcompile.compile(model, x[:2]), name, **options)
    return learner_step(learner, x, y, F.cross_entropy, optimizer)


def handwritten_dfa_step(model, x, y):
    """The floor: DFA for this Linear/Tanh MLP written out by hand, with none of the learner
    contract (no transaction, no finiteness check, the softmax cross-entropy error in closed form):
    forward, e = (softmax(a_L) - y*) / N, then per layer delta = (e B) * (1 - h^2),
    dW = delta^T h_in, db = sum_n delta. A reference row, not a configuration of the library."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    projections = [torch.randn(linears[-1].out_features, layer.out_features) for layer in linears[:-1]]
    rows = torch.arange(len(y))

    def step():
        with torch.no_grad():
            h, layer_inputs, outputs = x.flatten(1), [], []
            for i, layer in enumerate(linears):
                layer_inputs.append(h)
                h = F.linear(h, layer.weight, layer.bias)
                h = torch.tanh(h) if i < len(linears) - 1 else h
                outputs.append(h)
            e = torch.softmax(h, 1)
            e[rows, y] -= 1
            e /= len(y)
            for i, layer in enumerate(linears):
                delta = e if i == len(linears) - 1 else torch.ops.aten.tanh_backward(e @ projections[i], outputs[i])
                layer.weight.grad = delta.t() @ layer_inputs[i]
                layer.bias.grad = delta.sum(0)
    return step


def step_functions(batch: int = 128) -> dict:
    torch.manual_seed(0)
    model = build_model("mlp", (784,), 10, width=256, depth=5)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    steps = {c: _config_step(c, model, x, y) for c in ["autograd bp", "dfa", "sdfa", "drtp (unlocked)", "drtp (stored)"]}
    steps["dfa, hand-written floor"] = handwritten_dfa_step(model, x, y)
    return steps


def memory_of(config: str, depth: int = 16, width: int = 512, batch: int = 8192) -> dict:
    """Peak and net tensor bytes of one step of ``config`` (run this in a fresh process)."""
    torch.manual_seed(0)
    model = build_model("mlp", (784,), 10, width=width, depth=depth)
    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))
    step = _config_step(config, model, x, y)
    step()                                     # warm-up (lazy initialisation, compiled unit programs)
    model.zero_grad(set_to_none=True)
    peak, net = memory_ledger(step)
    return {"peak": peak, "net": net}


def memory_table(depth: int, width: int, batch: int) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    return {config: in_subprocess("bench_direct", "memory_of", config, depth, width, batch) for config in MEMORY_CONFIGS}


def _load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the timing (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_time:
        print(f"## Step time, 784-5x256-10 tanh MLP, batch 128 ({torch.get_num_threads()} threads; {_load()})")
        times = interleaved_times(step_functions(), rounds=args.rounds)
        print(format_ratio_table(times, "autograd bp", TIME_TARGETS))
        print(f"(after: {_load()})")
    if not args.skip_memory:
        print(f"\n## Peak tensor memory of one step, 784-{args.depth}x{args.width}-10 tanh MLP, batch {args.batch} "
              "(own process each)")
        peaks = memory_table(args.depth, args.width, args.batch)
        base = peaks["autograd bp"]
        print(f"{'configuration':20s} {'peak MiB':>9s} {'x bp':>6s} {'net MiB':>8s}  target")
        for config, peak in peaks.items():
            target = "<= 0.35" if config == "drtp (unlocked)" else ""
            print(f"{config:20s} {peak['peak'] / 2 ** 20:9.1f} {peak['peak'] / base['peak']:6.3f} "
                  f"{peak['net'] / 2 ** 20:8.1f}  {target}")
        print("peak = maximum of the running sum of self memory; net = its final value (the new .grad)")


if __name__ == "__main__":
    main()
