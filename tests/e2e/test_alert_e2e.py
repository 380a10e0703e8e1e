"""A real run's gradient explodes: real Prometheus fires the alert, real Alertmanager routes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.servers import (
    RULES_FILE,
    WebhookReceiver,
    free_port,
    require_binary,
    start_alertmanager,
    start_prometheus,
)

REPO = Path(__file__).resolve().parents[2]


def test_an_exploding_run_fires_the_alert_with_its_run_and_rank(tmp_path: Path) -> None:
    require_binary("prometheus")
    require_binary("prometheus-alertmanager", "alertmanager")
    out, trigger, port = tmp_path / "run", tmp_path / "explode-now", free_port()
    with (
        WebhookReceiver() as webhook,
        start_alertmanager(tmp_path, webhook.url) as alertmanager,
        start_prometheus(
            tmp_path,
            scrape_targets_file=out / "targets.json",
            rule_files=[RULES_FILE],
            alertmanager_url=alertmanager.url,
        ) as prometheus,
    ):
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hooktrace.cli.main",
                "run",
                "--metrics-port",
                str(port),
                "--out",
                str(out),
                "--run-id",
                "alert-e2e",
                str(REPO / "examples" / "train_mlp.py"),
                "--steps",
                "100000",
                "--step-sleep",
                "0.01",
                "--explode-when",
                str(trigger),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # The counter is scraped at 0 first, so that increase() sees the spike.
            prometheus.wait_for('hooktrace_grad_spike_steps_total{run_id="alert-e2e",rank="0"} == 0', timeout=60)
            assert not webhook.bodies
            trigger.touch()
            prometheus.wait_for('hooktrace_grad_spike_steps_total{run_id="alert-e2e",rank="0"} >= 1', timeout=60)
            alert = webhook.wait_for_alert("HooktraceGradientExplosion", timeout=60)
        finally:
            run.terminate()
            _, err = run.communicate(timeout=60)
    assert alert["labels"]["run_id"] == "alert-e2e"
    assert alert["labels"]["rank"] == "0"
    assert "alert-e2e" in alert["annotations"]["summary"] and "rank 0" in alert["annotations"]["summary"]
    assert "gradient spike at step" in err
    assert run.returncode == 143
