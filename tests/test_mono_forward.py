"""Mono-Forward: heads pass, "mf" (local autograd) and "mf-dd" (directional derivatives)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.bench import peak_tensor_memory
from fbcompile.data import batches, load_dataset
from fbcompile.errors import FBCompileError, OptionError
from fbcompile.runtime.diagnostics import angle
from fbcompile.runtime.mono_directional import central_difference, directional_gradient, row_chunks, unit_chunks
from fbcompile.trace import info
from helpers import built_on_cpu, snapshot, same, assert_failed_step_changes_nothing


pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn(channels=(8, 8), classes=10, in_channels=1, size=8):
    layers, c = [], in_channels
    for width in channels:
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)]
        c, size = width, size // 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * size * size, classes))


def _mlp(inputs=64, width=32, depth=2, classes=10):
    layers, n = [nn.Flatten()], inputs
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.ReLU()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, classes))






DD_MODES = [("mf", {}), ("mf-dd", {}), ("mf-dd", {"update": "immediate"})]
DD_IDS = ["mf", "mf-dd-accumulate", "mf-dd-immediate"]


# -- the estimator ------------------------------------------------------------------------------------
def _quadratic(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, device="cpu", generator=g, dtype=torch.float64)
    a = a @ a.T / n + torch.eye(n, dtype=torch.float64, device="cpu")
    b = torch.randn(n, device="cpu", generator=g, dtype=torch.float64)
    w = torch.randn(n, device="cpu", generator=g, dtype=torch.float64)
    a, b, w = (t.to(torch.get_default_device()) for t in (a, b, w))
    return (lambda v: 0.5 * v @ a @ v + b @ v), w, a @ w + b


def test_central_differences_are_exact_on_a_quadratic():
    loss, w, gradient = _quadratic()
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        v = torch.randn(w.numel(), device="cpu", generator=g, dtype=torch.float64).to(w.device)
        v /= v.norm()
        assert abs(central_difference(loss, w, v, 1e-3) - float(v @ gradient)) < 1e-6


def test_mean_of_20000_single_direction_estimates_points_along_the_gradient():
    loss, w, gradient = _quadratic()
    g = torch.Generator().manual_seed(2)
    mean = sum(directional_gradient(loss, w, 1, 1e-3, g) for _ in range(20_000)) / 20_000
    cosine = float(mean @ gradient / (mean.norm() * gradient.norm()))
    assert cosine > 0.99
    # the n/P scaling: one P-direction estimate is the mean of the P single-direction ones (same draws)
    together, apart = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    singles = [directional_gradient(loss, w, 1, 1e-3, apart) for _ in range(4)]
    assert torch.allclose(directional_gradient(loss, w, 4, 1e-3, together), sum(singles) / 4, rtol=1e-12, atol=1e-12)


# -- chunks ---------------------------------------------------------------------------------------------
def _coverage(chunks, tensors):
    counts = {name: torch.zeros(t.numel(), dtype=torch.long) for name, t in tensors.items()}
    for chunk in chunks:
        for name, start, stop in chunk.pieces:
            counts[name][start:stop] += 1
    return counts


@pytest.mark.parametrize("chunk_size", [50_000, 1000, 147, 100])
def test_chunks_respect_c_max_keep_channels_whole_and_cover_every_parameter_once(chunk_size):
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 10))
    program = fbcompile.compile(model, torch.randn(2, 16, 8, 8))
    conv_unit = program.units[0]
    chunks = unit_chunks(conv_unit, program.params, chunk_size)
    tensors = {n: program.params[n] for n in conv_unit.params}
    assert all(c.numel <= chunk_size for c in chunks)
    assert all(bool((count == 1).all()) for count in _coverage(chunks, tensors).values())
    channel_size = 16 * 9 + 3     # conv row + bias + BatchNorm scale and shift
    if chunk_size >= channel_size:    # channels whole: every chunk holds the same channels of all four tensors
        for chunk in chunks:
            ranges = {(start // (tensors[n].numel() // 32), stop // (tensors[n].numel() // 32))
                      for n, start, stop in chunk.pieces}
            assert len(ranges) == 1 and len(chunk.pieces) == 4
            assert all(start % (tensors[n].numel() // 32) == 0 for n, start, _ in chunk.pieces)
        assert len(chunks) == math.ceil(32 / (chunk_size // channel_size))
    head_chunks = row_chunks("weight", 2048, 10, chunk_size)
    assert all(c.numel <= chunk_size for c in head_chunks)
    assert bool((_coverage(head_chunks, {"weight": torch.empty(2048, 10)})["weight"] == 1).all())
    if chunk_size >= 10:
        assert all(start % 10 == 0 and stop % 10 == 0 for c in head_chunks for _, start, stop in c.pieces)


def test_learner_chunks_cover_all_trainable_parameters_and_heads():
    model = _cnn()
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(4, 1, 8, 8)), "mf-dd", chunk_size=100)
    all_chunks = [c for chunks in learner.chunks.values() for c in chunks]
    counts = _coverage(all_chunks, dict(model.named_parameters()))
    assert set(counts) == {n for n, _ in model.named_parameters()}
    assert all(bool((count == 1).all()) for count in counts.values())
    for head in learner.heads:
        if head.weight is not None:
            chunks = learner.head_chunks[head.index]
            assert all(c.numel <= 100 for c in chunks)
            assert bool((_coverage(chunks, {"weight": head.weight})["weight"] == 1).all())


# -- heads ----------------------------------------------------------------------------------------------
def test_heads_attach_before_pooling_with_per_channel_projections():
    model = _cnn(channels=(4, 6), size=16)
    program = fbcompile.compile(model, torch.randn(2, 1, 16, 16))
    learner = fbcompile.learner(program, "mf", seed=3)
    heads = list(learner.heads)
    assert [h.node.name for h in heads] == ["_2", "_6", "_9"]         # ReLUs before the max-pools; the model output
    assert heads[0].projection.shape == (4, 16, 256) and heads[0].weight.shape == (64, 10)
    assert heads[1].projection.shape == (6, 16, 64) and heads[1].weight.shape == (96, 10)
    assert heads[2].weight is None and heads[2].projection is None
    assert abs(float(heads[0].projection.var()) * 256 - 1) < 0.05      # entries N(0, 1/HW)
    again = fbcompile.learner(program, "mf", seed=3)
    other = fbcompile.learner(program, "mf", seed=4)
    assert torch.equal(again.heads.state_dict()["units.0.projection"], heads[0].projection)
    assert not torch.equal(other.heads.state_dict()["units.0.projection"], heads[0].projection)
    outputs = fbcompile.learner(program, "mf", attach="output", output_head="linear", d=2)
    assert [h.node.name for h in outputs.heads] == ["_3", "_8", "_9"]
    assert next(iter(outputs.heads)).projection.shape == (4, 2, 64)


class SamePooled(nn.Module):
    """timm's "same" max pooling (MaxPool2dSame, the ResNetV2 stem of its hybrid ViTs): the ReLU's
    output padded with -inf, then pooled. The head read the padded value, and every step was refused
    as a non-finite head gradient."""

    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        h = F.pad(torch.relu(self.conv(x)), [0, 1, 0, 1], value=-float("inf"))
        return self.out(F.max_pool2d(h, 3, 2).flatten(1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_head_reads_the_activation_before_the_padding_of_a_same_pooling(frontend):
    torch.manual_seed(0)
    model, x, y = SamePooled(), torch.randn(3, 1, 8, 8), torch.tensor([1, 4, 7])
    learner = fbcompile.learner(fbcompile.compile(model, x, frontend=frontend), "mf", seed=1)
    first = next(iter(learner.heads))
    assert info(first.node).call.spec.name == "relu" and first.shape == (4, 8, 8)
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    assert all(bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_mf_gradients_are_the_local_losses_autograd_gradients():
    torch.manual_seed(0)
    model = _mlp(inputs=12, width=8, depth=2, classes=5).double()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf", head_optimizer="sgd", head_lr=0.1)
    m1, m2 = (h.weight.detach().clone() for h in list(learner.heads)[:2])
    h1 = torch.relu(model[1](x.flatten(1)))
    h2 = torch.relu(model[3](h1.detach()))
    m1_, m2_ = m1.clone().requires_grad_(), m2.clone().requires_grad_()
    total = F.cross_entropy(h1 @ m1_, y) + F.cross_entropy(h2 @ m2_, y) + F.cross_entropy(model[5](h2.detach()), y)
    params = list(model.parameters())
    reference = torch.autograd.grad(total, params + [m1_, m2_])
    result = learner.step(x, y, F.cross_entropy)
    for p, g in zip(params, reference):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-12)
    new1, new2 = (h.weight.detach() for h in list(learner.heads)[:2])
    assert torch.allclose(new1, m1 - 0.1 * reference[-2], rtol=1e-10) and torch.allclose(new2, m2 - 0.1 * reference[-1])
    assert math.isclose(result.loss, float(F.cross_entropy(model(x), y).detach()), rel_tol=1e-12)


def test_mf_dd_estimates_point_along_the_mf_gradients():
    torch.manual_seed(1)
    model = _mlp(inputs=6, width=4, depth=1, classes=3).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    program = fbcompile.compile(model, x)
    exact = fbcompile.learner(program, "mf").compute((x,), y, F.cross_entropy)[1]
    estimate = fbcompile.learner(program, "mf-dd", directions=1500).compute((x,), y, F.cross_entropy)[1]
    for name, g in exact.items():
        assert angle(estimate[name], g) < 25, name


# -- BatchNorm statistics, no_grad, predictions -----------------------------------------------------------
@pytest.mark.parametrize("update", ["accumulate", "immediate"])
def test_batchnorm_running_statistics_after_an_mf_dd_step_equal_one_clean_forward(update):
    model = _cnn()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "mf-dd", update=update, directions=3, chunk_size=40)
    reference = copy.deepcopy(model)
    learner.step(x, y, F.cross_entropy)
    with torch.no_grad():
        for p, q in zip(reference.parameters(), model.parameters()):
            p.copy_(q)        # the stepped weights (unchanged by "accumulate"), the buffers from before the step
        reference(x)
    for (name, mine), theirs in zip(model.named_buffers(), reference.buffers()):
        assert torch.allclose(mine.float(), theirs.float(), rtol=1e-6, atol=1e-7), name


@pytest.mark.parametrize("algorithm,options", DD_MODES, ids=DD_IDS)
def test_steps_work_inside_no_grad_and_predictions_have_class_shape(algorithm, options):
    model = _cnn()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **options)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        result = learner.step(x, y, F.cross_entropy)
    changed = [n for n, p in model.named_parameters() if p.grad is not None or not torch.equal(p, before[n])]
    assert len(changed) == len(before) and math.isfinite(result.loss)
    for mode in ("final", "cumulative"):
        assert learner.predict(x, mode=mode).shape == (8, 10)
    model.eval()
    heads = list(learner.heads)
    with torch.no_grad():
        assert torch.allclose(learner.predict(x), model(x))      # the model's classifier is the final head
        total = model(x) + sum(h.scores(h.features(model[:end](x))) for h, end in zip(heads[:2], (3, 7)))
        assert torch.allclose(learner.predict(x, mode="cumulative"), total, atol=1e-6)


@pytest.mark.parametrize("algorithm,options", [
    ("mf", {"head_lr": 0.01}),
    ("mf-dd", {"head_lr": 0.03, "directions": 16}),
    ("mf-dd", {"update": "immediate", "lr": 0.3, "head_lr": 0.3, "directions": 16}),
], ids=DD_IDS)
def test_every_unit_loss_falls_on_digits(algorithm, options):
    data = load_dataset("digits")
    x, y = data.train_x[:512], data.train_y[:512]
    torch.manual_seed(0)
    model = built_on_cpu(lambda: _mlp(width=16))     # the CPU's initial weights (thresholds calibrated on them)
    learner = fbcompile.learner(fbcompile.compile(model, x[:8]), algorithm, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)      # not stepping anything under "immediate"
    before = learner.local_losses(x, y, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for xb, yb in batches(x, y, 32, shuffle=True, generator=g):
            optimizer.zero_grad(set_to_none=True)
            learner.step(xb, yb, F.cross_entropy)
            optimizer.step()
    after = learner.local_losses(x, y, F.cross_entropy)
    assert before.keys() == after.keys() and len(after) == 3
    assert after[1] < 0.85 * before[1] and all(after[u] < 0.97 * before[u] for u in after), (before, after)


@pytest.mark.cpu_only("peak memory from the profiler's CPU ledger")
def test_mf_peak_memory_does_not_grow_with_depth_unlike_bp():
    x, y = torch.randn(2048, 32), torch.randint(0, 10, (2048,))
    peaks = {}
    for depth in (2, 8):
        model = _mlp(inputs=32, width=64, depth=depth)
        learner = fbcompile.learner(fbcompile.compile(model, x[:8]), "mf")
        learner.step(x, y, F.cross_entropy)
        model.zero_grad(set_to_none=True)
        peaks["mf", depth] = peak_tensor_memory(lambda: learner.step(x, y, F.cross_entropy))
        model.zero_grad(set_to_none=True)
        peaks["bp", depth] = peak_tensor_memory(lambda: F.cross_entropy(model(x), y).backward())
    assert peaks["mf", 8] < 1.3 * peaks["mf", 2], peaks
    assert peaks["bp", 8] > 2.5 * peaks["bp", 2] and peaks["mf", 8] < 0.5 * peaks["bp", 8], peaks


# -- the learner contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("algorithm,options,pattern", [
    ("mf-dd", {"directions": 0}, r"directions=0 .* must be an int >= 1"),
    ("mf-dd", {"chunk_size": 0}, r"chunk_size=0 .* must be an int >= 1"),
    ("mf-dd", {"eps": 0.0}, r"eps=0.0 .* must be > 0"),
    ("mf-dd", {"update": "later"}, r"update='later' .* must be 'accumulate' or 'immediate'"),
    ("mf-dd", {"lr": 0.1}, r"'lr' .* applies only to update='immediate'"),
    ("mf-dd", {"update": "immediate", "head_optimizer": "adam"}, r"'head_optimizer' .* only to update='accumulate'"),
    ("mf", {"d": 0}, r"d=0 .* must be an int >= 1"),
    ("mf", {"attach": "anywhere"}, r"attach='anywhere' .* must be 'output' or 'pre_pool'"),
    ("mf", {"directions": 4}, r"'directions' does not apply to algorithm 'mf' .* 'mf-dd'"),
    ("mf", {"classes": 0}, r"classes=0 .* must be an int >= 1"),
])
def test_bad_options_name_the_option_and_the_valid_range(algorithm, options, pattern):
    program = fbcompile.compile(_cnn(), torch.randn(2, 1, 8, 8))
    with pytest.raises(OptionError, match=pattern):
        fbcompile.learner(program, algorithm, **options)


def test_bad_predict_mode_and_input_shape_raise():
    model = _cnn()
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 1, 8, 8)), "mf")
    with pytest.raises(OptionError, match="'cumulative' or 'final'"):
        learner.predict(torch.randn(2, 1, 8, 8), mode="sum")
    with pytest.raises(FBCompileError):
        learner.predict(torch.randn(2, 1, 12, 12))


@pytest.mark.parametrize("algorithm,options", DD_MODES, ids=DD_IDS)
def test_a_failed_step_changes_nothing(algorithm, options):
    model = _cnn()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **options)
    learner.step(x, y, F.cross_entropy)             # optimizer state and generator advanced once
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert_failed_step_changes_nothing(model, learner, bad, y)


@pytest.mark.parametrize("algorithm,options", DD_MODES, ids=DD_IDS)
def test_state_dict_round_trip_resumes_bitwise(algorithm, options):
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))

    def fresh():
        torch.manual_seed(0)
        model = _cnn()
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=7, directions=2, **options) \
            if algorithm == "mf-dd" else fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=7)
        return model, learner, torch.optim.Adam(model.parameters(), lr=1e-2)

    def steps(model, learner, optimizer, count):
        for _ in range(count):
            optimizer.zero_grad(set_to_none=True)
            learner.step(x, y, F.cross_entropy)
            optimizer.step()

    model, learner, optimizer = fresh()
    steps(model, learner, optimizer, 2)
    saved = copy.deepcopy((model.state_dict(), learner.state_dict(), optimizer.state_dict()))
    steps(model, learner, optimizer, 2)
    model2, learner2, optimizer2 = fresh()
    model2.load_state_dict(saved[0])
    learner2.load_state_dict(saved[1])
    optimizer2.load_state_dict(saved[2])
    steps(model2, learner2, optimizer2, 2)
    assert same(model.state_dict(), model2.state_dict())
    assert same(learner.state_dict(), learner2.state_dict())


@pytest.mark.parametrize("algorithm,options", DD_MODES, ids=DD_IDS)
def test_diagnostics_change_nothing(algorithm, options):
    model = _cnn()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model.eval()     # the Gauss-Newton reference of diagnostics cannot trace BatchNorm's statistics update
    learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, **options)
    before = snapshot(model, learner)
    report = learner.diagnostics(x, y, F.cross_entropy)
    assert len(report.rows) == 3 and all(r["angle_bp"] is not None for r in report.rows)
    assert same(before, snapshot(model, learner))
