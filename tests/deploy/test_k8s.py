"""The Kubernetes manifests (deploy/k8s): both kustomizations render, every object matches
its schema, and the objects keep the promises the service relies on."""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import SecretStr

from consumer.settings import REPO_ROOT, Settings, is_loopback
from consumer.sidecar import SidecarDeps, build_app
from consumer.topology import Topology
from consumer.workflows import StyleCatalog
from tests.deploy.manifests import (
    KUSTOMIZATIONS,
    Obj,
    container,
    env_values,
    find,
    kubectl,
    one,
    pod_labels,
    render,
    selects,
    validate,
)

CONSUMER, GPU_FLEET = "style-consumer", "comfyui-gpu"
SECRET_SETTINGS = {
    name.upper()
    for name, field in Settings.model_fields.items()
    if SecretStr in (field.annotation, *getattr(field.annotation, "__args__", ()))
}
EXPECTED_KINDS = Counter(
    ConfigMap=1,
    Deployment=2,
    PersistentVolumeClaim=2,
    PodDisruptionBudget=2,
    ScaledObject=2,
    Service=2,
    TriggerAuthentication=1,
)
CREDENTIALS_IN_URL = re.compile(r"://[^/@\s]+:[^/@\s]+@")


@pytest.fixture(scope="module")
def renders() -> dict[str, list[Obj]]:
    path = kubectl()
    return {name: render(path, directory) for name, directory in KUSTOMIZATIONS.items()}


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def objects(request: pytest.FixtureRequest, renders: dict[str, list[Obj]]) -> list[Obj]:
    return copy.deepcopy(renders[request.param])


@pytest.fixture
def base(renders: dict[str, list[Obj]]) -> list[Obj]:
    return copy.deepcopy(renders["base"])


def consumer(objects: list[Obj]) -> Obj:
    return container(one(objects, "Deployment", CONSUMER), "consumer")


def consumer_env(objects: list[Obj]) -> dict[str, str]:
    return env_values(consumer(objects))


def scaled_object_for(objects: list[Obj], deployment: str) -> Obj:
    (found,) = [
        o
        for o in find(objects, "ScaledObject")
        if o["spec"]["scaleTargetRef"]["name"] == deployment
    ]
    return found


def transform_queues(objects: list[Obj]) -> set[str]:
    """The queues holding transform work, named from the consumer's AMQP_PREFIX."""
    topology = Topology(consumer_env(objects).get("AMQP_PREFIX", "style"))
    return {topology.transform, topology.bulk}


# Schemas


def test_every_object_matches_its_schema(objects):
    """Built-in kinds match Kubernetes' strict schemas, KEDA's kinds KEDA's CRDs."""
    errors = []
    for obj in objects:
        try:
            validate(obj)
        except jsonschema.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} at {path}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_every_piece_is_rendered_and_no_secret_value(objects):
    """Both workloads and what they need are there; a Secret is never part of the manifests."""
    assert Counter(o["kind"] for o in objects if o["kind"] != "Namespace") == EXPECTED_KINDS


def _set(obj: Obj, path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for key in parents:
        obj = obj[int(key)] if isinstance(obj, list) else obj[key]
    obj[last] = value


BROKEN = {
    "port-as-word": ("Deployment", "spec.template.spec.containers.0.ports.0.containerPort", "http"),
    "unknown-container-field": ("Deployment", "spec.template.spec.containers.0.imagePolicy", "x"),
    "replicas-as-text": ("ScaledObject", "spec.minReplicaCount", "1"),
    "unknown-scaledobject-field": ("ScaledObject", "spec.minReplicas", 1),
    "trigger-value-as-number": ("ScaledObject", "spec.triggers.0.metadata.value", 4),
    "auth-without-secret-name": ("TriggerAuthentication", "spec.secretTargetRef.0.name", None),
}


@pytest.mark.parametrize(("kind", "path", "value"), BROKEN.values(), ids=BROKEN.keys())
def test_validation_rejects_a_broken_object(base, kind, path, value):
    """The validators are live: one wrong field in a rendered object fails them."""
    obj = find(base, kind)[0]
    validate(obj)
    _set(obj, path, value)
    with pytest.raises(jsonschema.ValidationError):
        validate(obj)


# The consumer


def test_stop_outlasts_the_shutdown_drain(objects):
    """The kubelet waits for the preStop pause plus SHUTDOWN_GRACE_S before it kills."""
    pod = one(objects, "Deployment", CONSUMER)["spec"]["template"]["spec"]
    grace_s = float(consumer_env(objects).get("SHUTDOWN_GRACE_S", Settings().shutdown_grace_s))
    pre_stop = consumer(objects)["lifecycle"]["preStop"]
    pause_s = pre_stop["sleep"]["seconds"] if "sleep" in pre_stop else 0
    assert pod["terminationGracePeriodSeconds"] > pause_s + grace_s


def test_consumer_runs_locked_down(objects):
    """Non-root (a numeric uid the kubelet can check), read-only root, no capabilities."""
    pod = one(objects, "Deployment", CONSUMER)["spec"]["template"]["spec"]
    pod_ctx, ctx = pod["securityContext"], consumer(objects)["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True
    assert isinstance(pod_ctx["runAsUser"], int)
    assert pod_ctx["runAsUser"] > 0
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert pod["automountServiceAccountToken"] is False


def test_writable_paths_are_volumes(objects):
    """With a read-only root, OUTPUT_DIR and /tmp are writable mounts; workflows are not."""
    mounts = {m["mountPath"]: m.get("readOnly", False) for m in consumer(objects)["volumeMounts"]}
    env = consumer_env(objects)
    assert mounts[env["OUTPUT_DIR"]] is False
    assert mounts["/tmp"] is False
    assert mounts[env["WORKFLOWS_DIR"]] is True


def test_probes_ask_the_sidecar(objects):
    """Liveness asks /healthz, readiness /readyz, on the port the sidecar listens on."""
    spec, env = consumer(objects), consumer_env(objects)
    routes = {r.canonical for r in build_app(SidecarDeps(None, None, None)).router.resources()}  # type: ignore[arg-type]
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert not is_loopback(env["SIDECAR_HOST"])
    for probe, path in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
        get = spec[probe]["httpGet"]
        assert get["path"] == path
        assert path in routes
        assert ports.get(get["port"], get["port"]) == int(env["SIDECAR_PORT"])


def test_secrets_are_referenced_not_inlined(objects):
    """AMQP_URL, REDIS_URL and SIDECAR_TOKEN come from a Secret; no value carries a password."""
    env = {e["name"]: e for e in consumer(objects)["env"]}
    for name in ("AMQP_URL", "REDIS_URL", "SIDECAR_TOKEN"):
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    for name in SECRET_SETTINGS & env.keys():
        assert "value" not in env[name], name
    assert not [v for v in consumer_env(objects).values() if CREDENTIALS_IN_URL.search(v)]
    assert not find(objects, "Secret")


def test_env_builds_the_settings(objects):
    """Every variable is a setting, and with the secrets filled in they make valid Settings."""
    env = consumer_env(objects)
    assert set(env) <= {name.upper() for name in Settings.model_fields}
    secrets = {"amqp_url": "amqp://x", "redis_url": "redis://x", "sidecar_token": "t" * 32}
    settings = Settings(**{k.lower(): v for k, v in env.items()}, **secrets)
    assert settings.state_backend == "redis"
    assert settings.instances()


def test_memory_limit_holds_the_decode_budget(objects):
    """A replica may decode IMAGE_DECODE_BUDGET_BYTES of pixels at once: the limit is above."""
    limit = consumer(objects)["resources"]["limits"]["memory"]
    assert limit.endswith("Mi")
    budget = Settings().image_decode_budget_bytes
    assert int(limit.removesuffix("Mi")) * 1024 * 1024 > budget


def test_workflows_configmap_loads_as_the_catalog(objects, tmp_path):
    """The ConfigMap, laid out as the kubelet mounts it, is the repo's workflows/ exactly."""
    deployment = one(objects, "Deployment", CONSUMER)
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "workflows"
    ]
    data = one(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    for item in volume["configMap"]["items"]:
        (tmp_path / item["path"]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / item["path"]).write_text(data[item["key"]], encoding="utf-8")
    assert _tree(tmp_path) == _tree(REPO_ROOT / "workflows", skip={"kustomization.yaml"})
    shipped = StyleCatalog.load(REPO_ROOT / "workflows").names()
    assert StyleCatalog.load(tmp_path).names() == shipped


def _tree(root: Path, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text(encoding="utf-8")
        for p in root.rglob("*")
        if p.is_file() and p.name not in skip
    }


# Disruptions and scaling


def test_each_deployment_has_a_disruption_budget(objects):
    """A drain takes one pod at a time, and never blocks on the minimum replica count."""
    for deployment in find(objects, "Deployment"):
        labels = pod_labels(deployment)
        (pdb,) = [
            p
            for p in find(objects, "PodDisruptionBudget")
            if selects(p["spec"]["selector"]["matchLabels"], labels)
        ]
        floor = scaled_object_for(objects, deployment["metadata"]["name"])["spec"][
            "minReplicaCount"
        ]
        assert pdb["spec"].get("maxUnavailable", 0) >= 1 or pdb["spec"]["minAvailable"] < floor


def test_keda_owns_the_replica_counts(objects):
    """Each Deployment has one ScaledObject and no `replicas:` of its own to fight it."""
    deployments = {d["metadata"]["name"]: d for d in find(objects, "Deployment")}
    for scaled in find(objects, "ScaledObject"):
        ref = scaled["spec"]["scaleTargetRef"]
        assert ref.get("kind", "Deployment") == "Deployment"
        assert "replicas" not in deployments[ref["name"]]["spec"]
        assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    targets = [s["spec"]["scaleTargetRef"]["name"] for s in find(objects, "ScaledObject")]
    assert sorted(targets) == sorted(deployments)


@pytest.mark.parametrize("deployment", [CONSUMER, GPU_FLEET])
def test_scaling_follows_the_transform_queues(objects, deployment):
    """Consumers and GPUs scale on the sum of the transform queues named from AMQP_PREFIX."""
    spec = scaled_object_for(objects, deployment)["spec"]
    triggers = spec["triggers"]
    assert {t["type"] for t in triggers} == {"rabbitmq"}
    assert {t["metadata"]["queueName"] for t in triggers} == transform_queues(objects)
    assert {t["metadata"]["protocol"] for t in triggers} == {"http"}  # counts unacked tasks
    assert {t["metadata"]["mode"] for t in triggers} == {"QueueLength"}
    assert all(float(t["metadata"]["value"]) > 0 for t in triggers)  # KEDA needs mode and value
    names = {t["name"] for t in triggers}
    modifiers = spec["advanced"]["scalingModifiers"]
    assert set(re.findall(r"[A-Za-z_]\w*", modifiers["formula"])) == names
    assert float(modifiers["target"]) > 0


def test_triggers_authenticate_from_the_consumer_secret(objects):
    """KEDA reads the broker through a TriggerAuthentication on the consumer's Secret."""
    secrets = {
        e["valueFrom"]["secretKeyRef"]["name"] for e in consumer(objects)["env"] if "valueFrom" in e
    }
    for scaled in find(objects, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
            refs = auth["spec"]["secretTargetRef"]
            assert {r["parameter"] for r in refs} == {"host"}
            assert {r["name"] for r in refs} <= secrets


def test_gpu_fleet_is_reachable_by_its_headless_service(objects):
    """ComfyUI pods get a GPU each; COMFYUI_INSTANCES names the headless Service and port."""
    fleet = one(objects, "Deployment", GPU_FLEET)
    (gpu_container,) = fleet["spec"]["template"]["spec"]["containers"]
    assert int(gpu_container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    service = one(objects, "Service", GPU_FLEET)
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], pod_labels(fleet))
    namespace = fleet["metadata"].get("namespace")
    for instance in Settings(sidecar_token="t" * 32, **_instances(objects)).instances():
        host, _, port = instance.url.removeprefix("http://").partition(":")
        name, *domain = host.split(".")
        assert name == GPU_FLEET
        assert domain in ([], [namespace, "svc", "cluster", "local"])
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def _instances(objects: list[Obj]) -> dict[str, str]:
    return {"comfyui_instances": consumer_env(objects)["COMFYUI_INSTANCES"]}


# The example overlay


def test_example_overlay_pins_namespace_and_images(renders):
    """Everything lands in one namespace, and every image has a tag."""
    objects = renders["example"]
    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"style"}
    assert one(objects, "Namespace", "style")
    images = [
        c["image"]
        for d in find(objects, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
    ]
    assert all(re.fullmatch(r"[\w./-]+:[\w.-]+", image) for image in images), images
    assert not [image for image in images if image.endswith(":latest")]
