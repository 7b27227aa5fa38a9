"""Execution paths of the direct learners: the compiled paths (no autograd) give autograd's updates,
update-unlocked execution gives the stored path's, and its working memory does not grow with depth.

Memory is measured as in examples/bench_direct.py (:func:`fbcompile.bench.memory_ledger`): the peak
of the running sum of the profiler's self memory events during one step, minus what the step leaves
allocated (the new ``.grad`` tensors, which grow with depth in every algorithm). What is left is the
step's working memory: a few activations when each unit's are freed after its update, all of them
when the step keeps one forward's activations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.bench import memory_ledger
from fbcompile.models import build_model
from helpers import step_grads, tanh_mlp


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.out = nn.Linear(12, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = torch.tanh(self.b(h)) + h
        return self.out(torch.tanh(self.c(g)) + h)


class _Attention(nn.Module):
    """A unit whose error maps read feedback weights inside it (the attention's projections): the
    fused graphs bind those to the forward weights."""
    def __init__(self):
        super().__init__()
        self.embed, self.norm = nn.Linear(6, 8), nn.LayerNorm(8)
        self.attention, self.out = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        n = self.norm(h)
        return self.out((self.attention(n, n, n, need_weights=False)[0] + h).mean(1))


@pytest.mark.parametrize("model_name,shape", [("mlp", (20,)), ("lenet", (1, 8, 8))])
@pytest.mark.parametrize("algorithm", ["drtp", "shallow"])
def test_update_unlocked_execution_equals_stored_activations(model_name, shape, algorithm):
    model = build_model(model_name, shape, 10, **({"width": 24, "depth": 3} if model_name == "mlp" else {})).double()
    x, y = torch.randn(9, *shape, dtype=torch.float64), torch.randint(0, 10, (9,))
    program = fbcompile.compile(model, x)
    unlocked = step_grads(fbcompile.learner(program, algorithm, seed=2), model, x, y)
    stored = step_grads(fbcompile.learner(program, algorithm, seed=2, execution="stored"), model, x, y)
    for name in unlocked:
        if unlocked[name] is None:
            assert stored[name] is None and algorithm == "shallow", name
        else:
            torch.testing.assert_close(unlocked[name], stored[name], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("algorithm,options", [("dfa", {}), ("sdfa", {}), ("drtp", {"execution": "stored"}),
                                               ("shallow", {"execution": "stored"}), ("drtp", {"execution": "unlocked"}),
                                               ("shallow", {"execution": "unlocked"})])
@pytest.mark.parametrize("model_name", ["mlp", "cnn", "mlp with a frozen bias", "residual", "attention"])
def test_compiled_paths_equal_autograd(algorithm, options, model_name):
    """Without autograd (one generated graph for every update after the forward; update-unlocked,
    one generated module running the forwards, each hidden unit's update right after its own) the
    updates are autograd's, and frozen parameters get none. "residual": a unit output read by two
    later units, so the module must keep it past the next unit."""
    torch.manual_seed(0)
    if model_name == "residual":
        model, x = _Residual().double(), torch.randn(6, 12, dtype=torch.float64)
    elif model_name == "attention":
        model, x = _Attention().double(), torch.randn(6, 4, 6, dtype=torch.float64)
    elif model_name.startswith("mlp"):
        model, x = tanh_mlp(), torch.randn(6, 12, dtype=torch.float64)
        if "frozen" in model_name:
            model[2].bias.requires_grad_(False)
    else:
        model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(4 * 16, 8), nn.Tanh(), nn.Linear(8, 5)).double()
        x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    updates = []
    for compiled in (True, False):
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=3, **options)
        if compiled:
            assert learner.compiled
        else:
            learner.compiled = False
        model.zero_grad(set_to_none=True)
        learner.step(x, y, F.cross_entropy)
        updates.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert updates[0].keys() == updates[1].keys() and updates[0]
    assert "frozen" not in model_name or "2.bias" not in updates[0]
    for name in updates[1]:
        assert torch.allclose(updates[0][name], updates[1][name], rtol=1e-10, atol=1e-12), name


def _working_memory(algorithm: str, depth: int, **options) -> int:
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, width=128, depth=depth, act="tanh")
    x, y = torch.randn(1024, 64), torch.randint(0, 10, (1024,))
    learner = fbcompile.learner(fbcompile.compile(model, x[:2]), algorithm, **options)
    learner.step(x, y, F.cross_entropy)            # warm-up: the generated update graphs
    model.zero_grad(set_to_none=True)
    peak, net = memory_ledger(lambda: learner.step(x, y, F.cross_entropy))
    return peak - net


@pytest.mark.parametrize("algorithm", ["drtp", "shallow"])
@pytest.mark.cpu_only("working memory from the profiler's CPU ledger")
def test_update_unlocked_working_memory_does_not_grow_with_depth(algorithm):
    unlocked = {depth: _working_memory(algorithm, depth) for depth in (2, 8)}
    stored = {depth: _working_memory(algorithm, depth, execution="stored") for depth in (2, 8)}
    activation = 1024 * 128 * 4
    assert unlocked[8] <= unlocked[2] + activation // 2, (unlocked, stored)
    assert stored[8] >= stored[2] + 4 * activation, (unlocked, stored)     # the measure sees growth


class _ChunkedParameter(nn.Module):
    """Two units whose weights are the halves of one parameter (a tuple select of ``chunk``)."""

    def __init__(self):
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(8, 6)), nn.Linear(4, 3)

    def forward(self, x):
        w1, w2 = self.w.chunk(2)
        h = torch.tanh(x @ w1.t())
        return self.head(torch.tanh(h @ w2[:, :4].t()))


def test_unit_forwards_recompute_a_parameter_path_through_a_tuple_select():
    """Each unit's own forward recomputes ``self.w.chunk(2)[i]`` (update-unlocked drtp and mf's
    per-unit forwards raised KeyError: getitem)."""
    model, x, y = _ChunkedParameter().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    program = fbcompile.compile(model, x)
    unlocked = step_grads(fbcompile.learner(program, "drtp", seed=2), model, x, y)
    stored = step_grads(fbcompile.learner(program, "drtp", seed=2, execution="stored"), model, x, y)
    assert unlocked["w"] is not None and unlocked["w"].abs().sum() > 0
    for name in unlocked:
        torch.testing.assert_close(unlocked[name], stored[name], rtol=1e-13, atol=1e-15)
    mono = step_grads(fbcompile.learner(program, "mf", seed=2), model, x, y)
    assert mono["w"] is not None and bool(torch.isfinite(mono["w"]).all()) and mono["w"].abs().sum() > 0
