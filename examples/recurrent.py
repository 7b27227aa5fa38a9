"""An LSTM reading digits row by row (8x8 images as 8 steps of 8 pixels), trained with BP (through
time), FA, DTP and DFA.

    python examples/recurrent.py   # a minute or two on a laptop CPU

torch.fx keeps ``nn.LSTM`` as one opaque call; ``fbcompile.compile`` (frontend="auto") captures the
model with torch.export, which writes the LSTM step by step (fbcompile/frontends/recurrent.py):
linears sharing their weights across the 8 steps, gates and products. Error mode is first checked
against autograd (the module's fused kernel) in float64; then each algorithm trains a fresh copy and
prints test accuracy. FBCOMPILE_EXAMPLE_QUICK=1 makes it a seconds-long run.
"""
import os
from dataclasses import replace

import torch
from torch import nn

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.frontends import frontend_of
from fbcompile.training import Trainer
from fbcompile.verify.checks import autograd_gradients, relative_error

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))


class RowLSTM(nn.Module):
    """Rows of the image as time steps; the last hidden state classifies."""

    def __init__(self, hidden=32, classes=10):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, images):
        rows = images.flatten(1, 2)            # (batch, 1, 8, 8) -> (batch, 8 rows, 8 pixels)
        output, _ = self.lstm(rows)
        return self.head(output[:, -1])


data = load_dataset("digits")
if QUICK:
    data = replace(data, train_x=data.train_x[:128], train_y=data.train_y[:128], test_x=data.test_x[:128],
                   test_y=data.test_y[:128])

# 1. capture and check error mode against autograd, float64
torch.manual_seed(0)
model = RowLSTM().double()
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
EPOCHS = 1 if QUICK else 10
for algorithm, lr in (("bp", 1e-2), ("fa", 1e-2), ("dtp", 3e-3), ("dfa", 3e-3)):
    torch.manual_seed(0)
    model = RowLSTM().train()
    learner = fbcompile.learner(fbcompile.compile(model, data.train_x[:2]), algorithm, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    trainer = Trainer(learner, optimizer, data, batch_size=64, progress=False,
                      log=lambda line, name=algorithm: print(f"{name:4s} {line}"))
    history = trainer.fit(EPOCHS)
    print(f"{algorithm}: test accuracy {100 * history[-1]['test_accuracy']:.1f}% after {EPOCHS} epoch(s)")
