//! Runs driven from kubectl: apply and wait, an interval, requested runs, spec edits,
//! suspend, dry runs and `schedule.after`.

use std::cell::RefCell;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams};

use crate::support::cluster::{Process, control_plane};
use crate::support::cluster_manifests::{Manifests, tail, wait_until};
use crate::{
    apply, condition, count, exclusive, finished_by, finished_run, is, manifests, ready, run_start, shared,
    syncs, wait_sync, warehouse,
};

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
    wait_until(
        "the \"caches synced\" log line",
        Duration::from_secs(5),
        || async {
            let log = operator.log_text();
            if log.contains("caches synced") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;

    apply(plane, &manifests(&ns, &db, "customers", ""));
    let waited = ready(plane, &ns, "customers");
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
    let api = syncs(&client, &ns);
    let starts: RefCell<Vec<chrono::DateTime<chrono::Utc>>> = RefCell::new(Vec::new());
    wait_until("three runs 10 s apart", Duration::from_secs(60), || async {
        let s = api.get("every-10s").await.unwrap();
        let mut starts = starts.borrow_mut();
        if let Some(start) = run_start(&s)
            && finished_run(&s)
        {
            let start = chrono::DateTime::parse_from_rfc3339(&start).unwrap().to_utc();
            if starts.last() != Some(&start) {
                starts.push(start);
            }
        }
        if starts.len() >= 3 {
            Ok(())
        } else {
            Err(format!("starts {starts:?}\n{}", tail(&operator.log_text(), 40)))
        }
    })
    .await;
    let starts = starts.into_inner();
    for pair in starts.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!((9_000..=13_000).contains(&gap), "runs {gap} ms apart: {starts:?}");
    }
    // The run's end is written by the run, the next time by the reconcile that the end wakes:
    // on a loaded machine the status can show the one before the other for a moment.
    let last = *starts.last().unwrap();
    wait_until(
        "nextSyncTime 10 s after the last run",
        Duration::from_secs(10),
        || async {
            let s = api.get("every-10s").await.unwrap();
            let next = s.status.and_then(|s| s.next_sync_time).unwrap_or_default();
            match chrono::DateTime::parse_from_rfc3339(&next) {
                Ok(next) if next.to_utc() >= last + chrono::Duration::seconds(10) => Ok(()),
                _ => Err(format!("nextSyncTime {next:?}, last run {last}")),
            }
        },
    )
    .await;
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
        &Manifests::new(&ns)
            .secret(&db.url)
            .sync("downstream", "  schedule: {after: [upstream]}\n")
            .yaml(),
    );
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
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
    ready(plane, &ns, "upstream");
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
        |s| finished_by(s, "Requested"),
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
