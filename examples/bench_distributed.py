"""Data-parallel step time: 2 ranks against 1 at the same per-rank batch (gloo, CPU, one thread per rank).

For bp, dfa and drtp (both its executors) on the 784-5x256-10 tanh MLP (per-rank batch 128) and ResNet-18 at 3x32x32
(per-rank batch 16) it reports, per configuration, the median seconds of one training step
(learner.step + optimizer.step), the seconds per step spent blocked on communication
(``Communicator.wait_seconds``: launching and waiting for all-reduces, the failure agreement
included), and
for drtp, whose updates are launched asynchronously unit by unit, the same 2-rank step with the
overlap switched off (every all-reduce at the end of the step): the difference of the waits is
what the overlap hid.

    python examples/bench_distributed.py            # about two minutes on two free cores

Ranks are spawned as two processes on this machine; a rank runs every configuration in the same
order so the all-reduces pair up. With 2 cores shared with other work the numbers are noisy: the
medians are over ``--steps`` timed steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = [("mlp", (784,), 128), ("resnet18", (3, 32, 32), 16)]
# (label, algorithm, compiled executor?): "drtp-units" is drtp's autograd update-unlocked executor,
# which launches one all-reduce per unit during the forward (the compiled one launches the hidden
# units' updates together, when its generated module returns).
ALGOS = [("bp", "bp", True), ("dfa", "dfa", True), ("drtp", "drtp", True), ("drtp-units", "drtp", False)]


def rank_main(rank: int, world: int, init: str, out: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    import fbcompile
    from fbcompile.models import build_model

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    results = []
    for model_name, shape, batch in CASES:
        for algo, name, compiled in ALGOS:
            for overlap in ([True, False] if name == "drtp" and world > 1 else [True]):
                torch.manual_seed(0)
                model = build_model(model_name, shape, 10)
                x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(rank))
                y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(rank))
                row = {"model": model_name, "algo": algo, "world": world, "batch_per_rank": batch, "overlap": overlap}
                try:
                    program = fbcompile.compile(model, x[:2])
                    learner = fbcompile.learner(program, name, **({"process_group": "world"} if world > 1 else {}))
                    if not compiled:
                        learner.compiled = False
                except fbcompile.FBCompileError as exc:
                    results.append({**row, "error": str(exc)[:200]})
                    continue
                if learner.communicator is not None:
                    learner.communicator.overlap = overlap
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
                times, waits = [], []
                try:
                    for step in range(steps + 1):
                        communicator = learner.communicator
                        waited = communicator.wait_seconds if communicator else 0.0
                        start = time.perf_counter()
                        optimizer.zero_grad(set_to_none=True)
                        result = learner.step(x, y, F.cross_entropy)
                        optimizer.step()
                        if step:                       # the first step is warm-up (and learns the schedule)
                            times.append(time.perf_counter() - start)
                            waits.append((communicator.wait_seconds - waited) if communicator else 0.0)
                except fbcompile.FBCompileError as exc:      # agreed across the ranks: both go on
                    results.append({**row, "error": str(exc)[:200]})
                    continue
                row.update(step_s=statistics.median(times), wait_s=statistics.median(waits),
                           executor=result.details.get("executor"))
                results.append(row)
    Path(out, f"world{world}-rank{rank}.json").write_text(json.dumps(results))
    if world > 1:
        dist.destroy_process_group()


def launch(world: int, steps: int, directory: str) -> list:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    init = os.path.join(directory, f"init{world}")
    ranks = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--init", init,
                               "--out", directory, "--steps", str(steps)], env=env) for r in range(world)]
    if any(p.wait() for p in ranks):
        raise SystemExit(f"a rank of the {world}-rank run failed")
    return json.loads(Path(directory, f"world{world}-rank0.json").read_text())


def table(one: list, two: list) -> str:
    base = {(r["model"], r["algo"]): r for r in one}
    lines = [f"{'model':9s} {'algo':10s} {'1 rank step':>12s} {'2 ranks step':>13s} {'comm wait':>10s} "
             f"{'no-overlap step':>16s} {'no-overlap wait':>16s} {'hidden':>8s}"]
    rows = {}
    for r in two:
        rows.setdefault((r["model"], r["algo"]), {})[r["overlap"]] = r
    for key, by in rows.items():
        first, one_rank = by[True], base[key]
        if "error" in first or "error" in one_rank:
            lines.append(f"{key[0]:9s} {key[1]:10s} n/a: {first.get('error') or one_rank.get('error')}")
            continue
        ms = lambda v: f"{1000 * v:.1f} ms"
        extra = ""
        if False in by:
            off = by[False]
            extra = f" {ms(off['step_s']):>16s} {ms(off['wait_s']):>16s} {ms(off['wait_s'] - first['wait_s']):>8s}"
        lines.append(f"{key[0]:9s} {key[1]:10s} {ms(one_rank['step_s']):>12s} {ms(first['step_s']):>13s} "
                     f"{ms(first['wait_s']):>10s}{extra}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (default 5)")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--init", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.rank, args.world, args.init, args.out, args.steps)
        return
    with tempfile.TemporaryDirectory() as directory:
        one = launch(1, args.steps, directory)
        two = launch(2, args.steps, directory)
    print(table(one, two))


if __name__ == "__main__":
    main()
