"""Paper 002's central property: with exact condition-T feedback, analytic DTP's update tends to
BP's as beta -> 0. Checked (float64, eval mode, exact statistics, beta = 1e-6, angle < 0.01 deg) on
every built-in model family, on the minimal fan-out and shape-read models that used to break it,
and on random DAGs: fan-out to 2-4 consumers, dense (concatenating) connections, branches of
different depths joined by cat and add, sizes read in view/reshape/expand arguments, channel
shuffle."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import fbcompile
from fbcompile.models import build_model

from test_blocks_cnn import BLOCKS as CNN_BLOCKS, _randomised as randomised_bn

pytestmark = pytest.mark.usefixtures("one_thread")
LIMIT_DEG = 0.01


def update(model, program, x, y, algorithm, **options):
    model.zero_grad(set_to_none=True)
    fbcompile.learner(program, algorithm, **options).step(x, y, F.cross_entropy)
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def angle_to_bp(model, x, classes, correction="op"):
    model = model.double().eval()
    x = x.double()
    y = torch.randint(0, classes, (x.shape[0],))
    program = fbcompile.compile(model, x, variants=("exact-statistics",))
    bp = update(model, program, x, y, "bp")
    dtp = update(model, program, x, y, "dtp", beta=1e-6, correction=correction)
    cosine = float(bp @ dtp / (bp.norm() * dtp.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


BUILTIN = [("mlp", (1, 6, 6), dict(width=12, depth=2)), ("lenet", (1, 12, 12), {}),
           ("vgg-simple", (3, 8, 8), dict(widths=(4, 6, 6))),
           ("mixer", (3, 8, 8), dict(patch=4, dim=8, hidden=12, blocks=1)),
           ("resnet-small", (3, 8, 8), dict(widths=(4, 6))), ("conv1d", (1, 20), dict(channels=(4, 6)))]


@pytest.mark.parametrize("name,shape,options", BUILTIN, ids=[c[0] for c in BUILTIN])
def test_builtin_models_meet_the_limit(name, shape, options):
    model = build_model(name, shape, 5, **options)
    assert angle_to_bp(model, torch.randn(4, *shape), 5) < LIMIT_DEG


@pytest.mark.parametrize("name,shape,options", BUILTIN, ids=[c[0] for c in BUILTIN])
def test_per_unit_correction_meets_the_limit(name, shape, options):
    model = build_model(name, shape, 5, **options)
    assert angle_to_bp(model, torch.randn(4, *shape), 5, correction="unit") < LIMIT_DEG


class ShapeRead(nn.Module):
    """A consumer that only reads h's size must not count as a use of h."""

    def __init__(self, shuffle=False):
        super().__init__()
        self.shuffle = shuffle
        self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.shuffle:
            b = h.shape[0]
            h = h.view(b, 2, 4).transpose(1, 2).contiguous().view(b, 8)
        else:
            h = h.view(h.size(0), -1)
        return self.o(torch.tanh(h))


class DenseFanOut(nn.Module):
    """h feeds a linear layer, a cat with its output, and a final cat: three consumers, one of them
    in the same unit as a later unit output (as in a dense block)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.o = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(12, 4), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        u = torch.tanh(self.b(h))
        v = torch.tanh(self.c(torch.cat([h, u], 1)))
        return self.o(torch.cat([h, u, v], 1))


@pytest.mark.parametrize("model", [ShapeRead(), ShapeRead(shuffle=True), DenseFanOut()],
                         ids=["size-read", "channel-shuffle", "dense-fan-out"])
@pytest.mark.parametrize("correction", ["op", "unit"])
def test_minimal_models_meet_the_limit(model, correction):
    assert angle_to_bp(model, torch.randn(5, 6), 3, correction) < LIMIT_DEG


class RandomDag(nn.Module):
    """A DAG of tanh layers described by ``plan``: each step is (kind, sources) over earlier values;
    values nobody consumed are concatenated into the head."""

    def __init__(self, plan, width=4, inputs=5, classes=3):
        super().__init__()
        self.plan, self.width = plan, width
        widths, self.layers = [width], nn.ModuleList()
        self.stem = nn.Linear(inputs, width)
        for kind, sources in plan:
            fan_in = sum(widths[s] for s in sources) if kind == "cat" else width
            self.layers.append(nn.Linear(fan_in, width))
            widths.append(width)
        self.unused = [i for i in range(len(widths)) if not any(i in s for _, s in plan)]
        self.head = nn.Linear(width * len(self.unused), classes)

    def forward(self, x):
        values = [torch.tanh(self.stem(x))]
        for (kind, sources), layer in zip(self.plan, self.layers):
            picked = [values[s] for s in sources]
            if kind == "cat":
                h = torch.cat(picked, 1)
            elif kind == "add":
                h = picked[0]
                for p in picked[1:]:
                    h = h + p
            elif kind == "view":
                h = picked[0].view(picked[0].size(0), 2, -1).reshape(x.shape[0], -1)
            elif kind == "expand":
                h = picked[0].unsqueeze(1).expand(picked[0].shape[0], 2, self.width).mean(1)
            else:  # channel shuffle
                b = picked[0].shape[0]
                h = picked[0].view(b, 2, self.width // 2).transpose(1, 2).contiguous().view(b, self.width)
            values.append(torch.tanh(layer(h)))
        return self.head(torch.cat([values[i] for i in self.unused], 1))


@st.composite
def dag_plans(draw):
    steps = draw(st.integers(2, 6))
    plan = []
    for i in range(steps):
        available = i + 1
        kind = draw(st.sampled_from(["cat", "add", "view", "expand", "shuffle"]))
        count = 1 if kind in ("view", "expand", "shuffle") else draw(st.integers(1, min(4, available)))
        sources = draw(st.lists(st.integers(0, available - 1), min_size=count, max_size=count, unique=True))
        plan.append((kind, tuple(sorted(sources))))
    # force fan-out of 2-4 consumers on some value
    hub = draw(st.integers(0, steps - 1))
    extra = draw(st.integers(1, 3))
    plan += [("cat", (hub,))] * extra
    return plan


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag_plans(), st.sampled_from(["op", "unit"]))
def test_random_dags_meet_the_limit(plan, correction):
    torch.manual_seed(len(plan))
    assert angle_to_bp(RandomDag(plan), torch.randn(5, 5), 3, correction) < LIMIT_DEG


@pytest.mark.parametrize("correction", ["op", "unit"])
@pytest.mark.parametrize("name", sorted(CNN_BLOCKS))
def test_torchvision_style_blocks_meet_the_limit(name, correction):
    model = randomised_bn(CNN_BLOCKS[name]())
    assert angle_to_bp(model, torch.randn(3, 3, 7, 7), 5, correction) < LIMIT_DEG
