"""The Helm chart, rendered and linted by Helm's own library (helm-python-sdk), every object
validated against the Kubernetes schemas of the oldest and newest supported versions."""

from __future__ import annotations

import json

import pytest
import yaml

import helm_python as helm
from support import (
    CHART, NAMESPACE, ROOT, SKIPPED_KINDS, chart, find, kube_versions, load_yaml_docs, one,
    render, validate_objects, values_file,
)

CASES = {
    "defaults": {},
    "all-on": values_file("all-on-values.yaml"),
    "watch-namespaces": values_file("watch-namespaces-values.yaml"),
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}


def args_of(objects):
    deployment = one(objects, "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container["args"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kube_version", kube_versions())
def test_chart_lints_clean(case, kube_version):
    report = helm.lint(str(CHART), CASES[case], strict=True, namespace=NAMESPACE,
                       kube_version=f"v{kube_version}")
    problems = [f"{m['path']}: {m['error']}" for m in report["messages"] if m["severity"] >= 2]
    problems += report["errors"]
    assert not problems, f"helm lint ({case}, Kubernetes {kube_version}):\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_rendered_objects_are_valid_kubernetes_objects(case):
    objects, _ = render(CASES[case])
    assert objects, "nothing rendered"
    skipped = validate_objects(objects, f"chart ({case})")
    if case == "all-on":
        assert skipped == set(SKIPPED_KINDS), f"expected to skip exactly {set(SKIPPED_KINDS)}"


def test_defaults_are_safe():
    objects, _ = render()
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert deployment["spec"]["replicas"] == 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert "BACKFLOW_LOG" in env
    args = args_of(objects)
    assert args[0] == "operator"
    assert "--listen=0.0.0.0:8080" in args
    assert not any(a.startswith(("--leader-election", "--watch-namespace")) for a in args)
    assert "--job-service-account=backflow-run" in args
    assert "--secret-access=granted" in args, "Secrets are used only where they grant it"
    job_resources = next(a for a in args if a.startswith("--job-resources="))
    assert json.loads(job_resources.split("=", 1)[1])["limits"]["memory"] == "1Gi"
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    kinds = {o["kind"] for o in objects}
    for off in ["PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "ConfigMap"]:
        assert off not in kinds, f"{off} must be off by default"
    assert not find(objects, "Role", "backflow-leader-election")
    # Least privilege by default: Secrets by name only, no watch; Job pods as the operator says.
    secrets = [r for r in one(objects, "ClusterRole", "backflow")["rules"] if r["resources"] == ["secrets"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert "--watch-secrets" not in args
    assert "--egress-deny=169.254.0.0/16,fe80::/10,loopback" in args
    assert "--job-tmp-size-limit=4Gi" in args
    assert not any(a.startswith(("--job-allowed-", "--job-allow-placement")) for a in args)
    assert len(find(objects, "NetworkPolicy")) == 2, 'the operator and the run pods each get a NetworkPolicy'


def test_every_option_on():
    objects, notes = render(CASES["all-on"])
    args = args_of(objects)
    assert "--leader-election" in args
    assert "--lease-name=backflow-leader" in args
    assert f"--lease-namespace={NAMESPACE}" in args
    assert "--job-image=registry.example.com/backflow:0.1.0-ci" in args
    assert any(a.startswith("--job-tolerations=") for a in args)
    assert any(a.startswith("--job-node-selector=") for a in args)
    assert "--job-allowed-images=registry.example.com/backflow-tools:0.1.0" in args
    assert "--job-allowed-service-accounts=backflow-run-privileged" in args
    assert "--job-allow-placement" in args
    assert "--job-tmp-size-limit=8Gi" in args
    assert "--watch-secrets" in args
    secrets = [r for r in one(objects, "ClusterRole", "backflow")["rules"] if r["resources"] == ["secrets"]]
    assert secrets[0]["verbs"] == ["get", "list", "watch"]
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    lease = one(objects, "Role", "backflow-leader-election")
    assert lease["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "verbs": ["get", "create", "update", "patch"]}]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rule = one(objects, "PrometheusRule")
    alerts = {r.get("alert") for r in rule["spec"]["groups"][0]["rules"]}
    assert {"BackflowSyncFailing", "BackflowSyncStale", "BackflowSyncRowsRejected",
            "BackflowSyncDeletesHeldBack", "BackflowOperatorDown",
            "BackflowDestinationThrottled"} <= alerts
    dashboard = one(objects, "ConfigMap", "backflow-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert json.loads(dashboard["data"]["backflow.json"]) == json.loads(
        (CHART / "files" / "dashboard.json").read_text())
    assert one(objects, "NetworkPolicy", "backflow")["spec"]["policyTypes"] == ["Ingress", "Egress"]
    run_accounts = {(o["metadata"]["namespace"]) for o in find(objects, "ServiceAccount", "backflow-run")}
    assert run_accounts == {"analytics", "marketing"}
    assert "It was created, with its RBAC, in: analytics, marketing." in notes


OPERATOR_RULES = yaml.safe_load((ROOT / "config" / "rbac" / "role.yaml").read_text())["rules"]
RUN_RULES = yaml.safe_load((ROOT / "config" / "rbac" / "run_role.yaml").read_text())["rules"]


def test_all_namespaces_rbac_is_one_cluster_role_and_run_roles_bound_per_namespace():
    objects, _ = render()
    role = one(objects, "ClusterRole", "backflow")
    assert role["rules"] == OPERATOR_RULES, "chart and config/rbac/role.yaml disagree"
    binding = one(objects, "ClusterRoleBinding", "backflow")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "backflow", "namespace": NAMESPACE}]
    assert one(objects, "ClusterRole", "backflow-run")["rules"] == RUN_RULES
    run_binding = one(objects, "RoleBinding", "backflow-run")
    assert run_binding["metadata"]["namespace"] == NAMESPACE
    assert run_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": "backflow-run"}
    for o in objects:
        for rule in o.get("rules", []):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], f"wildcard in {o['metadata']['name']}"


def test_watch_namespaces_installs_nothing_cluster_scoped():
    objects, _ = render(CASES["watch-namespaces"])
    cluster_scoped = [o["kind"] for o in objects if o["kind"] in CLUSTER_SCOPED]
    assert not cluster_scoped, f"cluster-scoped objects with watchNamespaces: {cluster_scoped}"
    args = args_of(objects)
    assert [a for a in args if a.startswith("--watch-namespace")] == [
        "--watch-namespace=analytics", "--watch-namespace=marketing"]
    operator_roles = {o["metadata"]["namespace"]: o for o in find(objects, "Role", "backflow")}
    assert set(operator_roles) == {"analytics", "marketing"}
    assert all(r["rules"] == OPERATOR_RULES for r in operator_roles.values())
    run_roles = {o["metadata"]["namespace"] for o in find(objects, "Role", "backflow-run")}
    assert run_roles == {"analytics", "marketing", "sales"}
    for b in find(objects, "RoleBinding", "backflow-run"):
        assert b["roleRef"]["kind"] == "Role"
        assert b["subjects"][0]["namespace"] == b["metadata"]["namespace"]


def test_chart_crds_are_the_generated_crds():
    loaded = {c["filename"].split("/")[-1]: yaml.safe_load(c["data"]) for c in chart().crds}
    generated = {p.name: yaml.safe_load(p.read_text()) for p in (ROOT / "crds").glob("*.yaml")}
    assert loaded == generated, "charts/backflow/crds/ differs from crds/: run `make crds`"
    validate_objects(list(loaded.values()), "charts/backflow/crds")


def test_prometheus_rule_matches_the_kustomize_copy():
    objects, _ = render({"fullnameOverride": "backflow-operator", "prometheusRule": {"enabled": True}})
    from_chart = one(objects, "PrometheusRule")["spec"]
    from_kustomize = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus_rule.yaml").read_text())["spec"]
    assert from_chart == from_kustomize, "config/prometheus/prometheus_rule.yaml must be the chart's rule with default values"


def egress_of(policy):
    """The egress rules of a NetworkPolicy: DNS, the API server, the catch-all, the extra ones."""
    dns, api, anywhere, *extra = policy["spec"]["egress"]
    return dns, api, anywhere, extra


# The labels src/controller/job.rs puts on run pods.
RUN_POD_LABELS = {"app.kubernetes.io/name": "backflow", "app.kubernetes.io/component": "sync-run",
                  "app.kubernetes.io/managed-by": "backflow"}


def test_egress_of_the_operator_and_of_job_pods_is_dns_the_api_server_and_anywhere_but_denied_ranges():
    objects, _ = render()
    operator = one(objects, "NetworkPolicy", "backflow")
    run = one(objects, "NetworkPolicy", "backflow-run")
    assert run["metadata"]["namespace"] == NAMESPACE
    selector = run["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= RUN_POD_LABELS.items(), "the run policy must select the Job pods"
    assert run["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in run["spec"]
    for policy in (operator, run):
        dns, api, anywhere, extra = egress_of(policy)
        assert "to" not in dns and {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
        assert [p["port"] for p in api["ports"]] == [443, 6443]
        assert api["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}}]
        assert "ports" not in anywhere, "every port, outside the denied ranges"
        assert anywhere["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]}},
                                  {"ipBlock": {"cidr": "::/0", "except": ["fe80::/10"]}}]
        assert extra == []


def test_denied_cluster_ranges_reach_both_the_network_policies_and_the_operators_own_check():
    objects, _ = render(CASES["all-on"])
    assert "--egress-deny=169.254.0.0/16,fe80::/10,10.96.0.0/12,fd00:10:96::/112,loopback" in args_of(objects)
    policies = find(objects, "NetworkPolicy")
    assert {p["metadata"]["namespace"] for p in policies if p["metadata"]["name"] == "backflow-run"} == {
        "analytics", "marketing"}
    for policy in policies:
        _, _, anywhere, extra = egress_of(policy)
        assert anywhere["to"][0]["ipBlock"]["except"] == ["169.254.0.0/16", "10.96.0.0/12"]
        assert anywhere["to"][1]["ipBlock"]["except"] == ["fe80::/10", "fd00:10:96::/112"]
        assert extra == [{"to": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "warehouse"}}}]}]
    objects, _ = render({"egress": {"deniedCIDRs": [], "denyLoopback": False}, "watchNamespaces": ["a"]})
    assert "--egress-deny=" in args_of(objects)
    _, _, anywhere, _ = egress_of(one(objects, "NetworkPolicy", "backflow-run"))
    assert anywhere["to"] == [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}]


def test_a_disruption_budget_exists_only_when_a_replica_can_be_evicted():
    for values in ({}, {"podDisruptionBudget": {"enabled": True}},
                   {"replicaCount": 2, "podDisruptionBudget": {"enabled": False}}):
        objects, _ = render(values)
        assert not find(objects, "PodDisruptionBudget"), f"a budget with {values} would block drains"
    objects, _ = render({"replicaCount": 3, "podDisruptionBudget": {"minAvailable": 2}})
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    with pytest.raises(Exception, match="minAvailable must be below replicaCount"):
        render({"replicaCount": 2, "podDisruptionBudget": {"minAvailable": 2}})


BAD_VALUES = [
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"replicaCount": 0}, "/replicaCount"),
    ({"logFormat": "yaml"}, "/logFormat"),
    ({"watchNamespaces": "analytics"}, "/watchNamespaces"),
    ({"watchNamespaces": ["Analytics_Team"]}, "/watchNamespaces/0"),
    ({"replicas": 2}, "replicas"),
    ({"prometheusRule": {"enabled": True, "rejectedRowsWindow": "an hour"}}, "/prometheusRule/rejectedRowsWindow"),
    ({"egress": {"deniedCIDRs": ["metadata"]}}, "/egress/deniedCIDRs/0"),
    ({"jobRunner": {"allowedServiceAccounts": ["Admin SA"]}}, "/jobRunner/allowedServiceAccounts/0"),
    ({"networkPolicy": {"egress": []}}, "egress"),
]


@pytest.mark.parametrize("values,where", BAD_VALUES, ids=[w for _, w in BAD_VALUES])
def test_schema_refuses_wrong_values_at_install_time(values, where):
    with pytest.raises(helm.HelmValuesError) as refused:
        render(values)
    assert where in str(refused.value), f"the message should name {where}: {refused.value}"


def test_values_yaml_documents_every_key_and_the_schema_knows_them():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    chart().validate_schema(values)
    # Blocks passed through as Kubernetes objects: documented as a whole.
    free_form = {"resources", "podSecurityContext", "securityContext", "livenessProbe", "readinessProbe"}
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    section = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(stripped)
        if indent == 0:
            section = stripped.split(":")[0]
        if indent > 2 or (indent == 2 and section in free_form):
            continue
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith("#"):
            undocumented.append(f"line {i + 1}: {stripped.split(':')[0]}")
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"
    assert set(values) <= set(schema["properties"]), set(values) - set(schema["properties"])


def test_notes_say_what_to_apply_next():
    _, notes = render()
    for needle in ["kubectl -n backflow-system rollout status deployment/backflow", "config/samples/",
                   "kubectl -n NAMESPACE describe rsync NAME", "Apply the new chart's CRDs first",
                   "docs/operations.md"]:
        assert needle in notes, f"NOTES.txt lacks {needle!r}:\n{notes}"
