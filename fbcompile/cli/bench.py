"""``fbcompile bench``: step time and peak memory of each algorithm relative to plain autograd BP.

Every configuration trains its own copy of the model (same seed) on the same batch. Step times are
medians over --rounds rounds, run interleaved in rotating order in this one process so machine
noise spreads over all of them; peak memory is the profiler's running sum of tensor allocations
during one step (fbcompile.bench.peak_tensor_memory), in this process or with --isolate in a fresh
process per configuration. Each algorithm runs with its recommended learner options, loss and
condition for the model's family (`fbcompile algorithms ALGO`) unless --condition / --option give
others.

Progress is printed per configuration as it is set up, with the time of its first step; a
configuration whose first step takes longer than --max-step-seconds (default 60, e.g. MF-DD on an
11M-parameter ResNet-18) is skipped with a line saying so, unless --all. With --in-step-updates, each
algorithm that can apply its updates inside the step (update-unlocked: drtp, shallow, mf) gets a
second row, "NAME (in-step)": ``learner.step(..., optimizer=)`` with plain SGD, no ``.grad`` kept.
``--autocast DTYPE``: the baseline and every algorithm compiled and run under torch.autocast.
Real-size models: ``--model resnet18-imagenet --input-shape 3,32,32 --batch-size 32 --algos bp,dtp,dfa,drtp``
(torchvision's architectures, :mod:`fbcompile.zoo_models`; ``mobilenet-v2`` likewise).
"""
from __future__ import annotations

import json

from ..errors import FBCompileError
from ..explain import format_table
from . import arguments, resolve
from .runs import check_positive

BASELINE = "autograd"
IN_STEP = " (in-step)"


def add_parser(commands):
    parser = commands.add_parser("bench", help="step time and peak memory of each algorithm relative to autograd BP",
                                 description=arguments.description(__doc__))
    arguments.add_model(parser, recommended=True)
    parser.add_argument("--data", metavar="DATA", help="take a batch of this dataset (default: random inputs)")
    parser.add_argument("--num-classes", type=int, default=10, help="outputs of a built-in model (default 10)")
    parser.add_argument("--algos", help="comma-separated algorithms (default: every registered one that applies)")
    arguments.add_learner(parser)
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak memory measurement")
    parser.add_argument("--isolate", action="store_true", help="measure memory in a fresh process per configuration")
    parser.add_argument("--seed", type=int, default=0, help="seed of models, learners and data (default 0)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--max-step-seconds", type=float, default=60.0,
                        help="skip configurations whose first step takes longer (default 60)")
    parser.add_argument("--all", action="store_true", help="run every configuration, however slow")
    parser.add_argument("--in-step-updates", action="store_true",
                        help="also measure each update-unlocked algorithm with its updates applied inside the step")
    parser.add_argument("--backend", metavar="NAME", help="torch.compile backend of the generated feedback modules "
                        "(e.g. inductor; compile time is paid at the first step; fbcompile.backends)")
    arguments.add_autocast(parser)
    parser.set_defaults(run=run)
    return parser


def setup(args_dict: dict):
    """{name: step function} for autograd and every algorithm that applies, plus {name: reason}
    for those that do not. ``args_dict`` holds the parsed arguments (picklable, for --isolate)."""
    import argparse

    import torch
    import torch.nn.functional as F
    from .. import compile as compile_program
    from .. import learner as make_learner
    from ..autocast_guard import mixed_precision, under_mixed_precision
    from ..bench import autograd_step, in_step_optimizer, learner_step
    from ..runtime.base import model_device
    from ..recommended import recommended
    args = argparse.Namespace(**args_dict)
    if args.data:
        from .runs import load_data
        data = load_data(args.data)
        x, y = data.train_x[:args.batch_size], data.train_y[:args.batch_size]
        loss_fn = resolve.loss_for(data.task)
    else:
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.batch_size, *args.shape_resolved, device="cpu", generator=generator)
        y = torch.randint(0, args.num_classes_resolved, (len(x),), device="cpu", generator=generator)
        loss_fn = F.cross_entropy
    steps, skipped = {}, {}
    baseline = _fresh(args)
    device = model_device(baseline)                                       # torch's default device
    x, y = x.to(device), y.to(device)
    autocast = getattr(args, "autocast", None)            # the baseline and every learner under it
    steps[BASELINE] = under_mixed_precision(autograd_step(baseline, x, y, loss_fn), device.type, autocast)
    _first_step(args, BASELINE, steps, skipped)
    shared = resolve.learner_options(args)
    for name in args.algos:
        for in_step in (False, True) if getattr(args, "in_step_updates", False) else (False,):
            label = f"{name}{IN_STEP if in_step else ''}"
            try:
                model = _fresh(args)
                rec = recommended(name, model)
                with mixed_precision(device.type, autocast):
                    program = compile_program(model, x[:2], condition=args.condition or rec.condition.value,
                                              variants=tuple(args.variant), frontend=args.frontend,
                                              backend=getattr(args, "backend", None))
                learner = make_learner(program, name, **{"seed": args.seed, **rec.learner_options(),
                                                         **resolve.options_for(name, shared)})
                if in_step and not learner.executor.hands_over:
                    break                                  # cannot apply inside the step: no second row
                optimizer = in_step_optimizer(model) if in_step else None
                own_loss = rec.loss_fn() if loss_fn is F.cross_entropy else loss_fn
                steps[label] = under_mixed_precision(learner_step(learner, x, y, own_loss, optimizer), device.type,
                                                     autocast)
                _first_step(args, label, steps, skipped)   # fails here if the algorithm cannot train this model
            except FBCompileError as exc:
                steps.pop(label, None)
                skipped[label] = str(exc)
                break
    return steps, skipped


def _first_step(args, name: str, steps: dict, skipped: dict) -> None:
    """Run configuration ``name``'s first step, print its time (progress) and drop it when it is
    slower than --max-step-seconds unless --all (the baseline is always kept)."""
    import time
    start = time.perf_counter()
    steps[name]()
    seconds = time.perf_counter() - start
    progress = getattr(args, "progress", False)
    limit = getattr(args, "max_step_seconds", 60.0)
    if name != BASELINE and seconds > limit and not getattr(args, "all", False):
        steps.pop(name)
        skipped[name] = f"skipped: its first step took {seconds:.1f} s > {limit:g} s (--all runs it)"
        if progress:
            print(f"  {name}: first step {seconds:.1f} s, over {limit:g} s: skipped (--all runs it)", flush=True)
    elif progress:
        print(f"  {name}: set up, first step {seconds:.2f} s", flush=True)


def _fresh(args):
    """A new copy of the model, built with the same seed as every other configuration's."""
    return resolve.build(args.model, tuple(args.shape_resolved), args.num_classes_resolved,
                         arguments.model_options(args), seed=args.seed)


def memory_of(args_dict: dict, name: str) -> int:
    """Peak tensor bytes of one step of configuration ``name`` (after a warm-up step)."""
    algorithm = name.removesuffix(IN_STEP)
    steps, _ = setup({**args_dict, "algos": [a for a in args_dict["algos"] if a == algorithm]})
    steps[name]()
    return memory_of_inline(steps[name])


def run(args) -> int:
    from ..backends import check_backend
    from ..bench import in_subprocess, interleaved_times
    check_backend(args.backend)
    check_positive("--batch-size", args.batch_size)
    check_positive("--rounds", args.rounds)
    args.algos = resolve.check_algorithms(resolve.split_list(args.algos, "--algos") if args.algos
                                          else resolve.algorithm_names())
    model, example = arguments.model_from_args(args)       # resolves and checks the shape once
    args.shape_resolved = list(example.shape[1:])
    args.num_classes_resolved = int(resolve.check_forward(model, example, args.model).shape[-1])
    args_dict = {k: v for k, v in vars(args).items() if k not in ("run", "parser")}
    if not args.json:
        print(f"setting up autograd and {', '.join(args.algos)} on {args.model}", flush=True)
    steps, skipped = setup({**args_dict, "progress": not args.json})
    if not args.json:
        print(f"benchmarking {', '.join(steps)} on {args.model}, batch {args.batch_size}, "
              f"{args.rounds} interleaved rounds", flush=True)
    times = interleaved_times(steps, rounds=args.rounds, warmup=args.warmup)
    memory = {}
    if not args.no_memory:
        for name in steps:
            memory[name] = (in_subprocess("fbcompile.cli.bench", "memory_of", {**args_dict, "all": True}, name)
                            if args.isolate else memory_of_inline(steps[name]))
            if not args.json:
                print(f"  peak memory of {name}: {memory[name] / 2 ** 20:.1f} MB", flush=True)
    rows = []
    for name in steps:
        row = {"configuration": name, "ms/step": times[name] * 1e3, "x autograd": times[name] / times[BASELINE]}
        if memory:
            row["peak MB"] = memory[name] / 2 ** 20
            row["memory x autograd"] = memory[name] / memory[BASELINE] if memory[BASELINE] else None
        rows.append(row)
    if args.json:
        print(json.dumps({"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
                          "results": rows, "not_applicable": skipped}, indent=2))
        return 0
    shown = [{k: (f"{v:.3f}" if isinstance(v, float) else str(v)) for k, v in row.items()} for row in rows]
    print(format_table(shown, list(rows[0])))
    for name, reason in skipped.items():
        print(f"{name}: {reason}" if reason.startswith("skipped") else f"not applicable: {name}: {reason}")
    return 0


def memory_of_inline(step) -> int:
    """Peak tensor bytes of one call of ``step``, with the profiler's C++ log lines silenced."""
    import os
    import sys

    from ..bench import peak_tensor_memory
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        return peak_tensor_memory(step)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
