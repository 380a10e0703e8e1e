"""``hooktrace stack up|down|status``: Prometheus and Alertmanager from local binaries, no Docker.

``up`` writes the configs into a state directory, starts three processes on 127.0.0.1 and waits
until each is ready, printing progress:

- ``alertmanager``: ``prometheus-alertmanager`` (Debian) or ``alertmanager`` from ``PATH``;
- ``targets``: this file run as a script (``sync-targets``): every second it merges the
  ``<runs-dir>/*/targets.json`` that each ``hooktrace run`` writes into one file_sd file, because
  Prometheus' file_sd only globs the last path element (``runs/*/targets.json`` is refused);
- ``prometheus``: scrapes that file's targets with ``honor_labels`` (the series carry ``run_id``
  and ``rank``), evaluates the packaged rules, keeps exemplars and alerts the Alertmanager.

State directory::

    prometheus.yml  alertmanager.yml  rules/hooktrace.rules.yml   written on every ``up``
    targets/runs.json                                             the merged file_sd targets
    <name>.pid  <name>.log  stack.json                            what ``status``/``down`` check
    prometheus-data/  alertmanager-data/

``down`` signals only a pid whose command line is the argv recorded in ``stack.json``, so a reused
pid is never touched. Configs are JSON (valid YAML): the stack needs no YAML library.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

__all__ = ["alertmanager_config", "merge_targets", "prometheus_config", "stack_group"]

DEFAULT_STATE_DIR = Path("~/.cache/hooktrace/stack")
RULES_NAME = "hooktrace.rules.yml"
ALERTMANAGER, TARGETS, PROMETHEUS = "alertmanager", "targets", "prometheus"
ORDER = (ALERTMANAGER, TARGETS, PROMETHEUS)
"""Start order (stopped in reverse): Prometheus needs its targets file and its Alertmanager."""
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 15


def prometheus_config(
    targets_file: Path, rules_file: Path, alertmanager_port: int, scrape_interval_s: int = 2
) -> dict[str, Any]:
    """The Prometheus config of the local stack (absolute paths; JSON-serialisable)."""
    interval = f"{scrape_interval_s}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_file)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
        "scrape_configs": [
            {
                "job_name": "hooktrace",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "5s"}],
            }
        ],
    }


def alertmanager_config() -> dict[str, Any]:
    """The default Alertmanager config: alerts are kept and shown in its UI, sent nowhere.

    ``--alertmanager-config FILE`` (e.g. deploy/local/alertmanager.example.yml) replaces it.
    """
    return {
        "route": {
            "receiver": "ui-only",
            "group_by": ["alertname", "run_id"],
            "group_wait": "10s",
            "group_interval": "1m",
            "repeat_interval": "4h",
        },
        "receivers": [{"name": "ui-only"}],
    }


def merge_targets(runs_dir: Path) -> list[dict[str, Any]]:
    """The file_sd groups of every ``runs_dir/*/targets.json``, in path order.

    A file that is missing, half-written or not file_sd-shaped contributes nothing (the runs write
    atomically, so this only skips foreign files). deploy/compose/targets-sync/sync.py does the
    same for the Docker stack; a test keeps the two identical.
    """
    groups: list[dict[str, Any]] = []
    for path in sorted(runs_dir.glob("*/targets.json")):
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        groups += [
            {"targets": group["targets"], "labels": group.get("labels") or {}}
            for group in (loaded if isinstance(loaded, list) else [])
            if _is_group(group)
        ]
    return groups


def _is_group(group: Any) -> bool:
    """Whether ``group`` is a file_sd target group: non-empty string targets, string labels."""
    if not isinstance(group, dict):
        return False
    targets, labels = group.get("targets"), group.get("labels") or {}
    return (
        isinstance(targets, list)
        and bool(targets)
        and all(isinstance(t, str) for t in targets)
        and isinstance(labels, dict)
        and all(isinstance(v, str) for v in labels.values())
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    tmp.replace(path)


# -- processes -----------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a live process; None when it is gone or a zombie."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]] or None
    try:  # no /proc (macOS)
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.split() or None


def _reaped(pid: int) -> bool | None:
    """Collect ``pid`` if it is an exited child of this process: True when it was, False when it
    still runs, None when it is not (or no longer) a child of ours."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return done == pid


def _alive(pid: int) -> bool:
    return not _reaped(pid) and _cmdline(pid) is not None


def _runs(pid: int, argv: list[str]) -> bool:
    """Whether ``pid`` is alive and runs exactly ``argv``."""
    cmdline = _cmdline(pid) if not _reaped(pid) else None
    return cmdline is not None and (cmdline == argv or " ".join(cmdline) == " ".join(argv))


def _spawn(argv: list[str], log: Path) -> int:
    """Start ``argv`` in its own session (it outlives this command), its output appended to ``log``."""
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        actions = [
            (os.POSIX_SPAWN_DUP2, null_fd, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ]
        return os.posix_spawn(argv[0], argv, dict(os.environ), file_actions=actions, setsid=True)
    finally:
        os.close(log_fd)
        os.close(null_fd)


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _STOP_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    # An exiting child shows an empty cmdline before it can be reaped: collect it, so no zombie
    # of ours is left behind (bounded: it has already been signalled).
    reap_deadline = time.monotonic() + 5.0
    while _reaped(pid) is False and time.monotonic() < reap_deadline:
        time.sleep(0.02)


NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""An opener that ignores HTTP(S)_PROXY, as Prometheus does when it scrapes: a proxy meant for
the internet must not swallow loopback or cluster-internal servers and ranks (stack, top)."""


def _http_ready(url: str) -> bool:
    try:
        with NO_PROXY_OPENER.open(f"{url}/-/ready", timeout=1.0) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
    except OSError:
        return False


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the Go servers do
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _find_binary(*names: str, package: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    raise click.ClickException(
        f"{' or '.join(names)} not found on PATH; install it (Debian/Ubuntu: apt-get install {package}) "
        "or use the Docker stack in deploy/compose"
    )


# -- state ---------------------------------------------------------------------------------------


class _State:
    """The files of one stack under ``root``: configs, pid files and ``stack.json``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = root / "stack.json"
        self.targets_file = root / "targets" / "runs.json"

    def log(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def entries(self) -> dict[str, dict[str, Any]]:
        try:
            loaded = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def pid(self, name: str) -> int | None:
        try:
            return int((self.root / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self, name: str) -> int | None:
        """The pid of ``name`` if it is alive and is the process ``up`` started."""
        pid, argv = self.pid(name), self.entries().get(name, {}).get("argv")
        return pid if pid is not None and argv and _runs(pid, list(argv)) else None

    def record(self, name: str, pid: int, argv: list[str], url: str | None) -> None:
        entries = self.entries()
        entries[name] = {"pid": pid, "url": url, "argv": argv, "log": str(self.log(name))}
        _write_atomic(self.manifest, json.dumps(entries, indent=2) + "\n")
        _write_atomic(self.root / f"{name}.pid", f"{pid}\n")

    def forget(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / f"{name}.pid").unlink()


def _wait_ready(
    state: _State, name: str, pid: int, ready: Callable[[], bool], timeout: float
) -> tuple[str, bool] | None:
    """Wait for ``ready()``, finishing the progress line; on failure return (why, quoting the log; exited).

    ``pid`` is a child of this process: until it is reaped here its pid cannot be reused, and its
    exit is seen through waitpid (its /proc cmdline is briefly empty right after the spawn).
    """
    log, start = state.log(name), time.monotonic()
    while not ready():
        exited = _reaped(pid) is True
        if exited:
            failure = "exited before it was ready"
        elif time.monotonic() - start > timeout:
            failure = f"not ready after {timeout:.0f}s (raise --timeout?)"
        else:
            time.sleep(0.2)
            continue
        click.echo(" failed")
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
        return f"{name} {failure}; {log}:\n{tail}", exited
    click.echo(f" ready ({time.monotonic() - start:.1f}s, pid {pid})")
    return None


# -- commands ------------------------------------------------------------------------------------

_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Where the stack keeps its configs, data, logs and pid files.",
)


@click.group("stack")
def stack_group() -> None:
    """Run Prometheus and Alertmanager locally (no Docker) to watch hooktrace runs."""


@stack_group.command("up")
@_state_dir_option
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("hooktrace-runs"),
    show_default=True,
    help="Parent of the runs' --out directories; every */targets.json in it is scraped.",
)
@click.option("--prometheus-port", type=click.IntRange(1, 65535), default=9090, show_default=True)
@click.option("--alertmanager-port", type=click.IntRange(1, 65535), default=9093, show_default=True)
@click.option("--scrape-interval", type=click.IntRange(1, 60), default=2, show_default=True, help="Seconds.")
@click.option(
    "--alertmanager-config",
    "alertmanager_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your Alertmanager config (receivers) instead of the default, which notifies no one.",
)
@click.option("--retention", default="7d", show_default=True, help="How long Prometheus keeps samples.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for each server.")
def up(
    state_dir: Path,
    runs_dir: Path,
    prometheus_port: int,
    alertmanager_port: int,
    scrape_interval: int,
    alertmanager_file: Path | None,
    retention: str,
    timeout: float,
) -> None:
    """Start Prometheus and Alertmanager on 127.0.0.1, scraping every run under --runs-dir."""
    from hooktrace.assets import read_asset

    state = _State(state_dir.expanduser().resolve())
    running = [name for name in ORDER if state.running(name) is not None]
    if len(running) == len(ORDER):
        click.echo(f"the stack in {state.root} is already running")
        _print_status(state)
        return
    if running:
        raise click.ClickException(f"part of the stack in {state.root} is running; run `hooktrace stack down` first")
    if prometheus_port == alertmanager_port:
        raise click.ClickException("--prometheus-port and --alertmanager-port must differ")
    prometheus = _find_binary("prometheus", package="prometheus")
    alertmanager = _find_binary("prometheus-alertmanager", "alertmanager", package="prometheus-alertmanager")
    for port, flag in ((prometheus_port, "--prometheus-port"), (alertmanager_port, "--alertmanager-port")):
        if _port_taken(port):
            raise click.ClickException(f"port {port} on 127.0.0.1 is in use; pick a free one with {flag}")

    runs = runs_dir.expanduser().resolve()
    runs.mkdir(parents=True, exist_ok=True)
    for sub in ("rules", "targets"):
        (state.root / sub).mkdir(parents=True, exist_ok=True)
    rules_file, prom_config = state.root / "rules" / RULES_NAME, state.root / "prometheus.yml"
    _write_atomic(rules_file, read_asset(RULES_NAME))
    config = prometheus_config(state.targets_file, rules_file, alertmanager_port, scrape_interval)
    _write_atomic(prom_config, json.dumps(config, indent=2) + "\n")
    am_config = alertmanager_file.resolve() if alertmanager_file else state.root / "alertmanager.yml"
    if alertmanager_file is None:
        _write_atomic(am_config, json.dumps(alertmanager_config(), indent=2) + "\n")
    with contextlib.suppress(FileNotFoundError):
        state.targets_file.unlink()  # its reappearance tells that the sync process is up

    am_url, prom_url = f"http://127.0.0.1:{alertmanager_port}", f"http://127.0.0.1:{prometheus_port}"
    plan: dict[str, tuple[list[str], str | None, Callable[[], bool]]] = {
        ALERTMANAGER: (
            [alertmanager, f"--config.file={am_config}", f"--storage.path={state.root / 'alertmanager-data'}",
             f"--web.listen-address=127.0.0.1:{alertmanager_port}", f"--web.external-url={am_url}",
             "--cluster.listen-address="],
            am_url,
            lambda: _http_ready(am_url),
        ),
        TARGETS: (
            [sys.executable, str(Path(__file__).resolve()), "sync-targets", "--runs-dir", str(runs),
             "--output", str(state.targets_file)],
            None,
            state.targets_file.exists,
        ),
        PROMETHEUS: (
            [prometheus, f"--config.file={prom_config}", f"--storage.tsdb.path={state.root / 'prometheus-data'}",
             f"--storage.tsdb.retention.time={retention}", f"--web.listen-address=127.0.0.1:{prometheus_port}",
             f"--web.external-url={prom_url}", "--web.enable-lifecycle", "--enable-feature=exemplar-storage"],
            prom_url,
            lambda: _http_ready(prom_url),
        ),
    }  # fmt: skip
    click.echo(f"hooktrace stack: state in {state.root}")
    started: list[tuple[str, int]] = []
    try:
        for name in ORDER:
            argv, url, ready = plan[name]
            click.echo(f"{name:<13} starting{f' on {url}' if url else ''} ...", nl=False)
            pid = _spawn(argv, state.log(name))
            started.append((name, pid))
            state.record(name, pid, argv, url)
            failure = _wait_ready(state, name, pid, ready, timeout)
            if failure is not None:
                message, exited = failure
                if exited:
                    started.pop()  # reaped: its pid may be reused, never signal it
                    state.forget(name)
                raise click.ClickException(message)
    except BaseException:
        for name, pid in reversed(started):
            _stop(pid)
            state.forget(name)
        raise
    click.echo(f"scraping every run in {runs} (each run's targets.json) every {scrape_interval}s")
    if runs == Path("hooktrace-runs").resolve():
        click.echo("watch a run: hooktrace run train.py   (from this directory: --out is hooktrace-runs/<run_id>)")
    else:
        click.echo(f"watch a run: hooktrace run --out {runs}/<name> train.py")
    click.echo(f"stop:        hooktrace stack down --state-dir {state.root}")


@stack_group.command("status")
@_state_dir_option
@click.pass_context
def status(ctx: click.Context, state_dir: Path) -> None:
    """Show each process, its URL and whether it is alive; exit 1 unless all are."""
    if not _print_status(_State(state_dir.expanduser().resolve())):
        ctx.exit(1)


def _print_status(state: _State) -> bool:
    entries = state.entries()
    click.echo(f"state: {state.root}")
    all_up = True
    for name in reversed(ORDER):
        url = entries.get(name, {}).get("url") or ""
        pid = state.running(name)
        if pid is None:
            all_up = False
            click.echo(f"{name:<13} stopped  {url}".rstrip())
            continue
        if url:
            detail = f"{url}  {'ready' if _http_ready(url) else 'not ready'}"
        else:
            try:
                detail = f"{len(json.loads(state.targets_file.read_text()))} target groups"
            except (OSError, ValueError):
                detail = "no targets file"
        click.echo(f"{name:<13} running  pid {pid}  {detail}")
    return all_up


@stack_group.command("down")
@_state_dir_option
def down(state_dir: Path) -> None:
    """Stop the processes `hooktrace stack up` started (data and configs are kept)."""
    state = _State(state_dir.expanduser().resolve())
    entries, stopped = state.entries(), 0
    for name in reversed(ORDER):
        pid = state.pid(name)
        if pid is None:
            continue
        argv = entries.get(name, {}).get("argv")
        if not argv or not _runs(pid, list(argv)):
            note = "another process now (pid reused); left alone" if _alive(pid) else "not running"
            click.echo(f"{name:<13} pid {pid}: {note}")
            state.forget(name)
            continue
        click.echo(f"{name:<13} stopping pid {pid} ...", nl=False)
        _stop(pid)
        state.forget(name)
        stopped += 1
        click.echo(" stopped")
    if not stopped:
        click.echo(f"nothing to stop in {state.root}")


@stack_group.command("sync-targets", hidden=True)
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--interval", type=float, default=1.0)
def sync_targets(runs_dir: Path, output: Path, interval: float) -> None:
    """Merge RUNS_DIR/*/targets.json into OUTPUT (file_sd) every INTERVAL seconds, forever."""
    last = None
    while True:
        text = json.dumps(merge_targets(runs_dir), indent=2) + "\n"
        if text != last:
            _write_atomic(output, text)
            last = text
        time.sleep(interval)


if __name__ == "__main__":  # how `up` runs sync-targets: as a script, without importing torch
    stack_group(prog_name="hooktrace stack")
