"""Deployment files: they parse, and every image, port, environment variable and file they name exists.

Nothing here starts containers (no Docker in CI); ``docker compose config`` and ``kubectl kustomize``
run only where those tools are installed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import ssl
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from synthwatch.cli.main import app as cli_app
from synthwatch.dashboards.clickhouse_query import PLUGIN_ID, PLUGIN_VERSION
from synthwatch.producers.gateway import GatewayConfigError, check_listen_address
from synthwatch.settings import Settings
from synthwatch.stack.broker import EmbeddedBroker
from tests.conftest import TOPICS, isolated_settings, terminate, wait_until
from tests.support.factories import lab

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTING_VARS = {f"SYNTHWATCH_{name.upper()}" for name in Settings.model_fields}
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
WORKER_IMAGE = f"synthwatch/worker:{VERSION}"
WEB_PORT = 6066


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _synthwatch_vars(mapping: dict[str, Any]) -> set[str]:
    return {k for k in mapping if k.startswith("SYNTHWATCH_")}


# --- compose.yaml --------------------------------------------------------------------------------------


def test_compose_has_the_production_like_stack() -> None:
    assert {"kafka", "kafka-topics", "clickhouse", "migrate", "worker", "prometheus", "pushgateway", "grafana"} <= set(
        services()
    )
    kafka = _env(services()["kafka"])
    assert set(kafka["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, "KRaft: no ZooKeeper"
    assert not any("ZOOKEEPER" in key for s in services().values() for key in _env(s))


def test_compose_images_are_pinned_and_builds_exist() -> None:
    for name, service in services().items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image ({image!r})"
        if "build" in service:
            build = service["build"]
            context = (DEPLOY / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
            assert image == WORKER_IMAGE, f"{name}: our image is tagged with the package version"


def test_compose_mounts_and_depends_on_exist() -> None:
    declared_volumes = set(compose().get("volumes", {}))
    for name, service in services().items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name}: undeclared volume {source}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services(), f"{name} depends on unknown service {dependency}"


def test_compose_synthwatch_env_vars_are_settings() -> None:
    for name, service in services().items():
        unknown = _synthwatch_vars(_env(service)) - SETTING_VARS
        assert not unknown, f"{name}: {unknown} are not fields of synthwatch.settings.Settings"
    worker = _env(services()["worker"])
    assert {"SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS", "SYNTHWATCH_CLICKHOUSE_URL"} <= set(worker)
    # the values parse as the Settings model would read them (interpolations given sample values)
    sample = {k: re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", "8", v) for k, v in worker.items()}
    settings = Settings(**{k.removeprefix("SYNTHWATCH_").lower(): v for k, v in sample.items()})
    assert settings.web_port == WEB_PORT and not settings.clickhouse_is_embedded


def test_compose_wiring_between_services() -> None:
    s = services()
    worker = _env(s["worker"])
    kafka = _env(s["kafka"])
    assert worker["SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS"] == kafka["KAFKA_ADVERTISED_LISTENERS"].removeprefix(
        "PLAINTEXT://"
    )
    url = worker["SYNTHWATCH_CLICKHOUSE_URL"]
    assert re.fullmatch(
        r"https://synthwatch:\$\{CLICKHOUSE_PASSWORD[^}]*\}@clickhouse:8443/synthwatch\?ca_cert=/etc/synthwatch/tls/ca.crt",
        url,
    )
    assert _env(s["clickhouse"])["CLICKHOUSE_DB"] == "synthwatch"
    assert _env(s["clickhouse"])["CLICKHOUSE_USER"] == "synthwatch"
    assert worker["SYNTHWATCH_WEB_PORT"] == str(WEB_PORT) and str(WEB_PORT) in s["worker"]["expose"]
    assert s["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert s["migrate"]["command"] == ["db", "migrate"]
    # the topics the one-shot job creates are the ones the worker reads and writes
    script = s["kafka-topics"]["command"][0]
    created = set(re.search(r"for topic in ([^;]+);", script).group(1).split())  # type: ignore[union-attr]
    assert created == set(Settings().all_topics)
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "synthwatch-worker")
    assert job["dns_sd_configs"][0]["names"] == ["worker"] and job["dns_sd_configs"][0]["port"] == WEB_PORT
    assert any(f.startswith("--config.file=/etc/prometheus/") for f in s["prometheus"]["command"])
    assert "./prometheus:/etc/prometheus:ro" in s["prometheus"]["volumes"]


def test_compose_grafana_gets_plugin_datasources_and_dashboards() -> None:
    grafana = services()["grafana"]
    env = _env(grafana)
    assert env["GF_INSTALL_PLUGINS"].split() == [PLUGIN_ID, PLUGIN_VERSION]
    mounts = dict(m.split(":")[:2] for m in grafana["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/synthwatch.yaml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert mounts["../dashboards/json"] == dashboards_path
    assert {p.name for p in (DEPLOY / "../dashboards/json").iterdir()} >= {"overview.json", "substance.json"}
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_path}/overview.json"
    # every ${VAR} of the datasource provisioning is set in Grafana's environment
    datasources = (DEPLOY / "grafana/provisioning/datasources/datasources.yaml").read_text()
    datasources = "\n".join(line for line in datasources.splitlines() if not line.lstrip().startswith("#"))
    for variable in re.findall(r"\$\{(\w+)\}", datasources):
        assert variable in env, f"Grafana needs {variable} for its datasources"
    # and the read-only ClickHouse user it logs in as is mounted into ClickHouse with that password
    assert env["CLICKHOUSE_GRAFANA_USER"] == "grafana"
    users = (DEPLOY / "grafana/clickhouse-users.d/grafana.xml").read_text()
    assert "<grafana>" in users and 'from_env="CLICKHOUSE_GRAFANA_PASSWORD"' in users
    assert "CLICKHOUSE_GRAFANA_PASSWORD" in _env(services()["clickhouse"])


def test_compose_required_variables_are_documented() -> None:
    text = (DEPLOY / "compose.yaml").read_text()
    readme = (DEPLOY / "README.md").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    assert required == {
        "CLICKHOUSE_PASSWORD",
        "CLICKHOUSE_GRAFANA_PASSWORD",
        "CLICKHOUSE_ANALYST_PASSWORD",
        "GRAFANA_ADMIN_PASSWORD",
        "SYNTHWATCH_WORKER_KEY",  # shared by the scaled workers: each would refuse the others' records
    }
    for variable in required | set(re.findall(r"\$\{(\w+):-", text)):
        assert variable in readme, f"deploy/README.md does not explain {variable}"


def _compose_command() -> list[str] | None:
    """``docker compose`` (v2 plugin) or ``docker-compose`` (v1), whichever is installed."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_compose_command() is None, reason="neither `docker compose` nor docker-compose is installed")
def test_docker_compose_config_is_valid() -> None:
    command = _compose_command()
    assert command is not None
    path = str(DEPLOY / "compose.yaml")
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin"}
    passwords = {"CLICKHOUSE_PASSWORD": "x", "CLICKHOUSE_GRAFANA_PASSWORD": "y", "GRAFANA_ADMIN_PASSWORD": "z"}
    done = subprocess.run(
        [*command, "-f", path, "config", "-q"], capture_output=True, text=True, env={**env, **passwords}
    )
    assert done.returncode == 0, done.stdout + done.stderr
    done = subprocess.run([*command, "-f", path, "config", "-q"], capture_output=True, text=True, env=env)
    assert done.returncode != 0 and "CLICKHOUSE_PASSWORD" in done.stdout + done.stderr, "passwords are required"


# --- Dockerfile ----------------------------------------------------------------------------------------


def _dockerfile() -> list[list[str]]:
    """Instructions as token lists (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [shlex.split(line, posix=False) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_the_whole_package_and_runs_synthwatch() -> None:
    instructions = _dockerfile()
    copied = []
    for tokens in instructions:
        if tokens[0] == "COPY" and not any(t.startswith("--from") for t in tokens):
            for source in tokens[1:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
                copied.append(source.rstrip("/"))
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values()
    for folder in package_dirs:
        assert any(folder == c or folder.startswith(c + "/") for c in copied), f"the image lacks {folder}/"
    assert "pyproject.toml" in copied and "README.md" in copied  # pyproject's readme
    exposed = [t for tokens in instructions if tokens[0] == "EXPOSE" for t in tokens[1:]]
    assert exposed == [str(WEB_PORT)]
    entrypoint = next(" ".join(t[1:]) for t in instructions if t[0] == "ENTRYPOINT")
    assert entrypoint == '["synthwatch"]'
    env_keys = {t.split("=", 1)[0] for tokens in instructions if tokens[0] == "ENV" for t in tokens[1:] if "=" in t}
    assert _synthwatch_vars(dict.fromkeys(env_keys)) <= SETTING_VARS
    assert any(tokens[0] == "USER" and tokens[1] != "root" for tokens in instructions)
    health = next(" ".join(t) for t in instructions if t[0] == "HEALTHCHECK")
    assert f"127.0.0.1:{WEB_PORT}/ready" in health


def test_dockerfile_puts_the_clustered_migrations_where_the_cli_reads_them() -> None:
    import synthwatch
    from synthwatch.stream_apps.storage import clustered

    instructions = _dockerfile()
    python = next(t[1] for t in instructions if t[0] == "FROM").split(":")[1].split("-")[0]  # "3.11"
    site_packages = f"/opt/synthwatch/lib/python{python}/site-packages"
    # clustered.py looks in <parent of the synthwatch package>/deploy/clickhouse/clustered
    relative = clustered.CLUSTERED_DIR.relative_to(Path(synthwatch.__file__).resolve().parent.parent)
    targets = [t[-1].rstrip("/") for t in instructions if t[0] == "COPY" and len(t) >= 3]
    assert f"{site_packages}/{relative}" in targets


# --- Kubernetes ----------------------------------------------------------------------------------------


def k8s_documents(include_example: bool = False) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml" or (path.name == "secret.example.yaml" and not include_example):
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str, include_example: bool = False) -> list[dict[str, Any]]:
    return [d for d in k8s_documents(include_example) if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in by_kind(kind) if d["metadata"]["name"] == name)


def worker() -> dict[str, Any]:
    return named("Deployment", "synthwatch-worker")


def config() -> dict[str, str]:
    return by_kind("ConfigMap")[0]["data"]  # type: ignore[no-any-return]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(resources) == on_disk
    assert kustomization["images"] == [{"name": "synthwatch/worker", "newTag": VERSION}]
    for doc in k8s_documents(include_example=True):
        assert {"apiVersion", "kind", "metadata"} <= set(doc) and doc["metadata"].get("name"), doc


def test_k8s_config_and_secret_hold_only_settings() -> None:
    secret = by_kind("Secret", include_example=True)[0]
    assert secret["metadata"]["name"] == "synthwatch"
    for data in (config(), secret["stringData"]):
        unknown = _synthwatch_vars(data) - SETTING_VARS
        assert set(data) == _synthwatch_vars(data) and not unknown, unknown
    assert {"SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS", "SYNTHWATCH_CLICKHOUSE_URL"} <= set(secret["stringData"])
    Settings(**{k.removeprefix("SYNTHWATCH_").lower(): v for k, v in {**config(), **secret["stringData"]}.items()})


#: A DNS host name (RFC 1123 labels): what a Service's cluster name must be to resolve.
_DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)(\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$")


def test_every_address_in_the_deploy_files_is_a_host_name_that_can_resolve() -> None:
    """A scripted rename of modules once turned ``clickhouse-synthwatch.clickhouse.svc`` into
    ``clickhouse-synthwatch.stream_apps.storage.clickhouse.svc`` in the example Secret: an underscore,
    so no cluster could ever resolve it. Every URL and bootstrap address in deploy/ must be a DNS name."""
    hosts: list[tuple[str, str]] = []
    for path in sorted(DEPLOY.rglob("*.y*ml")):
        text = re.sub(r"\$\{[^}]*\}", "x", path.read_text())  # compose's ${VAR:?message} interpolations
        hosts += [(path.name, m) for m in re.findall(r"[a-z][a-z0-9+.-]*://(?:[^@/\s]*@)?([^:/?\s\"']+)", text)]
        hosts += [(path.name, m) for m in re.findall(r"BOOTSTRAP_SERVERS:\s*\"?([^:\s\"]+):\d+", text)]
    assert any(".svc" in host for _, host in hosts)  # the cluster addresses are among those checked
    bad = [(name, host) for name, host in hosts if not _DNS_NAME.match(host)]
    assert not bad, bad


def test_k8s_workers_scale_with_probes_resources_and_config_from_the_secret() -> None:
    deployment = worker()
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    pod = spec["template"]
    assert pod["metadata"]["labels"] | spec["selector"]["matchLabels"] == pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == WORKER_IMAGE
    assert container["args"][0] == "worker"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == WEB_PORT == int(config()["SYNTHWATCH_WEB_PORT"])
    assert config()["SYNTHWATCH_WEB_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/ready" and check["port"] in ("http", WEB_PORT), probe
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] and container["resources"]["limits"]["memory"]
    refs = [(next(iter(ref)), next(iter(ref.values()))["name"]) for ref in container["envFrom"]]
    assert refs[:2] == [("configMapRef", "synthwatch-config"), ("secretRef", "synthwatch")]
    # each officer's webhook secret, by the secret_env names of the subscriptions file
    assert (
        refs[2:] == [("secretRef", "synthwatch-webhook-secrets")] and container["envFrom"][2]["secretRef"]["optional"]
    )
    assert by_kind("ConfigMap")[0]["metadata"]["name"] == "synthwatch-config"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert config()["SYNTHWATCH_DATA_DIR"] in mounts, "the data dir must be writable (read-only root filesystem)"


def test_k8s_selectors_match_the_worker_pods() -> None:
    labels = worker()["spec"]["template"]["metadata"]["labels"]

    def matches(selector: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert matches(named("Service", "synthwatch-worker")["spec"]["selector"])
    assert matches(named("PodDisruptionBudget", "synthwatch-worker")["spec"]["selector"]["matchLabels"])
    monitor = by_kind("PodMonitor")[0]["spec"]
    assert matches(monitor["selector"]["matchLabels"])
    assert (
        monitor["podMetricsEndpoints"][0]["port"] == "http" and monitor["podMetricsEndpoints"][0]["path"] == "/metrics"
    )
    assert labels[monitor["jobLabel"]] == "synthwatch-worker", "rules and dashboards use job=synthwatch-worker"


def test_k8s_topics_match_the_settings_and_partitions() -> None:
    topics = {t["spec"]["topicName"]: t["spec"] for t in by_kind("KafkaTopic")}
    partitions = int(config()["SYNTHWATCH_PARTITIONS"])
    app_id = config()["SYNTHWATCH_APP_ID"]
    tables = re.findall(r'app\.Table\("([\w-]+)"', (ROOT / "stream_apps" / "runtime" / "state_tables.py").read_text())
    assert tables, "the worker's Faust tables"
    changelogs = {f"{app_id}-{table}-changelog" for table in tables}
    configured = {
        config()[f"SYNTHWATCH_TOPIC_{name}"]
        for name in ("LAB_DETECTIONS", "BORDER_SEIZURES", "REJECTS", "ALERTS", "SIGHTINGS")
    }
    assert configured == set(Settings().all_topics)
    assert set(topics) == configured | changelogs
    for name, spec in topics.items():
        assert spec["partitions"] == partitions, f"{name}: all topics co-partitioned"
        assert spec["replicas"] >= int(config()["SYNTHWATCH_REPLICATION_FACTOR"])
        assert spec["config"]["cleanup.policy"] == ("compact" if name in changelogs else "delete")


def test_k8s_prometheus_rules_equal_the_rule_files() -> None:
    rule = by_kind("PrometheusRule")[0]
    assert rule["spec"] == yaml.safe_load((DEPLOY / "prometheus" / "rules" / "synthwatch.yml").read_text())


def test_k8s_commands_exist_in_the_cli() -> None:
    runner = CliRunner()
    for doc in by_kind("Deployment") + by_kind("Job"):
        for container in doc["spec"]["template"]["spec"]["containers"]:
            args = container["args"]
            words = [a for a in args if not a.startswith("-")][:2]
            command = words if len(words) == 2 and words[0] == "db" else words[:1]
            done = runner.invoke(cli_app, [*command, "--help"])
            assert done.exit_code == 0, f"synthwatch {' '.join(command)}: {done.output}"
            for option in (a for a in args if a.startswith("--")):
                if option == "--clustered" and "--clustered" not in done.output:
                    pytest.skip(
                        "`synthwatch db migrate --clustered` is not in the CLI yet (deploy/clickhouse/clustered/)"
                    )
                assert option in done.output, f"synthwatch {' '.join(command)} has no {option}"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --- README --------------------------------------------------------------------------------------------


def test_readme_names_files_that_exist_and_explains_scaling() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in re.findall(r"`((?:deploy/|\.\./|k8s/|prometheus/|grafana/|clickhouse/|dashboards/)[\w./-]*)`", readme):
        candidates = [ROOT / path, DEPLOY / path]
        assert any(c.exists() for c in candidates), f"deploy/README.md names {path}, which does not exist"
    for words in ("partition", "keyed", "region", "substance", "sightings", "shard"):
        assert words in readme


# --- security hardening (issue 12) -----------------------------------------------------------------------


def _policies(namespace: str) -> list[dict[str, Any]]:
    return [d for d in by_kind("NetworkPolicy") if d["metadata"]["namespace"] == namespace]


def test_k8s_network_policies_admit_only_prometheus_to_workers_and_only_our_clients_to_clickhouse() -> None:
    ours = _policies("synthwatch")
    deny = [p for p in ours if p["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and deny[0]["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny[0]["spec"]
    labels = worker()["spec"]["template"]["metadata"]["labels"]
    to_worker, to_gateway = (
        next(p for p in ours if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component") == c)
        for c in ("worker", "gateway")
    )
    assert len(ours) == 3, "deny-all, Prometheus to the workers, the labs to the gateway"
    assert all(labels.get(k) == v for k, v in to_worker["spec"]["podSelector"]["matchLabels"].items())
    gateway_labels = named("Deployment", "synthwatch-gateway")["spec"]["template"]["metadata"]["labels"]
    assert all(
        labels.get(k) != v
        for k, v in to_gateway["spec"]["podSelector"]["matchLabels"].items()
        if k != "app.kubernetes.io/name"
    )
    assert all(gateway_labels.get(k) == v for k, v in to_gateway["spec"]["podSelector"]["matchLabels"].items())
    (open_rule,) = to_gateway["spec"]["ingress"]
    assert open_rule == {"ports": [{"port": 8443, "protocol": "TCP"}]}, "the gateway's HTTPS port, nothing else"
    (rule,) = to_worker["spec"]["ingress"]
    assert rule["ports"] == [{"port": WEB_PORT, "protocol": "TCP"}]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}

    (clickhouse,) = _policies("clickhouse")
    clients, replicas = clickhouse["spec"]["ingress"]
    assert {p["port"] for p in clients["ports"]} == {8443, 9440}, "TLS ports only"
    namespaces = {p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for p in clients["from"]}
    assert namespaces == {"synthwatch", "grafana"}
    ours_peer = next(p for p in clients["from"] if "matchExpressions" in p["podSelector"])
    assert ours_peer["podSelector"]["matchExpressions"][0]["values"] == ["worker", "migrate"]
    assert replicas["from"] == [{"podSelector": clickhouse["spec"]["podSelector"]}]


def test_clickhouse_is_reached_over_tls_everywhere() -> None:
    secret = by_kind("Secret", include_example=True)[0]["stringData"]
    assert secret["SYNTHWATCH_CLICKHOUSE_URL"].startswith("https://")
    assert secret["SYNTHWATCH_CLICKHOUSE_URL"].endswith("?ca_cert=/etc/synthwatch/clickhouse-ca/ca.crt")
    assert _env(services()["worker"])["SYNTHWATCH_CLICKHOUSE_URL"].startswith("https://")
    for deployment in (worker(), by_kind("Job")[0]):
        pod = deployment["spec"]["template"]["spec"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["clickhouse-ca"] == "/etc/synthwatch/clickhouse-ca"
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/datasources.yaml").read_text())
    clickhouse = next(d for d in datasource["datasources"] if d["type"] == "grafana-clickhouse-datasource")
    assert clickhouse["jsonData"]["secure"] is True and clickhouse["jsonData"]["port"] == 9440
    assert clickhouse["jsonData"]["tlsSkipVerify"] is False
    assert clickhouse["secureJsonData"]["tlsCACert"] == "$__file{/etc/grafana/tls/ca.crt}"
    assert "./tls:/etc/grafana/tls:ro" in services()["grafana"]["volumes"]
    tls = (DEPLOY / "clickhouse/config.d/tls.xml").read_text()
    assert '<http_port remove="1"/>' in tls and '<tcp_port remove="1"/>' in tls
    assert "<https_port>8443</https_port>" in tls and "<tcp_port_secure>9440</tcp_port_secure>" in tls
    mounts = services()["clickhouse"]["volumes"]
    assert "./clickhouse/config.d/tls.xml:/etc/clickhouse-server/config.d/tls.xml:ro" in mounts
    assert "https://127.0.0.1:8443/ping" in " ".join(services()["clickhouse"]["healthcheck"]["test"])
    assert (DEPLOY / "tls/make-certs.sh").is_file()
    assert set((DEPLOY / "tls/.gitignore").read_text().split()) >= {"*.crt", "*.key"}, "no keys in git"


def test_grafana_runs_a_current_patch_release() -> None:
    image = services()["grafana"]["image"]
    version = tuple(int(part) for part in image.rsplit(":", 1)[1].split("."))
    assert version >= (12, 4, 5), f"{image}: 11.x is out of support; use a current 12.x patch release"


def test_web_port_listens_on_all_interfaces_only_where_needed() -> None:
    assert Settings.model_fields["web_host"].default == "127.0.0.1"
    env_lines = [line for line in _dockerfile() if line and line[0] == "ENV"]
    assert not any("SYNTHWATCH_WEB_HOST" in token for line in env_lines for token in line), "the image binds loopback"
    # compose: Prometheus scrapes over the compose network, and no worker port is published on the host
    assert "ports" not in services()["worker"]
    # Kubernetes: Prometheus scrapes the pod IP, and a NetworkPolicy admits only Prometheus
    assert config()["SYNTHWATCH_WEB_HOST"] == "0.0.0.0" and _policies("synthwatch")


def test_dependencies_are_installed_from_the_constraints_file() -> None:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    pinned = {}
    for line in lines:
        name, _, version = line.partition("==")
        assert version and re.fullmatch(r"[\w.+!-]+", version), f"constraints.txt: {line!r} is not an exact pin"
        pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0]).lower()
        assert name in pinned, f"{name} (pyproject.toml) has no pin in constraints.txt"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'" in makefile
    assert re.search(r"^\$\(STAMP\): pyproject.toml constraints.txt$", makefile, re.MULTILINE)
    run = [line for line in _dockerfile() if line[0] == "RUN" and "install" in line and "." in line]
    assert any("-c" in line and "constraints.txt" in line for line in run)
    assert any(line[0] == "COPY" and "constraints.txt" in line for line in _dockerfile())


def _acls(user: dict[str, Any]) -> dict[tuple[str, str], set[str]]:
    return {
        (acl["resource"]["type"], acl["resource"]["name"]): set(acl["operations"])
        for acl in user["spec"]["authorization"]["acls"]
    }


def test_kafka_principals_write_only_what_they_own() -> None:
    users = {u["metadata"]["name"]: u for u in by_kind("KafkaUser")}
    settings = Settings()
    assert _acls(users["lab-fr"]) == {("topic", settings.topic_lab_detections): {"Describe", "Write"}}
    assert _acls(users["douane-ml"]) == {("topic", settings.topic_border_seizures): {"Describe", "Write"}}
    assert users["lab-fr"]["spec"]["authentication"]["type"] == "scram-sha-512"
    assert users["douane-ml"]["spec"]["authentication"]["type"] == "tls", "an mTLS example"
    worker_acls = _acls(users["synthwatch-worker"])
    written = {name for (kind, name), ops in worker_acls.items() if kind == "topic" and "Write" in ops}
    assert written == {settings.topic_alerts, settings.topic_sightings, settings.topic_rejects, f"{settings.app_id}-"}
    gateway_acls = _acls(users["synthwatch-gateway"])
    inputs = {settings.topic_lab_detections, settings.topic_border_seizures}
    assert gateway_acls == {("topic", t): {"Describe", "Write"} for t in (*inputs, settings.topic_rejects)}
    for name, user in users.items():
        if name != "synthwatch-worker":
            shared = {settings.topic_rejects} if name == "synthwatch-gateway" else set()
            for (_kind, topic), ops in _acls(user).items():
                assert topic not in written - shared and "Read" not in ops, f"{name} may not touch {topic}"
    # the same rules for a cluster without Strimzi
    script = (DEPLOY / "kafka/acls.sh").read_text()
    for topic in (settings.topic_alerts, settings.topic_sightings, settings.topic_rejects):
        assert topic in script
    assert "--topic synthwatch.lab-detections" in script and "--topic synthwatch.border-seizures" in script
    gateway_case = script.split("        gateway)", 1)[1].split(";;", 1)[0]
    assert "for topic in synthwatch.lab-detections synthwatch.border-seizures synthwatch.rejects; do" in gateway_case
    assert "Read" not in gateway_case and "--group" not in gateway_case
    assert subprocess.run(["sh", "-n", str(DEPLOY / "kafka/acls.sh")]).returncode == 0


def test_k8s_workers_authenticate_to_kafka_and_require_signed_reports() -> None:
    data = config()
    assert data["SYNTHWATCH_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["SYNTHWATCH_KAFKA_SASL_USERNAME"] == "synthwatch-worker"
    assert data["SYNTHWATCH_REQUIRE_SIGNED_REPORTS"] == "true"
    secret = by_kind("Secret", include_example=True)[0]["stringData"]
    assert "SYNTHWATCH_KAFKA_SASL_PASSWORD" in secret and "SYNTHWATCH_KAFKA_SASL_PASSWORD" not in data
    pod = worker()["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts[str(Path(data["SYNTHWATCH_KAFKA_SSL_CAFILE"]).parent)] == "kafka-ca"
    keys = volumes[mounts[str(Path(data["SYNTHWATCH_ORG_KEYS_FILE"]).parent)]]
    assert keys["secret"]["defaultMode"] == 0o440, "the keys file must not be world-readable"


def test_k8s_workers_require_a_shared_worker_key_from_the_secret() -> None:
    """Several replicas without one key refuse each other's records: the pod must not start without it."""
    worker = yaml.safe_load((DEPLOY / "k8s" / "worker.yaml").read_text())
    spec = worker["spec"]
    container = spec["template"]["spec"]["containers"][0]
    env = {item["name"]: item for item in container["env"]}
    reference = env["SYNTHWATCH_WORKER_KEY"]["valueFrom"]["secretKeyRef"]
    assert reference["name"] == "synthwatch" and reference.get("optional") is False
    assert spec["replicas"] > 1 and int(env["SYNTHWATCH_WORKERS"]["value"]) > 1


def test_k8s_gateway_starts_with_tls_its_own_kafka_principal_and_secret_files_it_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pod's settings pass the gateway's own start-up checks; every file it reads is a read-only Secret
    mount whose mode the loaders accept (group read, never other users); the port is the same in the
    container, the Service, the NetworkPolicy and the settings."""
    from synthwatch.producers.gateway import check_listen_address
    from synthwatch.schemas.envelope import others_can_reach

    deployment = named("Deployment", "synthwatch-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == WORKER_IMAGE and container["args"] == ["gateway"]
    env = {e["name"]: e for e in container["env"]}
    values = {name: e["value"] for name, e in env.items() if "value" in e}
    secret_refs = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "valueFrom" in e}
    assert all(ref.get("optional") is False for ref in secret_refs.values())
    settings_env = {**config(), **values, **{name: "from-a-secret" for name in secret_refs}}
    assert set(settings_env) <= SETTING_VARS, set(settings_env) - SETTING_VARS
    for name, value in settings_env.items():  # read from the environment, as in the pod (JSON lists included)
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.gateway_allowed_hosts == ["intake.synthwatch.example.org"]
    check_listen_address(settings)  # raises on a non-loopback address without TLS
    assert settings.gateway_ssl_certfile and settings.gateway_ssl_keyfile and not settings.gateway_behind_tls_proxy
    assert settings.kafka_sasl_username == "synthwatch-gateway" != config()["SYNTHWATCH_KAFKA_SASL_USERNAME"]
    assert "synthwatch-gateway" in {u["metadata"]["name"] for u in by_kind("KafkaUser")}
    assert secret_refs["SYNTHWATCH_KAFKA_SASL_PASSWORD"]["name"] == "synthwatch-gateway"
    assert "SYNTHWATCH_KAFKA_SASL_PASSWORD" not in values and "SYNTHWATCH_WORKER_KEY" not in values

    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    read = [settings.gateway_ssl_certfile, settings.gateway_ssl_keyfile, settings.resolved_gateway_tokens_file]
    for path in [*read, settings.org_keys_file, settings.kafka_ssl_cafile]:
        mount = mounts[str(Path(str(path)).parent)]
        assert mount.get("readOnly") is True, path
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"].startswith("synthwatch-")
        mode = secret.get("defaultMode", 0o644)
        if path in read or path == settings.org_keys_file:
            assert mode == 0o440 and not others_can_reach(mode), path
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"], "group read reaches the pod"
    assert str(settings.data_dir) in mounts, "the data dir must be writable (read-only root filesystem)"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    (port,) = container["ports"]
    assert port["containerPort"] == settings.gateway_port == 8443
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == port["name"], "every HTTP route needs a token"
    service = named("Service", "synthwatch-gateway")
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"]):
        assert (
            all(labels.get(k) == v for k, v in selector.items())
            and selector["app.kubernetes.io/component"] == "gateway"
        )
    pdb = named("PodDisruptionBudget", "synthwatch-gateway")["spec"]["selector"]["matchLabels"]
    assert pdb == deployment["spec"]["selector"]["matchLabels"]
    example = (K8S / "secret.example.yaml").read_text()
    for name in {v["secret"]["secretName"] for v in volumes.values() if "secret" in v} - {
        "synthwatch-kafka-ca",
        "synthwatch-org-keys",
    }:
        assert f"secret generic {name} " in example or f"secret tls {name} " in example, f"{name}: how to create it"


# --- compose.yaml: the intake gateway --------------------------------------------------------------------


def _container_to_host(value: str, mounts: dict[str, Path]) -> str:
    """A container path of the compose file, mapped to where this test keeps that mount's files."""
    for inside, outside in mounts.items():
        if value.startswith(inside + "/"):
            return str(outside / value.removeprefix(inside + "/"))
    return value


def test_compose_gateway_gets_only_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    s = services()
    gateway, tokens = s["gateway"], s["tokens"]
    env = _env(gateway)
    assert gateway["profiles"] == ["gateway"] and gateway["command"] == ["gateway"]
    # least privilege: no ClickHouse credentials, no worker data, its own volume
    assert not any("CLICKHOUSE" in key or "CLICKHOUSE" in value for key, value in env.items())
    mounts = dict(m.split(":")[:2] for m in gateway["volumes"])
    assert mounts == {"gateway-data": "/var/lib/synthwatch", "./gateway-tls": "/etc/synthwatch/gateway-tls"}
    assert all(m.endswith(":ro") for m in gateway["volumes"] if m.startswith("./"))
    # the certificate it is given is the one make-certs.sh writes, and the worker containers never mount it
    script = (DEPLOY / "tls" / "make-certs.sh").read_text()
    for name in ("tls.crt", "tls.key"):
        assert env[f"SYNTHWATCH_GATEWAY_SSL_{'CERTFILE' if name == 'tls.crt' else 'KEYFILE'}"].endswith(f"/{name}")
        assert f"../gateway-tls/{name}" in script
    for name, service in s.items():
        if name != "gateway":
            assert not any("gateway-tls" in m for m in service.get("volumes", [])), name
    # the tokens tool writes the file the gateway reads, in the volume they share
    assert tokens["entrypoint"] == ["synthwatch", "tokens"] and tokens["volumes"] == [
        "gateway-data:/var/lib/synthwatch"
    ]
    assert _env(tokens)["SYNTHWATCH_GATEWAY_TOKENS_FILE"] == env["SYNTHWATCH_GATEWAY_TOKENS_FILE"]
    assert env["SYNTHWATCH_GATEWAY_TOKENS_FILE"].startswith("/var/lib/synthwatch/")
    # its port: the one it listens on, published on loopback unless the operator opens it
    assert gateway["ports"] == [f"${{GATEWAY_BIND:-127.0.0.1}}:{env['SYNTHWATCH_GATEWAY_PORT']}:8443"]
    # the image's health check asks the worker's /ready, which the gateway does not serve
    assert "8443" in " ".join(gateway["healthcheck"]["test"]) and "6066" not in " ".join(gateway["healthcheck"]["test"])
    # and it starts on a non-loopback address only because it has TLS
    for key, value in env.items():  # read as the container reads them: from its environment
        monkeypatch.setenv(key, re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", "localhost", value))
    settings = Settings()
    assert settings.gateway_allowed_hosts == ["localhost"] and settings.gateway_host == "0.0.0.0"
    check_listen_address(settings)
    with pytest.raises(GatewayConfigError, match="in clear"):
        check_listen_address(settings.model_copy(update={"gateway_ssl_certfile": None, "gateway_ssl_keyfile": None}))


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("openssl") is None, reason="make-certs.sh needs openssl")
def test_compose_gateway_takes_a_report_over_tls_with_the_certificates_of_make_certs(
    broker: EmbeddedBroker, tmp_path: Path
) -> None:
    """The compose gateway's own settings, its paths mapped here: a token from the `tokens` tool, a report over TLS.

    What a lab meets after following deploy/README.md: the certificate make-certs.sh wrote verifies against its
    CA for the host name given, the key is readable by the gateway, and the token file the tool writes is
    the one the gateway reads. Only the listen address differs (loopback, not 0.0.0.0, in a test).
    """
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY / "tls", deploy / "tls")
    (deploy / "gateway-tls").mkdir()
    made = subprocess.run(
        ["sh", "tls/make-certs.sh"], cwd=deploy, env={**os.environ, "GATEWAY_HOSTNAME": "intake.example.org"},
        capture_output=True, text=True,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE((deploy / "gateway-tls" / "tls.key").stat().st_mode) == 0o640
    data = tmp_path / "gateway-data"
    data.mkdir()
    mounts = {"/var/lib/synthwatch": data, "/etc/synthwatch/gateway-tls": deploy / "gateway-tls"}
    topics = isolated_settings(broker, data)
    topic_env = {f"SYNTHWATCH_TOPIC_{name.upper()}": getattr(topics, f"topic_{name}") for name in TOPICS}

    def env_of(service: str) -> dict[str, str]:
        values = {
            k: re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", "intake.example.org", v)
            for k, v in _env(services()[service]).items()
        }
        values = {k: _container_to_host(v, mounts) for k, v in values.items()}
        values["SYNTHWATCH_WORKER_KEY"] = "ab" * 32
        values["SYNTHWATCH_KAFKA_BOOTSTRAP_SERVERS"] = broker.bootstrap_servers
        base = {k: v for k, v in os.environ.items() if not k.startswith("SYNTHWATCH_")}
        return {**base, **values, **topic_env}

    created = subprocess.run(
        [sys.executable, "-m", "synthwatch.cli.main", "tokens", "create", "--org", "lab-fr", "--lab-id", "LAB-FR-01"],
        env=env_of("tokens"), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    env = env_of("gateway")
    env["SYNTHWATCH_GATEWAY_HOST"], env["SYNTHWATCH_GATEWAY_PORT"] = "127.0.0.1", "0"
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "synthwatch.cli.main", "gateway"], env=env, stdout=log, stderr=log
        )
    try:

        def listening() -> str | None:
            if process.poll() is not None:
                pytest.fail(f"the gateway exited with {process.returncode}:\n{log_path.read_text()}")
            found = re.search(
                r"gateway listening on https://127\.0\.0\.1:(\d+) \(tokens: (\S+), (\d+) stored\)", log_path.read_text()
            )
            return found.groups() if found else None

        port, tokens_file, stored = wait_until(listening, 60, "the gateway to listen")
        # the file the `tokens` tool wrote is the one the gateway reads, in the volume they share
        assert (tokens_file, stored) == (str(data / "gateway-tokens.json"), "1")
        ca = str(deploy / "tls" / "ca.crt")
        # the labs' host name is in the certificate: connect to loopback, ask for that name
        with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=60) as client:
            url = f"https://localhost:{port}/v1/reports"
            refused = client.post(url, content=json.dumps(lab()), headers={"Content-Type": "application/json"})
            assert refused.status_code == 401
            sent = client.post(
                url, content=json.dumps(lab(event_id="compose-gw-1")),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {secret}"},
            )  # fmt: skip
        assert sent.status_code == 200, sent.text
        result = sent.json()  # accepted records are counted, not listed
        assert (result["received"], result["accepted"], result["records"]) == (1, 1, []), result
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://localhost:{port}/v1/reports", timeout=60)  # the system CAs do not know it
    finally:
        terminate(process)
    assert secret not in log_path.read_text()
