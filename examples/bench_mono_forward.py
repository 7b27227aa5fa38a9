"""Mono-Forward benchmarks: MF-DD step cost against P and chunk count; peak memory of MF vs BP.

    python examples/bench_mono_forward.py [--rounds 5] [--skip-memory] [--skip-cost]

1. Step cost. One "mf-dd" step (update='accumulate') on an MLP 784-256-256-10 at batch 128 for
   P in {1, 2, 4, 8} and chunk sizes C_max in {50,000 (paper), 20,000, 5,000}; the chunk count and
   the number of perturbed unit passes per step (2 P x chunks) are listed with the time per step
   and per pass, next to one "mf" step and one autograd BP step (fbcompile.bench.interleaved_times,
   one thread, configurations interleaved).
2. Peak tensor memory of one "mf" step vs one BP step (autograd forward + backward) on a 16-layer
   width-512 ReLU MLP at batch 8192 (input 784, 10 classes), each in its own fresh process. Target
   (issue 5): MF <= 0.4 x BP. The measurement is fbcompile.bench.peak_tensor_memory (torch.profiler
   with profile_memory=True: the running sum, in time order, of every event's self CPU memory,
   allocations + and frees -, its maximum), on the second step of a fresh learner with ``.grad``
   cleared before it, so the new gradients count and no earlier ones are freed inside the window.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.bench import autograd_step, in_subprocess, interleaved_times, learner_step, peak_tensor_memory
from fbcompile.models import build_model

MEMORY_CASE = {"width": 512, "depth": 16, "batch": 8192, "inputs": 784}


# -- 1. step cost ------------------------------------------------------------------------------------------
def cost_table(rounds: int) -> str:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model("mlp", (784,), 10, width=256, depth=2, act="relu")
    x, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    program = fbcompile.compile(model, x[:8])
    step_of = lambda learner: learner_step(learner, x, y, F.cross_entropy)
    configurations, passes, chunks = {"autograd bp": autograd_step(model, x, y, F.cross_entropy),
                                      "mf": step_of(fbcompile.learner(program, "mf"))}, {}, {}
    for size in (50_000, 20_000, 5_000):
        for p in (1, 2, 4, 8):
            learner = fbcompile.learner(program, "mf-dd", directions=p, chunk_size=size)
            name = f"mf-dd P={p} C_max={size}"
            configurations[name] = step_of(learner)
            chunks[name] = sum(map(len, learner.chunks.values())) + sum(map(len, learner.head_chunks.values()))
            passes[name] = 2 * p * chunks[name]
    times = interleaved_times(configurations, rounds=rounds, warmup=1)
    lines = ["| configuration | chunks | perturbed passes | ms / step | x mf | ms / pass |", "|---|---|---|---|---|---|"]
    for name, seconds in times.items():
        per_pass = f"{seconds * 1e3 / passes[name]:.3f}" if name in passes else ""
        lines.append(f"| {name} | {chunks.get(name, '')} | {passes.get(name, '')} | {seconds * 1e3:.1f} | "
                     f"{seconds / times['mf']:.1f} | {per_pass} |")
    return "\n".join(lines)


# -- 2. peak memory -------------------------------------------------------------------------------------
def measure_memory(method: str) -> int:
    """Run in a fresh process: peak tensor bytes of one ``method`` step ("bp" or "mf")."""
    case = MEMORY_CASE
    torch.manual_seed(0)
    model = build_model("mlp", (case["inputs"],), 10, width=case["width"], depth=case["depth"], act="relu")
    x, y = torch.randn(case["batch"], case["inputs"]), torch.randint(0, 10, (case["batch"],))
    step = (autograd_step(model, x, y, F.cross_entropy) if method == "bp" else
            learner_step(fbcompile.learner(fbcompile.compile(model, x[:8]), method), x, y, F.cross_entropy))
    step()                                  # lazy state (optimizer moments) exists before the measurement
    model.zero_grad(set_to_none=True)
    return peak_tensor_memory(step)


def memory_table() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    peaks = {m: in_subprocess("bench_mono_forward", "measure_memory", m) for m in ("bp", "mf")}
    case = MEMORY_CASE
    lines = [f"Peak tensor memory of one step, MLP {case['inputs']}-{case['depth']}x{case['width']}-10 ReLU, "
             f"batch {case['batch']} (each in its own process)", "",
             "| BP (MiB) | MF (MiB) | MF / BP | target |", "|---|---|---|---|",
             f"| {peaks['bp'] / 2**20:.1f} | {peaks['mf'] / 2**20:.1f} | {peaks['mf'] / peaks['bp']:.3f} | <= 0.4 |"]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args(argv)
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if not args.skip_cost:
        print("\n## MF-DD step cost, MLP 784-256-256-10, batch 128, one thread\n")
        print(cost_table(args.rounds))
    if not args.skip_memory:
        print("\n## " + memory_table())
    print(f"\nload average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    sys.exit(main())
