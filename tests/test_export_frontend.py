"""The torch.export front end (issue 12): models torch.fx cannot trace compile with frontend="auto"
through torch.export; error mode equals autograd in float64; every learner steps on exported
programs; lifted parameters and buffers are the model's own (.grad, BatchNorm running statistics,
state_dict); errors name the user's source line; fx and export give the same feedback where fx can
trace the model."""
import copy
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError, OptionError, UntraceableModelError
from fbcompile.frontends import frontend_of
from fbcompile.models import build_model
from fbcompile.runtime import ALGORITHMS
from fbcompile.verify.checks import relative_error

from helpers import compare_with_autograd, grads_of, randomise_vectors

TOL = 1e-8
BATCH, CLASSES = 4, 3


def shift_scale(h, gamma):
    """A helper torch.fx keeps as one opaque call (fx.wrap): no rule matches it under fx."""
    return h * gamma + 0.25 * h


torch.fx.wrap("shift_scale")


class ShapeDtypeBranch(nn.Module):
    """Control flow on a shape and on a dtype (fx: "symbolically traced variables cannot be used as
    inputs to control flow"), with BatchNorm and Dropout."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.drop, self.head = nn.Dropout(0.25), nn.Linear(4 * 3 * 3, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        if h.shape[-1] > 4:
            h = F.avg_pool2d(h, 2)
        if x.dtype == torch.float64:
            h = h * 1.5
        return self.head(self.drop(h.flatten(1)))


class WrappedHelper(nn.Module):
    """An fx-wrapped helper: fx captures it as one call without a rule, export traces through it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, CLASSES)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.fc2(shift_scale(F.gelu(self.fc1(x)), self.gamma))


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor
    features: torch.Tensor


torch.export.register_dataclass(Prediction)


class DataclassOutput(nn.Module):
    """Returns a dataclass and branches on the batch size (fx cannot), with a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, CLASSES)

    def forward(self, x):
        h = self.norm(self.fc1(x)).relu() if x.shape[0] > 1 else self.fc1(x)
        return Prediction(self.fc2(h), h)


class DictOutput(WrappedHelper):
    def forward(self, x):
        h = shift_scale(torch.sigmoid(self.fc1(x)), self.gamma)
        return {"logits": self.fc2(h), "features": h}


MODELS = {"shape_dtype_branch": ShapeDtypeBranch, "wrapped_helper": WrappedHelper,
          "dataclass_output": DataclassOutput, "dict_output": DictOutput}


def _input(name, dtype=torch.float64):
    return torch.randn(BATCH, 2, 6, 6, dtype=dtype) if name == "shape_dtype_branch" else torch.randn(BATCH, 6, dtype=dtype)


def _leaves(out):
    """The model's output tensors in pytree order (what the exported program returns, flattened)."""
    return [v for v in torch.utils._pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]


def _autograd(model, x, errors):
    x = x.clone().requires_grad_(True)
    outs = _leaves(model(x))
    total = sum((o * e).sum() for o, e in zip(outs, errors))
    return torch.autograd.grad(total, [x, *model.parameters()])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_auto_falls_back_to_export_and_error_mode_equals_autograd(name):
    torch.manual_seed(0)
    model = randomise_vectors(MODELS[name]().double()).eval()
    x = _input(name)
    program = fbcompile.compile(model, x, frontend="auto")
    used, note = frontend_of(program.traced)
    assert used == "export" and note.startswith("torch.fx:")
    assert "captured with torch.export (torch.fx:" in program.explain().splitlines()[0]
    errors = [torch.randn_like(o) for o in _leaves(model(x))]
    reference = _autograd(model, x, errors)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, tuple(errors))
    assert relative_error(ours, reference[0]) < TOL
    grads = grads_of(model)
    for (n, _), g in zip(model.named_parameters(), reference[1:]):
        assert relative_error(grads[n], g) < TOL, n
        assert bool(grads[n].abs().sum() > 0), n


def _train_program(name):
    torch.manual_seed(1)
    model = randomise_vectors(MODELS[name]()).train()
    x = _input(name, torch.float32)
    return model, x, fbcompile.compile(model, x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_learner_steps_on_the_exported_program(name):
    model, x, program = _train_program(name)
    assert frontend_of(program.traced)[0] == "export"
    y = torch.tensor([0, 2, 1, 1])
    loss = lambda out, target: F.cross_entropy(out[0] if isinstance(out, tuple) else out, target)
    stepped = []
    for algorithm in sorted(ALGORITHMS):
        try:
            # two returned tensors: Mono-Forward is told which width is the class count
            options = {"classes": CLASSES} if algorithm.startswith("mf") else {}
            learner = fbcompile.learner(program, algorithm, seed=0, **options)
        except FBCompileError as refusal:      # an algorithm that cannot apply says why, at construction
            assert str(refusal)
            continue
        model.zero_grad(set_to_none=True)
        learner.step(x, y, loss)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads), algorithm
        stepped.append(algorithm)
    assert {"bp", "dtp", "dfa", "mf"} <= set(stepped)


def test_batch_norm_statistics_update_in_the_users_buffers_as_the_forward_would():
    torch.manual_seed(2)
    model = randomise_vectors(ShapeDtypeBranch().double()).train()
    model.drop.p = 0.0
    x = _input("shape_dtype_branch")
    before = {n: b.clone() for n, b in model.named_buffers()}
    program = fbcompile.compile(model, x, frontend="export")
    assert all(torch.equal(b, before[n]) for n, b in model.named_buffers())     # capture changes nothing
    twin = copy.deepcopy(model)
    twin(x)
    twin(x)
    buffers = dict(model.named_buffers())
    program.propagate_error(x, torch.randn(BATCH, CLASSES, dtype=torch.float64))
    learner = fbcompile.learner(program, "bp", seed=0)
    learner.step(x, torch.tensor([0, 1, 2, 0]), F.cross_entropy)
    for n, b in twin.named_buffers():
        assert buffers[n] is dict(model.named_buffers())[n]
        assert torch.allclose(buffers[n].double(), b.double(), rtol=1e-12, atol=0), n
    assert int(model.bn.num_batches_tracked) == 2


def test_parameters_are_the_models_own_and_state_dict_round_trips():
    torch.manual_seed(3)
    model = randomise_vectors(WrappedHelper().double())
    x = _input("wrapped_helper")
    program = fbcompile.compile(model, x, frontend="export")
    assert all(program.params[n] is p for n, p in model.named_parameters())
    state = {k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(program.traced(x), model(x))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize("name,shape", [("mlp", (12,)), ("lenet", (1, 28, 28)), ("resnet-small", (3, 8, 8)),
                                        ("mixer", (3, 8, 8))])
def test_both_front_ends_give_the_same_feedback_grads_and_verify_report(name, shape):
    torch.manual_seed(4)
    options = {"mlp": {"width": 16, "depth": 2}, "mixer": {"dim": 8, "hidden": 16, "blocks": 1}}.get(name, {})
    model = randomise_vectors(build_model(name, shape, 5, **options).double()).eval()
    x = torch.randn(2, *shape, dtype=torch.float64)
    error = torch.randn(2, 5, dtype=torch.float64)
    results = {}
    for frontend in ("fx", "export"):
        program = fbcompile.compile(model, x, frontend=frontend)
        assert frontend_of(program.traced)[0] == frontend
        model.zero_grad(set_to_none=True)
        feedback = program.propagate_error(x, error)
        report = fbcompile.verify(program, x, limit=None)
        rows = sorted((r["op"], r["rule"], r["kind"], r["path"]) for r in report.rows if r["level"] == "node")
        results[frontend] = feedback, grads_of(model), rows, report.failures()
    (f_fx, g_fx, r_fx, bad_fx), (f_ex, g_ex, r_ex, bad_ex) = results["fx"], results["export"]
    assert relative_error(f_ex, f_fx) < 1e-12
    assert all(relative_error(g_ex[n], g) < 1e-12 for n, g in g_fx.items())
    assert r_ex == r_fx and not bad_fx and not bad_ex
    input_rel, param_rel = compare_with_autograd(model, x, program=program, output_error=error)
    assert input_rel < TOL and param_rel < TOL


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x):
        if x.sum() > 0:        # a branch on a tensor's value: neither front end can capture it
            return self.fc(x)
        return self.fc(-x)


def test_a_model_neither_front_end_captures_gets_one_error_with_both_reasons():
    with pytest.raises(UntraceableModelError) as caught:
        fbcompile.compile(DataDependent().double(), _input("wrapped_helper"))
    text = str(caught.value)
    assert "neither torch.fx nor torch.export" in text and "- torch.fx:" in text and "- torch.export:" in text


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, CLASSES)

    def forward(self, x):
        if x.shape[0] > 1:
            x = torch.special.bessel_j0(x)      # no rule: the unsupported node names this line
        return self.fc(x)


def test_coverage_and_errors_point_at_the_users_source_line():
    x = _input("wrapped_helper")
    problems = fbcompile.coverage(Unsupported().double(), x, frontend="export")
    assert len(problems) == 1 and "bessel_j0" in problems[0].target
    assert "test_export_frontend.py" in problems[0].line and "torch.special.bessel_j0(x)" in problems[0].line
    with pytest.raises(FBCompileError, match=r"bessel_j0[\s\S]*test_export_frontend.py"):
        fbcompile.compile(Unsupported().double(), x)
    program = fbcompile.compile(WrappedHelper().double(), x, frontend="export")
    assert "test_export_frontend.py" in program.explain() and "shift_scale" in program.explain()


class BufferWriter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, CLASSES)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.fc(x)


def test_in_place_buffer_writes_outside_batch_norm_are_refused_by_name():
    with pytest.raises(FBCompileError, match="writes buffer 'calls' in place"):
        fbcompile.compile(BufferWriter().double(), _input("wrapped_helper"), frontend="export")


def test_unknown_front_end_is_an_option_error():
    with pytest.raises(OptionError, match="'auto', 'export' or 'fx'"):
        fbcompile.compile(WrappedHelper(), torch.randn(2, 6), frontend="dynamo")


def test_transformer_example_runs_through_export_with_every_algorithm(tmp_path):
    script = Path(__file__).resolve().parent.parent / "examples" / "transformer.py"
    env = {**os.environ, "FBCOMPILE_EXAMPLE_QUICK": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "captured with export: torch.fx:" in done.stdout
    error_line = next(line for line in done.stdout.splitlines() if line.startswith("error mode vs autograd"))
    values = [float(v) for v in re.findall(r"\d\.\de[+-]\d+", error_line)]
    assert len(values) == 2 and max(values) < 1e-10, error_line
    for algorithm in ("bp", "dtp", "dfa", "mf"):
        assert f"{algorithm}: test accuracy" in done.stdout


def test_dropout_and_batch_norm_modules_follow_train_and_eval_after_capture():
    torch.manual_seed(6)
    model = randomise_vectors(ShapeDtypeBranch().double()).train()
    x = _input("shape_dtype_branch")
    program = fbcompile.compile(model, x, frontend="export")
    modules = {n.target for n in program.traced.graph.nodes if n.op == "call_module"}
    assert modules == {"bn", "drop"}
    model.eval()
    with torch.no_grad():
        assert torch.equal(program.traced(x), model(x))      # no dropout, running statistics


class Reshaping(WrappedHelper):
    def forward(self, x):
        h = shift_scale(torch.tanh(self.fc1(x.view(x.shape[0], 2, 3).flip(1).reshape(x.shape[0], 6))), self.gamma)
        return self.fc2(h)


def test_a_one_sample_example_still_gives_a_program_for_any_batch():
    torch.manual_seed(7)
    model = randomise_vectors(Reshaping().double())
    program = fbcompile.compile(model, _input("wrapped_helper")[:1], frontend="export")
    x = _input("wrapped_helper")
    with torch.no_grad():
        assert torch.equal(program.traced(x), model(x)) and torch.equal(program.traced(x[:1]), model(x[:1]))
    learner = fbcompile.learner(program, "dfa", seed=0)        # finds the batch axes on another batch size
    model.zero_grad(set_to_none=True)
    learner.step(x, torch.tensor([0, 1, 2, 0]), F.cross_entropy)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())


class TiedHead(nn.Module):
    """An output layer sharing the input layer's weight (GPT-2's lm_head / wte), behind a shape check
    fx cannot trace: torch.export may lift the shared parameter under either name."""
    def __init__(self):
        super().__init__()
        self.embed, self.hidden = nn.Linear(6, 6, bias=False), nn.Linear(6, 6)
        self.head = nn.Linear(6, 6, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        if x.shape[1] != 6:
            raise ValueError("expected 6 features")
        return self.head(torch.tanh(self.hidden(torch.tanh(self.embed(x)))))


def test_a_tied_parameter_gets_the_sum_of_both_uses_on_the_users_parameter():
    torch.manual_seed(0)
    model, x = TiedHead().double(), torch.randn(BATCH, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend="auto")
    assert frontend_of(program.traced)[0] == "export"
    assert sorted(program.params) == sorted(n for n, _ in model.named_parameters())
    error = torch.randn(BATCH, 6, dtype=torch.float64)
    reference = _autograd(model, x, [error])
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, error)
    for (name, p), g in zip(model.named_parameters(), reference[1:]):
        assert relative_error(p.grad, g) < TOL, name
    learner = fbcompile.learner(program, "bp")
    model.zero_grad(set_to_none=True)
    learner.step(x.float().double(), torch.randint(0, 6, (BATCH,)), F.cross_entropy)
    assert model.embed.weight.grad is not None and model.head.weight is model.embed.weight

