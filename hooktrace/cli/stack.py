"""``hooktrace stack up|down|status``: Prometheus and Alertmanager from local binaries, no Docker.

``up`` writes the configs into a state directory, starts ``prometheus`` and ``prometheus-alertmanager``
(or ``alertmanager``) from ``PATH`` on 127.0.0.1, waits until each answers ``/-/ready`` and records
what it started::

    <state>/prometheus.yml  alertmanager.yml  rules/hooktrace.rules.yml   generated on every ``up``
    <state>/prometheus.pid  alertmanager.pid                              one pid per line
    <state>/stack.json      each server's URL, argv and log (what ``status`` and ``down`` check)
    <state>/prometheus.log  alertmanager.log  prometheus-data/  alertmanager-data/

Prometheus scrapes every ``<runs-dir>/*/targets.json`` (file_sd; each ``hooktrace run`` lists its
ranks in ``<out>/targets.json``) with ``honor_labels``, evaluates the packaged rules and sends alerts
to the Alertmanager. ``down`` stops only processes whose command line is the one recorded in
``stack.json``, so a reused pid is never signalled. The configs are written as JSON (valid YAML), so
the stack needs no YAML library at run time.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

__all__ = ["alertmanager_config", "prometheus_config", "stack_group"]

DEFAULT_STATE_DIR = Path("~/.cache/hooktrace/stack")
RULES_NAME = "hooktrace.rules.yml"
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 15


@dataclass(frozen=True)
class _Server:
    """One server of the stack: its names, the binaries that provide it and its port flag."""

    name: str
    binaries: tuple[str, ...]
    port_flag: str
    debian_package: str


PROMETHEUS = _Server("prometheus", ("prometheus",), "--prometheus-port", "prometheus")
ALERTMANAGER = _Server(
    "alertmanager", ("prometheus-alertmanager", "alertmanager"), "--alertmanager-port", "prometheus-alertmanager"
)
SERVERS = (ALERTMANAGER, PROMETHEUS)
"""In start order: Prometheus sends to an Alertmanager that is already up."""


def prometheus_config(
    runs_dir: Path, rules_file: Path, alertmanager_port: int, scrape_interval_s: int = 2
) -> dict[str, Any]:
    """The Prometheus config of the local stack (absolute paths; JSON-serialisable)."""
    interval = f"{scrape_interval_s}s"
    return {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(rules_file)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]},
        "scrape_configs": [
            {
                # The agent's series carry run_id and rank, and so do the targets it lists.
                "job_name": "hooktrace",
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(runs_dir / "*" / "targets.json")], "refresh_interval": "5s"}],
            }
        ],
    }


def alertmanager_config() -> dict[str, Any]:
    """The default Alertmanager config: alerts are kept and shown in its UI, not sent anywhere.

    Pass ``--alertmanager-config FILE`` (e.g. deploy/local/alertmanager.example.yml) to notify.
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


# -- processes -----------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None when it is gone (or a zombie)."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            raw = (proc / "cmdline").read_bytes()
        except OSError:
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]] or None
    try:  # no /proc (macOS): ask ps
        out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.split() or None


def _reap(pid: int) -> bool:
    """Collect ``pid`` if it is an exited child of this process; True when it has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid


def _alive(pid: int) -> bool:
    if _reap(pid):
        return False
    return _cmdline(pid) is not None


def _ours(pid: int, argv: list[str]) -> bool:
    """Whether ``pid`` is alive and runs exactly ``argv`` (the one ``up`` recorded)."""
    if _reap(pid):
        return False
    cmdline = _cmdline(pid)
    if cmdline is None:
        return False
    return cmdline == argv or " ".join(cmdline) == " ".join(argv)


def _spawn(argv: list[str], log: Path) -> int:
    """Start ``argv`` in a new session (it outlives this command), output appended to ``log``."""
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null_fd = os.open(os.devnull, os.O_RDONLY)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            dict(os.environ),
            file_actions=[(os.POSIX_SPAWN_DUP2, null_fd, 0), (os.POSIX_SPAWN_DUP2, log_fd, 1),
                          (os.POSIX_SPAWN_DUP2, log_fd, 2)],
            setsid=True,
        )  # fmt: skip
    finally:
        os.close(log_fd)
        os.close(null_fd)


def _stop(pid: int, timeout: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait, then SIGKILL; returns when the process is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1.0) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
    except OSError:
        return False


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option as the servers (Go sets it): a port only in TIME_WAIT is free for them too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _log_tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-_LOG_TAIL_LINES:])


# -- state ---------------------------------------------------------------------------------------


class _State:
    """The files of one stack under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.manifest = root / "stack.json"

    def pid_file(self, server: _Server) -> Path:
        return self.root / f"{server.name}.pid"

    def log(self, server: _Server) -> Path:
        return self.root / f"{server.name}.log"

    def entries(self) -> dict[str, dict[str, Any]]:
        try:
            loaded = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def pid(self, server: _Server) -> int | None:
        try:
            return int(self.pid_file(server).read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self, server: _Server) -> int | None:
        """The pid of ``server`` if it is alive and is the process ``up`` started."""
        pid, entry = self.pid(server), self.entries().get(server.name)
        if pid is None or not entry:
            return None
        return pid if _ours(pid, list(entry.get("argv", []))) else None

    def record(self, server: _Server, pid: int, url: str, argv: list[str]) -> None:
        entries = self.entries()
        entries[server.name] = {"pid": pid, "url": url, "argv": argv, "log": str(self.log(server))}
        _write_atomic(self.manifest, json.dumps(entries, indent=2) + "\n")
        _write_atomic(self.pid_file(server), f"{pid}\n")

    def forget(self, server: _Server) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.pid_file(server).unlink()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _find_binary(server: _Server) -> str:
    for name in server.binaries:
        path = shutil.which(name)
        if path is not None:
            return path
    names = " or ".join(server.binaries)
    raise click.ClickException(
        f"{names} not found on PATH; install it (Debian/Ubuntu: apt-get install {server.debian_package}) "
        "or use the Docker stack in deploy/compose"
    )


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
@click.option(
    "--scrape-interval", type=click.IntRange(1, 60), default=2, show_default=True, help="Seconds between scrapes."
)
@click.option(
    "--alertmanager-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Your Alertmanager config (receivers); default: alerts are only shown in the Alertmanager UI.",
)
@click.option("--retention", default="7d", show_default=True, help="How long Prometheus keeps samples.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for each server.")
def up(
    state_dir: Path,
    runs_dir: Path,
    prometheus_port: int,
    alertmanager_port: int,
    scrape_interval: int,
    alertmanager_config: Path | None,
    retention: str,
    timeout: float,
) -> None:
    """Start Prometheus and Alertmanager on 127.0.0.1, scraping every run under --runs-dir."""
    from hooktrace.assets import read_asset

    state = _State(state_dir.expanduser().resolve())
    running = [s for s in SERVERS if state.running(s) is not None]
    if len(running) == len(SERVERS):
        click.echo(f"the stack in {state.root} is already running:")
        _print_status(state)
        return
    if running:
        raise click.ClickException(
            f"part of the stack in {state.root} is running; run `hooktrace stack down --state-dir {state.root}` first"
        )
    if prometheus_port == alertmanager_port:
        raise click.ClickException("--prometheus-port and --alertmanager-port must differ")
    binaries = {s.name: _find_binary(s) for s in SERVERS}
    ports = {PROMETHEUS.name: prometheus_port, ALERTMANAGER.name: alertmanager_port}
    for server in SERVERS:
        if _port_taken(ports[server.name]):
            raise click.ClickException(
                f"port {ports[server.name]} on 127.0.0.1 is in use; pick a free one with {server.port_flag}"
            )

    runs = runs_dir.expanduser().resolve()
    runs.mkdir(parents=True, exist_ok=True)
    (state.root / "rules").mkdir(parents=True, exist_ok=True)
    rules_file = state.root / "rules" / RULES_NAME
    _write_atomic(rules_file, read_asset(RULES_NAME))
    prom_config, am_config = state.root / "prometheus.yml", state.root / "alertmanager.yml"
    config = prometheus_config(runs, rules_file, alertmanager_port, scrape_interval)
    _write_atomic(prom_config, json.dumps(config, indent=2) + "\n")
    if alertmanager_config is None:
        _write_atomic(am_config, json.dumps(alertmanager_config_default(), indent=2) + "\n")
    else:
        am_config = alertmanager_config.resolve()

    argvs = {
        ALERTMANAGER.name: [
            binaries[ALERTMANAGER.name],
            f"--config.file={am_config}",
            f"--storage.path={state.root / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{alertmanager_port}",
            f"--web.external-url=http://127.0.0.1:{alertmanager_port}",
            "--cluster.listen-address=",
        ],
        PROMETHEUS.name: [
            binaries[PROMETHEUS.name],
            f"--config.file={prom_config}",
            f"--storage.tsdb.path={state.root / 'prometheus-data'}",
            f"--storage.tsdb.retention.time={retention}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
            f"--web.external-url=http://127.0.0.1:{prometheus_port}",
            "--web.enable-lifecycle",
            "--enable-feature=exemplar-storage",
        ],
    }
    click.echo(f"hooktrace stack: state in {state.root}")
    started: list[tuple[_Server, int]] = []
    try:
        for server in SERVERS:
            url = f"http://127.0.0.1:{ports[server.name]}"
            pid = _start(state, server, argvs[server.name], url, timeout)
            started.append((server, pid))
    except BaseException:
        for server, pid in reversed(started):
            _stop(pid)
            state.forget(server)
        raise
    click.echo(f"scraping {runs / '*' / 'targets.json'} every {scrape_interval}s (rules: {RULES_NAME})")
    click.echo(f"watch a run:  hooktrace run --out {runs}/<name> train.py   (metrics on, the default)")
    click.echo(f"stop:         hooktrace stack down --state-dir {state.root}")


def alertmanager_config_default() -> dict[str, Any]:
    return alertmanager_config()


def _start(state: _State, server: _Server, argv: list[str], url: str, timeout: float) -> int:
    """Spawn one server, record it, and wait for /-/ready with progress; raise if it never is."""
    log = state.log(server)
    click.echo(f"{server.name:<13} starting on {url} ...", nl=False)
    start = time.monotonic()
    pid = _spawn(argv, log)
    state.record(server, pid, url, argv)
    while not _ready(url):
        if _reap(pid) or _cmdline(pid) is None:
            state.forget(server)
            click.echo(" failed")
            raise click.ClickException(f"{server.name} exited before it was ready; {log}:\n{_log_tail(log)}")
        if time.monotonic() - start > timeout:
            click.echo(" timed out")
            _stop(pid)
            state.forget(server)
            raise click.ClickException(
                f"{server.name} not ready after {timeout:.0f}s (raise --timeout?); {log}:\n{_log_tail(log)}"
            )
        time.sleep(0.2)
    click.echo(f" ready ({time.monotonic() - start:.1f}s, pid {pid})")
    return pid


@stack_group.command("status")
@_state_dir_option
@click.pass_context
def status(ctx: click.Context, state_dir: Path) -> None:
    """Show each server's URL and whether it is alive; exit 1 unless all are."""
    state = _State(state_dir.expanduser().resolve())
    if not _print_status(state):
        ctx.exit(1)


def _print_status(state: _State) -> bool:
    entries = state.entries()
    click.echo(f"state: {state.root}")
    all_up = True
    for server in reversed(SERVERS):
        entry = entries.get(server.name, {})
        url = entry.get("url", "-")
        pid = state.running(server)
        if pid is None:
            all_up = False
            click.echo(f"{server.name:<13} stopped  {url}")
        else:
            health = "ready" if _ready(url) else "not ready"
            click.echo(f"{server.name:<13} running  {url}  pid {pid}  {health}")
    return all_up


@stack_group.command("down")
@_state_dir_option
def down(state_dir: Path) -> None:
    """Stop the servers that `hooktrace stack up` started (data and configs are kept)."""
    state = _State(state_dir.expanduser().resolve())
    entries = state.entries()
    stopped = 0
    for server in reversed(SERVERS):  # Prometheus first: it sends to Alertmanager
        pid = state.pid(server)
        if pid is None:
            continue
        argv = list(entries.get(server.name, {}).get("argv", []))
        if not argv or not _ours(pid, argv):
            note = "not running" if not _alive(pid) else "now another process (pid reused); not touched"
            click.echo(f"{server.name:<13} pid {pid} {note}")
            state.forget(server)
            continue
        click.echo(f"{server.name:<13} stopping pid {pid} ...", nl=False)
        _stop(pid)
        state.forget(server)
        stopped += 1
        click.echo(" stopped")
    if not stopped:
        click.echo(f"nothing to stop in {state.root}")


if __name__ == "__main__":
    stack_group(prog_name="hooktrace stack")
