"""Plots as PNG files, drawn with matplotlib's Agg canvas (no display, no global pyplot state).

- :func:`training_curves`: loss, accuracy and (with diagnostics) alignment angle per epoch, for one
  run or several labelled runs.
- :func:`comparison_bars`: mean +/- std bars, optionally grouped (e.g. model x algorithm).
- :func:`draw_graphs` / :func:`graph_dot` / :func:`save_graph`: the forward graph and a feedback
  graph side by side (networkx layered layout to PNG, or Graphviz DOT text); nodes are coloured by
  TP unit, so each feedback op shows which forward op it answers.
"""
from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import FBCompileError

GRAPH_SUFFIXES = (".png", ".svg", ".pdf", ".dot", ".gv")


def _color(index: int, count: int):
    """Distinct colours: matplotlib's default cycle up to 10 series, tab20 beyond."""
    if count <= 10:
        return f"C{index % 10}"
    from matplotlib import colormaps
    return colormaps["tab20"](index % 20)


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


# -- training curves and comparisons -----------------------------------------------------------------
def training_curves(runs, path, *, title: str | None = None) -> Path:
    """Plot per-epoch records (``metrics.jsonl`` rows): one list, or ``{label: list}``."""
    runs = runs if isinstance(runs, dict) else {"": runs}
    has_accuracy = any(r.get("test_accuracy") is not None for h in runs.values() for r in h)
    has_angles = any(r.get("alignment") for h in runs.values() for r in h)
    panels = 1 + has_accuracy + has_angles
    figure = _figure(4.2 * panels, 3.4)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for index, (label, history) in enumerate(runs.items()):
        color = _color(index, len(runs))
        epochs = [r["epoch"] for r in history]
        axes[0].plot(epochs, [_num(r["train_loss"]) for r in history], color=color, label=label or "train")
        axes[0].plot(epochs, [_num(r["test_loss"]) for r in history], color=color, linestyle="--",
                     label=None if label else "test")
        if has_accuracy:
            axes[1].plot(epochs, [_pct(r.get("test_accuracy")) for r in history], color=color, label=label or "test")
            if not label or len(runs) == 1:
                axes[1].plot(epochs, [_pct(r.get("train_accuracy")) for r in history], color=color,
                             linestyle="--", label="train")
        if has_angles:
            _angle_lines(axes[-1], history, color, label, single=len(runs) == 1)
    axes[0].set(xlabel="epoch", ylabel="loss (solid: train, dashed: test)", yscale="log")
    if has_accuracy:
        axes[1].set(xlabel="epoch", ylabel="accuracy (%)")
    if has_angles:
        axes[-1].set(xlabel="epoch", ylabel="angle to BP gradient (deg)", ylim=(0, 95))
    from matplotlib.ticker import MaxNLocator
    for axis in axes:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _angle_lines(axis, history, color, label, single: bool) -> None:
    epochs = [r["epoch"] for r in history]
    units = sorted({(row["unit"], row.get("name", "")) for r in history for row in r.get("alignment") or []})
    if single:
        for i, (unit, name) in enumerate(units):
            values = [_unit_angle(r, unit) for r in history]
            axis.plot(epochs, values, color=_color(i, len(units)), label=f"unit {unit} {name}".strip())
    else:
        means = []
        for r in history:
            values = [row["angle_bp"] for row in r.get("alignment") or [] if row.get("angle_bp") is not None]
            means.append(sum(values) / len(values) if values else math.nan)
        axis.plot(epochs, means, color=color, label=label)


def _unit_angle(record, unit):
    row = next((row for row in record.get("alignment") or [] if row["unit"] == unit), None)
    return _num(row.get("angle_bp")) if row else math.nan


def comparison_bars(results: dict, path, *, ylabel: str = "test accuracy (%)", title: str | None = None) -> Path:
    """Bars of ``{label: (mean, std)}``, or grouped ``{group: {label: (mean, std)}}``; a std of
    None draws no error bar."""
    grouped = all(isinstance(v, dict) for v in results.values())
    groups = results if grouped else {"": results}
    labels = list(dict.fromkeys(label for g in groups.values() for label in g))
    width = 0.8 / max(len(labels), 1)
    figure = _figure(max(5.0, 1.0 + 0.35 * len(labels) * len(groups)), 3.8)
    axis = figure.subplots()
    for i, label in enumerate(labels):
        xs, means, stds = [], [], []
        for g, values in enumerate(groups.values()):
            if label in values and values[label] is not None:
                mean, std = values[label]
                xs.append(g + (i - (len(labels) - 1) / 2) * width)
                means.append(_num(mean))
                stds.append(_num(std) if std is not None else math.nan)
        errors = stds if any(not math.isnan(v) for v in stds) else None
        axis.bar(xs, means, width=width * 0.95, yerr=errors, capsize=2, color=_color(i, len(labels)), label=label)
    axis.set_xticks(range(len(groups)), list(groups) if grouped else [""])
    axis.set_ylabel(ylabel)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=7, ncol=min(len(labels), 6), loc="upper center", bbox_to_anchor=(0.5, -0.08))
    if title:
        axis.set_title(title)
    return _save(figure, path)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _pct(value) -> float:
    return math.nan if value is None else 100 * _num(value)


# -- graphs ---------------------------------------------------------------------------------------
def forward_graph(program) -> nx.DiGraph:
    """The traced forward graph: inputs, active ops and the output (parameters left out)."""
    from .trace import info
    graph = nx.DiGraph()
    for node in program.traced.graph.nodes:
        record = info(node)
        if record.role not in ("input", "output") and not (record.active and record.role in ("op", "select", "value")):
            continue
        op = record.call.spec.name if record.call is not None else record.role
        unit = program.partition.unit_of.get(node)
        graph.add_node(node.name, label=f"{node.name}\n{op}", unit=unit.index if unit is not None else None,
                       main=record.role == "input")
        for source in node.all_input_nodes:
            if source.name in graph:
                graph.add_edge(source.name, node.name)
    return graph


def feedback_graph(program, mode: str = "error", *, params: bool = False) -> nx.DiGraph:
    """The ``mode`` feedback graph: incoming output feedback, feedback ops (and parameter-gradient
    ops when ``params``) and the output; each op labelled with the forward node it answers."""
    unit_of = {n.name: u.index for n, u in program.partition.unit_of.items()}
    graph = nx.DiGraph()
    for node in program.feedback_graph(mode).module.graph.nodes:
        meta = node.meta.get("fbcompile") or {}
        if node.op == "placeholder":
            if (meta.get("input") or ("",))[0] not in ("output", "cut"):
                continue
            label, unit, main = f"{node.name}\nfeedback in", None, True
        elif node.op == "output":
            label, unit, main = "output\nfeedback out", None, False
        else:
            if meta.get("role") == "param_grad" and not params:
                continue
            target = getattr(node.target, "__name__", str(node.target)).replace("fbcompile_rules_", "")
            label, unit, main = f"{node.name}\n{target}", unit_of.get(meta.get("source")), False
        graph.add_node(node.name, label=label, unit=unit, source=meta.get("source"), main=main)
        for source in node.all_input_nodes:
            if source.name in graph:
                graph.add_edge(source.name, node.name)
    return graph


def _layers(graph: nx.DiGraph) -> dict:
    """Longest-path depth from the main sources; an auxiliary root (a shape lookup, a constant)
    sits just above its first consumer instead of beside the graph's input."""
    depth = {}
    for name in nx.topological_sort(graph):
        preds = list(graph.predecessors(name))
        depth[name] = 1 + max(depth[p] for p in preds) if preds else 0
    for name in graph:
        if not graph.nodes[name].get("main") and graph.in_degree(name) == 0 and graph.out_degree(name):
            depth[name] = min(depth[s] for s in graph.successors(name)) - 1
    return depth


def _layout(graph: nx.DiGraph, upward: bool) -> dict:
    for name, depth in _layers(graph).items():
        graph.nodes[name]["layer"] = -depth if upward else depth
    positions = nx.multipartite_layout(graph, subset_key="layer", align="horizontal") if graph else {}
    return {name: (x, -y) for name, (x, y) in positions.items()}


def _colors(graph: nx.DiGraph) -> list:
    from matplotlib import colormaps
    palette = colormaps["tab20"]
    return [palette(u % 20) if (u := graph.nodes[n].get("unit")) is not None else (0.85, 0.85, 0.85, 1.0)
            for n in graph]


def draw_graphs(program, path, *, mode: str = "error", params: bool = False) -> Path:
    """PNG (or SVG/PDF) of the forward graph (left, input at the top) and the ``mode`` feedback
    graph (right, output feedback at the bottom), coloured by unit."""
    panels = [("forward", forward_graph(program), False),
              (f"feedback ({mode}, condition {program.condition})", feedback_graph(program, mode, params=params), True)]
    layers = [list(_layers(g).values()) for _, g, _ in panels]
    depth = max((max(v) - min(v) + 1 if v else 1) for v in layers)
    breadth = max((max(v.count(d) for d in v) if v else 1) for v in layers)
    figure = _figure(min(6 + 2.2 * breadth, 30), min(2 + 0.75 * depth, 60))
    for axis, (title, graph, upward) in zip(figure.subplots(1, 2), panels):
        positions = _layout(graph, upward)
        layer = nx.get_node_attributes(graph, "layer")
        long = [(a, b) for a, b in graph.edges if abs(layer[a] - layer[b]) > 1]
        short = [e for e in graph.edges if e not in set(long)]
        for edges, style in ((short, "arc3"), (long, "arc3,rad=0.25")):
            nx.draw_networkx_edges(graph, positions, edgelist=edges, ax=axis, arrows=True, arrowsize=8,
                                   edge_color="#888888", node_size=1400, connectionstyle=style)
        nx.draw_networkx_nodes(graph, positions, ax=axis, node_color=_colors(graph), node_size=1400,
                               node_shape="s", edgecolors="#444444", linewidths=0.5)
        nx.draw_networkx_labels(graph, positions, ax=axis, labels=nx.get_node_attributes(graph, "label"),
                                font_size=5)
        axis.set_title(title, fontsize=9)
        axis.margins(0.08)
        axis.axis("off")
    figure.suptitle(f"{type(program.model).__name__}: colours are TP units", fontsize=10)
    return _save(figure, path)


def graph_dot(program, *, mode: str = "error", params: bool = False) -> str:
    """Graphviz DOT text: a forward and a feedback cluster; dashed edges join each feedback op to
    the forward node whose rule emitted it."""
    from matplotlib.colors import to_hex
    lines = ["digraph fbcompile {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="Helvetica", '
             "fontsize=10];"]
    panels = [("forward", "f_", forward_graph(program)), (f"feedback ({mode})", "b_", feedback_graph(program, mode, params=params))]
    for index, (title, prefix, graph) in enumerate(panels):
        lines.append(f"  subgraph cluster_{index} {{")
        lines.append(f"    label={_quote(title)};")
        for name, color in zip(graph, _colors(graph)):
            lines.append(f"    {_quote(prefix + name)} [label={_quote(graph.nodes[name]['label'])}, "
                         f"fillcolor={_quote(to_hex(color))}];")
        for a, b in graph.edges:
            lines.append(f"    {_quote(prefix + a)} -> {_quote(prefix + b)};")
        lines.append("  }")
    forward, feedback = panels[0][2], panels[1][2]
    for name in feedback:
        source = feedback.nodes[name].get("source")
        if source in forward:
            lines.append(f"  {_quote('b_' + name)} -> {_quote('f_' + source)} "
                         "[style=dashed, color=gray60, arrowhead=none, constraint=false];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def save_graph(program, path, *, mode: str = "error", params: bool = False) -> Path:
    """Write the graphs to ``path``: DOT text for ``.dot``/``.gv``, else an image (png, svg, pdf)."""
    path = Path(path)
    if path.suffix.lower() not in GRAPH_SUFFIXES:
        raise FBCompileError(f"--graph {str(path)!r}: use a file ending in {', '.join(GRAPH_SUFFIXES)}")
    if path.suffix.lower() in (".dot", ".gv"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(graph_dot(program, mode=mode, params=params))
        return path
    return draw_graphs(program, path, mode=mode, params=params)
