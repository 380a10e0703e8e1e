"""Prometheus exposition: one custom collector that renders the latest snapshot at scrape time.

The worker swaps a new ``MetricsSnapshot`` in after every step (one attribute assignment); a scrape
reads that attribute once and builds ``*MetricFamily`` objects from it. Hooks never call
prometheus_client, and a scrape never touches the worker's buffers (cheap writes, work at read time).

Besides the metrics of DESIGN §4 the collector exposes these self-metrics:

- ``hooktrace_export_errors_total{exporter}`` (counter): exporter calls that raised and were caught.
- ``hooktrace_module_labels`` (gauge): distinct ``module`` label values in use.
- ``hooktrace_module_labels_truncated`` (gauge): modules folded into ``__other__`` by ``--max-modules``.
- ``hooktrace_scrape_size_bytes`` (gauge): uncompressed size of the previous ``/metrics`` response,
  so that a label explosion shows up before Prometheus' ``body_size_limit`` rejects the scrape.

``hooktrace_module_duration_seconds{module,phase}`` comes from steady-state sampled steps (not step 1,
not steps during which torch.compile compiled). A ``module`` value cut to ``--depth`` stands for the
subtree it covers: its sum is the covering module's inclusive time and its count that module's calls;
descendants folded into the same label are never added on top (a never-called container such as a
``ModuleList`` lets its called children stand for the label side by side).

A rank outside ``--module-metrics-ranks`` exports step-level series only (``series_budget``).

Every series carries ``run_id`` and ``rank``. Counters are exposed without ``_created`` series.
Step, phase and module-type histograms carry an OpenMetrics exemplar ``{trace_id="..."}`` on the
bucket of the latest sampled observation (visible when the scraper asks for OpenMetrics).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import json
import math
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.exposition import gzip_accepted, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar

from hooktrace._aggregate.snapshot import Histogram, MetricsSnapshot, RankInfo
from hooktrace.distributed import RankChoice
from hooktrace.errors import HooktraceError
from hooktrace.export.files import write_json_atomic
from hooktrace.export.series_budget import step_level

if TYPE_CHECKING:
    from hooktrace._aggregate.step_record import StepRecord

__all__ = ["HooktraceCollector", "PrometheusExporter"]

_BASE = ("run_id", "rank")
_INFO = ("local_rank", "world_size", "node", "version", "torch_version", "device")
_PORT_TRIES = 100

_Bucket = tuple[str, float] | tuple[str, float, Exemplar]


# (family name, help, extra labels, snapshot field). A field holds one value, or a dict from label
# values (a str, or a tuple for several labels) to values. Counter names go in without ``_total``:
# CounterMetricFamily adds it; ``created`` is never passed, so no ``_created`` series exist.
_Table = tuple[tuple[str, str, tuple[str, ...], str], ...]
_HISTOGRAMS: _Table = (
    ("hooktrace_step_duration_seconds", "Wall time of one optimizer step.", (), "step_duration"),
    ("hooktrace_phase_duration_seconds", "Wall time of one step phase.", ("phase",), "phase_duration"),
    ("hooktrace_module_type_duration_seconds", "Time of one call of a module of this type (sampled steps).",
     ("module_type", "phase"), "module_type_duration"),
)  # fmt: skip
_GAUGES: _Table = (
    ("hooktrace_grad_norm", "Latest finite L2 gradient norm (__total__ = whole model).", ("module",),
     "grad_norm"),
    ("hooktrace_grad_norm_ratio", "Total gradient norm / its rolling median.", (), "grad_norm_ratio"),
    ("hooktrace_module_labels", "Distinct module label values in use.", (), "module_labels"),
    ("hooktrace_module_labels_truncated", "Modules folded into __other__ (--max-modules).", (),
     "modules_truncated"),
    ("hooktrace_module_activation_bytes", "Bytes the module saved for backward in the last sampled step "
     "(children included).", ("module",), "module_activation_bytes"),
    ("hooktrace_memory_bytes", "Memory by kind: parameters, gradients, optimizer_state, activations (last sampled "
     "step); CUDA: allocated_peak and reserved (last step's peaks), device_total.", ("kind",), "memory_bytes"),
)  # fmt: skip
_COUNTERS: _Table = (
    ("hooktrace_steps", "Optimizer steps aggregated on this rank.", (), "steps_total"),
    ("hooktrace_grad_spike_steps", "Steps whose gradient norm exceeded the explode factor.", (),
     "grad_spike_steps_total"),
    ("hooktrace_nonfinite_grad_steps", "Steps with a NaN/Inf gradient.", (), "nonfinite_grad_steps_total"),
    ("hooktrace_nonfinite_events", "NaN/Inf gradients by the first module to go non-finite.",
     ("module", "phase"), "nonfinite_events"),
    ("hooktrace_grad_clips", "Per-tensor clips applied by --on-explosion clip.", ("module",), "grad_clips"),
    ("hooktrace_optimizer_steps", "Steps per optimizer that stepped (class#index, e.g. Adam#0).", ("optimizer",),
     "optimizer_steps"),
    ("hooktrace_amp_skipped_steps", "Optimizer steps the AMP grad scaler skipped.", (),
     "amp_skipped_steps_total"),
    ("hooktrace_dropped", "Data dropped instead of blocking training.", ("what",), "dropped"),
    ("hooktrace_hook_errors", "Exceptions caught inside hooktrace hooks.", (), "hook_errors_total"),
    (
        "hooktrace_overhead_seconds",
        "Time hooktrace costs training: its hooks, their dispatch, the worker's CPU while training waited.",
        (),
        "overhead_seconds_total",
    ),
    ("hooktrace_export_errors", "Exporter calls that raised and were caught.", ("exporter",),
     "export_errors"),
)  # fmt: skip


def _unit(name: str) -> str:
    return "seconds" if name.endswith("_seconds") else ""


def _series(base: list[str], field: Any) -> Iterator[tuple[list[str], Any]]:
    """``(label values, value)`` of one snapshot field; absent and non-finite values are skipped."""
    items = field.items() if isinstance(field, dict) else [((), field)]
    for key, value in items:
        number = value.sum if isinstance(value, Histogram) else value
        if number is not None and math.isfinite(number):
            yield [*base, *((key,) if isinstance(key, str) else key)], value


def _buckets(hist: Histogram) -> list[_Bucket]:
    """Cumulative buckets, with the exemplar on the bucket its value falls into (as ``observe`` did)."""
    buckets: list[_Bucket] = list(hist.cumulative())
    if hist.exemplar is not None and math.isfinite(hist.exemplar[1]):
        trace_id, value = hist.exemplar
        index = hist.bucket_of(value)
        le, count = buckets[index][:2]
        buckets[index] = (le, count, Exemplar({"trace_id": trace_id}, value))
    return buckets


def _families(snap: MetricsSnapshot, scrape_size: int | None) -> Iterator[Metric]:
    """Every family of DESIGN §4 from one snapshot; non-finite values are skipped, never exposed."""
    base = [snap.info.run_id, str(snap.info.rank)]
    for name, doc, extra, attr in _HISTOGRAMS:
        histogram = HistogramMetricFamily(name, doc, labels=_BASE + extra, unit="seconds")
        for labels, hist in _series(base, getattr(snap, attr)):
            histogram.add_metric(labels, _buckets(hist), hist.sum)
        yield histogram

    summary = SummaryMetricFamily(
        "hooktrace_module_duration_seconds",
        "Time in the module a label stands for, children included, on steady-state sampled steps.",
        labels=(*_BASE, "module", "phase"),
        unit="seconds",
    )
    for key, (total, calls) in snap.module_duration.items():
        if math.isfinite(total):
            summary.add_metric([*base, *key], calls, total)
    yield summary

    for name, doc, extra, attr in _GAUGES:
        gauge = GaugeMetricFamily(name, doc, labels=_BASE + extra)
        for labels, value in _series(base, getattr(snap, attr)):
            gauge.add_metric(labels, value)
        yield gauge
    for name, doc, extra, attr in _COUNTERS:
        counter = CounterMetricFamily(name, doc, labels=_BASE + extra, unit=_unit(name))
        for labels, value in _series(base, getattr(snap, attr)):
            counter.add_metric(labels, value)
        yield counter

    size = GaugeMetricFamily(
        "hooktrace_scrape_size_bytes", "Uncompressed size of the previous /metrics response.", labels=_BASE,
        unit="bytes",
    )  # fmt: skip
    if scrape_size is not None:
        size.add_metric(base, scrape_size)
    yield size


def _info_family(info: RankInfo) -> GaugeMetricFamily:
    family = GaugeMetricFamily("hooktrace_info", "Always 1; labels describe the rank.", labels=_BASE + _INFO)
    values = (info.local_rank, info.world_size, info.node, info.version, info.torch_version, info.device)
    family.add_metric([info.run_id, str(info.rank), *map(str, values)], 1)
    return family


class HooktraceCollector(Collector):
    """Renders the latest snapshot at scrape time.

    Threading: ``update`` is called by the worker thread, ``collect`` by scrape threads. A snapshot
    is immutable and swapped in with one attribute assignment, so neither side takes a lock.
    """

    def __init__(self, info: RankInfo | None = None, module_ranks: RankChoice | None = None) -> None:
        self._snapshot: MetricsSnapshot | None = None
        self._info = info
        self.module_ranks = module_ranks
        """Whether this rank exports per-module series (``None``: always); asked at every scrape, so
        a rank that becomes the slowest starts exporting them at the next scrape."""
        self.scrape_size_bytes: int | None = None
        """Uncompressed body size of the previous scrape; set by ``PrometheusExporter``'s server."""

    def update(self, snapshot: MetricsSnapshot) -> None:
        """Swap in the latest snapshot (worker thread)."""
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields, so a registry can refuse a clashing second collector."""
        return [_info_family(_EMPTY.info), *_families(_EMPTY, None)]

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot  # read once: one scrape renders one consistent snapshot
        info = snap.info if snap is not None else self._info
        if info is None:
            return
        yield _info_family(info)
        if snap is not None:
            if self.module_ranks is not None and not self.module_ranks.includes_this_rank():
                snap = step_level(snap)
            yield from _families(snap, self.scrape_size_bytes)


_EMPTY = MetricsSnapshot(info=RankInfo("", 0, 0, 0, "", "", "", ""))


class _SilentHandler(WSGIRequestHandler):
    """Keeps scrapes out of the training script's stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # HTTPServer sets SO_REUSEADDR; keep it (restarts after a crash must not wait for TIME_WAIT).


def _measuring_app(registry: CollectorRegistry, collector: HooktraceCollector) -> Callable[..., Any]:
    """prometheus_client's app (format negotiation included), recording the uncompressed size."""
    inner = make_wsgi_app(registry, disable_compression=True)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        captured: list[Any] = []
        body = b"".join(inner(environ, lambda status, headers, *rest: captured.extend((status, headers))))
        status, headers = captured
        if status.startswith("200") and body:
            collector.scrape_size_bytes = len(body)
            if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
                body = gzip.compress(body, compresslevel=1)
                headers = [*headers, ("Content-Encoding", "gzip")]
        start_response(status, [*headers, ("Content-Length", str(len(body)))])
        return [body]

    return app


def _target_host(addr: str) -> str:
    """The address Prometheus should scrape: the hostname when bound to every interface."""
    if addr in ("", "0.0.0.0", "::"):
        return socket.gethostname()
    return f"[{addr}]" if ":" in addr else addr


def _entry_order(entry: dict[str, Any]) -> tuple[str, int]:
    labels = entry.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    rank = str(labels.get("rank", ""))
    return str(labels.get("run_id", "")), int(rank) if rank.isdigit() else -1


def write_target(out_dir: str, target: str, run_id: str, rank: int) -> None:
    """Add or replace this rank's entry in ``<out_dir>/targets.json`` (Prometheus file_sd format).

    All local ranks of a node share the file: entries are merged under an exclusive lock on a sibling
    lock file, and the file is replaced atomically so Prometheus never reads half of it.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "targets.json")
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            entries: list[dict[str, Any]] = []
            with contextlib.suppress(OSError, ValueError), open(path) as f:
                loaded = json.load(f)
                if isinstance(loaded, list):
                    entries = [e for e in loaded if isinstance(e, dict)]
            labels = {"run_id": run_id, "rank": str(rank)}
            entries = [e for e in entries if e.get("labels") != labels]
            entries.append({"targets": [target], "labels": labels})
            entries.sort(key=_entry_order)
            write_json_atomic(path, entries)  # world-readable: Prometheus often runs as another user
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class PrometheusExporter:
    """Serves ``/metrics`` for one rank on ``base_port + local_rank`` from a private registry.

    ``start``/``close`` run on the agent's thread, ``export_step`` on the worker thread; scrapes are
    answered by the server's own daemon threads and read only the collector's current snapshot.
    """

    name = "prometheus"

    def __init__(
        self,
        *,
        addr: str,
        base_port: int,
        local_rank: int,
        out_dir: str | None,
        info: RankInfo,
        module_ranks: RankChoice | None = None,
    ) -> None:
        self.collector = HooktraceCollector(info, module_ranks)
        self.addr = addr
        self.base_port = base_port
        self.local_rank = local_rank
        self.out_dir = out_dir
        self.info = info
        self.port: int | None = None
        """The port actually bound (may differ from ``base_port + local_rank`` if that was taken)."""
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def slowest_rank(self) -> int | None:
        """Set by whoever knows it (the agent); ``--module-metrics-ranks auto`` then includes it."""
        choice = self.collector.module_ranks
        return choice.slowest_rank if choice is not None else None

    @slowest_rank.setter
    def slowest_rank(self, rank: int | None) -> None:
        if self.collector.module_ranks is not None:
            self.collector.module_ranks.slowest_rank = rank

    def start(self) -> None:
        """Bind, serve in a daemon thread, and publish the target; a no-op when the port is 0."""
        if self.base_port == 0 or self._server is not None:
            return
        wanted = self.base_port + self.local_rank
        server = self._bind(wanted)
        self.port = server.server_address[1]
        if self.port != wanted:
            print(
                f"hooktrace: port {wanted} is taken; serving /metrics on {self.addr}:{self.port} instead "
                "(use --metrics-port to choose)",
                file=sys.stderr,
            )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="hooktrace-metrics", daemon=True
        )
        self._thread.start()
        if self.out_dir is not None:
            try:
                write_target(self.out_dir, f"{_target_host(self.addr)}:{self.port}", self.info.run_id, self.info.rank)
            except OSError as exc:
                print(f"hooktrace: could not write {self.out_dir}/targets.json: {exc}", file=sys.stderr)

    def _bind(self, wanted: int) -> _Server:
        app = _measuring_app(self.registry, self.collector)
        try:
            infos = socket.getaddrinfo(self.addr, wanted, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise HooktraceError(
                f"cannot resolve --metrics-addr {self.addr!r} ({exc}); use 127.0.0.1 or 0.0.0.0"
            ) from exc
        server_class = type("_BoundServer", (_Server,), {"address_family": infos[0][0]})
        last = min(wanted + _PORT_TRIES, 65536)
        for port in range(wanted, last):
            try:
                return make_server(self.addr, port, app, server_class, handler_class=_SilentHandler)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise HooktraceError(
                    f"cannot serve /metrics on {self.addr}:{port} ({exc.strerror}); "
                    "choose another --metrics-addr/--metrics-port, or --metrics-port 0 to turn it off"
                ) from exc
        raise HooktraceError(
            f"ports {wanted}-{last - 1} on {self.addr} are all taken; "
            "choose another --metrics-port, or --metrics-port 0 to turn it off"
        )

    def export_step(self, step: StepRecord) -> None:
        """Nothing per step: scrapes read the snapshot ``refresh`` hands over."""

    def refresh(self, snapshot: MetricsSnapshot) -> None:
        self.collector.update(snapshot)

    def flush(self) -> None:
        """Nothing is buffered: scrapes read the latest snapshot."""

    def close(self) -> None:
        """Stop serving. The targets.json entry stays: a stale target is harmless to Prometheus."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
