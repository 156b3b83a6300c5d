//! What one row may cost a run: a value or a mapped record past its size limit, or a decimal
//! whose exponent would expand to millions of digits, rejects that row with a reason naming the
//! column (never the value); the other rows land. Batches are cut by bytes as well as records.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backflow::api::ReverseSyncSpec;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{RunOptions, RunReport, SyncRun, run};
use backflow::state::file::FileStore;
use support::fake_connector::{FakeConnector, fast_delivery};
use support::sqlite::TempSqlite;

/// Row 1 is ordinary. Row 2 has a 2 MB note; row 3 a decimal column holding `1e300000000` (as
/// text: a plain `DECIMAL` column would store it as a REAL infinity, `DECIMAL TEXT` keeps it);
/// row 4 a text that `to_number` would turn into that number; row 5 five 900 kB values, each
/// under the value limit but together over the record limit.
const SETUP: &str = "
CREATE TABLE wide (id INTEGER PRIMARY KEY, note TEXT, amount DECIMAL TEXT, raw TEXT,
                   a TEXT, b TEXT, c TEXT, d TEXT, e TEXT);
INSERT INTO wide (id, note, amount, raw) VALUES (1, 'fine', '10.50', '12');
INSERT INTO wide (id, note, amount, raw) VALUES (2, hex(zeroblob(1000000)), '1', '1');
INSERT INTO wide (id, note, amount, raw) VALUES (3, 'fine', '1e300000000', '1');
INSERT INTO wide (id, note, amount, raw) VALUES (4, 'fine', '2', '1e300000000');
INSERT INTO wide VALUES (5, 'fine', '3', '1', hex(zeroblob(450000)), hex(zeroblob(450000)),
                         hex(zeroblob(450000)), hex(zeroblob(450000)), hex(zeroblob(450000)));
";

fn spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(
        r#"
source: {connectionSecretRef: {name: wh}, query: "SELECT * FROM wide", primaryKey: [id]}
destinationRef: {name: fake}
mappings:
  - {from: id, to: id}
  - {from: note, to: note}
  - {from: amount, to: amount}
  - {from: raw, to: raw, transforms: [to_number]}
  - {from: a, to: a}
  - {from: b, to: b}
  - {from: c, to: c}
  - {from: d, to: d}
  - {from: e, to: e}
"#,
    )
    .unwrap()
}

async fn run_into(db: &TempSqlite, spec: &ReverseSyncSpec, delivery: Delivery) -> RunReport {
    let state = tempfile::tempdir().unwrap();
    let job = SyncRun {
        namespace: "default",
        name: "wide",
        spec,
        source_url: &db.url,
        source_credentials: Default::default(),
        delivery,
        scope: "default/fake".into(),
    };
    let mut store = FileStore::new(state.path(), "default", "wide");
    run(job, &mut store, &RunOptions::default()).await
}

#[tokio::test]
async fn oversized_values_records_and_exponents_reject_their_rows_by_column_and_the_rest_land() {
    let db = TempSqlite::new(SETUP).await;
    let fake = Arc::new(FakeConnector::new(100));
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        run_into(&db, &spec(), fast_delivery(fake.clone(), 3)),
    )
    .await
    .expect("a few bytes of exponent cannot burn minutes of CPU");
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(fake.sent_keys(), ["1"], "only the ordinary row is sent");
    let reasons: Vec<&str> = report
        .rejected_samples
        .iter()
        .map(|r| r.reason.as_str())
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    let has = |needle: &str| reasons.iter().any(|r| r.contains(needle));
    assert!(has("column \"note\" holds a value of about"), "{reasons:?}");
    assert!(
        has("column \"amount\" holds a decimal whose exponent"),
        "{reasons:?}"
    );
    assert!(has("to_number: the number's exponent is outside"), "{reasons:?}");
    assert!(has("the mapped record is"), "{reasons:?}");
    let samples = format!("{:?}", report.rejected_samples);
    assert!(!samples.contains("0000000000"), "no value in the reasons");
}

#[tokio::test]
async fn batches_are_cut_by_bytes_before_they_reach_their_record_count() {
    let db = TempSqlite::new(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40)
         INSERT INTO t SELECT i, hex(zeroblob(500)) FROM n;",
    )
    .await;
    let spec: ReverseSyncSpec = serde_yaml_ng::from_str(
        r#"
source: {connectionSecretRef: {name: wh}, query: "SELECT id, note FROM t", primaryKey: [id]}
destinationRef: {name: fake}
mappings: [{from: id, to: id}, {from: note, to: note}]
"#,
    )
    .unwrap();
    let fake = Arc::new(FakeConnector::new(100));
    let config = DeliveryConfig {
        batch_size: 100,
        max_batch_bytes: 5_000,
        max_concurrency: 1,
        max_attempts: 1,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
        requests_per_second: 100_000.0,
        burst: 100_000,
    };
    let delivery = Delivery::new(
        fake.clone(),
        Arc::new(RateLimiter::new(100_000.0, 100_000)),
        config,
    );
    let report = run_into(&db, &spec, delivery).await;
    assert_eq!(report.accepted, 40);
    // Each spilled row is a little over 1 kB: four fit in 5 kB, never the 100 records allowed.
    let calls = fake.calls.lock().unwrap().clone();
    assert!(calls.len() >= 10, "{} calls", calls.len());
    assert!(calls.iter().all(|(_, keys)| keys.len() <= 4), "{calls:?}");
}
