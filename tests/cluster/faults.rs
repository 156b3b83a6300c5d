//! Faults: the API server restarted in the middle of a run, an outage of several minutes
//! with an etcd compaction, and another client writing the status while the operator does.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backflow::api::ReverseSync;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, PostParams};

use crate::deliveries::{self, SLOW_DESTINATION};
use crate::support::cluster::{Process, control_plane};
use crate::support::cluster_manifests::{Manifests, around, wait_until};
use crate::{
    apply, condition, count, exclusive, finished_by, finished_run, is, manifests, ready, run_start, shared,
    syncs, wait_sync, warehouse,
};

/// How long the API server stays down for a restart in the middle of a run.
const RESTART_DOWN: Duration = Duration::from_secs(15);

/// How long the API server stays down for the outage: 150 s (the several-minute outage that
/// left watches failing on stale resource versions), or `BACKFLOW_E2E_OUTAGE_SECONDS`.
fn outage() -> Duration {
    let seconds = std::env::var("BACKFLOW_E2E_OUTAGE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    Duration::from_secs(seconds)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_api_server_restart_mid_run_and_a_long_outage_with_compaction_nothing_is_lost_and_new_syncs_run_at_once()
 {
    let _guard = exclusive().await;
    let plane = control_plane();
    let ns = plane.namespace("outage");
    let db = warehouse(5).await;
    let operator = Process::operator(&plane.operator_kubeconfig(), "outage", &[]);
    apply(plane, &manifests(&ns, &db, "before", ""));
    ready(plane, &ns, "before");
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let before = run_start(&api.get("before").await.unwrap());

    // A restart while a run is in flight: 4000 rows in batches of 100 at 250 ms each, the
    // API server stopped in the middle of a checkpoint, for longer than the next checkpoint
    // is away.
    const ROWS: i64 = 4000;
    let slow_ns = plane.namespace("restart");
    let slow_db = warehouse(ROWS as u32).await;
    deliveries::slow_and_counted(&slow_db, 250).await;
    apply(
        plane,
        &Manifests::new(&slow_ns)
            .secret(&slow_db.url)
            .destination(SLOW_DESTINATION)
            .sync("slow", "")
            .yaml(),
    );
    let slow = syncs(&client, &slow_ns);
    let in_flight = deliveries::past_a_checkpoint(&slow_db, &client, &slow_ns, "slow", 0, ROWS).await;
    plane.stop_apiserver();
    tokio::time::sleep(RESTART_DOWN).await;
    plane.start_apiserver();
    let s = wait_sync(
        &slow,
        "slow",
        "the run's outcome after the restart",
        Duration::from_secs(120),
        &operator,
        |s| finished_run(s) && is(s, "Ready", "True"),
    )
    .await;
    let run = s.status.unwrap().last_run.unwrap();
    assert_eq!(run.result, "Succeeded", "{run:?}");
    assert_eq!(count(&slow_db, "SELECT count(*) FROM crm").await, ROWS);
    let r = deliveries::resent(&slow_db).await;
    eprintln!(
        "API server stopped {RESTART_DOWN:?} with {in_flight} of {ROWS} rows sent; resent: {r:?}; last run {} ({:?})",
        run.result, run.trigger
    );
    deliveries::assert_at_most_one_checkpoint(&r, ROWS, Duration::from_secs(3));
    // The interrupted run's outcome reached the status once the server was back (a freshly
    // started server refuses requests for a few seconds, until its RBAC caches are filled).
    let log = operator.log_text();
    assert!(
        !log.contains("failed to record the run"),
        "{}",
        around(&log, "failed to record the run", 40)
    );
    let events = plane.kubectl(&["get", "events", "-n", &slow_ns]);
    assert!(events.contains("SyncSucceeded"), "{events}");

    // An outage of several minutes.
    let outage = outage();
    plane.stop_apiserver();
    tokio::time::sleep(outage).await;
    // Writes the restarted server's watch cache never saw, then compaction: every watch
    // resuming from before the outage gets 410 Gone.
    plane.bump_and_compact_etcd().await;
    plane.start_apiserver();
    let restarted = Instant::now();
    apply(plane, &Manifests::new(&ns).sync("created-after", "").yaml());
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
    eprintln!("after a {outage:?} outage, a sync created at the restart ran within {took:?}");
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

/// Another controller's condition on the ReverseSync, rewritten by read-modify-write (a
/// conflict is retried) as fast as the API server takes it, by `writers` tasks until `stop`.
fn conflicting_writers(
    api: &Api<ReverseSync>,
    name: &str,
    writers: usize,
    stop: &Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, Vec<tokio::task::JoinHandle<()>>) {
    let (written, conflicts) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let tasks = (0..writers)
        .map(|w| {
            let (api, name, stop) = (api.clone(), name.to_owned(), Arc::clone(stop));
            let (written, conflicts) = (Arc::clone(&written), Arc::clone(&conflicts));
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let Ok(mut s) = api.get(&name).await else { continue };
                    let mut status = s.status.take().unwrap_or_default();
                    let n = written.load(Ordering::SeqCst);
                    status.conditions.retain(|c| c.type_ != "AuditedBy");
                    status.conditions.push(Condition {
                        type_: "AuditedBy".to_owned(),
                        status: "True".to_owned(),
                        reason: "Audited".to_owned(),
                        message: format!("audit {n} by writer {w}"),
                        observed_generation: s.metadata.generation,
                        last_transition_time: Time(k8s_openapi::jiff::Timestamp::now()),
                    });
                    s.status = Some(status);
                    match api.replace_status(&name, &PostParams::default(), &s).await {
                        Ok(_) => written.fetch_add(1, Ordering::SeqCst),
                        Err(kube::Error::Api(e)) if e.code == 409 => conflicts.fetch_add(1, Ordering::SeqCst),
                        Err(e) => panic!("the other writer failed: {e}"),
                    };
                }
            })
        })
        .collect();
    (written, conflicts, tasks)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_another_client_writing_the_status_the_operators_writes_still_land_and_settle() {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("status-writer");
    let db = warehouse(500).await;
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    apply(plane, &manifests(&ns, &db, "contended", "  suspend: true\n"));
    let stop = Arc::new(AtomicBool::new(false));
    let (written, conflicts, tasks) = conflicting_writers(&api, "contended", 2, &stop);
    wait_until(
        "the other writer's first write",
        Duration::from_secs(20),
        || async {
            if written.load(Ordering::SeqCst) > 0 {
                Ok(())
            } else {
                Err("no write".to_owned())
            }
        },
    )
    .await;

    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "status-writer",
        &["--watch-namespace", &ns],
    );
    plane.kubectl(&[
        "patch",
        "-n",
        &ns,
        "rsync/contended",
        "--type=merge",
        "-p",
        r#"{"spec":{"suspend":false}}"#,
    ]);
    let started = Instant::now();
    wait_sync(
        &api,
        "contended",
        "the first run under a second status writer",
        Duration::from_secs(60),
        &operator,
        |s| finished_run(s) && is(s, "Ready", "True") && is(s, "Reconciling", "False"),
    )
    .await;
    plane.kubectl(&[
        "annotate",
        "-n",
        &ns,
        "rsync/contended",
        "backflow.dev/requested-at=contended",
    ]);
    let s = wait_sync(
        &api,
        "contended",
        "a requested run under a second status writer",
        Duration::from_secs(60),
        &operator,
        |s| finished_by(s, "Requested") && is(s, "Ready", "True") && is(s, "Reconciling", "False"),
    )
    .await;
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let (written, conflicts) = (written.load(Ordering::SeqCst), conflicts.load(Ordering::SeqCst));
    eprintln!(
        "two runs recorded in {took:?} while another client wrote the status {written} times ({conflicts} conflicts)"
    );
    assert!(written > 20, "the other writer wrote only {written} times");
    assert_eq!(count(&db, "SELECT count(*) FROM crm").await, 500);
    assert!(
        condition(&s, "AuditedBy").is_some(),
        "the operator kept the other writer's condition: {:?}",
        s.status
    );
    let status = s.status.as_ref().unwrap();
    assert_eq!(status.last_handled_requested_at.as_deref(), Some("contended"));
    let log = operator.log_text();
    assert!(
        !log.contains("failed to record the run") && !log.contains("failed to mark the run"),
        "{log}"
    );

    // Nothing flaps: with the other writer gone the status stays as it is.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = api.get("contended").await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let later = api.get("contended").await.unwrap();
    assert_eq!(
        later.metadata.resource_version, settled,
        "the status keeps changing: {:?}",
        later.status
    );
    assert!(run_start(&later).is_some());
}
