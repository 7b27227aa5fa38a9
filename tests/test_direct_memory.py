"""Update-unlocked direct learning: live memory must not grow with depth (issue 4).

Measured as in examples/bench_direct.py (:func:`fbcompile.bench.memory_ledger`): the peak of the
running sum of the profiler's self memory events during one step, minus what the step leaves
allocated (the new ``.grad`` tensors, which grow with depth in every algorithm). What is left is the
step's working memory: a few activations when each unit's are freed after its update, all of them
when the step keeps one forward's activations."""
import pytest
import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.bench import memory_ledger
from fbcompile.models import build_model


def _working_memory(algorithm: str, depth: int, **options) -> int:
    torch.manual_seed(0)
    model = build_model("mlp", (64,), 10, width=128, depth=depth, act="tanh")
    x, y = torch.randn(1024, 64), torch.randint(0, 10, (1024,))
    learner = fbcompile.learner(fbcompile.compile(model, x[:2]), algorithm, **options)
    learner.step(x, y, F.cross_entropy)            # warm-up: the generated update graphs
    model.zero_grad(set_to_none=True)
    peak, net = memory_ledger(lambda: learner.step(x, y, F.cross_entropy))
    return peak - net


@pytest.mark.parametrize("algorithm", ["drtp", "shallow"])
def test_update_unlocked_working_memory_does_not_grow_with_depth(algorithm):
    unlocked = {depth: _working_memory(algorithm, depth) for depth in (2, 8)}
    stored = {depth: _working_memory(algorithm, depth, execution="stored") for depth in (2, 8)}
    activation = 1024 * 128 * 4
    assert unlocked[8] <= unlocked[2] + activation // 2, (unlocked, stored)
    assert stored[8] >= stored[2] + 4 * activation, (unlocked, stored)     # the measure sees growth
