"""Real Prometheus, Alertmanager and a webhook receiver on loopback, for integration and e2e tests.

Every server binds 127.0.0.1 on a free port, writes its config, data and log under the test's
``tmp_path`` (read ``<tmp_path>/<name>-<port>/<name>.log`` after a failure; timeouts quote its tail)
and is a context manager that stops it. A typical pipeline test::

    with (
        WebhookReceiver() as webhook,
        start_alertmanager(tmp_path, webhook.url) as alertmanager,
        start_prometheus(tmp_path, static_targets=[f"127.0.0.1:{port}"], rule_files=[RULES_FILE],
                         alertmanager_url=alertmanager.url) as prometheus,
    ):
        ...  # start something that serves /metrics on `port`
        alert = webhook.wait_for_alert("HooktraceGradientExplosion", timeout=60)

Binaries missing on a developer machine skip the test; with ``CI`` set they fail it. ``make test``
installs them first (``tests/ensure_servers.sh``), so it skips none of these tests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES_FILE = REPO_ROOT / "deploy" / "rules" / "hooktrace.rules.yml"
RULES_TEST_FILE = REPO_ROOT / "deploy" / "rules" / "hooktrace.rules.test.yml"

_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_CHARS = 4000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, *alternatives: str) -> str:
    """Return the path of executable ``name``; skip the test without it, or fail it when ``CI`` is set.

    Looks on ``PATH`` and then in ``/usr/bin`` for ``name``, then for each of ``alternatives``
    (upstream calls Debian's ``prometheus-alertmanager`` plain ``alertmanager``).
    """
    for candidate in (name, *alternatives):
        path = shutil.which(candidate) or shutil.which(candidate, path="/usr/bin")
        if path is not None:
            return path
    names = " or ".join(repr(n) for n in (name, *alternatives))
    reason = (
        f"{names} not found on PATH or in /usr/bin (`make test` installs them, or: "
        "sudo apt-get install prometheus prometheus-alertmanager)"
    )
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def http_get_json(url: str, timeout: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body (urllib only); HTTP errors raise with the body quoted."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        with exc:
            body = exc.read().decode(errors="replace")
        raise RuntimeError(f"GET {url} -> HTTP {exc.code}: {body}") from exc


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        exc.close()
        return False
    except OSError:
        return False


def write_file_sd(path: Path, targets: Sequence[str], labels: dict[str, str] | None = None) -> None:
    """Write a Prometheus file_sd JSON file atomically (Prometheus never reads half a file)."""
    groups = [{"targets": list(targets), "labels": dict(labels or {})}]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(groups))
    tmp.replace(path)


class ServerProcess:
    """A server binary run as a child process, its output in ``log_path``; stopped by ``stop()``.

    Starting waits for ``ready_url`` to answer 200; if the process exits or the wait times out,
    the process is stopped and the error quotes the log's tail.
    """

    def __init__(self, name: str, argv: Sequence[str], *, workdir: Path, url: str) -> None:
        self.name = name
        self.url = url
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        try:
            self._process: subprocess.Popen[bytes] = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        except BaseException:
            self._log.close()
            raise

    def wait_ready(self, ready_url: str, timeout: float = _START_TIMEOUT_S) -> None:
        """Block until ``ready_url`` answers 200; stop the process and raise if it never does."""
        deadline = time.monotonic() + timeout
        try:
            while not _is_ready(ready_url):
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self._process.returncode} before ready:\n{self.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} not ready at {ready_url} after {timeout}s:\n{self.log_tail()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise

    def log_tail(self, chars: int = _LOG_TAIL_CHARS) -> str:
        """Return the last ``chars`` characters of the server's combined stdout and stderr."""
        text = self.log_path.read_text(errors="replace")
        return text[-chars:]

    def stop(self) -> None:
        """Terminate the process, wait for it (kill it after 10 s); idempotent."""
        try:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
        finally:
            self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Terminate a run started by a test (its launcher passes SIGTERM on), kill it after ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def prom_query(url: str, promql: str) -> list[dict[str, Any]]:
    """Instant query against the Prometheus at ``url``; ``data.result``."""
    body = http_get_json(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    if body.get("status") != "success":
        raise RuntimeError(f"query {promql!r} failed: {body}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_for_series(
    url: str,
    promql: str,
    timeout: float,
    *,
    run: subprocess.Popen[bytes] | None = None,
    run_log: Path | None = None,
    server_log: Callable[[], str] | None = None,
) -> list[dict[str, Any]]:
    """Poll ``promql`` until it returns a series; fail with the targets' health and the logs on
    timeout, or as soon as ``run`` (the scraped job) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        result = prom_query(url, promql)
        if result:
            return result
        exited = run is not None and run.poll() is not None
        if exited or time.monotonic() > deadline:
            targets = http_get_json(f"{url}/api/v1/targets")["data"]["activeTargets"]
            health = [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in targets]
            why = f"the run exited with {run.returncode}" if exited and run is not None else f"{timeout}s passed"
            if run_log is not None:
                log = run_log.read_text(errors="replace")[-4000:]
            else:
                log = server_log() if server_log is not None else ""
            raise AssertionError(f"no result for {promql!r} ({why}); targets: {health}\nlog:\n{log}")
        time.sleep(0.25)


class PrometheusServer(ServerProcess):
    """A running ``prometheus``; query it through its HTTP API."""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """Run an instant query now and return ``data.result`` (a list of series for a vector)."""
        return prom_query(self.url, promql)

    def wait_for(
        self,
        promql: str,
        timeout: float = 30.0,
        *,
        run: subprocess.Popen[bytes] | None = None,
        run_log: Path | None = None,
    ) -> list[dict[str, Any]]:
        """Poll ``promql`` until it returns something, and return that; raise AssertionError on
        timeout, or at once when ``run`` (the job being scraped) exits, with its log."""
        return wait_for_series(self.url, promql, timeout, run=run, run_log=run_log, server_log=self.log_tail)

    def targets_health(self) -> list[dict[str, Any]]:
        """Return each active target's scrape URL, health and last error (for failure messages)."""
        targets = http_get_json(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
        return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in targets]


def _workdir(tmp_path: Path, name: str, port: int) -> Path:
    workdir = tmp_path / f"{name}-{port}"
    workdir.mkdir(parents=True)
    return workdir


def prometheus_config(
    *,
    scrape_targets_file: Path | None = None,
    static_targets: Sequence[str] = (),
    rule_files: Sequence[Path] = (),
    alertmanager_url: str | None = None,
    interval: str = "1s",
) -> dict[str, Any]:
    """Build the Prometheus config that ``start_prometheus`` writes (one scrape job, ``hooktrace``)."""
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
    }
    # honor_labels: the agent's series carry run_id and rank, and so do its file_sd targets.
    job: dict[str, Any] = {"job_name": "hooktrace", "honor_labels": True}
    if scrape_targets_file is not None:
        job["file_sd_configs"] = [{"files": [str(Path(scrape_targets_file).resolve())], "refresh_interval": "1s"}]
    if static_targets:
        job["static_configs"] = [{"targets": list(static_targets)}]
    if len(job) > 2:
        config["scrape_configs"] = [job]
    if alertmanager_url is not None:
        host_port = urllib.parse.urlsplit(alertmanager_url).netloc
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host_port]}]}]}
    return config


def start_prometheus(
    tmp_path: Path,
    *,
    scrape_targets_file: Path | None = None,
    static_targets: Sequence[str] = (),
    rule_files: Sequence[Path] = (),
    alertmanager_url: str | None = None,
    interval: str = "1s",
) -> PrometheusServer:
    """Start ``prometheus`` on 127.0.0.1:<free port> and wait until it is ready.

    Scrapes ``static_targets`` and/or the file_sd JSON file ``scrape_targets_file`` (re-read every
    second; it may be written later, see ``write_file_sd``) every ``interval``, evaluates
    ``rule_files`` every ``interval`` and sends alerts to ``alertmanager_url`` (re-sent every
    ``interval`` rather than every minute, so a late Alertmanager still hears of them quickly).
    """
    binary = require_binary("prometheus")
    port = free_port()
    workdir = _workdir(tmp_path, "prometheus", port)
    config_path = workdir / "prometheus.yml"
    config = prometheus_config(
        scrape_targets_file=scrape_targets_file,
        static_targets=static_targets,
        rule_files=rule_files,
        alertmanager_url=alertmanager_url,
        interval=interval,
    )
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        f"--rules.alert.resend-delay={interval}",
        "--log.level=debug",
    ]
    server = PrometheusServer("prometheus", argv, workdir=workdir, url=f"http://127.0.0.1:{port}")
    server.wait_ready(f"{server.url}/-/ready")
    return server


def start_alertmanager(tmp_path: Path, webhook_url: str) -> ServerProcess:
    """Start ``prometheus-alertmanager`` on 127.0.0.1:<free port>, routing every alert to ``webhook_url``.

    Clustering is off (``--cluster.listen-address=``); each alert is its own group (``group_by:
    [...]``), notified without waiting (``group_wait: 0s``) and re-checked every second.
    """
    binary = require_binary("prometheus-alertmanager", "alertmanager")
    port = free_port()
    workdir = _workdir(tmp_path, "alertmanager", port)
    config_path = workdir / "alertmanager.yml"
    config = {
        "route": {
            "receiver": "webhook",
            "group_by": ["..."],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "webhook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=debug",
    ]
    server = ServerProcess("alertmanager", argv, workdir=workdir, url=f"http://127.0.0.1:{port}")
    server.wait_ready(f"{server.url}/-/ready")
    return server


class _WebhookHandler(BaseHTTPRequestHandler):
    server: _WebhookHTTPServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            self.send_error(400, "body is not JSON")
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.server.receiver._add(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        """Silence the per-request stderr log."""


class _WebhookHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: WebhookReceiver


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 (in a thread) collecting the JSON bodies POSTed to it.

    Point an Alertmanager webhook at ``url``; ``bodies`` holds Alertmanager's notifications.
    """

    def __init__(self) -> None:
        self._bodies: list[Any] = []
        self._changed = threading.Condition()
        self._httpd = _WebhookHTTPServer(("127.0.0.1", 0), _WebhookHandler)
        self._httpd.receiver = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/alerts"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="webhook-receiver",
            daemon=True,
        )
        self._thread.start()

    def _add(self, body: Any) -> None:
        with self._changed:
            self._bodies.append(body)
            self._changed.notify_all()

    @property
    def bodies(self) -> list[Any]:
        """A copy of every body received so far, oldest first."""
        with self._changed:
            return list(self._bodies)

    def _find_alert(self, alertname: str, status: str) -> dict[str, Any] | None:
        for body in self._bodies:
            for alert in body.get("alerts", []) if isinstance(body, dict) else []:
                if alert.get("labels", {}).get("alertname") == alertname and alert.get("status") == status:
                    return dict(alert)
        return None

    def wait_for_alert(self, alertname: str, timeout: float = 30.0, *, status: str = "firing") -> dict[str, Any]:
        """Return the first received alert named ``alertname`` with ``status``; AssertionError on timeout.

        The alert is Alertmanager's webhook form: ``status``, ``labels``, ``annotations``,
        ``startsAt``, ``endsAt``, ``generatorURL``, ``fingerprint``.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while (alert := self._find_alert(alertname, status)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {status} {alertname} received after {timeout}s; received: {self._bodies}")
                self._changed.wait(remaining)
            return alert

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
