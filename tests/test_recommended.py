"""fbcompile.recommended: every registered algorithm has settings with sources, per model family."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import OptionError
from fbcompile.models import build_model
from fbcompile.recommended import FAMILIES, TABLE, model_family, recommended, sigmoid_bce
from fbcompile.runtime import ALGORITHMS


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_registered_algorithm_has_sourced_settings(algorithm):
    assert algorithm in TABLE, f"add {algorithm!r} to fbcompile/recommended.py TABLE"
    for family in FAMILIES:
        rec = recommended(algorithm, family)
        assert rec.family == family and rec.lr.value > 0
        for name, setting in rec.settings().items():
            assert setting.source.strip(), f"{algorithm} {family} {name} has no source"
        declared = ALGORITHMS[algorithm].OPTIONS
        assert set(rec.options) <= set(declared)
        for name, setting in rec.options.items():       # every recommended option value is accepted
            assert declared[name].check(setting.value) is None, (algorithm, name)


def test_recommended_is_exported():
    assert fbcompile.recommended is recommended


@pytest.mark.parametrize("spec,family", [("mlp", "fc"), ("lenet", "conv"), ("vgg-simple", "conv"),
                                         ("conv1d", "conv"), ("mixer", "token")])
def test_family_of_builtin_models_by_name_module_and_program(spec, family):
    shape = {"mlp": (64,), "conv1d": (1, 40)}.get(spec, (3, 32, 32))
    model = build_model(spec, shape, 10)
    assert model_family(spec) == family
    assert model_family(model) == family
    if spec in ("mlp", "lenet"):
        program = fbcompile.compile(model, torch.randn(2, *shape))
        assert model_family(program) == family


def test_family_of_a_user_module():
    assert model_family(nn.Sequential(nn.Linear(4, 3))) == "fc"
    assert model_family(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())) == "conv"
    assert model_family(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))) == "token"
    with pytest.raises(OptionError):
        model_family(object())


def test_recommendation_per_family_and_factories():
    fc, conv = recommended("drtp", "mlp"), recommended("drtp", build_model("lenet", (1, 8, 8), 10))
    assert conv.family == "conv" and fc.family == "fc"
    assert fc.loss.value == "bce" and "paper 001" in fc.loss.source
    assert fc.learner_options()["projection_init"] == "he_uniform"
    model = nn.Linear(3, 2)
    optimizer = fc.optimizer_factory(model.parameters())
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == fc.lr.value
    assert fc.make_optimizer(model.parameters(), lr=0.5).param_groups[0]["lr"] == 0.5
    assert recommended("bp", "mlp").loss_fn() is F.cross_entropy
    assert recommended("tp", "mlp").condition.value == "P"
    assert recommended("mf-dd", "mixer").options["directions"].source.startswith("paper 004")
    assert recommended("mf-dd", "mlp").options["eps"].source.startswith("paper 004")
    assert "source" in recommended("dtp", "token").describe()


def test_sigmoid_bce_is_paper_001s_loss_and_error():
    logits, labels = torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1, 2, 3, 0])
    loss = sigmoid_bce(logits, labels)
    target = F.one_hot(labels, 4).float()
    expected = F.binary_cross_entropy(torch.sigmoid(logits), target)
    assert torch.allclose(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.allclose(grad, (torch.sigmoid(logits) - target) / target.numel(), atol=1e-7)


def test_unknown_algorithm_is_refused():
    with pytest.raises(fbcompile.FBCompileError, match="unknown algorithm"):
        recommended("nope", "fc")


def test_tune_script_prints_its_grid_and_seeds(tmp_path):
    """examples/tune.py, the sweep behind the "ours" values, runs and says what it swept."""
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "tune.py"
    done = subprocess.run([sys.executable, str(script), "--algos", "bp", "--models", "mlp", "--grid", "lr=1e-3",
                           "--seeds", "0", "--epochs", "1", "--jobs", "1"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "grid {'lr': [0.001]}" in done.stdout and "seeds [0]" in done.stdout
    assert "best per (model, algorithm)" in done.stdout


def test_plain_tp_with_condition_t_warns_through_the_python_api():
    from fbcompile.cli.runs import RunConfig, apply_recommended
    with pytest.warns(UserWarning, match="condition T"):
        apply_recommended(RunConfig(model="mlp", algorithm="tp", condition="T"))
    config = apply_recommended(RunConfig(model="mlp", algorithm="tp"))
    assert config.condition == "P" and config.provenance["condition"] != "user"


# -- issue 15: MF-DD directions per family, the demo's cost, and the claims behind the notes -------------
def test_mf_dd_directions_per_family_with_their_sources():
    """P = 4 (paper 004) is far too noisy for a digits budget on fc / conv layers (73% vs MF's 97% on
    paper 004's MLP shape): those families take more directions, sourced as ours; the Mixer keeps 4."""
    fc, conv, token = (recommended("mf-dd", f) for f in FAMILIES)
    assert fc.options["directions"].value >= 32 and conv.options["directions"].value >= 16
    for rec in (fc, conv):
        assert rec.options["directions"].source.startswith("ours: examples/tune.py")
        assert rec.lr.source == rec.options["directions"].source
    assert token.options["directions"].value == 4 and token.options["directions"].source.startswith("paper 004")
    for rec in (fc, conv, token):        # eps and C_max stay paper 004's
        assert rec.options["eps"].value == 1e-3 and rec.options["chunk_size"].value == 50_000
        assert rec.options["eps"].source.startswith("paper 004")


def test_mf_dd_demo_cost_stays_within_the_demo_budget():
    """An MF-DD step costs 2P forwards per chunk: P x epochs multiplier is the demo's cost driver. The
    demo must stay under 3 minutes on 2 cores. Measured (session 9, 2 cores): the whole demo takes 76 s
    with 64 on the MLP (15.9 s for its MF-DD run), 32 on LeNet (LeNet's epoch at P = 16 costs about the
    MLP's at P = 32: 0.74 against 0.80 s) and 12 on the Mixer (14.8 s); these caps keep that."""
    budget = {"fc": 64, "conv": 32, "token": 12}
    for family, most in budget.items():
        rec = recommended("mf-dd", family)
        assert rec.options["directions"].value * rec.epochs_multiplier.value <= most, family


def test_sdfa_with_zero_projections_is_shallow_learning():
    """The claim behind the sdfa shortfall notes: with B = 0 only the output unit learns, from the loss's
    own local gradient, exactly as shallow learning's does (so a dead sdfa run is the hidden signal's
    doing, not the output unit's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    x, y = torch.randn(16, 6), torch.randint(0, 4, (16,))
    program = fbcompile.compile(model, x[:2])
    grads = {}
    for algorithm, options in (("sdfa", {"projection_init": "uniform", "projection_scale": 0.0}), ("shallow", {})):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, algorithm, **options).step(x, y, F.cross_entropy)
        grads[algorithm] = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    for name in ("2.weight", "2.bias"):
        assert grads["shallow"][name] is not None and grads["shallow"][name].abs().sum() > 0
        assert torch.allclose(grads["sdfa"][name], grads["shallow"][name])
    for name in ("0.weight", "0.bias"):
        assert grads["shallow"][name] is None and torch.count_nonzero(grads["sdfa"][name]) == 0


def test_sdfa_sign_signal_has_a_part_common_to_every_class():
    """sign(e) = 1 - 2y* for softmax outputs, so sdfa's hidden signal is sum_c B_c - 2 B_label: for a
    share of the features every class pushes the same way (the saturation the notes describe); DRTP's
    -y* B has no common part beyond B's own mean."""
    torch.manual_seed(0)
    logits, labels = torch.randn(32, 10), torch.randint(0, 10, (32,))
    e = torch.softmax(logits, 1) - F.one_hot(labels, 10).float()
    assert torch.equal(torch.sign(e), 1 - 2 * F.one_hot(labels, 10).float())
    bound = (6 / 128) ** 0.5
    generator = torch.Generator().manual_seed(1)           # a CPU generator: drawn on the CPU, then moved
    B = torch.empty(10, 128, device="cpu").uniform_(-bound, bound, generator=generator).to(torch.get_default_device())
    per_class = B.sum(0)[None] - 2 * B
    same_way = (torch.sign(per_class) == torch.sign(B.sum(0))[None]).all(0).float().mean()
    assert 0.15 < same_way < 0.6


def test_tune_script_knows_paper_004s_mlp_shape():
    """examples/tune.py --models mlp-p004: two hidden layers of 50 ReLU units (paper 004's MNIST MLP)."""
    import importlib.util
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "examples" / "tune.py"
    spec = importlib.util.spec_from_file_location("tune_script", script)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    _, name, options = tune.model_spec("mlp-p004")
    model = build_model(name, (1, 8, 8), 10, **options)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 50), (50, 50), (50, 10)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 2
    assert model_family(name) == "fc"
    with pytest.raises(SystemExit):
        tune.model_spec("nope")


def test_mf_dd_estimate_approaches_mf_gradient_as_directions_grow():
    """The reason for more directions: MF-DD's estimate is MF's local gradient plus direction noise of
    variance ~ n/P per chunk (cos to the MF gradient ~ sqrt(P / (P + n))), not a biased estimate that
    more directions would not fix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    program = fbcompile.compile(model, x[:2])

    def grad(algorithm, **options):
        model.zero_grad(set_to_none=True)
        fbcompile.learner(program, algorithm, seed=0, **options).step(x, y, F.cross_entropy)
        return torch.cat([model[2].weight.grad.flatten(), model[2].bias.grad])    # n = 72

    exact = grad("mf")
    cos = {p: float(F.cosine_similarity(grad("mf-dd", directions=p), exact, dim=0)) for p in (2, 2000)}
    assert cos[2000] > 0.9 and cos[2] < 0.6, cos
