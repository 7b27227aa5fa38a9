"""Smoke tests: every example script runs (in its quick mode) and prints what it promises.

Most scripts run in this process with ``runpy`` (as ``__main__``, in a temporary directory), which
skips a fresh interpreter's imports per script. custom_rule.py and custom_algorithm.py register ops,
rules and algorithms globally, so they run as real subprocesses, which also shows a script runs as
it stands.
"""
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXPECTED = {  # a line each script must print
    "mlp.py": "all exact rules match: True",
    "lenet.py": "exact: True",
    "mlp_mixer.py": "frozen-statistics rules (layer_norm)",
    "compare_algorithms.py": "wrote compare.png",
    "custom_rule.py": "propagate_error vs autograd",
    "custom_algorithm.py": "scaled-fa test accuracy",
    "recurrent.py": "dfa: test accuracy",
}


@pytest.fixture(autouse=True)
def _quick(monkeypatch, tmp_path):
    monkeypatch.setenv("FBCOMPILE_EXAMPLE_QUICK", "1")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["example"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


IN_PROCESS = ["mlp.py", "lenet.py", "mlp_mixer.py", "compare_algorithms.py", "recurrent.py"]


@pytest.mark.parametrize("script", IN_PROCESS)
def test_example_runs(script, capsys):
    path = EXAMPLES / script
    if not path.exists():
        pytest.skip(f"examples/{script} does not exist yet")
    runpy.run_path(str(path), run_name="__main__")
    assert EXPECTED[script] in capsys.readouterr().out


def _run_as_script(script, cwd):
    path = EXAMPLES / script
    if not path.exists():
        pytest.skip(f"examples/{script} does not exist yet")
    env = {**os.environ, "FBCOMPILE_EXAMPLE_QUICK": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(path)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert EXPECTED[script] in done.stdout
    return done.stdout


def test_custom_rule_runs_as_a_script(tmp_path):
    """Run as a user would, the script's two user-declared ops give autograd's gradients."""
    out = _run_as_script("custom_rule.py", tmp_path)
    line = next(ln for ln in out.splitlines() if ln.startswith("propagate_error vs autograd"))
    errors = [float(word.rstrip(",")) for word in line.split() if word[:1].isdigit()]
    assert len(errors) == 2 and max(errors) < 1e-10, line


def test_custom_algorithm_runs_as_a_script(tmp_path):
    """A learner registered from user code trains the digits to better than chance (quick mode)."""
    out = _run_as_script("custom_algorithm.py", tmp_path)
    accuracy = float(out.split("scaled-fa test accuracy:")[1].split()[0])
    assert accuracy > 0.5, out
