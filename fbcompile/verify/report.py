"""The verification report: one row per node path and per unit, and the small-beta limit per unit."""
from __future__ import annotations

import json
import math

from ..explain import format_table

METRIC_OF_CONDITION = {"T": "tjml_rel", "P": "pjml_rel", "I": "ijml_rel"}


class VerifyReport:
    """``rows``: dicts with ``level`` ("node"/"unit"), ``node``, ``path``, ``op``, ``rule``, ``kind``,
    ``method``, ``n_in``, ``n_out``, ``tjml``, ``tjml_rel``, ``tjml_se``, ``pjml``, ``pjml_rel``,
    ``ijml``, ``ijml_rel`` (None where not defined or not computed) and ``matching``: the relative
    loss of the program's own condition.

    ``path`` is "activation" for the node's map from its inputs that depend on a model input (what
    target modes use and the JML conditions are about), "parameter" for the map error mode sends
    into parameter paths (a class token's ``expand``, a weight's ``.t()``, an embedding on integer
    ids; see :mod:`fbcompile.verify.evaluate`). Parameter rows carry gradients, so their
    ``matching`` is always the relative TJML, whatever the program's condition. A node can have
    both rows (``torch.cat([self.cls.expand(b, -1, -1), h], 1)``).

    ``limit``: the small-beta limit of target propagation per unit (:mod:`fbcompile.verify.limit`),
    ``{"mode", "beta", "rows", "problem", "failed"}`` or None when not computed. Each row gives the angle
    (``angle_deg``) between the target-mode update as beta -> 0 and the error-mode update of the
    unit's parameters. A rule whose target map is not the linearisation of its error map (so that
    target propagation does not reduce to error propagation through it) shows up there as a
    non-zero angle in the units it feeds; see :meth:`limit_failures`."""

    def __init__(self, model_name: str, condition: str, rows: list[dict], limit: dict | None = None):
        self.model_name, self.condition, self.rows, self.limit = model_name, condition, rows, limit

    def failures(self, tolerance: float = 1e-8) -> list[dict]:
        """Node rows of kind "exact" whose matching loss exceeds ``tolerance`` (or could not be
        computed for the program's condition)."""
        bad = []
        for row in self.rows:
            if row["level"] == "node" and row["kind"] == "exact":
                value = row["matching"]
                if value is None or not math.isfinite(value) or value > tolerance:
                    bad.append(row)
        return bad

    def ok(self, tolerance: float = 1e-8) -> bool:
        return not self.failures(tolerance)

    def limit_failures(self, tolerance_deg: float = 0.01) -> list[dict]:
        """Limit rows whose angle exceeds ``tolerance_deg``, or where one update is zero and the
        other is not (the angle is undefined, the updates certainly differ); one row with
        ``unit`` None and the exception in ``note`` when target mode failed on the model."""
        if self.limit is None:
            return []
        if self.limit["failed"]:
            return [{"unit": None, "name": "-", "params": 0, "angle_deg": None, "error_norm": None,
                     "target_norm": None, "note": self.limit["problem"]}]
        return [r for r in self.limit["rows"]
                if (r["angle_deg"] is not None and not r["angle_deg"] <= tolerance_deg)
                or (r["angle_deg"] is None and (r["error_norm"] or r["target_norm"]))]

    def to_dict(self) -> dict:
        limit = None if self.limit is None else {**self.limit, "rows": [dict(r) for r in self.limit["rows"]]}
        return {"model": self.model_name, "condition": self.condition, "rows": [dict(r) for r in self.rows],
                "limit": limit}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        columns = ["level", "node", "path", "op", "kind", "method", "n_in", "n_out", "tjml", "tjml_rel", "pjml", "ijml"]
        shown = [{c: _fmt(row.get(c)) for c in columns} for row in self.rows]
        text = f"Jacobian matching of {self.model_name} (condition {self.condition})\n" + format_table(shown, columns)
        return text + self._limit_text()

    def _limit_text(self) -> str:
        if self.limit is None:
            return ""
        head = (f"\n\nSmall-beta limit ({self.limit['mode']} mode, central difference at beta = "
                f"{self.limit['beta']:.1e}): angle between the target-mode and error-mode update per unit\n")
        if self.limit["problem"]:
            return head + f"not computed: {self.limit['problem']}"
        columns = ["unit", "name", "params", "angle_deg", "error_norm", "target_norm", "note"]
        shown = [{c: _fmt(row.get(c)) for c in columns} for row in self.limit["rows"]]
        return head + format_table(shown, columns)

    __repr__ = __str__


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value) or "-"
