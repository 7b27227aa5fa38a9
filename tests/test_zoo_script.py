"""Smoke test of examples/zoo.py (issue 11) without torchvision: the script's checks run on two tiny
models written here, through the same ``check_model`` the script runs on each torchvision family,
and the script exits 0 with a clear message when torchvision cannot be imported."""
import importlib.util
import json
import runpy
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import OptionError

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "zoo.py"
CHECKS = SCRIPT.with_name("zoo_checks.py")


@pytest.fixture(scope="module")
def zoo():
    """examples/zoo_checks.py, the part of the zoo script that runs the checks on one model."""
    spec = importlib.util.spec_from_file_location("fbcompile_zoo_checks", CHECKS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # dataclasses look their module up while the class is created
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


class TinyResNet(nn.Module):
    """Conv-BN-ReLU stem, one residual block, Dropout, global pooling, a zero-initialised head (as
    ViT's): the zoo must randomise it, or the parameter comparison would be vacuous."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.drop, self.head = nn.Dropout(0.2), nn.Linear(4, classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        h = self.stem(x)
        h = F.relu(h + self.b(F.relu(self.a(h))))
        return self.head(self.drop(F.adaptive_avg_pool2d(h, 1).flatten(1)))


class TinyUnsupported(nn.Module):
    """An op without a feedback rule: the zoo reports the refusal with the node's op."""

    def __init__(self, classes=4):
        super().__init__()
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(torch.special.bessel_j0(x.flatten(1)))


def test_a_model_that_compiles_is_exact_meets_the_limit_and_every_learner_steps(zoo):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    res = zoo.check_model("tiny-resnet", TinyResNet, x, classes=4, log=lambda s: None)
    assert res.compiled == "ok" and res.exact, res
    assert res.input_error < zoo.EXACT and res.param_error < zoo.EXACT and not res.missing
    assert res.angle is not None and res.angle < 0.01
    assert list(res.learners) == list(zoo.LEARNERS)
    assert all(v == "ok" for v in res.learners.values()), res.learners
    record = json.loads(json.dumps(res.to_json()))
    assert record["name"] == "tiny-resnet" and record["input_shape"] == [2, 3, 5, 5]
    row = zoo.table([res]).splitlines()[-1]
    assert row.startswith("| tiny-resnet |") and "exact (input" in row and "deg" in row and "all 8" in row


def test_zero_parameters_are_randomised(zoo):
    model = TinyResNet().double()
    names = zoo.randomize_zero_parameters(model)
    assert set(names) >= {"head.weight", "head.bias"}
    assert all(p.any() for p in model.parameters())


def test_a_refused_model_is_reported_with_its_op_and_skips_the_error_checks(zoo):
    x = torch.randn(3, 6)
    res = zoo.check_model("tiny-unsupported", TinyUnsupported, x, classes=4, learners=("bp", "fa"),
                          log=lambda s: None)
    assert res.compiled.startswith("refused: 1 node(s)") and "special_bessel_j0" in res.compiled
    assert res.exact is None and res.angle is None
    assert res.learners["bp"].startswith("refused: train-mode compile:") and "special_bessel_j0" in res.learners["bp"]
    assert res.learners["fa"] == res.learners["bp"]
    assert "refused: 1 node(s)" in zoo.table([res])


def test_learner_outcomes_are_classified(zoo, monkeypatch):
    """An FBCompileError at construction is a refusal; anything else is a CRASH with its traceback;
    a step past the time limit is a timeout."""
    real = fbcompile.learner

    def fake(program, algorithm, **options):
        if algorithm == "fa":
            raise OptionError("fa cannot apply here")
        if algorithm == "dfa":
            raise KeyError("relu_26")
        if algorithm == "drtp":
            time.sleep(5)
        return real(program, algorithm, **options)

    monkeypatch.setattr(fbcompile, "learner", fake)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    res = zoo.check_model("mlp", lambda: model, torch.randn(3, 6), classes=4, learners=("bp", "fa", "dfa", "drtp"),
                          step_timeout=0.5, log=lambda s: None)
    assert res.learners["bp"] == "ok"
    assert res.learners["fa"] == "refused: fa cannot apply here"
    assert res.learners["dfa"] == "CRASH: KeyError: 'relu_26'" and "KeyError" in res.tracebacks["dfa"]
    assert res.learners["drtp"].startswith("timeout")
    cell = zoo.learners_cell(res)
    assert cell.startswith("1/4 (bp)") and "dfa: CRASH: KeyError" in cell


def test_the_script_exits_0_with_a_message_without_torchvision(monkeypatch, capsys):
    """Run as __main__ (runpy, in this process: a fresh interpreter costs more than the test) with
    ``import torchvision`` failing."""
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setattr(sys, "argv", ["zoo.py"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    assert "torchvision is not installed" in capsys.readouterr().out
