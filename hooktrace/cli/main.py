"""``hooktrace`` commands. Presentation lives in plain functions; commands stay thin."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from hooktrace._version import __version__
from hooktrace.cli.stack import stack_group
from hooktrace.cli.top import top_command
from hooktrace.cli.torchrun import TORCHRUN_KEYS, TORCHRUN_OPTIONS, launch_distributed
from hooktrace.config import Config
from hooktrace.errors import ConfigError

CONFIG_OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--out", {"type": str, "help": "Directory of the run's files [hooktrace-runs/<run_id>]."}),
    ("--run-id", {"type": str, "help": "Run id that joins ranks, traces and series."}),
    ("--metrics-port", {"type": int, "help": "Base port of /metrics (port + LOCAL_RANK); 0 = off [9750]."}),
    ("--metrics-addr", {"type": str, "help": "Bind address of /metrics [127.0.0.1]."}),
    ("--otlp-endpoint", {"type": str, "help": "OTLP/HTTP endpoint for traces [OTEL_EXPORTER_OTLP_ENDPOINT]."}),
    ("--sample-every", {"type": int, "help": "Per-module timing on every Nth step [10]."}),
    ("--flow-every", {"type": int, "help": "Gradient-flow norms every Nth step (a sampled one); 0 = off [100]."}),
    ("--depth", {"type": int, "help": "Module-name depth of metric labels [3]."}),
    ("--max-modules", {"type": int, "help": "Cap on module label values [256]."}),
    ("--backward", {"type": click.Choice(["auto", "full", "off"]), "help": "Backward timing mode [auto]."}),
    ("--explode-factor", {"type": float, "help": "Spike = norm > X x rolling median [10]."}),
    ("--on-explosion", {"type": click.Choice(["warn", "clip", "raise"]), "help": "On a spike [warn]."}),
    ("--on-nonfinite", {"type": click.Choice(["warn", "raise"]), "help": "On NaN/Inf gradients [warn]."}),
    (
        "--memory",
        {
            "type": click.Choice(["on", "off"]),
            "help": "Activation bytes per module (sampled steps), memory totals [on].",
        },
    ),
    (
        "--memory-every",
        {"type": int, "help": "Activation bytes on step 1, the next sampled step, then every Nth step [100]."},
    ),
    ("--watch", {"type": str, "multiple": True, "help": "Module/parameter name kept in full detail (repeatable)."}),
    (
        "--trace-ranks",
        {
            "type": str,
            "help": "Ranks whose spans carry module detail: auto (all up to 8, else 0, one per node, slowest), "
            "all, or 0,3.",
        },
    ),
    (
        "--module-metrics-ranks",
        {"type": str, "help": "Ranks whose /metrics carry per-module series (as --trace-ranks); others: step level."},
    ),
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hooktrace")
def cli() -> None:
    """Per-module timing and gradient health for PyTorch training."""


def _options(spec: list[tuple[str, dict[str, Any]]]) -> Callable[[Any], Any]:
    """Click options from a ``(flag, kwargs)`` table; unset ones stay None (config layers decide)."""

    def decorate(func: Any) -> Any:
        for flag, kwargs in reversed(spec):
            func = click.option(flag, default=None, **kwargs)(func)
        return func

    return decorate


@cli.command(context_settings={"allow_interspersed_args": False})
@click.option("-m", "as_module", is_flag=True, help="Run library module MODULE as a script, like python -m.")
@_options(CONFIG_OPTIONS)
@_options(TORCHRUN_OPTIONS)
@click.argument("target_and_args", nargs=-1, type=click.UNPROCESSED)
def run(as_module: bool, target_and_args: tuple[str, ...], **options: Any) -> None:
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) with the agent attached.

    Like python: same argv, __main__, stdin/stdout and exit code. With --nproc-per-node it
    delegates to torchrun, each worker running the script with the agent.
    """
    torchrun = {key: options.pop(key) for key in TORCHRUN_KEYS}
    explicit = {k: v for k, v in options.items() if v is not None and v != ()}
    try:
        config = Config.resolve(explicit)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    args = list(target_and_args)
    if not args:
        what = "MODULE: hooktrace run -m mypkg.train [ARGS]" if as_module else "SCRIPT: hooktrace run train.py [ARGS]"
        raise click.UsageError(f"missing {what}")
    target, args = args[0], args[1:]
    module = target if as_module else None
    if module is None:
        if not os.path.isfile(target):
            raise click.UsageError(f"can't open file {target!r}: no such file; check the script path")
    else:
        sys.path.insert(0, os.getcwd())
        found = importlib.util.find_spec(module.split(".")[0]) is not None
        sys.path.pop(0)
        if not found:
            raise click.UsageError(f"no module named {module!r}; check the name or run from the project directory")
    if any(v is not None for v in torchrun.values()):
        code = launch_distributed(config, target, args, module=module is not None, torchrun=torchrun)
    else:
        from hooktrace.cli.launch import run_target

        code = run_target(config, target, args, module=module is not None, print_summary=True)
    sys.exit(code)


@cli.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--top", default=10, show_default=True, help="How many modules to list.")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json instead of the text summary.")
@click.option(
    "--html",
    "html_path",
    is_flag=False,
    flag_value="",
    default=None,
    metavar="[PATH]",
    help="Write a self-contained HTML report (default RUN_DIR/report.html) and print its path.",
)
@click.option("--tree", is_flag=True, help="Print the model like print(model), annotated per module.")
@click.option("--depth", type=click.IntRange(min=1), default=None, help="--tree: levels shown [all].")
@click.option(
    "--sort",
    type=click.Choice(["model", "time", "params"]),
    default="model",
    show_default=True,
    help="--tree: order of sibling modules.",
)
def report(
    run_dir: str, top: int, as_json: bool, html_path: str | None, tree: bool, depth: int | None, sort: str
) -> None:
    """Print the summary of a finished (or still running, or killed) run directory.

    Reads only the run's files, so it works on another machine and on a run that was killed.
    """
    from hooktrace.report.load import ReportError, load_run

    if not tree and (depth is not None or sort != "model"):
        raise click.UsageError("--depth and --sort shape the --tree output: add --tree")
    if html_path is None and not tree:
        _print_summary(run_dir, top, as_json)
        return
    try:
        run = load_run(run_dir)
        if html_path is not None:
            from hooktrace.report.html import write_html

            try:
                click.echo(write_html(run, html_path or None))
            except OSError as exc:  # a read-only run directory, say on a shared filesystem
                raise click.ClickException(f"cannot write the report: {exc}; choose a file with --html PATH") from None
        if tree:
            _print_tree(run, depth, sort)
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None


def _print_summary(run_dir: str, top: int, as_json: bool) -> None:
    import json

    from hooktrace.summary import RunSummary
    from hooktrace.summary_builder import merge_dir

    merged = merge_dir(run_dir, check_gradients=True)
    if not merged:  # killed before its first checkpoint: rebuilt from steps.jsonl and the trace files
        from hooktrace.report.load import ReportError, load_run
        from hooktrace.report.rows import summary_from_files

        try:
            merged = summary_from_files(load_run(run_dir))
        except ReportError as exc:
            raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(merged, indent=1))
    else:
        click.echo(RunSummary.from_dict(merged).render(top))


def _print_tree(run: Any, depth: int | None, sort: str) -> None:
    """Colours through rich on a terminal, plain text when piped."""
    from rich.console import Console

    from hooktrace.report.tree import render_plain, render_rich, tree_lines

    lines, notes = tree_lines(run, depth=depth, sort=sort)
    console = Console()
    if console.is_terminal:
        console.print(render_rich(lines, notes), soft_wrap=True, highlight=False)
    else:
        click.echo(render_plain(lines, notes))


@cli.command()
@click.argument("base_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("new_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--fail-above", type=float, default=None, metavar="PCT", help="Exit 1 if anything slowed by more than PCT%."
)
@click.option("--noise", type=float, default=10.0, show_default=True, metavar="PCT", help="Smaller changes are noise.")
@click.option(
    "--min-share",
    type=float,
    default=1.0,
    show_default=True,
    metavar="PCT",
    help="Changes under PCT% of the base step time are noise.",
)
@click.option("--top", default=15, show_default=True, help="How many modules to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
def diff(
    base_dir: str, new_dir: str, fail_above: float | None, noise: float, min_share: float, top: int, as_json: bool
) -> None:
    """Compare run NEW_DIR against BASE_DIR: step time, phases, then modules ranked by change."""
    import json

    from hooktrace.report.diff import compare, render_diff
    from hooktrace.report.load import ReportError, load_run

    try:
        result = compare(
            load_run(base_dir), load_run(new_dir), noise_pct=noise, min_share_pct=min_share, fail_above=fail_above
        )
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result.as_dict(), indent=1) if as_json else render_diff(result, top))
    if result.failed:
        sys.exit(1)


@cli.command()
def rules() -> None:
    """Print the Prometheus recording and alerting rules (pipe them into your Prometheus)."""
    from hooktrace.assets import read_asset

    click.echo(read_asset("hooktrace.rules.yml"), nl=False)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False))
def dashboards(out_dir: str) -> None:
    """Write the Grafana dashboards (JSON) into OUT_DIR."""
    from hooktrace.assets import copy_dashboards

    for path in copy_dashboards(out_dir):
        click.echo(path)


cli.add_command(top_command)
cli.add_command(stack_group)


def main() -> None:
    cli(prog_name="hooktrace")


if __name__ == "__main__":
    main()
