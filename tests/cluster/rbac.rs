//! Narrower RBAC: watch-namespace mode with Roles in the watched namespaces only, and a
//! role missing a rule.

use std::time::Duration;

use kube::ResourceExt;
use serde_json::json;

use crate::support::cluster::{ControlPlane, Process, control_plane, repo};
use crate::{apply, condition, is, manifests, ready, shared, syncs, wait_sync, warehouse};

/// A ServiceAccount in `backflow-system` with the operator's rules (config/rbac/role.yaml) as a
/// Role in each of `namespaces` only, as the chart's `watchNamespaces` install grants, less
/// the rules on `without` (a resource name); its kubeconfig.
async fn namespaced_operator_account(
    plane: &ControlPlane,
    name: &str,
    namespaces: &[&str],
    without: Option<&str>,
) -> std::path::PathBuf {
    let role: serde_json::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo().join("config/rbac/role.yaml")).unwrap())
            .unwrap();
    let rules: Vec<serde_json::Value> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| without.is_none_or(|w| !r["resources"].as_array().unwrap().iter().any(|x| x == w)))
        .cloned()
        .collect();
    plane.kubectl(&["create", "serviceaccount", name, "-n", "backflow-system"]);
    for ns in namespaces {
        let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": name, "namespace": ns}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": name, "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": "backflow-system"}]},
        ]});
        plane.kubectl_stdin(&["apply", "-f", "-"], &objects.to_string());
    }
    plane.service_account_kubeconfig("backflow-system", name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watching_one_namespace_with_namespaced_rbac_only_its_syncs_run() {
    let _guard = shared().await;
    let plane = control_plane();
    let watched = plane.namespace("watched");
    let other = plane.namespace("unwatched");
    let db = warehouse(5).await;
    let kubeconfig = namespaced_operator_account(plane, &format!("op-{watched}"), &[&watched], None).await;
    let operator = Process::operator(&kubeconfig, "watched", &["--watch-namespace", &watched]);
    operator.wait_for("/readyz", 200, Duration::from_secs(30)).await;
    apply(plane, &manifests(&watched, &db, "mine", ""));
    apply(plane, &manifests(&other, &db, "not-mine", ""));
    ready(plane, &watched, "mine");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = plane.admin().await;
    let untouched = syncs(&client, &other).get("not-mine").await.unwrap();
    assert!(
        untouched.status.is_none() && untouched.finalizers().is_empty(),
        "{untouched:?}"
    );
    assert!(
        !operator.log_text().contains("is forbidden: User"),
        "{}",
        operator.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_rule_missing_from_the_operators_role_the_failure_shows_on_the_sync_and_in_the_log() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("small-rbac");
    let db = warehouse(5).await;
    let kubeconfig =
        namespaced_operator_account(plane, &format!("op-{ns}"), &[&ns], Some("configmaps")).await;
    let operator = Process::operator(&kubeconfig, "small-rbac", &["--watch-namespace", &ns]);
    apply(plane, &manifests(&ns, &db, "customers", ""));
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let s = wait_sync(
        &api,
        "customers",
        "Ready=False",
        Duration::from_secs(60),
        &operator,
        |s| is(s, "Ready", "False"),
    )
    .await;
    let message = &condition(&s, "Ready").unwrap().message;
    assert!(
        message.contains("configmaps") && message.contains("forbidden"),
        "{message}"
    );
    let log = operator.log_text();
    assert!(log.contains("forbidden") && log.contains("configmaps"), "{log}");
    // The operator is not ready: its ConfigMap watch cannot list.
    let (code, body) = operator.get("/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("ConfigMap"), "{body}");
}
