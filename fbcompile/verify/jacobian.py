"""Jacobian matching losses of a :class:`~fbcompile.verify.evaluate.Problem` (paper 002, eq. 12-14):

    TJML = ||J_G - J_F^T||_F,   PJML = ||J_G - J_F^+||_F,   IJML = ||J_G - J_F^-1||_F.

Dense: the rows of J_F come from ``torch.func.vjp`` applied to output basis vectors and the
matching rows of J_G^T from the feedback map applied to the same basis vectors (both vmapped, a
chunk of the basis at a time), so TJML is accumulated without holding either matrix. PJML and IJML
need the whole matrices and are computed when n_out * n_in <= ``pinv_limit``.

Randomized (above ``dense_limit``): with probes v ~ N(0, I) in output space,
E ||(J_G - J_F^T) v||^2 = TJML^2 (Hutchinson), so the mean over the probes estimates TJML^2;
its standard error is std / sqrt(probes) and is reported for TJML by the delta method.
"""
from __future__ import annotations

import math

import torch
from torch.func import jvp, vjp, vmap

from ..errors import OptionError


def _split(flat: torch.Tensor, shapes: list) -> tuple:
    """(k, n) rows -> tuple of (k, *shape) tensors."""
    sizes = [math.prod(s) for s in shapes]
    return tuple(part.reshape((flat.shape[0],) + tuple(s)) for part, s in zip(flat.split(sizes, dim=1), shapes))


def _flat(parts: tuple, k: int | None = None) -> torch.Tensor:
    """One flat tensor (rows of length n when ``k`` is given); a single part is only reshaped."""
    flat = [p.reshape(-1) if k is None else p.reshape(k, -1) for p in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=0 if k is None else 1)


def _basis(start: int, k: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Rows ``start .. start + k`` of the n x n identity."""
    basis = torch.zeros(k, n, dtype=like.dtype, device=like.device)
    basis.diagonal(offset=start).fill_(1)
    return basis


def dense_metrics(problem, *, chunk: int = 512, pinv_limit: int = 1 << 18) -> dict:
    """Dense TJML (and PJML/IJML for small nodes), chunk by chunk over the smaller side.

    Over the output basis (n_out <= n_in): rows of J_F by vjp of F, rows of J_G^T by G itself.
    Over the input basis (n_in < n_out): columns of J_F by jvp of F, the same columns of J_G^T by
    vjp of G (G is linear, so its vjp is J_G^T). A ``reverse_only`` problem always goes over the
    output basis (its reference J_F^T is autograd's vjp, or F has no forward-mode derivative)."""
    like = problem.inputs[0]
    n_out, n_in = problem.n_out, problem.n_in
    by_output = n_out <= n_in or problem.reverse_only
    if by_output:
        _, vjp_f = vjp(problem.forward, *problem.inputs)
        zero_out = tuple(torch.zeros(s, dtype=like.dtype, device=like.device) for s in problem.output_shapes)
        side, shapes = n_out, problem.output_shapes
        f_map = lambda *c: vjp_f(c)
        g_map = problem.feedback
    else:
        zero_out = tuple(torch.zeros(s, dtype=like.dtype, device=like.device) for s in problem.output_shapes)
        _, vjp_g = vjp(problem.feedback, *zero_out)
        side, shapes = n_in, [tuple(x.shape) for x in problem.inputs]
        f_map = lambda *t: jvp(problem.forward, tuple(problem.inputs), t)[1]
        g_map = lambda *u: vjp_g(u)
    keep = n_out * n_in <= pinv_limit
    tjml2 = fnorm2 = 0.0
    f_parts, g_parts = [], []
    for start in range(0, side, chunk):
        k = min(chunk, side - start)
        directions = _split(_basis(start, k, side, like), shapes)
        f = _flat(vmap(f_map)(*directions), k)
        g = _flat(vmap(g_map)(*directions), k)
        fnorm2 += float(torch.linalg.vector_norm(f)) ** 2
        if keep:
            f_parts.append(f)
            g_parts.append(g)
            tjml2 += float(torch.linalg.vector_norm(g - f)) ** 2
        else:   # in place: large chunks are memory-bound (f is read before g may alias it)
            tjml2 += float(torch.linalg.vector_norm(g.sub_(f) if g.is_contiguous() else g - f)) ** 2
    result = {"method": "dense", "tjml2": tjml2, "fnorm2": fnorm2, "pjml": None, "ijml": None,
              "pnorm": None, "inorm": None}
    if keep:
        jf, jg_t = torch.cat(f_parts), torch.cat(g_parts)       # J_F and J_G^T, by rows or columns
        if not by_output:
            jf, jg_t = jf.t(), jg_t.t()
        jg = jg_t.t()
        try:
            pinv = torch.linalg.pinv(jf)
        except torch.linalg.LinAlgError:     # the SVD did not converge: report PJML as not computed
            return result
        result["pjml"], result["pnorm"] = float(torch.linalg.norm(jg - pinv)), float(torch.linalg.norm(pinv))
        if n_in == n_out:
            inverse, info = torch.linalg.inv_ex(jf)
            if int(info) == 0 and torch.isfinite(inverse).all() and torch.linalg.cond(jf) < 1e12:
                result["ijml"], result["inorm"] = float(torch.linalg.norm(jg - inverse)), float(torch.linalg.norm(inverse))
    return result


def randomized_metrics(problem, *, probes: int = 8, generator: torch.Generator | None = None) -> dict:
    if probes < 2:
        raise OptionError(f"probes={probes}: randomized estimates need at least 2 probes (8 by default) "
                          "for a standard error")
    like = problem.inputs[0]
    _, vjp_fn = vjp(problem.forward, *problem.inputs)
    errors, norms = [], []
    for _ in range(probes):
        v = tuple(torch.randn(s, dtype=like.dtype, device="cpu", generator=generator).to(like.device) for s in problem.output_shapes)
        a, b = _flat(problem.feedback(*v)), _flat(vjp_fn(v))
        errors.append(float(((a - b) ** 2).sum()))
        norms.append(float((b ** 2).sum()))
    errors_t = torch.tensor(errors, dtype=torch.float64)
    mean, se = float(errors_t.mean()), float(errors_t.std() / math.sqrt(probes))
    return {"method": f"randomized ({probes} probes)", "tjml2": mean, "fnorm2": float(sum(norms) / probes),
            "tjml2_se": se, "pjml": None, "ijml": None, "pnorm": None, "inorm": None}
