"""The "any model" zoo: one model of every torchvision classification family through fbcompile.

For each model (random weights, nothing downloads; 10 classes, small inputs):

1. compile it in eval mode, float64, ``variants=("exact-statistics",)``, or report why it is refused
   (``fbcompile.coverage`` lists every unsupported node);
2. compare error-mode feedback with autograd: relative error of the input gradient and of the worst
   parameter gradient ("exact" when every one is below 1e-8; a parameter autograd reaches that gets
   no gradient is reported by name). Parameters that are exactly zero (ViT's head, its class token,
   BatchNorm biases) get random values first so the comparison is not vacuous;
3. the small-beta limit: the angle between the update of ``dtp`` (beta = 1e-6) and of ``bp``
   (float64, eval, exact statistics), which paper 002 says tends to 0;
4. one training step of each learner (bp, fa, dtp, dfa, drtp, ddtp-linear, mf, mf-dd) in train mode,
   float32, on a fresh copy of the model: "ok", "refused: <reason>" (an FBCompileError when the
   learner is built), "step error: ..." (an FBCompileError in the step) or "CRASH: <type: message>"
   (any other exception: a bug).

It prints a markdown table and writes the details as JSON::

    python examples/zoo.py                                   # every family
    python examples/zoo.py --models resnet18,mobilenet_v2 --size 64 --out zoo.json
    python examples/zoo.py --skip-learners --timeout 900     # each model in its own process
    python examples/zoo.py --models maxvit_t --learners fa,dtp   # only these learners in check 4

torchvision is not a dependency of fbcompile; this script uses it when it is installed
(``pip install --no-deps torchvision==0.28.0`` beside torch 2.13.0) and otherwise prints a message
and exits 0. Its compiled ops need not load: only the pure-Python classification models are used.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_checks import CLASSES, LEARNERS, Result, _crash, _tail, check_model, table  # noqa: E402



# -- torchvision, when it is installed ------------------------------------------------------------------
def import_torchvision():
    """torchvision's ``models`` package, or None when torchvision is not installed.

    A torchvision wheel built for CUDA fails in ``torchvision._meta_registrations`` beside the CPU
    build of torch (its compiled ops do not load); the classification models do not need them, so an
    empty module stands in for that one when the real import fails."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return None
    except Exception:  # noqa: BLE001  (the compiled ops of a mismatched build)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        try:
            import torchvision  # noqa: F401
        except ImportError:
            return None
    from torchvision import models
    return models


@dataclass
class ModelSpec:
    """How to build one zoo model: ``build(models, size, classes)`` returns a fresh nn.Module;
    ``min_size`` is the smallest input the architecture takes; ``note`` says what differs from the
    torchvision default."""
    build: Callable
    min_size: int = 32
    note: str = ""


def _vit(models, size, classes):
    return models.vit_b_16(weights=None, image_size=size, num_classes=classes)


def _maxvit(models, size, classes):
    # maxvit_t fixes partition_size=7, which needs inputs that are multiples of 224; the same
    # channels and depths with 2x2 partitions take small inputs (any multiple of 32)
    return models.MaxVit(input_size=(size, size), stem_channels=64, partition_size=2,
                         block_channels=[64, 128, 256, 512], block_layers=[2, 2, 5, 2], head_dim=32,
                         stochastic_depth_prob=0.2, num_classes=classes)


def _plain(name, **options):
    return lambda models, size, classes: getattr(models, name)(weights=None, num_classes=classes, **options)


ZOO = {
    "alexnet": ModelSpec(_plain("alexnet"), 63),
    "vgg11_bn": ModelSpec(_plain("vgg11_bn"), 32),
    "resnet18": ModelSpec(_plain("resnet18"), 32),
    "resnet50": ModelSpec(_plain("resnet50"), 32),
    "resnext50_32x4d": ModelSpec(_plain("resnext50_32x4d"), 32),
    "densenet121": ModelSpec(_plain("densenet121"), 32),
    "googlenet": ModelSpec(_plain("googlenet", aux_logits=False, init_weights=True), 32, "aux_logits=False"),
    "inception_v3": ModelSpec(_plain("inception_v3", aux_logits=False, init_weights=True), 75, "aux_logits=False"),
    "mobilenet_v2": ModelSpec(_plain("mobilenet_v2"), 32),
    "mobilenet_v3_small": ModelSpec(_plain("mobilenet_v3_small"), 32),
    "mnasnet0_5": ModelSpec(_plain("mnasnet0_5"), 32),
    "shufflenet_v2_x0_5": ModelSpec(_plain("shufflenet_v2_x0_5"), 32),
    "squeezenet1_1": ModelSpec(_plain("squeezenet1_1"), 32),
    "regnet_x_400mf": ModelSpec(_plain("regnet_x_400mf"), 32),
    "regnet_y_400mf": ModelSpec(_plain("regnet_y_400mf"), 32),
    "efficientnet_b0": ModelSpec(_plain("efficientnet_b0"), 32),
    "convnext_tiny": ModelSpec(_plain("convnext_tiny"), 32),
    "vit_b_16": ModelSpec(_vit, 16, "image_size=input size (16x16 patches)"),
    "swin_t": ModelSpec(_plain("swin_t"), 32),
    "maxvit_t": ModelSpec(_maxvit, 32, "MaxVit with maxvit_t's channels/depths, partition_size=2"),
}


# -- the checks, on any model -----------------------------------------------------------------------------
def _zoo_input(spec, size, batch, seed=0):
    side = max(size, spec.min_size)
    generator = torch.Generator().manual_seed(seed)        # a CPU generator: drawn on the CPU, then moved
    return torch.randn(batch, 3, side, side, generator=generator, device="cpu").to(torch.get_default_device())


def run_zoo_model(models, name, size, batch, skip_learners, learner_budget, step_timeout=0.0, log=print,
                  learners=LEARNERS) -> Result:
    spec = ZOO[name]
    x = _zoo_input(spec, size, batch)
    note = ", ".join(filter(None, [spec.note, f"{CLASSES} classes"]))
    try:
        return check_model(name, lambda: spec.build(models, x.shape[-1], CLASSES), x, skip_learners=skip_learners,
                           learner_budget=learner_budget, step_timeout=step_timeout, note=note, log=log,
                           learners=learners)
    except Exception as exc:  # noqa: BLE001  (building the model itself failed)
        res = Result(name, tuple(x.shape), note, compiled=f"build failed: {_crash(exc)}")
        res.tracebacks["build"] = _tail(exc)
        return res


def load_results(path) -> list:
    """The results a previous run wrote with ``--out``."""
    with open(path) as f:
        records = json.load(f)["results"]
    results = []
    for record in records:
        res = Result(record.pop("name"))
        for k, v in record.items():
            setattr(res, k, tuple(v) if k == "input_shape" else v)
        results.append(res)
    return results


def _run_isolated(name, args, log) -> Result:
    """Run one model in a child process under ``args.timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "one.json")
        command = [sys.executable, os.path.abspath(__file__), "--models", name, "--size", str(args.size),
                   "--batch", str(args.batch), "--learner-budget", str(args.learner_budget),
                   "--step-timeout", str(args.step_timeout), "--threads", str(args.threads), "--out", out, "--child",
                   "--learners", ",".join(_learners(args))]
        if args.skip_learners:
            command.append("--skip-learners")
        start = time.perf_counter()
        try:
            done = subprocess.run(command, timeout=args.timeout, capture_output=True, text=True)
            sys.stdout.write(done.stdout)
            sys.stdout.flush()
            if done.returncode == 0 and os.path.exists(out):
                return load_results(out)[0]
            res = Result(name, compiled=f"CRASH: child exited with status {done.returncode}")
            res.tracebacks["process"] = done.stderr[-3000:]
        except subprocess.TimeoutExpired:
            res = Result(name, compiled=f"timeout: no result within {args.timeout:g} s")
        res.seconds["total"] = round(time.perf_counter() - start, 1)
        log(f"  [{name}] {res.compiled}")
        return res


def _learners(args) -> tuple:
    return tuple(a.strip() for a in args.learners.split(",") if a.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(ZOO), help="comma-separated names (default: all %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="input height and width (raised to a model's minimum)")
    parser.add_argument("--batch", type=int, default=2, help="images per batch (train-mode BatchNorm needs 2)")
    parser.add_argument("--skip-learners", action="store_true", help="only checks 1-3")
    parser.add_argument("--learners", default=",".join(LEARNERS),
                        help="comma-separated learners of check 4 (default: all %(default)s)")
    parser.add_argument("--learner-budget", type=float, default=600.0,
                        help="seconds of learner steps per model after which the remaining learners are skipped")
    parser.add_argument("--step-timeout", type=float, default=300.0,
                        help="seconds for one learner's compile and step before it is abandoned (0: no limit)")
    parser.add_argument("--timeout", type=float, default=0.0,
                        help="run each model in its own process, killed after this many seconds (0: in this process)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--table", default="", metavar="JSON",
                        help="only print the table of results a run wrote with --out (no torchvision needed)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)   # one model for --timeout
    args = parser.parse_args(argv)
    if args.table:
        print(table(load_results(args.table)))
        return 0
    unknown = [a for a in _learners(args) if a not in LEARNERS]
    if unknown or not _learners(args):
        parser.error(f"unknown learner(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(LEARNERS)}")

    models = import_torchvision()
    if models is None:
        print("examples/zoo.py: torchvision is not installed, so there is no model zoo to run; "
              "install it with `pip install --no-deps torchvision==0.28.0` (fbcompile itself does not need it).")
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if not args.child:
        print(f"fbcompile zoo, {stamp}: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
              f"input {args.size}x{args.size} (or the model's minimum), batch {args.batch}", flush=True)
    results = []
    for name in names:
        if not args.child:
            print(f"{name}:", flush=True)
        if args.timeout > 0:
            res = _run_isolated(name, args, print)
        else:
            res = run_zoo_model(models, name, args.size, args.batch, args.skip_learners, args.learner_budget,
                                args.step_timeout, log=lambda s: print(s, flush=True), learners=_learners(args))
        if not args.child:
            print(f"  [{name}] {res.seconds.get('total', '-')} s", flush=True)
        results.append(res)
        if args.out:   # after every model, so a long run leaves what it has
            with open(args.out, "w") as f:
                json.dump({"started": stamp, "torch": torch.__version__, "size": args.size, "batch": args.batch,
                           "results": [r.to_json() for r in results]}, f, indent=1)
    if args.child:
        return 0
    print(f"\nfbcompile zoo, started {stamp}, finished {time.strftime('%Y-%m-%d %H:%M:%S')}")
    print(table(results))
    crashes = [(r.name, k, v) for r in results for k, v in r.tracebacks.items()]
    for name, where, text in crashes:
        print(f"\n--- {name} / {where} ---\n{text.rstrip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
