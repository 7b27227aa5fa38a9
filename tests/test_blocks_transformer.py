"""Transformer building blocks written here: a ViT encoder block (class token, position embedding,
nn.MultiheadAttention with need_weights and batch_first either way), attention spelled with
q @ k^T + softmax, scaled_dot_product_attention (causal, boolean and float masks), an embedding text
classifier on integer token ids, a SwiGLU MLP and a squeeze-excitation block. For each: error mode
equals autograd in float64 (every parameter autograd reaches gets its exact gradient), and one step of
every learner in train mode (or a refusal at construction that says why)."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.verify.checks import relative_error

from helpers import compare_with_autograd, grads_of, randomise_vectors

TOL = 1e-8
LEARNERS = ("bp", "fa", "dtp", "dfa", "drtp", "mf")
BATCH, TOKENS, WIDTH, CLASSES = 3, 4, 8, 3


class ViTBlock(nn.Module):
    """Patches -> Linear embedding, a learned class token (expanded to the batch and cat-ed) and
    position embedding, pre-norm nn.MultiheadAttention and GELU MLP with residuals, head on the class
    token."""

    def __init__(self, batch_first=True, need_weights=False):
        super().__init__()
        self.embed = nn.Linear(6, WIDTH)
        self.cls = nn.Parameter(torch.randn(1, 1, WIDTH))
        self.pos = nn.Parameter(0.5 * torch.randn(1, TOKENS + 1, WIDTH))
        self.norm1, self.norm2, self.norm = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 16), nn.GELU(), nn.Linear(16, WIDTH))
        self.head = nn.Linear(WIDTH, CLASSES)
        self.need_weights = need_weights

    def forward(self, patches):
        x = self.embed(patches)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        y = self.norm1(x)
        if not self.attention.batch_first:
            y = y.transpose(0, 1)
        attended, weights = self.attention(y, y, y, need_weights=self.need_weights)
        if not self.attention.batch_first:
            attended = attended.transpose(0, 1)
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        logits = self.head(self.norm(x)[:, 0])
        return logits + weights.sum((1, 2)).unsqueeze(1) if self.need_weights else logits


class ScoresAttention(nn.Module):
    """Single-head attention spelled out: softmax(q @ k^T / sqrt(d)) @ v, then a projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, WIDTH)
        self.q, self.v, self.out = (nn.Linear(WIDTH, WIDTH) for _ in range(3))
        # no key bias: softmax is shift-invariant per row, so its gradient is identically zero and a
        # relative comparison would compare rounding noise
        self.k = nn.Linear(WIDTH, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, patches):
        x = torch.tanh(self.embed(patches))
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(WIDTH)
        x = x + self.out(torch.softmax(scores, dim=-1) @ self.v(x))
        return self.head(x.mean(1))


class SDPABlock(nn.Module):
    """Two-head attention through F.scaled_dot_product_attention: causal, or with a mask buffer."""

    def __init__(self, mask=None, causal=False):
        super().__init__()
        self.embed, self.qkv, self.out = nn.Linear(6, WIDTH), nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        self.causal = causal
        self.register_buffer("mask", mask)

    def forward(self, patches):
        x = torch.tanh(self.embed(patches))
        n, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, length, 3, 2, WIDTH // 2).permute(2, 0, 3, 1, 4).unbind(0)
        if self.causal:
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask)
        x = x + self.out(mixed.transpose(1, 2).reshape(n, length, WIDTH))
        return self.head(x.mean(1))


class TextClassifier(nn.Module):
    """Token ids -> Embedding (padding row 0) -> mean over tokens -> Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, WIDTH, padding_idx=0)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


class SwiGLU(nn.Module):
    """LLaMA's MLP: down(silu(gate(x)) * up(x)), residual."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, WIDTH)
        self.gate, self.up, self.down = nn.Linear(WIDTH, 16), nn.Linear(WIDTH, 16), nn.Linear(16, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, patches):
        x = self.embed(patches)
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.head(x.mean(1))


class SqueezeExcitation(nn.Module):
    """x * sigmoid(fc2(relu(fc1(pool(x))))) after a conv stem."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Conv2d(6, 3, 1), nn.Conv2d(3, 6, 1)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, image):
        x = torch.tanh(self.stem(image))
        scale = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head((x * scale).mean((2, 3)))


def _causal_free_mask():
    mask = torch.rand(TOKENS, TOKENS) > 0.3
    return mask | torch.eye(TOKENS, dtype=torch.bool)


BLOCKS = {
    "vit_batch_first": lambda: ViTBlock(),
    "vit_time_first_weights": lambda: ViTBlock(batch_first=False, need_weights=True),
    "vit_batch_first_weights": lambda: ViTBlock(need_weights=True),
    "vit_time_first": lambda: ViTBlock(batch_first=False),
    "scores_softmax": ScoresAttention,
    "sdpa_causal": lambda: SDPABlock(causal=True),
    "sdpa_bool_mask": lambda: SDPABlock(mask=_causal_free_mask()),
    "sdpa_float_mask": lambda: SDPABlock(mask=torch.randn(TOKENS, TOKENS)),
    "swiglu": SwiGLU,
    "squeeze_excitation": SqueezeExcitation,
    "text_classifier": TextClassifier,
}


def _input(model, dtype=torch.float64):
    if isinstance(model, TextClassifier):
        ids = torch.randint(1, 12, (BATCH, 5))
        ids[0, -2:] = 0                              # padding tokens
        return ids
    if isinstance(model, SqueezeExcitation):
        return torch.randn(BATCH, 2, 4, 4, dtype=dtype)
    return torch.randn(BATCH, TOKENS, 6, dtype=dtype)




def _parameter_errors(model, program, x):
    """Worst relative error of the parameter gradients of error mode against autograd (for integer
    inputs, which have no input error)."""
    error = torch.randn(BATCH, CLASSES, dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    reference = torch.autograd.grad((model(x) * error).sum(), list(model.parameters()))
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, error)
    ours = grads_of(model)
    return max(relative_error(ours[n], g) for n, g in zip(names, reference))


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_error_mode_equals_autograd(name):
    torch.manual_seed(0)
    model = randomise_vectors(BLOCKS[name]().double()).eval()
    x = _input(model)
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    if x.is_floating_point():
        input_rel, param_rel = compare_with_autograd(model, x, program=program)
        assert input_rel < TOL
    else:
        param_rel = _parameter_errors(model, program, x)
    assert param_rel < TOL
    model.zero_grad(set_to_none=True)
    program.propagate_error(x, torch.randn(BATCH, CLASSES, dtype=torch.float64))
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


@functools.cache
def _train_mode_program(name):
    """(model, input, program) in train mode, float32, compiled once per block (a step without an
    optimizer leaves the parameters as they are)."""
    torch.manual_seed(1)
    model = randomise_vectors(BLOCKS[name]()).train()
    x = _input(model, torch.float32)
    return model, x, fbcompile.compile(model, x)


# every block but two ViT layouts and the float-mask SDPA, whose error-mode tests cover them (time)
LEARNER_BLOCKS = sorted(set(BLOCKS) - {"vit_batch_first", "vit_time_first_weights", "sdpa_float_mask"})


def _learner_cases():
    for algorithm in LEARNERS:
        for name in LEARNER_BLOCKS:
            yield pytest.param(name, algorithm, id=f"{algorithm}-{name}")


@pytest.mark.parametrize("name,algorithm", _learner_cases())
def test_every_learner_steps_in_train_mode(name, algorithm):
    model, x, program = _train_mode_program(name)
    y = torch.tensor([0, 2, 1])
    try:
        learner = fbcompile.learner(program, algorithm, seed=0)
    except FBCompileError as refusal:          # an algorithm that cannot apply says why, at construction
        assert str(refusal)
        return
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
