"""The Prometheus collector renders DESIGN §4 from a snapshot; the exporter serves it per rank."""

from __future__ import annotations

import gzip
import json
import math
import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from hooktrace._aggregate.snapshot import (
    MODULE_TYPE_BUCKETS,
    OTHER,
    STEP_BUCKETS,
    TOTAL,
    Histogram,
    MetricsSnapshot,
    RankInfo,
)
from hooktrace.errors import HooktraceError
from hooktrace.export.prometheus import HooktraceCollector, PrometheusExporter, write_target

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
INFO = RankInfo("run-42", 1, 1, 4, "node-a", "0.1.0", "2.13.0", "cuda:1")
BASE = {"run_id": "run-42", "rank": "1"}

DESIGN_TYPES = {
    "hooktrace_info": "gauge",
    "hooktrace_steps_total": "counter",
    "hooktrace_step_duration_seconds": "histogram",
    "hooktrace_phase_duration_seconds": "histogram",
    "hooktrace_module_duration_seconds": "summary",
    "hooktrace_module_type_duration_seconds": "histogram",
    "hooktrace_grad_norm": "gauge",
    "hooktrace_grad_norm_ratio": "gauge",
    "hooktrace_grad_spike_steps_total": "counter",
    "hooktrace_nonfinite_grad_steps_total": "counter",
    "hooktrace_nonfinite_events_total": "counter",
    "hooktrace_grad_clips_total": "counter",
    "hooktrace_amp_skipped_steps_total": "counter",
    "hooktrace_optimizer_steps_total": "counter",
    "hooktrace_dropped_total": "counter",
    "hooktrace_hook_errors_total": "counter",
    "hooktrace_overhead_seconds_total": "counter",
    "hooktrace_module_activation_bytes": "gauge",
    "hooktrace_memory_bytes": "gauge",
    "hooktrace_export_errors_total": "counter",
    "hooktrace_module_labels": "gauge",
    "hooktrace_module_labels_truncated": "gauge",
    "hooktrace_scrape_size_bytes": "gauge",
}


def make_snapshot(**overrides: object) -> MetricsSnapshot:
    """Three steps of a small transformer with one spike, one clip and a capped module label."""
    step = Histogram(STEP_BUCKETS)
    for value in (0.05, 0.2, 0.03):
        step.observe(value, TRACE_ID if value == 0.05 else None)
    forward = Histogram(STEP_BUCKETS)
    forward.observe(0.01, TRACE_ID)
    linear = Histogram(MODULE_TYPE_BUCKETS)
    linear.observe(3e-5, TRACE_ID)
    linear.observe(2e-3)
    fields: dict[str, object] = {
        "info": INFO,
        "steps_total": 3,
        "step_duration": step,
        "phase_duration": {"forward": forward},
        "module_duration": {
            ("blocks.0.attn", "forward"): (0.012, 3),
            (OTHER, "forward"): (0.5, 30),
            ("blocks.0.attn", "backward"): (0.02, 3),
        },
        "module_type_duration": {("Linear", "forward"): linear},
        "grad_norm": {TOTAL: 2.5, "blocks.0.attn": 1.25, OTHER: 0.75},
        "grad_norm_ratio": 1.4,
        "grad_spike_steps_total": 1,
        "nonfinite_grad_steps_total": 2,
        "nonfinite_events": {("blocks.0.attn", "backward"): 2},
        "grad_clips": {"blocks.0.attn": 1},
        "amp_skipped_steps_total": 2,
        "optimizer_steps": {"Adam#0": 2, "Adam#1": 1},
        "dropped": {"spans": 5},
        "hook_errors_total": 1,
        "export_errors": {"otel": 3},
        "overhead_seconds_total": 0.125,
        "module_labels": 2,
        "modules_truncated": 14,
    }
    fields.update(overrides)
    return MetricsSnapshot(**fields)  # type: ignore[arg-type]


def registry_for(snapshot: MetricsSnapshot | None, info: RankInfo | None = None) -> CollectorRegistry:
    collector = HooktraceCollector(info)
    if snapshot is not None:
        collector.update(snapshot)
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def types_of(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def exporters() -> Iterator[list[PrometheusExporter]]:
    started: list[PrometheusExporter] = []
    yield started
    for exporter in started:
        exporter.close()


def test_every_design_metric_is_exposed_with_its_type() -> None:
    text = generate_latest(registry_for(make_snapshot())).decode()
    assert types_of(text) == DESIGN_TYPES


def test_every_series_carries_run_id_and_rank() -> None:
    samples = [s for family in registry_for(make_snapshot()).collect() for s in family.samples]
    assert samples
    assert all({"run_id": "run-42", "rank": "1"}.items() <= s.labels.items() for s in samples)


def test_info_gauge_describes_the_rank() -> None:
    labels = {
        **BASE,
        "local_rank": "1",
        "world_size": "4",
        "node": "node-a",
        "version": "0.1.0",
        "torch_version": "2.13.0",
        "device": "cuda:1",
    }
    assert registry_for(make_snapshot()).get_sample_value("hooktrace_info", labels) == 1.0


def test_counters_end_in_total_and_have_no_created_series() -> None:
    registry = registry_for(make_snapshot())
    assert registry.get_sample_value("hooktrace_steps_total", BASE) == 3
    assert registry.get_sample_value("hooktrace_amp_skipped_steps_total", BASE) == 2
    assert registry.get_sample_value("hooktrace_optimizer_steps_total", {**BASE, "optimizer": "Adam#1"}) == 1
    assert registry.get_sample_value("hooktrace_dropped_total", {**BASE, "what": "spans"}) == 5
    assert registry.get_sample_value("hooktrace_export_errors_total", {**BASE, "exporter": "otel"}) == 3
    assert registry.get_sample_value("hooktrace_overhead_seconds_total", BASE) == 0.125
    assert (
        registry.get_sample_value(
            "hooktrace_nonfinite_events_total", {**BASE, "module": "blocks.0.attn", "phase": "backward"}
        )
        == 2
    )
    for render in (generate_latest, generate_openmetrics):
        assert "_created" not in render(registry).decode()


def test_step_histogram_buckets_are_cumulative_with_count_and_sum() -> None:
    registry = registry_for(make_snapshot())
    name = "hooktrace_step_duration_seconds"
    assert registry.get_sample_value(f"{name}_bucket", {**BASE, "le": "0.032"}) == 1
    assert registry.get_sample_value(f"{name}_bucket", {**BASE, "le": "0.064"}) == 2
    assert registry.get_sample_value(f"{name}_bucket", {**BASE, "le": "+Inf"}) == 3
    assert registry.get_sample_value(f"{name}_count", BASE) == 3
    assert registry.get_sample_value(f"{name}_sum", BASE) == pytest.approx(0.28)
    forward = {**BASE, "phase": "forward"}
    assert registry.get_sample_value("hooktrace_phase_duration_seconds_count", forward) == 1


def test_module_durations_are_a_summary_with_sum_and_count_only() -> None:
    registry = registry_for(make_snapshot())
    other = {**BASE, "module": OTHER, "phase": "forward"}
    assert registry.get_sample_value("hooktrace_module_duration_seconds_sum", other) == 0.5
    assert registry.get_sample_value("hooktrace_module_duration_seconds_count", other) == 30
    text = generate_latest(registry).decode()
    assert "quantile" not in text
    linear = {**BASE, "module_type": "Linear", "phase": "forward", "le": "6.4e-05"}
    assert registry.get_sample_value("hooktrace_module_type_duration_seconds_bucket", linear) == 1


def test_grad_norms_include_total_and_other() -> None:
    registry = registry_for(make_snapshot())
    assert registry.get_sample_value("hooktrace_grad_norm", {**BASE, "module": TOTAL}) == 2.5
    assert registry.get_sample_value("hooktrace_grad_norm", {**BASE, "module": OTHER}) == 0.75
    assert registry.get_sample_value("hooktrace_grad_norm_ratio", BASE) == 1.4
    assert registry.get_sample_value("hooktrace_module_labels_truncated", BASE) == 14


def test_non_finite_values_are_never_emitted() -> None:
    bad_step = Histogram(STEP_BUCKETS)
    bad_step.observe(math.nan)
    snapshot = make_snapshot(
        step_duration=bad_step,
        grad_norm={TOTAL: math.inf, "blocks.0.attn": math.nan, "head": 0.5},
        grad_norm_ratio=math.nan,
        module_duration={("blocks.0.attn", "forward"): (math.inf, 1)},
        overhead_seconds_total=math.nan,
    )
    registry = registry_for(snapshot)
    values = [s.value for family in registry.collect() for s in family.samples]
    assert all(math.isfinite(v) for v in values)
    assert registry.get_sample_value("hooktrace_grad_norm", {**BASE, "module": "head"}) == 0.5
    assert registry.get_sample_value("hooktrace_grad_norm", {**BASE, "module": TOTAL}) is None
    text = generate_openmetrics(registry).decode()
    assert re.search(r"\} (NaN|[+-]Inf)", text) is None


def test_histograms_carry_the_trace_exemplar_on_the_bucket_of_its_value() -> None:
    text = generate_openmetrics(registry_for(make_snapshot())).decode()
    exemplar = f'# {{trace_id="{TRACE_ID}"}}'
    step_lines = [line for line in text.splitlines() if exemplar in line]
    assert any(line.startswith('hooktrace_step_duration_seconds_bucket{le="0.064"') for line in step_lines)
    assert any('phase="forward"' in line and 'le="0.016"' in line for line in step_lines)
    assert any('module_type="Linear"' in line and 'le="6.4e-05"' in line for line in step_lines)
    assert len(step_lines) == 3
    assert text.endswith("# EOF\n")


def test_a_collector_without_a_snapshot_yields_nothing_or_only_info() -> None:
    assert list(HooktraceCollector().collect()) == []
    families = list(HooktraceCollector(INFO).collect())
    assert [f.name for f in families] == ["hooktrace_info"]


def test_a_second_collector_on_the_same_registry_is_refused() -> None:
    registry = registry_for(make_snapshot())
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(HooktraceCollector())


def test_exporter_serves_text_and_openmetrics_over_http(exporters: list[PrometheusExporter]) -> None:
    port = free_port()
    exporter = PrometheusExporter(addr="127.0.0.1", base_port=port, local_rank=0, out_dir=None, info=INFO)
    exporters.append(exporter)
    exporter.start()
    assert exporter.port == port
    exporter.refresh(make_snapshot())
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    assert 'hooktrace_steps_total{rank="1",run_id="run-42"} 3.0' in text
    assert exporter.collector.scrape_size_bytes == len(text.encode())
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    request = urllib.request.Request(url, headers={"Accept": accept, "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.headers["Content-Encoding"] == "gzip"
        body = gzip.decompress(response.read()).decode()
    assert f'trace_id="{TRACE_ID}"' in body
    assert f'hooktrace_scrape_size_bytes{{rank="1",run_id="run-42"}} {len(text.encode())}.0' in body


def test_a_taken_port_falls_back_to_the_next_with_one_stderr_line(
    exporters: list[PrometheusExporter], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        exporter = PrometheusExporter(addr="127.0.0.1", base_port=taken, local_rank=0, out_dir=str(tmp_path), info=INFO)
        exporters.append(exporter)
        exporter.start()
    assert exporter.port is not None and exporter.port > taken
    err = capsys.readouterr().err
    assert err == (
        f"hooktrace: port {taken} is taken; serving /metrics on 127.0.0.1:{exporter.port} instead "
        "(use --metrics-port to choose)\n"
    )
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert targets == [{"targets": [f"127.0.0.1:{exporter.port}"], "labels": {"run_id": "run-42", "rank": "1"}}]


def test_local_ranks_of_a_node_share_targets_json(tmp_path: Path) -> None:
    write_target(str(tmp_path), "127.0.0.1:9751", "run-42", 1)
    write_target(str(tmp_path), "127.0.0.1:9750", "run-42", 0)
    write_target(str(tmp_path), "127.0.0.1:9760", "run-42", 1)  # a restarted rank replaces its entry
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert [t["targets"] for t in targets] == [["127.0.0.1:9750"], ["127.0.0.1:9760"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["targets.json", "targets.json.lock"]


def test_binding_every_interface_publishes_the_hostname(exporters: list[PrometheusExporter], tmp_path: Path) -> None:
    exporter = PrometheusExporter(addr="0.0.0.0", base_port=free_port(), local_rank=0, out_dir=str(tmp_path), info=INFO)
    exporters.append(exporter)
    exporter.start()
    targets = json.loads((tmp_path / "targets.json").read_text())
    assert targets[0]["targets"] == [f"{socket.gethostname()}:{exporter.port}"]


def test_port_zero_means_off_and_close_is_idempotent(tmp_path: Path) -> None:
    exporter = PrometheusExporter(addr="127.0.0.1", base_port=0, local_rank=3, out_dir=str(tmp_path), info=INFO)
    exporter.start()
    assert exporter.port is None
    assert not (tmp_path / "targets.json").exists()
    exporter.close()
    exporter.close()


def test_an_unusable_address_raises_a_fix_it_error() -> None:
    exporter = PrometheusExporter(addr="203.0.113.7", base_port=free_port(), local_rank=0, out_dir=None, info=INFO)
    with pytest.raises(HooktraceError, match="--metrics-addr"):
        exporter.start()


def test_both_exposition_formats_parse_back_with_the_reference_parsers() -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    registry = registry_for(make_snapshot())
    assert len(list(parse_text(generate_latest(registry).decode()))) == len(DESIGN_TYPES)
    assert len(list(parse_openmetrics(generate_openmetrics(registry).decode()))) == len(DESIGN_TYPES)


def test_histogram_buckets_are_inclusive_upper_bounds() -> None:
    from hooktrace._aggregate.snapshot import Histogram

    hist = Histogram((0.001, 0.002, 0.004))
    for value in (0.0005, 0.001, 0.0011, 0.004, 5.0, float("nan")):
        hist.observe(value)
    assert hist.counts == [2, 1, 1, 2]  # le=0.001 holds 0.001 itself; 5 s and NaN land in +Inf
