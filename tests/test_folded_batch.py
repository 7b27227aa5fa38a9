"""Models that fold the batch into dim 0 with tokens or windows (GPT-2's Conv1D ``view(-1, C)`` /
addmm / ``view(N, T, C)``; a Swin-style window partition): the direct learners and Mono-Forward
train them, with the projection and the head reading each sample's k rows, batch-major or
batch-minor (time-major: nn.MultiheadAttention's projections); a fold in any other order is
refused, naming the node."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.passes.batch_layout import Fold, gather_samples, place_batch_axis
from helpers import step_grads


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = x W + b over the last axis, computed on the (N*T, C) fold of x."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.nf = n_out
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        size = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


class TokenFold(nn.Module):
    """(N, T=4, F=6) -> tanh Conv1D (H=8) -> tanh Conv1D (F) -> Linear(T*F, 5). The first unit's
    output is the (N*T, H) fold that the second Conv1D multiplies."""

    def __init__(self, tokens=4, features=6, hidden=8, classes=5):
        super().__init__()
        self.fc, self.proj = Conv1D(features, hidden), Conv1D(hidden, features)
        self.head = nn.Linear(tokens * features, classes)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(torch.tanh(self.proj(h)).flatten(1))


class WindowFold(nn.Module):
    """(N, 4, 4, 3) -> tanh Linear (D=8) -> 2x2 windows (N*4, 4, D) -> tanh Linear -> windows back ->
    Linear(4*4*D, 5): the first unit's output is the window partition, k = 4 windows per sample."""

    def __init__(self, size=4, window=2, channels=3, dim=8, classes=5):
        super().__init__()
        self.size, self.window, self.dim = size, window, dim
        self.embed, self.mix = nn.Linear(channels, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(size * size * dim, classes)

    def forward(self, x):
        s, w, d = self.size // self.window, self.window, self.dim
        h = torch.tanh(self.embed(x))
        windows = h.view(-1, s, w, s, w, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, d)
        mixed = torch.tanh(self.mix(windows))
        return self.head(mixed.view(-1, s, s, w, w, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s * w * w * d))


class InterleavedFold(nn.Module):
    """Folds (N, T, H) time-major, ``transpose(0, 1).reshape(-1, H)``: sample i's rows are t*N + i, so
    its (T*N, H) value grows as T*batch but is not batch-major."""

    def __init__(self, tokens=4, features=6, hidden=8, classes=5):
        super().__init__()
        self.tokens = tokens
        self.fc, self.proj = nn.Linear(features, hidden), Conv1D(hidden, features)
        self.head = nn.Linear(tokens * features, classes)

    def forward(self, x):
        h = torch.tanh(self.fc(x)).transpose(0, 1).reshape(-1, self.fc.out_features)   # (T*N, H), time-major
        out = torch.addmm(self.proj.bias, h, self.proj.weight)
        return self.head(torch.tanh(out).view(self.tokens, -1, out.shape[-1]).transpose(0, 1).flatten(1))


def _model(name):
    torch.manual_seed(0)
    if name == "tokens":
        return TokenFold().double(), torch.randn(3, 4, 6, dtype=torch.float64)
    return WindowFold().double(), torch.randn(3, 4, 4, 3, dtype=torch.float64)


def test_place_and_gather_are_inverse_and_batch_major():
    per_sample = torch.arange(2 * 3 * 4.).reshape(2, 3, 4)            # (N=2, k=3, rest=4)
    folded = place_batch_axis(per_sample, (0, 3))
    assert tuple(folded.shape) == (6, 4)
    assert torch.equal(folded[3:6], per_sample[1])                      # sample 1 = rows [3, 6)
    assert torch.equal(gather_samples(folded, (0, 3)), per_sample)
    inner = place_batch_axis(per_sample, (1, 4))                        # S = (3, k=4) folded at axis 1
    assert tuple(inner.shape) == (3, 8)
    assert torch.equal(inner[:, 4:8], per_sample[1])
    assert torch.equal(gather_samples(inner, (1, 4)), per_sample)
    minor = place_batch_axis(per_sample, Fold(0, 3, outer=3))       # row j*N + i holds sample i's row j
    assert torch.equal(minor[1::2], per_sample[1])
    assert torch.equal(gather_samples(minor, Fold(0, 3, outer=3)), per_sample)
    per_sample = torch.arange(2 * 6 * 4.).reshape(2, 6, 4)            # k = 6 as (outer 3, N, inner 2)
    grid = place_batch_axis(per_sample, Fold(0, 6, outer=3))
    assert torch.equal(grid[[2, 3, 6, 7, 10, 11]], per_sample[1])       # rows o*N*2 + 1*2 + r
    assert torch.equal(gather_samples(grid, Fold(0, 6, outer=3)), per_sample)


@pytest.mark.parametrize("name,node,shape", [("tokens", "view_2", (4, 8)), ("windows", "reshape", (4, 4, 8))])
def test_folded_unit_output_gets_a_per_sample_projection(name, node, shape):
    model, x = _model(name)
    learner = fbcompile.learner(fbcompile.compile(model, x), "dfa", seed=1)
    first = learner.plan.projections[0]
    assert (first.node, first.shape, first.batch_axis) == (node, shape, Fold(0, shape[0]))
    assert tuple(learner.projections.weights[0].shape) == (5, *shape)


def test_a_mono_forward_head_reads_each_samples_rows_of_a_fold():
    model, x = _model("tokens")
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf", seed=1)
    head = next(iter(learner.heads))
    assert (head.node.name, head.shape, head.batch_axis) == ("view_2", (4, 8), Fold(0, 4))
    value = torch.tanh(model.fc(x)).view(-1, 8)                                      # (N*T, H), T = 4
    z = head.features(value)
    assert tuple(z.shape) == (3, 32)
    for i in range(3):
        assert torch.equal(z[i], value[4 * i:4 * (i + 1)].flatten())                 # sample i = rows [4i, 4i+4)


@pytest.mark.parametrize("name", ["tokens", "windows"])
@pytest.mark.parametrize("algorithm", ["dfa", "drtp", "shallow", "mf", "mf-dd"])
def test_learners_step_and_change_parameters(name, algorithm):
    model, x = _model(name)
    y = torch.tensor([0, 3, 4])
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = step_grads(learner, model, x, y)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trained = set(before) if algorithm != "shallow" else {"head.weight", "head.bias"}   # shallow: output unit only
    assert changed == trained
    assert all(bool(torch.isfinite(grads[n]).all()) for n in trained)


@pytest.mark.parametrize("algorithm,options", [("dfa", {}), ("drtp", {"execution": "unlocked"}),
                                               ("drtp", {"execution": "stored"})])
@pytest.mark.parametrize("name", ["tokens", "windows"])
def test_first_hidden_update_is_the_reshaped_projected_signal_pulled_back(name, algorithm, options):
    model, x = _model(name)
    y = torch.tensor([1, 0, 4])
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=3, **options)
    grads = step_grads(learner, model, x, y)
    first, B = learner.plan.projections[0], learner.projections.weights[0]          # B: (C, k, *rest)
    with torch.no_grad():
        error = (torch.softmax(model(x), 1) - F.one_hot(y, 5)) / len(x)               # dL/dlogits, (N, C)
        signal = error if algorithm == "dfa" else -F.one_hot(y, 5).double() / len(x)   # DRTP: -y* (mean scaling)
        delta = (signal @ B.reshape(5, -1)).reshape(len(x) * first.shape[0], *first.shape[1:])   # (N*k, *rest)
    if name == "tokens":
        params = [model.fc.weight, model.fc.bias]
        value = torch.tanh(model.fc(x)).view(-1, 8)                                  # the unit's (N*T, H) output
    else:
        params = [model.embed.weight, model.embed.bias]
        h = torch.tanh(model.embed(x))
        value = h.view(-1, 2, 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, 8)
    expected = torch.autograd.grad((value * delta).sum(), params, retain_graph=True)
    names = ["fc.weight", "fc.bias"] if name == "tokens" else ["embed.weight", "embed.bias"]
    for n, g in zip(names, expected):
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-14)
    # the check tells the orders apart: the delta's rows read time-major give another update
    wrong = delta.reshape(len(x), first.shape[0], -1).transpose(0, 1).reshape(delta.shape)
    assert not torch.allclose(torch.autograd.grad((value * wrong).sum(), params[:1])[0], expected[0])


@pytest.mark.parametrize("algorithm", ["dfa", "drtp"])
def test_a_time_major_fold_is_found_and_its_update_is_the_projection_pulled_back(algorithm):
    """``transpose(0, 1).reshape(-1, H)``: sample i's rows are t*N + i (batch-minor)."""
    torch.manual_seed(0)
    model, x, y = InterleavedFold().double(), torch.randn(3, 4, 6, dtype=torch.float64), torch.tensor([1, 0, 4])
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=3)
    first, B = learner.plan.projections[0], learner.projections.weights[0]          # B: (C, k, H)
    assert (first.node, first.shape, first.batch_axis) == ("reshape", (4, 8), Fold(0, 4, outer=4))
    grads = step_grads(learner, model, x, y)
    with torch.no_grad():
        error = (torch.softmax(model(x), 1) - F.one_hot(y, 5)) / len(x)
        signal = error if algorithm == "dfa" else -F.one_hot(y, 5).double() / len(x)
        per_sample = (signal @ B.reshape(5, -1)).reshape(len(x), 4, 8)               # (N, T, H)
        delta = per_sample.transpose(0, 1).reshape(-1, 8)                            # row t*N + i: sample i
    value = torch.tanh(model.fc(x)).transpose(0, 1).reshape(-1, 8)
    expected = torch.autograd.grad((value * delta).sum(), [model.fc.weight, model.fc.bias])
    for n, g in zip(["fc.weight", "fc.bias"], expected):
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-14)


class ReversedFold(InterleavedFold):
    """The (N*T, H) rows reversed: sample i's rows are neither [i*T, (i+1)*T) nor t*N + i."""

    def forward(self, x):
        h = torch.tanh(self.fc(x)).reshape(-1, self.fc.out_features).flip(0)
        out = torch.addmm(self.proj.bias, h, self.proj.weight)
        return self.head(torch.tanh(out).view(-1, self.tokens * out.shape[-1]))


@pytest.mark.parametrize("algorithm", ["dfa", "mf"])
def test_a_fold_in_another_order_is_refused_naming_the_node(algorithm):
    torch.manual_seed(0)
    model, x = ReversedFold().double(), torch.randn(3, 4, 6, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    refusal = r"'flip', whose axis 0 grows as 4\*batch, but its rows follow no \(outer, batch, inner\) fold"
    with pytest.raises(FBCompileError, match=refusal):
        fbcompile.learner(program, algorithm)


def test_direct_learners_train_torchs_transformer_encoder_layer():
    """nn.MultiheadAttention (batch_first=True) projects time-major (L*N, E) rows."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), nn.Flatten(),
                          nn.Linear(5 * 8, 3)).double()
    x, y = torch.randn(4, 5, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 1])
    program = fbcompile.compile(model, x)
    for algorithm in ("dfa", "drtp", "mf"):
        learner = fbcompile.learner(program, algorithm, seed=0)
        layouts = [p.batch_axis for p in learner.plan.projections] if algorithm != "mf" else \
            [head.batch_axis for head in learner.heads]
        assert any(isinstance(a, Fold) and a.outer == a.k for a in layouts), (algorithm, layouts)
        grads = step_grads(learner, model, x, y)
        assert grads["0.self_attn.in_proj_weight"] is not None
        assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)


def test_the_fold_check_passes_train_mode_batchnorm_and_dropout_and_leaves_state_alone():
    """Train-mode BatchNorm couples the samples through its batch statistics and dropout draws new
    masks: the check must see neither as a misplaced fold, and must not touch the model's state."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.2), TokenFold()).double().train()
    x, y = torch.randn(3, 4, 6, dtype=torch.float64), torch.tensor([0, 1, 2])
    program = fbcompile.compile(model, x)
    state = {n: v.clone() for n, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    learner = fbcompile.learner(program, "dfa")
    assert any(isinstance(p.batch_axis, tuple) for p in learner.plan.projections)     # the check ran
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(v, state[n]) for n, v in model.state_dict().items())
    assert all(p.dtype == torch.float64 and p.grad is None for p in model.parameters())
    grads = step_grads(learner, model, x, y)
    assert grads["2.fc.weight"] is not None and float(grads["2.fc.weight"].abs().sum()) > 0


class FunctionalBatchNorm(nn.BatchNorm1d):
    """timm's BatchNormAct2d pattern: the mode is read in forward, so tracing records a functional
    ``F.batch_norm(..., training=True)`` whose batch statistics no module ``.eval()`` can switch off."""

    def forward(self, x):
        batch_statistics = self.training or self.running_mean is None
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, batch_statistics, 0.1,
                            self.eps)


class NormedWindows(WindowFold):
    """A batch norm over the channels (``norm``: the module, or the functional pattern) before the
    window partition of :class:`WindowFold`."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return super().forward(self.norm(x.flatten(1, 2).transpose(1, 2)).transpose(1, 2).unflatten(1, (4, 4)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("running", [True, False])
@pytest.mark.parametrize("algorithm", ["dfa", "mf"])
def test_a_functional_train_mode_batchnorm_before_a_fold_gives_the_modules_updates(frontend, running, algorithm):
    """The fold check holds the functional call's statistics fixed, as it puts a BatchNorm module in
    eval mode: the functional pattern finds the same fold, and its learner the module's updates; the
    model's state is left as it was."""
    models = []
    for norm in (nn.BatchNorm1d(3, track_running_stats=running), FunctionalBatchNorm(3, track_running_stats=running)):
        torch.manual_seed(0)
        models.append(NormedWindows(norm).double().train())
        with torch.no_grad():
            models[-1].norm.weight.normal_(1.0, 0.3), models[-1].norm.bias.normal_(0.0, 0.3)
    x, y = torch.randn(3, 4, 4, 3, dtype=torch.float64), torch.tensor([0, 3, 4])
    updates, layouts = [], []
    for model in models:
        program = fbcompile.compile(model, x, frontend=frontend)
        state = {n: v.clone() for n, v in model.state_dict().items()}
        learner = fbcompile.learner(program, algorithm, seed=2)
        assert all(torch.equal(v, state[n]) for n, v in model.state_dict().items())
        parts = learner.plan.projections if algorithm == "dfa" else learner.heads
        layouts.append([p.batch_axis for p in parts])
        updates.append(step_grads(learner, model, x, y))
    assert Fold(0, 4) in layouts[0] and layouts[1] == layouts[0]
    assert updates[1].keys() == updates[0].keys()
    for name, grad in updates[0].items():
        assert float(grad.abs().sum()) > 0, name
        torch.testing.assert_close(updates[1][name], grad, rtol=1e-12, atol=1e-14)


class CastToWeights(TokenFold):
    """SigLIP's embedding pattern: the input cast to the weights' dtype, which torch.export captures
    as a constant (float32 here): a float64 copy of this program cannot run, so the fold check runs
    in the model's own dtype (it refused the model before, naming the float64 run's failure)."""

    def forward(self, x):
        return super().forward(x.to(self.head.weight.dtype))


@pytest.mark.parametrize("algorithm", ["dfa", "mf"])
def test_a_fold_is_checked_in_the_models_dtype_when_a_float64_copy_cannot_run(algorithm):
    torch.manual_seed(0)
    model, x = CastToWeights(), torch.randn(3, 4, 6)
    program = fbcompile.compile(model, x, frontend="export")
    learner = fbcompile.learner(program, algorithm, seed=1)
    folded = learner.plan.projections[0] if algorithm == "dfa" else next(iter(learner.heads))
    assert folded.batch_axis == Fold(0, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = step_grads(learner, model, x, torch.tensor([0, 3, 4]))
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


class EndTokenClassifier(nn.Module):
    """Hugging Face BART's classification head: the hidden state at each sequence's end token (id 2),
    found by boolean indexing with the token ids. On made-up ids 0 and 1 there was no end token and
    the batch-axis probe failed, so dfa, drtp and mf refused the model (its values have as many tokens
    as samples, so no single axis of the batch's size could stand in for the probe)."""

    def __init__(self):
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(50, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids)))
        ends = h[ids.eq(2)].view(h.shape[0], -1, h.shape[-1])[:, -1]
        return self.head(ends)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("algorithm", ["dfa", "drtp", "mf"])
def test_made_up_inputs_keep_the_examples_special_tokens(frontend, algorithm):
    torch.manual_seed(0)
    model = EndTokenClassifier()
    ids = torch.cat([torch.randint(3, 50, (4, 3)), torch.full((4, 1), 2)], 1)   # 4 tokens: as many as samples
    learner = fbcompile.learner(fbcompile.compile(model, ids, frontend=frontend), algorithm, seed=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = step_grads(learner, model, ids, torch.tensor([0, 2, 1, 2]))
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())
