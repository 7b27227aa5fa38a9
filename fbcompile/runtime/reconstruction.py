"""Reconstruction losses that train learned feedback weights (x = a unit's input, F_u, G_u the
unit's forward and feedback maps, eps, eta ~ N(0, sigma^2 I), sums over features, means over the
batch):

- LRL (paper 002 eq. 6):  1/2 ||G_u(F_u(x + eps)) - (x + eps)||^2 / sigma^2
- L-DRL (paper 002 eq. 9-11, Alg. 1), with G0 = G_u(F_u(x)):
      [ -eps . (G_u(F_u(x + eps)) - G0) + 1/2 ||G_u(F_u(x) + eta) - G0||^2 ] / sigma^2
  whose minimiser has J_G = J_F^T.
- DRL (paper 003 eq. 10): the noisy x + eps goes through the rest of the network to the output
  and back through the whole difference-corrected feedback chain to x:
      ||g_diff(f(x + eps)) - (x + eps)||^2 / sigma^2
  trains the feedback of the units that read x; its minimiser (with Tikhonov damping, applied as
  weight decay) propagates Gauss-Newton targets, J_G -> J_F^+.

LRL and L-DRL evaluate every unit at once on the cut graphs (each unit on its own inputs); DRL
needs one forward from x and one feedback pass per perturbed value.
"""
from __future__ import annotations

import torch

from ..trace import preserved_state


def _noise(like: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, device="cpu", generator=generator, dtype=like.dtype).to(like.device) * sigma


def _per_sample(squares: torch.Tensor) -> torch.Tensor:
    return squares.reshape(squares.shape[0], -1).sum(1).mean() if squares.dim() else squares


def cut_reconstruction(executable, kind: str, inputs, taps, values: dict, weights: dict, trained: set,
                       sigma: float, generator) -> dict:
    """LRL or L-DRL losses {unit index: loss} for the units in ``trained`` (one pass for all);
    ``taps`` come from ``executable``'s forward, which includes the "unit_target" mode."""
    program = executable.program
    module, in_keys, out_keys = program.cut_forward()
    clean = [values[src].detach() for _, src in in_keys]
    noise = [_noise(x, sigma, generator) if u in trained else torch.zeros_like(x) for (u, _), x in zip(in_keys, clean)]
    with torch.no_grad(), preserved_state(program.model):
        noisy_out = module(*inputs, *[x + n for x, n in zip(clean, noise)])
    targets_at = lambda outs: executable.run_feedback("unit_target", list(outs), taps, weights)[0]
    moved = targets_at(noisy_out)
    losses = {}
    if kind == "lrl":
        for (u, _), r, x, n in zip(in_keys, moved, clean, noise):
            if u in trained and r is not None:
                losses[u] = losses.get(u, 0) + 0.5 * _per_sample((r - (x + n)) ** 2) / sigma ** 2
        return losses
    clean_out = [values[o].detach() for _, o in out_keys]
    base = targets_at(clean_out)
    jitter = targets_at([y + _noise(y, sigma, generator) for y in clean_out])
    for (u, _), r_hat, r_tilde, g0, n in zip(in_keys, moved, jitter, base, noise):
        if u in trained and r_hat is not None:
            inverse_pass = -_per_sample(n * (r_hat - g0))
            round_trip = 0.5 * _per_sample((r_tilde - g0) ** 2)
            losses[u] = losses.get(u, 0) + (inverse_pass + round_trip) / sigma ** 2
    return losses


def difference_reconstruction(executable, inputs, taps, values: dict, weights: dict, source, sigma: float,
                              generator, mode: str = "difference") -> torch.Tensor:
    """DRL loss for the feedback reaching forward value ``source`` (paper 003 eq. 10); ``taps``
    come from ``executable``'s forward, which includes ``mode``."""
    program = executable.program
    x = values[source].detach()
    noise = _noise(x, sigma, generator)
    with torch.no_grad(), preserved_state(program.model):
        outputs = program.resume_forward(source.name)(*inputs, x + noise)
    deltas = [o - values[n].detach() for o, n in zip(outputs, program.outputs)]
    feedback = executable.run_feedback(mode, deltas, taps, weights)[0]
    reconstructed = feedback[program.boundary.index(source)]
    return _per_sample((reconstructed - noise) ** 2) / sigma ** 2
