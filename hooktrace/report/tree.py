"""``hooktrace report --tree``: the model as ``print(model)`` shows it, annotated per module.

Each line keeps ``print(model)``'s text (``(fc1): Linear(in_features=64, out_features=64,
bias=True)``) and adds aligned columns: parameters (own and below; frozen ones counted apart),
forward and backward time (median self / inclusive per step), bytes saved for backward (``--memory
on``, children included), share of the step, gradient norm
(median / last), calls per step, and flags. The structure comes from the ``model`` key that the
agent writes into the summary at attach; without it (a run killed early) the tree is rebuilt from
module names, and the output says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hooktrace.report.load import RunData
from hooktrace.report.rows import ModuleTime, fmt_count, fmt_s, median, module_norms, module_times, run_step_time
from hooktrace.summary import fmt_bytes

SORTS = ("model", "time", "params")
"""Sibling order: as the model defines them, slowest first (forward + backward), largest first."""

_MAX_LEFT = 90
"""Longest ``print(model)`` text kept before the columns; longer text is cut with ``...``."""

COLUMNS = ("params", "fwd self/incl", "bwd self/incl", "saved", "step", "grad med/last", "calls", "flags")


@dataclass(slots=True)
class Node:
    """One module in the tree with what the report knows of it."""

    entry: dict[str, Any]
    children: list[Node] = field(default_factory=list)
    params: int = 0
    """Own and descendants' parameters (tied ones counted once, at their first owner)."""
    frozen: int = 0

    @property
    def name(self) -> str:
        return str(self.entry["module"])


@dataclass(slots=True)
class TreeLine:
    """One printed line: ``text`` (``print(model)``'s), then ``cells`` by column, or a closing ``)``."""

    depth: int
    text: str
    cells: dict[str, str] = field(default_factory=dict)
    hot: bool = False
    """Takes at least 10% of the step: shown in colour."""


def synthetic_structure(names: list[str], types: dict[str, str]) -> list[dict[str, Any]]:
    """A structure from module names alone (no ``model`` in the summary): every dotted prefix is a
    module, under the root (the module named like its type, as the agent names a lone root)."""
    roots = [n for n in names if "." not in n and types.get(n) == n] or ["model"]
    root = roots[0]
    everything = set(names)
    for name in names:
        parts = name.split(".")
        everything.update(".".join(parts[:i]) for i in range(1, len(parts)))
    everything.discard(root)
    entries = [{"module": root, "type": types.get(root, root), "parent": None, "key": "", "extra_repr": ""}]
    for name in sorted(everything, key=natural_key):
        parent = name.rsplit(".", 1)[0] if "." in name else root
        entries.append({"module": name, "type": types.get(name, "?"), "parent": parent, "key": name.rsplit(".", 1)[-1]})
    return entries


def natural_key(name: str) -> list[tuple[int, Any]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def build_tree(structure: list[dict[str, Any]]) -> list[Node]:
    """Nodes linked to their parents, parameter counts summed up the tree; the roots."""
    nodes = {e["module"]: Node(e) for e in structure}
    roots: list[Node] = []
    for entry in structure:
        node = nodes[entry["module"]]
        parent = nodes.get(entry.get("parent") or "")
        (parent.children if parent is not None and parent is not node else roots).append(node)

    def total(node: Node) -> None:
        node.params = node.entry.get("trainable", 0) + node.entry.get("frozen", 0)
        node.frozen = node.entry.get("frozen", 0)
        for child in node.children:
            total(child)
            node.params += child.params
            node.frozen += child.frozen

    for root in roots:
        total(root)
    return roots


def _label(entry: dict[str, Any], leaf: bool) -> str:
    """``(key): Type(extra)`` for a leaf, ``(key): Type(`` for a module with children shown."""
    head = f"({entry['key']}): " if entry.get("key") else ""
    extra = entry.get("extra_repr") or ""
    if leaf:
        return f"{head}{entry['type']}({extra})"
    return f"{head}{entry['type']}("


def tree_lines(run: RunData, depth: int | None = None, sort: str = "model") -> tuple[list[TreeLine], list[str]]:
    """The annotated tree, and notes to print under it (totals, what is missing)."""
    times = module_times(run)
    norms = module_norms(run)
    saved = saved_bytes(run)
    step = run_step_time(run)
    never = set(run.summary.get("never_called", []))
    skipped = {s["module"]: s["reason"] for s in run.summary.get("backward_skipped", [])}
    structure = run.model
    notes: list[str] = []
    if not structure:
        names = sorted(set(times) | set(norms), key=natural_key)
        structure = synthetic_structure(names, {m: t.module_type for m, t in times.items()})
        notes.append("no model structure in this run's files: tree rebuilt from module names (no extra_repr, params)")
    roots = build_tree(structure)
    lines: list[TreeLine] = []

    def spent(node: Node) -> float:
        """Forward + backward with children; a container never called (ModuleList) sums its children."""
        t = times.get(node.name)
        return t.both() if t is not None and t.total_s else sum(spent(c) for c in node.children)

    def key(node: Node) -> float:
        if sort == "time":
            return -spent(node)
        if sort == "params":
            return -float(node.params)
        return 0.0

    def walk(node: Node, level: int) -> None:
        shown = depth is None or level < depth
        children = sorted(node.children, key=key) if shown else []
        entry = node.entry
        extra_lines = (entry.get("extra_repr") or "").split("\n")
        multi = len(extra_lines) > 1
        folded = not children and bool(node.children)
        leaf = folded or (not children and not multi)
        text = _label(entry, leaf)
        if folded:  # cut by --depth: say how much is folded
            inner = f"{extra_lines[0]}, ..." if extra_lines[0] and not multi else "..."
            text = _label({**entry, "extra_repr": inner}, True)
            below = _count_below(node)
            unused = sum(1 for name in _names_below(node) if name in never)
            text += f"  [{below} module{'s' if below != 1 else ''} below"
            text += f", {unused} never called]" if unused else "]"
        cells, hot = _cells(node, times.get(node.name), norms.get(node.name), step, never, skipped)
        if node.name in saved:
            cells["saved"] = fmt_bytes(saved[node.name])
        lines.append(TreeLine(level, _cut(text), cells, hot))
        if leaf:
            return
        for extra in extra_lines if multi or (children and extra_lines[0]) else []:
            lines.append(TreeLine(level + 1, _cut(extra)))
        for child in children:
            walk(child, level + 1)
        lines.append(TreeLine(level, ")"))

    for root in roots:
        if len(roots) > 1:  # several models: each root line names the model as the run does
            root.entry = {**root.entry, "key": root.name}
        walk(root, 0)
    total = sum(r.params for r in roots)
    frozen = sum(r.frozen for r in roots)
    if run.model:
        notes.insert(0, f"Parameters: {fmt_count(total)} total, {fmt_count(total - frozen)} trainable, "
                        f"{fmt_count(frozen)} frozen; step median {fmt_s(step)}")  # fmt: skip
    notes.extend(run.missing)
    return lines, notes


def saved_bytes(run: RunData) -> dict[str, int]:
    """Module -> bytes its forward saved for backward, children included (largest over ranks)."""
    out: dict[str, int] = {}
    for row in run.modules:
        if row.get("phase") == "forward" and row.get("activation_bytes") is not None:
            out[row["module"]] = max(out.get(row["module"], 0), int(row["activation_bytes"]))
    return out


def _count_below(node: Node) -> int:
    return sum(1 + _count_below(child) for child in node.children)


def _names_below(node: Node) -> list[str]:
    return [name for child in node.children for name in (child.name, *_names_below(child))]


def _cut(text: str) -> str:
    return text if len(text) <= _MAX_LEFT else text[: _MAX_LEFT - 3] + "..."


def _cells(
    node: Node,
    time: ModuleTime | None,
    norms: list[tuple[int, float]] | None,
    step: float | None,
    never: set[str],
    skipped: dict[str, str],
) -> tuple[dict[str, str], bool]:
    entry = node.entry
    cells: dict[str, str] = {}
    if node.params:
        frozen = f" ({fmt_count(node.frozen)} frozen)" if 0 < node.frozen < node.params else ""
        cells["params"] = fmt_count(node.params) + (" frozen" if node.frozen == node.params else frozen)
    hot = False
    if time is not None:
        for phase, column in (("forward", "fwd self/incl"), ("backward", "bwd self/incl")):
            if phase in time.total_s:
                cells[column] = f"{fmt_s(time.self_s.get(phase))} / {fmt_s(time.total_s[phase])}"
        if step:
            share = time.both() / step
            cells["step"] = f"{share * 100:.1f}%"
            hot = share >= 0.1
        if time.calls_per_step:
            cells["calls"] = f"x{time.calls_per_step:g}"
    if norms:
        cells["grad med/last"] = f"{median([v for _, v in norms]):.3g} / {norms[-1][1]:.3g}"
    flags = []
    if node.name in never:
        flags.append("never called")
    if node.name in skipped:
        flags.append(f"full backward hooks skipped ({skipped[node.name]})")
    for pname, owner in sorted((entry.get("tied") or {}).items()):
        flags.append(f"tied: {pname} = {owner}")
    if entry.get("frozen") and not entry.get("trainable"):
        flags.append("frozen")
    if flags:
        cells["flags"] = "; ".join(flags)
    return cells, hot


def render_plain(lines: list[TreeLine], notes: list[str]) -> str:
    """Aligned columns after the tree text; no colour (piped output, files, tests)."""
    rows = [(("  " * line.depth) + line.text, line) for line in lines]
    left = max((len(text) for text, _ in rows), default=0)
    used = [c for c in COLUMNS if any(c in line.cells for line in lines)]
    widths = {c: max([len(c)] + [len(line.cells.get(c, "")) for line in lines]) for c in used}
    out = [("".ljust(left) + "  " + "  ".join(c.rjust(widths[c]) if c != "flags" else c for c in used)).rstrip()]
    for text, line in rows:
        cells = "  ".join(
            line.cells.get(c, "").rjust(widths[c]) if c != "flags" else line.cells.get(c, "") for c in used
        )
        out.append((text.ljust(left) + "  " + cells).rstrip() if line.cells else text)
    return "\n".join(out + notes)


def render_rich(lines: list[TreeLine], notes: list[str]) -> Any:
    """The same text as :func:`render_plain`, with colours for a terminal (``rich``)."""
    from rich.text import Text

    plain = render_plain(lines, notes).split("\n")
    text = Text()
    text.append(plain[0] + "\n", style="bold")
    for raw, line in zip(plain[1:], lines, strict=False):
        style = "bold yellow" if line.hot else ("dim" if line.text == ")" else "")
        start = len(text)
        text.append(raw + "\n", style=style)
        flags = line.cells.get("flags")
        if flags and raw.endswith(flags):
            text.stylize("red", start + len(raw) - len(flags), start + len(raw))
    for note in plain[1 + len(lines) :]:
        text.append(note + "\n", style="cyan")
    text.rstrip()
    return text
