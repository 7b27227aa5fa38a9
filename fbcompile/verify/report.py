"""The verification report: one row per node and per unit."""
from __future__ import annotations

import json
import math

from ..explain import format_table

METRIC_OF_CONDITION = {"T": "tjml_rel", "P": "pjml_rel", "I": "ijml_rel"}


class VerifyReport:
    """``rows``: dicts with ``level`` ("node"/"unit"), ``node``, ``op``, ``rule``, ``kind``,
    ``method``, ``n_in``, ``n_out``, ``tjml``, ``tjml_rel``, ``tjml_se``, ``pjml``, ``pjml_rel``,
    ``ijml``, ``ijml_rel`` (None where not defined or not computed) and ``matching``: the relative
    loss of the program's own condition."""

    def __init__(self, model_name: str, condition: str, rows: list[dict]):
        self.model_name, self.condition, self.rows = model_name, condition, rows

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

    def to_dict(self) -> dict:
        return {"model": self.model_name, "condition": self.condition, "rows": [dict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        columns = ["level", "node", "op", "kind", "method", "n_in", "n_out", "tjml", "tjml_rel", "pjml", "ijml"]
        shown = [{c: _fmt(row.get(c)) for c in columns} for row in self.rows]
        return f"Jacobian matching of {self.model_name} (condition {self.condition})\n" + format_table(shown, columns)

    __repr__ = __str__


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)
