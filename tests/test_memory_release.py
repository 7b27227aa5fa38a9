"""Memory of a step: taps freed after their last reader, no activation kept between steps, error
mode unchanged by the boxed calling convention, update-unlocked DRTP flat in depth on residual
convnets.

Memory is the peak of :func:`fbcompile.bench.memory_ledger` (the running sum of the profiler's self
memory events during one step) minus what the step leaves allocated (the new ``.grad`` tensors):
the step's working memory."""
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fbcompile
from fbcompile.bench import memory_ledger
from fbcompile.passes.boxed import boxed
from fbcompile.runtime.registry import ALGORITHMS


# -- 1. each tap is freed right after its last reader ------------------------------------------------------------
class _OpLog(TorchDispatchMode):
    """Counts aten ops and records, per op, the storages it reads (a custom hook on every op)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads.append({t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                           if isinstance(t, torch.Tensor)})
        return func(*args, **(kwargs or {}))


def _tap_lifetimes(hand_over: bool):
    """(per tap: index of the last op reading it, number of ops run when it died; total ops)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                          nn.Linear(32, 4)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    run = fbcompile.compile(model, x).executable("error")
    with torch.no_grad():
        output, taps = run.run_forward((x,))
    errors = (torch.autograd.grad(F.cross_entropy(output.requires_grad_(), y), output)[0],)
    log, died = _OpLog(), {}
    storages = [t.untyped_storage().data_ptr() for t in taps]
    for i, tap in enumerate(taps):
        weakref.finalize(tap, lambda i=i: died.setdefault(i, len(log.reads)))
    x = tap = output = None
    with torch.no_grad(), log:
        run.run_feedback("error", errors, taps, returns="params", keep_for=() if hand_over else None)
        total = len(log.reads)
    taps = None
    # reads while the tap lives (after it dies its address may be reused by a new tensor)
    last_read = {i: max((k for k, reads in enumerate(log.reads[:died.get(i, total)]) if p in reads), default=-1)
                 for i, p in enumerate(storages)}
    return last_read, died, total


def test_each_tap_is_freed_right_after_its_last_reader():
    last_read, died, total = _tap_lifetimes(hand_over=True)
    assert len(last_read) == 4 and all(k >= 0 for k in last_read.values())   # h1, h2, h3 and the input
    for i, k in last_read.items():
        # op k is the last to read tap i; at most the rest of that rule's call (one op) runs before it dies
        assert died[i] <= k + 2, (i, k, died[i], total)
    assert sum(died[i] < total - 2 for i in died) >= 3          # all but the input die well before the end


def test_taps_kept_by_the_caller_live_until_the_graph_returns():
    """The control: without handing the taps over, the caller's list pins every tap to the end."""
    last_read, died, total = _tap_lifetimes(hand_over=False)
    assert all(died[i] >= total for i in last_read)


def test_boxed_module_empties_its_list_and_skips_unread_inputs():
    graph = torch.fx.Graph()
    a, _, b = graph.placeholder("a"), graph.placeholder("unused"), graph.placeholder("b")
    graph.output((graph.call_function(torch.mul, (graph.call_function(torch.add, (a, b)), 2.0)),))
    module = boxed(torch.fx.GraphModule(nn.Module(), graph))
    args = [torch.ones(3), torch.zeros(5), torch.full((3,), 2.0)]
    unread = weakref.ref(args[1])
    (result,) = module.forward(args)
    assert args == [] and unread() is None and torch.equal(result, torch.full((3,), 6.0))


# -- 2. error mode unchanged: bp equals autograd ------------------------------------------------------------------
class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        h = torch.tanh(self.c2(h)) + 0.5 * torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_bp_equals_autograd_in_float64(kind):
    torch.manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(10, 24), nn.Tanh(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5)).double()
        x = torch.randn(12, 10, dtype=torch.float64)
    else:
        model, x = _ConvNet().double(), torch.randn(12, 3, 14, 14, dtype=torch.float64)
    y = torch.randint(0, 5, (12,))
    F.cross_entropy(model(x), y).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    learner = fbcompile.learner(fbcompile.compile(model, x), "bp")
    for _ in range(2):                      # the second step runs the cached boxed module again
        model.zero_grad(set_to_none=True)
        learner.step(x, y, F.cross_entropy)
        for name, p in model.named_parameters():
            assert (p.grad - reference[name]).norm() <= 1e-10 * reference[name].norm(), name


# -- 3. no activation-sized tensor kept between steps -------------------------------------------------------------
def _reachable_numel(root, skip: tuple) -> int:
    """Sum of numel of the distinct tensors reachable from ``root`` through containers, plain
    objects' attributes and modules, not entering the objects in ``skip``."""
    seen, total, stack = {id(s) for s in skip}, 0, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type, type(None))) or callable(obj) \
                and not isinstance(obj, nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.numel()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("fbcompile", "torch", __name__):
            stack.extend(vars(obj).values())
    return total


_CASES = [(name, {"beta": 0.01} if name in ("tp", "dtp") else {}) for name in ALGORITHMS] + \
    [("dtp", {"beta": 0.01, "feedback": "lrl"}), ("drtp", {"execution": "stored"})]


@pytest.mark.parametrize("algorithm,options", _CASES,
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_no_activation_sized_tensor_is_kept_between_steps(algorithm, options):
    """Tensors reachable from the learner (its ``last`` included, the model excluded) after a step
    at batch 8 and at batch 256: the same numel, so nothing the learner keeps grows with the batch."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4)).double()
    learner = fbcompile.learner(fbcompile.compile(model, torch.randn(2, 20, dtype=torch.float64)), algorithm, **options)
    kept = []
    for batch in (8, 256):
        x, y = torch.randn(batch, 20, dtype=torch.float64), torch.randint(0, 4, (batch,))
        learner.step(x, y, F.cross_entropy)
        kept.append((_reachable_numel(learner.last, ()), _reachable_numel(learner, (learner.model,))))
    assert kept[0] == kept[1], f"{algorithm} keeps tensors that grow with the batch between steps: {kept}"


def test_dtp_keeps_delta_norms_not_deltas():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,))
    learner = fbcompile.learner(fbcompile.compile(model, x), "dtp", beta=0.01)
    learner.step(x, y, F.cross_entropy)
    norms = learner.last["delta_norms"]
    assert len(norms) == 2 and all(isinstance(v, float) and v > 0 for v in norms.values())
    assert not any(isinstance(v, torch.Tensor) for v in learner.last.values())


# -- 4. update-unlocked DRTP: working memory flat in depth on a residual convnet ----------------------------------
class _ResidualStack(nn.Module):
    """Stem conv, ``depth`` residual blocks x + BN(conv(relu(BN(conv x)))) at C channels, head."""

    def __init__(self, depth: int, batch_norm: bool, channels: int = 16):
        super().__init__()
        norm = (lambda: nn.BatchNorm2d(channels)) if batch_norm else (lambda: nn.Identity())
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
                                   for _ in range(2 * depth))
        self.norms = nn.ModuleList(norm() for _ in range(2 * depth))
        self.head = nn.Linear(channels, 10)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for i in range(0, len(self.convs), 2):
            inner = torch.relu(self.norms[i](self.convs[i](h)))
            h = torch.relu(h + self.norms[i + 1](self.convs[i + 1](inner)))
        return self.head(h.mean((2, 3)))


def _working_memory(depth: int, batch_norm: bool, algorithm: str, compiled: bool | None = None, **options) -> int:
    torch.manual_seed(4)
    model = _ResidualStack(depth, batch_norm)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    if algorithm == "autograd":
        def step():
            F.cross_entropy(model(x), y).backward()
    else:
        learner = fbcompile.learner(fbcompile.compile(model, x[:2]), algorithm, **options)
        if compiled is not None:
            learner.compiled = compiled
            assert learner.compiled == compiled

        def step():
            learner.step(x, y, F.cross_entropy)
    step()
    model.zero_grad(set_to_none=True)
    peak, net = memory_ledger(step)
    return peak - net


ACTIVATION = 16 * 16 * 16 * 16 * 4          # one block activation: batch x C x H x W float32


@pytest.mark.cpu_only("working memory from the profiler's CPU ledger")
@pytest.mark.parametrize("batch_norm,compiled", [(True, False), (False, True), (False, False)])
def test_update_unlocked_drtp_is_flat_in_depth_on_a_residual_convnet(batch_norm, compiled):
    grow = lambda algorithm, **kw: (_working_memory(8, batch_norm, algorithm, **kw)
                                    - _working_memory(2, batch_norm, algorithm, **kw))
    assert grow("autograd") > 8 * ACTIVATION          # backprop keeps every block's activations: 6 blocks more
    assert grow("drtp", compiled=compiled, execution="stored") > 6 * ACTIVATION
    assert grow("drtp", compiled=compiled) < ACTIVATION
