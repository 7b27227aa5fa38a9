"""Transactions: a step that raises leaves the model and everything the learner owns as they were.

What a learner owns is found on the learner itself, not declared by flags a subclass could inherit
wrongly (:func:`owned_state`): its ``state_dict()`` (step count, seed generator, extra state), and
every ``nn.Module`` (other than the model), optimizer and ``torch.Generator`` among its attributes,
with the generators of those modules. A :class:`Transaction` snapshots all of it and the model's
buffers and the global RNG, and restores them when the block raises.

Frozen parameters of the learner's modules (fixed random projections B_u, fixed feedback weights)
are the one thing a snapshot shares instead of copying: no optimizer steps them, and copying a
conv net's projections every step would cost more than the step. That they stay unchanged is
checked, not assumed: their version counters are compared when the block ends, and a learner that
writes one in place gets an error saying so rather than a rollback that misses it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FBCompileError


@dataclass
class Owned:
    """What a learner owns besides its ``state_dict()``, found on the instance."""
    modules: list            # nn.Modules of the learner (feedback weights, projections, heads, maps)
    optimizers: list         # torch.optim.Optimizer attributes
    generators: list         # torch.Generator attributes of the learner and of its modules
    seed_generator: object   # the learner's own ``generator`` (in its state_dict)

    @property
    def fixed(self) -> list:
        """Frozen parameters of the learner's modules: shared by snapshots, checked unchanged."""
        return [p for m in self.modules for p in m.parameters() if not p.requires_grad]

    @property
    def tensors(self) -> list:
        """Trainable parameters and buffers of the learner's modules: copied by snapshots."""
        return [t for m in self.modules for t in (*m.parameters(), *m.buffers())
                if not (isinstance(t, nn.Parameter) and not t.requires_grad)]

    @property
    def writable(self) -> bool:
        """Whether a step can change any of it: trainable tensors, an optimizer, or a generator of
        its own besides the seed generator (which every rollback restores regardless)."""
        trainable = any(p.requires_grad for m in self.modules for p in m.parameters())
        return trainable or bool(self.optimizers) or any(g is not self.seed_generator for g in self.generators)


def owned_state(learner) -> Owned:
    """What ``learner`` owns (see :class:`Owned`), found again whenever its module, optimizer and
    generator attributes are other objects than at the last call (an optimizer made at the first
    step, a module replaced), and otherwise reused: every step opens a transaction, and the search
    walks every module. (Other attributes, such as the per-step ``last`` record, do not count.)"""
    key = tuple((name, id(value)) for name, value in vars(learner).items() if isinstance(value, _OWNABLE))
    cached = vars(learner).get(_CACHE)
    if cached is None or cached[0] != key:
        cached = (key, _find_owned(learner))
        setattr(learner, _CACHE, cached)
    return cached[1]


_CACHE = "_owned_state_cache"
_OWNABLE = (nn.Module, torch.optim.Optimizer, torch.Generator)


def _find_owned(learner) -> Owned:
    model = learner.model
    model_tensors = {id(t) for t in (*model.parameters(), *model.buffers())}
    modules, optimizers, generators = [], [], []
    for value in vars(learner).values():
        if isinstance(value, nn.Module):
            holds_model = any(id(t) in model_tensors for t in (*value.parameters(), *value.buffers()))
            if value is not model and not holds_model and not any(value is m for m in modules):
                modules.append(value)
        elif isinstance(value, torch.optim.Optimizer):
            optimizers.append(value)
        elif isinstance(value, torch.Generator):
            generators.append(value)
    for module in modules:
        for sub in module.modules():
            generators += [v for v in vars(sub).values() if isinstance(v, torch.Generator)]
    unique = list({id(g): g for g in generators}.values())
    return Owned(modules, optimizers, unique, getattr(learner, "generator", None))


class Transaction:
    """Snapshot the learner's state, what it owns and the model buffers; restore them if the block
    raises (or always, with ``always_restore``: diagnostics run a step that must change nothing)."""

    def __init__(self, learner, always_restore: bool = False):
        self.learner, self.always_restore = learner, always_restore

    def __enter__(self):
        learner = self.learner
        owned = owned_state(learner)
        state = learner.state_dict()
        self.fixed = [(p, p._version) for p in owned.fixed]
        shared = {_key(p) for p, _ in self.fixed}
        if torch.is_tensor(state.get("generator")):
            shared.add(_key(state["generator"]))      # a fresh copy already
        self.state = _snapshot(state, shared)
        in_state = {_key(t) for t in _tensors(state)}
        self.tensors = [(t, t.detach().clone()) for t in owned.tensors if _key(t) not in in_state]
        self.optimizers = [(o, _snapshot(o.state_dict(), set())) for o in owned.optimizers
                           if not o.state or any(_key(t) not in in_state for t in _tensors(o.state_dict()["state"]))]
        self.generators = [(g, g.get_state()) for g in owned.generators]
        self.buffers = {n: b.detach().clone() for n, b in learner.buffers.items()}
        self.rng = torch.random.get_rng_state()
        return self

    def __exit__(self, kind, value, traceback):
        changed = [p for p, version in self.fixed if p._version != version]
        if changed:
            raise FBCompileError(
                f"learner {self.learner.name!r} wrote {len(changed)} frozen parameter(s) of its own modules in place "
                f"during a step (shape {tuple(changed[0].shape)}); a frozen parameter is taken to be fixed and is "
                "not copied by the step's snapshot, so make it trainable (requires_grad=True) or a buffer") from value
        if kind is not None or self.always_restore:
            self.restore()
        return False

    def restore(self) -> None:
        learner = self.learner
        learner.load_state_dict(self.state)
        with torch.no_grad():
            for tensor, saved in self.tensors:
                tensor.copy_(saved)
            for name, buffer in learner.buffers.items():
                buffer.copy_(self.buffers[name])
        for optimizer, saved in self.optimizers:
            load_optimizer_state(optimizer, saved)
        for generator, saved in self.generators:
            generator.set_state(saved)
        torch.random.set_rng_state(self.rng)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """``optimizer.load_state_dict(saved)``, in place where its state has the layout of ``saved``
    (the same entries, tensors of the same shape, type and device): a rollback then allocates
    nothing and the state tensors stay the same objects. Learners load their own optimizers' state
    with it (their ``load_extra_state``, which a rollback calls too)."""
    current = optimizer.state_dict()           # references to the live state tensors, not copies
    if not _same_layout(current["state"], saved["state"]):
        optimizer.load_state_dict(saved)
        return
    with torch.no_grad():
        _copy_into(current["state"], saved["state"])
    for group, then in zip(optimizer.param_groups, saved["param_groups"]):
        group.update((k, v) for k, v in then.items() if k != "params")


def _same_layout(now, then) -> bool:
    if torch.is_tensor(now) or torch.is_tensor(then):
        return (torch.is_tensor(now) and torch.is_tensor(then) and now.shape == then.shape
                and now.dtype == then.dtype and now.device == then.device)
    if isinstance(now, dict) and isinstance(then, dict):
        return now.keys() == then.keys() and all(_same_layout(now[k], then[k]) for k in now)
    if isinstance(now, (list, tuple)) and isinstance(then, (list, tuple)):
        return len(now) == len(then) and all(map(_same_layout, now, then))
    return type(now) is type(then) and now == then


def _copy_into(now, then) -> None:
    """Copy the tensors of ``then`` into those of ``now`` (same layout, :func:`_same_layout`)."""
    if torch.is_tensor(now):
        now.copy_(then)
    elif isinstance(now, dict):
        for key in now:
            _copy_into(now[key], then[key])
    elif isinstance(now, (list, tuple)):
        for a, b in zip(now, then):
            _copy_into(a, b)


def _key(t: torch.Tensor) -> tuple:
    """Identifies a tensor's memory (a ``detach()``-ed copy from a state dict has the same key)."""
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype


def _tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _snapshot(value, shared: set):
    """A copy of a state dict: tensors cloned unless their key is in ``shared``, containers rebuilt,
    anything else deep-copied (``copy.deepcopy`` of a tensor costs several times a clone)."""
    if torch.is_tensor(value):
        return value if _key(value) in shared else value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _snapshot(v, shared)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v, shared) for v in value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return copy.deepcopy(value)
