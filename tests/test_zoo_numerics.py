"""Numerical hazards found on torchvision's zoo with random weights (issue 11), float64.

1. The DTP target map of an invertible activation is varsigma (paper 002 eq. 27), defined on sigma's
   range only; it continues as a constant beyond a finite end of the range (t is clamped there), so
   it stays continuous and non-decreasing. varsigma's own formula outside the range is cubic and
   decreasing for sigmoid and tanh, and chained squeeze-excitation gates (efficientnet_b0) turned
   target deltas of ~10 into ~1e38.
2. ``feedback_init="forward-scale"`` draws fixed random feedback at the forward weight's own scale,
   so FA's errors transform like BP's when a normalisation makes the forward independent of the
   weights' scale (MaxVit's conv -> BatchNorm pairs with std-0.02 weights: He-scale feedback grew
   the errors ~1e50-fold)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.context import EagerContext
from fbcompile.errors import NonFiniteError, OptionError
from fbcompile.initialisation import INITS, draw
from fbcompile.verify.evaluate import forward_values
from helpers import built_on_cpu, cpu_draw

WIDE = torch.linspace(-40.0, 40.0, 8001, dtype=torch.float64)


def _target_map(act, x):
    """(G, the rule's context) of the single activation in ``act`` at input ``x`` (condition T)."""
    model = nn.Sequential(act).double()
    program = fbcompile.compile(model, x)
    node = next(iter(program.rules))
    rule = program.rules[node]
    ctx = EagerContext(node, forward_values(program, (x,)), program.model)
    return (lambda t: rule.target_map()(ctx, t)["input"]), rule, ctx


def test_sigmoid_and_tanh_targets_are_varsigma_of_t_clamped_to_the_range():
    """Closed forms: sigmoid varsigma(y) = y^2/2 - y^3/3 - 1/12, tanh varsigma(y) = y - y^3/3, each
    evaluated at t clamped to [0, 1] and [-1, 1]."""
    x = torch.randn(3, 4, dtype=torch.float64)
    G, _, _ = _target_map(nn.Sigmoid(), x)
    c = WIDE.clamp(0, 1)
    assert torch.allclose(G(WIDE), c ** 2 / 2 - c ** 3 / 3 - 1 / 12, rtol=0, atol=1e-14)
    G, _, _ = _target_map(nn.Tanh(), x)
    c = WIDE.clamp(-1, 1)
    assert torch.allclose(G(WIDE), c - c ** 3 / 3, rtol=0, atol=1e-14)


@pytest.mark.parametrize("act, lo, hi", [(nn.Sigmoid(), 0.0, 1.0), (nn.Tanh(), -1.0, 1.0), (nn.ELU(0.7), -0.7, None),
                                         (nn.Softplus(2.0), 0.0, None), (nn.LeakyReLU(0.2), None, None)])
def test_invertible_targets_are_continuous_non_decreasing_and_constant_beyond_the_range(act, lo, hi):
    x = torch.randn(3, 4, dtype=torch.float64)
    G, rule, ctx = _target_map(act, x)
    g = G(WIDE)
    assert torch.isfinite(g).all()
    assert float(g.diff().min()) >= -1e-15                         # non-decreasing
    assert float(g.diff().abs().max()) < 0.02                      # continuous: steps of 0.01 move it < 0.02
    for end in (lo, hi):
        if end is not None:                                        # constant beyond the end, = varsigma(end)
            beyond = WIDE[WIDE <= end] if end == lo else WIDE[WIDE >= end]
            at_end = G(torch.tensor([end], dtype=torch.float64))
            assert torch.equal(G(beyond), at_end.expand(beyond.shape))
    # inside the range G is varsigma: its slope at h = sigma(x) is sigma'(x), also near saturation
    xs = torch.linspace(-8, 8, 33, dtype=torch.float64)
    h = act.double()(xs)
    slope = torch.func.vmap(torch.func.grad(lambda t: G(t)))(h)
    xx = xs.clone().requires_grad_()
    sigma_prime, = torch.autograd.grad(act.double()(xx).sum(), xx)
    assert torch.allclose(slope, sigma_prime, rtol=1e-9, atol=1e-12)


def test_target_jacobian_equals_the_error_map_at_a_saturated_operating_point():
    """Inputs of +-40 make sigmoid's float64 output exactly 0 or 1, the ends of the clamp: the
    Jacobian of G at t = h is still sigma'(x) there (the clamp passes slope 1 at its bounds)."""
    x = torch.tensor([[-40.0, -5.0, 0.0, 5.0, 40.0, 1.0]], dtype=torch.float64)
    G, rule, ctx = _target_map(nn.Sigmoid(), x)
    h = torch.sigmoid(x)
    assert h[0, 4] == 1.0
    j_target = torch.func.jacrev(G)(h).reshape(6, 6)
    j_error = torch.func.jacrev(lambda g: rule.error(ctx, g)["input"])(torch.zeros_like(h)).reshape(6, 6)
    assert torch.allclose(j_target, j_error, rtol=1e-12, atol=1e-15)


def _sigmoid_chain(depth=8, gain=8.0):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        linear = nn.Linear(4, 4)
        nn.init.orthogonal_(linear.weight, gain)
        layers += [linear, nn.Sigmoid()]
    out = nn.Linear(4, 3)
    nn.init.orthogonal_(out.weight, gain)
    return nn.Sequential(*layers, out).double()


def test_dtp_through_a_chain_of_saturating_sigmoids_keeps_finite_bounded_targets():
    """Eight sigmoid layers with weights of gain 8 and beta = 2: the target deltas reaching the
    sigmoids are O(1), outside (0, 1). With varsigma's cubic continuation the deltas grew
    cubically layer after layer and DTP stopped with non-finite targets even in float64."""
    model = built_on_cpu(_sigmoid_chain)             # a CPU run's orthogonal weights and input on every device
    x = cpu_draw(torch.randn, 2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 2])
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp", beta=2.0)
    learner.step(x, y, F.cross_entropy)
    norms = learner.last["delta_norms"]
    assert len(norms) == 9 and max(norms.values()) < 100     # 8 sigmoids and the output
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


# -- feedback at the forward weight's scale ------------------------------------------------------------
def test_forward_scale_draws_at_the_forward_weights_rms():
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    w = 0.02 * cpu_draw(torch.randn, 256, 64, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    b = draw(tuple(w.shape), "forward-scale", 1.0, gen(), w)
    bound = math.sqrt(3) * float(w.pow(2).mean().sqrt())
    assert b.dtype == torch.float64 and b.shape == w.shape
    assert float(b.abs().max()) <= bound and float(b.abs().max()) > 0.999 * bound
    assert abs(float(b.pow(2).mean().sqrt()) / float(w.pow(2).mean().sqrt()) - 1) < 0.01
    # the same draws as He uniform, rescaled: B(c W) = c B(W)
    assert torch.allclose(draw(tuple(w.shape), "forward-scale", 1.0, gen(), 10 * w), 10 * b, rtol=1e-14, atol=0)
    kaiming = draw(tuple(w.shape), "kaiming", 1.0, gen(), w)
    assert torch.allclose(b / b.abs().max(), kaiming / kaiming.abs().max(), rtol=1e-12, atol=1e-15)
    # an all-zero forward weight (zero-initialised layer) gets He uniform, not a zero feedback matrix
    zero = torch.zeros(8, 4, dtype=torch.float64)
    assert torch.equal(draw((8, 4), "forward-scale", 1.0, gen(), zero), draw((8, 4), "kaiming", 1.0, gen(), zero))
    assert "forward-scale" in INITS and INITS[-1] == "forward"


class _ConvBN(nn.Module):
    """conv -> BatchNorm (eps 1e-300: independent to rounding of the conv weights' scale) twice, then a head."""

    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=1e-300)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, eps=1e-300)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        h = torch.tanh(self.n1(self.c1(x)))
        h = torch.tanh(self.n2(self.c2(h)))
        return self.head(h.flatten(1))


def _fa_grads(scale, init):
    torch.manual_seed(0)
    model = _ConvBN().double().train()
    with torch.no_grad():
        model.c1.weight.mul_(scale)
        model.c2.weight.mul_(scale)
    x = cpu_draw(torch.randn, 4, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0])
    learner = fbcompile.learner(fbcompile.compile(model, x), "fa", feedback_init=init)
    learner.step(x, y, F.cross_entropy)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fa_with_forward_scale_feedback_transforms_like_bp_under_the_normalised_weights_scale():
    """Scaling the conv weights by c leaves the forward unchanged (BatchNorm), and BP's gradient of
    a conv weight scales by 1/c. FA with forward-scale feedback does the same (B scales with W and
    the BatchNorm backward by 1/c); He-scale feedback does not (the first conv's update scales by
    1/c^2: an extra 1/c per conv-BN pair, the growth that overflowed MaxVit)."""
    c = 0.02
    base, scaled = _fa_grads(1.0, "forward-scale"), _fa_grads(c, "forward-scale")
    for name in ("c1.weight", "c2.weight"):
        assert torch.allclose(scaled[name] * c, base[name], rtol=1e-9, atol=0), name
    for name in ("n1.weight", "n1.bias", "n2.weight", "n2.bias", "head.weight", "head.bias"):
        assert torch.allclose(scaled[name], base[name], rtol=1e-9, atol=0), name
    he_base, he_scaled = _fa_grads(1.0, "kaiming"), _fa_grads(c, "kaiming")
    ratio = float(he_scaled["c1.weight"].norm() / he_base["c1.weight"].norm())
    assert ratio == pytest.approx(1 / c ** 2, rel=1e-9)


def test_unknown_feedback_init_is_refused():
    with pytest.raises(OptionError, match="forward-scale"):
        draw((2, 2), "he", 1.0, torch.Generator(), torch.zeros(2, 2))


# -- examples/zoo.py --learners (re-running only the learners that failed) --------------------------------
def _zoo_script(monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "examples" / "zoo.py"
    monkeypatch.syspath_prepend(str(script.parent))
    spec = importlib.util.spec_from_file_location("fbcompile_zoo_script", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _tiny_gated(models, size, classes):
    """A squeeze-excitation-gated conv net (the efficientnet_b0 pattern) small enough for a test."""
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4), nn.Linear(4, classes)

        def forward(self, x):
            h = F.silu(self.conv(x))
            gate = torch.sigmoid(self.fc(h.mean((2, 3))))
            return self.head((h * gate[:, :, None, None]).mean((2, 3)))
    return Gated()


def test_zoo_learners_option_runs_only_those_learners(monkeypatch, tmp_path, capsys):
    zoo = _zoo_script(monkeypatch)
    monkeypatch.setattr(zoo, "import_torchvision", lambda: object())
    monkeypatch.setitem(zoo.ZOO, "tiny_gated", zoo.ModelSpec(_tiny_gated, 6))
    out = tmp_path / "zoo.json"
    assert zoo.main(["--models", "tiny_gated", "--size", "6", "--learners", "fa, dtp", "--step-timeout", "0",
                     "--out", str(out)]) == 0
    res, = zoo.load_results(out)
    assert res.compiled == "ok" and res.exact
    assert res.learners == {"fa": "ok", "dtp": "ok"}
    assert "| all 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        zoo.main(["--learners", "fa,backprop"])
    assert refused.value.code == 2 and "backprop" in capsys.readouterr().err


def test_feedback_scale_ratios_show_the_mismatch_and_forward_scale_removes_it():
    from fbcompile.runtime.feedback_weights import FeedbackWeights
    torch.manual_seed(0)
    model = _ConvBN().double().train()
    with torch.no_grad():                       # std-0.02-like weights: 0.02 x torch's default conv init
        model.c1.weight.mul_(0.02)
        model.c2.weight.mul_(0.02)
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    he = FeedbackWeights(program, init="kaiming", scale=1.0, seed=0, trainable=False).scale_ratios()
    matched = FeedbackWeights(program, init="forward-scale", scale=1.0, seed=0, trainable=False).scale_ratios()
    assert set(he) == set(matched) == {"c1.weight", "c2.weight", "head.weight"}
    # He uniform: rms sqrt(2 / fan_in); torch's conv init: rms 1 / sqrt(3 fan_in), here times 0.02:
    # a ratio of sqrt(6) / 0.02 = 122 whatever fan_in (up to sampling: 72 and 144 entries)
    for name in ("c1.weight", "c2.weight"):
        assert he[name] == pytest.approx(math.sqrt(6) / 0.02, rel=0.3)
    assert all(0.8 < r < 1.2 for r in matched.values()), matched
    usf = FeedbackWeights(program, init="kaiming", scale=1.0, seed=0, trainable=False, sign="usf").scale_ratios()
    w = program.params["c1.weight"].detach()
    assert usf["c1.weight"] == pytest.approx(1 / float(w.pow(2).mean().sqrt()), rel=1e-12)   # sign(W): rms 1


def test_a_non_finite_fa_step_names_the_feedback_to_weight_scale_and_the_remedy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 5, 3))
    with torch.no_grad():
        model[0].weight.mul_(0.02 / float(model[0].weight.std()))
    x = torch.randn(4, 2, 5, 5)
    learner = fbcompile.learner(fbcompile.compile(model, x), "fa")
    ratio = sorted(learner.feedback.scale_ratios().values())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"feedback is [0-9.]+x the forward weights' scale .*forward-scale"):
        learner.step(bad, torch.randint(0, 3, (4,)), F.cross_entropy)
    assert ratio[-1] > 5          # the conv's He-scale feedback is far above its std-0.02 weight
