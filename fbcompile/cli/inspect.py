"""``fbcompile inspect MODEL``: what the compiler made of a model.

Prints the explain table (one row per forward node: op, rule, condition, kind, unit, emitted
feedback), the generated feedback code, and the unsupported nodes; ``--graph out.png|out.dot``
draws the forward and feedback graphs side by side. Exit 1 when some node has no rule.
"""
from __future__ import annotations

from .. import compile as compile_program
from .. import coverage
from ..passes.feedback import MODES
from . import arguments


def add_parser(commands):
    parser = commands.add_parser("inspect", help="explain table, generated feedback code, unsupported nodes, graphs",
                                 description=arguments.description(__doc__))
    arguments.add_model(parser, positional=True)
    parser.add_argument("--data", metavar="DATA", help="take the input shape and class count from this dataset")
    parser.add_argument("--num-classes", type=int, default=10, help="outputs of a built-in model (default 10)")
    parser.add_argument("--mode", default="error", choices=list(MODES),
                        help="which feedback graph to print and draw (default error)")
    parser.add_argument("--no-code", action="store_true", help="leave out the generated feedback code")
    parser.add_argument("--graph", metavar="FILE", help="draw forward and feedback graphs to FILE (.png, .svg, .pdf, "
                                                        ".dot)")
    parser.add_argument("--graph-params", action="store_true", help="also draw the parameter-gradient ops")
    parser.set_defaults(run=run)
    return parser


def run(args) -> int:
    model, example, unsupported = _unsupported(args)
    if unsupported:
        print(f"Unsupported nodes ({len(unsupported)}), condition {args.condition}:")
        for problem in unsupported:
            print(f"  {problem}")
        print("\nRegister a rule for each with @fbcompile.register_rule (see examples/custom_rule.py).")
        return 1
    program = compile_program(model, example, condition=args.condition, variants=tuple(args.variant),
                              frontend=args.frontend)
    print(program.explain())
    print()
    params = sum(p.numel() for p in model.parameters())
    print(f"{len(program.units)} units, {params:,} parameters; unsupported nodes: none")
    for unit in program.units:
        print(f"  unit {unit.index}: {', '.join(n.name for n in unit.nodes)}"
              f"{'  [' + ', '.join(unit.params) + ']' if unit.params else ''}")
    if not args.no_code:
        print(f"\n# generated {args.mode}-mode feedback code")
        print(program.code(args.mode).strip("\n"))
    if args.graph:
        from ..plots import save_graph
        path = save_graph(program, args.graph, mode=args.mode, params=args.graph_params)
        print(f"\nwrote {path}")
    return 0


def _unsupported(args) -> tuple:
    """(model, example, nodes without a rule), found before compiling."""
    model, example = arguments.model_from_args(args)
    return model, example, coverage(model, example, condition=args.condition, variants=tuple(args.variant),
                                    frontend=args.frontend)
