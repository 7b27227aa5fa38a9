"""Every learner runs on every model that compiles (issue 11, item 3).

The sweep takes one step of every registered algorithm (and every DTP feedback source) on small
models of the shapes that broke learners before: Dropout anywhere, BatchNorm, branching blocks whose
unit outputs feed several later units, dense blocks, residual blocks, conv output layers, a single
hidden unit or none, two outputs, an output that is also consumed. Each learner must take a finite
step that changes the parameters, or refuse at construction with the FBCompileError listed for it.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.runtime import ALGORITHMS
from fbcompile.runtime.diagnostics import angle
from helpers import assert_a_step_learns, assert_failed_step_changes_nothing, same, step_grads

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 5


# -- models --------------------------------------------------------------------------------------------
def mlp_with_dropout():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 8), nn.Tanh(), nn.Dropout(0.3),
                         nn.Linear(8, CLASSES))


def cnn_with_batchnorm_dropout_and_gap():
    """Conv-BN-ReLU, dropout right after a unit output, GAP, dropout before the classifier."""
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Dropout(0.2), nn.Linear(4, CLASSES))


class Inception(nn.Module):
    """x -> relu -> [conv1x1, conv3x3, maxpool -> conv1x1] -> cat (GoogLeNet's block)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.one, self.three, self.pool_conv = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 3, 1)
        self.fc = nn.Linear(9, CLASSES)

    def forward(self, x):
        h = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.one(h)), F.relu(self.three(h)), F.relu(self.pool_conv(F.max_pool2d(h, 3, 1, 1)))], 1)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class InceptionReduction(nn.Module):
    """Inception v3's InceptionB: the pooling branch has no conv and is computed after the conv
    branches, so it joins the stem's unit, which then also reads the conv branches' outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.wide, self.deep_a, self.deep_b = nn.Conv2d(4, 3, 3, stride=2), nn.Conv2d(4, 3, 1), nn.Conv2d(3, 3, 3, stride=2)
        self.fc = nn.Linear(10, CLASSES)

    def forward(self, x):
        h = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.wide(h)), F.relu(self.deep_b(F.relu(self.deep_a(h)))), F.max_pool2d(h, 3, 2)], 1)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class DenseBlock(nn.Module):
    """Every layer reads the cat of all earlier outputs (DenseNet)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1, self.c2 = nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(6, 3, 1)
        self.fc = nn.Linear(9, CLASSES)

    def forward(self, x):
        a = F.relu(self.c0(x))
        b = F.relu(self.c1(a))
        c = F.relu(self.c2(torch.cat([a, b], 1)))
        return self.fc(torch.cat([a, b, c], 1).mean((2, 3)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        return self.out(torch.relu(self.b(torch.relu(self.a(h))) + h))


class ConvOutputMean(nn.Module):
    """SqueezeNet-style: dropout, then a 1x1 conv as the classifier, then a spatial mean."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop, self.classifier = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), \
            nn.Dropout(0.2), nn.Conv2d(4, CLASSES, 1)

    def forward(self, x):
        return self.classifier(self.drop(F.relu(self.bn(self.conv(x))))).mean((2, 3))


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, CLASSES), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.a(h), self.b(h)


class ReturnedAndConsumed(nn.Module):
    """The first layer's output is a model output and the next layer's input."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, CLASSES), nn.Linear(CLASSES, CLASSES)

    def forward(self, x):
        h = self.first(x)
        return h, self.second(torch.relu(h))


class ShapeRead(nn.Module):
    """The classifier's unit reads a value inside the previous unit only for its size."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        pre = self.b(torch.relu(self.a(x)))
        return self.out(torch.tanh(pre)).reshape(pre.size(0), -1)


class Sequence(nn.Module):
    """Per-token layers on (N, L, F) inputs; ``time_first`` runs the middle layer on (L, N, E)."""

    def __init__(self, time_first=True):
        super().__init__()
        self.time_first = time_first
        self.embed, self.mix, self.out = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h.transpose(0, 1) if self.time_first else h
        g = torch.tanh(self.mix(h))
        g = g.transpose(0, 1) if self.time_first else g
        return self.out(g.mean(1))


class SortRows(nn.Module):
    def forward(self, h):
        return torch.sort(h, 1).values


MODELS = {
    "mlp_dropout": (mlp_with_dropout, (6,)),
    "selu_alpha_dropout_rrelu_sort": (lambda: nn.Sequential(nn.Linear(6, 8), nn.SELU(), nn.AlphaDropout(0.2), nn.Linear(
        8, 8), nn.RReLU(), SortRows(), nn.Linear(8, CLASSES)), (6,)),
    "cnn_bn_dropout_gap": (cnn_with_batchnorm_dropout_and_gap, (3, 6, 6)),
    "inception": (Inception, (3, 6, 6)),
    "inception_reduction": (InceptionReduction, (3, 7, 7)),
    "dense_block": (DenseBlock, (3, 6, 6)),
    "residual": (Residual, (6,)),
    "conv_output_mean": (ConvOutputMean, (3, 6, 6)),
    "conv_output_flatten": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, CLASSES, 1),
                                                  nn.AdaptiveAvgPool2d(1), nn.Flatten()), (3, 6, 6)),
    "one_hidden_unit": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, CLASSES)), (6,)),
    "no_hidden_unit": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(6, CLASSES)), (6,)),
    "two_outputs": (TwoOutputs, (6,)),
    "returned_and_consumed": (ReturnedAndConsumed, (6,)),
    "shape_read": (ShapeRead, (6,)),
    "time_first": (Sequence, (5, 3)),
}

LEARNERS = [("bp", {}), ("fa", {}), ("tp", {}),
            *[("dtp", {"feedback": source}) for source in ("analytic", "random", "lrl", "drl", "ldrl")],
            ("dfa", {}), ("sdfa", {}), ("drtp", {}), ("drtp", {"execution": "stored"}), ("shallow", {}),
            ("ddtp-linear", {}), ("ddtp-rhl", {"feedback_hidden": 32}), ("mf", {}), ("mf-dd", {})]
TWO_OUTPUT_MODELS = ("two_outputs", "returned_and_consumed")
# (model, algorithm) -> what the construction-time refusal must say
REFUSALS = {(model, algorithm): "pass classes=<int>" for model in TWO_OUTPUT_MODELS for algorithm in ("mf", "mf-dd")}
def _cases():
    for model in MODELS:
        for algorithm, options in LEARNERS:
            name = "-".join([model, algorithm, *map(str, options.values())])
            yield pytest.param(model, algorithm, options, id=name)
    for model in TWO_OUTPUT_MODELS:
        for algorithm in ("mf", "mf-dd"):
            yield pytest.param(model, algorithm, {"classes": CLASSES}, id=f"{model}-{algorithm}-classes")


def loss_fn(output, targets):
    """Cross-entropy summed over the outputs (a second output of other width reads targets modulo it)."""
    if isinstance(output, tuple):
        return sum(F.cross_entropy(o, targets % o.shape[1]) for o in output)
    return F.cross_entropy(output, targets)


def _model_and_batch(name, seed=0, dtype=torch.float32):
    make, shape = MODELS[name]
    torch.manual_seed(seed)
    model = make().to(dtype).train()
    return model, torch.randn(6, *shape, dtype=dtype), torch.tensor([0, 1, 2, 3, 4, 1])


@pytest.mark.parametrize("model_name, algorithm, options", _cases())
def test_every_learner_steps_or_refuses_at_construction(model_name, algorithm, options):
    model, x, y = _model_and_batch(model_name)
    program = fbcompile.compile(model, x)
    refusal = REFUSALS.get((model_name, algorithm)) if "classes" not in options else None
    if refusal is not None:
        with pytest.raises(FBCompileError, match=refusal.replace("<", ".").replace(">", ".")):
            fbcompile.learner(program, algorithm, **options)
        return
    assert_a_step_learns(model, fbcompile.learner(program, algorithm, **options), x, y, loss_fn)


# -- Dropout in Mono-Forward ------------------------------------------------------------------------------
def test_mf_heads_read_values_after_dropout_with_the_steps_mask():
    """A unit ending in Dropout: its head scores the dropped-out output (the mask the forward drew)
    and both units learn from their local losses' autograd gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, CLASSES)).double().train()
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, CLASSES, (8,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf", head_optimizer="sgd", head_lr=0.1)
    m = next(iter(learner.heads)).weight.detach().clone().requires_grad_()
    torch.manual_seed(7)
    dropped = F.dropout(torch.relu(model[0](x)), 0.5, training=True)
    total = F.cross_entropy(dropped @ m, y) + F.cross_entropy(model[3](dropped.detach()), y)
    reference = torch.autograd.grad(total, [*model.parameters(), m])
    torch.manual_seed(7)
    grads = step_grads(learner, model, x, y)
    for (name, _), expected in zip(model.named_parameters(), reference):
        assert torch.allclose(grads[name], expected, rtol=1e-10, atol=1e-12), name
    assert torch.allclose(next(iter(learner.heads)).weight, m.detach() - 0.1 * reference[-1], rtol=1e-10)


def test_mf_dd_perturbed_passes_replay_the_clean_passs_dropout_mask():
    """Central differences with a fresh mask per pass would be dominated by the mask change / 2 eps;
    with the mask replayed the estimate points along the local autograd gradient."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3)).double().train()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    program = fbcompile.compile(model, x)
    torch.manual_seed(5)
    exact = fbcompile.learner(program, "mf").compute((x,), y, F.cross_entropy)[1]
    torch.manual_seed(5)
    estimate = fbcompile.learner(program, "mf-dd", directions=1500).compute((x,), y, F.cross_entropy)[1]
    for name, g in exact.items():
        assert angle(estimate[name], g) < 25, name


# -- unit order ---------------------------------------------------------------------------------------------
class TwoBranches(nn.Module):
    """Branch ``a`` starts first, but its unit also holds the join, which reads branch ``b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.out(torch.relu(self.a(x)) + torch.tanh(self.b(x)))


def _branch_grouping(node):
    """Unit "a": branch a and the join; unit "b": branch b; unit "out": the classifier."""
    if node.op == "call_module":
        return node.target
    return "a" if node.name in ("relu", "add") else "b"


@pytest.mark.parametrize("model_name", ["two_branches", "shape_read"])
@pytest.mark.parametrize("algorithm", ["drtp", "shallow", "mf"])
def test_unlocked_learners_run_units_out_of_index_order_and_read_values_inside_other_units(model_name, algorithm):
    """two_branches: unit 0 reads unit 1's output, so the units run as 1, 0, 2; shape_read: the
    classifier's unit reads ``pre``, no unit output, for its size. Update-unlocked DRTP and shallow
    learning equal their stored path; MF's updates match its local losses' autograd gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 6, dtype=torch.float64), torch.randint(0, CLASSES, (6,))
    if model_name == "two_branches":
        model = TwoBranches().double()
        program = fbcompile.compile(model, x, units=_branch_grouping)
        assert [[n.name for n in u.nodes] for u in program.units] == [["a", "relu", "add"], ["b", "tanh"], ["out"]]
    else:
        model = ShapeRead().double()
        program = fbcompile.compile(model, x)
        assert "b" not in [n.name for u in program.units for n in u.outputs]
    if algorithm == "mf":
        learner = fbcompile.learner(program, "mf")
        first, second = (head.weight.detach() for head in list(learner.heads)[:2])
        losses = _local_losses(model, x, y, first, second)
        reference = {name: torch.autograd.grad(losses[name.split(".")[0]], p, retain_graph=True)[0]
                     for name, p in model.named_parameters()}
        grads = step_grads(learner, model, x, y)
        assert all(torch.allclose(grads[name], g, rtol=1e-10, atol=1e-12) for name, g in reference.items())
        return
    unlocked = step_grads(fbcompile.learner(program, algorithm), model, x, y)
    stored = step_grads(fbcompile.learner(program, algorithm, execution="stored"), model, x, y)
    assert unlocked.keys() == stored.keys()
    for name, g in stored.items():
        assert (g is None) == (unlocked[name] is None) and (g is None or torch.allclose(unlocked[name], g)), name


def _local_losses(model, x, y, first, second) -> dict:
    """{layer name: the local MF loss that trains it}, written out by hand for the two models of the
    test above (heads ``first`` and ``second`` of units 0 and 1; the last unit is scored by the output)."""
    if isinstance(model, TwoBranches):
        branch = torch.tanh(model.b(x))
        joined = torch.relu(model.a(x)) + branch.detach()
        return {"a": F.cross_entropy(joined @ first, y), "b": F.cross_entropy(branch @ second, y),
                "out": F.cross_entropy(model.out(joined.detach()), y)}
    hidden = torch.relu(model.a(x))
    squashed = torch.tanh(model.b(hidden.detach()))
    return {"a": F.cross_entropy(hidden @ first, y), "b": F.cross_entropy(squashed @ second, y),
            "out": F.cross_entropy(model.out(squashed.detach()), y)}


def _cyclic_grouping(node):
    """The first and the last layer in one unit, the middle in another: each reads the other's output."""
    return "ends" if node.op == "call_module" and node.target in ("0", "4") else "middle"


@pytest.mark.parametrize("algorithm, hint", [("mf", "units='op'"), ("drtp", "execution='stored'"),
                                             ("mf-dd", "units='op'"), ("shallow", "execution='stored'")])
def test_unit_cycles_are_refused_at_construction_naming_the_units_and_values(algorithm, hint):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    program = fbcompile.compile(model, torch.randn(4, 6), units=_cyclic_grouping)
    with pytest.raises(FBCompileError, match=r"units \[0, 1\] read each other's outputs in a cycle") as caught:
        fbcompile.learner(program, algorithm)
    assert "reads '_0' of unit 0" in str(caught.value) and "reads '_3' of unit 1" in str(caught.value)
    assert hint in str(caught.value)
    if algorithm in ("drtp", "shallow"):
        x, y = torch.randn(4, 6), torch.randint(0, CLASSES, (4,))
        assert step_grads(fbcompile.learner(program, algorithm, execution="stored"), model, x, y)


# -- batch axes ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["dfa", "drtp", "ddtp-linear", "ddtp-rhl", "mf"])
def test_time_first_unit_outputs_learn_exactly_like_their_batch_first_twin(algorithm):
    """A hidden unit whose output is (L, N, E) gets the projection / head of the batch-first (N, L, E)
    twin, sample by sample. Batch and length are both 4, so the batch axis is found by a second run."""
    torch.manual_seed(0)
    twins = [Sequence(time_first=True).double(), Sequence(time_first=False).double()]
    twins[1].load_state_dict(twins[0].state_dict())
    x, y = torch.randn(4, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 4])
    grads = []
    for model in twins:
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **({"feedback_hidden": 16}
                                                                             if algorithm == "ddtp-rhl" else {}))
        grads.append(step_grads(learner, model, x, y))
    assert grads[0].keys() == grads[1].keys() and grads[0]["embed.weight"] is not None
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, rtol=1e-10, atol=1e-12), name


# -- DDTP without hidden units ---------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["ddtp-linear", "ddtp-rhl"])
def test_ddtp_without_hidden_units_trains_the_output_units_like_dfa(algorithm):
    """Nothing to project to: no feedback to train, and the output unit learns from e, as in DFA."""
    model, x, y = _model_and_batch("no_hidden_unit", dtype=torch.float64)
    program = fbcompile.compile(model, x)
    learner = fbcompile.learner(program, algorithm)
    assert learner.parameters() == [] and learner.train_feedback(x) == {}
    ours = step_grads(learner, model, x, y)
    dfa = step_grads(fbcompile.learner(program, "dfa"), model, x, y)
    assert ours.keys() == dfa.keys() and all(torch.equal(ours[n], dfa[n]) for n in dfa)
    state = learner.state_dict()
    resumed = fbcompile.learner(program, algorithm)
    resumed.load_state_dict(state)
    assert same(resumed.state_dict(), learner.state_dict())
    assert_failed_step_changes_nothing(model, learner, torch.full_like(x, float("nan")), y)


def test_mf_heads_walk_back_over_dropout_to_the_pre_pool_activation_and_failed_steps_change_nothing():
    """conv-BN-ReLU-GAP-flatten-dropout: the head reads the ReLU (as without the dropout)."""
    model, x, y = _model_and_batch("cnn_bn_dropout_gap")
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf")
    assert [h.node.name for h in learner.heads] == ["_3", "_6", "_10"]      # dropout, relu, classifier
    assert [h.projection is not None for h in learner.heads] == [True, True, False]
    learner.step(x, y, F.cross_entropy)
    assert_failed_step_changes_nothing(model, learner, torch.full_like(x, float("nan")), y)


def test_the_sweep_covers_every_registered_algorithm():
    assert {algorithm for algorithm, _ in LEARNERS} == set(ALGORITHMS)
