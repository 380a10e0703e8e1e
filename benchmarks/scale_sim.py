"""Simulate a large job: N ranks' /metrics scraped by a real Prometheus with hooktrace's rules.

One process serves every synthetic rank on one loopback port (``/rank/<r>/metrics``); Prometheus
finds them through a file_sd file whose entries carry ``rank``, ``run_id`` and ``__metrics_path__``,
like the ``targets.json`` a real run writes. One rank is a straggler, one has a gradient spike;
per-module series come from the ranks ``--module-metrics-ranks`` chooses (``auto``: rank 0, one rank
per node, the straggler once known). The report comes from Prometheus itself: head series, its
memory, rule-group evaluation time, the time of every dashboard query, and which alerts fired for
which rank. Alerts' ``for:`` is cut to ``--alert-for`` so that a run fits in minutes.

    make scale-sim                                     # 1,000 ranks, 5 s scrapes, 150 s
    .venv/bin/python benchmarks/scale_sim.py --ranks 100 --duration 90 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # grafana.queries; tests.servers (below)

from _scale_ranks import JobShape, SyntheticJob

from grafana.queries import PANEL_QUERIES, load_dashboard, substitute, variable_values

# The Prometheus process helpers the live-Prometheus tests use (start, wait ready, query, stop): one
# copy, kept with those tests. Nothing in tests.servers collects or runs a test.
from tests.servers import RULES_FILE, PrometheusServer, free_port, http_get_json, prometheus_config

ALERTS = ("HooktraceStraggler", "HooktraceGradientExplosion")


def _log(message: str) -> None:
    print(f"[scale-sim {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class _Handler(BaseHTTPRequestHandler):
    server: _JobServer

    def do_GET(self) -> None:
        parts = self.path.split("/")  # "", "rank", "<r>", "metrics"
        job = self.server.job
        if len(parts) != 4 or parts[1] != "rank" or not parts[2].isdigit() or int(parts[2]) >= job.shape.ranks:
            self.send_error(404)
            return
        body, content_type = job.render(int(parts[2]), self.headers.get("Accept", ""))
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a thousand scrapes every few seconds."""


class _JobServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # scrapes of a thousand targets arrive in bursts
    job: SyntheticJob
    abandoned = 0
    """Scrapes Prometheus gave up on (its scrape timeout) before the body was sent."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            self.abandoned += 1
        else:
            super().handle_error(request, client_address)


def serve(job: SyntheticJob) -> _JobServer:
    server = _JobServer(("127.0.0.1", 0), _Handler)
    server.job = job
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    return server


def write_targets(path: Path, port: int, shape: JobShape) -> None:
    """file_sd entries as a real run's targets.json has them, one path per rank on one port."""
    entries = [
        {
            "targets": [f"127.0.0.1:{port}"],
            "labels": {"run_id": shape.run_id, "rank": str(r), "__metrics_path__": f"/rank/{r}/metrics"},
        }
        for r in range(shape.ranks)
    ]
    path.write_text(json.dumps(entries))


_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """Seconds of a simple Prometheus duration (``0m``, ``15s``, ``5m``, ``1h``)."""
    number = text.rstrip("smhd")
    return float(number) * _UNIT_S[text[len(number) :]]


def write_rules(path: Path, for_s: str) -> None:
    """The project's rules, each alert's ``for:`` cut to at most ``for_s`` (the sim runs minutes)."""
    rules = yaml.safe_load(RULES_FILE.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "alert" in rule and duration_s(rule.get("for", "0s")) > duration_s(for_s):
                rule["for"] = for_s
    path.write_text(yaml.safe_dump(rules, sort_keys=False))


def start_prometheus(workdir: Path, targets: Path, rules: Path, interval: str) -> PrometheusServer:
    binary = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
    if binary is None:
        sys.exit("prometheus not found: sudo apt-get install prometheus (or `make test-servers`)")
    port = free_port()
    config = prometheus_config(scrape_targets_file=targets, rule_files=[rules], interval=interval)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    server = PrometheusServer("prometheus", argv, workdir=workdir, url=f"http://127.0.0.1:{port}")
    server.wait_ready(f"{server.url}/-/ready", timeout=60)
    return server


def self_metrics(url: str) -> dict[str, float]:
    """Prometheus's own figures from its /metrics: head series, memory, rule-group durations."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("prometheus_tsdb_head_series", "process_resident_memory_bytes"):
                figures[sample.name] = sample.value
            elif sample.name == "prometheus_rule_group_last_duration_seconds":
                group = sample.labels.get("rule_group", "").rsplit(";", 1)[-1]
                figures[f"rule_group_seconds:{group}"] = sample.value
    return figures


def firing(url: str) -> dict[str, set[str]]:
    """Alert name -> ranks it is firing for."""
    found: dict[str, set[str]] = {}
    for alert in http_get_json(f"{url}/api/v1/alerts")["data"]["alerts"]:
        if alert["state"] == "firing":
            found.setdefault(alert["labels"]["alertname"], set()).add(alert["labels"].get("rank", ""))
    return found


def time_dashboard_queries(url: str, run_id: str, window_s: float) -> list[dict[str, Any]]:
    """Every dashboard panel query, run as Grafana would (a range query over the window), timed."""
    rows = []
    end = time.time()
    for query in PANEL_QUERIES:
        expr = substitute(query.expr, variable_values(load_dashboard(query.file), run_id))
        params = {"query": expr, "start": f"{end - window_s:.3f}", "end": f"{end:.3f}", "step": "15"}
        began = time.perf_counter()
        body = http_get_json(f"{url}/api/v1/query_range?" + urllib.parse.urlencode(params), timeout=60)
        seconds = time.perf_counter() - began
        rows.append({"query": str(query), "seconds": seconds, "series": len(body["data"]["result"])})
    return rows


def series_per_rank(prometheus: PrometheusServer, run_id: str, module_ranks: list[int]) -> dict[str, float]:
    counts = {
        int(s["metric"]["rank"]): float(s["value"][1])
        for s in prometheus.query(f'count by (rank) ({{run_id="{run_id}", __name__=~"hooktrace_.*"}})')
    }
    step_level = [n for rank, n in counts.items() if rank not in module_ranks]
    chosen = [n for rank, n in counts.items() if rank in module_ranks]
    return {
        "ranks_seen": len(counts),
        "step_level_rank_max": max(step_level, default=0),
        "module_rank_max": max(chosen, default=0),
    }


def max_value(prometheus: PrometheusServer, promql: str) -> float:
    result = prometheus.query(f"max({promql})")
    return float(result[0]["value"][1]) if result else 0.0


def rule_groups_ms(samples: list[dict[str, float]]) -> dict[str, float]:
    """Median evaluation time of each rule group over ``samples`` (the run's second half: warmed up)."""
    groups = sorted({key for sample in samples for key in sample if key.startswith("rule_group_seconds:")})
    return {key.split(":", 1)[1]: 1e3 * statistics.median(s[key] for s in samples if key in s) for key in groups}


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = JobShape(
        ranks=args.ranks,
        ranks_per_node=args.ranks_per_node,
        straggler=args.straggler if args.straggler >= 0 else args.ranks // 2 + 5,
        spike_rank=args.spike_rank if args.spike_rank >= 0 else args.ranks // 3 + 2,
        spike_at_s=args.duration / 3,
        learn_slowest_after_s=10.0,
        module_metrics_ranks=args.module_metrics_ranks,
    )
    interval = f"{args.scrape_interval:g}s"
    with tempfile.TemporaryDirectory(prefix="hooktrace-scale-sim-") as tmp:
        workdir = Path(tmp)
        job = SyntheticJob(shape)
        server = serve(job)
        write_targets(workdir / "targets.json", server.server_address[1], shape)
        write_rules(workdir / "rules.yml", args.alert_for)
        where = f"127.0.0.1:{server.server_address[1]}"
        _log(f"{shape.ranks} ranks on {where}; straggler rank {shape.straggler}, gradient spike on rank "
             f"{shape.spike_rank} at {shape.spike_at_s:.0f} s; scrape every {interval}")  # fmt: skip
        with start_prometheus(workdir, workdir / "targets.json", workdir / "rules.yml", interval) as prometheus:
            began = time.monotonic()
            fired_at: dict[str, float] = {}
            samples: list[dict[str, float]] = []
            while (elapsed := time.monotonic() - began) < args.duration:
                time.sleep(min(args.scrape_interval, args.duration - elapsed))
                figures = self_metrics(prometheus.url)
                samples.append(figures)
                now = firing(prometheus.url)
                for name in ALERTS:
                    if name in now and name not in fired_at:
                        fired_at[name] = time.monotonic() - began
                up = prometheus.query(f'count(up{{run_id="{shape.run_id}"}} == 1)')
                _log(f"{time.monotonic() - began:5.0f} s: {int(figures.get('prometheus_tsdb_head_series', 0))} series, "
                     f"{figures.get('process_resident_memory_bytes', 0) / 2**20:.0f} MiB, "
                     f"{up[0]['value'][1] if up else 0} targets up, firing {sorted(now)}")  # fmt: skip
            module_ranks = job.module_ranks()
            report: dict[str, Any] = {
                "ranks": shape.ranks,
                "scrape_interval_s": args.scrape_interval,
                "duration_s": args.duration,
                "straggler": shape.straggler,
                "spike_rank": shape.spike_rank,
                "spike_at_s": shape.spike_at_s,
                "module_metrics_ranks": len(module_ranks),
                **series_per_rank(prometheus, shape.run_id, module_ranks),
                "head_series": samples[-1].get("prometheus_tsdb_head_series", 0),
                "memory_mib_max": max(s.get("process_resident_memory_bytes", 0) for s in samples) / 2**20,
                "rule_groups_ms": rule_groups_ms(samples[len(samples) // 2 :]),
                "alerts": {name: sorted(firing(prometheus.url).get(name, set()), key=int) for name in ALERTS},
                "alert_first_firing_s": fired_at,
                "render_ms_mean": 1e3 * job.render_s / max(job.renders, 1),
                "scrapes_abandoned": server.abandoned,
                "scrape_seconds_max": max_value(prometheus, f'scrape_duration_seconds{{run_id="{shape.run_id}"}}'),
                "targets_down": [t for t in prometheus.targets_health() if t["health"] != "up"][:5],
            }
            report["dashboard_queries"] = time_dashboard_queries(prometheus.url, shape.run_id, args.duration)
        server.shutdown()
    report["alerts_ok"] = report["alerts"] == {
        "HooktraceStraggler": [str(shape.straggler)],
        "HooktraceGradientExplosion": [str(shape.spike_rank)],
    }
    return report


def print_report(report: dict[str, Any]) -> None:
    queries = report["dashboard_queries"]
    slowest = max(queries, key=lambda q: q["seconds"])
    print(f"scale simulation: {report['ranks']} ranks, scrape every {report['scrape_interval_s']:g} s, "
          f"{report['duration_s']:g} s")  # fmt: skip
    print(f"  ranks with per-module series: {report['module_metrics_ranks']} "
          f"(up to {report['module_rank_max']:.0f} series each); the others: at most "
          f"{report['step_level_rank_max']:.0f} series each")  # fmt: skip
    print(
        f"  Prometheus head series: {report['head_series']:.0f}; memory (RSS, max): {report['memory_mib_max']:.0f} MiB"
    )
    for group, ms in report["rule_groups_ms"].items():
        print(f"  rule group {group}: {ms:.1f} ms per evaluation")
    print(f"  dashboard queries ({len(queries)}, range over the run, step 15 s): "
          f"median {1e3 * statistics.median(q['seconds'] for q in queries):.0f} ms, "
          f"slowest {1e3 * slowest['seconds']:.0f} ms ({slowest['query']})")  # fmt: skip
    for query in queries:
        print(f"    {1e3 * query['seconds']:7.1f} ms  {query['series']:5d} series  {query['query']}")
    for name, ranks in report["alerts"].items():
        at = report["alert_first_firing_s"].get(name)
        when = f"first firing after {at:.0f} s" if at is not None else "never fired"
        print(f"  {name}: firing for rank(s) {', '.join(ranks) or '-'} ({when})")
    expected = (
        f"straggler rank {report['straggler']}, spike rank {report['spike_rank']} at {report['spike_at_s']:.0f} s"
    )
    print(f"  alerts for the right ranks ({expected}): {'yes' if report['alerts_ok'] else 'NO'}")
    if report["targets_down"]:
        print(f"  targets down (first 5): {report['targets_down']}")
    slowest_scrape, render = 1e3 * report["scrape_seconds_max"], report["render_ms_mean"]
    print(f"  slowest scrape now: {slowest_scrape:.0f} ms; scrapes Prometheus gave up on: "
          f"{report['scrapes_abandoned']}; synthetic /metrics render: {render:.2f} ms mean")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=1000)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of scraping")
    parser.add_argument("--scrape-interval", type=float, default=5.0, help="seconds; also the rule interval")
    parser.add_argument("--alert-for", default="15s", help="cut every longer alert for: to this")
    parser.add_argument("--module-metrics-ranks", default="auto")
    parser.add_argument("--straggler", type=int, default=-1, help="default: ranks/2 + 5")
    parser.add_argument("--spike-rank", type=int, default=-1, help="default: ranks/3 + 2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=sorted) + "\n")
    return 0 if report["alerts_ok"] and not report["targets_down"] else 1


if __name__ == "__main__":
    sys.exit(main())
