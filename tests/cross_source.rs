//! The same model in PostgreSQL, MariaDB and SQLite plans to the same fingerprints: the
//! canonical form hides each database's types (NUMERIC vs DECIMAL vs REAL, TIMESTAMPTZ vs
//! DATETIME, BOOLEAN vs TINYINT).

mod support;

use std::sync::Arc;

use backflow::api::ReverseSyncSpec;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{PlanSample, RunOptions, SyncRun, run};
use backflow::state::file::FileStore;
use support::db::TestDb;
use support::fake_connector::FakeConnector;
use support::sqlite::TempSqlite;

const QUERY: &str = "SELECT id, email, amount, active, signed_up FROM customers ORDER BY id";

fn spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{QUERY}", primaryKey: [id]}}
destinationRef: {{name: fake}}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email}}
  - {{from: amount, to: amount}}
  - {{from: active, to: active}}
  - {{from: signed_up, to: signed_up, transforms: ['format("%Y-%m-%dT%H:%M:%SZ")']}}
"#
    ))
    .unwrap()
}

async fn plan(url: &str) -> (String, Vec<PlanSample>) {
    let spec = spec();
    let fake = Arc::new(FakeConnector::new(100));
    let config = DeliveryConfig {
        max_batch_bytes: backflow::destination::delivery::DEFAULT_MAX_BATCH_BYTES,
        batch_size: 100,
        max_concurrency: 1,
        max_attempts: 1,
        initial_backoff: std::time::Duration::from_millis(1),
        max_backoff: std::time::Duration::from_millis(1),
        requests_per_second: 1000.0,
        burst: 1000,
    };
    let state = tempfile::tempdir().unwrap();
    let job = SyncRun {
        namespace: "default",
        name: "x",
        spec: &spec,
        source_url: url,
        delivery: Delivery::new(fake, Arc::new(RateLimiter::new(1000.0, 1000)), config),
        scope: "s".into(),
    };
    let mut store = FileStore::new(state.path(), "default", "x");
    let report = run(
        job,
        &mut store,
        &RunOptions {
            dry_run: true,
            sample_size: 10,
            ..RunOptions::default()
        },
    )
    .await;
    assert!(report.error.is_none(), "{url}: {:?}", report.error);
    assert_eq!(report.plan.added, 3);
    (report.result_fingerprint, report.plan_samples)
}

const ROWS: &str = "(1, 'a@example.com', 10.50, true, '2024-01-02 03:04:05'),
                    (2, 'é@example.com', 0.10, false, '2024-06-30 23:59:59'),
                    (3, 'c@example.com', 12345.00, true, '2023-12-31 00:00:00')";

#[tokio::test]
async fn the_same_rows_fingerprint_the_same_in_postgres_mariadb_and_sqlite() {
    let pg = TestDb::postgres("xsrc").await;
    pg.exec(&format!(
        "SET TIME ZONE 'Europe/Paris';
         CREATE TABLE customers (id bigint PRIMARY KEY, email text, amount numeric(12,2), active boolean, signed_up timestamptz);
         INSERT INTO customers VALUES {}",
        ROWS.replace("'2024-01-02 03:04:05'", "'2024-01-02 04:04:05+01'")
            .replace("'2024-06-30 23:59:59'", "'2024-07-01 01:59:59+02'")
            .replace("'2023-12-31 00:00:00'", "'2023-12-31 00:00:00+00'")
    ))
    .await;
    let my = TestDb::mysql("xsrc").await;
    my.exec(&format!(
        "CREATE TABLE customers (id BIGINT PRIMARY KEY, email VARCHAR(100), amount DECIMAL(12,2), active BOOLEAN, signed_up DATETIME);
         INSERT INTO customers VALUES {ROWS}"
    ))
    .await;
    let lite = TempSqlite::new(&format!(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, amount REAL, active BOOLEAN, signed_up DATETIME);
         INSERT INTO customers VALUES {}",
        ROWS.replace("'2024-01-02 03:04:05'", "'2024-01-02T03:04:05Z'")
            .replace("'2024-06-30 23:59:59'", "'2024-06-30T23:59:59Z'")
            .replace("'2023-12-31 00:00:00'", "'2023-12-31T00:00:00Z'")
    ))
    .await;
    let (pg_fp, pg_samples) = plan(&pg.url).await;
    let (my_fp, my_samples) = plan(&my.url).await;
    let (lite_fp, lite_samples) = plan(&lite.url).await;
    assert_eq!(pg_samples, my_samples);
    assert_eq!(pg_samples, lite_samples);
    assert_eq!(
        pg_samples[1].record,
        r#"{"active":false,"amount":0.1,"email":"é@example.com","id":2,"signed_up":"2024-06-30T23:59:59Z"}"#
    );
    assert_eq!(pg_fp, my_fp);
    assert_eq!(pg_fp, lite_fp);
}
