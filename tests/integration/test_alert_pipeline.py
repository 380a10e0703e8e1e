"""The real alert path: /metrics -> Prometheus (our rules) -> Alertmanager -> a webhook."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from tests.servers import (
    RULES_FILE,
    WebhookReceiver,
    free_port,
    start_alertmanager,
    start_prometheus,
    write_file_sd,
)

LABELS = {"run_id": "t1", "rank": "0"}


@contextmanager
def serve_metrics(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` on 127.0.0.1:<free port>/metrics; yield the ``host:port`` target."""
    port = free_port()
    httpd, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def fake_hooktrace_metrics(registry: CollectorRegistry) -> Counter:
    """Register ``hooktrace_info`` and a spike counter (at 0, as the agent exposes it) for t1/rank 0."""
    info = Gauge("hooktrace_info", "hooktrace agent", [*LABELS, "local_rank", "world_size"], registry=registry)
    info.labels(**LABELS, local_rank="0", world_size="1").set(1)
    spikes = Counter("hooktrace_grad_spike_steps", "steps with a gradient spike", [*LABELS], registry=registry)
    spikes.labels(**LABELS)
    return spikes


def test_a_gradient_spike_reaches_the_webhook_through_prometheus_and_alertmanager(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    spikes = fake_hooktrace_metrics(registry)
    with (
        WebhookReceiver() as webhook,
        start_alertmanager(tmp_path, webhook.url) as alertmanager,
        serve_metrics(registry) as target,
        start_prometheus(
            tmp_path, static_targets=[target], rule_files=[RULES_FILE], alertmanager_url=alertmanager.url
        ) as prometheus,
    ):
        prometheus.wait_for('hooktrace_grad_spike_steps_total{run_id="t1",rank="0"} == 0', timeout=30)
        assert prometheus.query('ALERTS{alertname="HooktraceGradientExplosion"}') == []

        spikes.labels(**LABELS).inc()
        alert = webhook.wait_for_alert("HooktraceGradientExplosion", timeout=30)

    assert alert["labels"] == {
        "alertname": "HooktraceGradientExplosion",
        "severity": "warning",
        "run_id": "t1",
        "rank": "0",
    }
    assert alert["annotations"]["summary"] == "Gradient explosion in run t1 rank 0"


def test_prometheus_scrapes_targets_written_to_its_file_sd_file_after_start(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    fake_hooktrace_metrics(registry)
    targets_file = tmp_path / "targets.json"
    with (
        start_prometheus(tmp_path, scrape_targets_file=targets_file) as prometheus,
        serve_metrics(registry) as target,
    ):
        write_file_sd(targets_file, [target], labels={"cluster": "test"})
        series = prometheus.wait_for('hooktrace_info{run_id="t1",rank="0"}', timeout=30)

    assert series[0]["metric"]["cluster"] == "test"
