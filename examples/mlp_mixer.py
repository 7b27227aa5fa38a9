"""An MLP-Mixer on digits: skips, transposes, LayerNorm with frozen statistics, and Mono-Forward heads.

    python examples/mlp_mixer.py  # about a minute

The Mixer (paper 002, eq. 44-47) has residual sums, token-mixing transposes and LayerNorm. Its
feedback rules are exact except LayerNorm's, which freezes the normalising statistics: ``verify``
shows those rows as "frozen-statistics" with their known residual, every other rule at ~1e-16.
Then TJML-DTP and Mono-Forward ("mf": a class head per unit, no backward pass through the
network) train it; Mono-Forward predicts from its last head or the sum of all heads.
FBCOMPILE_EXAMPLE_QUICK=1 makes it a seconds-long run.
"""
import os
from dataclasses import replace

import torch

import fbcompile
from fbcompile.data import load_dataset
from fbcompile.models import build_model
from fbcompile.training import Trainer

QUICK = bool(os.environ.get("FBCOMPILE_EXAMPLE_QUICK"))
data = load_dataset("digits")
if QUICK:
    data = replace(data, train_x=data.train_x[:256], train_y=data.train_y[:256])


def mixer():
    # 2x2 patches of 4x4 pixels -> 4 tokens of width 32; two Mixer blocks; mean over tokens; head
    return build_model("mixer", data.input_shape, 10, patch=4, dim=32, hidden=64, blocks=2)


torch.manual_seed(0)
program = fbcompile.compile(mixer().double(), data.train_x[:2].double())
print(f"{len(program.units)} units:", ", ".join(unit.name for unit in program.units))
report = fbcompile.verify(program, data.train_x[:2].double(), units=False)
for kind in ("exact", "frozen-statistics"):
    rows = [r for r in report.rows if r["kind"] == kind]
    worst = max((r["tjml_rel"] for r in rows), default=0.0)
    print(f"{len(rows):2d} {kind} rules ({', '.join(sorted({r['op'] for r in rows}))}): "
          f"worst relative TJML {worst:.1e}")

for algorithm, predict in [("dtp", {}), ("mf", {"mode": "final"}), ("mf", {"mode": "cumulative"})]:
    torch.manual_seed(0)
    model = mixer()
    learner = fbcompile.learner(fbcompile.compile(model, data.train_x[:2]), algorithm)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    name = algorithm + (f" ({predict['mode']} head)" if predict else "")
    trainer = Trainer(learner, optimizer, data, batch_size=64, predict=predict, progress=not QUICK,
                      log=lambda line, name=name: print(f"{name:22s} {line}"))
    trainer.fit(1 if QUICK else 8)
