"""The kustomize configuration renders with `kubectl kustomize` and every object is a valid
Kubernetes object for the oldest and newest supported versions."""

from __future__ import annotations

import pytest
import yaml

from support import ROOT, SKIPPED_KINDS, find, one, validate_objects


@pytest.mark.parametrize("directory", ["config/default", "config/crd", "config/rbac", "config/manager"])
def test_kustomization_renders_valid_objects(directory, kustomized):
    objects = kustomized(directory)
    assert objects, f"{directory} rendered nothing"
    skipped = validate_objects(objects, directory)
    assert not skipped


def test_default_composes_crds_rbac_and_the_operator(kustomized):
    objects = kustomized("config/default")
    assert {o["metadata"]["name"] for o in find(objects, "CustomResourceDefinition")} == {
        "destinations.backflow.dev", "reversesyncs.backflow.dev"}
    assert {o["metadata"]["name"] for o in find(objects, "ClusterRole")} == {"backflow-operator", "backflow-run", "backflow-data-team"}
    deployment = one(objects, "Deployment", "backflow-operator")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "backflow-operator"
    [container] = pod["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "--job-service-account=backflow-run" in container["args"]
    assert "--secret-access=granted" in container["args"]
    for o in objects:
        assert o["metadata"].get("namespace") in (None, "backflow-system"), o["metadata"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "backflow"
    crds = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml")}
    for crd in find(objects, "CustomResourceDefinition"):
        generated = crds[crd["metadata"]["name"] + ".yaml"]
        labels = crd["metadata"].pop("labels")
        assert labels == {"app.kubernetes.io/part-of": "backflow"}
        assert crd == generated, "config/crd differs from crds/: run `make crds`"


def test_prometheus_renders_and_only_prometheus_operator_kinds_are_skipped(kustomized):
    objects = kustomized("config/prometheus")
    assert validate_objects(objects, "config/prometheus") == set(SKIPPED_KINDS)
