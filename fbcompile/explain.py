"""``FeedbackProgram.explain()``: one row per forward node, showing what the compiler did with it."""
from __future__ import annotations

from .context import RuleContext
from .trace import info


def explain_rows(program) -> list[dict]:
    """Rows ``{node, op, rule, condition, kind, unit, feedback}`` for every forward node."""
    emitted = program.feedback["error"].emitted
    rows = []
    for node in program.traced.graph.nodes:
        record = info(node)
        rule = program.rules.get(node)
        unit = program.partition.unit_of.get(node)
        if rule is not None:
            op, kind = record.call.spec.name, rule.kind_for(RuleContext(node))
        elif record.role == "select":
            op, kind = f"getitem[{record.select_index}]", "exact"
        else:
            op, kind = record.role + ("" if record.active or record.role != "value" else " (inactive)"), "-"
        rows.append({
            "node": node.name, "op": op, "rule": rule.name if rule else "-",
            "condition": program.condition if rule else "-", "kind": kind,
            "unit": unit.index if unit is not None else "-",
            "feedback": ", ".join(emitted.get(node.name, [])) or "-",
        })
    return rows


def explain_table(program) -> str:
    rows = explain_rows(program)
    columns = ["node", "op", "rule", "condition", "kind", "unit", "feedback"]
    header = f"{type(program.model).__name__}: condition {program.condition}, {len(program.units)} units\n"
    return header + format_table(rows, columns)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
