"""`hooktrace report --tree`: the model as print(model) shows it, annotated from the run's files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from torch import nn

import hooktrace
from hooktrace.cli.main import cli
from hooktrace.report.load import load_run
from hooktrace.report.rows import fmt_s
from hooktrace.report.tree import render_plain, render_rich, tree_lines


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.spare = nn.Linear(8, 8)  # never called
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.frozen(self.embed(tokens))))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tree-run")
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    agent = hooktrace.attach(model, out=str(out), metrics_port=0, sample_every=1, depth=9)
    tokens = torch.randint(0, 10, (4, 6))
    for _ in range(8):
        loss = model(tokens).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    agent.close()
    return out


def _tree(run_dir: Path, *args: str) -> list[str]:
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--tree", *args])
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output  # not a terminal: plain text
    return result.output.splitlines()


def _line(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.lstrip().startswith(start))


def test_the_summary_records_the_structure_with_frozen_and_tied_parameters(run_dir: Path) -> None:
    model = {m["module"]: m for m in json.loads((run_dir / "summary.json").read_text())["model"]}
    assert list(model)[:3] == ["Net", "embed", "frozen"]
    assert model["frozen"]["extra_repr"] == "in_features=8, out_features=8, bias=True"
    assert (model["frozen"]["trainable"], model["frozen"]["frozen"]) == (0, 72)
    assert model["head"]["tied"] == {"weight": "embed.weight"} and model["head"]["trainable"] == 0
    assert model["body.0"]["parent"] == "body" and model["body.0"]["key"] == "0"
    assert model["embed"]["trainable"] == 80


def test_tree_prints_names_and_extra_repr_like_print_model(run_dir: Path) -> None:
    lines = _tree(run_dir)
    text = "\n".join(lines)
    for expected in (
        "Net(",
        "  (embed): Embedding(10, 8)",
        "  (frozen): Linear(in_features=8, out_features=8, bias=True)",
        "  (body): Sequential(",
        "    (0): Linear(in_features=8, out_features=16, bias=True)",
        "    (1): ReLU()",
        "  (head): Linear(in_features=8, out_features=10, bias=False)",
    ):
        assert any(line.startswith(expected) for line in lines), f"{expected!r} missing in:\n{text}"
    # the same order as print(model): tree order, every opened module closed
    order = [_line(lines, s) for s in ("Net(", "(embed)", "(frozen)", "(body)", "(0)", "(spare)", "(head)")]
    assert [lines.index(line) for line in order] == sorted(lines.index(line) for line in order)
    rows, _ = tree_lines(load_run(str(run_dir)))
    opened = [r.depth for r in rows if r.text.endswith("(")]
    closed = [r.depth for r in rows if r.text == ")"]
    assert sorted(opened) == sorted(closed) == [0, 1]  # Net( ... ) and (body): Sequential( ... )


def test_tree_puts_each_median_time_under_its_column(run_dir: Path) -> None:
    lines = _tree(run_dir)
    header = lines[0]
    rows = {(m["module"], m["phase"]): m for m in json.loads((run_dir / "summary.json").read_text())["modules"]}
    for module, start in (("body.0", "(0): Linear"), ("body", "(body)"), ("embed", "(embed)")):
        line = _line(lines, start)
        for phase, column in (("forward", "fwd self/incl"), ("backward", "bwd self/incl")):
            row = rows[(module, phase)]
            cell = f"{fmt_s(row['self_s'])} / {fmt_s(row['total_s'])}"
            # right-aligned under its header (forward and backward may read the same: look at the place)
            end = header.index(column) + len(column)
            assert line[end - len(cell) : end] == cell, (module, phase, line)
            assert line[end - len(cell) - 1] == " " and line[end : end + 2] == "  ", (module, phase, line)
    body = _line(lines, "(body)")
    fwd, bwd = rows[("body", "forward")]["total_s"], rows[("body", "backward")]["total_s"]
    step = json.loads((run_dir / "summary.json").read_text())["ranks"][0]["step_time_s"]

    def cell(column: str, width: int) -> str:
        end = header.index(column) + len(column)
        return body[end - width : end].strip()

    share = f"{(fwd + bwd) / step * 100:.1f}%"
    assert cell("step", len(share)) == share
    assert cell("calls", 2) == "x1"


def test_frozen_tied_and_never_called_modules_are_flagged(run_dir: Path) -> None:
    lines = _tree(run_dir)
    frozen = _line(lines, "(frozen)")
    assert "72 frozen" in frozen and frozen.rstrip().endswith("frozen")
    assert _line(lines, "(head)").rstrip().endswith("tied: weight = embed.weight")
    assert _line(lines, "(spare)").rstrip().endswith("never called")
    assert "never called" not in _line(lines, "(embed)")
    # parameters: the root counts every parameter once (the tied one at its first owner)
    total = sum(p.numel() for p in Net().parameters())
    assert f"Parameters: {total} total, {total - 72} trainable, 72 frozen" in "\n".join(lines)


def test_depth_folds_children_and_sort_puts_the_slowest_first(run_dir: Path) -> None:
    lines = _tree(run_dir, "--depth", "1")
    assert _line(lines, "(body)").startswith("  (body): Sequential(...)  [3 modules below]")
    assert not any(line.lstrip().startswith("(0):") for line in lines)
    run = load_run(str(run_dir))
    rows, _ = tree_lines(run, sort="time")
    children = [r.text.split(":")[0] for r in rows if r.depth == 1 and r.text != ")"]
    assert children[0] == "(body)"  # three modules inside: the slowest child of Net
    assert children[-1] == "(spare)"  # never called: no time


def test_a_terminal_gets_the_same_text_in_colour(run_dir: Path) -> None:
    lines, notes = tree_lines(load_run(str(run_dir)))
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=True, color_system="standard", width=300).print(
        render_rich(lines, notes), soft_wrap=True
    )
    coloured = buffer.getvalue()
    assert "\x1b[" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured).rstrip("\n") == render_plain(lines, notes)


def test_a_module_that_full_backward_hooks_skipped_is_flagged_with_the_reason(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = hooktrace.attach(model, out=str(tmp_path), metrics_port=0, sample_every=1, backward="full")
    for _ in range(3):
        loss = model(torch.randn(2, 4)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    agent.close()
    lines = _tree(tmp_path)
    assert _line(lines, "(1): ReLU(inplace=True)").rstrip().endswith("full backward hooks skipped (inplace=True)")
    assert _line(lines, "(0): Linear").rstrip().endswith("skipped (no input requires grad)")
    assert "skipped" not in _line(lines, "(2): Linear")


def test_a_folded_module_says_how_many_below_were_never_called() -> None:
    from hooktrace.report.load import RunData

    model = [
        {"module": "M", "type": "M", "parent": None, "key": ""},
        {"module": "attn", "type": "MultiheadAttention", "parent": "M", "key": "attn"},
        {"module": "attn.out_proj", "type": "Linear", "parent": "attn", "key": "out_proj"},
        {"module": "attn.q", "type": "Linear", "parent": "attn", "key": "q"},
    ]
    run = RunData(run_dir="x", summary={"model": model, "never_called": ["attn.out_proj"]}, steps={}, modules=[])
    folded = [line.text for line in tree_lines(run, depth=1)[0]]
    assert folded == ["M(", "(attn): MultiheadAttention(...)  [2 modules below, 1 never called]", ")"]
    unfolded = [line.text for line in tree_lines(run)[0]]
    assert "(out_proj): Linear()" in unfolded and "(q): Linear()" in unfolded
    model[1]["extra_repr"] = "heads=4"
    model.append({"module": "multi", "type": "Custom", "parent": "M", "key": "multi", "extra_repr": "a=1\nb=2"})
    folded = [line.text for line in tree_lines(run, depth=1)[0]]
    assert folded[1] == "(attn): MultiheadAttention(heads=4, ...)  [2 modules below, 1 never called]"
    unfolded = [(line.depth, line.text) for line in tree_lines(run)[0]]
    assert unfolded[1:3] == [(1, "(attn): MultiheadAttention("), (2, "heads=4")]  # as print(model) puts it
    assert unfolded[-5:] == [(1, "(multi): Custom("), (2, "a=1"), (2, "b=2"), (1, ")"), (0, ")")]


def test_depth_without_tree_is_a_usage_error(run_dir: Path) -> None:
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--depth", "2"])
    assert result.exit_code == 2 and "add --tree" in result.output
