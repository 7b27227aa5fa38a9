"""Ops of rules/vjp_math.py (T rule: autograd's vjp), the tensor-bound clamp and the tensor-exponent
pow, in float64 through both front ends: every rule's TJML residual and adjoint gap with random
vectors, input and parameter gradients equal to autograd's (parameters in products, bounds and
solves get theirs), writes into copies in place, refusals by name, and DTP's small-beta limit."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile

from helpers import randomise_vectors
from test_rules_elementwise import assert_matches_autograd, dtp_angle

pytestmark = pytest.mark.usefixtures("one_thread")

POSITIVE = lambda h: F.softplus(h) + 0.5  # noqa: E731
UNIT = lambda h: 0.9 * torch.tanh(h)  # noqa: E731
UNARY = {
    "sinh": torch.sinh, "cosh": torch.cosh, "tan": lambda h: torch.tan(0.5 * UNIT(h)), "asin": lambda h: torch.asin(UNIT(h)),
    "acos": lambda h: torch.arccos(UNIT(h)), "atan": torch.atan, "asinh": torch.asinh,
    "acosh": lambda h: torch.acosh(POSITIVE(h) + 1.0), "atanh": lambda h: torch.atanh(UNIT(h)), "exp2": torch.exp2,
    "log2": lambda h: torch.log2(POSITIVE(h)), "log10": lambda h: POSITIVE(h).log10(), "sinc": torch.sinc,
    "erfc": torch.erfc, "erfinv": lambda h: torch.erfinv(UNIT(h)), "lgamma": lambda h: torch.lgamma(POSITIVE(h)),
    "digamma": lambda h: torch.digamma(POSITIVE(h)), "i0": lambda h: torch.special.i0(h) + torch.i0(h),
    "sgn": lambda h: h * torch.sgn(h), "frac": lambda h: torch.frac(3.0 * h),
    "deg2rad": lambda h: torch.deg2rad(h) + torch.rad2deg(h), "logit": lambda h: torch.logit(torch.sigmoid(h), 1e-6),
    "nan_to_num": lambda h: torch.nan_to_num(h, 0.0), "polygamma": lambda h: torch.polygamma(1, POSITIVE(h)),
    "float_power": lambda h: torch.float_power(POSITIVE(h), 1.5).to(h.dtype),
}
CASES = {
    **{name: (lambda fn: lambda m, h: fn(h))(fn) for name, fn in UNARY.items()},
    "xlogy": lambda m, h: torch.xlogy(h, POSITIVE(h.flip(-1))), "logaddexp": lambda m, h: torch.logaddexp(h, h.flip(-1)),
    "logaddexp2": lambda m, h: torch.logaddexp2(h, 0.5 * h), "copysign": lambda m, h: torch.copysign(h, h.roll(1, -1)),
    "fmax": lambda m, h: torch.fmax(h, 0.5 * h.flip(-1)), "fmin": lambda m, h: torch.fmin(h, 0.5 * h.flip(-1)),
    "fmod": lambda m, h: torch.fmod(h, 0.3), "remainder": lambda m, h: torch.remainder(h, torch.full_like(h, 0.7)),
    "kron": lambda m, h: h * torch.kron(m.w[:2, :2], m.w[2:4, 2:4]).flatten()[:8],
    "trace": lambda m, h: h * torch.trace(m.w), "baddbmm": lambda m, h: torch.baddbmm(
        h.view(-1, 2, 4), h.view(-1, 2, 4), m.w[:4, :4].expand(h.shape[0], 4, 4), beta=0.5).flatten(1),
    "addbmm": lambda m, h: h + torch.addbmm(m.w[:1, :8], m.w[:1, :3].unsqueeze(0), m.w[:3].unsqueeze(0)),
    "addmv": lambda m, h: h + torch.addmv(m.w[0], m.w, m.w[1], alpha=0.5),
    "addr": lambda m, h: h + torch.addr(m.w[:1], m.w[0, :1], m.w[1]),
    "tensordot": lambda m, h: torch.tensordot(h, m.w, dims=([1], [0])),
    "diag": lambda m, h: h * torch.diag(m.w), "diag_embed": lambda m, h: torch.diag_embed(h[:, :2]).flatten(1).repeat(1, 2),
    "det": lambda m, h: h * torch.det(h.view(-1, 2, 4)[:, :, :2]).unsqueeze(1) + torch.linalg.det(m.w[:2, :2]),
    "logdet": lambda m, h: h * torch.logdet(m.w[:3, :3] @ m.w[:3, :3].t() + torch.eye(3, dtype=h.dtype)),
    "inverse": lambda m, h: torch.inverse(h.view(-1, 2, 4)[:, :, :2] + 3 * torch.eye(2, dtype=h.dtype)).flatten(1).repeat(1, 2),
    "linalg_solve": lambda m, h: torch.linalg.solve(m.w[:2, :2] + 3 * torch.eye(2, dtype=h.dtype), h.view(-1, 2, 4)).flatten(1),
    "matrix_exp": lambda m, h: torch.linalg.matrix_exp(h.view(-1, 2, 4)[:, :, :2]).flatten(1).repeat(1, 2),
    "linalg_norm": lambda m, h: h / torch.linalg.norm(h, dim=1, keepdim=True),
    "linalg_matrix_norm": lambda m, h: h * torch.linalg.matrix_norm(h.view(-1, 2, 4)).unsqueeze(1),
    "cdist": lambda m, h: torch.cdist(h.view(-1, 2, 4), m.w[:2, :4].expand(h.shape[0], 2, 4)).flatten(1).repeat(1, 2),
    "renorm": lambda m, h: torch.renorm(h, 2, 0, 1.0), "rot90": lambda m, h: torch.rot90(h.view(-1, 2, 4), 1, [1, 2]).flatten(1),
    "take_along_dim": lambda m, h: torch.take_along_dim(h, h.argsort(1), 1), "logcumsumexp": lambda m, h: h.logcumsumexp(1),
    "var_mean": lambda m, h: h * torch.var_mean(h, 1, keepdim=True)[0] - torch.var_mean(h, 1, keepdim=True)[1],
    "std_mean": lambda m, h: h * torch.std_mean(h, 1, keepdim=True, correction=0)[0],
    "aminmax": lambda m, h: h * h.aminmax(dim=1, keepdim=True).max,
    "lp_pool1d": lambda m, h: m.lp(POSITIVE(h).view(-1, 2, 4)).flatten(1).repeat(1, 2),
    "lp_pool2d": lambda m, h: F.lp_pool2d(POSITIVE(h).view(-1, 2, 2, 2), 3, 2).flatten(1).repeat(1, 4),
    "grid_sample": lambda m, h: F.grid_sample(h.view(-1, 2, 2, 2), UNIT(h).view(-1, 2, 2, 2), align_corners=False).flatten(1),
    "affine_grid": lambda m, h: F.affine_grid(h[:, :6].view(-1, 2, 3), [h.shape[0], 1, 2, 2], align_corners=False).flatten(1),
    "scatter": lambda m, h: torch.zeros_like(h).scatter(1, torch.arange(8).flip(0).repeat(h.shape[0], 1), h),
    "scatter_add": lambda m, h: torch.zeros_like(h).scatter_add(1, (torch.arange(8) % 4).repeat(h.shape[0], 1), h),
    "scatter_reduce": lambda m, h: h.scatter_reduce(1, (torch.arange(8) % 3).repeat(h.shape[0], 1), h * 2, "amax"),
    "index_add": lambda m, h: torch.zeros_like(h).index_add(1, torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]), h, alpha=2),
    "index_copy": lambda m, h: h.index_copy(1, torch.tensor([1, 3]), h[:, :2] * 2),
    "masked_scatter": lambda m, h: h.masked_scatter(torch.arange(8).repeat(h.shape[0], 1) % 2 == 0, h.flip(-1)),
    "index_put": lambda m, h: torch.index_put(h, (torch.arange(h.shape[0]), torch.tensor(1)), h[:, 0] * m.w[0, 0]),
    "select_scatter": lambda m, h: torch.select_scatter(h, h[:, 0] * 2, 1, 1),
    "slice_scatter": lambda m, h: torch.slice_scatter(h, h[:, :2] * 3, 1, 2, 4),
    "diagonal_scatter": lambda m, h: torch.diagonal_scatter(h.view(-1, 2, 4)[:, :, :2], h[:, :2], 0, 1, 2).flatten(
        1).repeat(1, 2),
    "tensor_split": lambda m, h: torch.cat(torch.tensor_split(h, 3, dim=1)[::-1], 1),
    "hsplit": lambda m, h: torch.cat(torch.hsplit(h, [2, 5])[::-1], 1),
    "dsplit": lambda m, h: torch.cat(torch.dsplit(h.view(-1, 1, 2, 4), 2)[::-1], 3).flatten(1),
    "broadcast_tensors": lambda m, h: h + torch.broadcast_tensors(h[:, :1], m.w[0])[0] * 0.5,
    "diff": lambda m, h: torch.cat([torch.diff(h, dim=1), h[:, :1]], 1),
    "multi_dot": lambda m, h: torch.linalg.multi_dot([h, m.w, torch.tanh(m.w)]),
    "chain_matmul": lambda m, h: torch.chain_matmul(h, m.w, m.w.flip(0)),
    "block_diag": lambda m, h: torch.cat([h[:, :6] @ torch.block_diag(m.w[:2, :2], m.w[2:6, 2:6]),
                                          torch.block_diag(h[:, 6:7], m.w[:1, :1])[:h.shape[0]]], 1),
    "atleast_1d": lambda m, h: h * torch.atleast_1d(h.sum()),
    "atleast_2d": lambda m, h: h * torch.atleast_2d(h[:, 0]).t(),
    "atleast_3d": lambda m, h: torch.atleast_3d(h).flatten(1) * h,
    "special_erfcx": lambda m, h: torch.special.erfcx(h),
    "special_xlog1py": lambda m, h: torch.special.xlog1py(h, POSITIVE(h.flip(-1))),
    "dot": lambda m, h: h * torch.dot(m.w[0], m.w[1]) + torch.vdot(m.w[2], m.w[3]),
    "pdist": lambda m, h: h * F.pdist(m.w).sum(),
    "bilinear": lambda m, h: m.bilinear(h, h.flip(1)) + F.bilinear(h, torch.tanh(h), m.w.view(8, 8, 1).expand(
        8, 8, 8).contiguous()),
    "clamp_tensor_bounds": lambda m, h: torch.clamp(h, min=h.flip(1) * 0.5, max=m.w[0]) + h.clamp_min(0.1),
    "pow_tensor_exponent": lambda m, h: torch.pow(POSITIVE(h), h.flip(1)) + 2.0 ** h,
}
# ATen writes these with other ops (pow and avg_pool; a conversion to float64 and back; bmm and add)
DECOMPOSED = {"lp_pool1d", "lp_pool2d", "float_power", "baddbmm"}
OPS = {"deg2rad": "deg2rad", "clamp_tensor_bounds": "clamp", "pow_tensor_exponent": "pow"}


class Case(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.w = nn.Parameter(torch.randn(8, 8))
        self.lp, self.bilinear = nn.LPPool1d(2, 2), nn.Bilinear(8, 8, 8)
        self.fn = fn

    def forward(self, x):
        return self.b(self.fn(self, self.a(x)))


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_ops_equal_autograd(name, frontend):
    model = randomise_vectors(Case(CASES[name]).double())
    ops = [] if frontend == "export" and name in DECOMPOSED else [OPS.get(name, name)]
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend, ops=ops)


def _in_place_index_add(m, h):
    out = torch.zeros_like(h)
    out.index_add_(1, torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]), h)
    return out * 2 + out


def _in_place_scatter(m, h):
    out = h * 1.5
    out.scatter_(1, torch.arange(4).repeat(h.shape[0], 1), h[:, 4:])
    return out.tanh() + out


def _mask_assignment(m, h):
    out = h * 1.5
    out[out > 0.2] = 0.0      # torch.export: index_put_ (torch.fx cannot trace item assignment)
    return out + h


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("fn", [_in_place_index_add, _in_place_scatter, _mask_assignment], ids=lambda f: f.__name__)
def test_in_place_writes_into_copies_equal_autograd(fn, frontend):
    if frontend == "fx" and fn is _mask_assignment:
        pytest.skip("torch.fx cannot trace item assignment")
    model = randomise_vectors(Case(fn).double())
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), frontend)


def test_scatter_with_reduce_is_refused_by_name():
    model = Case(lambda m, h: h.scatter(1, torch.arange(8).repeat(h.shape[0], 1), h, reduce="multiply"))
    problems = fbcompile.coverage(model, torch.randn(3, 4), frontend="fx")
    assert len(problems) == 1 and "use scatter_reduce" in problems[0].reason


@pytest.mark.parametrize("name", ["atanh", "xlogy", "baddbmm", "linalg_solve", "var_mean", "grid_sample", "scatter_add",
                                  "clamp_tensor_bounds", "pow_tensor_exponent"])
def test_ops_meet_the_small_beta_limit(name):
    model = randomise_vectors(Case(CASES[name]))
    assert dtp_angle(model, torch.randn(5, 4, dtype=torch.float64)) < 0.01


class BilinearNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mix, self.b = nn.Linear(4, 8), nn.Bilinear(8, 8, 6), nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(torch.tanh(self.mix(h, h.flip(1))))


def test_bilinear_feeds_back_through_a_weight_slot_and_every_learner_steps():
    """nn.Bilinear's input feedback reads its weight through ``ctx.weight``: FA and learned
    feedback put their own matrix there, as for a Linear."""
    from test_learners_any_model import LEARNERS, loss_fn
    torch.manual_seed(0)
    model, x, y = BilinearNet(), torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 4, 1])
    program = fbcompile.compile(model, x)
    assert "mix.weight" in {slot.qualname for slot in program.slots}
    for algorithm, options in LEARNERS:
        model.zero_grad(set_to_none=True)
        result = fbcompile.learner(program, algorithm, **options).step(x, y, loss_fn)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert math.isfinite(result.loss) and grads and all(torch.isfinite(g).all() for g in grads), algorithm


PARAMETRIZATIONS = {"orthogonal": nn.utils.parametrizations.orthogonal,
                    "spectral_norm": nn.utils.parametrizations.spectral_norm, "old_spectral_norm": nn.utils.spectral_norm}


@pytest.mark.parametrize("name, train", [("orthogonal", False), ("orthogonal", True), ("spectral_norm", False),
                                         ("old_spectral_norm", False)])
def test_weight_parametrizations_compile_under_export_and_equal_autograd(name, train):
    """The orthogonal map (matrix_exp / householder products) and spectral normalisation's
    sigma = u^T W v (dot, mv) are traced through by torch.export."""
    torch.manual_seed(0)
    middle = PARAMETRIZATIONS[name](nn.Linear(8, 8))
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), middle, nn.Tanh(), nn.Linear(8, 3)).double().train(train)
    assert_matches_autograd(model, torch.randn(5, 4, dtype=torch.float64), "export")


def test_spectral_norm_in_train_mode_is_refused_by_name():
    """Its power iteration updates u and v inside torch.no_grad(): a block torch.export keeps."""
    model = nn.Sequential(nn.Linear(4, 8), nn.utils.parametrizations.spectral_norm(nn.Linear(8, 3))).train()
    with pytest.raises(fbcompile.FBCompileError, match="no_grad"):
        fbcompile.compile(model, torch.randn(5, 4), frontend="export")
