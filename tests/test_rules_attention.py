"""Attention as one op (float64): F.scaled_dot_product_attention (plain, causal, bool and float
masks, scale, a learned bias as attn_mask, dropout with the forward's mask) and nn.MultiheadAttention
(batch_first either way, need_weights either way, per-head weights, key_padding_mask, attn_mask,
the is_causal hint, kdim/vdim cross-attention, unbatched input). Error mode against autograd for the
input and every parameter, the adjoint identity per node; refusals."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError
from fbcompile.verify.checks import adjoint_check, rule_errors

from helpers import compare_with_autograd

TOL = 1e-10
L, N, E = 5, 3, 8


class Attention(nn.Module):
    """qkv projection, heads, scaled_dot_product_attention with ``options``, flattened."""

    def __init__(self, learned_bias=False, **options):
        super().__init__()
        self.qkv, self.options = nn.Linear(E, 24), options
        self.bias = nn.Parameter(torch.randn(L, L)) if learned_bias else None

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], L, 2, 12).transpose(1, 2).chunk(3, -1)
        if self.bias is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias, **self.options).flatten(1)
        return F.scaled_dot_product_attention(q, k, v, **self.options).flatten(1)


def _sdpa_cases():
    torch.manual_seed(5)
    mask = torch.rand(L, L) > 0.4
    mask[2] = False                               # a query that sees nothing: zeros, as torch gives
    return {"plain": {}, "causal": {"is_causal": True}, "bool_mask": {"attn_mask": mask},
            "float_mask": {"attn_mask": torch.randn(N, 1, L, L, dtype=torch.float64)}, "scale": {"scale": 0.3},
            "learned_bias": {"learned_bias": True}}


@pytest.mark.parametrize("case", sorted(_sdpa_cases()))
def test_scaled_dot_product_attention_is_exact(case):
    model = Attention(**_sdpa_cases()[case]).double()
    x = torch.randn(N, L, E, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL and param_rel < TOL
    assert adjoint_check(program, "scaled_dot_product_attention", x) < TOL


def test_scaled_dot_product_attention_dropout_reuses_the_forward_mask():
    """With dropout the tapped forward computes attention explicitly and saves its keep mask; the
    feedback is the exact transpose of the pass that ran (verify replays it with that mask)."""
    model = Attention(dropout_p=0.4).double()
    x = torch.randn(N, L, E, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, name


def test_grouped_query_attention_is_refused():
    model = Attention(enable_gqa=True).double()
    with pytest.raises(FBCompileError, match="enable_gqa"):
        fbcompile.compile(model, torch.randn(N, L, E, dtype=torch.float64))


class SelfAttention(nn.Module):
    """tanh(Linear) -> nn.MultiheadAttention(h, kv, kv, ...) -> output and weights, flattened per sample."""

    def __init__(self, batch_first=True, need_weights=True, average=True, kdim=None, cross=False, call=None,
                 unbatched=False):
        super().__init__()
        self.fc = nn.Linear(E, E)
        self.mha = nn.MultiheadAttention(E, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.kv = nn.Linear(E, kdim or E)
        self.need_weights, self.average, self.cross, self.call = need_weights, average, cross, call or {}
        self.unbatched = unbatched

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        kv = self.kv(x) if self.cross else h
        out, weights = self.mha(h, kv, kv, need_weights=self.need_weights, average_attn_weights=self.average,
                                **self.call)
        start = 0 if self.unbatched else 1
        out = (out if self.mha.batch_first or self.unbatched else out.transpose(0, 1)).flatten(start)
        return torch.cat([out, weights.flatten(start)], -1) if self.need_weights else out


def _mha_cases():
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    padding = torch.zeros(N, L, dtype=torch.bool)
    padding[0, -2:] = True
    return {
        "batch_first_weights": {}, "time_first_weights": {"batch_first": False},
        "batch_first_no_weights": {"need_weights": False},
        "time_first_no_weights": {"batch_first": False, "need_weights": False},
        "per_head_weights": {"average": False},
        "causal_hint_no_weights": {"need_weights": False, "call": {"attn_mask": causal, "is_causal": True}},
        "causal_hint_weights": {"call": {"attn_mask": causal, "is_causal": True}},
        "key_padding": {"batch_first": False, "call": {"key_padding_mask": padding}},
        "padding_and_float_mask": {"need_weights": False, "call": {
            "key_padding_mask": padding, "attn_mask": torch.randn(L, L, dtype=torch.float64)}},
        "cross_kdim": {"kdim": 6, "cross": True},
    }


@pytest.mark.parametrize("case", sorted(_mha_cases()))
def test_multihead_attention_is_exact(case):
    torch.manual_seed(0)
    options = _mha_cases()[case]
    model = SelfAttention(**options).double().eval()
    _randomise_biases(model)
    shape = (N, L, E) if options.get("batch_first", True) else (L, N, E)
    x = torch.randn(*shape, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    input_rel, param_rel = compare_with_autograd(model, x, program=program)
    assert input_rel < TOL and param_rel < TOL
    if options.get("need_weights", True):   # verify does not yet take a None element of a tuple output
        assert adjoint_check(program, "mha", x) < TOL
    assert {"mha.in_proj_weight", "mha.in_proj_bias", "mha.out_proj.weight"} & set(program.feedback["error"].params)


def test_multihead_attention_on_unbatched_input_is_exact():
    model = SelfAttention(unbatched=True).double().eval()
    _randomise_biases(model)
    x = torch.randn(L, E, dtype=torch.float64)
    input_rel, param_rel = compare_with_autograd(model, x)
    assert input_rel < TOL and param_rel < TOL


def test_multihead_attention_dropout_reuses_the_forward_mask():
    model = SelfAttention().double().train()
    model.mha.dropout = 0.3
    x = torch.randn(N, L, E, dtype=torch.float64)
    program = fbcompile.compile(model, x)
    for name, (tjml_rel, gap) in rule_errors(program, x).items():
        assert tjml_rel < TOL and gap < TOL, name


def test_multihead_attention_extra_key_value_rows_are_refused():
    model = SelfAttention().double()
    model.mha = nn.MultiheadAttention(E, 2, batch_first=True, add_bias_kv=True).double()
    with pytest.raises(FBCompileError, match="add_bias_kv"):
        fbcompile.compile(model, torch.randn(N, L, E, dtype=torch.float64))


def _randomise_biases(model):
    """nn.MultiheadAttention starts its biases at exactly zero: draw them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.3)
