from __future__ import annotations

import pytest

from hooktrace import Config, ConfigError


def test_defaults_match_the_design_table() -> None:
    cfg = Config.resolve({}, environ={})
    assert (cfg.metrics_port, cfg.metrics_addr, cfg.sample_every, cfg.depth, cfg.max_modules) == (
        9750,
        "127.0.0.1",
        10,
        3,
        256,
    )
    assert (cfg.backward, cfg.explode_factor, cfg.on_explosion, cfg.on_nonfinite) == ("auto", 10.0, "warn", "warn")
    assert cfg.run_id and cfg.out_dir() == f"hooktrace-runs/{cfg.run_id}"


def test_explicit_beats_environment_which_beats_default() -> None:
    env = {"HOOKTRACE_SAMPLE_EVERY": "5", "HOOKTRACE_DEPTH": "2", "HOOKTRACE_WATCH": "blocks.0, head"}
    cfg = Config.resolve({"sample_every": 7}, environ=env)
    assert cfg.sample_every == 7 and cfg.depth == 2 and cfg.watch == ("blocks.0", "head")


def test_run_id_comes_from_torchrun_when_not_given() -> None:
    assert Config.resolve({}, environ={"TORCHELASTIC_RUN_ID": "job-7"}).run_id == "job-7"


def test_otlp_endpoint_falls_back_to_the_standard_variable() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}
    assert Config.resolve({}, environ=env).otlp_endpoint == "http://collector:4318"


@pytest.mark.parametrize(
    ("values", "env", "fragment"),
    [
        ({"sample_every": 0}, {}, "--sample-every / HOOKTRACE_SAMPLE_EVERY must be a positive integer"),
        ({"flow_every": -1}, {}, "--flow-every / HOOKTRACE_FLOW_EVERY must be a whole number of steps (0 = off)"),
        ({"metrics_port": 70000}, {}, "--metrics-port / HOOKTRACE_METRICS_PORT must be a port number"),
        ({"backward": "sometimes"}, {}, "--backward / HOOKTRACE_BACKWARD must be one of auto, full, off"),
        ({"explode_factor": 0.5}, {}, "--explode-factor / HOOKTRACE_EXPLODE_FACTOR must be > 1"),
        ({}, {"HOOKTRACE_DEPTH": "deep"}, "HOOKTRACE_DEPTH='deep' is not valid for --depth"),
        ({"colour": "red"}, {}, "unknown config field 'colour'"),
    ],
)
def test_bad_values_fail_with_one_line_naming_flag_and_variable(
    values: dict[str, object], env: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        Config.resolve(values, environ=env)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
