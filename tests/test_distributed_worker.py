"""One rank of the data-parallel checks of tests/test_distributed.py (run as a script, two processes,
gloo on CPU). Holds no tests itself: it writes what it found to OUT/rank{r}.json.

usage: python test_distributed_worker.py RANK WORLD INIT_FILE OUT
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fbcompile
from fbcompile.errors import FBCompileError

# Learners whose step is deterministic: R ranks on equal shards equal one process on the whole batch.
EQUAL = [("bp", {}), ("fa", {}), ("dtp", {"feedback": "analytic"}), ("dtp", {"feedback": "random"}),
         ("dfa", {}), ("sdfa", {}), ("drtp", {}), ("drtp", {"execution": "stored"}), ("shallow", {}),
         ("mf", {}), ("mf-dd", {}), ("mf-dd", {"update": "immediate", "lr": 0.05})]
# ... and the learners with noise or learned feedback, which must at least keep the ranks identical.
IDENTICAL = EQUAL + [("dtp", {"feedback": "lrl"}), ("dtp", {"feedback": "drl"}),
                     ("dtp", {"feedback": "ldrl", "feedback_steps": 3}), ("ddtp-linear", {}), ("ddtp-rhl", {})]
BATCH, SHARD = 8, 4


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 4)).double()


def data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 4, (BATCH,), generator=generator))


def build(algo: str, options: dict, group, seed: int = 0):
    model = mlp(seed)
    program = fbcompile.compile(model, torch.zeros(2, 6, dtype=torch.float64))
    extra = {} if group is None else {"process_group": group}
    return model, fbcompile.learner(program, algo, **options, **extra)


def state_tensors(model, learner) -> torch.Tensor:
    """Every parameter, buffer and learner-state tensor, flattened (for a bitwise comparison)."""
    parts = [p.detach().reshape(-1).double() for p in model.parameters()]
    parts += [p.grad.reshape(-1).double() for p in model.parameters() if p.grad is not None]

    def walk(value):
        if torch.is_tensor(value) and value.is_floating_point():
            parts.append(value.detach().reshape(-1).double())
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)
    walk(learner.state_dict())
    return torch.cat(parts)


def same_on_all_ranks(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return all(torch.equal(gathered[0], t) for t in gathered)


def check_equal(rank: int) -> dict:
    """max |grad(R ranks, shards) - grad(one process, whole batch)| per learner (and the params for
    mf-dd immediate, which applies its own steps; and learner state: heads after their optimizer)."""
    x, y = data()
    shard = slice(rank * SHARD, (rank + 1) * SHARD)
    found = {}
    for algo, options in EQUAL:
        model, learner = build(algo, options, "world")
        reference_model, reference = build(algo, options, None)
        learner.step(x[shard], y[shard], F.cross_entropy)
        reference.step(x, y, F.cross_entropy)
        worst, compared = 0.0, 0
        for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
            assert (p.grad is None) == (q.grad is None), (algo, name)
            if p.grad is not None:
                worst, compared = max(worst, float((p.grad - q.grad).abs().max())), compared + 1
            worst = max(worst, float((p - q).abs().max()))
        mine, theirs = state_tensors(model, learner), state_tensors(reference_model, reference)
        worst = max(worst, float((mine - theirs).abs().max()))
        found[f"{algo}{options}"] = {"worst": worst, "compared": compared}
    return found


def check_identical(rank: int) -> dict:
    """Three SGD steps on different shards: every rank's model, .grad and learner state bitwise equal."""
    x, y = data(seed=2 + rank)
    found = {}
    for algo, options in IDENTICAL:
        model, learner = build(algo, options, "world")
        found["default overlap"] = learner.communicator.overlap
        learner.communicator.overlap = True       # off by default on gloo: exercise the launches here
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            learner.step(x[:SHARD], y[:SHARD], F.cross_entropy)
            optimizer.step()
        found[f"{algo}{options}"] = same_on_all_ranks(state_tensors(model, learner))
        found[f"{algo}{options} overlapped"] = learner.communicator.overlapped
    return found


def check_failure(rank: int) -> dict:
    """One good step, then a step that fails on rank 1 only: both raise, nothing changes on either
    (with the overlap on, so rank 1 drains the buckets rank 0 launched)."""
    x, y = data()
    found = {}
    bad_x = {"nan": x[:SHARD].clone().fill_(float("nan")), "shape": torch.zeros(SHARD, 5, dtype=torch.float64)}
    cases = [("bp", {}, "nan"), ("drtp", {}, "nan"), ("drtp", {}, "shape"), ("drtp", {"execution": "stored"}, "nan"),
             ("mf", {}, "nan"), ("dtp", {"feedback": "ldrl", "feedback_steps": 2}, "nan"), ("mf-dd", {}, "nan")]
    for algo, options, kind in cases:
        model, learner = build(algo, options, "world")
        learner.communicator.overlap = True   # the good step records the schedule the failing one drains
        learner.step(x[:SHARD], y[:SHARD], F.cross_entropy)
        before = state_tensors(model, learner).clone()
        steps = learner.steps
        inputs = bad_x[kind] if rank == 1 else x[SHARD:]
        try:
            learner.step(inputs, y[:SHARD], F.cross_entropy)
            message = None
        except FBCompileError as exc:
            message = str(exc)
        unchanged = torch.equal(before, state_tensors(model, learner)) and learner.steps == steps
        # and the group still works: a good step afterwards keeps the ranks identical
        learner.step(x[:SHARD], y[:SHARD], F.cross_entropy)
        found[f"{algo}{options}-{kind}"] = {"message": message, "unchanged": unchanged,
                                            "after": same_on_all_ranks(state_tensors(model, learner))}
    return found


def check_in_step(rank: int) -> dict:
    """In-step updates (step(optimizer=)) on shards: two Adam steps equal one process's default step
    + optimizer.step() on the whole batch, the ranks stay identical, and a step failing on rank 1
    only raises on both and changes nothing."""
    x, y = data()
    shard = slice(rank * SHARD, (rank + 1) * SHARD)
    found = {}
    for algo in ("drtp", "mf"):
        model, learner = build(algo, {}, "world")
        reference_model, reference = build(algo, {}, None)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        reference_optimizer = torch.optim.Adam(reference_model.parameters(), lr=0.01)
        for _ in range(2):
            optimizer.zero_grad()
            learner.step(x[shard], y[shard], F.cross_entropy, optimizer=optimizer)
            reference_optimizer.zero_grad()
            reference.step(x, y, F.cross_entropy)
            reference_optimizer.step()
        worst = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference_model.parameters()))
        moved = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), mlp().parameters()))
        before = state_tensors(model, learner).clone()
        bad = x[shard].clone().fill_(float("nan")) if rank == 1 else x[shard]
        try:
            learner.step(bad, y[shard], F.cross_entropy, optimizer=optimizer)
            message = None
        except FBCompileError as exc:
            message = str(exc)
        found[algo] = {"worst": worst, "moved": moved, "message": message,
                       "unchanged": torch.equal(before, state_tensors(model, learner)),
                       "identical": same_on_all_ranks(state_tensors(model, learner))}
    return found


def check_fingerprint(rank: int) -> str | None:
    try:
        build("dfa", {"projection_init": "xavier_uniform" if rank == 1 else "he_uniform"}, "world")
    except FBCompileError as exc:
        return str(exc)
    return None


def check_group_references(rank: int) -> list:
    """References to the default process group before and after a learner has been built and has
    stepped with process_group="world": equal when the learner does not hold the group (gloo's
    C++ group must die at destroy_process_group(), not at interpreter teardown, where destroying
    it can abort the process)."""
    before = sys.getrefcount(dist.group.WORLD)
    model, learner = build("drtp", {}, "world")
    x, y = data()
    learner.step(x[rank::2], y[rank::2], F.cross_entropy)
    return [before, sys.getrefcount(dist.group.WORLD)]


def sync_batchnorm_programs() -> dict:
    """SyncBatchNorm models compiled BEFORE the process group exists: compiling runs the model once,
    and torch's own SyncBatchNorm.forward refuses CPU inputs once torch.distributed is initialised
    (on GPUs with NCCL it may be compiled at any time); the compiled forward uses the rule's own."""
    x, _ = data()

    def model_of(sync: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Tanh(), nn.Linear(10, 4)).double()
        return nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync else model

    return {(algo, sync): fbcompile.compile(model_of(sync), x[:2]) for algo in ("bp", "dfa", "dtp")
            for sync in (True, False)}


def check_sync_batchnorm(rank: int, programs: dict) -> dict:
    """With SyncBatchNorm the normalisation uses the global batch statistics, so two shards equal
    one process on the whole batch with BatchNorm (gradients and running statistics)."""
    x, y = data()
    shard = slice(rank * SHARD, (rank + 1) * SHARD)
    found = {}
    for algo in ("bp", "dfa", "dtp"):
        program, reference_program = programs[(algo, True)], programs[(algo, False)]
        assert any(isinstance(m, nn.SyncBatchNorm) for m in program.model.modules())
        learner = fbcompile.learner(program, algo, process_group="world")
        reference = fbcompile.learner(reference_program, algo)
        learner.step(x[shard], y[shard], F.cross_entropy)
        reference.step(x, y, F.cross_entropy)
        pairs = list(zip(program.model.parameters(), reference_program.model.parameters()))
        worst = max(float((p.grad - q.grad).abs().max()) for p, q in pairs)
        stats = max(float((a - b).abs().max()) for a, b in zip(program.model.buffers(), reference_program.model.buffers())
                    if a.is_floating_point())
        found[algo] = {"worst": worst, "running_stats": stats}
    return found


def check_resume(rank: int, out: str) -> dict:
    """A checkpoint written at 2 ranks (by rank 0) resumes at 2 ranks and at 1 process; the two
    continuations agree (equal shards: one process on the whole batch is the same training)."""
    from fbcompile.data.dataset import Dataset
    from fbcompile.training import Trainer, load_checkpoint
    generator = torch.Generator().manual_seed(5)
    x, test_x = torch.randn(32, 6, generator=generator), torch.randn(16, 6, generator=generator)
    dataset = Dataset("toy", x, torch.randint(0, 4, (32,), generator=generator), test_x,
                      torch.randint(0, 4, (16,), generator=generator), 4, (6,), "classification")

    def trainer(group, directory):
        model = mlp().float()
        learner = fbcompile.learner(fbcompile.compile(model, x[:2]), "bp",
                                    **({} if group is None else {"process_group": group}))
        return Trainer(learner, torch.optim.SGD(model.parameters(), lr=0.2), dataset, batch_size=8, seed=3,
                       out_dir=directory, progress=False, log=None)

    trainer("world", f"{out}/run").fit(1)
    dist.barrier()                       # rank 0 has written the checkpoint
    state = load_checkpoint(f"{out}/run")
    two = trainer("world", None)
    two.restore(state)
    two.fit(2)
    parameters = torch.cat([p.detach().reshape(-1) for p in two.model.parameters()])
    found = {"identical": same_on_all_ranks(parameters), "epochs": two.epoch}
    if rank == 0:
        one = trainer(None, None)
        one.restore(state)
        one.fit(2)
        other = torch.cat([p.detach().reshape(-1) for p in one.model.parameters()])
        found.update(worst=float((parameters - other).abs().max()), moved=float((parameters - state_parameters(state)).abs().max()),
                     history=[len(two.history), len(one.history)])
    return found


def state_parameters(state: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for k, v in state["model"].items() if k.endswith(("weight", "bias"))])


def main() -> None:
    rank, world, init, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    programs = sync_batchnorm_programs()
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    report = {}
    try:
        report["equal"] = check_equal(rank)
        report["identical"] = check_identical(rank)
        report["failure"] = check_failure(rank)
        report["in_step"] = check_in_step(rank)
        report["fingerprint"] = check_fingerprint(rank)
        report["group_references"] = check_group_references(rank)
        report["sync_batchnorm"] = check_sync_batchnorm(rank, programs)
        report["resume"] = check_resume(rank, out)
    finally:
        with open(f"{out}/rank{rank}.json", "w") as stream:
            json.dump(report, stream)
        dist.barrier()                   # no rank tears gloo down while the other is still in a collective
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
