"""Training under torch.autocast (bfloat16 on the test device; the same code paths serve float16).

Before: every learner crashed on a convnet under autocast (convolution_backward, BatchNorm and
pooling backwards got float32 errors with bfloat16 activations, and .grad was set in bfloat16),
and a program captured without autocast ran a step under it, where what forward's Python decided
at capture no longer held (DeBERTa's masking constant overflowed bfloat16). timm's EfficientViT
was refused for its ``torch.autocast(enabled=False)`` block. Now: the program keeps the autocast
state of its capture and refuses another; under it every learner steps, bp as close to the float64
gradient as autograd under autocast is; autocast-off blocks compile in line (float64 exact)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.runtime import ALGORITHMS

from helpers import compare_with_autograd, same, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
DEVICE = torch.empty(0).device.type          # the suite's test device (tests/conftest.py)
BF16 = dict(device_type=DEVICE, dtype=torch.bfloat16)


def _convnet():
    """Every rule that calls an ATen backward kernel directly (convolution, transposed convolution,
    BatchNorm, average, adaptive and max pooling, activations). Autocast runs GroupNorm and
    LayerNorm in float32, so the errors they give back are float32 where the activation before
    them is bfloat16 (BatchNorm's, the pools')."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.ConvTranspose2d(8, 8, 2, stride=2), nn.Tanh(), nn.AvgPool2d(2), nn.GroupNorm(2, 8),
                         nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.LayerNorm(32), nn.Linear(32, 10))


def _flat_grads(model):
    return torch.cat([p.grad.double().flatten() for p in model.parameters()])


def test_bp_under_autocast_is_as_close_to_the_float64_gradient_as_autograd_under_autocast():
    torch.manual_seed(0)
    base, x, y = _convnet(), torch.randn(8, 3, 12, 12), torch.randint(0, 10, (8,))
    exact = copy.deepcopy(base).double()
    F.cross_entropy(exact(x.double()), y).backward()
    reference = copy.deepcopy(base)
    with torch.autocast(**BF16):
        F.cross_entropy(reference(x), y).backward()
        ours = copy.deepcopy(base)
        fbcompile.learner(fbcompile.compile(ours, x), "bp").step(x, y, F.cross_entropy)
    assert all(p.grad.dtype == torch.float32 for p in ours.parameters())
    truth = _flat_grads(exact)
    autograd_error = ((_flat_grads(reference) - truth).norm() / truth.norm()).item()
    our_error = ((_flat_grads(ours) - truth).norm() / truth.norm()).item()
    assert 1e-3 < autograd_error < 0.2             # bfloat16 rounding (0.03 here), not float32's (1e-7)
    assert our_error < 1.1 * autograd_error


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_learner_steps_under_autocast(algorithm):
    torch.manual_seed(0)
    model, x, y = _convnet(), torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    with torch.autocast(**BF16):
        learner = fbcompile.learner(fbcompile.compile(model, x), algorithm, seed=0)
        before = [p.detach().clone() for p in model.parameters()]
        learner.step(x, y, F.cross_entropy)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))     # .grad only


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_run_under_another_autocast_state_is_refused_by_name_and_changes_nothing(frontend):
    torch.manual_seed(0)
    model, x, y = _convnet(), torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    learner = fbcompile.learner(fbcompile.compile(model, x, frontend=frontend), "bp")
    before = snapshot(model, learner)
    with torch.autocast(**BF16), pytest.raises(FBCompileError, match=r"captured with torch.autocast off, and this "
                                                                      rf"run has torch.autocast on for {DEVICE} \(bfloat16\)"):
        learner.step(x, y, F.cross_entropy)
    assert same(before, snapshot(model, learner))
    with torch.autocast(**BF16):
        under = fbcompile.compile(model, x, frontend=frontend)
    with pytest.raises(FBCompileError, match=rf"captured with torch.autocast on for {DEVICE} \(bfloat16\), and this "
                                             r"run has torch.autocast off"):
        under.propagate_error(x, torch.randn(4, 10))


class MaskedScores(nn.Module):
    """DeBERTa's pattern: the mask constant is the minimum of the scores' dtype, which autocast sets."""

    def __init__(self):
        super().__init__()
        self.query, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        q = self.query(x)
        scores = (q @ q.transpose(-1, -2)).masked_fill(torch.eye(x.shape[1], dtype=torch.bool),
                                                        torch.finfo(q.dtype).min)
        return self.head(torch.softmax(scores.float(), -1) @ x).mean(1)


def test_a_capture_under_autocast_takes_the_dtype_decisions_the_model_takes_under_it():
    """Captured without autocast, torch.export fixed float32's minimum, which overflows bfloat16:
    the step is refused (the guard) instead of crashing. Captured under autocast, the program's
    forward is the model's under autocast, bitwise."""
    torch.manual_seed(0)
    model, x = MaskedScores(), torch.randn(2, 5, 6)
    with torch.autocast(**BF16):
        program = fbcompile.compile(model, x, frontend="export")
        expected = model(x)
        error = torch.randn_like(expected)
        program.propagate_error(x, error)
        output, _ = program.executable("error").run_forward((x,))
    assert torch.equal(output, expected)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


class FullPrecisionAttention(nn.Module):
    """Two nested autocast-off blocks (EfficientViT's attention is one), a parameter read inside, two
    values leaving the outer block, and dtype methods (no-op casts in float64)."""

    def __init__(self):
        super().__init__()
        self.embed, self.inner, self.head = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        with torch.autocast(device_type="cpu", enabled=False):
            q, k = h.double(), h.float().double()
            scores = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
            with torch.autocast(device_type="cpu", enabled=False):
                mixed = scores @ self.inner(h)
        return self.head(mixed) + h[:, :3] * scores.sum(-1, keepdim=True)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_an_autocast_off_block_compiles_in_line_and_equals_autograd(frontend):
    torch.manual_seed(0)
    model, x = FullPrecisionAttention().double(), torch.randn(7, 5, dtype=torch.float64)
    program = fbcompile.compile(model, x, frontend=frontend)
    assert program.traced.meta["fbcompile_frontend"][0] == frontend
    input_error, param_error = compare_with_autograd(model, x, program=program)
    assert input_error < 1e-13 and param_error < 1e-13


def test_an_autocast_off_block_is_refused_in_a_capture_under_autocast():
    """Run under autocast, the inlined body would follow it where the model's block does not."""
    model, x = FullPrecisionAttention(), torch.randn(7, 5)
    with torch.autocast(**BF16), pytest.raises(FBCompileError, match="turns torch.autocast off in a block"):
        fbcompile.compile(model, x, frontend="export")


class NormalisedInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3)

    def forward(self, x):
        with torch.autocast(device_type="cpu", enabled=False):
            return self.norm(self.conv(x))


def test_a_batch_norm_inside_an_autocast_off_block_is_refused_under_export():
    with pytest.raises(FBCompileError, match=r"BatchNorm inside a torch.autocast\(enabled=False\) block"):
        fbcompile.compile(NormalisedInside(), torch.randn(2, 2, 6, 6), frontend="export")


class AutocastOnInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return self.a(x).float()


def test_a_block_that_turns_autocast_on_stays_refused():
    with pytest.raises(FBCompileError, match="a torch.autocast block inside forward, kept by torch.export"):
        fbcompile.compile(AutocastOnInside(), torch.randn(2, 4), frontend="export")


def test_steps_in_one_long_autocast_context_read_the_updated_parameters():
    """Autocast caches its low-precision copies of the parameters until the outermost context exits:
    without the program dropping that cache at every run, the second step of a context spanning
    several steps computed its forward from the first step's weights (silently stale)."""
    torch.manual_seed(0)
    base, x, y = _convnet(), torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    finals = []
    for one_context in (True, False):
        model = copy.deepcopy(base)
        with torch.autocast(**BF16):
            learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        if one_context:
            with torch.autocast(**BF16):
                for _ in range(3):
                    optimizer.zero_grad()
                    learner.step(x, y, F.cross_entropy)
                    optimizer.step()
        else:
            for _ in range(3):
                optimizer.zero_grad()
                with torch.autocast(**BF16):
                    learner.step(x, y, F.cross_entropy)
                optimizer.step()
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_train_command_compiles_and_trains_under_autocast(capsys, tmp_path):
    from fbcompile.cli import main
    out_dir = tmp_path / "run"
    args = ["train", "--model", "lenet", "--algo", "bp", "--subset", "256", "--threads", "1", "--no-progress",
            "--no-plot", "--autocast", "bfloat16", "--out", str(out_dir)]
    assert main(args + ["--epochs", "1"]) == 0
    assert '"autocast": "bfloat16"' in (out_dir / "config.json").read_text()
    assert main(["train", "--resume", str(out_dir), "--epochs", "2", "--no-progress", "--no-plot"]) == 0
    assert "epoch 2/2" in capsys.readouterr().out
    assert main(["train", "--resume", str(out_dir), "--epochs", "3", "--autocast", "float16"]) != 0
    assert "--autocast cannot change" in capsys.readouterr().err
