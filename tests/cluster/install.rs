//! Installing as users do: the CRDs, what `kubectl get` and `kubectl explain` show, and the
//! operator under the RBAC (and the command) of `config/default` and of the Helm chart.

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::json;

use crate::support;
use crate::support::cluster::{Process, control_plane, repo};
use crate::support::cluster_manifests::wait_until;
use crate::{
    apply, count, exclusive, finished_run, is, manifests, ready, shared, syncs, wait_sync, warehouse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_as_users_do_the_crds_are_established_and_kubectl_reads_them_right() {
    let _guard = shared().await;
    let plane = control_plane();
    for crd in ["reversesyncs.backflow.dev", "destinations.backflow.dev"] {
        let conditions = plane.kubectl(&[
            "get",
            "crd",
            crd,
            "-o",
            "jsonpath={range .status.conditions[*]}{.type}={.status};{end}",
        ]);
        assert!(conditions.contains("Established=True"), "{crd}: {conditions}");
        assert!(!conditions.contains("NonStructuralSchema"), "{crd}: {conditions}");
    }
    // What docs/operations.md says of 1.20: server-side apply refuses the CEL rules it does
    // not know, and so does kubectl's client-side validation.
    let crds = repo().join("crds");
    let (ok, out) = plane.kubectl_result(&[
        "apply",
        "--server-side",
        "--validate=false",
        "-f",
        &crds.to_string_lossy(),
    ]);
    assert!(!ok && out.contains("x-kubernetes-validations"), "{out}");
    let (ok, out) = plane.kubectl_result(&["apply", "-f", &crds.to_string_lossy()]);
    assert!(!ok && out.contains("x-kubernetes-validations"), "{out}");

    // 1.20 publishes nullable fields without a type, so `explain` lists them but cannot
    // descend into them (`explain reversesync.spec.schedule` shows no fields there).
    // The server publishes a new CRD's schema a moment after it is Established.
    let explain_of = |path: &'static str| {
        wait_until("kubectl explain", Duration::from_secs(30), move || async move {
            match plane.kubectl_result(&["explain", path]) {
                (true, out) => Ok(out),
                (false, out) => Err(format!("{path}: {out}")),
            }
        })
    };
    let explain = explain_of("reversesync.spec").await;
    for field in [
        "destinationRef\t<Object> -required-",
        "mappings\t<[]Object> -required-",
        "schedule",
        "dryRun\t<boolean>",
    ] {
        assert!(explain.contains(field), "{field}: {explain}");
    }
    // The doc comments of the API types are what `explain` says, down to nested fields.
    for (path, said) in [
        (
            "reversesync.spec",
            "Pushes the rows of a SQL model to a Destination",
        ),
        (
            "reversesync.spec.source",
            "Where the rows come from: a connection Secret",
        ),
        ("reversesync.spec.source", "primaryKey\t<[]string> -required-"),
        (
            "reversesync.spec.source",
            "Columns that identify a row of the model.",
        ),
        (
            "reversesync.spec.mappings.to",
            "Destination field. Dots make nested objects",
        ),
        ("destination.spec", "type\t<string> -required-"),
        (
            "destination.spec",
            "The kind of destination; the block of the same name configures it.",
        ),
        (
            "destination.spec",
            "Records per request (capped at the destination's own limit).",
        ),
        (
            "destination.spec.credentialsSecretRef",
            "Secret (same namespace) with the credentials",
        ),
    ] {
        let out = explain_of(path).await;
        assert!(out.contains(said), "kubectl explain {path} says {said:?}: {out}");
    }

    let ns = plane.namespace("install");
    let db = warehouse(3).await;
    apply(
        plane,
        &manifests(
            &ns,
            &db,
            "customers",
            "  schedule: {interval: 1h}\n  suspend: true\n",
        ),
    );
    let table = plane.kubectl(&["get", "rsync", "-n", &ns]);
    let header = table.lines().next().unwrap_or_default();
    for column in ["NAME", "READY", "MODE", "LAST SYNC", "ROWS", "AGE"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(table.contains("customers"), "{table}");
}

/// The chart's RBAC objects (ServiceAccounts, Roles, bindings), rendered by Helm's library
/// (`tests/chart/render_chart.py`, the `.venv` of `make venv`).
fn chart_rbac(release: &str, namespace: &str, values: serde_json::Value) -> Vec<serde_json::Value> {
    let python = repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make venv` (make test does)",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(repo().join("tests/chart/render_chart.py"))
        .args([release, namespace, &values.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| <serde_json::Value as serde::Deserialize>::deserialize(doc).ok())
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some("ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_helm_charts_rbac_the_operator_runs_syncs_in_any_namespace_and_job_pods_in_its_own() {
    let _guard = exclusive().await;
    let plane = control_plane();
    let release_ns = plane.namespace("chart");
    let release = format!("r{}", release_ns.trim_start_matches("chart-"));
    let objects = chart_rbac(&release, &release_ns, json!({}));
    let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
    plane.kubectl_stdin(&["apply", "-f", "-"], &list.to_string());
    let operator_sa = objects
        .iter()
        .find(|o| o["kind"] == "ClusterRoleBinding" && o["metadata"]["name"] == format!("{release}-backflow"))
        .map(|o| o["subjects"][0]["name"].as_str().unwrap().to_owned())
        .expect("the operator's ClusterRoleBinding");
    let kubeconfig = plane.service_account_kubeconfig(&release_ns, &operator_sa).await;
    let operator = Process::operator(&kubeconfig, "chart", &["--job-service-account", "backflow-run"]);
    operator.wait_for("/readyz", 200, Duration::from_secs(30)).await;

    let ns = plane.namespace("chart-team");
    let db = warehouse(5).await;
    apply(plane, &manifests(&ns, &db, "customers", ""));
    ready(plane, &ns, "customers");
    assert!(
        !operator.log_text().contains("is forbidden: User"),
        "{}",
        operator.log_text()
    );

    // A Job-mode run in the release namespace, where the chart made the run ServiceAccount:
    // the test plays the kubelet under that account's token.
    apply(
        plane,
        &manifests(&release_ns, &db, "in-a-job", "  execution: {mode: Job}\n"),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &release_ns);
    let s = wait_sync(
        &api,
        "in-a-job",
        "a run Job",
        Duration::from_secs(40),
        &operator,
        |s| s.status.as_ref().is_some_and(|st| st.active_job.is_some()),
    )
    .await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &release_ns);
    let job = jobs
        .get(s.status.unwrap().active_job.as_deref().unwrap())
        .await
        .unwrap();
    let (ok, out) = plane.run_job_like_a_kubelet(&job).await;
    assert!(
        ok,
        "the run pod failed under the chart's run ServiceAccount:\n{out}"
    );
    let s = api.get("in-a-job").await.unwrap();
    assert!(finished_run(&s) && is(&s, "Ready", "True"), "{:?}", s.status);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_from_config_default_the_deployments_own_command_runs_syncs_with_exactly_its_rbac() {
    let _guard = exclusive().await;
    let plane = control_plane();
    let objects = plane.config_default();
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
    ] {
        assert!(
            kinds.contains(&kind),
            "config/default renders a {kind}: {kinds:?}"
        );
    }
    let deployment = objects
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("the operator's Deployment");
    let name = deployment["metadata"]["name"].as_str().unwrap();
    let pod_spec = &deployment["spec"]["template"]["spec"];
    let account = pod_spec["serviceAccountName"].as_str().unwrap();

    // The API server took the Deployment, and the controller manager made its pod from it
    // (nothing schedules it here): the manifests pass real validation.
    let client = plane.admin().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "backflow-system");
    let labels = deployment["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
        .collect::<Vec<_>>()
        .join(",");
    let pod = wait_until("the Deployment's pod", Duration::from_secs(60), || async {
        let list = pods.list(&ListParams::default().labels(&labels)).await.unwrap();
        list.items
            .into_iter()
            .next()
            .ok_or_else(|| plane.kubectl(&["get", "deployment,replicaset", "-n", "backflow-system"]))
    })
    .await;
    assert_eq!(pod.spec.unwrap().service_account_name.as_deref(), Some(account));

    // Play its kubelet: the container's own arguments and environment, under its
    // ServiceAccount's token, so the operator has exactly config/default's RBAC. Two
    // arguments are the machine's: a free loopback port, and an egress deny list without
    // `loopback`, where this machine's PostgreSQL listens.
    let container = &pod_spec["containers"][0];
    let listen = format!("127.0.0.1:{}", support::cluster::free_port());
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .map(|a| {
            if a.starts_with("--listen=") {
                format!("--listen={listen}")
            } else if let Some(list) = a.strip_prefix("--egress-deny=") {
                let kept: Vec<&str> = list.split(',').filter(|d| *d != "loopback").collect();
                format!("--egress-deny={}", kept.join(","))
            } else {
                a
            }
        })
        .collect();
    assert!(
        args.iter().any(|a| a == "--egress-deny=169.254.0.0/16,fe80::/10"),
        "{args:?}"
    );
    let pod_name = format!("{name}-kubelet");
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = match (
                e["value"].as_str(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => v.to_owned(),
                (None, Some("metadata.name")) => pod_name.clone(),
                (None, Some("metadata.namespace")) => "backflow-system".to_owned(),
                other => panic!("the test kubelet cannot resolve {e} ({other:?})"),
            };
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect();
    let kubeconfig = plane.service_account_kubeconfig("backflow-system", account).await;
    let operator = Process::command(&kubeconfig, "config-default", &args, &env, listen);
    operator.wait_for("/readyz", 200, Duration::from_secs(30)).await;

    let ns = plane.namespace("kustomize");
    let db = warehouse(7).await;
    apply(plane, &manifests(&ns, &db, "customers", ""));
    let waited = ready(plane, &ns, "customers");
    assert!(waited.contains("condition met"), "{waited}");
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 7);
    let log = operator.log_text();
    assert!(!log.contains("is forbidden"), "{log}");
    // --log-format=json, as the Deployment says.
    assert!(
        log.lines().any(|l| l.starts_with('{') && l.contains("\"level\"")),
        "{log}"
    );
}
