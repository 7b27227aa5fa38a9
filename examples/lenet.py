"""A LeNet-style CNN on digits: analytic feedback for convolutions and max-pooling, three algorithms.

    python examples/lenet.py      # about a minute; writes lenet-curves.png

Convolutions get transposed convolutions as feedback and max-pooling gets max-unpooling with the
forward indices (paper 002's TJML rules); ``verify`` proves both exact in float64. Then BP, TJML-DTP
and DRTP train the same architecture with fbcompile's Trainer (a small epoch loop with metrics), and
the curves go to a PNG. FBCOMPILE_EXAMPLE_QUICK=1 makes it a seconds-long run.
"""
import os
from dataclasses import replace

import torch
from torch import nn

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.plots import training_curves
from fbcompile.training import Trainer

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))
data = load_dataset("digits")                     # 1,347 train / 450 test images of 1x8x8
if QUICK:
    data = replace(data, train_x=data.train_x[:256], train_y=data.train_y[:256])


def lenet():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),        # 6 x 4 x 4
        nn.Conv2d(6, 16, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),       # 16 x 2 x 2
        nn.Flatten(), nn.Linear(64, 84), nn.Tanh(), nn.Linear(84, 10))


torch.manual_seed(0)
exact = fbcompile.compile(lenet().double(), data.train_x[:2].double())
report = fbcompile.verify(exact, data.train_x[:2].double(), units=False)
for row in report.rows:
    print(f"{row['node']:4s} {row['op']:11s} rule {row['rule']:24s} relative TJML {row['tjml_rel']:.1e}")
print("exact:", report.ok(1e-8))

histories = {}
for algorithm, options in [("bp", {}), ("dtp", {"beta": 0.1}), ("drtp", {})]:
    torch.manual_seed(0)
    model = lenet()
    learner = fbcompile.learner(fbcompile.compile(model, data.train_x[:2]), algorithm, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    trainer = Trainer(learner, optimizer, data, batch_size=64, progress=not QUICK,
                      log=lambda line, name=algorithm: print(f"{name:5s} {line}"))
    histories[algorithm] = trainer.fit(1 if QUICK else 8)

print("wrote", training_curves(histories, "lenet-curves.png", title="LeNet-style CNN on digits"))
