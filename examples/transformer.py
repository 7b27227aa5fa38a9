"""A small Vision Transformer on digits (8x8 images as 4 patches of 4x4 pixels), captured with
torch.export and trained with BP, DTP, DFA and Mono-Forward.

    python examples/transformer.py   # a few minutes on a laptop CPU

The model checks its token count with Python control flow on a shape (``if tokens != ...``), which
torch.fx cannot trace: ``fbcompile.compile`` (frontend="auto") says so in ``explain()`` and captures
it with ``torch.export`` instead. Its ATen ops (linear, layer_norm, scaled_dot_product_attention,
gelu, view/transpose/expand/cat/select, ...) bind to the same canonical ops and rules as their fx
spellings. Error mode is first checked against autograd in float64 (the class token, reached through
``expand`` and ``cat``, included); then each algorithm trains a fresh copy and prints test accuracy.
FBCOMPILE_EXAMPLE_QUICK=1 makes it a seconds-long run.
"""
import os
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.frontends import frontend_of
from fbcompile.training import Trainer
from fbcompile.verify.checks import autograd_gradients, relative_error

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))


class Attention(nn.Module):
    """Multi-head self-attention: softmax(q k^T / sqrt(d)) v through scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v)
        return self.out(mixed.transpose(1, 2).reshape(batch, tokens, width))


class Block(nn.Module):
    def __init__(self, width, heads, hidden):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), Attention(width, heads)
        self.norm2, self.mlp = nn.LayerNorm(width), nn.Sequential(nn.Linear(width, hidden), nn.GELU(),
                                                                   nn.Linear(hidden, width))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitViT(nn.Module):
    def __init__(self, patch=4, width=32, heads=2, hidden=64, depth=1, classes=10, side=8):
        super().__init__()
        self.patch, self.tokens = patch, (side // patch) ** 2
        self.embed = nn.Linear(patch * patch, width)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.tokens + 1, width))
        self.blocks = nn.Sequential(*[Block(width, heads, hidden) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, images):
        b, c, h, w = images.shape
        p = self.patch
        patches = images.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        if patches.shape[1] != self.tokens:        # Python control flow on a shape: fx cannot trace it
            raise ValueError(f"expected {self.tokens} patches, got {patches.shape[1]}")
        x = torch.cat([self.cls.expand(b, -1, -1), self.embed(patches)], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(dim=1))     # mean over the class token and patches


data = load_dataset("digits")
if QUICK:
    data = replace(data, train_x=data.train_x[:128], train_y=data.train_y[:128], test_x=data.test_x[:128],
                   test_y=data.test_y[:128])

# 1. capture and check error mode against autograd, float64
torch.manual_seed(0)
model = DigitViT().double()
x = data.train_x[:4].double()
program = fbcompile.compile(model, x)
used, note = frontend_of(program.traced)
print(f"captured with {used}: {note}")
error = torch.randn(4, 10, dtype=torch.float64)
reference_input, reference_params = autograd_gradients(model, x, error)
model.zero_grad(set_to_none=True)
ours = program.propagate_error(x, error)
worst = max(relative_error(p.grad, reference_params[n]) for n, p in model.named_parameters())
print(f"error mode vs autograd (float64): input {relative_error(ours, reference_input[0]):.1e}, "
      f"worst of {len(reference_params)} parameters {worst:.1e}")

# 2. train with each algorithm from the same initialisation
EPOCHS = 1 if QUICK else 8
for algorithm, lr in (("bp", 3e-3), ("dtp", 1e-3), ("dfa", 1e-3), ("mf", 3e-3)):
    torch.manual_seed(0)
    model = DigitViT().train()
    learner = fbcompile.learner(fbcompile.compile(model, data.train_x[:2]), algorithm, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trainer = Trainer(learner, optimizer, data, batch_size=64, progress=False,
                      log=lambda line, name=algorithm: print(f"{name:4s} {line}"))
    history = trainer.fit(EPOCHS)
    print(f"{algorithm}: test accuracy {100 * history[-1]['test_accuracy']:.1f}% after {EPOCHS} epoch(s)")
