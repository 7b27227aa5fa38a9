"""Teach fbcompile a new learning algorithm from user code, without touching the package.

"scaled-fa": feedback alignment whose fixed random feedback matrices are scaled by ``gain``
(B = gain * R, R drawn like FA's), so the hidden layers learn from gain-times-smaller (or larger)
errors than FA's. The learner fills in one method of the :class:`fbcompile.runtime.Learner`
template: ``compute`` returns the step's {parameter name: update}; ``step`` runs it inside a
transaction (a failed step changes nothing the learner owns, R included), checks the updates are
finite and adds them to ``.grad``, so any torch optimizer applies.

Run it: ``python examples/custom_algorithm.py`` (a few epochs on sklearn's 8x8 digits, offline).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import fbcompile
from fbcompile.runtime import Learner, StepResult
from fbcompile.runtime.feedback_weights import FeedbackWeights
from fbcompile.runtime.losses import output_error
from fbcompile.runtime.options import Option, positive


@fbcompile.register_algorithm(replace=True)      # replace=True: safe to run twice in one process
class ScaledFeedbackAlignment(Learner):
    """FA with B = gain * R: fixed random feedback matrices R (seeded, one per weight), scaled."""
    name = "scaled-fa"
    OPTIONS = {"gain": Option(0.5, positive, "scale of the fixed random feedback matrices")}

    def __init__(self, program, **options):
        super().__init__(program, **options)
        self.feedback = FeedbackWeights(program, init="kaiming", scale=1.0, seed=self.options["seed"], trainable=False)
        self.executable = program.executable("error")     # its forward saves what the error graph reads

    def compute(self, inputs, targets, loss_fn):
        gain = self.options["gain"]
        with torch.no_grad():
            output, taps = self.executable.run_forward(inputs)   # forward, keeping what the feedback reads
        loss, errors = output_error(output, targets, loss_fn)    # e = dL/d output
        weights = {key: gain * r for key, r in self.feedback.mapping().items()}
        with torch.no_grad():     # the compiled error graph, B in place of W; keep_for=(): taps handed over, each freed
            _, grads = self.executable.run_feedback("error", errors, taps, weights, returns="params", keep_for=())
        return StepResult(float(loss), output), dict(zip(self.program.feedback["error"].params, grads))

    def extra_state(self):
        return {"feedback": self.feedback.state_dict()}

    def load_extra_state(self, state):
        self.feedback.load_state_dict(state["feedback"])


def main():
    quick = os.environ.get("FBCOMPILE_EXAMPLE_QUICK") == "1"
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    learner = fbcompile.learner(fbcompile.compile(model, x_train[:2]), "scaled-fa", gain=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(2 if quick else 5):
        for batch in torch.randperm(len(x_train)).split(64):
            optimizer.zero_grad()
            result = learner.step(x_train[batch], y_train[batch], F.cross_entropy)
            optimizer.step()
        accuracy = (learner.predict(x_test).argmax(1) == y_test).float().mean().item()
        print(f"epoch {epoch + 1}: loss {result.loss:.3f}, test accuracy {accuracy:.3f} "
              f"(executor {result.details['executor']!r})")
    print(f"scaled-fa test accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
