"""``hooktrace top`` reads real expositions of the real collector into rows and renders them."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, generate_latest

from hooktrace._aggregate.snapshot import OTHER, STEP_BUCKETS, TOTAL, Histogram, MetricsSnapshot, RankInfo
from hooktrace.cli.top import (
    Scrape,
    Target,
    build_view,
    fetch,
    parse_exposition,
    read_targets,
    render_text,
    top_command,
)
from hooktrace.export.prometheus import HooktraceCollector, PrometheusExporter

INFO = RankInfo("run-7", 1, 1, 2, "node-a", "0.1.0", "2.13.0", "cpu")


def snapshot(steps: int, step_s: float = 0.05, **overrides: object) -> MetricsSnapshot:
    """``steps`` steps of ``step_s`` each; module and event counters grow with the steps."""
    hist = Histogram(STEP_BUCKETS)
    for _ in range(steps):
        hist.observe(step_s)
    fields: dict[str, object] = {
        "info": INFO,
        "steps_total": steps,
        "step_duration": hist,
        "module_duration": {
            ("blocks.0.attn", "forward"): (0.002 * steps, steps),
            (OTHER, "forward"): (0.010 * steps, 4 * steps),
            ("blocks.0.attn", "backward"): (0.004 * steps, steps),
        },
        "grad_norm": {TOTAL: 2.5, "blocks.0.attn": 1.25},
        "grad_norm_ratio": 1.4,
        "grad_spike_steps_total": steps // 10,
        "nonfinite_grad_steps_total": 2,
        "nonfinite_events": {("blocks.0.attn", "backward"): 2},
        "dropped": {"spans": 5},
        "overhead_seconds_total": 0.01 * step_s * steps,
    }
    fields.update(overrides)
    return MetricsSnapshot(**fields)  # type: ignore[arg-type]


def exposition(snap: MetricsSnapshot) -> str:
    collector = HooktraceCollector()
    collector.update(snap)
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def scrape(snap: MetricsSnapshot, at: float = 0.0, address: str = "node-a:9751") -> Scrape:
    return Scrape(Target(address, {"rank": "1"}), at, parse_exposition(exposition(snap)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def exporter(tmp_path: Path) -> Iterator[PrometheusExporter]:
    """A rank serving the collector on loopback, as ``hooktrace run`` starts it (targets.json included)."""
    exp = PrometheusExporter(addr="127.0.0.1", base_port=free_port(), local_rank=0, out_dir=str(tmp_path), info=INFO)
    exp.collector.update(snapshot(40))
    exp.start()
    yield exp
    exp.close()


def test_a_real_exposition_becomes_rank_module_and_event_rows() -> None:
    view = build_view([scrape(snapshot(40))], {})
    (rank,) = view.ranks
    assert (rank.rank, rank.error, rank.steps, view.run_ids) == ("1", "", 40, ["run-7"])
    assert rank.step_mean_s == pytest.approx(0.05)
    assert (rank.grad_norm, rank.grad_ratio) == (2.5, 1.4)
    assert rank.overhead_pct == pytest.approx(1.0)
    assert rank.step_recent_s is None and rank.steps_per_s is None  # needs a previous refresh
    assert [(m.phase, m.module) for m in view.modules] == [
        ("forward", OTHER), ("forward", "blocks.0.attn"), ("backward", "blocks.0.attn"),
    ]  # fmt: skip
    assert view.modules[0].mean_s == pytest.approx(0.0025) and view.modules[0].calls == 160
    events = {name: (total, delta, detail) for name, total, delta, detail in view.events}
    assert events["grad spikes"] == (4, None, "")
    assert events["non-finite steps"] == (2, None, "blocks.0.attn: 2")
    assert events["dropped"] == (5, None, "spans: 5")


def test_a_second_refresh_shows_recent_step_time_rates_and_deltas() -> None:
    before = scrape(snapshot(40, 0.05), at=10.0)
    now = scrape(snapshot(40, 0.05, step_duration=_steps(40 * [0.05] + 10 * [0.2]), steps_total=50,
                          grad_spike_steps_total=7), at=12.0)  # fmt: skip
    view = build_view([now], {"node-a:9751": before})
    rank = view.ranks[0]
    assert rank.step_recent_s == pytest.approx(0.2)
    assert rank.steps_per_s == pytest.approx(5.0)
    assert dict((n, d) for n, _, d, _ in view.events)["grad spikes"] == 3
    assert all(m.delta_s == 0 for m in view.modules)  # no sampled step in between


def test_module_rows_are_ordered_by_recent_time_once_there_is_a_previous_refresh() -> None:
    before = scrape(snapshot(40), at=0.0)
    grown = dict(snapshot(40).module_duration)
    grown["blocks.0.attn", "forward"] = (0.002 * 40 + 1.0, 42)
    view = build_view([scrape(snapshot(40, module_duration=grown), at=2.0)], {"node-a:9751": before})
    top = view.modules[0]
    assert (top.phase, top.module) == ("forward", "blocks.0.attn")
    assert top.delta_s == pytest.approx(1.0) and top.recent_mean_s == pytest.approx(0.5)


def test_a_counter_that_went_down_counts_as_a_restarted_rank() -> None:
    before = scrape(snapshot(100, grad_spike_steps_total=9), at=0.0)
    view = build_view([scrape(snapshot(20), at=2.0)], {"node-a:9751": before})
    assert view.ranks[0].steps_per_s == pytest.approx(10.0)
    assert dict((n, d) for n, _, d, _ in view.events)["grad spikes"] == 2


def test_ranks_are_sorted_numerically_and_a_slow_rank_shows_its_skew() -> None:
    scrapes, previous = [], {}
    for rank, step_s in ((10, 0.1), (2, 0.1), (3, 0.3)):
        info = RankInfo("run-7", rank, rank, 11, "n", "0.1.0", "2.13.0", "cpu")
        address = f"n:{9750 + rank}"
        previous[address] = scrape(snapshot(10, info=info), 0.0, address)
        scrapes.append(scrape(snapshot(10, info=info, step_duration=_steps(10 * [0.05] + 10 * [step_s]),
                                       steps_total=20), 1.0, address))  # fmt: skip
    view = build_view(scrapes, previous)
    assert [r.rank for r in view.ranks] == ["2", "3", "10"]
    assert [r.vs_median for r in view.ranks] == pytest.approx([1.0, 3.0, 1.0])


def test_a_down_target_is_a_row_and_the_frame_still_renders() -> None:
    down = Scrape(Target("node-b:9752", {"rank": "2"}), 0.0, None, "connection refused")
    text = render_text(build_view([scrape(snapshot(40)), down], {}))
    assert "1/2 ranks up" in text
    assert "rank 2 node-b:9752 down: connection refused" in text
    assert "blocks.0.attn" in text and "non-finite steps" in text


def test_a_frame_without_module_timings_says_they_come_with_sampled_steps() -> None:
    text = render_text(build_view([scrape(snapshot(3, module_duration={}))], {}))
    assert "no module timings yet" in text


def test_fetching_a_closed_port_reports_down_without_raising() -> None:
    result = fetch(Target(f"127.0.0.1:{free_port()}"), timeout=1.0)
    assert result.series is None and result.error == "connection refused"


def test_a_server_that_does_not_speak_prometheus_is_down() -> None:
    class Html(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>not metrics</html>\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Html) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        result = fetch(Target(f"127.0.0.1:{server.server_address[1]}"))
        server.shutdown()
        thread.join()
    assert result.series is None and result.error.startswith("not a /metrics exposition")


def test_read_targets_takes_every_address_of_every_file_sd_group_once(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    groups = [{"targets": ["a:1", "b:2"], "labels": {"rank": "0"}}, {"targets": ["c:3", "a:1"]}]
    path.write_text(json.dumps(groups))
    assert read_targets(str(path)) == [Target("a:1", {"rank": "0"}), Target("b:2", {"rank": "0"}), Target("c:3")]
    assert Target("c:3").url == "http://c:3/metrics"


@pytest.mark.parametrize("content", ["{}", '[{"targets": "a:1"}]', "[1]", "not json"])
def test_read_targets_rejects_what_is_not_a_file_sd_list(tmp_path: Path, content: str) -> None:
    path = tmp_path / "targets.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="targets"):
        read_targets(str(path))


def test_once_prints_a_frame_from_a_live_endpoint(exporter: PrometheusExporter) -> None:
    result = CliRunner().invoke(top_command, ["--port", str(exporter.port), "--once"])
    assert result.exit_code == 0, result.output
    assert "run run-7  1/1 ranks up" in result.output
    assert "blocks.0.attn" in result.output and "50.00 ms" in result.output


def test_once_reads_the_targets_file_that_the_exporter_wrote(exporter: PrometheusExporter, tmp_path: Path) -> None:
    groups = json.loads((tmp_path / "targets.json").read_text())
    groups.append({"targets": [f"127.0.0.1:{free_port()}"], "labels": {"run_id": "run-7", "rank": "5"}})
    (tmp_path / "targets.json").write_text(json.dumps(groups))
    result = CliRunner().invoke(top_command, ["--targets", str(tmp_path / "targets.json"), "--once"])
    assert result.exit_code == 0, result.output
    assert "1/2 ranks up" in result.output and "rank 5" in result.output and "down: connection refused" in result.output


def test_once_exits_1_when_every_target_is_down() -> None:
    result = CliRunner().invoke(top_command, ["--port", str(free_port()), "--once"])
    assert result.exit_code == 1
    assert "0/1 ranks up" in result.output


def test_targets_with_port_is_a_usage_error_and_a_missing_file_names_the_flag(tmp_path: Path) -> None:
    both = CliRunner().invoke(top_command, ["--targets", "t.json", "--port", "9750", "--once"])
    assert both.exit_code == 2 and "drop --port" in both.output
    missing = CliRunner().invoke(top_command, ["--targets", str(tmp_path / "nope.json"), "--once"])
    assert missing.exit_code == 2 and "--targets" in missing.output and "targets.json" in missing.output


def _steps(values: list[float]) -> Histogram:
    hist = Histogram(STEP_BUCKETS)
    for value in values:
        hist.observe(value)
    return hist
