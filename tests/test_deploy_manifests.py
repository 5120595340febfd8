"""The Kubernetes manifests under deploy/k8s render, validate and keep their invariants.

Rendering: a small kustomize subset (resources, components, JSON 6902 patches, nameSuffix /
namePrefix, labels, images) written here, so the test needs no binary; where `kustomize` or
`kubectl` is installed, its output must equal ours. Validation, offline: built-in kinds against
the Kubernetes schemas in the `kubernetes-validate` wheel (a dev extra: missing fails, never
skips), the KEDA and Prometheus Operator custom resources against the CRD schemas vendored in
deploy/k8s/schemas. Then the invariants an operator relies on: probes on the metrics port,
grace periods longer than the drain, non-root pods, the ScaledObject watching the group and
topic of the queue its Deployment serves, no more replicas than partitions, no literal secret.
The compose file and the Dockerfile get a few reading checks (no Docker engine here).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from streamtasks.backend.cassandra.connection import CassandraOptions
from streamtasks.settings import Settings, parse_url

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests promise to work on

Doc = dict[str, Any]

# -- a kustomize subset ------------------------------------------------------------------

_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "patches",
                       "nameSuffix", "namePrefix", "labels", "images"}
# Where `labels: [{includeSelectors: true}]` writes, per kind (kustomize's commonLabels specs,
# limited to the kinds used here); the bool says whether a missing field is created.
_SELECTOR_FIELDS: dict[str, list[tuple[tuple[str, ...], bool]]] = {
    "Deployment": [(("spec", "selector", "matchLabels"), True),
                   (("spec", "template", "metadata", "labels"), True)],
    "Job": [(("spec", "selector", "matchLabels"), False),
            (("spec", "template", "metadata", "labels"), True)],
    "Service": [(("spec", "selector"), True)],
    "PodDisruptionBudget": [(("spec", "selector", "matchLabels"), False)],
}


def _load_yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(folder: Path) -> Doc:
    doc = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(doc) - _KUSTOMIZATION_KEYS
    assert not unknown, (
        f"{folder}/kustomization.yaml uses {sorted(unknown)}, which this test's renderer does "
        "not implement: extend render() in tests/test_deploy_manifests.py"
    )
    return doc


def render(folder: Path) -> list[Doc]:
    """Build the kustomization in ``folder`` (the subset of kustomize these files use)."""
    kust = _kustomization(folder)
    docs = _resources_of(folder, kust)
    for entry in kust.get("components", []):
        docs = _apply_component((folder / entry).resolve(), docs)
    return _transform(kust, docs)


def _apply_component(folder: Path, docs: list[Doc]) -> list[Doc]:
    kust = _kustomization(folder)
    assert kust["kind"] == "Component", f"{folder} is listed as a component but is {kust['kind']}"
    # A component's resources join the parent's; its patches apply to all of them.
    return _transform(kust, docs + _resources_of(folder, kust))


def _resources_of(folder: Path, kust: Doc) -> list[Doc]:
    docs: list[Doc] = []
    for entry in kust.get("resources", []):
        path = (folder / entry).resolve()
        docs += render(path) if path.is_dir() else _load_yaml_docs(path)
    return docs


def _transform(kust: Doc, docs: list[Doc]) -> list[Doc]:
    # kustomize's order: patches, then name prefix/suffix, then labels, then images.
    docs = copy.deepcopy(docs)
    for patch in kust.get("patches", []):
        _apply_patch(patch, docs)
    for doc in docs:
        meta = doc["metadata"]
        meta["name"] = kust.get("namePrefix", "") + meta["name"] + kust.get("nameSuffix", "")
    for label in kust.get("labels", []):
        for doc in docs:
            _set_labels(doc, label["pairs"], label.get("includeSelectors", False))
    for image in kust.get("images", []):
        for container in (c for doc in docs for c in _containers(doc)):
            name, _, _tag = container["image"].partition(":")
            if name == image["name"]:
                new_tag = image.get("newTag", _tag)
                container["image"] = f"{image.get('newName', name)}:{new_tag}"
    return docs


def _apply_patch(patch: Doc, docs: list[Doc]) -> None:
    target = patch["target"]
    ops = yaml.safe_load(patch["patch"])
    assert isinstance(ops, list), "only JSON 6902 patches (a list of ops) are implemented"
    matched = [d for d in docs if d["kind"] == target["kind"]
               and d["metadata"]["name"] == target["name"]]
    assert matched, f"patch target {target} matches nothing"
    for doc in matched:
        for op in ops:
            _json_patch(doc, op)


def _json_patch(doc: Doc, op: Doc) -> None:
    keys = [k.replace("~1", "/").replace("~0", "~") for k in op["path"].split("/")[1:]]
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if isinstance(parent, list):
        if op["op"] == "add":
            parent.insert(len(parent) if last == "-" else int(last), op["value"])
        elif op["op"] == "replace":
            parent[int(last)] = op["value"]
        else:
            del parent[int(last)]
    elif op["op"] in ("add", "replace"):
        assert op["op"] == "add" or last in parent, f"replace of missing {op['path']}"
        parent[last] = op["value"]
    else:
        del parent[last]


def _set_labels(doc: Doc, pairs: dict[str, str], selectors: bool) -> None:
    doc["metadata"].setdefault("labels", {}).update(pairs)
    if not selectors:
        return
    for path, create in _SELECTOR_FIELDS.get(doc["kind"], []):
        node: Any = doc
        for key in path[:-1]:
            if key not in node and not create:
                break
            node = node.setdefault(key, {})
        else:
            if path[-1] in node or create:
                node.setdefault(path[-1], {}).update(pairs)


# -- what there is to render -------------------------------------------------------------

COMMON = K8S / "common"
QUEUE_BUILDS = [K8S / "base", *sorted(p for p in (K8S / "overlays").iterdir() if p.is_dir())]
ALL_BUILDS = [COMMON, *QUEUE_BUILDS]


def _rel(path: Path) -> str:
    return str(path.relative_to(K8S))


@cache
def built(folder: Path) -> tuple[Doc, ...]:
    return tuple(render(folder))


def _containers(doc: Doc) -> list[Doc]:
    pod = _pod_spec(doc)
    return [] if pod is None else [*pod.get("initContainers", []), *pod["containers"]]


def _pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
        spec: Doc = doc["spec"]["template"]["spec"]
        return spec
    return None


@cache
def config() -> dict[str, str]:
    """Return the data of the ConfigMap that every workload reads."""
    maps = [d for d in built(COMMON) if d["kind"] == "ConfigMap"]
    assert [m["metadata"]["name"] for m in maps] == ["streamtasks-config"]
    data: dict[str, str] = maps[0]["data"]
    return data


def _kinds(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _workloads() -> Iterator[tuple[str, Doc]]:
    for folder in ALL_BUILDS:
        for doc in built(folder):
            if _pod_spec(doc) is not None:
                yield _rel(folder), doc


# -- rendering and schemas ---------------------------------------------------------------


def test_every_yaml_file_parses() -> None:
    files = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        docs = _load_yaml_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), f"{path}: no apiVersion / kind"


def test_every_listed_resource_exists_and_every_manifest_is_listed() -> None:
    listed: set[Path] = set()
    for kust_file in K8S.rglob("kustomization.yaml"):
        kust = _kustomization(kust_file.parent)
        for entry in [*kust.get("resources", []), *kust.get("components", [])]:
            path = (kust_file.parent / entry).resolve()
            assert path.exists(), f"{kust_file} lists {entry}, which does not exist"
            listed.add(path)
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    unlisted = {p.name for p in manifests - listed}
    # The Secret template is deliberately not applied: an apply would blank the real one.
    assert unlisted == {"secret.example.yaml"}


@pytest.mark.parametrize("folder", ALL_BUILDS, ids=_rel)
def test_kustomize_renders_what_the_test_renders(folder: Path) -> None:
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(folder)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(folder)]
    else:
        pytest.skip("no kustomize or kubectl here; the other tests use the built-in renderer")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr

    def by_id(docs: Any) -> dict[tuple[str, str], Doc]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    assert by_id(yaml.safe_load_all(done.stdout)) == by_id(built(folder))


def _strict(schema: Any) -> Any:
    """Reject unknown fields where the CRD lists its fields (the API server would prune them)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


_CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda.sh_v1alpha1_scaledobject.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda.sh_v1alpha1_triggerauthentication.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring.coreos.com_v1_servicemonitor.json",
}


@cache
def _crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    schema = json.loads((K8S / "schemas" / _CRD_SCHEMAS[api_version, kind]).read_text())
    return jsonschema.Draft7Validator(_strict(schema))


@pytest.mark.parametrize("folder", ALL_BUILDS, ids=_rel)
def test_manifests_validate_against_the_schemas(folder: Path) -> None:
    docs = built(folder)
    assert docs
    for doc in docs:
        what = f"{_rel(folder)}: {doc['kind']} {doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in _CRD_SCHEMAS:
            errors = list(_crd_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc))
            assert not errors, f"{what}: " + "; ".join(
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = "/".join(map(str, err.absolute_path))
                pytest.fail(f"{what}: {path}: {err.message}")


def test_the_strict_crd_check_catches_a_misspelt_field() -> None:
    scaled = copy.deepcopy(_kinds(built(K8S / "base"), "ScaledObject")[0])
    scaled["spec"]["maxReplicas"] = scaled["spec"].pop("maxReplicaCount")
    assert not _crd_validator("keda.sh/v1alpha1", "ScaledObject").is_valid(scaled)


# -- settings ----------------------------------------------------------------------------

#: Dummy credentials for resolving the $(VAR) references of the pods' env.
_SECRET_VALUES = {"broker-username": "u", "broker-password": "p", "backend-username": "u",
                  "backend-password": "p", "keda-sasl": "none", "keda-tls": "disable"}


def _container_env(container: Doc) -> dict[str, str]:
    """Return the env Kubernetes gives the container: envFrom, then env with $(VAR) expanded."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert source["configMapRef"]["name"] == "streamtasks-config"
        env.update(config())
    for var in container.get("env", []):
        if "value" in var:
            unresolved = [n for n in re.findall(r"\$\((\w+)\)", var["value"]) if n not in env]
            assert not unresolved, f"{var['name']} refers to undefined {unresolved}"
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], var["value"])
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "streamtasks-credentials"
            env[var["name"]] = _SECRET_VALUES[ref["key"]]
    return env


def _settings_of(container: Doc) -> Settings:
    env = {k: v for k, v in _container_env(container).items() if k.startswith("STREAMTASKS_")}
    return Settings.from_env(env)


def test_the_configmap_holds_production_settings() -> None:
    data = config()
    names = {k.removeprefix("STREAMTASKS_").lower() for k in data if k.startswith("STREAMTASKS_")}
    assert "broker" not in names and "backend" not in names  # composed with the credentials
    # from_env ignores unknown STREAMTASKS_* names, so a misspelt key would go unnoticed.
    assert names <= set(Settings.model_fields), "not a setting"
    settings = Settings.from_env({k: v for k, v in data.items() if k.startswith("STREAMTASKS_")})
    assert settings.replication_factor == 3
    assert settings.min_insync_replicas == 2
    assert settings.consistency == "LOCAL_QUORUM"
    assert settings.log_format == "json"
    assert settings.metrics_port == 9100


@pytest.mark.parametrize("where,workload", list(_workloads()),
                         ids=lambda v: v if isinstance(v, str) else v["metadata"]["name"])
def test_every_workload_gets_working_urls_and_settings(where: str, workload: Doc) -> None:
    for container in _containers(workload):
        settings = _settings_of(container)  # validates every STREAMTASKS_* value
        broker = parse_url(settings.broker, "broker")
        assert broker.scheme == "kafka"
        assert len(broker.hosts) == 3
        assert broker.options["sasl.password"] == "p"
        backend = CassandraOptions.from_url(settings.backend, settings)  # known options only
        assert backend.replication_factor == 3 and backend.password == "p"
        assert backend.consistency == "LOCAL_QUORUM"
        assert backend.serial_consistency == "LOCAL_SERIAL"


# -- workload invariants -----------------------------------------------------------------


def _deployments() -> Iterator[tuple[Path, Doc]]:
    for folder in QUEUE_BUILDS:
        for doc in _kinds(built(folder), "Deployment"):
            yield folder, doc


_DEPLOYMENT_IDS = [f"{_rel(f)}:{d['metadata']['name']}" for f, d in _deployments()]


@pytest.mark.parametrize("folder,deployment", list(_deployments()), ids=_DEPLOYMENT_IDS)
def test_every_deployment_probes_the_metrics_port(folder: Path, deployment: Doc) -> None:
    port = int(config()["STREAMTASKS_METRICS_PORT"])
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports.get("metrics") == port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == port, probe
    flag = _flag(container["args"], "--metrics-port")
    assert flag is None or int(flag) == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port


@pytest.mark.parametrize("folder,deployment", list(_deployments()), ids=_DEPLOYMENT_IDS)
def test_every_deployment_outlasts_the_drain_and_runs_locked_down(
    folder: Path, deployment: Doc
) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    grace_s = _settings_of(container).shutdown_grace_s
    # The drain waits grace_s for running tasks, then commits and leaves the group.
    assert pod["terminationGracePeriodSeconds"] >= grace_s + 10
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]
    if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == "worker":
        assert "replicas" not in deployment["spec"], "KEDA owns the workers' replica count"


def _queue_of(deployment: Doc) -> str:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    queues = _flag(container["args"], "--queues")
    assert queues and "," not in queues, "one Deployment (and one ScaledObject) per queue"
    return queues


@pytest.mark.parametrize("folder", QUEUE_BUILDS, ids=_rel)
def test_the_scaledobject_watches_the_group_and_topic_of_its_queue(folder: Path) -> None:
    docs = built(folder)
    data = config()
    deployments = {d["metadata"]["name"]: d for d in _kinds(docs, "Deployment")}
    workers = [d for d in deployments.values()
               if d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "worker"]
    (scaled,) = _kinds(docs, "ScaledObject")
    (worker,) = workers
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    queue = _queue_of(worker)
    name = f"{data['STREAMTASKS_NAMESPACE']}.{queue}"
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["consumerGroup"] == name
    assert meta["topic"] == name
    assert meta["allowIdleConsumers"] == "false"
    assert meta["offsetResetPolicy"] == "earliest"  # as the workers' auto.offset.reset
    assert int(meta["lagThreshold"]) > 0
    assert meta["bootstrapServersFromEnv"] in _container_env(
        worker["spec"]["template"]["spec"]["containers"][0])
    assert scaled["spec"]["maxReplicaCount"] <= int(data["STREAMTASKS_PARTITIONS"])
    assert scaled["spec"]["minReplicaCount"] >= 1 or any(
        d["spec"]["template"]["spec"]["containers"][0]["args"][0] == "delayer"
        for d in deployments.values()), "idle workers scaled to zero would forward no delays"
    auth = scaled["spec"]["triggers"][0]["authenticationRef"]["name"]
    assert auth in {d["metadata"]["name"] for d in _kinds(built(COMMON), "TriggerAuthentication")}


# The Kafka scaler's metadata keys (KEDA pkg/scalers/kafka_scaler.go, kafkaMetadata).
_KAFKA_SCALER_KEYS = {
    "bootstrapServers", "bootstrapServersFromEnv", "consumerGroup", "consumerGroupFromEnv",
    "topic", "topicFromEnv", "partitionLimitation", "lagThreshold", "activationLagThreshold",
    "offsetResetPolicy", "allowIdleConsumers", "excludePersistentLag",
    "scaleToZeroOnInvalidOffset", "limitToPartitionsWithLag",
    "ensureEvenDistributionOfPartitions", "version", "tls", "unsafeSsl", "sasl",
    "saslTokenProvider", "awsRegion",
}


@pytest.mark.parametrize("folder", QUEUE_BUILDS, ids=_rel)
def test_the_kafka_trigger_names_only_keys_the_scaler_knows(folder: Path) -> None:
    for scaled in _kinds(built(folder), "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            assert set(trigger["metadata"]) <= _KAFKA_SCALER_KEYS
            assert all(isinstance(v, str) for v in trigger["metadata"].values())


@pytest.mark.parametrize("folder", QUEUE_BUILDS, ids=_rel)
def test_every_object_of_a_queue_names_the_same_queue(folder: Path) -> None:
    docs = built(folder)
    (worker,) = [d for d in _kinds(docs, "Deployment")
                 if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]
    queue = _queue_of(worker)
    for doc in docs:
        assert doc["metadata"]["labels"]["streamtasks.io/queue"] == queue, doc["metadata"]
        if doc["kind"] == "Deployment":
            assert _queue_of(doc) == queue
            assert doc["spec"]["template"]["metadata"]["labels"]["streamtasks.io/queue"] == queue
        if doc["kind"] == "Job":
            assert _flag(doc["spec"]["template"]["spec"]["containers"][0]["args"],
                         "--queue") == queue
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    (pdb,) = _kinds(docs, "PodDisruptionBudget")
    (service,) = _kinds(docs, "Service")
    (monitor,) = _kinds(docs, "ServiceMonitor")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"][
        "labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {
        p["name"] for p in service["spec"]["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_the_queue_builds_never_share_an_object_name() -> None:
    seen: dict[tuple[str, str], str] = {}
    for folder in ALL_BUILDS:
        for doc in built(folder):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in seen, f"{key} in both {seen[key]} and {_rel(folder)}"
            seen[key] = _rel(folder)


def test_the_jobs_migrate_and_create_topics() -> None:
    commands = [c["args"][:2] for _, d in _workloads() if d["kind"] == "Job"
                for c in _containers(d)]
    assert ["migrate"] in [c[:1] for c in commands]
    assert ["topics", "create"] in commands


# -- secrets -----------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|USERNAME|CREDENTIAL", re.IGNORECASE)
_SECRET_IN_URL = re.compile(r"(password|sasl\.jaas\.config|secret)=(?!\$\(|&|\"|$)",
                            re.IGNORECASE)


def test_no_literal_secrets() -> None:
    for folder in ALL_BUILDS:
        for doc in built(folder):
            assert doc["kind"] != "Secret", f"{_rel(folder)} would apply a Secret"
            for container in _containers(doc):
                for var in container.get("env", []):
                    if _SECRET_NAME.search(var["name"]):
                        assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]
                    assert not _SECRET_IN_URL.search(var.get("value", "")), var["name"]
    for key, value in config().items():
        assert not _SECRET_NAME.search(key), key
        assert not _SECRET_IN_URL.search(value) and "password" not in value.lower(), key
    (example,) = _load_yaml_docs(K8S / "common" / "secret.example.yaml")
    assert example["kind"] == "Secret"
    for key, value in example["stringData"].items():
        if _SECRET_NAME.search(key):
            assert value == "", f"secret.example.yaml: {key} must stay empty"
    used = {var["valueFrom"]["secretKeyRef"]["key"]
            for _, d in _workloads() for c in _containers(d) for var in c.get("env", [])
            if "valueFrom" in var}
    auth = {ref["key"] for d in _kinds(built(COMMON), "TriggerAuthentication")
            for ref in d["spec"]["secretTargetRef"]}
    assert used | auth <= set(example["stringData"]), "the template lacks a key the pods read"


# -- docker ------------------------------------------------------------------------------


def test_the_dockerfile_builds_a_slim_non_root_image() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(stages) >= 2 and all(s.startswith("python:3.11-slim") for s in stages)
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^ENTRYPOINT\s+\[\"streamtasks\"\]", text, re.MULTILINE)
    assert "pip install" in text
    # The build context is an allow-list: nothing else (local data, .env files) is sent.
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"
    copied = [source for line in re.findall(r"^COPY\s+(?!--from)(.+)$", text, re.MULTILINE)
              for source in line.split()[:-1]]
    assert {f"!{c.rstrip('/')}" for c in copied} <= set(ignore)


def test_compose_runs_a_worker_that_prometheus_scrapes() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "cassandra", "migrate", "worker", "prometheus"} <= set(services)
    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (DOCKER / worker["build"]["context"] / worker["build"]["dockerfile"]).is_file()
    port = _flag(worker["command"], "--metrics-port")
    assert port is not None
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert f"worker:{port}" in targets
    for name in ("migrate", "worker"):
        env = services[name]["environment"]
        assert env["STREAMTASKS_BROKER"].startswith("kafka://kafka:")
        assert env["STREAMTASKS_BACKEND"].startswith("cassandra://cassandra:9042/")
