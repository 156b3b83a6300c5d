"""Shared helpers of the chart checks: paths, YAML, Helm rendering, Kubernetes validation."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "backflow"
RELEASE = "backflow"
NAMESPACE = "backflow-system"

# Kinds that kubernetes-validate has no schema for, each with why it is fine to skip. Any other
# kind without a schema fails the check.
SKIPPED_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Prometheus Operator CRD",
}


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    """Every non-empty document of a YAML stream."""
    return [d for d in yaml.safe_load_all(text) if d]


def kube_versions() -> list[str]:
    """The oldest Kubernetes version the chart claims (Chart.yaml kubeVersion) and the newest
    kubernetes-validate ships."""
    import kubernetes_validate.utils as kv

    claim = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    m = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", claim)
    assert m, f"Chart.yaml kubeVersion {claim!r} is not of the form >=X.Y.Z-0"
    return [m.group(1) + ".0", kv.latest_version()]


def describe(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    name = f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))
    return f"{obj.get('apiVersion')} {obj.get('kind')} {name}"


def validate_objects(objects: Iterable[dict[str, Any]], origin: str) -> set[tuple[str, str]]:
    """Validates every object against the Kubernetes schemas (strict: unknown fields fail) of
    each version of kube_versions(). Returns the kinds skipped; raises with every problem."""
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    problems: list[str] = []
    skipped: set[tuple[str, str]] = set()
    for obj in objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key in SKIPPED_KINDS:
            skipped.add(key)
            continue
        for version in kube_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path) or "(root)"
                problems.append(f"{origin}: {describe(obj)}: Kubernetes {version}: {path}: {e.message}")
            except SchemaNotFoundError as e:
                problems.append(f"{origin}: {describe(obj)}: {e.message} (add it to SKIPPED_KINDS if that is expected)")
    assert not problems, "invalid objects:\n  " + "\n  ".join(problems)
    return skipped


@functools.lru_cache(maxsize=None)
def chart():
    import helm_python as helm

    return helm.Chart.load(str(CHART))


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / "ci" / name).read_text()) or {}


def render(values: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], str]:
    """Renders the chart as `helm install backflow -n backflow-system` would; returns the
    objects and NOTES.txt."""
    manifests = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        try:
            objects.extend(load_yaml_docs(text))
        except yaml.YAMLError as e:
            raise AssertionError(f"{path} rendered invalid YAML: {e}\n{text}") from None
    return objects, notes


def kustomize(directory: str) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed."""
    result = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return load_yaml_docs(result.stdout)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[describe(o) for o in found]}"
    return found[0]
