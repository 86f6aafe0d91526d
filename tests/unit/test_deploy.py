"""What cannot run here is checked here: the Helm chart (deploy/helm/tally) renders production-
shaped objects for the default and the production values (tests/unit/test_helm_chart.py
validates every one of them against the Kubernetes and operator schemas), Kafka has every topic
of the code, dashboards and alerts only name metrics the code exports, and the Dockerfile and
compose file are complete."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tally.events import Topics
from tests.unit.test_helm_chart import VARIANTS, of, render

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["usage-meter", "wallet", "recharge", "rebilling", "notifier"]
STANDARD = {
    "ConfigMap",
    "Deployment",
    "Service",
    "ServiceAccount",
    "PodDisruptionBudget",
    "NetworkPolicy",
    "Job",
}
# What Strimzi's Kafka Exporter exports (the lag alerts read these).
KAFKA_EXPORTER = {"kafka_consumergroup_lag", "kafka_consumergroup_current_offset"}


@pytest.fixture(scope="module", params=["default", "production"])
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(VARIANTS[request.param])


def exported_metrics() -> set[str]:
    names = set()
    for path in list((ROOT / "shared").rglob("*.py")) + list((ROOT / "services").rglob("*.py")):
        names |= set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(tally_[a-z_]+)"', path.read_text()))
    return names


def referenced_metrics(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"tally_[a-z_]+", text)}


def test_the_chart_renders_every_standard_kind(objects: list[dict[str, Any]]) -> None:
    assert {o["kind"] for o in objects} >= STANDARD
    assert not (ROOT / "deploy" / "k8s").exists(), "one source: the chart replaced the Kustomize tree"


def test_deployments_are_production_shaped(objects: list[dict[str, Any]]) -> None:
    deployments = of(objects, "Deployment")
    assert sorted(d["metadata"]["name"] for d in deployments) == sorted(f"tally-{s}" for s in SERVICES)
    accounts = {o["metadata"]["name"] for o in of(objects, "ServiceAccount")}
    configmaps = {o["metadata"]["name"] for o in of(objects, "ConfigMap")}
    pdbs = {
        o["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        for o in of(objects, "PodDisruptionBudget")
    }
    services = {o["spec"]["selector"]["app.kubernetes.io/name"] for o in of(objects, "Service")}
    for d in deployments:
        pod = d["spec"]["template"]["spec"]
        name = d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        assert pod["serviceAccountName"] in accounts and name in pdbs and name in services
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        assert d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        [c] = pod["containers"]
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["path"] in ("/readyz", "/healthz")
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert all(ref["configMapRef"]["name"] in configmaps for ref in c["envFrom"])
        assert {e["name"] for e in c["env"]} >= {"DATABASE_URL", "TALLY_JWT_SECRET", "TALLY_SERVICE"}
        assert not c["image"].endswith(":latest"), "images are pinned by tag or digest"


def test_kafka_cluster_and_every_topic(objects: list[dict[str, Any]]) -> None:
    [kafka] = of(objects, "Kafka")
    assert kafka["spec"]["kafka"]["listeners"] and kafka["spec"]["kafka"]["version"]
    assert kafka["spec"]["kafka"]["config"]["auto.create.topics.enable"] is False
    [pool] = of(objects, "KafkaNodePool")
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"} and pool["spec"]["replicas"] >= 3
    topics = {t["spec"]["topicName"]: t for t in of(objects, "KafkaTopic")}
    assert set(topics) == set(Topics.ALL) | {Topics.dlq(t) for t in Topics.ALL}
    for name, t in topics.items():
        assert t["spec"]["replicas"] == 3 and t["spec"]["partitions"] >= 1
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
        compact = t["spec"]["config"].get("cleanup.policy") == "compact"
        assert compact == (name in Topics.COMPACTED), name


def test_postgres_keda_and_monitoring(objects: list[dict[str, Any]]) -> None:
    [cluster] = of(objects, "Cluster")
    assert cluster["apiVersion"].startswith("postgresql.cnpg.io/")
    assert cluster["spec"]["bootstrap"]["initdb"]["database"] == "tally"
    assert cluster["spec"]["instances"] >= 3 and cluster["spec"]["storage"]["size"]
    assert cluster["spec"]["walStorage"]["size"], "WAL on its own volume"
    for backup in of(objects, "ScheduledBackup"):
        assert backup["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    deployments = {d["metadata"]["name"] for d in of(objects, "Deployment")}
    topics = {t["spec"]["topicName"] for t in of(objects, "KafkaTopic")}
    scaled = of(objects, "ScaledObject")
    assert len(scaled) == len(SERVICES)
    for s in scaled:
        assert s["spec"]["scaleTargetRef"]["name"] in deployments
        for trigger in s["spec"]["triggers"]:
            assert trigger["type"] == "kafka" and trigger["metadata"]["topic"] in topics
            assert trigger["metadata"]["consumerGroup"] and int(trigger["metadata"]["lagThreshold"]) > 0
    [monitor] = of(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(s["metadata"]["labels"].items() >= selector.items() for s in of(objects, "Service"))
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_alerts_and_dashboards_name_only_exported_metrics(objects: list[dict[str, Any]]) -> None:
    exported = exported_metrics()
    assert len(exported) >= 12
    [rules] = of(objects, "PrometheusRule")
    alerts = [r for g in rules["spec"]["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {
        "TallyDeadLetters",
        "TallyConsumerLagGrowing",
        "TallyConsumerStuck",
        "TallyRechargeFailureRate",
        "TallyOutboxBacklog",
        "TallyNoUsage",
        "TallyServiceDown",
        "TallyServiceAbsent",
        "TallyHttp5xx",
        "TallyWebhookSignatureFailures",
    }
    ops = (ROOT / "docs" / "operations.md").read_text().lower()
    for a in alerts:
        assert referenced_metrics(a["expr"]) <= exported, a["alert"]
        assert set(re.findall(r"kafka_[a-z_]+", a["expr"])) <= KAFKA_EXPORTER, a["alert"]
        assert f"### {a['alert'].lower()}" in ops, f"{a['alert']} is explained in docs/operations.md"
    [boards] = [c for c in of(objects, "ConfigMap") if c["metadata"]["name"] == "tally-dashboards"]
    assert boards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(boards["data"]) == {p.name for p in (ROOT / "deploy/helm/tally/dashboards").glob("*.json")}
    for name, text in boards["data"].items():
        board = json.loads(text)
        exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
        assert exprs, name
        assert set().union(*(referenced_metrics(e) for e in exprs)) <= exported, name


def test_production_values_are_a_production_install() -> None:
    values = yaml.safe_load((ROOT / "deploy" / "helm" / "values-production.yaml").read_text())
    assert values["backups"]["enabled"] is True and values["kafka"]["security"]["enabled"] is True
    assert values["monitoring"]["labels"].get("release")
    assert "example" in values["image"]["repository"] and values["image"]["tag"]


def test_dockerfile_basics() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    assert all("latest" not in s for s in stages)
    assert "uv sync --frozen" in text and "--no-dev" in text
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "runs as a non-root user"
    assert "HEALTHCHECK" in text and "EXPOSE" in text
    assert "ADD http" not in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".tally" in ignored


def test_compose_runs_every_service_on_real_kafka_and_postgres() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    kafka = services["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"] and "broker" in kafka["KAFKA_PROCESS_ROLES"]
    init = " ".join(services["kafka-init"]["command"])
    for topic in Topics.ALL:
        assert topic in init
    assert "cleanup.policy=compact" in init
    for name in SERVICES:
        svc = services[name]
        assert svc["build"]["args"]["SERVICE"] == name
        env = svc["environment"]
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092" and "postgres" in env["DATABASE_URL"]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
