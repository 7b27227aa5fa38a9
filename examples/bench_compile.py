"""Compiler speed: median compile() time of a ResNet-18-shaped model and verify() time of LeNet-5.

Targets (issue 2): compile of ResNet-18 (8 basic blocks, >= 60 fx nodes) on a (1, 3, 32, 32) input
<= 0.3 s median; verify of LeNet-5 on (1, 1, 32, 32), float64, dense Jacobians <= 2 s.

    python examples/bench_compile.py [--runs 7] [--threads N] [--profile]

``--profile`` prints where compile() spends its time (cProfile, cumulative).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import fbcompile
from fbcompile.models import LeNet5, resnet18

COMPILE_TARGET, VERIFY_TARGET = 0.3, 2.0


def timed(fn, runs: int) -> tuple[float, list]:
    """Median wall time of ``fn()`` over ``runs`` runs after one warm-up run."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_compile(runs: int) -> float:
    model = resnet18((3, 32, 32), 10).eval()
    x = torch.randn(1, 3, 32, 32)
    program = fbcompile.compile(model, x)
    nodes = len(program.traced.graph.nodes)
    blocks = sum(type(m).__name__ == "BasicBlock" for m in model.modules())
    assert blocks == 8 and nodes >= 60, (blocks, nodes)
    median, times = timed(lambda: fbcompile.compile(model, x), runs)
    print(f"compile(resnet18), {blocks} basic blocks, {nodes} fx nodes, input (1, 3, 32, 32): "
          f"median {median:.3f} s over {runs} runs (min {min(times):.3f}, max {max(times):.3f}); "
          f"target <= {COMPILE_TARGET} s: {'ok' if median <= COMPILE_TARGET else 'SLOW'}")
    return median


def bench_verify(runs: int) -> float:
    model = LeNet5((1, 32, 32), 10).double()
    x = torch.randn(1, 1, 32, 32, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    report = fbcompile.verify(program, x)
    assert all(r["method"].startswith("dense") for r in report.rows)
    assert report.ok(1e-10), report.failures(1e-10)
    median, times = timed(lambda: fbcompile.verify(program, x), runs)
    print(f"verify(LeNet-5), input (1, 1, 32, 32) float64, dense Jacobians, {len(report.rows)} rows: "
          f"median {median:.3f} s over {runs} runs (min {min(times):.3f}, max {max(times):.3f}); "
          f"target <= {VERIFY_TARGET} s: {'ok' if median <= VERIFY_TARGET else 'SLOW'}")
    return median


def profile_compile(limit: int = 25) -> None:
    model, x = resnet18((3, 32, 32), 10).eval(), torch.randn(1, 3, 32, 32)
    fbcompile.compile(model, x)
    profiler = cProfile.Profile()
    profiler.enable()
    fbcompile.compile(model, x)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(limit)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_compile(args.runs)
    bench_verify(args.runs)
    if args.profile:
        profile_compile()


if __name__ == "__main__":
    main()
