"""The Helm chart fails here the way a cluster would refuse it, offline and in seconds.

The chart (deploy/helm/tally) is rendered by Helm's own engine (helm-python-sdk binds Helm's Go
SDK, no binary, no cluster) for the default values and deploy/helm/values-production.yaml,
linted, and every rendered object validated: core kinds against the Kubernetes JSON schemas
kubernetes-validate ships (the oldest Kubernetes the chart allows and the newest), custom
resources against the operators' own CRD schemas in ../shared/schemas/crds (Strimzi v1,
CloudNativePG, the Barman Cloud plugin, KEDA, Prometheus Operator, Gateway API), read from
there, never copied, with the schema's defaults applied and its CEL rules evaluated as the API
server does on create. An object of a version no operator serves has no schema there and fails.
Every alert's and dashboard's PromQL must parse (the Prometheus Operator's webhook refuses it).

Then what a schema cannot say: every container has resources, no autoscaled Deployment keeps
spec.replicas, the HTTPRoute sends every public path of API.md (and every route the services
serve) to the service that serves it, Stripe's keys reach only the code that reads them, each
KafkaUser's ACLs are exactly the topics its service's code reads and writes, the shutdown path
fits in the grace period, every alert's runbook_url is an anchor of docs/operations.md."""

from __future__ import annotations

import functools
import importlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import celpy.adapter
import helm_python as helm
import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from fastapi import FastAPI

from tally.events import Topics

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "tally"
PRODUCTION = ROOT / "deploy" / "helm" / "values-production.yaml"
SHARED = ROOT.parent / "shared"
CRDS = SHARED / "schemas" / "crds"
API_MD = SHARED / "API.md"
OPERATIONS = ROOT / "docs" / "operations.md"

SERVICES = ["usage-meter", "wallet", "recharge", "rebilling", "notifier"]
RELEASE = "tally"
NAMESPACE = "tally"
# The Kubernetes versions every core object must validate against: the chart's kubeVersion
# floor and the newest schemas kubernetes-validate ships.
KUBE_FLOOR = "1.30.0"
CORE_GROUPS = {"", "apps", "batch", "policy", "networking.k8s.io", "autoscaling"}
POD_KINDS = {"Deployment", "Job", "StatefulSet", "DaemonSet"}
# kubernetes-validate reads and parses the schema files (megabytes of definitions) on every
# call; they never change, so read each once.
kubernetes_validate.utils.schema_contents = functools.cache(kubernetes_validate.utils.schema_contents)

Obj = dict[str, Any]


# --- rendering ------------------------------------------------------------------------------


def production_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load(PRODUCTION.read_text())
    return values


@functools.lru_cache(maxsize=32)
def _render(values_json: str) -> tuple[Obj, ...]:
    values = json.loads(values_json) or None
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[Obj] = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [d for d in yaml.safe_load_all(text) if d]
    return tuple(objects)


def render(values: dict[str, Any] | None = None) -> list[Obj]:
    """The chart's objects for ``values`` (on top of the chart's defaults), parsed; a fresh
    copy each time (renders are cached)."""
    return [json.loads(json.dumps(o)) for o in _render(json.dumps(values or {}, sort_keys=True))]


# The value sets every object is validated for: the two the issue names, and the switches
# that render other objects (the Ingress, the plain listener, autoscaling off, one image).
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "production": production_values(),
    "ingress-plain-kafka": {
        "frontDoor": {"type": "ingress", "ingress": {"tls": [{"secretName": "tls", "hosts": ["a.b"]}]}},
        "kafka": {"security": {"enabled": False}},
    },
    "no-keda-one-image-dev-secrets": {
        "keda": {"enabled": False},
        "image": {"perService": False, "digest": "sha256:" + "a" * 64},
        "secrets": {"create": True, "jwtSecret": "x" * 40},
    },
    "external-kafka-and-db": {
        "kafka": {"enabled": False, "bootstrapServers": "kafka.example:9093"},
        "postgres": {"enabled": False},
        "database": {"existingSecret": "tally-db-url"},
    },
}


def of(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[Obj]) -> Iterator[tuple[Obj, Obj]]:
    for o in objects:
        if o["kind"] in POD_KINDS:
            yield o, o["spec"]["template"]["spec"]


def containers(pod: Obj) -> list[Obj]:
    return list(pod.get("initContainers", [])) + list(pod["containers"])


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[Obj]]:
    name: str = request.param
    return name, render(VARIANTS[name])


@pytest.fixture(scope="module", params=["default", "production"])
def objects(request: pytest.FixtureRequest) -> list[Obj]:
    return render(VARIANTS[request.param])


# --- the code, as the source of truth -------------------------------------------------------


def package(service: str) -> str:
    return "tally_" + service.replace("-", "_")


@functools.cache
def spec_of(service: str) -> Any:
    return importlib.import_module(package(service) + ".app").SPEC


def consumed(service: str) -> set[tuple[str, str]]:
    """(topic, consumer group) of every consumer in the service's consumer table."""
    return {(c.topic, c.group_id) for c in spec_of(service).consumers}


def produced(service: str) -> set[str]:
    """Topics the service's code names outside its consumer table (outbox rows, emits), plus
    the dead-letter topic of everything it consumes (tally.consumer dead-letters there)."""
    src = ROOT / "services" / service / "src"
    names = set()
    for path in src.rglob("*.py"):
        if path.name != "app.py":
            names |= set(re.findall(r"\bTopics\.([A-Z_]+)\b", path.read_text()))
    topics = {getattr(Topics, n) for n in names if isinstance(getattr(Topics, n, None), str)}
    return topics | {Topics.dlq(t) for t, _ in consumed(service)}


def stripe_readers() -> set[str]:
    """Services whose code reads a Stripe setting."""
    pattern = re.compile(r"\bstripe_(api_key|webhook_secret|api_base)\b|[\"']STRIPE_[A-Z_]+[\"']")
    return {
        s
        for s in SERVICES
        if any(pattern.search(p.read_text()) for p in (ROOT / "services" / s / "src").rglob("*.py"))
    }


@functools.cache
def served_routes(service: str) -> set[tuple[str, str]]:
    """(method, path) of every operation the service's routers serve."""
    spec = spec_of(service)
    app = FastAPI()
    for router in spec.routers:
        app.include_router(router)
    paths = app.openapi()["paths"]
    routes = {(m.upper(), p) for p, ops in paths.items() for m in ops}
    return routes | {(m.upper(), p) for m, p in spec.fast_routes}


def shutdown_budget_seconds() -> float:
    """The longest a pod takes from SIGTERM to exit, read from the code: uvicorn's drain, the
    consumers' graceful stop, the outbox relay and one background worker stopping one after
    the other, the producer's last flush."""

    def number(path: str, pattern: str) -> float:
        found = re.search(pattern, (ROOT / path).read_text())
        assert found, f"{pattern} in {path}"
        return float(found.group(1).replace("_", ""))

    uvicorn = number("shared/src/tally/service.py", r"timeout_graceful_shutdown=([\d.]+)")
    broker = number("shared/src/tally/kafka.py", r"graceful_timeout=([\d.]+)")
    worker = number("shared/src/tally/worker.py", r"wait_for\(self\._task, timeout=([\d.]+)\)")
    producer = number("shared/src/tally/kafka.py", r"request_timeout_ms=([\d_]+)") / 1000
    return uvicorn + broker + 2 * worker + producer


# --- Helm's own checks ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "production"])
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, VARIANTS[name] or None, strict=True, namespace=NAMESPACE)
    assert not report["errors"], report
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems, problems


def test_misconfigurations_fail_at_render_time() -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        # no destinationPath: WAL archiving would fail forever and fill pg_wal
        ({"backups": {"enabled": True}}, "backups.destinationPath is required"),
        ({"image": {"perService": False, "digest": "sha256:short"}}, "/image/digest"),
        ({"frontDoor": {"type": "loadbalancer"}}, "/frontDoor/type"),
        ({"config": {"STRIPE_API_KEY": "sk_live_x"}}, "STRIPE_API_KEY"),  # in every pod again
        ({"services": {"wallet": {"env": {"STRIPE_API_KEY": "sk_live_x"}}}}, "services.wallet.env"),
        ({"kafka": {"enabled": False}}, "kafka.bootstrapServers is required"),
        # values.schema.json: a misspelt key, an unsupported Kafka, another Postgres major
        ({"services": {"wallet": {"replica": 3}}}, "'replica' not allowed"),
        ({"kafka": {"version": "3.9.0"}}, "/kafka/version"),
        ({"postgres": {"imageName": "ghcr.io/cloudnative-pg/postgresql:16.4"}}, "/postgres/imageName"),
    ]
    for values, reason in cases:
        with pytest.raises(helm.HelmError, match=re.escape(reason)):
            render(values)


# --- schemas ---------------------------------------------------------------------------------


def split_api_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version


def crd_schema_path(obj: Obj) -> Path:
    group, version = split_api_version(obj["apiVersion"])
    return CRDS / group / f"{obj['kind'].lower()}_{version}.json"


@functools.cache
def crd_schema(path: Path) -> Obj:
    schema: Obj = json.loads(path.read_text())
    return schema


@functools.cache
def crd_validator(path: Path) -> Any:
    schema = crd_schema(path)
    # openAPIV3Schema is a JSON Schema subset; its patterns are Go (RE2) expressions, which
    # Python's re reads alike except inline flags mid-pattern (no field Tally sets has one).
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def apply_defaults(schema: Obj, value: Any) -> None:
    """What the API server does before validating: fill in the schema's defaults."""
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = json.loads(json.dumps(sub["default"]))
            if key in value:
                apply_defaults(sub, value[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in props:
                    apply_defaults(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)


CEL = celpy.Environment()


@functools.cache
def cel_program(rule: str) -> Any:
    return CEL.program(CEL.compile(rule))


def cel_violations(schema: Obj, value: Any, where: str) -> Iterator[str]:
    """The CRD's x-kubernetes-validations (CEL) rules that ``value`` breaks, as the API server
    evaluates them on create (rules comparing with oldSelf apply to updates only)."""
    for rule in schema.get("x-kubernetes-validations") or []:
        if "oldSelf" in rule["rule"]:
            continue
        result = cel_program(rule["rule"]).evaluate({"self": celpy.adapter.json_to_cel(value)})
        if not (isinstance(result, celpy.celtypes.BoolType) and bool(result)):
            yield f"{where}: {rule.get('message') or rule['rule']} ({result!r})"
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, item in value.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                yield from cel_violations(sub, item, f"{where}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from cel_violations(schema["items"], item, f"{where}[{i}]")


def cel_rules(schema: Any) -> Iterator[str]:
    if isinstance(schema, dict):
        for rule in schema.get("x-kubernetes-validations") or []:
            yield rule["rule"]
        for item in schema.values():
            yield from cel_rules(item)
    elif isinstance(schema, list):
        for item in schema:
            yield from cel_rules(item)


def needs_crds() -> None:
    if not CRDS.is_dir():
        pytest.skip(f"the operators' CRD schemas are not here ({CRDS}): shared/ is not beside the repo")


def test_every_object_validates_against_kubernetes_and_operator_schemas(
    variant: tuple[str, list[Obj]],
) -> None:
    needs_crds()
    name, objects = variant
    latest = kubernetes_validate.latest_version()
    checked = cel_checked = 0
    for obj in objects:
        where = f"{name}: {obj['kind']} {obj['metadata']['name']}"
        group, _ = split_api_version(obj["apiVersion"])
        if group in CORE_GROUPS:
            for version in (KUBE_FLOOR, latest):
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{where} (Kubernetes {version}): {exc.message}") from exc
        else:
            path = crd_schema_path(obj)
            assert path.is_file(), f"{where}: no operator serves {obj['apiVersion']} {obj['kind']}"
            errors = sorted(crd_validator(path).iter_errors(obj), key=lambda e: list(e.path))
            assert not errors, f"{where}: " + "; ".join(
                f"{'/'.join(map(str, e.path))}: {e.message[:300]}" for e in errors[:5]
            )
            defaulted = json.loads(json.dumps(obj))
            apply_defaults(crd_schema(path), defaulted)
            broken = list(cel_violations(crd_schema(path), defaulted, where))
            assert not broken, "; ".join(broken[:5])
            cel_checked += sum(1 for _ in cel_rules(crd_schema(path)))
        checked += 1
    assert checked == len(objects) > 30
    assert cel_checked > 0, "the CEL rules were evaluated"


def test_no_object_of_an_unserved_api_version(variant: tuple[str, list[Obj]]) -> None:
    needs_crds()
    name, objects = variant
    custom = [o for o in objects if split_api_version(o["apiVersion"])[0] not in CORE_GROUPS]
    assert custom
    for o in custom:
        assert o["apiVersion"] != "kafka.strimzi.io/v1beta2", f"{name}: {o['kind']} on Strimzi v1beta2"
        served = sorted(p.stem for p in (CRDS / split_api_version(o["apiVersion"])[0]).glob("*.json"))
        assert crd_schema_path(o).is_file(), f"{name}: {o['apiVersion']} {o['kind']} is not among {served}"
    for o in of(objects, "Kafka"):
        annotations = o["metadata"].get("annotations", {})
        assert "strimzi.io/kraft" not in annotations and "strimzi.io/node-pools" not in annotations


def test_names_and_labels_are_valid_kubernetes_names(variant: tuple[str, list[Obj]]) -> None:
    name, objects = variant
    subdomain = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    label_value = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    seen = set()
    for o in objects:
        meta = o["metadata"]
        assert subdomain.match(meta["name"]) and len(meta["name"]) <= 253, meta["name"]
        if o["kind"] in {"Service", "Deployment", "Kafka", "KafkaNodePool", "Cluster"}:
            assert len(meta["name"]) <= 52, f"{meta['name']}: pods and DNS names are made from it"
        for value in meta.get("labels", {}).values():
            assert label_value.match(str(value)) and len(str(value)) <= 63, f"{name}: label {value!r}"
        key = (o["apiVersion"].split("/")[0], o["kind"], meta["name"])
        assert key not in seen, f"{name}: two objects {key}"
        seen.add(key)


# --- what a schema cannot say -----------------------------------------------------------------


def test_every_container_and_operand_has_resources(variant: tuple[str, list[Obj]]) -> None:
    name, objects = variant

    def complete(resources: Obj | None, where: str) -> None:
        assert resources, f"{name}: {where} has no resources"
        requests = resources.get("requests", {})
        assert requests.get("cpu") and requests.get("memory"), f"{name}: {where} requests"
        assert resources.get("limits", {}).get("memory"), f"{name}: {where} memory limit"

    pods = list(pod_specs(objects))
    assert pods
    for owner, pod in pods:
        for c in containers(pod):
            complete(c.get("resources"), f"{owner['kind']} {owner['metadata']['name']}/{c['name']}")
    for pool in of(objects, "KafkaNodePool"):
        complete(pool["spec"].get("resources"), "KafkaNodePool")
    for kafka in of(objects, "Kafka"):
        spec = kafka["spec"]
        complete(spec["kafkaExporter"].get("resources"), "Kafka exporter")
        for operator in ("topicOperator", "userOperator"):
            complete(spec["entityOperator"][operator].get("resources"), operator)
    for cluster in of(objects, "Cluster"):
        complete(cluster["spec"].get("resources"), "Postgres")
    for store in of(objects, "ObjectStore"):
        complete(store["spec"]["instanceSidecarConfiguration"].get("resources"), "Barman sidecar")


def test_no_deployment_keeps_replicas_under_keda(variant: tuple[str, list[Obj]]) -> None:
    name, objects = variant
    deployments = {d["metadata"]["name"]: d for d in of(objects, "Deployment")}
    scaled = {s["spec"]["scaleTargetRef"]["name"] for s in of(objects, "ScaledObject")}
    assert scaled <= set(deployments)
    for d_name, d in deployments.items():
        if d_name in scaled:
            assert "replicas" not in d["spec"], f"{name}: {d_name} fights its HPA over spec.replicas"
        else:
            assert d["spec"]["replicas"] >= 1, f"{name}: {d_name} is not autoscaled: it needs replicas"
    if name == "no-keda-one-image-dev-secrets":
        assert not scaled
    else:
        assert scaled == {f"{RELEASE}-{s}" for s in SERVICES}


def test_keda_scales_each_service_on_the_lag_of_its_own_consumer_groups(objects: list[Obj]) -> None:
    topics = {t["spec"]["topicName"]: t for t in of(objects, "KafkaTopic")}
    for s in of(objects, "ScaledObject"):
        service = s["metadata"]["labels"]["app.kubernetes.io/name"]
        triggers = {(t["metadata"]["topic"], t["metadata"]["consumerGroup"]) for t in s["spec"]["triggers"]}
        assert triggers == consumed(service), service
        for t in s["spec"]["triggers"]:
            assert t["type"] == "kafka" and int(t["metadata"]["lagThreshold"]) > 0
            assert t["authenticationRef"]["name"] in {
                a["metadata"]["name"] for a in of(objects, "TriggerAuthentication")
            }
        spec = s["spec"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["maxReplicaCount"] <= max(topics[t]["spec"]["partitions"] for t, _ in triggers)
        scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert scale_down["stabilizationWindowSeconds"] >= 60, "a lag that comes and goes must not flap"


def test_probes_prestop_and_a_grace_period_longer_than_the_shutdown_path(objects: list[Obj]) -> None:
    budget = shutdown_budget_seconds()
    for d in of(objects, "Deployment"):
        pod = d["spec"]["template"]["spec"]
        [c] = pod["containers"]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pre_stop > 0
        assert pod["terminationGracePeriodSeconds"] > pre_stop + budget, (
            f"{d['metadata']['name']}: {pod['terminationGracePeriodSeconds']} s is not more than "
            f"preStop {pre_stop} s + the shutdown path {budget} s"
        )


def test_metrics_are_scraped_from_every_service(objects: list[Obj]) -> None:
    [monitor] = of(objects, "ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    services = of(objects, "Service")
    assert {
        s["metadata"]["name"] for s in services if s["metadata"]["labels"].items() >= selector.items()
    } == {f"{RELEASE}-{s}" for s in SERVICES}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "http"
    assert all(s["spec"]["ports"][0]["name"] == "http" for s in services)
    pods = {p["spec"]["selector"]["matchLabels"].get("strimzi.io/name") for p in of(objects, "PodMonitor")}
    assert f"{RELEASE}-kafka-kafka-exporter" in pods, "the lag alerts need the exporter scraped"


def test_monitoring_objects_carry_the_configured_labels() -> None:
    objects = render(VARIANTS["production"])
    want = production_values()["monitoring"]["labels"]
    assert want == {"release": "kube-prometheus-stack"}
    monitoring = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert {o["kind"] for o in monitoring} == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for o in monitoring:
        assert o["metadata"]["labels"].items() >= want.items(), o["metadata"]["name"]
    defaults = [o for o in render() if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert defaults and not any("release" in o["metadata"]["labels"] for o in defaults)


# --- the front door ------------------------------------------------------------------------


def api_md_paths() -> dict[str, set[tuple[str, str]]]:
    """(method, path) of every public operation in API.md's tables, by service. Cells read
    like "GET /v1/a/{x}, PUT …/b" or "PATCH same paths": "…" continues the row's (or the row
    above's) paths, at the segment it names."""
    if not API_MD.is_file():
        pytest.skip(f"API.md is not here ({API_MD})")
    by_service: dict[str, set[tuple[str, str]]] = {}
    service: str | None = None
    above: list[str] = []  # the paths of the row above
    previous: list[str] = []  # ... and of the row above that
    for line in API_MD.read_text().splitlines():
        heading = re.match(r"^## ([a-z-]+) :\d+", line)
        if heading:
            service, previous, above = heading.group(1), [], []
            continue
        if line.startswith("## "):
            service = None
        if service is None or not line.startswith("| ") or line.startswith("| method") or "---" in line:
            continue
        cell = re.sub(r"\([^)]*\)", "", line.split("|")[1])
        methods: list[str] = []
        paths: list[str] = []
        for token in re.split(r"[,;]", cell):
            token = token.strip()
            match = re.match(r"^([A-Z]+)?\s*(.*)$", token)
            assert match, token
            if match.group(1):
                methods.append(match.group(1))
            rest = match.group(2).split("?")[0].strip()
            if rest == "same paths":
                paths += above
            elif rest.startswith("/"):
                paths.append(rest)
            elif rest.startswith("…"):
                bases = paths[-1:] or previous
                first = rest[1:].strip("/").split("/")[0]
                bases = [b for b in bases if first in b.split("/")] or bases
                paths += [continue_path(base, rest[1:]) for base in bases]
        assert methods and paths, line
        by_service.setdefault(service, set()).update((m, p) for m in methods for p in paths)
        previous, above = list(dict.fromkeys(paths + above)), paths
    assert set(by_service) == set(SERVICES), by_service.keys()
    return by_service


def continue_path(base: str, suffix: str) -> str:
    """ "…/wallet/transactions" after /v1/accounts/{aid}/wallet; "…/reject" after
    /v1/credit-requests/{rid}/approve; "…/plan" after /v1/companies/{cid}."""
    segments = base.strip("/").split("/")
    first = suffix.strip("/").split("/")[0]
    if first in segments:
        return "/" + "/".join(segments[: segments.index(first)]) + suffix
    if first.startswith("{") or segments[-1].startswith("{"):
        return base + suffix
    return "/" + "/".join(segments[:-1]) + suffix


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "acme_01", path)


def http_route_backends(route: Obj, path: str) -> set[str]:
    """Services the HTTPRoute may send ``path`` to: every rule with a match for it (Exact,
    PathPrefix element-wise, RegularExpression anywhere in the path)."""
    backends: set[str] = set()
    for rule in route["spec"]["rules"]:
        for match in rule.get("matches", [{"path": {"type": "PathPrefix", "value": "/"}}]):
            kind, value = match["path"]["type"], match["path"]["value"]
            if kind == "Exact":
                hit = path == value
            elif kind == "PathPrefix":
                prefix = value.rstrip("/")
                hit = path == prefix or path.startswith(prefix + "/")
            else:
                hit = re.search(value, path) is not None
            if hit:
                backends |= {b["name"] for b in rule["backendRefs"]}
    return backends


def ingress_backends(ingress: Obj, path: str) -> set[str]:
    return {
        p["backend"]["service"]["name"]
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
        if re.search(p["path"], path, re.IGNORECASE)
    }


def test_api_md_is_read_completely() -> None:
    paths = api_md_paths()
    assert ("PATCH", "/v1/accounts/{aid}/wallet") in paths["wallet"]
    assert ("GET", "/v1/accounts/{aid}/wallet/transactions") in paths["wallet"]
    assert ("POST", "/v1/credit-requests/{rid}/reject") in paths["wallet"]
    assert ("POST", "/v1/accounts/{aid}/wallet/top-ups") in paths["recharge"]
    assert ("GET", "/v1/companies/{cid}/wallet/recharges") in paths["recharge"]
    assert ("POST", "/v1/companies/{cid}/payment-methods/{id}/default") in paths["recharge"]
    assert ("PUT", "/v1/companies/{cid}/plan") in paths["rebilling"]
    assert ("PUT", "/v1/companies/{cid}/reselling/{product}") in paths["rebilling"]
    assert ("POST", "/v1/webhook-deliveries/{did}/retry") in paths["notifier"]
    assert sum(map(len, paths.values())) >= 60


@pytest.mark.parametrize("name", ["default", "production", "ingress-plain-kafka"])
def test_the_front_door_routes_every_public_path_to_its_service(name: str) -> None:
    objects = render(VARIANTS[name])
    if name == "ingress-plain-kafka":
        [ingress] = of(objects, "Ingress")
        assert not of(objects, "HTTPRoute")

        def backends(path: str) -> set[str]:
            return ingress_backends(ingress, path)

    else:
        [route] = of(objects, "HTTPRoute")
        assert not of(objects, "Ingress")
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        rules = route["spec"]["rules"]
        # Two of the CRD's CEL rules, spelt out (the schema test evaluates all of them):
        assert len(rules) <= 16 and sum(len(r["matches"]) for r in rules) <= 128
        assert len({r["name"] for r in rules}) == len(rules)

        def backends(path: str) -> set[str]:
            return http_route_backends(route, path)

    public = api_md_paths()
    for service, operations in public.items():
        for method, path in sorted(operations):
            got = backends(concrete(path))
            assert got == {f"{RELEASE}-{service}"}, f"{method} {path} goes to {sorted(got)}, not {service}"
    for service in SERVICES:
        for method, path in sorted(served_routes(service)):
            got = backends(concrete(path))
            assert got <= {f"{RELEASE}-{service}"}, f"{method} {path} ({service}) goes to {sorted(got)}"
    # the merged document of the whole API (tally.openapi): every service serves the same one
    assert len(backends("/v1/openapi.json")) == 1
    for private in ("/metrics", "/healthz", "/readyz", "/openapi.json", "/docs", "/v1/charges"):
        assert not backends(private), f"{private} must not be public"


# --- secrets ---------------------------------------------------------------------------------


def test_stripe_keys_reach_only_the_services_whose_code_reads_them(variant: tuple[str, list[Obj]]) -> None:
    name, objects = variant
    readers = stripe_readers()
    assert readers == {"recharge"}, "the services that talk to Stripe changed: check the chart"
    configmaps = {c["metadata"]["name"]: c for c in of(objects, "ConfigMap")}
    for owner, pod in pod_specs(objects):
        for c in containers(pod):
            env = {e["name"] for e in c.get("env", [])}
            for ref in c.get("envFrom", []):
                env |= set(configmaps[ref["configMapRef"]["name"]]["data"])
            stripe = {e for e in env if e.startswith("STRIPE_")}
            service = owner["metadata"]["labels"].get("app.kubernetes.io/name")
            if owner["kind"] == "Deployment" and service in readers:
                assert {"STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET"} <= stripe, f"{name}: {service}"
            else:
                assert not stripe, (
                    f"{name}: {owner['kind']} {owner['metadata']['name']}/{c['name']} gets {stripe}"
                )


# --- Kafka -----------------------------------------------------------------------------------


def acl_sets(user: Obj) -> tuple[set[str], set[str], set[str]]:
    reads, groups, writes = set(), set(), set()
    for acl in user["spec"]["authorization"]["acls"]:
        resource = acl["resource"]
        assert resource.get("patternType", "literal") == "literal" and resource["name"] != "*", acl
        assert "All" not in acl["operations"] and acl.get("type", "allow") == "allow", acl
        if resource["type"] == "group":
            groups.add(resource["name"])
        elif "Read" in acl["operations"]:
            reads.add(resource["name"])
        if resource["type"] == "topic" and "Write" in acl["operations"]:
            writes.add(resource["name"])
    return reads, groups, writes


def test_kafka_4_3_on_kraft_with_scram_tls_and_the_exporter(objects: list[Obj]) -> None:
    [kafka] = of(objects, "Kafka")
    spec = kafka["spec"]["kafka"]
    assert spec["version"].startswith("4.3."), "Strimzi 1.2 runs Kafka 4.2.x and 4.3.x"
    [listener] = spec["listeners"]
    assert listener["tls"] is True and listener["authentication"]["type"] == "scram-sha-512"
    assert spec["authorization"]["type"] == "simple"
    assert kafka["spec"]["kafkaExporter"] is not None
    [pool] = of(objects, "KafkaNodePool")
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert int(spec["config"]["min.insync.replicas"]) < pool["spec"]["replicas"]


def test_each_service_has_a_kafka_user_with_acls_for_exactly_its_topics(objects: list[Obj]) -> None:
    users = {u["metadata"]["name"]: u for u in of(objects, "KafkaUser")}
    [kafka] = of(objects, "Kafka")
    for u in users.values():
        assert u["spec"]["authentication"]["type"] == "scram-sha-512"
        assert u["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/name"]: d for d in of(objects, "Deployment")}
    for service in SERVICES:
        name = f"{RELEASE}-{service}"
        reads, groups, writes = acl_sets(users[name])
        assert reads == {t for t, _ in consumed(service)}, f"{service} reads"
        assert groups == {g for _, g in consumed(service)}, f"{service} consumer groups"
        assert writes == produced(service), f"{service} writes"
        env = {e["name"]: e for e in deployments[service]["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["KAFKA_SASL_USERNAME"]["value"] == name
        assert env["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == name
    # Only the products' user may write usage.ingest; KEDA only describes.
    writers = {n for n, u in users.items() if Topics.USAGE_INGEST in acl_sets(u)[2]}
    assert writers == {f"{RELEASE}-products"}
    reads, groups, writes = acl_sets(users[f"{RELEASE}-keda"])
    assert not reads and not writes and groups == {g for s in SERVICES for _, g in consumed(s)}


def test_every_topic_of_the_code_and_its_dead_letters_is_a_kafka_topic(objects: list[Obj]) -> None:
    topics = {t["spec"]["topicName"] for t in of(objects, "KafkaTopic")}
    assert topics == set(Topics.ALL) | {Topics.dlq(t) for t in Topics.ALL}
    used = set().union(*(produced(s) | {t for t, _ in consumed(s)} for s in SERVICES))
    assert used <= topics, used - topics


# --- Postgres and migrations ----------------------------------------------------------------


def test_postgres_18_with_backups_only_when_configured() -> None:
    default, production = render(), render(VARIANTS["production"])
    for objects in (default, production):
        [cluster] = of(objects, "Cluster")
        tag = cluster["spec"]["imageName"].rsplit(":", 1)[1]
        assert tag.split(".")[0].split("-")[0] == "18", cluster["spec"]["imageName"]
        assert "backup" not in cluster["spec"], "barmanObjectStore is removed: the plugin replaces it"
    [cluster] = of(default, "Cluster")
    assert "plugins" not in cluster["spec"]
    assert not of(default, "ObjectStore") and not of(default, "ScheduledBackup")
    [cluster] = of(production, "Cluster")
    [store] = of(production, "ObjectStore")
    [plugin] = cluster["spec"]["plugins"]
    assert plugin["name"] == "barman-cloud.cloudnative-pg.io" and plugin["isWALArchiver"] is True
    assert plugin["parameters"]["barmanObjectName"] == store["metadata"]["name"]
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")
    [backup] = of(production, "ScheduledBackup")
    assert backup["spec"]["method"] == "plugin"
    assert backup["spec"]["pluginConfiguration"]["name"] == plugin["name"]
    assert backup["spec"]["cluster"]["name"] == cluster["metadata"]["name"]


def test_migrations_are_a_hook_before_every_upgrade() -> None:
    for values, install_hook in (
        (VARIANTS["default"], "post-install"),
        (VARIANTS["external-kafka-and-db"], "pre-install"),
    ):
        [job] = of(render(values), "Job")
        annotations = job["metadata"]["annotations"]
        hooks = set(annotations["helm.sh/hook"].split(","))
        # The chart's own database exists only once the release's objects do: its first
        # migration runs right after them; every upgrade migrates before any new pod starts.
        assert hooks == {install_hook, "pre-upgrade"}
        assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
        pod = job["spec"]["template"]["spec"]
        assert {c["name"] for c in pod["containers"]} == set(SERVICES)
        assert all(c["args"] == ["--migrate"] for c in pod["containers"])


def test_images_are_values_and_a_digest_pins_them() -> None:
    digest = "sha256:" + "b" * 64
    objects = render(
        {"image": {"repository": "r.example/t"}, "services": {"wallet": {"image": {"digest": digest}}}}
    )
    images = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["image"]
        for d in of(objects, "Deployment")
    }
    assert images[f"{RELEASE}-wallet"] == f"r.example/t-wallet@{digest}"
    assert images[f"{RELEASE}-recharge"] == "r.example/t-recharge:0.1.0"
    one = render(VARIANTS["no-keda-one-image-dev-secrets"])
    assert {c["image"] for _, pod in pod_specs(one) for c in pod["containers"]} == {
        "tally@sha256:" + "a" * 64
    }


# --- NetworkPolicies --------------------------------------------------------------------------


def test_network_policies_deny_by_default_and_open_each_service_port(objects: list[Obj]) -> None:
    policies = {p["metadata"]["name"]: p for p in of(objects, "NetworkPolicy")}
    deny = policies[f"{RELEASE}-default-deny"]
    assert "ingress" not in deny["spec"] and deny["spec"]["policyTypes"] == ["Ingress"]
    deny_selector = deny["spec"]["podSelector"]["matchLabels"].items()
    for d in of(objects, "Deployment"):
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert labels.items() >= deny_selector
        service = labels["app.kubernetes.io/name"]
        [rule] = policies[d["metadata"]["name"]]["spec"]["ingress"]
        port = d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        assert rule["ports"] == [{"protocol": "TCP", "port": port}], service
    [kafka] = of(objects, "Kafka")
    assert kafka["spec"]["kafka"]["listeners"][0]["networkPolicyPeers"], "Strimzi's listener policy"


# --- alerts ----------------------------------------------------------------------------------


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#+\s+(.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_alerts_cover_up_absent_5xx_webhooks_and_broker_lag_with_runbooks(objects: list[Obj]) -> None:
    [rules] = of(objects, "PrometheusRule")
    alerts = [r for g in rules["spec"]["groups"] for r in g["rules"]]
    exprs = {a["alert"]: a["expr"] for a in alerts}
    assert re.search(r"\bup\{", exprs["TallyServiceDown"])
    assert "absent(" in exprs["TallyServiceAbsent"]
    assert 'status=~"5.."' in exprs["TallyHttp5xx"]
    assert "/v1/stripe/webhooks" in exprs["TallyWebhookSignatureFailures"]
    for lag in ("TallyConsumerLagGrowing", "TallyConsumerStuck"):
        assert "kafka_consumergroup_" in exprs[lag] and "tally_consumer_lag" not in exprs[lag]
    absent = [a for a in alerts if a["alert"] == "TallyServiceAbsent"]
    assert {a["labels"]["service"] for a in absent} == set(SERVICES)
    anchors = github_anchors(OPERATIONS.read_text())
    for a in alerts:
        url = a["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/operations.md"), url
        assert url.split("#")[1] in anchors, (
            f"{a['alert']}: no section #{url.split('#')[1]} in docs/operations.md"
        )
        assert a["labels"]["severity"] in {"warning", "critical"}


def test_every_promql_expression_parses(objects: list[Obj]) -> None:
    """The Prometheus Operator's admission webhook refuses a rule whose PromQL does not parse;
    Grafana shows an error panel."""
    [rules] = of(objects, "PrometheusRule")
    exprs = {a["alert"] + " " + a["expr"]: a["expr"] for g in rules["spec"]["groups"] for a in g["rules"]}
    [boards] = [c for c in of(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboards")]
    for name, text in boards["data"].items():
        for panel in json.loads(text)["panels"]:
            exprs |= {f"{name} {panel['title']}": t["expr"] for t in panel["targets"]}
    for where, expr in exprs.items():
        try:
            promql_parser.parse(expr)
        except ValueError as exc:
            raise AssertionError(f"{where}: {exc}") from exc
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (service (rate(x[5m]))")
