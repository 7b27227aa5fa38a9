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
import sys

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digit_runs import QUICK, check_error_mode, digits, train_each  # noqa: E402


class RowLSTM(nn.Module):
    """Rows of the image as time steps; the last hidden state classifies."""

    def __init__(self, hidden=32, classes=10):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, hidden, batch_first=True), nn.Linear(hidden, classes)

    def forward(self, images):
        rows = images.flatten(1, 2)            # (batch, 1, 8, 8) -> (batch, 8 rows, 8 pixels)
        output, _ = self.lstm(rows)
        return self.head(output[:, -1])


data = digits()
check_error_mode(RowLSTM, data.train_x[:4])       # 1. error mode against autograd, float64
# 2. each algorithm trains a fresh copy from the same initialisation
train_each(RowLSTM, data, {"bp": 1e-2, "fa": 1e-2, "dtp": 3e-3, "dfa": 3e-3}, epochs=1 if QUICK else 10)
