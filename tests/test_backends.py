"""torch.compile of the generated feedback modules (``compile(..., backend=...)``): the same
gradients as the uncompiled program (float64), bad backends refused by name."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError, OptionError

from helpers import compare_with_autograd, randomise_vectors, snapshot, same


def _cnn():
    torch.manual_seed(0)
    # no bias before the train-mode BatchNorm: its gradient is identically zero (rounding noise)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
    return randomise_vectors(model.double()).train()


def _grads(model, learner, x, y):
    model.zero_grad(set_to_none=True)
    learner.step(x, y, F.cross_entropy)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_feedback_equals_autograd_and_the_uncompiled_program(backend):
    model, x, y = _cnn(), torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    compiled = fbcompile.compile(model, x, backend=backend)
    assert compiled.backend == backend and compiled.recompile(units="op").backend == backend
    input_rel, param_rel = compare_with_autograd(model, x, program=compiled)
    assert input_rel < 1e-10 and param_rel < 1e-10
    plain = fbcompile.compile(model, x)
    for algorithm in ("bp", "dtp"):
        ours = _grads(model, fbcompile.learner(compiled, algorithm, seed=1), x, y)
        reference = _grads(model, fbcompile.learner(plain, algorithm, seed=1), x, y)
        for name, g in reference.items():
            torch.testing.assert_close(ours[name], g, rtol=1e-10, atol=1e-12)


def test_unknown_backend_is_refused_naming_the_choices():
    model, x = _cnn(), torch.randn(2, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(OptionError, match=r"backend='no-such-backend' is not a torch.compile backend.*inductor"):
        fbcompile.compile(model, x, backend="no-such-backend")


def test_a_failing_backend_raises_fbcompile_error_and_the_step_changes_nothing():
    def broken(graph_module, example_inputs):
        raise RuntimeError("this backend cannot compile anything")

    model, x, y = _cnn(), torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    learner = fbcompile.learner(fbcompile.compile(model, x, backend=broken), "bp")
    before = snapshot(model, learner)
    with pytest.raises(FBCompileError, match=r"backend .*broken.* failed on the 'error' feedback module"):
        learner.step(x, y, F.cross_entropy)
    assert same(snapshot(model, learner), before)
