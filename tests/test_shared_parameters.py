"""Direct learners on parameters shared across units (a module called twice, tied weights).

Each unit u has a local loss L_u with its input detached: <h_u, delta_u> for a hidden unit (delta_u
the learner's projected signal, held constant), the loss itself for the output unit. A parameter
theta gets sum over the units using it of dL_u/dtheta. The reference below writes every model's
units out by hand (each unit recomputed from detached inputs, a parameter path such as
``out.weight * g`` recomputed inside each unit), forms delta_u from the learner's own signal and
matrices, and sums torch.autograd's local gradients over the units, in float64."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.passes.prune import GradientSubgraph
from fbcompile.passes.unit_share import InseparableShare, own_share
from helpers import cpu_draw, optimizer_steps, randomise_vectors, step_grads

pytestmark = pytest.mark.usefixtures("one_thread")


class CalledTwice(nn.Module):
    """``a`` is called by units 0 and 2."""
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.b(torch.tanh(self.a(x)))))))

    def local(self, x):
        h0 = torch.tanh(self.a(x))
        h1 = torch.tanh(self.b(h0.detach()))
        h2 = torch.tanh(self.a(h1.detach()))
        return [h0, h1, h2], self.out(h2.detach())


class TiedWeights(nn.Module):
    """``b.weight`` is ``a.weight`` (units 0 and 1); the biases are separate."""
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))

    def local(self, x):
        h0 = torch.tanh(self.a(x))
        h1 = torch.tanh(self.b(h0.detach()))
        return [h0, h1], self.out(h1.detach())


class TiedWithOutput(nn.Module):
    """A hidden unit and the output unit read one parameter path w = out.weight * g (w^T and w):
    the compiled graph sums both units' errors into w before mapping them to out.weight and g."""
    def __init__(self):
        super().__init__()
        self.a, self.out = nn.Linear(6, 3), nn.Linear(6, 3)
        self.g = nn.Parameter(torch.randn(3, 1))

    def forward(self, x):
        w = self.out.weight * self.g
        h = torch.tanh(F.linear(torch.tanh(self.a(x)), w.t()))
        return F.linear(h, w, self.out.bias)

    def local(self, x):
        h0 = torch.tanh(self.a(x))
        h1 = torch.tanh(F.linear(h0.detach(), (self.out.weight * self.g).t()))
        return [h0, h1], F.linear(h1.detach(), self.out.weight * self.g, self.out.bias)


class Chunked(nn.Module):
    """Units 0 and 2 read the two halves of one parameter: the compiled graph maps both units'
    errors through one vjp of chunk, which has no per-unit share (the autograd executor runs)."""
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(12, 6) * 0.4)
        self.b, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        first, second = self.w.chunk(2)
        h = torch.tanh(self.b(torch.tanh(F.linear(x, first))))
        return self.out(torch.tanh(F.linear(h, second)))

    def local(self, x):
        h0 = torch.tanh(F.linear(x, self.w.chunk(2)[0]))
        h1 = torch.tanh(self.b(h0.detach()))
        h2 = torch.tanh(F.linear(h1.detach(), self.w.chunk(2)[1]))
        return [h0, h1, h2], self.out(h2.detach())


MODELS = {"called twice": (CalledTwice, {"a.weight": (0, 2), "a.bias": (0, 2)}),
          "tied weights": (TiedWeights, {"a.weight": (0, 1)}),
          "tied with the output": (TiedWithOutput, {"out.weight": (1, 2), "g": (1, 2)})}

# (algorithm, options, compiled): every executor each algorithm has
MODES = [("dfa", {}, True), ("dfa", {}, False), ("sdfa", {}, True), ("sdfa", {}, False),
         ("drtp", {"execution": "stored"}, True), ("drtp", {"execution": "stored"}, False),
         ("drtp", {"execution": "unlocked"}, True), ("drtp", {"execution": "unlocked"}, False),
         ("shallow", {"execution": "stored"}, True), ("shallow", {"execution": "stored"}, False),
         ("shallow", {"execution": "unlocked"}, True), ("shallow", {"execution": "unlocked"}, False),
         ("ddtp-linear", {}, False), ("ddtp-rhl", {}, False)]
EXECUTOR = {(True, "stored"): "compiled-stored", (False, "stored"): "stored",
            (True, "unlocked"): "compiled-unlocked", (False, "unlocked"): "update-unlocked"}


def _data(seed=0):
    generator = torch.Generator().manual_seed(seed)        # a CPU generator: drawn on the CPU, then moved
    return (cpu_draw(torch.randn, 7, 6, dtype=torch.float64, generator=generator),
            cpu_draw(torch.randint, 0, 3, (7,), generator=generator))


def _hidden_delta(learner, projection, error, output, y):
    """delta_u as the learner forms it (runtime/direct.py, direct_ddtp.py), from its own matrices."""
    n, algorithm = len(y), learner.name
    if algorithm == "ddtp-rhl":
        maps, beta = learner.feedback_maps, learner.options["beta"]
        q, b = maps.Q[projection.index], maps.b[projection.index]

        def g(v):
            return torch.tanh(torch.tanh(v @ maps.R) @ q.reshape(q.shape[0], -1) + b)
        return (g(output) - g(output - beta * error)) / beta
    signal = {"dfa": error, "ddtp-linear": error, "sdfa": torch.sign(error) / n,
              "drtp": -F.one_hot(y, 3).double() / n}[algorithm]
    return signal @ learner.projections.weights[projection.index]


def reference(model, learner, x, y) -> dict:
    """sum over units of dL_u/dtheta, each unit's term by its own autograd call."""
    params = dict(model.named_parameters())
    hidden, output = model.local(x)
    loss = F.cross_entropy(output, y)
    error = torch.autograd.grad(loss, output, retain_graph=True)[0]
    plan = learner.plan
    assert [p.unit for p in plan.projections] == list(plan.hidden_units) == list(range(len(hidden)))
    terms = [loss]
    if learner.hidden_learn:
        with torch.no_grad():
            deltas = [_hidden_delta(learner, p, error, output.detach(), y) for p in plan.projections]
        terms += [(h * delta).sum() for h, delta in zip(hidden, deltas)]
    total = {}
    for term in terms:
        grads = torch.autograd.grad(term, list(params.values()), allow_unused=True, retain_graph=True)
        for name, grad in zip(params, grads):
            if grad is not None:
                total[name] = grad if name not in total else total[name] + grad
    return total


def _relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _learner_grads(model, program, algorithm, options, compiled, x, y):
    learner = fbcompile.learner(program, algorithm, seed=5, **options)
    if not compiled:
        learner.compiled = False
    model.zero_grad(set_to_none=True)
    result = learner.step(x, y, F.cross_entropy)
    return learner, result, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("algorithm,options,compiled", MODES,
                         ids=[f"{a}-{o.get('execution', 'stored')}-{'compiled' if c else 'autograd'}"
                              for a, o, c in MODES])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_a_shared_parameter_gets_the_sum_of_its_units_local_gradients(model_name, algorithm, options, compiled):
    cls, shared = MODELS[model_name]
    torch.manual_seed(1)
    model = randomise_vectors(cls().double())
    x, y = _data()
    program = fbcompile.compile(model, x)
    learner, result, grads = _learner_grads(model, program, algorithm, options, compiled, x, y)
    assert learner.plan.shared == shared
    assert result.details["executor"] == EXECUTOR[compiled, options.get("execution", "stored")]
    expected = reference(model, learner, x, y)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert _relative(grads[name], grad) < 1e-10, (name, _relative(grads[name], grad))


def test_each_unit_contributes_to_a_shared_parameter():
    """Guards the reference: dropping either unit's term changes a.weight's update visibly."""
    model = randomise_vectors(CalledTwice().double())
    x, y = _data(3)
    learner, _, grads = _learner_grads(model, fbcompile.compile(model, x), "dfa", {}, True, x, y)
    hidden, output = model.local(x)
    error = torch.autograd.grad(F.cross_entropy(output, y), output)[0]
    for unit in (0, 2):
        delta = error @ learner.projections.weights[unit]
        term = torch.autograd.grad((hidden[unit] * delta).sum(), model.a.weight, retain_graph=True)[0]
        assert _relative(grads["a.weight"] - term, grads["a.weight"]) > 1e-3
        assert _relative(grads["a.weight"], term) > 1e-3


@pytest.mark.parametrize("algorithm", ["dfa", "drtp"])
def test_a_share_the_compiled_graph_cannot_separate_runs_on_autograd_and_says_why(algorithm):
    model = randomise_vectors(Chunked().double())
    x, y = _data(1)
    program = fbcompile.compile(model, x)
    options = {"execution": "stored"} if algorithm == "drtp" else {}
    learner, result, grads = _learner_grads(model, program, algorithm, options, True, x, y)
    assert result.details["executor"] == "stored" and not learner.compiled
    expected = reference(model, learner, x, y)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert _relative(grads[name], grad) < 1e-10, name
    with pytest.raises(FBCompileError, match=r"no compiled executor.*unit 0 .*shares parameters.*chunk"):
        learner.compiled = True


@pytest.mark.parametrize("compiled", [True, False])
def test_update_unlocked_hands_a_shared_update_to_communication_only_when_complete(compiled):
    """Data parallel, a launched update is all-reduced at once: a shared parameter is launched only
    after the last unit using it, never before the output unit's term (TiedWithOutput)."""
    for cls in (CalledTwice, TiedWithOutput):
        model = randomise_vectors(cls().double())
        x, y = _data(2)
        learner = fbcompile.learner(fbcompile.compile(model, x), "drtp", seed=5)
        learner.compiled = compiled
        launched = []
        learner.launch_update = lambda names, updates: launched.extend((n, updates[n]) for n in names if n in updates)
        _, updates = learner.compute((x,), y, F.cross_entropy)
        assert launched
        for name, value in launched:
            assert updates[name] is value, name           # nothing was added after its launch
        assert {n for n, _ in launched}.isdisjoint(learner.plan.params[learner.plan.output_units[0]])
        assert "a.weight" in {n for n, _ in launched} or cls is TiedWithOutput


def _linear_graph(combine_last):
    """A graph linear in two cut inputs (deltas of units "u" and "v") given a tap T: returns
    (u T - v T, v T - u T, (u + v) T, combine_last(u T, v T))."""
    graph = fx.Graph()
    u, v, tap = graph.placeholder("u"), graph.placeholder("v"), graph.placeholder("tap")
    a, b = graph.call_function(torch.matmul, (u, tap)), graph.call_function(torch.matmul, (v, tap))
    total = graph.call_function(operator.add, (u, v))
    graph.output((graph.call_function(operator.sub, (a, b)), graph.call_function(operator.sub, (b, a)),
                  graph.call_function(torch.matmul, (total, tap)), combine_last(graph, a, b)))
    inputs = (("cut", "u"), ("cut", "v"), ("tap", ("t", None)))
    return GradientSubgraph(fx.GraphModule(nn.Module(), graph), inputs, ("p", "q", "r", "s"))


def test_own_share_is_the_graph_with_the_other_units_deltas_set_to_zero():
    """By linearity, unit u's share is g(delta_u, 0); the shares of u and v add up to g(delta_u, delta_v)."""
    subgraph = _linear_graph(lambda graph, a, b: graph.call_function(operator.add, (b, a)))
    u, v, tap = (torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64),
                 torch.randn(3, 5, dtype=torch.float64))
    whole = subgraph.module(u, v, tap)
    shares = {}
    for own, delta in (("u", u), ("v", v)):
        share = own_share(subgraph, {own})
        assert share.inputs == (("cut", own), ("tap", ("t", None)))
        shares[own] = share.module(delta, tap)
        expected = subgraph.module(u if own == "u" else torch.zeros_like(u), v if own == "v" else torch.zeros_like(v),
                                   tap)
        for got, want in zip(shares[own], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    for a, b, w in zip(shares["u"], shares["v"], whole, strict=True):
        torch.testing.assert_close(a + b, w, rtol=1e-14, atol=1e-15)
    assert own_share(subgraph, {"u", "v"}) is subgraph


def test_own_share_refuses_an_op_that_would_need_the_other_units_zero_tensor():
    subgraph = _linear_graph(lambda graph, a, b: graph.call_function(torch.cat, ([a, b],)))
    with pytest.raises(InseparableShare, match=r"cat.*combines the deltas of several units"):
        own_share(subgraph, {"u"})


@pytest.mark.parametrize("algorithm", ["dfa", "sdfa", "drtp", "shallow", "ddtp-linear", "ddtp-rhl"])
def test_a_parameter_shared_by_two_units_is_listed_under_both_and_trains(algorithm):
    """The plan lists the shared parameter under both units, and every direct learner steps."""
    model, x, y = CalledTwice().double(), torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm)
    assert learner.plan.shared == {"a.weight": (0, 2), "a.bias": (0, 2)}
    grads = step_grads(learner, model, x, y)
    assert (grads["a.weight"] is None) == (algorithm == "shallow")
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_mono_forward_heads_train_a_module_called_twice():
    model, x = CalledTwice(), torch.randn(5, 6)
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf")
    assert torch.isfinite(step_grads(learner, model, x, torch.randint(0, 3, (5,)))["a.weight"]).all()


@pytest.mark.parametrize("algorithm,compiled", [("drtp", True), ("drtp", False), ("mf", None)])
@pytest.mark.parametrize("cls", [CalledTwice, TiedWeights, TiedWithOutput, Chunked])
def test_in_step_updates_apply_a_shared_parameter_once_it_is_complete(cls, algorithm, compiled):
    """In-step updates (step(optimizer=)) on shared parameters: two Adam steps equal the default step
    followed by optimizer.step(), so a shared parameter is applied once, with every unit's term."""
    x, y = _data(3)
    runs = []
    for in_step in (False, True):
        torch.manual_seed(0)
        model = randomise_vectors(cls().double())
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=5)
        if compiled is False:
            learner.compiled = False
        optimizer_steps(learner, torch.optim.Adam(model.parameters(), lr=0.05), [(x, y)] * 2, in_step)
        runs.append(dict(model.named_parameters()))
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name
