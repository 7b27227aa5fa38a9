"""``FeedbackProgram.explain()``: one row per forward node, showing what the compiler did with it."""
from __future__ import annotations

from .context import RuleContext
from .frontends import frontend_of
from .trace import info


def explain_rows(program) -> list[dict]:
    """Rows ``{node, op, rule, condition, kind, unit, feedback, target_rule, target_kind}`` for every
    forward node: ``rule``/``kind`` are what the error modes use (their ``feedback`` nodes are listed),
    ``target_rule``/``target_kind`` what the target modes use."""
    emitted = program.feedback["error"].emitted
    rows = []
    for node in program.traced.graph.nodes:
        record = info(node)
        rule, target = program.error_rules.get(node), program.rules.get(node)
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
            "target_rule": target.name if target else "-",
            "target_kind": target.kind_for(RuleContext(node)) if target else "-",
            "source": record.source,
        })
    return rows


def explain_table(program) -> str:
    rows = explain_rows(program)
    for row in rows:       # where target modes use another rule, the cell names both
        if row["target_rule"] != row["rule"]:
            row.update(rule=f"{row['rule']} (target modes: {row['target_rule']})",
                       kind=f"{row['kind']} (target modes: {row['target_kind']})")
    columns = ["node", "op", "rule", "condition", "kind", "unit", "feedback"]
    families = "; ".join(f"{family} modes prefer variants {', '.join(v) or '(none)'}"
                         for family, v in program.variants.items())
    header = (f"{type(program.model).__name__}: condition {program.condition}, {len(program.units)} units; "
              f"{families}\n")
    frontend, note = frontend_of(program.traced)
    if frontend != "fx" or note:
        header = header.rstrip("\n") + f"; captured with {_FRONTEND_NAMES[frontend]}" + (f" ({note})" if note else "") + "\n"
    if program.mode_guard is not None:
        header = header.rstrip("\n") + f"; {program.mode_guard.summary}\n"
    sources = [f"  {row['node']}: {row['source']}" for row in rows if row["source"] and row["rule"] != "-"]
    return header + format_table(rows, columns) + ("\n\nsource lines:\n" + "\n".join(sources) if sources else "")


_FRONTEND_NAMES = {"fx": "torch.fx", "export": "torch.export"}


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])
