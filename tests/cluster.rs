//! The operator on a real Kubernetes control plane (etcd, kube-apiserver and
//! kube-controller-manager v1.20.2, `support::cluster`): installed as users install it, driven
//! with the real `kubectl`, the `backflow` binary run out of cluster under the operator
//! ServiceAccount's identity, PostgreSQL as warehouse and destination.
//!
//! Tests share the binary's control plane and each works in namespaces of its own. Tests that
//! run an operator over every namespace, or stop the API server, hold [`exclusive`]; the
//! others, whose operators watch only their namespaces, hold [`shared`].

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use backflow::api::ReverseSync;
use support::cluster::{ControlPlane, Process, control_plane};
use support::db::TestDb;

static LOCK: RwLock<()> = RwLock::const_new(());

/// For a test whose operator watches only its own namespaces.
async fn shared() -> RwLockReadGuard<'static, ()> {
    LOCK.read().await
}

/// For a test that watches every namespace or stops the API server.
async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    LOCK.write().await
}

/// A PostgreSQL database with `rows` customers and an empty `crm` table to sync them into.
async fn warehouse(rows: u32) -> TestDb {
    let db = TestDb::postgres("e2e").await;
    db.exec(&format!(
        "CREATE TABLE customers (id INT PRIMARY KEY, email TEXT, plan TEXT);
         INSERT INTO customers SELECT g, 'user' || g || '@example.com', 'free' FROM generate_series(1, {rows}) g;
         CREATE TABLE crm (id INT PRIMARY KEY, email TEXT, plan TEXT);"
    ))
    .await;
    db
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap()
}

/// The Secret, Destination and ReverseSync a user writes, as one YAML stream. `extra` is
/// appended to the ReverseSync's spec (indented two spaces).
fn manifests(namespace: &str, db: &TestDb, sync: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: warehouse
  namespace: {namespace}
  annotations: {{backflow.dev/allowed-references: "Destination/*, ReverseSync/*"}}
stringData: {{url: "{url}"}}
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: crm, namespace: {namespace}}}
spec:
  type: postgres
  credentialsSecretRef: {{name: warehouse}}
  postgres: {{table: crm}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: {sync}, namespace: {namespace}}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: SELECT id, email, plan FROM customers
    primaryKey: [id]
  destinationRef: {{name: crm}}
  mappings:
    - {{from: id, to: id}}
    - {{from: email, to: email}}
    - {{from: plan, to: plan}}
  match: [id]
{extra}"#,
        url = db.url
    )
}

/// Another ReverseSync to the same Destination.
fn sync_manifest(namespace: &str, sync: &str, extra: &str) -> String {
    format!(
        r#"apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: {sync}, namespace: {namespace}}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: SELECT id, email, plan FROM customers
    primaryKey: [id]
  destinationRef: {{name: crm}}
  mappings:
    - {{from: id, to: id}}
    - {{from: email, to: email}}
    - {{from: plan, to: plan}}
  match: [id]
{extra}"#
    )
}

/// `kubectl apply -f FILE` of `yaml`, as a user applies a file.
fn apply(plane: &ControlPlane, yaml: &str) -> String {
    let file = plane
        .dir
        .join(format!("manifest-{}.yaml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, yaml).unwrap();
    plane.kubectl(&["apply", "-f", &file.to_string_lossy()])
}

async fn syncs(client: &Client, namespace: &str) -> Api<ReverseSync> {
    Api::namespaced(client.clone(), namespace)
}

fn condition<'a>(s: &'a ReverseSync, type_: &str) -> Option<&'a Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.type_ == type_))
}

fn is(s: &ReverseSync, type_: &str, status: &str) -> bool {
    condition(s, type_).is_some_and(|c| c.status == status)
}

/// Polls ReverseSync `name` until `done` holds, or panics with its status and the log.
async fn wait_sync(
    api: &Api<ReverseSync>,
    name: &str,
    what: &str,
    within: Duration,
    operator: &Process,
    done: impl Fn(&ReverseSync) -> bool,
) -> ReverseSync {
    let deadline = Instant::now() + within;
    loop {
        let last = api.get_opt(name).await.ok().flatten();
        if let Some(s) = &last
            && done(s)
        {
            return s.clone();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {what} did not happen within {within:?}; status: {:#?}\noperator log:\n{}",
            last.and_then(|s| s.status),
            tail(&operator.log_text(), 60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_start(s: &ReverseSync) -> Option<String> {
    s.status
        .as_ref()
        .and_then(|st| st.last_run.as_ref())
        .map(|r| r.start.clone())
}

fn finished_run(s: &ReverseSync) -> bool {
    s.status
        .as_ref()
        .and_then(|st| st.last_run.as_ref())
        .is_some_and(|r| r.end.is_some())
}

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
    let crds = support::cluster::repo().join("crds");
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
    let explain = plane.kubectl(&["explain", "reversesync.spec"]);
    for field in [
        "destinationRef\t<Object> -required-",
        "mappings\t<[]Object> -required-",
        "schedule",
        "dryRun\t<boolean>",
    ] {
        assert!(explain.contains(field), "{field}: {explain}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_with_kubectl_a_sync_goes_ready_sends_its_rows_and_the_operator_turns_ready() {
    let _guard = exclusive().await;
    let plane = control_plane();
    let ns = plane.namespace("apply");
    let db = warehouse(50).await;
    // Every namespace, no leader election, the RBAC of config/rbac: the setup a new user starts from.
    let operator = Process::operator(&plane.operator_kubeconfig(), "apply", &[]);
    operator.wait_for("/readyz", 200, Duration::from_secs(30)).await;
    let (_, body) = operator.get("/readyz").await;
    assert!(body.contains("synced"), "{body}");
    assert_eq!(operator.get("/healthz").await.0, 200);
    // The log line comes from a task that polls readiness: give it a moment after /readyz.
    let mut logged = false;
    for _ in 0..50 {
        logged = operator.log_text().contains("caches synced");
        if logged {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logged, "{}", operator.log_text());

    apply(plane, &manifests(&ns, &db, "customers", ""));
    let waited = plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        &ns,
        "rsync/customers",
    ]);
    assert!(waited.contains("condition met"), "{waited}");
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 50);
    let events = plane.kubectl(&["get", "events", "-n", &ns]);
    assert!(events.contains("SyncSucceeded"), "{events}");
    let rows = plane.kubectl(&[
        "get",
        "rsync",
        "customers",
        "-n",
        &ns,
        "-o",
        "jsonpath={.status.lastRun.rowsAdded}",
    ]);
    assert_eq!(rows, "50");
    let client = plane.admin().await;
    let state: Api<ConfigMap> = Api::namespaced(client, &ns);
    let maps = state
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=backflow"))
        .await
        .unwrap();
    assert!(!maps.items.is_empty(), "ConfigMap state is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interval_sync_runs_every_period_and_says_when_it_runs_next() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("interval");
    let db = warehouse(5).await;
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "interval",
        &["--watch-namespace", &ns],
    );
    apply(
        plane,
        &manifests(&ns, &db, "every-10s", "  schedule: {interval: 10s}\n"),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let mut starts: Vec<chrono::DateTime<chrono::Utc>> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while starts.len() < 3 {
        let s = api.get("every-10s").await.unwrap();
        if let Some(start) = run_start(&s)
            && finished_run(&s)
        {
            let start = chrono::DateTime::parse_from_rfc3339(&start).unwrap().to_utc();
            if starts.last() != Some(&start) {
                starts.push(start);
            }
        }
        assert!(
            Instant::now() < deadline,
            "three runs 10 s apart did not happen within 60 s: starts {starts:?}\n{}",
            tail(&operator.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for pair in starts.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!((9_000..=13_000).contains(&gap), "runs {gap} ms apart: {starts:?}");
    }
    let s = api.get("every-10s").await.unwrap();
    let next = s.status.unwrap().next_sync_time.unwrap();
    let next = chrono::DateTime::parse_from_rfc3339(&next).unwrap().to_utc();
    let last = *starts.last().unwrap();
    assert!(
        next >= last + chrono::Duration::seconds(10),
        "nextSyncTime {next} is after the last run {last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_mode_without_the_run_service_account_says_why_and_runs_once_it_exists() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("jobs");
    let db = warehouse(20).await;
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "jobs",
        &["--watch-namespace", &ns, "--job-service-account", "backflow-run"],
    );
    apply(
        plane,
        &manifests(&ns, &db, "in-a-job", "  execution: {mode: Job}\n"),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let s = wait_sync(
        &api,
        "in-a-job",
        "RunServiceAccountMissing",
        Duration::from_secs(30),
        &operator,
        |s| condition(s, "Ready").is_some_and(|c| c.reason == "RunServiceAccountMissing"),
    )
    .await;
    let message = &condition(&s, "Ready").unwrap().message;
    assert!(
        message.contains(&format!("{ns}/backflow-run")) && message.contains("ClusterRole backflow-run"),
        "names the cause and the fix: {message}"
    );
    assert!(is(&s, "Stalled", "True"));
    let events = plane.kubectl(&["get", "events", "-n", &ns]);
    assert!(events.contains("RunServiceAccountMissing"), "{events}");

    // The fix the message gives: the ServiceAccount and its RoleBinding.
    plane.kubectl(&["create", "serviceaccount", "backflow-run", "-n", &ns]);
    plane.kubectl(&[
        "create",
        "rolebinding",
        "backflow-run",
        "-n",
        &ns,
        "--clusterrole=backflow-run",
        &format!("--serviceaccount={ns}:backflow-run"),
    ]);
    let s = wait_sync(
        &api,
        "in-a-job",
        "a run Job",
        Duration::from_secs(40),
        &operator,
        |s| s.status.as_ref().is_some_and(|st| st.active_job.is_some()),
    )
    .await;
    let job_name = s.status.unwrap().active_job.unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = jobs.get(&job_name).await.unwrap();

    // The kube-controller-manager's Job controller created the pod; play its kubelet.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    let pod = loop {
        let list = pods
            .list(&ListParams::default().labels(&format!("job-name={job_name}")))
            .await
            .unwrap();
        if let Some(p) = list.items.into_iter().next() {
            break p;
        }
        assert!(Instant::now() < deadline, "the Job controller created no pod");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (ok, out) = plane.run_job_like_a_kubelet(&job).await;
    assert!(
        ok,
        "the run pod's command failed under the run ServiceAccount:\n{out}"
    );
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "run", "image": "backflow:e2e", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}]}})),
    )
    .await
    .unwrap();
    let s = wait_sync(
        &api,
        "in-a-job",
        "Ready after the Job",
        Duration::from_secs(60),
        &operator,
        |s| is(s, "Ready", "True") && s.status.as_ref().is_some_and(|st| st.active_job.is_none()),
    )
    .await;
    assert!(is(&s, "Stalled", "False"), "{:?}", s.status);
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_create_its_pod_says_so_on_the_sync() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("quota");
    let db = warehouse(1).await;
    plane.kubectl(&["create", "quota", "no-pods", "-n", &ns, "--hard=pods=0"]);
    // Admission enforces a quota once the controller manager has computed its status.
    let deadline = Instant::now() + Duration::from_secs(30);
    while plane.kubectl(&[
        "get",
        "quota",
        "no-pods",
        "-n",
        &ns,
        "-o",
        "jsonpath={.status.hard.pods}",
    ]) != "0"
    {
        assert!(Instant::now() < deadline, "the quota's status was never computed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "quota",
        // The namespace's default ServiceAccount exists: the up-front check passes.
        &["--watch-namespace", &ns],
    );
    apply(
        plane,
        &manifests(&ns, &db, "blocked", "  execution: {mode: Job}\n"),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let s = wait_sync(
        &api,
        "blocked",
        "RunPodNotCreated",
        Duration::from_secs(60),
        &operator,
        |s| condition(s, "Ready").is_some_and(|c| c.reason == "RunPodNotCreated"),
    )
    .await;
    let message = &condition(&s, "Ready").unwrap().message;
    assert!(
        message.contains("quota") && message.contains("cannot create its pod"),
        "{message}"
    );
    let events = plane.kubectl(&[
        "get",
        "events",
        "-n",
        &ns,
        "--field-selector",
        "involvedObject.kind=ReverseSync",
    ]);
    assert!(events.contains("RunPodNotCreated"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_runs_spec_edits_suspend_dry_run_and_after_drive_runs_from_kubectl() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("triggers");
    let db = warehouse(10).await;
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "triggers",
        &["--watch-namespace", &ns],
    );
    // The downstream sync exists before its upstream: it waits rather than run on creation.
    apply(
        plane,
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: warehouse, namespace: {ns}, annotations: {{backflow.dev/allowed-references: \"Destination/*, ReverseSync/*\"}}}}\nstringData: {{url: \"{}\"}}\n---\n{}",
            db.url,
            sync_manifest(&ns, "downstream", "  schedule: {after: [upstream]}\n")
        ),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let s = wait_sync(
        &api,
        "downstream",
        "WaitingForUpstream",
        Duration::from_secs(30),
        &operator,
        |s| condition(s, "Reconciling").is_some_and(|c| c.reason == "WaitingForUpstream"),
    )
    .await;
    assert!(run_start(&s).is_none(), "ran before its upstream: {:?}", s.status);

    apply(plane, &manifests(&ns, &db, "upstream", ""));
    plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        &ns,
        "rsync/upstream",
    ]);
    let s = wait_sync(
        &api,
        "downstream",
        "a run after its upstream",
        Duration::from_secs(30),
        &operator,
        finished_run,
    )
    .await;
    let run = s.status.as_ref().unwrap().last_run.clone().unwrap();
    assert_eq!(run.trigger.as_deref(), Some("After"));
    // It sends to the same table: out of the way of what follows.
    plane.kubectl(&["delete", "-n", &ns, "rsync/downstream", "--timeout=30s"]);

    // kubectl annotate: a requested run that sends nothing new.
    plane.kubectl(&[
        "annotate",
        "-n",
        &ns,
        "rsync/upstream",
        "backflow.dev/requested-at=now-1",
    ]);
    let s = wait_sync(
        &api,
        "upstream",
        "the requested run",
        Duration::from_secs(30),
        &operator,
        |s| {
            s.status
                .as_ref()
                .and_then(|st| st.last_run.as_ref())
                .is_some_and(|r| r.trigger.as_deref() == Some("Requested") && r.end.is_some())
        },
    )
    .await;
    let run = s.status.unwrap().last_run.unwrap();
    assert_eq!((run.rows_added, run.rows_changed), (0, 0));

    // A spec edit runs again; dryRun previews the plan without sending.
    db.exec("UPDATE customers SET plan = 'pro' WHERE id <= 3").await;
    plane.kubectl(&[
        "patch",
        "-n",
        &ns,
        "rsync/upstream",
        "--type=merge",
        "-p",
        r#"{"spec":{"dryRun":true}}"#,
    ]);
    let s = wait_sync(
        &api,
        "upstream",
        "the dry run",
        Duration::from_secs(30),
        &operator,
        |s| {
            s.status
                .as_ref()
                .and_then(|st| st.plan.as_ref())
                .is_some_and(|p| Some(p.generation) == s.metadata.generation)
        },
    )
    .await;
    let plan = s.status.unwrap().plan.unwrap();
    assert_eq!(plan.change, 3, "{plan:?}");
    assert_eq!(
        count(&db, "SELECT count(*) FROM crm WHERE plan = 'pro'").await,
        0,
        "a dry run sends nothing"
    );

    plane.kubectl(&[
        "patch",
        "-n",
        &ns,
        "rsync/upstream",
        "--type=merge",
        "-p",
        r#"{"spec":{"dryRun":false,"suspend":true}}"#,
    ]);
    let s = wait_sync(
        &api,
        "upstream",
        "Suspended",
        Duration::from_secs(30),
        &operator,
        |s| condition(s, "Ready").is_some_and(|c| c.reason == "Suspended"),
    )
    .await;
    let suspended_at = run_start(&s);
    plane.kubectl(&[
        "annotate",
        "--overwrite",
        "-n",
        &ns,
        "rsync/upstream",
        "backflow.dev/requested-at=now-2",
    ]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        run_start(&api.get("upstream").await.unwrap()),
        suspended_at,
        "a suspended sync runs nothing"
    );
    plane.kubectl(&[
        "patch",
        "-n",
        &ns,
        "rsync/upstream",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    wait_sync(
        &api,
        "upstream",
        "a run after resuming",
        Duration::from_secs(30),
        &operator,
        |s| run_start(s) != suspended_at && finished_run(s) && is(s, "Ready", "True"),
    )
    .await;
    assert_eq!(count(&db, "SELECT count(*) FROM crm WHERE plan = 'pro'").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_syncs_and_their_namespace_leaves_nothing_and_the_garbage_collector_removes_owned_state() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("delete");
    let db = warehouse(5).await;
    let mut operator = Process::operator(
        &plane.operator_kubeconfig(),
        "delete",
        &["--watch-namespace", &ns],
    );
    apply(plane, &manifests(&ns, &db, "customers", ""));
    apply(plane, &sync_manifest(&ns, "orphaned", ""));
    apply(plane, &sync_manifest(&ns, "in-namespace", ""));
    for name in ["customers", "orphaned", "in-namespace"] {
        plane.kubectl(&[
            "wait",
            "--for=condition=Ready",
            "--timeout=60s",
            "-n",
            &ns,
            &format!("rsync/{name}"),
        ]);
    }
    let client = plane.admin().await;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let state_of = |sync: &str| ListParams::default().labels(&format!("backflow.dev/sync={sync}"));
    assert!(!maps.list(&state_of("customers")).await.unwrap().items.is_empty());

    // With the operator: the finalizer cancels, removes state, and lets go.
    plane.kubectl(&["delete", "-n", &ns, "rsync/customers", "--timeout=60s"]);
    assert!(maps.list(&state_of("customers")).await.unwrap().items.is_empty());

    // Without it (finalizer removed by hand): the garbage collector deletes the owned state.
    operator.terminate();
    plane.kubectl(&[
        "patch",
        "-n",
        &ns,
        "rsync/orphaned",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    plane.kubectl(&["delete", "-n", &ns, "rsync/orphaned", "--timeout=30s"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !maps.list(&state_of("orphaned")).await.unwrap().items.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the garbage collector left the state ConfigMaps"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A namespace holding a sync deletes cleanly with the operator running.
    let _operator = Process::operator(
        &plane.operator_kubeconfig(),
        "delete-2",
        &["--watch-namespace", &ns],
    );
    let out = plane.kubectl(&["delete", "namespace", &ns, "--timeout=120s"]);
    assert!(out.contains("deleted"), "{out}");
    let (_, out) = plane.kubectl_result(&["get", "namespace", &ns]);
    assert!(out.contains("NotFound"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_the_standby_takes_the_lease_when_the_leader_is_killed() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("lease");
    let db = warehouse(5).await;
    let lease = format!("backflow-{ns}");
    let args = [
        "--watch-namespace",
        ns.as_str(),
        "--leader-election",
        "--lease-name",
        lease.as_str(),
    ];
    let mut a = Process::operator(&plane.operator_kubeconfig(), &format!("{ns}-a"), &args);
    a.wait_for("/readyz", 200, Duration::from_secs(30)).await;
    let b = Process::operator(&plane.operator_kubeconfig(), &format!("{ns}-b"), &args);
    b.wait_for("/readyz", 200, Duration::from_secs(30)).await;
    let (_, body) = b.get("/readyz").await;
    assert!(body.contains("standby"), "{body}");

    apply(plane, &manifests(&ns, &db, "first", ""));
    plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        &ns,
        "rsync/first",
    ]);
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let first_run = run_start(&api.get("first").await.unwrap());

    a.kill9();
    let killed = Instant::now();
    apply(plane, &sync_manifest(&ns, "second", ""));
    wait_sync(
        &api,
        "second",
        "a run by the new leader",
        Duration::from_secs(45),
        &b,
        |s| is(s, "Ready", "True"),
    )
    .await;
    assert!(
        b.log_text().contains("holding the leader lease"),
        "{}",
        b.log_text()
    );
    // The lease lasts 6 s; the new leader then lists and runs.
    assert!(
        killed.elapsed() < Duration::from_secs(30),
        "took {:?}",
        killed.elapsed()
    );
    assert_eq!(
        run_start(&api.get("first").await.unwrap()),
        first_run,
        "no run executed twice"
    );
    let (_, body) = b.get("/readyz").await;
    assert!(body.contains("synced"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_api_server_outage_and_an_etcd_compaction_the_operator_runs_new_syncs_at_once() {
    let _guard = exclusive().await;
    let plane = control_plane();
    let ns = plane.namespace("outage");
    let db = warehouse(5).await;
    let operator = Process::operator(&plane.operator_kubeconfig(), "outage", &[]);
    apply(plane, &manifests(&ns, &db, "before", ""));
    plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        &ns,
        "rsync/before",
    ]);
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let before = run_start(&api.get("before").await.unwrap());

    plane.stop_apiserver();
    // Long enough for a backoff shared by every watch to reach its 30 s ceiling.
    tokio::time::sleep(Duration::from_secs(45)).await;
    // Writes the restarted server's watch cache never saw, then compaction: every watch
    // resuming from before the outage gets 410 Gone.
    plane.bump_and_compact_etcd().await;
    plane.start_apiserver();
    let restarted = Instant::now();
    apply(plane, &sync_manifest(&ns, "created-after", ""));
    wait_sync(
        &api,
        "created-after",
        "a run after the outage",
        Duration::from_secs(60),
        &operator,
        |s| is(s, "Ready", "True"),
    )
    .await;
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the sync created after the outage ran {took:?} after the restart"
    );
    assert_eq!(
        run_start(&api.get("before").await.unwrap()),
        before,
        "nothing ran again"
    );
    operator.wait_for("/readyz", 200, Duration::from_secs(5)).await;
    assert_eq!(operator.get("/healthz").await.0, 200);
}

/// A ServiceAccount in `backflow-system` with the operator's rules (config/rbac/role.yaml) as a
/// Role in each of `namespaces` only, as the chart's `watchNamespaces` install grants, less
/// the rules on `without` (a resource name); its kubeconfig.
async fn namespaced_operator_account(
    plane: &ControlPlane,
    name: &str,
    namespaces: &[&str],
    without: Option<&str>,
) -> std::path::PathBuf {
    let role: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(support::cluster::repo().join("config/rbac/role.yaml")).unwrap(),
    )
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
    plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        &watched,
        "rsync/mine",
    ]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = plane.admin().await;
    let untouched = syncs(&client, &other).await.get("not-mine").await.unwrap();
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
    let api = syncs(&client, &ns).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configmap_state_of_300_000_rows_fits_real_etcd_and_a_second_run_sends_nothing() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("scale");
    let db = warehouse(300_000).await;
    let operator = Process::operator(&plane.operator_kubeconfig(), "scale", &["--watch-namespace", &ns]);
    apply(plane, &manifests(&ns, &db, "big", ""));
    let client = plane.admin().await;
    let api = syncs(&client, &ns).await;
    let s = wait_sync(
        &api,
        "big",
        "the first run",
        Duration::from_secs(300),
        &operator,
        finished_run,
    )
    .await;
    assert!(is(&s, "Ready", "True"), "{:?}", s.status);
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 300_000);
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let state = maps
        .list(&ListParams::default().labels("backflow.dev/sync=big"))
        .await
        .unwrap();
    let largest = state
        .items
        .iter()
        .map(|m| serde_json::to_vec(m).unwrap().len())
        .max()
        .unwrap();
    // etcd's default --max-request-bytes is 1.5 MiB.
    assert!(largest < 1_572_864, "a state ConfigMap of {largest} bytes");
    plane.kubectl(&[
        "annotate",
        "-n",
        &ns,
        "rsync/big",
        "backflow.dev/requested-at=again",
    ]);
    let s = wait_sync(
        &api,
        "big",
        "the requested run",
        Duration::from_secs(300),
        &operator,
        |s| {
            s.status
                .as_ref()
                .and_then(|st| st.last_run.as_ref())
                .is_some_and(|r| r.trigger.as_deref() == Some("Requested") && r.end.is_some())
        },
    )
    .await;
    let run = s.status.unwrap().last_run.unwrap();
    assert_eq!(
        (run.rows_added, run.rows_changed, run.rows_unchanged),
        (0, 0, 300_000)
    );
}

/// The chart's RBAC objects (ServiceAccounts, Roles, bindings), rendered by Helm's library
/// (`tests/chart/render_chart.py`, the `.venv` of `make venv`).
fn chart_rbac(release: &str, namespace: &str, values: serde_json::Value) -> Vec<serde_json::Value> {
    let python = support::cluster::repo().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make venv` (make test does)",
        python.display()
    );
    let out = std::process::Command::new(python)
        .arg(support::cluster::repo().join("tests/chart/render_chart.py"))
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
    plane.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "--timeout=60s",
        "-n",
        &ns,
        "rsync/customers",
    ]);
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
    let api = syncs(&client, &release_ns).await;
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
