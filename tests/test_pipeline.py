"""The compiler pipeline: one ordered, printable list of passes; compile, coverage and recompile
all run (a slice of) it."""
import pytest
import torch
from torch import nn

import fbcompile
from fbcompile.compiler import PASSES, Compilation, run_passes
from fbcompile.errors import FBCompileError


def test_passes_are_listed_in_order_with_their_purpose():
    names = [p.name for p in PASSES]
    assert names == ["capture", "propagate", "canonicalize", "rules", "refuse unsupported", "units",
                     "error feedback", "parameter coverage"]
    assert all(repr(p).startswith(f"{p.name}: ") and len(repr(p)) > len(p.name) + 10 for p in PASSES)


def test_compile_is_the_passes_run_in_order():
    model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double(), torch.randn(3, 4).double()
    start = Compilation(model, (x,))
    seen = []
    for step in PASSES:
        start = step.run(start)
        seen.append(start)
    assert seen[0].traced is not None and seen[0].rules is None
    assert seen[3].rules is not None and seen[5].partition is not None and seen[-1].program is not None
    error = torch.randn(3, 2, dtype=torch.float64)
    by_hand = start.program.propagate_error(x, error)
    compiled = fbcompile.compile(model, x).propagate_error(x, error)
    assert torch.equal(by_hand, compiled)
    assert run_passes(PASSES[:4], Compilation(model, (x,))).program is None


def test_each_learner_runs_its_own_executable_and_none_changes_another():
    model, x = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)), torch.randn(3, 4)
    program = fbcompile.compile(model, x)
    bp = fbcompile.learner(program, "bp")
    taps_before = bp.executable.taps
    forward_before = bp.executable.forward_module
    dtp = fbcompile.learner(program, "dtp")
    assert bp.executable.taps == taps_before and bp.executable.forward_module is forward_before
    assert dtp.executable is not bp.executable and "error" not in dtp.executable.modes
    output, taps = bp.executable.run_forward((x,))
    with pytest.raises(FBCompileError, match=r"mode 'target' is not among this executable's modes \('error',\)"):
        bp.executable.run_feedback("target", [output], taps)


def test_no_compiler_pass_imports_the_runtime():
    import ast
    import pathlib
    passes = pathlib.Path(fbcompile.__file__).parent / "passes"
    for path in passes.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert "runtime" not in (node.module or ""), f"{path.name} imports {node.module}"
