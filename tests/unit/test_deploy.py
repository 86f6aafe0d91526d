"""What cannot run here is checked here: the Helm chart (deploy/helm/tally) renders production-
shaped objects for the default and the production values (tests/unit/test_helm_chart.py
validates every one of them against the Kubernetes and operator schemas), Kafka has every topic
of the code, dashboards and alerts only name metrics the code exports; the Dockerfile pins its
base by digest and installs every package the services and the ``tally`` command need, its
entrypoint runs the service or the command given; compose runs Kafka 4.3 and Postgres 18 with
the code's topics and the settings the code reads."""

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


# --- the image (Dockerfile) ----------------------------------------------------------------

DIGEST = r"@sha256:[0-9a-f]{64}"


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile line, continuation lines joined, comments out."""
    joined = re.sub(
        r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    )
    return [
        (m.group(1).upper(), m.group(2).strip())
        for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)
    ]


def stages(text: str) -> list[tuple[str, str | None]]:
    """(image, stage name) of each FROM."""
    found = []
    for instruction, args in instructions(text):
        if instruction == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            assert m, args
            found.append((m.group(1), m.group(2)))
    return found


def copies(text: str) -> list[list[str]]:
    """The sources and destination of each COPY from the build context (not --from a stage)."""
    found = []
    for instruction, args in instructions(text):
        if instruction == "COPY" and "--from=" not in args:
            found.append([a for a in args.split() if not a.startswith("--")])
    return found


def uv_syncs(text: str) -> list[str]:
    return [args for instruction, args in instructions(text) if instruction == "RUN" and "uv sync" in args]


def workspace_members() -> dict[str, Path]:
    """Every workspace package: name -> its directory."""
    import tomllib

    members = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["uv"]["workspace"]["members"]
    found = {}
    for pattern in members:
        for directory in ROOT.glob(pattern):
            if (directory / "pyproject.toml").exists():
                name = tomllib.loads((directory / "pyproject.toml").read_text())["project"]["name"]
                found[name] = directory.relative_to(ROOT)
    return found


def needed_by(roots: list[str]) -> set[str]:
    """The workspace packages ``roots`` need, themselves included (dependencies, transitively)."""
    import tomllib

    members = workspace_members()
    needed: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        project = tomllib.loads((ROOT / members[name] / "pyproject.toml").read_text())["project"]
        for requirement in project.get("dependencies", []):
            dependency = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
            if dependency in members:
                todo.append(dependency)
    return needed


IMAGE_PACKAGES = [f"tally-{s}" for s in SERVICES] + ["tally-cli"]


def test_every_from_is_pinned_by_tag_and_digest() -> None:
    text = dockerfile()
    found = stages(text)
    assert len(found) >= 3, "a pinned base, a build stage and a runtime stage"
    names: set[str] = set()
    for image, name in found:
        if image not in names:  # not a stage built above: an image from a registry
            assert re.fullmatch(rf"[\w.\-/]+:[\w.\-]+{DIGEST}", image), f"{image}: pin tag and digest"
            assert "latest" not in image
        if name:
            names.add(name)
    # a syntax directive would pull a frontend image: pinned too, or none
    for directive in re.findall(r"^#\s*syntax\s*=\s*(\S+)", text, re.M | re.I):
        assert re.search(DIGEST, directive), directive


def test_the_base_is_python_311_slim_trixie_as_the_project_requires() -> None:
    import tomllib

    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.12", "move the base image with the Python the project requires"
    bases = [image for image, _ in stages(dockerfile()) if "@sha256:" in image]
    assert bases and all(re.match(r"python:3\.11\.\d+-slim-trixie@", b) for b in bases), bases
    assert len(set(bases)) == 1, "one base for building and running"
    assert "not pulled" in dockerfile().replace("NOT", "not"), "say where the digest came from"


def test_uv_is_the_makefile_version_and_hash_checked() -> None:
    text = dockerfile()
    makefile = re.search(r"^UV_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert makefile
    assert re.findall(r"uv==([\d.]+)", text) == [makefile.group(1)], "the uv make installs"
    assert "--require-hashes" in text and len(re.findall(r"--hash=sha256:[0-9a-f]{64}", text)) >= 2
    for instruction, args in instructions(text):
        if instruction == "COPY" and "--from=" in args:
            source = re.search(r"--from=(\S+)", args)
            assert source and (source.group(1) in {n for _, n in stages(text)} or re.search(DIGEST, args))


def test_dockerfile_basics() -> None:
    text = dockerfile()
    syncs = uv_syncs(text)
    assert syncs and all("uv sync --frozen --no-dev " in s for s in syncs)
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "runs as a non-root user"
    assert "HEALTHCHECK" in text and "EXPOSE" in text
    assert "ADD http" not in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".tally" in ignored


def test_the_image_installs_every_service_and_the_cli_with_all_they_need() -> None:
    text = dockerfile()
    members = workspace_members()
    needed = needed_by(IMAGE_PACKAGES)
    assert {"tally-shared", "tally-client", "tally-cli"} <= needed
    syncs = uv_syncs(text)
    assert len(syncs) == 2, "dependencies first, then the workspace packages"
    for sync in syncs:
        assert set(re.findall(r"--package\s+(\S+)", sync)) == set(IMAGE_PACKAGES), sync
    assert "--no-install-workspace" in syncs[0] and "--no-editable" in syncs[1]
    copied = copies(text)
    sources = {Path(s) for c in copied for s in c[:-1]}
    for name in needed:
        directory = members[name]
        assert directory / "pyproject.toml" in sources, f"{name}: its pyproject.toml for the first sync"
        assert any(s == directory or s in directory.parents for s in sources), f"{name}: its code"
    assert {Path("pyproject.toml"), Path("uv.lock")} <= sources
    for name in set(members) - needed:  # the devstack: the embedded stack stays out of the image
        assert not any(members[name] == s or s in members[name].parents for s in sources), name


def test_the_cli_has_its_tally_command() -> None:
    import tomllib

    from tally_cli import __main__ as cli

    project = tomllib.loads((ROOT / "clients/cli/pyproject.toml").read_text())["project"]
    assert project["scripts"]["tally"] == "tally_cli.__main__:main"
    assert callable(cli.main)
    assert {"token", "migrate"} <= set(cli.app), "the commands the image is documented with"


def run_entrypoint(tmp_path: Path, *args: str, service: str | None = "usage-meter") -> tuple[int, str]:
    """deploy/entrypoint.sh with stand-ins for python and tally that print what they were given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "tally"):
        stand_in = bin_dir / name
        stand_in.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    if service is not None:
        env["TALLY_SERVICE"] = service
    import subprocess

    done = subprocess.run(
        ["/bin/sh", str(ROOT / "deploy/entrypoint.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=10,
    )
    return done.returncode, done.stdout.strip()


def test_the_entrypoint_runs_the_service_or_the_command_given(tmp_path: Path) -> None:
    text = dockerfile()
    assert ["deploy/entrypoint.sh", "/app/entrypoint.sh"] in copies(text)
    assert re.search(r'^ENTRYPOINT \["/bin/sh", "/app/entrypoint.sh"\]', text, re.M)
    assert run_entrypoint(tmp_path) == (0, "python -m tally_usage_meter")
    assert run_entrypoint(tmp_path, "--migrate") == (0, "python -m tally_usage_meter --migrate")
    assert run_entrypoint(tmp_path, "--migrate", "--status", service="wallet") == (
        0,
        "python -m tally_wallet --migrate --status",
    )
    assert run_entrypoint(tmp_path, "tally", "migrate", "--status", service=None) == (
        0,
        "tally migrate --status",
    )
    assert run_entrypoint(tmp_path, "tally", "token", "product") == (0, "tally token product")
    assert run_entrypoint(tmp_path, service=None)[0] == 2
    assert run_entrypoint(tmp_path, service="bogus")[0] == 2


def test_the_migrations_hook_reaches_the_service_through_the_entrypoint(
    objects: list[dict[str, Any]],
) -> None:
    jobs = [
        j for j in of(objects, "Job") if j["metadata"]["labels"]["app.kubernetes.io/name"] == "migrations"
    ]
    for job in jobs:
        for c in job["spec"]["template"]["spec"]["containers"]:
            assert "command" not in c, "the image's entrypoint chooses the service"
            assert c["args"][0] == "--migrate"
            assert {"name": "TALLY_SERVICE", "value": c["name"]} in c["env"]


# --- docker compose ------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def resolved(value: Any) -> str:
    """A compose value as it is with nothing set in the environment: ${VAR:-default} -> default."""
    text = re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", str(value))
    return text.replace("$$", "$")


def test_compose_images_kafka_43_postgres_18_mailpit_pinned() -> None:
    services = compose()["services"]
    images = {name: s["image"] for name, s in services.items() if "image" in s}
    for name, image in images.items():
        assert re.fullmatch(rf"[\w.\-/]+:[\w.\-]+{DIGEST}", image), f"{name}: pin tag and digest"
    assert re.fullmatch(rf"apache/kafka:4\.3\.\d+{DIGEST}", images["kafka"])
    assert images["kafka-init"] == images["kafka"]
    assert re.fullmatch(rf"postgres:18\.\d+(-\w+)?{DIGEST}", images["postgres"])
    assert re.fullmatch(rf"axllent/mailpit:v1\.\d+\.\d+{DIGEST}", images["mailpit"])
    # Postgres 18+ refuses a volume at /var/lib/postgresql/data; Kafka writes where its volume is.
    assert [v.split(":")[1] for v in services["postgres"]["volumes"]] == ["/var/lib/postgresql"]
    kafka = services["kafka"]
    assert [v.split(":")[1] for v in kafka["volumes"]] == [kafka["environment"]["KAFKA_LOG_DIRS"]]
    assert kafka["environment"]["CLUSTER_ID"]


def test_compose_creates_exactly_the_topics_of_the_code() -> None:
    from tally.events import TOPIC_TYPES

    script = "\n".join(compose()["services"]["kafka-init"]["command"])
    loops = re.findall(r"for topic in ([^;]+); do(.*?)done", script, re.S)
    created: set[str] = set()
    compacted: set[str] = set()
    for names, body in loops:
        for line in re.findall(r'^\s*t "\$\$topic([^"]*)"(.*)$', body, re.M):
            suffix, options = line
            for name in names.split():
                created.add(name + suffix)
                if "cleanup.policy=compact" in options:
                    compacted.add(name + suffix)
    outside = re.sub(r"for topic in [^;]+; do.*?done", "", script, flags=re.S)
    for name, options in re.findall(r"^\s*t ([\w.]+)(.*)$", outside, re.M):
        created.add(name)
        if "cleanup.policy=compact" in options:
            compacted.add(name)
    assert created == set(Topics.ALL) | {Topics.dlq(t) for t in Topics.ALL}
    assert compacted == set(Topics.COMPACTED)
    assert set(TOPIC_TYPES) <= set(Topics.ALL)


def image_env() -> dict[str, str]:
    """The settings the image itself sets (its ENV lines, TALLY_* only)."""
    found: dict[str, str] = {}
    for instruction, args in instructions(dockerfile()):
        if instruction == "ENV":
            found |= {k: v for k, v in re.findall(r"(TALLY_\w+)=(\S*)", args)}
    return found


def test_compose_services_are_configured_with_what_the_code_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    from urllib.parse import urlsplit

    from tally import auth, telemetry
    from tally.settings import SERVICE_PORTS, Settings

    services = compose()["services"]
    fields = Settings.model_fields
    aliases = {f.alias for f in fields.values() if f.alias}
    read_by_telemetry = set(re.findall(r"OTEL_[A-Z_]+", Path(telemetry.__file__).read_text()))
    # What has no usable default in a container: anything on localhost, the database, the
    # secret (the development one is refused in production), where the other services are.
    local = {
        a for f in fields.values() if (a := f.alias) and re.search(r"127\.0\.0\.1|localhost", str(f.default))
    }
    peers = {fields[f].alias for s in SERVICES if (f := s.replace("-", "_") + "_url") in fields}
    required = local | peers | {fields["database_url"].alias, fields["jwt_secret"].alias}
    assert {"KAFKA_BOOTSTRAP_SERVERS", "SMTP_URL", "STRIPE_API_BASE", "TALLY_WALLET_URL"} <= required
    built_in = image_env()
    assert built_in["TALLY_HOST"] == "0.0.0.0"
    for alias in aliases:  # only what compose and the image set (the tests set TALLY_ENV and more)
        monkeypatch.delenv(alias, raising=False)
    for name in SERVICES:
        svc = services[name]
        assert svc["build"]["args"]["SERVICE"] == name
        assert svc["ports"] == [f"{SERVICE_PORTS[name]}:{SERVICE_PORTS[name]}"]
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
        env = {k: resolved(v) for k, v in svc["environment"].items()}
        assert set(env) <= aliases | read_by_telemetry, f"not read by the code: {set(env) - aliases}"
        assert required <= set(env) | set(built_in), f"{name} lacks {required - set(env) - set(built_in)}"
        settings = Settings.model_validate(built_in | {"TALLY_SERVICE": name} | env)
        assert settings.environment == "production"
        assert auth.startup_problem(settings) is None, "the services start with compose's defaults"
        host, port = settings.kafka_bootstrap_servers.split(":")
        assert host == "kafka" and f"://:{port}" in services["kafka"]["environment"]["KAFKA_LISTENERS"]
        db = urlsplit(settings.require_database_url())
        pg = services["postgres"]["environment"]
        assert (db.hostname, db.username, db.password, db.path) == (
            "postgres",
            pg["POSTGRES_USER"],
            pg["POSTGRES_PASSWORD"],
            "/" + pg["POSTGRES_DB"],
        )
        assert urlsplit(settings.smtp_url).hostname == "mailpit"
        for peer in SERVICES:
            if peer.replace("-", "_") + "_url" in fields:
                url = urlsplit(settings.url_of(peer))
                assert (url.hostname, url.port) == (peer, SERVICE_PORTS[peer]), peer


def test_compose_and_readme_say_how_to_mint_a_token() -> None:
    head = (ROOT / "docker-compose.yml").read_text().split("\nx-tally")[0]
    assert "docker compose exec -T usage-meter tally token product" in head
    assert "tally migrate --status" in head
    readme = (ROOT / "README.md").read_text()
    deploying = readme[readme.index("## Deploying") :]
    assert "docker compose up" in deploying and "tally token" in deploying
