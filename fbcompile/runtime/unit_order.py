"""The order in which update-unlocked learners run a program's units, one after another.

Update-unlocked execution (Mono-Forward, DRTP and shallow learning with ``execution="unlocked"``)
runs each unit's forward on the values earlier units produced, so every unit must come after the
units whose outputs it reads. Units are numbered in the order of their first node, which is such an
order for the usual partitions but not for every one: a unit may read a value that a unit created
after it produces (two independent branches whose sum joins the older branch's unit), and a
grouping may even put two units in a cycle (unit a reads b's output, b reads a's), which no
one-after-another execution can run. :func:`execution_order` finds a dependency order, preferring
the unit order, and refuses a cycle with an error naming the units and the values they exchange.
"""
from __future__ import annotations

from ..errors import FBCompileError


def execution_order(program, stages: list, algorithm: str, alternative: str = "") -> list:
    """``stages`` (one per unit, each with ``.unit`` and ``.inputs``) reordered so that every unit
    runs after the units producing its inputs; among the units ready to run, the lowest index first
    (the unit order itself whenever it is a dependency order). ``alternative`` ends the refusal of a
    cycle (e.g. another execution path of the algorithm that does not run units one by one)."""
    present = {stage.unit.index for stage in stages}
    producers = {stage.unit.index: _producers(program, stage) & present for stage in stages}
    ordered, done, waiting = [], set(), list(stages)
    while waiting:
        ready = next((s for s in waiting if producers[s.unit.index] <= done), None)
        if ready is None:
            raise FBCompileError(_cycle_message(program, waiting, algorithm) + alternative)
        waiting.remove(ready)
        ordered.append(ready)
        done.add(ready.unit.index)
    return ordered


def _producers(program, stage) -> set:
    """Indices of the other units whose outputs ``stage`` reads."""
    unit_of = program.partition.unit_of
    return {unit_of[src].index for src in stage.inputs if src in unit_of and unit_of[src] is not stage.unit}


def _cycle_message(program, waiting: list, algorithm: str) -> str:
    """Names one cycle among the ``waiting`` stages (each waits for another waiting one)."""
    unit_of = program.partition.unit_of
    by_index = {s.unit.index: s for s in waiting}
    reads_from = {}                                  # unit index -> (value read, producer index)
    for stage in waiting:
        src = next((src for src in stage.inputs if src in unit_of and unit_of[src].index in by_index
                    and unit_of[src] is not stage.unit), None)
        if src is None:
            raise FBCompileError(f"algorithm {algorithm!r}: unit {stage.unit.index} waits for no other waiting unit")
        reads_from[stage.unit.index] = (src, unit_of[src].index)
    path, index = [], waiting[0].unit.index
    while index not in path:
        path.append(index)
        index = reads_from[index][1]
    cycle = path[path.index(index):]
    reads = [f"unit {i} ({by_index[i].unit.name}) reads {reads_from[i][0].name!r} of unit {reads_from[i][1]}"
             for i in cycle]
    return (f"algorithm {algorithm!r} runs the units one after another, but units {sorted(cycle)} read each "
            f"other's outputs in a cycle: {'; '.join(reads)}. Compile with units='op' or another grouping whose "
            "units do not read each other's outputs")


def completed_by(uses) -> dict:
    """{unit: the names whose last use is that unit}, for ``uses`` the (unit, names) pairs in
    execution order: after which unit a parameter's update is complete (a parameter several units
    use is complete after the last of them), so update-unlocked learners can hand it over there."""
    last = {}
    for unit, names in uses:
        last.update(dict.fromkeys(names, unit))
    done = {}
    for name, unit in last.items():
        done.setdefault(unit, []).append(name)
    return done
