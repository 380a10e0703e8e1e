"""deploy/: every config passes its own tool, and the pieces agree with each other and with the agent.

- Prometheus configs: ``promtool check config`` (the compose one with its container paths mapped
  to the repository through compose's own mounts); Alertmanager configs: ``amtool check-config``.
- compose.yaml: the Compose Specification JSON schema, vendored in tests/data/compose-spec.json
  (compose/config/compose_spec.json of the docker-compose 1.29.2 wheel on PyPI, Apache-2.0), then
  the links between services (mounts, ports, datasource uids).
- deploy/k8s: no cluster here, so the manifests are checked by structure (kinds, required fields,
  selectors against the ports the agent serves), and the generated files against their sources.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

from hooktrace.cli import stack
from tests.servers import REPO_ROOT, RULES_FILE, require_binary

DEPLOY = REPO_ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
DASHBOARDS_DIR = REPO_ROOT / "grafana" / "dashboards"
COMPOSE_SCHEMA = REPO_ROOT / "tests" / "data" / "compose-spec.json"


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_DIR / "compose.yaml")


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with VAR unset (the committed defaults)."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def mounts(service: str) -> dict[str, str]:
    """Container path -> source (a resolved host path for binds, else the volume name)."""
    result = {}
    for volume in compose()["services"][service].get("volumes", []):
        source, target = interpolate(volume).split(":")[:2]
        if source.startswith((".", "/")):
            source = str((COMPOSE_DIR / source).resolve())
        result[target] = source
    return result


def host_path(service: str, container_path: str) -> tuple[str, str]:
    """(mount source, rest of the path) for a path inside ``service``'s container."""
    for target, source in sorted(mounts(service).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source, container_path[len(target) :].lstrip("/")
    raise AssertionError(f"{container_path} is not mounted into {service}: {mounts(service)}")


def prometheus_host_path(container_path: str) -> tuple[str, str]:
    return host_path("prometheus", container_path)


def run_tool(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


# -- compose -------------------------------------------------------------------------------------


def test_the_compose_file_is_valid_under_the_compose_specification_schema() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text(encoding="utf-8"))
    # The vendored file names its draft with a malformed $schema URL: pick the draft explicitly.
    jsonschema.Draft201909Validator.check_schema(schema)
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft201909Validator(schema).iter_errors(compose())
    ]
    assert errors == []


def test_every_compose_image_is_pinned_to_an_exact_version() -> None:
    for name, service in compose()["services"].items():
        image = service["image"]
        repository, _, tag = image.rpartition(":")
        assert repository and re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{name}: {image} is not pinned"


def test_the_compose_grafana_runs_the_release_the_dashboards_are_built_for() -> None:
    tree = ast.parse((REPO_ROOT / "grafana" / "build.py").read_text(encoding="utf-8"))
    version = str(
        next(
            node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "GRAFANA_VERSION" for t in node.targets)
            and isinstance(node.value, ast.Constant)
        )
    )
    assert compose()["services"]["grafana"]["image"].startswith(f"grafana/grafana:{version}.")


def test_compose_mounts_the_rules_and_dashboards_from_their_one_source() -> None:
    assert mounts("prometheus")["/etc/prometheus/rules"] == str(RULES_FILE.parent)
    provider = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "hooktrace.yml")["providers"][0]
    assert host_path("grafana", provider["options"]["path"]) == (str(DASHBOARDS_DIR), "")
    assert mounts("targets-sync")["/hooktrace-runs"] == str(REPO_ROOT / "hooktrace-runs")
    for service in compose()["services"]:
        for source in mounts(service).values():
            if source.startswith("/") and source != str(REPO_ROOT / "hooktrace-runs"):
                assert Path(source).exists(), f"{service} mounts {source}, which is not in the repository"


def test_the_compose_prometheus_config_passes_promtool_check_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    config = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    config["rule_files"] = [
        str(Path(src).joinpath(rest)) for src, rest in map(prometheus_host_path, config["rule_files"])
    ]
    assert config["rule_files"] == [str(RULES_FILE)]
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            # tmp_path stands in for the mounted volume; the pattern is checked as written.
            sd["files"] = [str(tmp_path / prometheus_host_path(f)[1]) for f in sd["files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    result = run_tool(promtool, "check", "config", str(checked))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_the_compose_prometheus_scrapes_the_merged_run_targets_and_alerts_the_compose_alertmanager() -> None:
    services = compose()["services"]
    config = load_yaml(COMPOSE_DIR / "prometheus" / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "hooktrace")
    assert job["honor_labels"] is True
    (pattern,) = job["file_sd_configs"][0]["files"]
    volume, rest = host_path("prometheus", pattern)
    sync_output = services["targets-sync"]["command"][-1]
    assert volume in compose()["volumes"]
    assert host_path("targets-sync", sync_output) == (volume, Path(sync_output).name)
    assert Path(sync_output).match(rest)
    assert job["relabel_configs"][0]["replacement"].startswith("host.docker.internal:")
    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    (target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and any(p.endswith(f":{port}") for p in services[host]["ports"])


ALERTMANAGER_CONFIGS = [
    COMPOSE_DIR / "alertmanager" / "alertmanager.yml",
    DEPLOY / "local" / "alertmanager.example.yml",
]


@pytest.mark.parametrize("path", ALERTMANAGER_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_committed_alertmanager_config_passes_amtool_check_config(path: Path) -> None:
    amtool = require_binary("amtool")
    result = run_tool(amtool, "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_links_prometheus_exemplars_to_the_tempo_datasource() -> None:
    datasources = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "hooktrace.yml")["datasources"]
    by_type = {d["type"]: d for d in datasources}
    prometheus, tempo = by_type["prometheus"], by_type["tempo"]
    assert prometheus["isDefault"] is True
    assert prometheus["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": tempo["uid"]}
    ]
    tempo_port = load_yaml(COMPOSE_DIR / "tempo" / "tempo.yaml")["server"]["http_listen_port"]
    assert tempo["url"] == f"http://tempo:{tempo_port}"
    assert prometheus["url"] == "http://prometheus:9090"
    assert by_type["alertmanager"]["url"] == "http://alertmanager:9093"
    assert {"prometheus", "tempo", "alertmanager"} <= set(compose()["services"])


def test_the_collector_sends_otlp_through_memory_limiter_and_batch_to_tempo() -> None:
    collector = load_yaml(COMPOSE_DIR / "otel-collector" / "config.yaml")
    pipeline = collector["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"]
    assert pipeline["processors"] == ["memory_limiter", "batch"]
    (exporter,) = pipeline["exporters"]
    tempo_grpc = load_yaml(COMPOSE_DIR / "tempo" / "tempo.yaml")["distributor"]["receivers"]["otlp"]["protocols"][
        "grpc"
    ]
    assert collector["exporters"][exporter]["endpoint"] == "tempo:" + tempo_grpc["endpoint"].rsplit(":", 1)[1]
    published = compose()["services"]["otel-collector"]["ports"]
    for protocol in ("grpc", "http"):
        port = collector["receivers"]["otlp"]["protocols"][protocol]["endpoint"].rsplit(":", 1)[1]
        assert any(p.split()[0].endswith(f":{port}:{port}") for p in published)


def test_tempo_keeps_traces_of_at_least_50_mb() -> None:
    overrides = load_yaml(COMPOSE_DIR / "tempo" / "tempo.yaml")["overrides"]["defaults"]
    assert overrides["global"]["max_bytes_per_trace"] >= 50_000_000


def test_the_compose_sidecar_and_the_local_stack_merge_run_targets_identically(tmp_path: Path) -> None:
    sync = load_module(COMPOSE_DIR / "targets-sync" / "sync.py")
    for name, content in {
        "r2": [{"targets": ["127.0.0.1:9751"], "labels": {"run_id": "r2", "rank": "1"}}],
        "r1": [
            {"targets": ["127.0.0.1:9750"], "labels": {"run_id": "r1", "rank": "0"}},
            {"targets": []},
            {"targets": ["x:2"], "labels": {"rank": 0}},  # a label that is not a string
            {"targets": [9750]},  # a target that is not a string
        ],
        "half": "[{",
        "foreign": {"targets": ["x:1"]},
    }.items():
        (tmp_path / name).mkdir()
        text = content if isinstance(content, str) else json.dumps(content)
        (tmp_path / name / "targets.json").write_text(text, encoding="utf-8")
    merged = stack.merge_targets(tmp_path)
    assert merged == sync.merge_targets(tmp_path)
    assert [g["labels"]["run_id"] for g in merged] == ["r1", "r2"]


# -- local stack configs --------------------------------------------------------------------------


def test_the_local_stack_prometheus_config_passes_promtool_check_config(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    config = stack.prometheus_config(tmp_path / "targets.json", RULES_FILE, alertmanager_port=9093)
    assert config["scrape_configs"][0]["honor_labels"] is True
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config), encoding="utf-8")
    result = run_tool(promtool, "check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_local_stack_alertmanager_config_passes_amtool_check_config(tmp_path: Path) -> None:
    amtool = require_binary("amtool")
    path = tmp_path / "alertmanager.yml"
    path.write_text(json.dumps(stack.alertmanager_config()), encoding="utf-8")
    result = run_tool(amtool, "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# -- kubernetes ----------------------------------------------------------------------------------


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects of a kustomization's resources (files and directories), as kustomize reads them."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        path = (directory / resource).resolve()
        assert path.exists(), f"{directory}/kustomization.yaml lists missing {resource}"
        if path.is_dir():
            objects += kustomize(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]
    return objects


def by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def test_the_kustomizations_hold_well_formed_objects_of_the_expected_kinds() -> None:
    base, example = kustomize(K8S), kustomize(K8S / "example")
    assert sorted(o["kind"] for o in base) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    assert sorted(o["kind"] for o in example) == ["ConfigMap", "Job", "PodMonitor", "PrometheusRule"]
    for obj in example:
        assert obj["apiVersion"] and obj["metadata"]["name"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
        assert "spec" in obj or "data" in obj
    containers = by_kind(example)["Job"]["spec"]["template"]["spec"]["containers"]
    images = load_yaml(K8S / "example" / "kustomization.yaml")["images"]
    assert {c["image"] for c in containers} == {i["name"] for i in images}


def test_the_generated_k8s_files_equal_a_fresh_generation() -> None:
    generate = load_module(K8S / "generate.py")
    for path, text in generate.outputs().items():
        assert path.read_text(encoding="utf-8") == text, f"{path.name} is stale: run deploy/k8s/generate.py"


def test_the_prometheus_rule_holds_exactly_the_groups_of_the_rules_file() -> None:
    rule = by_kind(kustomize(K8S))["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == load_yaml(RULES_FILE)["groups"]


def test_the_dashboards_configmap_carries_every_dashboard_for_the_grafana_sidecar() -> None:
    configmap = by_kind(kustomize(K8S))["ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {p.name: p.read_text(encoding="utf-8") for p in DASHBOARDS_DIR.glob("*.json")}
    assert files and configmap["data"] == files
    assert len(yaml.safe_dump(configmap)) < 256 * 1024  # fits kubectl's last-applied annotation


def test_the_podmonitor_scrapes_one_named_port_per_local_rank_with_the_agents_labels() -> None:
    monitor = by_kind(kustomize(K8S))["PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert [e["port"] for e in endpoints] == [f"metrics-{r}" for r in range(8)]
    assert all(e["path"] == "/metrics" and e["honorLabels"] is True for e in endpoints)
    assert "job" not in json.dumps(monitor["spec"]).lower()  # never match job=
    assert monitor["spec"]["selector"]["matchLabels"]


def test_the_example_job_serves_each_rank_on_the_port_the_podmonitor_scrapes() -> None:
    from hooktrace.config import Config

    objects = by_kind(kustomize(K8S / "example"))
    job, monitor = objects["Job"], objects["PodMonitor"]
    template = job["spec"]["template"]
    for key, value in monitor["spec"]["selector"]["matchLabels"].items():
        assert template["metadata"]["labels"].get(key) == value
    (container,) = template["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["hooktrace", "run"]
    option = {
        flag: command[command.index(flag) + 1] for flag in ("--nproc-per-node", "--metrics-addr", "--metrics-port")
    }
    assert option["--metrics-addr"] == "0.0.0.0"
    nproc, base_port = int(option["--nproc-per-node"]), int(option["--metrics-port"])
    assert base_port == Config().metrics_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {f"metrics-{r}": base_port + r for r in range(nproc)}
    assert set(ports) <= {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    script = next(arg for arg in command if arg.endswith(".py"))
    assert (REPO_ROOT / script).is_file()
    assert template["spec"]["restartPolicy"] == "Never"
