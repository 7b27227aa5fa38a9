"""Real-size zoo models (fbcompile.zoo_models) and the model benchmark's plumbing (issue 14)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.autocast_guard import under_mixed_precision
from fbcompile.bench import MODEL_CONFIGS, model_batch, model_memory, model_step
from fbcompile.errors import FBCompileError
from fbcompile.cli import main
from fbcompile.models import build_model
from fbcompile.zoo_models import make_divisible, mobilenet_v2, resnet18_imagenet

# torchvision's published parameter counts (its model docs: resnet18 11,689,512; mobilenet_v2 3,504,872)
PUBLISHED = {"resnet18-imagenet": 11_689_512, "mobilenet-v2": 3_504_872}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_zoo_models_have_torchvisions_size_and_build_by_name(name):
    model = build_model(name, (3, 224, 224), 1000)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
    small = build_model(name, (3, 32, 32), 10)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_mobilenet_structure():
    model = mobilenet_v2((3, 32, 32), 10)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    skips = [m for m in model.features if getattr(m, "use_res_connect", False)]
    assert len(skips) == 10
    assert make_divisible(32 * 0.75) == 24 and make_divisible(1280 * 1.4) == 1792


def test_zoo_models_match_torchvision_when_importable():
    try:
        import torchvision.models as tv
    except Exception:       # noqa: BLE001  (not installed, or installed against another torch)
        pytest.skip("torchvision is not importable here")
    for ours, theirs in ((resnet18_imagenet((3, 64, 64), 10), tv.resnet18(num_classes=10)),
                         (mobilenet_v2((3, 64, 64), 10), tv.mobilenet_v2(num_classes=10))):
        ours.load_state_dict(theirs.state_dict())           # same names and shapes
        ours.eval(), theirs.eval()
        x = torch.randn(2, 3, 64, 64)
        assert torch.equal(ours(x), theirs(x))


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_bp_equals_autograd_on_zoo_models_in_train_mode(name):
    """float64, BatchNorm on batch statistics; MobileNetV2's dropout off (its masks are random)."""
    torch.manual_seed(1)
    model = build_model(name, (3, 32, 32), 10).double().train()
    with torch.no_grad():
        for p in model.parameters():        # BN gamma/beta and biases are 1 and 0 at init: randomise
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    reference = build_model(name, (3, 32, 32), 10).double().train()
    reference.load_state_dict(model.state_dict())
    for m in reference.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    F.cross_entropy(reference(x), y).backward()
    learner = fbcompile.learner(fbcompile.compile(model, x[:2]), "bp")
    learner.step(x, y, F.cross_entropy)
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        scale = max(float(q.grad.norm()), 1e-3)     # a bias right before a batch-statistics BN: grad ~0
        assert float((p.grad - q.grad).norm()) / scale < 1e-10, n


def test_model_step_helper_runs_every_configuration():
    model, x, y = model_batch("lenet", (1, 16, 16), 8)
    assert x.shape == (8, 1, 16, 16) and model.training
    for config in ["autograd", *MODEL_CONFIGS]:
        step = model_step("lenet", config, (1, 16, 16), 8)
        step()


def test_model_step_helper_runs_the_baseline_and_a_learner_under_autocast():
    """``--autocast``: the baseline and the learner, compiled and stepped under torch.autocast (a
    program compiled outside it would refuse the step)."""
    device = torch.empty(0).device.type
    state = lambda: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))  # noqa: E731
    assert under_mixed_precision(state, device, "bfloat16")() == (True, torch.bfloat16)
    assert under_mixed_precision(state, device, None) is state and not state()[0]
    for config in ("autograd", "bp"):
        model_step("lenet", config, (1, 16, 16), 8, autocast="bfloat16")()      # raises if not under autocast
    with pytest.raises(FBCompileError, match="captured with torch.autocast on"):   # the learner's program was
        model_step("lenet", "bp", (1, 16, 16), 8, autocast="bfloat16").__wrapped__()  # captured under autocast


@pytest.mark.cpu_only("tensor memory from the profiler's CPU ledger")
def test_model_memory_helper_measures_a_step():
    peak, net = model_memory("lenet", "bp", [1, 16, 16], 8, 1)
    assert peak >= net > 0


def test_bench_cli_skips_a_slow_configuration_with_a_line_unless_all(capsys):
    args = ["bench", "--model", "mlp", "--input-shape", "12", "--batch-size", "8", "--rounds", "1", "--warmup", "1",
            "--algos", "bp", "--no-memory"]
    assert main(args + ["--max-step-seconds", "0"]) == 0
    out = capsys.readouterr().out
    assert "autograd: set up" in out and "bp: first step" in out and "skipped (--all runs it)" in out
    assert "bp: skipped: its first step took" in out
    assert main(args + ["--max-step-seconds", "0", "--all"]) == 0
    out = capsys.readouterr().out
    assert "bp: set up, first step" in out and "skipped" not in out
    table = [line.split() for line in out.splitlines() if line.startswith("bp ")]
    assert table and float(table[0][1]) > 0
