"""fbcompile.recommended: every registered algorithm has settings with sources, per model family."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
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
    with pytest.raises(TypeError):
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
    assert recommended("mf-dd", "mlp").options["directions"].source.startswith("paper 004")
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
