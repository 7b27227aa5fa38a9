"""An MLP on scikit-learn's digits, trained by target propagation with analytic feedback (TJML-DTP).

    python examples/mlp.py        # about 20 seconds

The Python API in order: compile (trace the model, derive its feedback graph), explain, verify the
Jacobian matching in float64, then a plain PyTorch training loop in which ``learner.step`` writes
``.grad`` and any torch optimizer applies it. FBCOMPILE_EXAMPLE_QUICK=1 makes it a seconds-long run.
"""
import copy
import os

import torch
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.data import batches, load_dataset

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))
torch.manual_seed(0)
data = load_dataset("digits")                         # 1,347 train / 450 test images of 1x8x8
train_x, train_y = (data.train_x[:256], data.train_y[:256]) if QUICK else (data.train_x, data.train_y)

model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                      nn.Linear(128, 10))

# 1. Compile: one row per forward node, the rule that answers it, and the generated feedback code.
program = fbcompile.compile(model, train_x[:2])
print(program.explain())
print("\n".join(program.feedback_code.strip().splitlines()[:8]), "\n    ...\n")

# 2. Verify on a float64 copy: every exact rule's feedback Jacobian is the forward Jacobian's transpose.
exact = fbcompile.compile(copy.deepcopy(model).double(), train_x[:2].double())
report = fbcompile.verify(exact, train_x[:2].double())
print(report, "\nall exact rules match:", report.ok(1e-8), "\n")

# 3. Train: the learner computes targets and local updates; the optimizer is ordinary PyTorch.
learner = fbcompile.learner(program, "dtp", beta=0.1)
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
shuffle = torch.Generator().manual_seed(0)
for epoch in range(1 if QUICK else 10):
    for x, y in batches(train_x, train_y, 64, shuffle=True, generator=shuffle):
        optimizer.zero_grad()
        result = learner.step(x, y, F.cross_entropy)
        optimizer.step()
    accuracy = (learner.predict(data.test_x).argmax(1) == data.test_y).float().mean()
    print(f"epoch {epoch + 1}: last batch loss {result.loss:.3f}, test accuracy {accuracy:.1%}")

# 4. How close is each unit's update to backprop's gradient? (angles in degrees; ~0 for TJML-DTP)
print(learner.diagnostics(data.train_x[:64], data.train_y[:64], F.cross_entropy))
