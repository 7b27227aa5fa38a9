"""What examples/transformer.py and examples/recurrent.py share: the digits data (cut to a few
samples in quick mode), the float64 check of error mode against autograd, and training each
algorithm from the same initialisation."""
import os
from dataclasses import replace

import torch

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.frontends import frontend_of
from fbcompile.training import Trainer
from fbcompile.verify.checks import autograd_gradients, relative_error

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))


def digits():
    """scikit-learn's digits as 8x8 images; 128 samples per split with FBCOMPILE_EXAMPLE_QUICK=1."""
    data = load_dataset("digits")
    if QUICK:
        data = replace(data, train_x=data.train_x[:128], train_y=data.train_y[:128], test_x=data.test_x[:128],
                       test_y=data.test_y[:128])
    return data


def check_error_mode(make_model, x):
    """Compile ``make_model()`` in float64 at ``x``, print the front end chosen and the relative gap
    between ``propagate_error`` and autograd (input and worst parameter) for a random output error."""
    torch.manual_seed(0)
    model = make_model().double()
    x = x.double()
    program = fbcompile.compile(model, x)
    used, note = frontend_of(program.traced)
    print(f"captured with {used}: {note}")
    error = torch.randn(x.shape[0], 10, dtype=torch.float64)
    reference_input, reference_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, error)
    worst = max(relative_error(p.grad, reference_params[n]) for n, p in model.named_parameters())
    print(f"error mode vs autograd (float64): input {relative_error(ours, reference_input[0]):.1e}, "
          f"worst of {len(reference_params)} parameters {worst:.1e}")


def train_each(make_model, data, rates: dict, epochs: int):
    """Train a fresh ``make_model()`` (seed 0) with each algorithm and Adam at its rate in ``rates``;
    print the epochs and the final test accuracy."""
    for algorithm, lr in rates.items():
        torch.manual_seed(0)
        model = make_model().train()
        learner = fbcompile.learner(fbcompile.compile(model, data.train_x[:2]), algorithm, seed=0)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        trainer = Trainer(learner, optimizer, data, batch_size=64, progress=False,
                          log=lambda line, name=algorithm: print(f"{name:4s} {line}"))
        history = trainer.fit(epochs)
        print(f"{algorithm}: test accuracy {100 * history[-1]['test_accuracy']:.1f}% after {epochs} epoch(s)")
