"""The checks of examples/zoo.py, model by model, with no torchvision in sight: compile and compare
error mode with autograd (float64, exact statistics), the small-beta angle of DTP to BP, one step
of each learner in train mode (each bounded in time), and the table that reports them."""
from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fbcompile
from fbcompile.errors import FBCompileError, UnsupportedOpError
from fbcompile.verify.checks import autograd_gradients, relative_error

LEARNERS = ("bp", "fa", "dtp", "dfa", "drtp", "ddtp-linear", "mf", "mf-dd")
EXACT = 1e-8
CLASSES = 10
BETA = 1e-6


@dataclass
class Result:
    """Everything measured on one model (the JSON record of it is ``asdict``-like, see to_json)."""
    name: str
    input_shape: tuple = ()
    note: str = ""
    parameters: int = 0
    compiled: str = ""                  # "ok", "refused: ...", "untraceable: ...", "CRASH: ..."
    unsupported: list = field(default_factory=list)
    input_error: float | None = None
    param_error: float | None = None
    worst_param: str = ""
    missing: list = field(default_factory=list)     # parameters autograd reaches and fbcompile does not
    exact: bool | None = None
    angle: float | None = None
    angle_error: str = ""
    learners: dict = field(default_factory=dict)   # name -> "ok" / "refused: ..." / "CRASH: ..."
    tracebacks: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def to_json(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _crash(exc: BaseException) -> str:
    return f"CRASH: {type(exc).__name__}: {_short(exc, 200)}"


def _tail(exc: BaseException, lines: int = 12) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-lines:])


def summarize_unsupported(problems, first: int = 3) -> str:
    """'N node(s): op (count), op (count): first reason' for a coverage() list."""
    counts = {}
    for p in problems:
        key = p.canonical or p.target
        counts[key] = counts.get(key, 0) + 1
    ops = ", ".join(f"{k} ({n})" for k, n in list(counts.items())[:6]) + (", ..." if len(counts) > 6 else "")
    reasons = "; ".join(dict.fromkeys(_short(p.reason, 120) for p in problems))
    return _short(f"{len(problems)} node(s): {ops}: {reasons}", 400)


def _randn(shape, generator, like):
    """N(0, 1) draws of ``like``'s dtype on ``like``'s device, drawn where ``generator`` lives (the
    global generator of ``like``'s device without one): a CPU ``torch.Generator()`` cannot draw on
    CUDA, and drawing on the CPU gives every device the numbers a CPU run draws."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def randomize_zero_parameters(model, generator=None, scale=0.05):
    """Give every parameter that is exactly zero everywhere a random value (in place)."""
    names = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not p.any():
                p.copy_(_randn(p.shape, generator, p) * scale)
                names.append(name)
    return names


def compare_error_mode(model, program, x, generator=None):
    """(input relative error, worst parameter relative error, its name, missing parameters) of
    ``program.propagate_error`` against autograd for a random output error (float64)."""
    out = model(x)
    error = _randn(out.shape, generator, out)
    ref_inputs, ref_params = autograd_gradients(model, x, error)
    model.zero_grad(set_to_none=True)
    ours = program.propagate_error(x, error)
    mine = {n: p.grad for n, p in model.named_parameters()}
    worst, worst_name, missing = 0.0, "", []
    for n, g in ref_params.items():
        if g is None:
            continue
        if mine[n] is None:
            if g.any():
                missing.append(n)
            continue
        err = relative_error(mine[n], g)
        if err > worst or not math.isfinite(err):
            worst, worst_name = err, n
    model.zero_grad(set_to_none=True)
    return relative_error(ours, ref_inputs[0]), worst, worst_name, missing


def _update(model, program, x, y, algorithm, **options):
    model.zero_grad(set_to_none=True)
    fbcompile.learner(program, algorithm, **options).step(x, y, F.cross_entropy)
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return torch.cat(grads)


def small_beta_angle(model, program, x, y, beta=BETA):
    """Degrees between the ``dtp`` (beta) and ``bp`` updates of all parameters."""
    bp = _update(model, program, x, y, "bp")
    dtp = _update(model, program, x, y, "dtp", beta=beta)
    if bp.shape != dtp.shape:
        raise RuntimeError(f"bp wrote {bp.numel()} gradient entries and dtp {dtp.numel()}")
    cosine = float(bp @ dtp / (bp.norm() * dtp.norm()))
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine))))


class StepTimeout(BaseException):   # not Exception: library code that catches those must not swallow it
    """A learner step ran past the script's time limit for one step."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise StepTimeout in this (main) thread after ``seconds`` (no limit when 0, inf or off the
    main thread / without SIGALRM). A torch op in progress finishes first."""
    usable = (seconds and math.isfinite(seconds) and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise StepTimeout(f"took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


COMPILE_REFUSED = "refused: train-mode compile: "


class _Stopped(Exception):
    """A check that ended early: ``outcome`` is its table text, ``exc`` the exception of a crash."""

    def __init__(self, outcome: str, exc: BaseException | None = None):
        super().__init__(outcome)
        self.outcome, self.exc = outcome, exc


def _guarded(action, refusal: str):
    """``action()``; an FBCompileError becomes ``refusal`` + its message, anything else a CRASH."""
    try:
        return action()
    except StepTimeout:
        raise
    except FBCompileError as exc:
        raise _Stopped(f"{refusal}{_short(exc, 200)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise _Stopped(_crash(exc), exc) from exc


def _step_outcome(model, learner, x, y) -> str:
    model.zero_grad(set_to_none=True)
    result = learner.step(x, y, F.cross_entropy)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return "step error: no parameter got a gradient"
    if not math.isfinite(result.loss) or not all(torch.isfinite(g).all() for g in grads):
        return "step error: non-finite loss or gradient"
    return "ok"


def learner_step(model, x, y, algorithm, **options):
    """One training step of ``algorithm`` on ``model`` (compiled here, in its current mode and dtype):
    "ok", "refused: ..." (FBCompileError at construction), "step error: ..." (FBCompileError in the
    step), "CRASH: ..." (anything else), and the exception when there was one."""
    try:
        program = _guarded(lambda: fbcompile.compile(model, x), COMPILE_REFUSED)
        learner = _guarded(lambda: fbcompile.learner(program, algorithm, **options), "refused: ")
        return _guarded(lambda: _step_outcome(model, learner, x, y), "step error: "), None
    except _Stopped as stopped:
        return stopped.outcome, stopped.exc


def check_model(name, build, x, *, classes=CLASSES, learners=LEARNERS, skip_learners=False, note="",
                learner_budget=float("inf"), step_timeout=0.0, log=print, seed=0) -> Result:
    """Run checks 1-4 on the model ``build()`` returns (a fresh one per use) with input batch ``x``.

    ``learner_budget``: seconds; once the learner steps have taken longer, the rest are skipped.
    ``step_timeout``: seconds for one learner (compile, construction and step), 0 for no limit."""
    res = Result(name, tuple(x.shape), note)
    clock = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = build()
    res.parameters = sum(p.numel() for p in base.parameters())
    res.seconds["build"] = round(time.perf_counter() - clock, 2)

    # (1) compile, eval, float64, exact statistics
    model = copy.deepcopy(base).eval().double()
    randomize_zero_parameters(model, gen)
    x64 = x.double()
    start = time.perf_counter()
    program = None
    try:
        problems = fbcompile.coverage(model, x64, variants=("exact-statistics",))
        res.unsupported = [str(p) for p in problems]
        if problems:
            res.compiled = "refused: " + summarize_unsupported(problems)
        else:
            program = fbcompile.compile(model, x64, variants=("exact-statistics",))
            res.compiled = "ok"
    except UnsupportedOpError as exc:
        res.compiled = "refused: " + (summarize_unsupported(exc.nodes) if exc.nodes else _short(exc))
    except FBCompileError as exc:
        res.compiled = f"refused: {type(exc).__name__}: {_short(exc)}"
    except Exception as exc:  # noqa: BLE001
        res.compiled, res.tracebacks["compile"] = _crash(exc), _tail(exc)
    res.seconds["compile"] = round(time.perf_counter() - start, 2)
    log(f"  [{name}] compile: {res.compiled[:160]} ({res.seconds['compile']} s)")

    y = torch.randint(0, classes, (x.shape[0],), generator=gen, device=gen.device).to(x.device)
    if program is not None:
        # (2) error mode vs autograd
        start = time.perf_counter()
        try:
            errors = compare_error_mode(model, program, x64, gen)
            res.input_error, res.param_error, res.worst_param, res.missing = errors
            res.exact = (res.input_error < EXACT and res.param_error < EXACT and not res.missing)
        except Exception as exc:  # noqa: BLE001
            res.exact, res.tracebacks["error-mode"] = False, _tail(exc)
            res.compiled = f"ok, error mode {_crash(exc)}"
        res.seconds["error-mode"] = round(time.perf_counter() - start, 2)
        log(f"  [{name}] error mode: input {res.input_error}, worst parameter {res.param_error} "
            f"({res.worst_param}), missing {res.missing} ({res.seconds['error-mode']} s)")
        # (3) small-beta limit
        start = time.perf_counter()
        try:
            res.angle = small_beta_angle(model, program, x64, y)
        except FBCompileError as exc:
            res.angle_error = f"{type(exc).__name__}: {_short(exc, 200)}"
        except Exception as exc:  # noqa: BLE001
            res.angle_error, res.tracebacks["small-beta"] = _crash(exc), _tail(exc)
        res.seconds["small-beta"] = round(time.perf_counter() - start, 2)
        log(f"  [{name}] small-beta angle: {res.angle} {res.angle_error} ({res.seconds['small-beta']} s)")
    del model, program

    # (4) one step of each learner, train mode, float32, fresh copy each
    if not skip_learners:
        spent = 0.0
        for algorithm in learners:
            if spent > learner_budget:
                res.learners[algorithm] = f"skipped (learner budget of {learner_budget:g} s spent)"
                continue
            refusals = [v for v in res.learners.values() if v.startswith(COMPILE_REFUSED)]
            if refusals:    # the same model in the same mode: it would be refused again
                res.learners[algorithm] = refusals[0]
                continue
            start = time.perf_counter()
            torch.manual_seed(seed)
            model = copy.deepcopy(base).float().train()
            try:
                with time_limit(step_timeout):
                    outcome, exc = learner_step(model, x.float(), y, algorithm)
            except StepTimeout as timeout:
                outcome, exc = f"timeout: {timeout}", None
            res.learners[algorithm] = outcome
            if exc is not None:
                res.tracebacks[algorithm] = _tail(exc)
            took = time.perf_counter() - start
            spent += took
            res.seconds[algorithm] = round(took, 2)
            log(f"  [{name}] {algorithm}: {outcome[:160]} ({took:.1f} s)")
    res.seconds["total"] = round(time.perf_counter() - clock, 2)
    return res


# -- the table ----------------------------------------------------------------------------------------------
def _fmt(v):
    return "-" if v is None else f"{v:.1e}"


def exact_cell(r: Result) -> str:
    if r.compiled != "ok":
        return r.compiled
    if r.exact:
        return f"exact (input {_fmt(r.input_error)}, params {_fmt(r.param_error)})"
    missing = f"; no gradient for {len(r.missing)}: {', '.join(r.missing[:4])}" if r.missing else ""
    return f"NOT exact (input {_fmt(r.input_error)}, worst param {_fmt(r.param_error)} {r.worst_param}{missing})"


def angle_cell(r: Result) -> str:
    if r.angle is not None:
        return f"{r.angle:.4f} deg" if r.angle >= 1e-3 or r.angle == 0 else f"{r.angle:.1e} deg"
    return r.angle_error or "-"


def learners_cell(r: Result) -> str:
    """'all 8', or 'k/n (those that ran)' followed by the others grouped by outcome."""
    if not r.learners:
        return "skipped"
    ok = [a for a, v in r.learners.items() if v == "ok"]
    if len(ok) == len(r.learners):
        return f"all {len(ok)}"
    groups = {}
    for algorithm, outcome in r.learners.items():
        if outcome != "ok":
            groups.setdefault(outcome, []).append(algorithm)
    head = f"{len(ok)}/{len(r.learners)}" + (f" ({', '.join(ok)})" if ok else "")
    return "; ".join([head, *(f"{', '.join(names)}: {_short(outcome, 140)}" for outcome, names in groups.items())])


def table(results) -> str:
    lines = ["| model family | input | compiles exactly | small-beta angle | learners that run | seconds |",
             "|---|---|---|---|---|---|"]
    for r in results:
        cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
        name = r.name + (f" ({r.note})" if r.note else "")
        shape = "x".join(map(str, r.input_shape))
        lines.append(f"| {cell(name)} | {shape} | {cell(exact_cell(r))} | {cell(angle_cell(r))} | "
                     f"{cell(learners_cell(r))} | {r.seconds.get('total', '-')} |")
    return "\n".join(lines)


# -- the command line -------------------------------------------------------------------------------------
