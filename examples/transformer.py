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
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digit_runs import QUICK, check_error_mode, digits, train_each  # noqa: E402


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


data = digits()
check_error_mode(DigitViT, data.train_x[:4])       # 1. error mode against autograd, float64
# 2. each algorithm trains a fresh copy from the same initialisation
train_each(DigitViT, data, {"bp": 3e-3, "dtp": 1e-3, "dfa": 1e-3, "mf": 3e-3}, epochs=1 if QUICK else 8)
