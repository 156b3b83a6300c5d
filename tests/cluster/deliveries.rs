//! What a destination table received, to measure what a run cut short sends again: a
//! statement trigger makes every batch slow (so a run is still in flight when the test strikes)
//! and a row trigger logs each row written, with the database's clock.

use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ListParams};

use crate::count;
use crate::support::cluster_manifests::wait_until;
use crate::support::db::TestDb;

/// The Destination spec lines of a slow run: batches of 100, one at a time.
pub const SLOW_DESTINATION: &str = "  batchSize: 100\n  maxConcurrency: 1\n";

/// The engine's checkpoint interval in the operator (`RunOptions::default`): a run commits
/// what it delivered at least this often.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

/// From now on, table `crm` of `db` sleeps `pause_ms` per write statement (one batch) and logs
/// each row written to `deliveries (id, at)`.
pub async fn slow_and_counted(db: &TestDb, pause_ms: u32) {
    db.exec(&format!(
        "CREATE TABLE deliveries (id INT NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION log_delivery() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN INSERT INTO deliveries (id) VALUES (NEW.id); RETURN NEW; END $$;
         CREATE FUNCTION slow_batch() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN PERFORM pg_sleep({pause_ms} / 1000.0); RETURN NULL; END $$;
         CREATE TRIGGER log_delivery AFTER INSERT OR UPDATE ON crm FOR EACH ROW EXECUTE FUNCTION log_delivery();
         CREATE TRIGGER slow_batch AFTER INSERT OR UPDATE ON crm FOR EACH STATEMENT EXECUTE FUNCTION slow_batch();"
    ))
    .await;
}

/// Rows written so far.
pub async fn delivered(db: &TestDb) -> i64 {
    count(db, "SELECT count(*) FROM deliveries").await
}

/// What was sent more than once.
#[derive(Debug)]
pub struct Resent {
    /// Rows written, counting repeats.
    pub writes: i64,
    /// Distinct rows written.
    pub rows: i64,
    /// Rows written more than once.
    pub resent: i64,
    /// Seconds between the first writes of the earliest and the latest resent row: the span
    /// of the run that was sent again.
    pub span_seconds: f64,
}

/// Measures what was written more than once.
pub async fn resent(db: &TestDb) -> Resent {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let (writes, rows): (i64, i64) = sqlx::query_as("SELECT count(*), count(DISTINCT id) FROM deliveries")
        .fetch_one(&mut c)
        .await
        .unwrap();
    let (resent, span): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM max(first) - min(first))::float8
         FROM (SELECT min(at) AS first FROM deliveries GROUP BY id HAVING count(*) > 1) r",
    )
    .fetch_one(&mut c)
    .await
    .unwrap();
    Resent {
        writes,
        rows,
        resent,
        span_seconds: span.unwrap_or(0.0),
    }
}

/// Asserts that what was sent again is at most one checkpoint: the resent rows were first
/// written within one checkpoint interval (plus a batch and a commit: `slack`), and they are
/// not the whole run.
pub fn assert_at_most_one_checkpoint(r: &Resent, total: i64, slack: Duration) {
    let bound = (CHECKPOINT_INTERVAL + slack).as_secs_f64();
    assert!(
        r.span_seconds <= bound,
        "rows first written over {:.1} s were sent again, more than one checkpoint ({bound:.1} s): {r:?}",
        r.span_seconds
    );
    assert!(r.resent < total, "the whole run was sent again: {r:?}");
    assert_eq!(
        r.writes,
        r.rows + r.resent,
        "a row was sent more than twice: {r:?}"
    );
    assert_eq!(r.rows, total, "every row arrived: {r:?}");
}

/// The checkpoint (journal) ConfigMaps of sync `sync` in `namespace`.
pub async fn journals(client: &Client, namespace: &str, sync: &str) -> usize {
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    maps.list(&ListParams::default().labels(&format!("backflow.dev/sync={sync},backflow.dev/state=journal")))
        .await
        .map(|l| l.items.len())
        .unwrap_or(0)
}

/// Waits until the run of `sync` committed a checkpoint (a journal beyond `journals_before`)
/// and sent three more batches after it, so a fault now cuts a checkpoint in half; returns
/// the rows sent by then. Panics when the run ends first.
pub async fn past_a_checkpoint(
    db: &TestDb,
    client: &Client,
    namespace: &str,
    sync: &str,
    journals_before: usize,
    total: i64,
) -> i64 {
    let at_checkpoint = wait_until("a checkpoint of the run", Duration::from_secs(60), || async {
        let sent = delivered(db).await;
        let journals = journals(client, namespace, sync).await;
        assert!(sent < total, "the run ended before the test could strike");
        if journals > journals_before {
            Ok(sent)
        } else {
            Err(format!("{sent} rows sent, {journals} journals"))
        }
    })
    .await;
    wait_until(
        "three batches after the checkpoint",
        Duration::from_secs(30),
        || async {
            let sent = delivered(db).await;
            assert!(sent < total, "the run ended before the test could strike");
            if sent >= at_checkpoint + 300 {
                Ok(sent)
            } else {
                Err(format!("{sent} rows sent, {at_checkpoint} at the checkpoint"))
            }
        },
    )
    .await
}
