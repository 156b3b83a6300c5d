"""Every sample in config/samples and every Destination/ReverseSync in the docs' YAML blocks is
valid against the CRD's own openAPIV3Schema, the way the API server checks it at apply time
(unknown fields refused, as `kubectl apply` does with its default strict field validation).
The CEL rules (x-kubernetes-validations) are not evaluated here: tests/samples.rs and the Rust
validation cover them."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from support import ROOT, load_yaml_docs

API_VERSION = "backflow.dev/v1alpha1"


def to_json_schema(node):
    """The structural OpenAPI v3 schema as JSON Schema: `nullable` allows null, objects with
    declared properties refuse others (unless x-kubernetes-preserve-unknown-fields),
    int-or-string becomes anyOf, other x-kubernetes-* keys are dropped."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = out["enum"] + [None]
    return out


def crd_validators():
    validators = {}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        schema = to_json_schema(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
        # The API server adds the object's own fields to every CRD schema.
        schema["properties"].setdefault("apiVersion", {"type": "string"})
        schema["properties"].setdefault("kind", {"type": "string"})
        schema["properties"].setdefault("metadata", {"type": "object"})
        jsonschema.Draft7Validator.check_schema(schema)
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


VALIDATORS = crd_validators()


def sample_documents():
    for path in sorted((ROOT / "config" / "samples").glob("*.yaml")):
        for i, doc in enumerate(load_yaml_docs(path.read_text())):
            yield f"{path.relative_to(ROOT)} (document {i + 1})", doc


def docs_documents():
    files = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
    for path in files:
        text = path.read_text()
        for block in re.finditer(r"^```ya?ml\n(.*?)^```", text, re.S | re.M):
            line = text[: block.start()].count("\n") + 1
            try:
                docs = load_yaml_docs(block.group(1))
            except yaml.YAMLError as e:
                raise AssertionError(f"{path.relative_to(ROOT)}:{line}: YAML block does not parse: {e}") from None
            for i, doc in enumerate(docs):
                if isinstance(doc, dict) and doc.get("kind") in VALIDATORS:
                    yield f"{path.relative_to(ROOT)}:{line} (document {i + 1})", doc


def check(where, doc):
    assert doc.get("apiVersion") == API_VERSION, f"{where}: apiVersion {doc.get('apiVersion')!r}"
    errors = sorted(VALIDATORS[doc["kind"]].iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{where}: {doc['kind']} {doc['metadata'].get('name')} is invalid:\n  " + "\n  ".join(
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in errors)


SAMPLES = [(w, d) for w, d in sample_documents() if d.get("kind") in VALIDATORS]
DOCS = list(docs_documents())


@pytest.mark.parametrize("where,doc", SAMPLES, ids=[w for w, _ in SAMPLES])
def test_sample_matches_the_crd_schema(where, doc):
    check(where, doc)


@pytest.mark.parametrize("where,doc", DOCS, ids=[w for w, _ in DOCS])
def test_docs_example_matches_the_crd_schema(where, doc):
    check(where, doc)


def test_there_are_samples_for_http_and_hubspot_with_their_secrets():
    kinds = {}
    for where, doc in sample_documents():
        kinds.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    assert {"webhook", "hubspot"} <= kinds["Destination"]
    assert {"warehouse", "webhook-token", "hubspot-token"} <= kinds["Secret"]
    assert len(kinds["ReverseSync"]) >= 3
    assert len(DOCS) >= 10, f"only {len(DOCS)} documented manifests found"


def test_the_schema_check_refuses_mistakes():
    good = next(d for w, d in SAMPLES if d["kind"] == "ReverseSync")
    typo = copy.deepcopy(good)
    typo["spec"]["shedule"] = typo["spec"].pop("schedule")
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["suspend"] = "yes"
    bad_enum = copy.deepcopy(good)
    bad_enum["spec"]["mode"] = "sometimes"
    for bad in (typo, wrong_type, bad_enum):
        with pytest.raises(AssertionError):
            check("mutated sample", bad)


GRANT = "backflow.dev/allowed-references"


def grants(annotation, kind, name):
    """The operator's rule (src/controller/resolve.rs): `Kind/name` entries separated by commas
    or spaces, kind case-insensitive, either may be `*`."""
    for entry in re.split(r"[,\s]+", annotation or ""):
        if "/" not in entry:
            continue
        k, n = entry.split("/", 1)
        if (k == "*" or k.lower() == kind.lower()) and (n == "*" or n == name):
            return True
    return False


def manifest_sets():
    """Manifests shipped together: config/samples, the quick start, each docs page."""
    yield "config/samples", [d for _, d in sample_documents()]
    quickstart = ROOT / "examples" / "quickstart"
    yield "examples/quickstart", [d for p in sorted(quickstart.glob("*.yaml")) for d in load_yaml_docs(p.read_text())]
    for path in sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]:
        docs = []
        for block in re.finditer(r"^```ya?ml\n(.*?)^```", path.read_text(), re.S | re.M):
            docs += [d for d in load_yaml_docs(block.group(1)) if isinstance(d, dict)]
        yield str(path.relative_to(ROOT)), docs


def test_every_shipped_secret_grants_the_objects_that_use_it():
    checked = 0
    for where, docs in manifest_sets():
        secrets = {d["metadata"]["name"]: (d["metadata"].get("annotations") or {}).get(GRANT)
                   for d in docs if d.get("kind") == "Secret"}
        for d in docs:
            spec, name = d.get("spec") or {}, d.get("metadata", {}).get("name")
            refs = []
            if d.get("kind") == "Destination":
                refs = [("Destination", spec.get("credentialsSecretRef"))]
            elif d.get("kind") == "ReverseSync":
                refs = [("ReverseSync", (spec.get("source") or {}).get("connectionSecretRef")),
                        ("ReverseSync", (spec.get("state") or {}).get("connectionSecretRef"))]
            for kind, ref in refs:
                if not ref or ref["name"] not in secrets:
                    continue
                checked += 1
                assert grants(secrets[ref["name"]], kind, name), (
                    f"{where}: Secret {ref['name']} does not grant {kind}/{name} ({GRANT})")
    assert checked >= 10, f"only {checked} Secret references checked"
