"""deploy/: the Dockerfile, the compose file, the Kubernetes manifests and the Prometheus files, checked by parsing.

No Docker engine or cluster runs here, so every file is read as its tool would read it and checked against the
project: what it copies and mounts exists, every command it runs is a tally command with options tally knows, every
TALLY_* variable is a setting and the settings pass `tally config validate`'s checks, the ports are the ones the
settings open, and every metric the alert rules use is one tally serves and docs/operations.md lists.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from ops.cli import cli
from tally.config import REPO_ROOT, Settings, load_settings

DEPLOY = REPO_ROOT / "deploy"
SETTING_VARS = {f"TALLY_{f.name.upper()}" for f in dataclasses.fields(Settings) if f.name != "secrets"}
# Variables tally reads that are not Settings fields: the alert consumer's options and Grafana's datasource file.
OTHER_VARS = {"TALLY_ALERTS_METRICS_PORT", "TALLY_ALERTS_SINKS", "TALLY_PAGERDUTY_URL", "TALLY_PAGERDUTY_ROUTING_KEY",
              "TALLY_SLACK_WEBHOOK_URL", "TALLY_WEBHOOK_URL"}
GRAFANA_VARS = set(re.findall(r"\$\{(TALLY_GRAFANA_\w+)\}",
                              (DEPLOY / "grafana" / "provisioning" / "datasources" / "tally.yaml").read_text()))


def tally_command_parses(args: list[str]) -> None:
    """`tally ARGS` names a real command and only options it has (click parses them; --help stops before running)."""
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0, (args, result.output)
    assert "Usage: " in result.output


def commands_in(entry: list[str] | None, command: list[str] | None) -> list[list[str]]:
    """The tally commands a container runs: its args under the image's `tally` entrypoint, or each `tally …` of a
    shell line."""
    if entry == ["sh", "-c"]:
        assert command is not None and len(command) == 1
        parts = [shlex.split(p) for p in command[0].split("&&")]
        assert all(p[0] == "tally" for p in parts), command
        return [p[1:] for p in parts]
    assert entry in (None, ["tally"]), entry
    return [list(command or [])]


def settings_problems(env: dict[str, str], tmp_path: Path) -> list[str]:
    """What `tally config validate` reports for these variables (a token file, if named, holds a valid token)."""
    env = dict(env)
    if "TALLY_API_TOKEN_FILE" in env:
        token = tmp_path / "api-token"
        token.write_text("a-valid-token-of-32-characters-x")
        env["TALLY_API_TOKEN_FILE"] = str(token)
    env.setdefault("TALLY_DATA_DIR", str(tmp_path / "data"))
    env["TALLY_DATA_DIR"] = str(tmp_path / "data")
    return load_settings(env={k: v for k, v in env.items() if k in SETTING_VARS}).problems()


# ---- the Dockerfile ----------------------------------------------------------------------------------------------

def test_the_dockerfile_copies_what_exists_and_runs_tally() -> None:
    lines = [ln.strip() for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    copies = [ln.split()[1:-1] for ln in lines if ln.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert (REPO_ROOT / src).exists(), src  # the build context is the repository root
    for needed in ("schemas", "reference", "tally", "streams", "ops", "pyproject.toml"):
        assert any(needed in sources for sources in copies), needed
    entry = next(ln for ln in lines if ln.startswith("ENTRYPOINT"))
    cmd = next(ln for ln in lines if ln.startswith("CMD"))
    assert yaml.safe_load(entry.split(None, 1)[1]) == ["tally"]
    tally_command_parses(yaml.safe_load(cmd.split(None, 1)[1]))
    exposed = {int(p) for ln in lines if ln.startswith("EXPOSE") for p in ln.split()[1:]}
    assert exposed == {Settings().web_port, 6070, 6080}
    assert any(ln.startswith("USER ") and ln.split()[1] != "root" for ln in lines)


# ---- compose ------------------------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_the_compose_file_runs_every_role_with_settings_tally_accepts(tmp_path) -> None:
    services = compose()["services"]
    assert {"kafka", "clickhouse", "setup", "sink", "process", "alerts", "prometheus", "grafana"} <= services.keys()
    tally_services = {n: s for n, s in services.items() if s.get("image") == "tally:local"}
    assert set(tally_services) == {"setup", "sink", "process", "alerts"}
    for name, svc in tally_services.items():
        assert (REPO_ROOT / "deploy" / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
        env = {k: str(v) for k, v in svc["environment"].items()}
        assert set(env) <= SETTING_VARS | OTHER_VARS, set(env) - SETTING_VARS - OTHER_VARS
        assert settings_problems(env, tmp_path) == [], name
        for args in commands_in(svc.get("entrypoint"), svc["command"]):
            tally_command_parses(args)
    sink_port = int(tally_services["sink"]["ports"][0].split(":")[1])
    assert sink_port == Settings().web_port
    assert tally_services["process"]["environment"]["TALLY_PROCESS_WEB_PORT"] == "6070"
    assert "6080" in tally_services["alerts"]["command"]
    for name in ("sink", "process", "alerts"):  # topics and schema exist before any worker starts
        assert tally_services[name]["depends_on"] == {"setup": {"condition": "service_completed_successfully"}}
    assert "CLICKHOUSE_PASSWORD" in services["clickhouse"]["environment"]  # the image opens no user otherwise
    for name in ("sink", "process"):
        probe = " ".join(tally_services[name]["healthcheck"]["test"])
        assert "/readyz" in probe
    # the secrets and files it mounts exist (or are the operator's to create, and said so)
    secrets = compose()["secrets"]
    assert secrets["tally_api_token"]["file"] == "./secrets/tally_api_token"
    assert "deploy/secrets/tally_api_token" in (DEPLOY / "compose.yaml").read_text().split("\nname:")[0]
    for svc in services.values():
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (DEPLOY / host).exists(), host
    grafana = services["grafana"]["environment"]
    assert set(grafana) - {"GF_INSTALL_PLUGINS"} == GRAFANA_VARS
    images = [s["image"] for s in services.values() if s.get("image") != "tally:local"]
    assert all(re.fullmatch(r"[a-z0-9./-]+:v?\d+(\.\d+)+", i) for i in images), images  # pinned, never latest
    kafka_version = re.search(r"<kafka.version>([\d.]+)<", (DEPLOY / "kafka" / "pom.xml").read_text())
    assert kafka_version and services["kafka"]["image"] == f"apache/kafka:{kafka_version.group(1)}"  # as tested


# ---- Kubernetes -----------------------------------------------------------------------------------------------------

def manifests() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / "tally.yaml").read_text()) if d]


def test_the_kubernetes_manifests_hold_together(tmp_path) -> None:
    docs = manifests()
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    config = by_kind["ConfigMap"]["tally-settings"]["data"]
    secret = by_kind["Secret"]["tally-credentials"]["stringData"]
    assert set(config) <= SETTING_VARS
    assert settings_problems({**config, "TALLY_CLICKHOUSE_URL": secret["TALLY_CLICKHOUSE_URL"]}, tmp_path) == []
    deployments = by_kind["Deployment"]
    assert set(deployments) == {"tally-process", "tally-sink", "tally-alerts"}
    pods = {name: d["spec"]["template"]["spec"] for name, d in deployments.items()}
    pods["tally-setup"] = by_kind["Job"]["tally-setup"]["spec"]["template"]["spec"]
    for name, pod in pods.items():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            assert c["image"] == "tally:local"
            for args in commands_in(c.get("command"), c.get("args")):
                tally_command_parses(args)
            assert [r["configMapRef"]["name"] for r in c.get("envFrom", [])] == ["tally-settings"]
            for e in c.get("env", []):
                assert e["name"] in SETTING_VARS | OTHER_VARS
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "tally-credentials" and ref["key"] in secret
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= set(volumes), name
            token_dir = str(Path(config["TALLY_API_TOKEN_FILE"]).parent)
            assert token_dir in mounts, f"{name} needs the API token (web_host {config['TALLY_WEB_HOST']})"
            items = volumes[mounts[token_dir]]["secret"]["items"]
            assert [i["key"] for i in items] == [Path(config["TALLY_API_TOKEN_FILE"]).name]
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                if probe in c:
                    get = c[probe]["httpGet"]
                    assert get["port"] in ports and get["path"] in ("/readyz", "/livez", "/metrics")
    assert {p["containerPort"] for p in pods["tally-process"]["containers"][0]["ports"]} == {
        int(config["TALLY_PROCESS_WEB_PORT"])}
    assert {p["containerPort"] for p in pods["tally-sink"]["containers"][0]["ports"]} == {int(config["TALLY_WEB_PORT"])}
    for name in ("tally-process", "tally-sink"):
        c = pods[name]["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    hpa = by_kind["HorizontalPodAutoscaler"]["tally-process"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "tally-process"
    assert hpa["maxReplicas"] <= int(config["TALLY_PARTITIONS"])  # workers beyond the partitions idle
    service = by_kind["Service"]["tally-sink"]["spec"]
    assert service["selector"] == deployments["tally-sink"]["spec"]["selector"]["matchLabels"]


# ---- Prometheus ---------------------------------------------------------------------------------------------------

_FAMILY = re.compile(r"""(?:counter|gauge|Histogram)\(\s*["'](tally_\w+)["']""")


def served_metrics() -> set[str]:
    """Every metric family tally's code declares (counters, gauges, histograms), by base name."""
    names: set[str] = set()
    for path in [*(REPO_ROOT / "streams").rglob("*.py"), REPO_ROOT / "ops" / "alerts.py"]:
        names |= set(_FAMILY.findall(path.read_text()))
    return names


def base_name(sample: str, families: set[str]) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in families:
            return sample[: -len(suffix)]
    return sample


def test_the_alert_rules_use_metrics_tally_serves_and_the_docs_list_them_all() -> None:
    families = served_metrics()
    assert {"tally_events", "tally_consumer_lag_messages", "tally_sink_insert_seconds", "tally_batch_seconds",
            "tally_sink_last_insert_timestamp_seconds", "tally_alerts_delivered"} <= families
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    used = {base_name(m, families) for g in rules["groups"] for r in g["rules"]
            for m in re.findall(r"\btally_\w+", r["expr"])}
    assert used and used <= families, used - families
    assert all({"alert", "expr", "labels", "annotations"} <= r.keys() for g in rules["groups"] for r in g["rules"])
    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"`(tally_\w+)`", docs))
    missing = {f for f in families if not ({f, f + "_total"} & documented)}
    assert not missing, f"docs/operations.md does not list {sorted(missing)}"
    for anchor in re.findall(r"docs/operations\.md#([\w-]+)", (DEPLOY / "prometheus" / "rules.yml").read_text()):
        heading = anchor.replace("-", " ")
        assert any(h.lower().strip("# ").replace("-", " ") == heading for h in re.findall(r"^#+ .*$", docs, re.M)), \
            anchor
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert any(m.endswith(f":{prometheus['rule_files'][0]}:ro") for m in mounts)
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["tally-sink"]["static_configs"][0]["targets"] == [f"sink:{Settings().web_port}"]
    assert jobs["tally-process"]["dns_sd_configs"][0]["port"] == 6070
    assert jobs["tally-alerts"]["static_configs"][0]["targets"] == ["alerts:6080"]


# ---- the OpenTelemetry Collector ------------------------------------------------------------------------------------

def test_the_collector_writes_genai_spans_where_the_otlp_input_reads_them(tmp_path) -> None:
    from streams.otlp import ENCODINGS

    config = yaml.safe_load((DEPLOY / "otel-collector" / "collector.yaml").read_text())
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == ["kafka"]
    assert set(pipeline["processors"]) <= set(config["processors"])
    assert pipeline["processors"][-1] == "batch"  # batched last: messages of hundreds of spans
    kafka = config["exporters"]["kafka"]
    services = compose()["services"]
    env = {k: str(v) for k, v in services["sink"]["environment"].items()}
    settings = load_settings(env={k: v for k, v in env.items() if k in SETTING_VARS and "TOKEN" not in k})
    assert kafka["traces"]["topic"] == settings.topics.otlp  # the compose stack has no topic prefix
    assert kafka["traces"]["encoding"] in ENCODINGS and kafka["producer"]["required_acks"] == -1
    assert services["otel-collector"]["environment"]["KAFKA_BROKERS"] == env["TALLY_KAFKA_BOOTSTRAP"]
    mounted = services["otel-collector"]["volumes"][0].split(":")
    assert mounted[0] == "./otel-collector/collector.yaml" and services["otel-collector"]["command"] == [
        f"--config={mounted[1]}"]
    # the filter keeps every span the OTLP input would map: it drops only spans without any of these attributes
    dropped_when = config["processors"]["filter/genai"]["traces"]["span"][0]
    for name in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.system"):
        assert f'attributes["{name}"] == nil' in dropped_when


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")))
def test_every_yaml_file_under_deploy_parses(path: Path) -> None:
    assert list(yaml.safe_load_all(path.read_text()))
