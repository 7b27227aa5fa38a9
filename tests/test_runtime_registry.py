"""The runtime's structure: one registry filled by decorators, no import cycles, executors chosen
once and recorded, rollback decided by what a learner owns, errors inside the hierarchy."""
from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError, OptionError
from fbcompile.runtime import ALGORITHMS, register_algorithm
from fbcompile.runtime.direct import DirectFeedbackAlignment
from fbcompile.runtime.error import ErrorPropagation
from helpers import assert_failed_step_changes_nothing, snapshot, same, tanh_mlp

RUNTIME = Path(fbcompile.runtime.__file__).parent
MODULES = sorted(p.stem for p in RUNTIME.glob("*.py") if p.stem != "__init__")


# -- one registry, no import cycles ---------------------------------------------------------------
def _runtime_imports(module: str) -> set:
    """Runtime modules that ``module`` imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse((RUNTIME / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            found |= {n.split(".")[0] for n in names if n.split(".")[0] in MODULES}
    return found


def test_the_runtime_modules_import_each_other_without_a_cycle():
    graph = {m: _runtime_imports(m) for m in MODULES}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            pytest.fail(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"

    for m in MODULES:
        visit(m, [])


def _import_in_order(order: list, alias: str) -> set:
    """Import the runtime modules in ``order`` as a fresh package (its __init__ not run, so nothing
    is imported for them) and return the algorithms they registered."""
    package = types.ModuleType(alias)
    package.__path__ = [str(RUNTIME)]
    sys.modules[alias] = package
    try:
        for module in order:
            importlib.import_module(f"{alias}.{module}")
        return set(sys.modules[f"{alias}.registry"].ALGORITHMS)
    finally:
        for name in [n for n in sys.modules if n == alias or n.startswith(alias + ".")]:
            del sys.modules[name]


def test_importing_the_runtime_modules_in_any_order_registers_the_same_algorithms():
    """Every rotation of the module list and its reverse: no ImportError, the same registry."""
    orders = [MODULES[i:] + MODULES[:i] for i in range(len(MODULES))] + [MODULES[::-1]]
    for i, order in enumerate(orders):
        assert _import_in_order(order, f"fbcompile._runtime_order_{i}") == set(ALGORITHMS), order


def test_every_algorithm_is_registered_by_a_decorator_in_its_own_module():
    for name, cls in ALGORITHMS.items():
        source = (RUNTIME / f"{cls.__module__.rsplit('.', 1)[1]}.py").read_text()
        assert f"@register_algorithm\nclass {cls.__name__}(" in source, name
    assert "register_algorithm(_cls)" not in (RUNTIME / "__init__.py").read_text()


def test_registering_a_name_twice_raises_unless_replace():
    class One(ErrorPropagation):
        name = "test-registry-twice"

    class Two(ErrorPropagation):
        name = "test-registry-twice"

    try:
        assert register_algorithm(One) is One and register_algorithm(One) is One      # the same class: fine
        with pytest.raises(OptionError, match="already registered"):
            register_algorithm(Two)
        assert register_algorithm(replace=True)(Two) is Two and ALGORITHMS["test-registry-twice"] is Two
        with pytest.raises(OptionError, match="needs a class attribute 'name'"):
            register_algorithm(type("Nameless", (ErrorPropagation,), {"name": "learner"}))
    finally:
        ALGORITHMS.pop("test-registry-twice", None)


# -- executors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,options,executor", [
    ("bp", {}, "feedback-graph"), ("fa", {}, "feedback-graph"), ("tp", {}, "compiled-local"),
    ("dtp", {"feedback": "drl"}, "autograd-local"), ("dfa", {}, "compiled-stored"),
    ("drtp", {}, "compiled-unlocked"), ("ddtp-linear", {}, "stored"), ("mf", {}, "update-unlocked"),
    ("mf-dd", {"directions": 2}, "directional")])
def test_the_executor_is_chosen_once_and_recorded(algorithm, options, executor):
    model, x, y = tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **options)
    assert learner.executor.name == executor
    assert learner.step(x, y, F.cross_entropy).details["executor"] == executor


def test_direct_executors_follow_the_program_not_the_class():
    """Compiled where the units' error maps are exact; the autograd executors otherwise (here
    BatchNorm with frozen statistics chosen for the error modes too); and a subclass (here one that
    overrides nothing) gets the same choice as its parent."""
    x = torch.randn(7, 12, dtype=torch.float64)
    exact = fbcompile.compile(tanh_mlp(depth=2, width=8), x)
    bn_model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5)).double()
    assert fbcompile.learner(fbcompile.compile(bn_model, x), "drtp").executor.name == "compiled-unlocked"
    frozen = fbcompile.compile(bn_model, x, variants={"error": ()})
    assert fbcompile.learner(exact, "drtp", execution="stored").executor.name == "compiled-stored"
    assert fbcompile.learner(frozen, "drtp").executor.name == "update-unlocked"
    assert fbcompile.learner(frozen, "dfa").executor.name == "stored"

    class Renamed(DirectFeedbackAlignment):
        name = "test-renamed-dfa"

    assert Renamed(exact).executor.name == "compiled-stored"


# -- rollback from what the learner owns -----------------------------------------------------------
VARIANTS = {"fa": [{}, {"sign": "brsf"}], "tp": [{}, {"feedback": "lrl"}], "dtp": [{}, {"feedback": "drl"}],
            "drtp": [{}, {"execution": "stored"}], "shallow": [{}, {"execution": "stored"}],
            "ddtp-rhl": [{"feedback_hidden": 16}], "mf-dd": [{"directions": 2}, {"directions": 2, "update": "immediate"}]}
CASES = [(a, o) for a in sorted(ALGORITHMS) for o in VARIANTS.get(a, [{}])]


@pytest.mark.parametrize("algorithm,options", CASES, ids=[f"{a}-{'-'.join(map(str, o.values()))}" for a, o in CASES])
def test_a_failed_step_of_every_algorithm_changes_nothing(algorithm, options):
    """NaN inputs: the step raises NonFiniteError and leaves parameters, .grad, buffers, the
    learner's state_dict and the global RNG bitwise as they were (after a successful step, so
    there is optimizer state and .grad to keep)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 5)).double()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **options)
    learner.step(x, y, F.cross_entropy)
    bad = x.clone()
    bad[0, 0] = float("nan")
    assert_failed_step_changes_nothing(model, learner, bad, y)


class _DrawingDFA(DirectFeedbackAlignment):
    """A subclass that writes state its parent never writes: an owned generator and trainable
    noise scale, drawn and stepped inside compute, then the step fails."""
    name = "test-drawing-dfa"

    def __init__(self, program, **options):
        super().__init__(program, **options)
        self.noise = nn.Module()
        self.noise.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.noise.generator = torch.Generator().manual_seed(5)
        self.optimizer = torch.optim.SGD(self.noise.parameters(), lr=0.1, momentum=0.9)

    def compute(self, inputs, targets, loss_fn):
        torch.randn(3, generator=self.noise.generator, device="cpu")      # CPU generators draw on the CPU
        torch.randn(3, generator=self.generator, device="cpu")
        self.noise.scale.grad = torch.ones(3, dtype=torch.float64)
        self.optimizer.step()
        result, updates = super().compute(inputs, targets, loss_fn)
        if self.steps >= 1:
            raise FBCompileError("fails after writing its state")
        return result, updates


def test_rollback_follows_ownership_not_an_inherited_flag():
    torch.manual_seed(0)
    model, x, y = tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = _DrawingDFA(fbcompile.compile(model, x))
    assert learner.step_writes_state and not fbcompile.learner(learner.program, "dfa").step_writes_state
    learner.step(x, y, F.cross_entropy)
    before = (snapshot(model, learner), learner.noise.scale.detach().clone(), learner.noise.generator.get_state(),
              [{k: v.clone() for k, v in s.items()} for s in learner.optimizer.state.values()])
    with pytest.raises(FBCompileError, match="fails after"):
        learner.step(x, y, F.cross_entropy)
    after = (snapshot(model, learner), learner.noise.scale.detach().clone(), learner.noise.generator.get_state(),
             [{k: v.clone() for k, v in s.items()} for s in learner.optimizer.state.values()])
    assert same(before, after)


def test_what_a_learner_owns_is_found_once_not_per_step():
    """Every step opens a transaction; the search for what the learner owns walks every module, so
    it runs again only when a module, optimizer or generator attribute is another object (not
    when the per-step ``last`` record is replaced)."""
    from fbcompile.runtime import transaction
    model, x, y = tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "dfa")
    calls = []
    original = transaction._find_owned
    transaction._find_owned = lambda learner: calls.append(1) or original(learner)
    try:
        for _ in range(3):
            learner.step(x, y, F.cross_entropy)
        assert len(calls) == 1
        learner.extra_module = nn.Linear(2, 2).double()
        learner.step(x, y, F.cross_entropy)
        assert len(calls) == 2 and any(m is learner.extra_module for m in transaction.owned_state(learner).modules)
    finally:
        transaction._find_owned = original


def test_writing_a_frozen_tensor_in_place_is_an_error_not_a_missed_rollback():
    model, x = tanh_mlp(depth=2, width=8), torch.randn(7, 12, dtype=torch.float64)
    learner = fbcompile.learner(fbcompile.compile(model, x), "dfa")
    with pytest.raises(FBCompileError, match="frozen parameter"):
        with learner.transaction():
            with torch.no_grad():
                learner.projections.weights[0].mul_(2)


# -- errors ---------------------------------------------------------------------------------------
BUILTIN = {"ValueError", "KeyError", "IndexError", "AssertionError", "StopIteration", "RuntimeError",
           "TypeError", "NotImplementedError", "Exception"}


@pytest.mark.parametrize("module", MODULES)
def test_the_runtime_raises_only_fbcompile_errors(module):
    tree = ast.parse((RUNTIME / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            assert getattr(target, "id", None) not in BUILTIN, f"{module}.py:{node.lineno}"
        if isinstance(node, ast.Assert):
            pytest.fail(f"{module}.py:{node.lineno} asserts (an AssertionError outside FBCompileError)")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "next" and len(node.args) < 2:
            pytest.fail(f"{module}.py:{node.lineno} calls next() without a default (StopIteration)")
