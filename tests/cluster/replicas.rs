//! Two replicas with leader election: a real Lease handed over when the leader is killed with
//! SIGKILL, idle or in the middle of a run.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

use crate::deliveries::{self, SLOW_DESTINATION};
use crate::support::cluster::{Process, control_plane};
use crate::support::cluster_manifests::{Manifests, wait_until};
use crate::{
    apply, count, finished_by, is, manifests, ready, run_start, shared, syncs, wait_sync, warehouse,
};

/// `--lease-duration-seconds` of [`Process::operator`].
const LEASE_DURATION: Duration = Duration::from_secs(6);

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
    ready(plane, &ns, "first");
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let first_run = run_start(&api.get("first").await.unwrap());

    a.kill9();
    let killed = Instant::now();
    apply(plane, &Manifests::new(&ns).sync("second", "").yaml());
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
async fn a_leader_killed_mid_run_hands_over_and_the_new_leader_finishes_the_run_resending_at_most_one_checkpoint()
 {
    let _guard = shared().await;
    let plane = control_plane();
    let ns = plane.namespace("lease-mid-run");
    const ROWS: i64 = 4000;
    let db = warehouse(ROWS as u32).await;
    let lease = format!("backflow-{ns}");
    let args = [
        "--watch-namespace",
        ns.as_str(),
        "--leader-election",
        "--lease-name",
        lease.as_str(),
    ];
    let (a_name, b_name) = (format!("{ns}-a"), format!("{ns}-b"));
    let mut a = Process::operator(&plane.operator_kubeconfig(), &a_name, &args);
    a.wait_for("/readyz", 200, Duration::from_secs(30)).await;
    let b = Process::operator(&plane.operator_kubeconfig(), &b_name, &args);
    b.wait_for("/readyz", 200, Duration::from_secs(30)).await;

    apply(
        plane,
        &Manifests::new(&ns)
            .secret(&db.url)
            .destination(SLOW_DESTINATION)
            .sync("slow", "")
            .yaml(),
    );
    ready(plane, &ns, "slow");
    let client = plane.admin().await;
    let api = syncs(&client, &ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), "backflow-system");
    let holder = || async {
        leases
            .get_opt(&lease)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    assert_eq!(holder().await, a_name, "the first replica leads");

    // A requested run that changes every row, slowly: 40 batches of 100, 250 ms each.
    deliveries::slow_and_counted(&db, 250).await;
    db.exec("UPDATE customers SET plan = 'pro'").await;
    let journals_before = deliveries::journals(&client, &ns, "slow").await;
    plane.kubectl(&[
        "annotate",
        "-n",
        &ns,
        "rsync/slow",
        "backflow.dev/requested-at=mid-run",
    ]);
    let in_flight = deliveries::past_a_checkpoint(&db, &client, &ns, "slow", journals_before, ROWS).await;
    a.kill9();
    let killed = Instant::now();
    let took_over = wait_until(
        "the standby taking the lease",
        Duration::from_secs(30),
        || async {
            let now = holder().await;
            if now == b_name {
                Ok(killed.elapsed())
            } else {
                Err(format!("holder {now:?}"))
            }
        },
    )
    .await;
    eprintln!("lease taken over {took_over:?} after the kill; {in_flight} of {ROWS} rows sent by then");
    assert!(
        took_over <= LEASE_DURATION + Duration::from_secs(3),
        "the standby took the lease {took_over:?} after the kill (lease {LEASE_DURATION:?})"
    );

    let s = wait_sync(
        &api,
        "slow",
        "the requested run finished by the new leader",
        Duration::from_secs(90),
        &b,
        |s| finished_by(s, "Requested") && is(s, "Ready", "True"),
    )
    .await;
    let run = s.status.unwrap().last_run.unwrap();
    assert!(
        run.rows_changed < ROWS as u64,
        "the new leader started over instead of from the checkpoint: {run:?}"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM crm WHERE plan = 'pro'").await,
        ROWS
    );
    let r = deliveries::resent(&db).await;
    eprintln!(
        "resent after the kill: {r:?}; the new leader changed {} rows",
        run.rows_changed
    );
    deliveries::assert_at_most_one_checkpoint(&r, ROWS, Duration::from_secs(3));
    assert!(
        b.log_text().contains("holding the leader lease"),
        "{}",
        b.log_text()
    );
}
