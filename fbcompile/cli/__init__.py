"""The ``fbcompile`` command (also ``python -m fbcompile``).

Subcommands (one module each): ``demo``, ``inspect``, ``verify``, ``train``, ``compare``, ``bench``
and ``algorithms``. :func:`main` returns the exit status: 0 on success, 1 when the command ran but
its check failed (``verify`` beyond tolerance, a non-finite training step), 2 for usage errors (a
missing path, an unknown model, algorithm, dataset or option, a wrong input shape, an untraceable
model). Errors fbcompile raises on purpose are printed as one message, never as a traceback; any
other exception (a bug, in fbcompile or in a user's model) is printed as one line too and exits 1,
unless FBCOMPILE_TRACEBACK=1 asks for the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import FBCompileError, NonFiniteError
from . import algorithms, bench, compare, demo, inspect, train, verify

COMMANDS = (demo, inspect, verify, train, compare, bench, algorithms)
USAGE_ERROR, CHECK_FAILED = 2, 1


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() returns the status (useful in tests), and
    accepts no abbreviated flags (so a command can tell exactly which flags were given)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message}\n(see {self.prog} --help)")


class _UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fbcompile", description="Compile PyTorch models into feedback-trainable programs, "
                     "verify their Jacobian matching and train them with biologically plausible learning rules.",
                     epilog="Run `fbcompile demo` for a three-minute tour; `fbcompile COMMAND --help` for details.")
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"fbcompile {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS:
        sub = module.add_parser(commands)
        if module not in (demo, algorithms):    # the demo runs single-threaded workers of its own
            sub.add_argument("--threads", type=int, metavar="N",
                             help="torch threads (default: torch's choice; 1 is often fastest for small models)")
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return USAGE_ERROR
    except SystemExit as exc:       # --help and --version
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help()
        return USAGE_ERROR
    try:
        _set_threads(getattr(args, "threads", None))
        return int(args.run(args) or 0)
    except NonFiniteError as exc:
        print(f"fbcompile {args.command}: {exc}", file=sys.stderr)
        return CHECK_FAILED
    except (FBCompileError, _UsageError) as exc:
        print(f"fbcompile {args.command}: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as exc:          # an output path that cannot be written, a full disk, ...
        print(f"fbcompile {args.command}: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "),
              file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"fbcompile {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:        # a bug (ours or in the user's model): one line unless asked for more
        if os.environ.get("FBCOMPILE_TRACEBACK"):
            raise
        print(f"fbcompile {args.command}: unexpected {type(exc).__name__}: {exc}\n(set FBCOMPILE_TRACEBACK=1 "
              "to see the traceback; if the fault is fbcompile's, please report it)", file=sys.stderr)
        return CHECK_FAILED


def _set_threads(threads) -> None:
    if threads is None:
        return
    if threads < 1:
        raise FBCompileError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


__all__ = ["main", "build_parser"]
