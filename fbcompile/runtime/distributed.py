"""Data-parallel learners on torch.distributed (gloo on CPU, NCCL on GPU; the same code).

A learner made with ``process_group=`` (a ``ProcessGroup``, or ``"world"`` for the default group)
gets a :class:`Communicator`. Rank r steps on its shard X_r (n_r samples) of the global batch and
computes the update U_r of its mean-reduced loss L_r; after ``step()`` every rank's ``.grad`` holds

    U = (1/R) sum_r U_r,

which for equal shards (n_r = N/R) is the update of the whole batch, L = (1/R) sum_r L_r, for every
learner whose update is linear in the per-sample terms (bp, fa, dfa, sdfa, drtp, shallow, mf, mf-dd):
exactly what ``DistributedDataParallel`` gives backprop. Learners that form output targets
t_L = h_L - beta e (option ``beta``: tp, dtp, ddtp-rhl) are not linear in the scale of e (the targets
pass through nonlinear feedback), and e of a shard's mean loss is R times one process's per sample;
so each of their ranks computes with its share of the global loss, (n_r/N) L_r, and the updates are
summed: sum_r U_r = U for any shards. The user's optimizer then keeps the ranks
identical. What the learner steps itself stays identical the same way: every optimizer the learner
owns (learned feedback weights, DDTP's Q maps, Mono-Forward heads) has its gradients averaged by a
step pre-hook before it steps, and random feedback matrices, noise and MF-DD's directions come from
the learner's seeded generator, identical on every rank. At construction the model's parameters and
buffers are broadcast from rank 0 (as DDP does) and one all-gather of a fingerprint (algorithm,
options, the traced program, parameter shapes) refuses a group whose ranks built different learners.

Communication is bucketed: the updates are flattened into buckets of at most ``BUCKET_NUMEL``
entries and each bucket is one all-reduce. Update-unlocked learners (drtp, shallow, mf) call
:meth:`Learner.launch_update` as soon as a unit's update exists; that bucket's all-reduce is
launched asynchronously and overlaps the next units' forward; the step waits for it at its end.
That is the default on NCCL (communication on its own stream and links). On gloo the overlap is off
by default (``communicator.overlap = True`` turns it on): gloo runs an all-reduce on the CPU cores
the step computes on, and launching per unit was measured slower than one reduction at the end
(``examples/bench_distributed.py``, 2 ranks on 2 cores: drtp on the 784-5x256-10 MLP 10.8 vs 7.4 ms
per step, on ResNet-18 411 vs 372 ms).

Failures are agreed (:meth:`Communicator.agree`): the step ends with an all-reduce of [failed,
loss], and every synchronous collective inside a step (the learner's optimizers' gradients, MF-DD's
immediate chunk estimates) is preceded by the same flag all-reduce. A rank whose step raised first
launches, with zeros, the asynchronous buckets it had not reached (their sizes are the previous
step's; the first step launches none and reduces everything at its end), then joins the next flag
all-reduce with its flag set; every rank then raises (NonFiniteError or FBCompileError) naming the
failing rank and its message, inside the step's transaction, so no rank's parameters, ``.grad`` or
learner state change. Not covered: a rank failing between the collectives that SyncBatchNorm's
forward and feedback make (rules/sync_norm.py) leaves the others waiting in them until the
backend's timeout.

Teardown: torch._dynamo (which compile() imports) imported after ``init_process_group`` keeps the
default group alive past ``destroy_process_group()``; gloo's threads then outlive it and can abort
the process at exit. Import it (or compile) first, as the CLI's ``launched()`` does.
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..errors import FBCompileError, NonFiniteError, OptionError

BUCKET_NUMEL = 1 << 22        # 4M entries (16 MiB of float32) per all-reduce


def resolve_group(process_group):
    """None (one process), the default group for "world", or the given ProcessGroup."""
    if process_group is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise OptionError("process_group= needs torch.distributed to be initialised first "
                          "(torch.distributed.init_process_group, or run under torchrun)")
    if isinstance(process_group, str):
        if process_group != "world":
            raise OptionError(f"process_group={process_group!r} must be None, 'world' or a ProcessGroup")
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise OptionError(f"process_group must be None, 'world' or a torch.distributed ProcessGroup, "
                          f"not {type(process_group).__name__}")
    return process_group


def fingerprint(learner) -> dict:
    """What every rank must agree on: algorithm, options, the traced program, parameter shapes."""
    program = learner.program
    code = program.traced.code if hasattr(program.traced, "code") else repr(program.traced.graph)
    return {"algorithm": learner.name,
            "options": {k: repr(v) for k, v in sorted(learner.options.items())},
            "program": hashlib.sha256(code.encode()).hexdigest()[:16],
            "parameters": [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in program.params.items()],
            "torch": torch.__version__}


def differences(mine: dict, other: dict) -> list:
    """Readable differences between two fingerprints."""
    found = []
    for key in mine:
        if key == "options":
            for name in sorted(set(mine[key]) | set(other[key])):
                if mine[key].get(name) != other[key].get(name):
                    found.append(f"option {name}: {mine[key].get(name)} vs {other[key].get(name)}")
        elif key == "parameters" and mine[key] != other.get(key):
            pairs = list(zip(mine[key], other[key]))
            first = next((pair for pair in pairs if pair[0] != pair[1]), None)
            found.append(f"parameter {first[0][0]} {first[0][1:]} vs {first[1][0]} {first[1][1:]}" if first else
                         f"the number of parameters: {len(mine[key])} vs {len(other[key])}")
        elif mine[key] != other.get(key):
            what = {"program": "the traced program (hash)"}.get(key, key)
            found.append(f"{what}: {_short(mine[key])} vs {_short(other.get(key))}")
    return found


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Communicator:
    """The collectives of one learner's data-parallel steps (see the module docstring)."""

    def __init__(self, learner, group):
        # The default group is looked up at each use, not held: a reference held here would keep gloo's
        # C++ process group (and its worker threads) alive past destroy_process_group() until the
        # interpreter's teardown, where destroying it can abort the process ("terminate called
        # without an active exception", about one run in thirty of two ranks).
        self._group = None if group is dist.group.WORLD else group
        self.learner = learner
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.device = next((p.device for p in learner.program.params.values()), torch.device("cpu"))
        if dist.get_backend(group) == "nccl" and self.device.type != "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.active = False            # inside a step
        # launch_update starts all-reduces at once (False: all at the end); see the module docstring
        self.overlap = dist.get_backend(group) != "gloo"
        self.launched = []             # (names, tensors, flat buffer, work) of this step's async buckets
        self.schedule = None           # (numel, dtype) of the async buckets of the last completed step
        self.overlapped = 0            # buckets the last step launched before its end
        self.sizes = []                # those of this step
        self.wait_seconds = 0.0        # time blocked on communication: launches and waits (all steps)
        self.check_fingerprint()
        self.broadcast_model()

    @property
    def group(self):
        """The process group: the one given, or the default group as it is now."""
        return dist.group.WORLD if self._group is None else self._group

    # -- construction -------------------------------------------------------------------------------
    def check_fingerprint(self) -> None:
        mine = fingerprint(self.learner)
        gathered = [None] * self.world
        dist.all_gather_object(gathered, mine, group=self.group)
        for rank, other in enumerate(gathered):
            found = differences(gathered[0], other)
            if found:
                raise FBCompileError(f"the ranks of the process group built different learners: rank {rank} "
                                     f"differs from rank 0 in {'; '.join(found[:4])}; every rank must compile the "
                                     "same model with the same algorithm and options")

    def broadcast_model(self) -> None:
        """Rank 0's parameters and buffers on every rank (as DistributedDataParallel does)."""
        model = self.learner.model
        tensors = [t for t in (*model.parameters(), *model.buffers())]
        root = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
        with torch.no_grad():
            for tensor in tensors:
                staged = self._stage(tensor.detach().clone())
                dist.broadcast(staged, root, group=self.group)
                tensor.copy_(staged.to(tensor.device))

    # -- one step -----------------------------------------------------------------------------------
    def run_step(self, compute, loss_fn, batch: int, shared_loss: bool = False):
        """``compute(loss_fn) -> (StepResult, updates)`` on this rank's shard, agreed and averaged.

        Default: the updates U_r of the shard's mean loss L_r are averaged, (1/R) sum_r U_r, the
        whole batch's update for equal shards of a learner linear in the output error. With
        ``shared_loss`` (learners forming targets h_L - beta e, whose update is not linear in the
        scale of e) each rank computes with its share of the global loss, (n_r/N) L_r (the same
        per-sample e as one process on the whole batch, so the same targets), and the updates are
        summed: sum_r U_r, the whole batch's update for any shards. The result's loss is the global
        mean loss (1/N) sum_i l_i (for equal shards under the default)."""
        self.active, self.launched, self.sizes = True, [], []
        hook = register_optimizer_step_pre_hook(self._optimizer_hook)
        try:
            scale = 1.0 / self.world
            if shared_loss:
                share = batch / self._sum_scalar(float(batch))
                loss_fn, scale = _scaled(loss_fn, share), 1.0
            try:
                result, updates = compute(loss_fn)
            except Exception as exc:      # noqa: BLE001  (any failure is agreed, then re-raised everywhere)
                if getattr(exc, "agreed_across_ranks", False):
                    self.drain(launch=False)
                    raise
                self.drain()
                self.agree(exc, 0.0)
                raise                     # agree() raised; kept for clarity
            result.loss = self.agree(None, result.loss * scale)
            updates = self.finish(updates, scale)
            self.schedule = list(self.sizes)
            result.details["world_size"] = self.world
            return result, updates
        finally:
            hook.remove()
            self.active = False

    def agree(self, error, term: float) -> float:
        """All-reduce [failed, term]; raise on every rank if any rank failed, naming it; else the sum
        of the terms."""
        state = torch.tensor([0.0 if error is None else 1.0, float(term) if error is None else 0.0],
                             dtype=torch.float64)
        staged = self._stage(state)
        self._timed(lambda: dist.all_reduce(staged, group=self.group), staged)
        state = staged.cpu()
        if state[0].item() == 0:
            return state[1].item()
        messages = [None] * self.world
        mine = None if error is None else (type(error).__name__, str(error))
        dist.all_gather_object(messages, mine, group=self.group)
        failed = [(rank, found) for rank, found in enumerate(messages) if found is not None]
        rank, (kind, text) = failed[0]
        where = " (this rank)" if rank == self.rank else ""
        cls = NonFiniteError if kind == "NonFiniteError" else FBCompileError
        agreed = cls(f"the step failed on {len(failed)} of {self.world} ranks; rank {rank}{where}: {kind}: {text} "
                     "(nothing was changed on any rank)")
        agreed.agreed_across_ranks = True
        raise agreed from error

    def check(self) -> None:
        """The failure-flag all-reduce that precedes a collective made during a step."""
        self.agree(None, 0.0)

    # -- averaging ------------------------------------------------------------------------------------
    def average(self, tensors: list, scale: float | None = None) -> list:
        """The ranks' mean of each tensor (``scale`` times their sum; bucketed, synchronous); None
        entries stay None."""
        present = [i for i, t in enumerate(tensors) if t is not None]
        reduced = self._reduce_buckets([tensors[i] for i in present], 1.0 / self.world if scale is None else scale)
        out = [None] * len(tensors)
        for i, value in zip(present, reduced):
            out[i] = value
        return out

    def average_checked(self, tensors: list) -> list:
        """:meth:`average` during a step, after the failure flag (used between a step's phases)."""
        if self.active:
            self.check()
        return self.average(tensors)

    def launch(self, names: list, updates: dict) -> None:
        """Start the all-reduce of the updates of ``names`` now (asynchronously); waited in finish."""
        if not (self.active and self.overlap):
            return
        names = [n for n in names if updates.get(n) is not None]
        if not names:
            return
        tensors = [updates[n] for n in names]
        size = (sum(t.numel() for t in tensors), tensors[0].dtype)
        position = len(self.sizes)
        self.sizes.append(size)      # this step's sizes: the next step's schedule
        scheduled = self.schedule is not None and position < len(self.schedule) and self.schedule[position] == size
        if not scheduled or len(self.launched) != position:
            # no agreed schedule (first step, or the sizes changed; then none after it either, so the
            # launched buckets stay a prefix of the schedule, which drain() relies on): sync at the end
            return
        flat = self._stage(torch.cat([t.reshape(-1).to(size[1]) for t in tensors]))
        work = self._start(flat)
        self.launched.append((names, tensors, flat, work))

    def drain(self, launch: bool = True) -> None:
        """After a failure: launch zeros for the scheduled buckets not reached (the other ranks
        launch them), then wait for all."""
        if launch and self.schedule is not None:
            for numel, dtype in self.schedule[len(self.launched):]:
                zeros = self._stage(torch.zeros(numel, dtype=dtype))
                self.launched.append(([], [], zeros, self._start(zeros)))
        for *_, work in self.launched:
            work.wait()
        self.launched = []

    def finish(self, updates: dict, scale: float) -> dict:
        """Wait for the launched buckets and reduce everything else: ``scale`` sum_r U_r."""
        averaged, launched = dict(updates), {}
        self.overlapped = len(self.launched)
        for names, tensors, flat, work in self.launched:
            self._timed(work.wait, flat)
            flat = flat.to(tensors[0].device) * scale
            for name, tensor, piece in zip(names, tensors, flat.split([t.numel() for t in tensors])):
                launched[name] = (tensor, piece.view_as(tensor).to(tensor.dtype))
        self.launched = []
        rest = []            # names not launched, or changed after their launch (a shared parameter)
        for name in updates:
            if name not in launched:
                rest.append((name, updates[name]))
            elif updates[name] is not launched[name][0]:
                rest.append((name, updates[name] - launched[name][0]))
        reduced = self.average([u for _, u in rest], scale)
        for (name, _), value in zip(rest, reduced):
            averaged[name] = value
        for name, (_, value) in launched.items():
            averaged[name] = value if name not in dict(rest) else averaged[name] + value
        return averaged

    # -- the learner's own optimizers -------------------------------------------------------------------
    def _optimizer_hook(self, optimizer, args, kwargs):
        """Average the gradients an optimizer of the learner is about to apply (during its step)."""
        from .transaction import owned_state
        if not any(optimizer is o for o in owned_state(self.learner).optimizers):
            return None
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        grads = self.average_checked([p.grad for p in params])
        for p, g in zip(params, grads):
            p.grad = g
        return None

    # -- helpers --------------------------------------------------------------------------------------
    def _sum_scalar(self, value: float) -> float:
        total = self._stage(torch.tensor([value], dtype=torch.float64))
        self._timed(lambda: dist.all_reduce(total, group=self.group), total)
        return total.item()

    def _reduce_buckets(self, tensors: list, scale: float) -> list:
        if not tensors:
            return []
        buckets, current, count = [], [], 0
        for index, tensor in enumerate(tensors):
            if current and (count + tensor.numel() > BUCKET_NUMEL or tensor.dtype != tensors[current[0]].dtype):
                buckets.append(current)
                current, count = [], 0
            current.append(index)
            count += tensor.numel()
        buckets.append(current)
        works = []
        for bucket in buckets:
            flat = self._stage(torch.cat([tensors[i].reshape(-1) for i in bucket]))
            works.append((bucket, flat, self._start(flat)))
        out = [None] * len(tensors)
        for bucket, flat, work in works:
            self._timed(work.wait, flat)
            pieces = (flat * scale).split([tensors[i].numel() for i in bucket])
            for i, piece in zip(bucket, pieces):
                out[i] = piece.view_as(tensors[i]).to(tensors[i].device)
        return out

    def _start(self, flat: torch.Tensor):
        """Launch the asynchronous sum of ``flat``; the time the launch blocks counts as waiting
        (gloo does part of the work in the calling thread)."""
        start = time.perf_counter()
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.wait_seconds += time.perf_counter() - start
        return work

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor on the device the backend communicates from (CUDA for NCCL)."""
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def _timed(self, wait, tensor) -> None:
        start = time.perf_counter()
        wait()
        if tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        self.wait_seconds += time.perf_counter() - start


def _scaled(loss_fn, share: float):
    """``loss_fn`` times this rank's share n_r / N of the global batch."""
    def scaled(*args, **kwargs):
        return loss_fn(*args, **kwargs) * share
    return scaled


@contextmanager
def no_communicator(learner):
    """Run a block of ``learner`` as one process (diagnostics on rank 0 alone)."""
    saved, learner.communicator = learner.communicator, None
    try:
        yield
    finally:
        learner.communicator = saved
