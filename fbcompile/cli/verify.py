"""``fbcompile verify MODEL``: the Jacobian matching (JML) report of a compiled model.

Every rule's feedback Jacobian is compared with the forward Jacobian's transpose (condition T),
pseudo-inverse (P) or inverse (I), per node and per unit, in float64 by default. Exit 0 when every
exact rule is within --tolerance, 1 when one is not, 2 for usage and compile errors.
"""
from __future__ import annotations

import json
import math

import torch

from .. import verify as verify_program
from . import arguments

DTYPES = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_TOLERANCE = {"float64": 1e-8, "float32": 1e-4}


def add_parser(commands):
    parser = commands.add_parser("verify", help="Jacobian matching report (table or --json); exit 1 on a failure",
                                 description=arguments.description(__doc__))
    arguments.add_model(parser, positional=True)
    parser.add_argument("--data", metavar="DATA", help="verify at samples of this dataset (default: random inputs)")
    parser.add_argument("--num-classes", type=int, default=10, help="outputs of a built-in model (default 10)")
    parser.add_argument("--batch", type=int, default=2, help="samples to verify at (default 2)")
    parser.add_argument("--dtype", default="float64", choices=list(DTYPES), help="precision (default float64)")
    parser.add_argument("--tolerance", type=float, help="largest relative matching loss of an exact rule "
                        "(default 1e-8 in float64, 1e-4 in float32)")
    parser.add_argument("--probes", type=int, default=8, help="random probes for nodes too large for dense "
                        "Jacobians (default 8)")
    parser.add_argument("--pinv-limit", type=int, default=1 << 22, metavar="N",
                        help="largest per-sample Jacobian (entries) given a dense pseudo-inverse for conditions "
                             "P and I (default 4194304)")
    parser.add_argument("--no-units", action="store_true", help="report nodes only, not whole units")
    parser.add_argument("--seed", type=int, default=0, help="seed of model and inputs (default 0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    from .runs import check_positive
    check_positive("--batch", args.batch)
    check_positive("--probes", args.probes, 2)
    tolerance = args.tolerance if args.tolerance is not None else DEFAULT_TOLERANCE[args.dtype]
    _, program, example = arguments.program_from_args(args, dtype=DTYPES[args.dtype], batch=args.batch)
    # P and I need dense pseudo-inverses; for condition T skip them (they cost most of the time).
    pinv_limit = args.pinv_limit if args.condition != "T" else 0
    report = verify_program(program, example, probes=args.probes, seed=args.seed, units=not args.no_units,
                            pinv_limit=pinv_limit)
    failures = report.failures(tolerance)
    if args.json:
        payload = {**report.to_dict(), "dtype": args.dtype, "tolerance": tolerance, "ok": not failures,
                   "failures": [row["node"] for row in failures]}
        print(json.dumps(_finite(payload), indent=2))
    else:
        print(report)
        print()
        print(verdict(report, failures, tolerance))
    return 1 if failures else 0


def verdict(report, failures: list, tolerance: float) -> str:
    """One line: every exact rule within tolerance, or which ones are not."""
    exact = [r for r in report.rows if r["level"] == "node" and r["kind"] == "exact"]
    others = [r for r in report.rows if r["level"] == "node" and r["kind"] != "exact"]
    note = f"; {len(others)} non-exact rule(s) shown for information" if others else ""
    if not failures:
        return f"OK: all {len(exact)} exact rules match within {tolerance:g} (condition {report.condition}){note}"
    listed = ", ".join(f"{r['node']} ({r['op']}: {_fmt(r['matching'])})" for r in failures)
    return f"FAILED: {len(failures)} of {len(exact)} exact rules exceed {tolerance:g}: {listed}"


def _fmt(value) -> str:
    return "not computed: too large for a dense pseudo-inverse, raise --pinv-limit" if value is None else f"{value:.3g}"


def _finite(value):
    """Strict JSON: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
