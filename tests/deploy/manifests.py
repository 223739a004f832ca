"""Rendering the kustomizations and validating what they render.

Built-in kinds are checked by `kubernetes-validate` (the API's own OpenAPI schemas, strict:
unknown fields are errors), KEDA's kinds by the openAPIV3Schema of KEDA's CRDs kept in
tests/data/keda/, closed the same way (kubectl's default field validation is Strict).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from consumer.settings import REPO_ROOT

K8S_DIR = REPO_ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = {"base": K8S_DIR / "base", "example": K8S_DIR / "overlays" / "example"}
KEDA_CRDS_DIR = REPO_ROOT / "tests" / "data" / "keda"
# The oldest Kubernetes the manifests claim (the preStop `sleep` action needs 1.30), among
# the schemas kubernetes-validate bundles.
KUBE_VERSION = "1.32"
# kubectl <= 1.20 embeds kustomize v2.0.3: no `resources:` folders, no `patches:`.
MIN_KUBECTL_MINOR = 21

Obj = dict[str, Any]


def kubectl() -> str:
    """The kubectl on PATH, or a skip saying why the manifests cannot be rendered."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubernetes-client)")
    version = _run([path, "version", "--client", "-o", "json"])
    minor = int(re.sub(r"\D.*", "", json.loads(version)["clientVersion"]["minor"]) or 0)
    if minor < MIN_KUBECTL_MINOR:
        pytest.skip(f"kubectl 1.{minor} embeds kustomize v2, too old for these kustomizations")
    return path


def render(kubectl_path: str, directory: Path) -> list[Obj]:
    """`kubectl kustomize directory`, parsed."""
    return list(yaml.safe_load_all(_run([kubectl_path, "kustomize", str(directory)])))


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603
    assert done.returncode == 0, f"{' '.join(argv)} failed:\n{done.stderr}"
    return done.stdout


def validate(obj: Obj) -> None:
    """Raise jsonschema.ValidationError unless `obj` matches its kind's schema."""
    group = obj["apiVersion"].partition("/")[0]
    if group == "keda.sh":
        keda_validator(obj["kind"]).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@functools.cache
def keda_validator(kind: str) -> jsonschema.Draft4Validator:
    """A validator for a KEDA kind, from its CRD's v1alpha1 schema."""
    (path,) = [p for p in KEDA_CRDS_DIR.glob("*.yaml") if _crd_kind(p) == kind]
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return jsonschema.Draft4Validator(closed(version["schema"]["openAPIV3Schema"]))


def _crd_kind(path: Path) -> str:
    return str(yaml.safe_load(path.read_text(encoding="utf-8"))["spec"]["names"]["kind"])


def closed(schema: Obj) -> Obj:
    """`schema` with unknown fields rejected wherever it lists the known ones."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [closed(sub) for sub in out[key]]
    return out


def find(objects: list[Obj], kind: str, name: str | None = None) -> list[Obj]:
    """The objects of `kind` (named `name`, when given)."""
    return [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(objects: list[Obj], kind: str, name: str) -> Obj:
    (found,) = find(objects, kind, name)
    return found


def container(deployment: Obj, name: str) -> Obj:
    (found,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    return found


def env_values(container_spec: Obj) -> dict[str, str]:
    """The container's literal env values (secret references left out)."""
    return {e["name"]: e["value"] for e in container_spec.get("env", []) if "value" in e}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def pod_labels(deployment: Obj) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])
