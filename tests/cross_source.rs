//! The same model in PostgreSQL, MariaDB, SQLite and ClickHouse plans to the same
//! fingerprints: the canonical form hides each database's types (NUMERIC vs DECIMAL vs REAL,
//! TIMESTAMPTZ vs DATETIME, BOOLEAN vs TINYINT, UInt64 vs NUMERIC, text[] vs Array(String)),
//! and so do the cloud warehouses' doubles, serving the same rows in their wire formats.

mod support;

use std::sync::Arc;

use backflow::api::ReverseSyncSpec;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{PlanSample, RunOptions, SyncRun, run};
use backflow::source::Credentials;
use backflow::state::file::FileStore;
use support::bigquery_double::{self, BigQueryDouble, BqResult};
use support::clickhouse::TestClickHouse;
use support::databricks_double::{self, DatabricksDouble, DbResult};
use support::db::TestDb;
use support::fake_connector::FakeConnector;
use support::snowflake_double::{self, SfResult, SnowflakeDouble};
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
    plan_from(url, spec(), Credentials::default(), None).await
}

async fn plan_spec(url: &str, spec: ReverseSyncSpec) -> (String, Vec<PlanSample>) {
    plan_from(url, spec, Credentials::default(), None).await
}

/// Plans from a source that needs credentials, or a local double in place of the vendor.
async fn plan_from(
    url: &str,
    spec: ReverseSyncSpec,
    credentials: Credentials,
    endpoint: Option<&str>,
) -> (String, Vec<PlanSample>) {
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
        source_credentials: credentials,
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
            source_endpoint_override: endpoint.map(str::to_owned),
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

/// The rows of `ROWS` in PostgreSQL, loaded the way the PostgreSQL test above loads them.
async fn postgres_plan() -> (String, Vec<PlanSample>, TestDb) {
    let pg = TestDb::postgres("xsrc_cloud").await;
    pg.exec(&format!(
        "CREATE TABLE customers (id bigint PRIMARY KEY, email text, amount numeric(12,2), active boolean, signed_up timestamptz);
         INSERT INTO customers VALUES {}",
        ROWS.replace("'2024-01-02 03:04:05'", "'2024-01-02 03:04:05+00'")
            .replace("'2024-06-30 23:59:59'", "'2024-06-30 23:59:59+00'")
            .replace("'2023-12-31 00:00:00'", "'2023-12-31 00:00:00+00'")
    ))
    .await;
    let (fp, samples) = plan(&pg.url).await;
    (fp, samples, pg)
}

#[tokio::test]
async fn the_same_rows_fingerprint_the_same_in_postgres_and_snowflake() {
    let (pg_fp, pg_samples, _pg) = postgres_plan().await;
    let double = SnowflakeDouble::start().await;
    // Lower-case names, as `SELECT id AS "id"` would return; TIMESTAMP_TZ in its wire form
    // (UTC epoch seconds, then the offset in minutes plus 1440: here +01:00 and +02:00).
    let col = |name: &str, kind: &str, scale: u32| serde_json::json!({"name": name, "type": kind, "scale": scale, "precision": 38, "nullable": true});
    double.serve(
        QUERY,
        SfResult::rows(
            vec![
                col("id", "fixed", 0),
                col("email", "text", 0),
                col("amount", "fixed", 2),
                col("active", "boolean", 0),
                col("signed_up", "timestamp_tz", 9),
            ],
            vec![
                vec![
                    Some("1"),
                    Some("a@example.com"),
                    Some("10.50"),
                    Some("true"),
                    Some("1704164645.000000000 1500"),
                ],
                vec![
                    Some("2"),
                    Some("é@example.com"),
                    Some("0.10"),
                    Some("false"),
                    Some("1719791999.000000000 1560"),
                ],
                vec![
                    Some("3"),
                    Some("c@example.com"),
                    Some("12345.00"),
                    Some("true"),
                    Some("1703980800.000000000 1440"),
                ],
            ],
        )
        .partitioned(2),
    );
    let credentials =
        Credentials::new([("private_key".to_owned(), snowflake_double::PRIVATE_KEY.to_owned())].into());
    let (sf_fp, sf_samples) = plan_from(&double.source_url(), spec(), credentials, Some(&double.url)).await;
    assert_eq!(pg_samples, sf_samples);
    assert_eq!(pg_fp, sf_fp);
}

#[tokio::test]
async fn the_same_rows_fingerprint_the_same_in_postgres_and_databricks() {
    let (pg_fp, pg_samples, _pg) = postgres_plan().await;
    let double = DatabricksDouble::start().await;
    let col = |name: &str, kind: &str| serde_json::json!({"name": name, "type_name": kind});
    double.serve(
        QUERY,
        DbResult::rows(
            vec![
                col("id", "LONG"),
                col("email", "STRING"),
                col("amount", "DECIMAL"),
                col("active", "BOOLEAN"),
                col("signed_up", "TIMESTAMP"),
            ],
            vec![
                vec![
                    Some("1"),
                    Some("a@example.com"),
                    Some("10.50"),
                    Some("true"),
                    Some("2024-01-02T04:04:05.000+01:00"),
                ],
                vec![
                    Some("2"),
                    Some("é@example.com"),
                    Some("0.10"),
                    Some("false"),
                    Some("2024-06-30T23:59:59.000Z"),
                ],
                vec![
                    Some("3"),
                    Some("c@example.com"),
                    Some("12345.00"),
                    Some("true"),
                    Some("2023-12-31T00:00:00.000Z"),
                ],
            ],
        )
        .chunked(2),
    );
    let credentials = Credentials::new([("token".to_owned(), databricks_double::PAT.to_owned())].into());
    let (fp, samples) = plan_from(&double.source_url(), spec(), credentials, Some(&double.url)).await;
    assert_eq!(pg_samples, samples);
    assert_eq!(pg_fp, fp);
}

#[tokio::test]
async fn the_same_rows_fingerprint_the_same_in_postgres_and_bigquery() {
    let (pg_fp, pg_samples, _pg) = postgres_plan().await;
    let double = BigQueryDouble::start().await;
    let field = |name: &str, kind: &str| serde_json::json!({"name": name, "type": kind, "mode": "NULLABLE"});
    let v = |s: &str| serde_json::json!(s);
    double.serve(
        QUERY,
        BqResult::rows(
            vec![
                field("id", "INTEGER"),
                field("email", "STRING"),
                field("amount", "NUMERIC"),
                field("active", "BOOLEAN"),
                field("signed_up", "TIMESTAMP"),
            ],
            vec![
                vec![
                    v("1"),
                    v("a@example.com"),
                    v("10.5"),
                    v("true"),
                    v("1704164645000000"),
                ],
                vec![
                    v("2"),
                    v("é@example.com"),
                    v("0.1"),
                    v("false"),
                    v("1719791999000000"),
                ],
                vec![
                    v("3"),
                    v("c@example.com"),
                    v("12345"),
                    v("true"),
                    v("1703980800000000"),
                ],
            ],
        ),
    );
    let credentials = Credentials::new(
        [(
            "service_account_json".to_owned(),
            bigquery_double::service_account_json(),
        )]
        .into(),
    );
    let url = double.source_url();
    let (fp, samples) = plan_from(&url, spec(), credentials, Some(&double.url)).await;
    assert_eq!(pg_samples, samples);
    assert_eq!(pg_fp, fp);
}

/// Columns ClickHouse 18.16 has an equivalent for (it has no Bool type: booleans are
/// UInt8 there, read as integers, so `active` is left out).
const WIDE_QUERY: &str =
    "SELECT id, email, amount, signed_up, big, uid, tags, score, day FROM customers ORDER BY id";

fn wide_spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{WIDE_QUERY}", primaryKey: [id]}}
destinationRef: {{name: fake}}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email}}
  - {{from: amount, to: amount}}
  - {{from: signed_up, to: signed_up}}
  - {{from: big, to: big}}
  - {{from: uid, to: uid}}
  - {{from: tags, to: tags}}
  - {{from: score, to: score}}
  - {{from: day, to: day}}
"#
    ))
    .unwrap()
}

#[tokio::test]
async fn the_same_rows_fingerprint_the_same_in_postgres_and_clickhouse() {
    let pg = TestDb::postgres("xsrc_ch").await;
    pg.exec(
        "SET TIME ZONE 'Europe/Paris';
         CREATE TABLE customers (id bigint PRIMARY KEY, email text, amount numeric(12,2),
           signed_up timestamptz, big numeric(20,0), uid uuid, tags text[], score float8, day date);
         INSERT INTO customers VALUES
           (1, 'a@example.com', 10.50, '2024-10-27 02:30:00+02', 18446744073709551615,
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', ARRAY['vip', 'say \"hi\"'], 0.1, '2024-02-29'),
           (2, 'é@example.com', 0.10, '2024-10-27 02:30:00+01', 0,
            '00000000-0000-0000-0000-000000000000', '{}', NULL, '1970-01-01'),
           (3, 'c@example.com', 12345.00, '2023-12-31 00:00:00+00', 9223372036854775808,
            'ffffffff-ffff-ffff-ffff-ffffffffffff', ARRAY[''], -2.5e-7, '2099-12-31')",
    )
    .await;
    let ch = TestClickHouse::new("xsrc").await;
    // DateTime('Europe/Paris') holds the instant; rows 1 and 2 are the two 02:30 of the
    // night the clocks went back.
    ch.exec(
        "CREATE TABLE customers (id Int64, email String, amount Decimal(12, 2),
           signed_up DateTime('Europe/Paris'), big UInt64, uid UUID, tags Array(String),
           score Nullable(Float64), day Date) ENGINE = MergeTree ORDER BY id;
         INSERT INTO customers VALUES
           (1, 'a@example.com', 10.50, 1729989000, 18446744073709551615,
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', ['vip', 'say \"hi\"'], 0.1, '2024-02-29'),
           (2, 'é@example.com', 0.10, 1729992600, 0,
            '00000000-0000-0000-0000-000000000000', [], NULL, '1970-01-01'),
           (3, 'c@example.com', 12345.00, 1703980800, 9223372036854775808,
            'ffffffff-ffff-ffff-ffff-ffffffffffff', [''], -2.5e-7, '2099-12-31')",
    )
    .await;
    let (pg_fp, pg_samples) = plan_spec(&pg.url, wide_spec()).await;
    let (ch_fp, ch_samples) = plan_spec(&ch.url(), wide_spec()).await;
    assert_eq!(pg_samples, ch_samples);
    assert_eq!(
        pg_samples[0].record,
        r#"{"amount":10.5,"big":18446744073709551615,"day":"2024-02-29","email":"a@example.com","id":1,"score":0.1,"signed_up":"2024-10-27T00:30:00Z","tags":["vip","say \"hi\""],"uid":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"}"#
    );
    assert_eq!(pg_fp, ch_fp);
}
