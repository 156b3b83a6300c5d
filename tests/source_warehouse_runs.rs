//! Whole runs from each warehouse through the engine, as `backflow run` does them, into a
//! real PostgreSQL table: Snowflake, Databricks and BigQuery through their contract doubles,
//! ClickHouse on the real server.
//!
//! - A value without a canonical form (a float NaN or infinity, which all four can send)
//!   rejects only its row, named by its key; the run goes on and delivers the other rows.
//! - A column type that is not supported stops the run before anything is written, naming
//!   the column and the cast to use.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::model::secret::SecretData;
use backflow::source::Credentials;
use backflow::state::file::FileStore;
use serde_json::json;
use support::bigquery_double::{self as bq, BigQueryDouble, BqResult};
use support::clickhouse::{self as ch, TestClickHouse};
use support::databricks_double::{self as db, DatabricksDouble, DbResult};
use support::db::TestDb;
use support::snowflake_double::{self as sf, SfResult, SnowflakeDouble};

const QUERY: &str = "SELECT id, email, score FROM customers ORDER BY id";
/// Rows 1 to 6; row 3's score is NaN and row 5's is infinite.
const IDS: std::ops::RangeInclusive<u64> = 1..=6;

/// Where a run reads: the source URL, its credentials, and the double standing in for the
/// service (none for ClickHouse). The doubles live as long as the value.
struct Warehouse {
    name: &'static str,
    url: String,
    credentials: Credentials,
    endpoint: Option<String>,
    _keep: Box<dyn std::any::Any>,
}

fn credentials(key: &str, value: String) -> Credentials {
    Credentials::new(BTreeMap::from([(key.to_owned(), value)]))
}

/// Row `i`'s score as the warehouse writes it: `nan` and `inf` in its own spelling.
fn score(i: u64, nan: &str, inf: &str) -> String {
    match i {
        3 => nan.to_owned(),
        5 => inf.to_owned(),
        _ => format!("{}.5", i),
    }
}

async fn snowflake(columns: Vec<serde_json::Value>, rows: Vec<Vec<Option<String>>>) -> Warehouse {
    let double = SnowflakeDouble::start().await;
    double.running_polls(0);
    let rows = rows
        .iter()
        .map(|r| r.iter().map(Option::as_deref).collect())
        .collect();
    double.serve(QUERY, SfResult::rows(columns, rows).partitioned(2));
    Warehouse {
        name: "Snowflake",
        url: double.source_url(),
        credentials: credentials("private_key", sf::PRIVATE_KEY.to_owned()),
        endpoint: Some(double.url.clone()),
        _keep: Box::new(double),
    }
}

async fn databricks(columns: Vec<serde_json::Value>, rows: Vec<Vec<Option<String>>>) -> Warehouse {
    let double = DatabricksDouble::start().await;
    double.running_polls(0);
    let rows = rows
        .iter()
        .map(|r| r.iter().map(Option::as_deref).collect())
        .collect();
    double.serve(QUERY, DbResult::rows(columns, rows).chunked(2));
    Warehouse {
        name: "Databricks",
        url: double.source_url(),
        credentials: credentials("token", db::PAT.to_owned()),
        endpoint: Some(double.url.clone()),
        _keep: Box::new(double),
    }
}

async fn bigquery(fields: Vec<serde_json::Value>, rows: Vec<Vec<serde_json::Value>>) -> Warehouse {
    let double = BigQueryDouble::start().await;
    double.running_polls(0);
    double.serve(QUERY, BqResult::rows(fields, rows));
    Warehouse {
        name: "BigQuery",
        url: double.source_url(),
        credentials: credentials("service_account_json", bq::service_account_json()),
        endpoint: Some(double.url.clone()),
        _keep: Box::new(double),
    }
}

async fn clickhouse(table: &str, fill: &str) -> Warehouse {
    let db = TestClickHouse::new("runs").await;
    ch::exec(&format!(
        "CREATE TABLE {}.customers ({table}) ENGINE = Memory",
        db.name
    ))
    .await;
    ch::exec(&format!("INSERT INTO {}.customers {fill}", db.name)).await;
    Warehouse {
        name: "ClickHouse",
        url: db.url(),
        credentials: Credentials::default(),
        endpoint: None,
        _keep: Box::new(db),
    }
}

/// The four warehouses, each holding rows 1 to 6 with a NaN and an infinite score.
async fn warehouses_with_bad_floats() -> Vec<Warehouse> {
    let text = |i: u64, nan: &str, inf: &str| {
        vec![
            Some(i.to_string()),
            Some(format!("user{i}@example.com")),
            Some(score(i, nan, inf)),
        ]
    };
    let sf_col = |name: &str, kind: &str| json!({"name": name, "type": kind, "scale": 0, "precision": 38, "nullable": true});
    let db_col = |name: &str, kind: &str| json!({"name": name, "type_name": kind});
    let bq_field = |name: &str, kind: &str| json!({"name": name, "type": kind, "mode": "NULLABLE"});
    vec![
        snowflake(
            vec![
                sf_col("id", "fixed"),
                sf_col("email", "text"),
                sf_col("score", "real"),
            ],
            IDS.map(|i| text(i, "NaN", "inf")).collect(),
        )
        .await,
        databricks(
            vec![
                db_col("id", "LONG"),
                db_col("email", "STRING"),
                db_col("score", "DOUBLE"),
            ],
            IDS.map(|i| text(i, "NaN", "Infinity")).collect(),
        )
        .await,
        bigquery(
            vec![
                bq_field("id", "INTEGER"),
                bq_field("email", "STRING"),
                bq_field("score", "FLOAT"),
            ],
            IDS.map(|i| text(i, "NaN", "Infinity").into_iter().map(|v| json!(v)).collect())
                .collect(),
        )
        .await,
        clickhouse(
            "id Int64, email String, score Float64",
            // 0/0 and 1/0 are NaN and +inf in ClickHouse's Float64 division.
            "SELECT toInt64(number + 1) AS id, concat('user', toString(number + 1), '@example.com'),
               if(number + 1 = 3, 0 / 0, if(number + 1 = 5, 1 / 0, (number + 1) + 0.5))
             FROM system.numbers LIMIT 6",
        )
        .await,
    ]
}

fn spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        "source: {{connectionSecretRef: {{name: wh}}, query: \"{QUERY}\", primaryKey: [id]}}\n\
         destinationRef: {{name: crm}}\nmode: upsert\nmappings:\n\
         \x20 - {{from: id, to: id}}\n  - {{from: email, to: email}}\n  - {{from: score, to: score}}\n"
    ))
    .unwrap()
}

/// One run from `warehouse` into the `contacts` table of `table_url`: the destination built
/// from its spec behind the shared delivery, the File store, default run options but the
/// endpoint of the double.
async fn run_into(warehouse: &Warehouse, table_url: &str, state: &std::path::Path) -> RunReport {
    let dest: DestinationSpec = serde_yaml_ng::from_str(
        "type: postgres\ncredentialsSecretRef: {name: db}\npostgres: {table: contacts}\n",
    )
    .unwrap();
    let secret = SecretData::new(BTreeMap::from([("url".to_owned(), table_url.to_owned())]));
    let connector = destination::build(&dest, Some(&secret)).await.unwrap();
    let config = DeliveryConfig::resolve(&dest, &connector.capabilities()).unwrap();
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let spec = spec();
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec: &spec,
        source_url: &warehouse.url,
        source_credentials: warehouse.credentials.clone(),
        delivery: Delivery::new(connector, limiter, config),
        scope: "default/crm".into(),
    };
    let options = RunOptions {
        source_endpoint_override: warehouse.endpoint.clone(),
        ..RunOptions::default()
    };
    run(job, &mut FileStore::new(state, "default", "customers"), &options).await
}

async fn contacts_table(prefix: &str) -> TestDb {
    let target = TestDb::postgres(prefix).await;
    target
        .exec("CREATE TABLE contacts (id bigint PRIMARY KEY, email text, score double precision)")
        .await;
    target
}

/// The ids and scores in the destination table.
async fn contacts(table_url: &str) -> Vec<(i64, Option<f64>)> {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(table_url)
        .await
        .unwrap();
    sqlx::query_as("SELECT id, score FROM contacts ORDER BY id")
        .fetch_all(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn an_undecodable_value_from_each_warehouse_rejects_only_its_row_and_the_run_delivers_the_others() {
    for warehouse in warehouses_with_bad_floats().await {
        let name = warehouse.name;
        let target = contacts_table("wh_rows").await;
        let state = tempfile::tempdir().unwrap();
        let report = run_into(&warehouse, &target.url, state.path()).await;
        assert!(
            report.error.is_none(),
            "{name}: the run goes on: {:?}",
            report.error
        );
        assert_eq!(report.result, RunResult::PartiallySucceeded, "{name}");
        assert_eq!(
            (report.plan.rows_in_model, report.plan.rejected, report.accepted),
            (6, 2, 4),
            "{name}"
        );
        let mut samples: Vec<(&str, &str)> = report
            .rejected_samples
            .iter()
            .map(|r| (r.key.as_str(), r.reason.as_str()))
            .collect();
        samples.sort();
        assert_eq!(samples.len(), 2, "{name}: {samples:?}");
        assert!(
            samples[0].0 == "3" && samples[0].1.contains("\"score\"") && samples[0].1.contains("NaN"),
            "{name}: {samples:?}"
        );
        assert!(
            samples[1].0 == "5" && samples[1].1.contains("\"score\"") && samples[1].1.contains("Infinity"),
            "{name}: {samples:?}"
        );
        assert_eq!(
            contacts(&target.url).await,
            vec![(1, Some(1.5)), (2, Some(2.5)), (4, Some(4.5)), (6, Some(6.5))],
            "{name}: the other rows arrived, and nothing stood in for the bad values"
        );
    }
}

#[tokio::test]
async fn an_unsupported_column_type_from_each_warehouse_stops_the_run_naming_the_column_and_the_cast() {
    let one = |i: u64| vec![Some(i.to_string()), Some(format!("user{i}@example.com")), None];
    let sf_col = |name: &str, kind: &str| json!({"name": name, "type": kind, "scale": 0, "precision": 38, "nullable": true});
    let db_col =
        |name: &str, kind: &str, text: &str| json!({"name": name, "type_name": kind, "type_text": text});
    let bq_field = |name: &str, kind: &str| json!({"name": name, "type": kind, "mode": "NULLABLE"});
    let cases = [
        (
            snowflake(
                vec![
                    sf_col("id", "fixed"),
                    sf_col("email", "text"),
                    sf_col("score", "geography"),
                ],
                vec![one(1)],
            )
            .await,
            "ST_AsText(score) AS score",
        ),
        (
            databricks(
                vec![
                    db_col("id", "LONG", "bigint"),
                    db_col("email", "STRING", "string"),
                    db_col("score", "INTERVAL", "interval day to second"),
                ],
                vec![one(1)],
            )
            .await,
            "CAST(score AS STRING) AS score",
        ),
        (
            bigquery(
                vec![
                    bq_field("id", "INTEGER"),
                    bq_field("email", "STRING"),
                    bq_field("score", "GEOGRAPHY"),
                ],
                vec![vec![json!("1"), json!("user1@example.com"), json!("POINT(1 2)")]],
            )
            .await,
            "ST_AsText(score) AS score",
        ),
        (
            clickhouse(
                "id Int64, email String, score Tuple(UInt8, String)",
                "SELECT 1, 'user1@example.com', tuple(1, 'a')",
            )
            .await,
            "toString(score) AS score",
        ),
    ];
    for (warehouse, cast) in cases {
        let name = warehouse.name;
        let target = contacts_table("wh_types").await;
        let state = tempfile::tempdir().unwrap();
        let report = run_into(&warehouse, &target.url, state.path()).await;
        assert_eq!(report.result, RunResult::Failed, "{name}");
        let error = report.error.expect("the run stopped");
        assert_eq!(error.category(), "UnsupportedColumn", "{name}: {error}");
        let text = error.to_string();
        assert!(
            text.contains("column \"score\"") && text.contains(&format!("cast it in the query: {cast}")),
            "{name}: {text}"
        );
        assert!(contacts(&target.url).await.is_empty(), "{name}: nothing written");
    }
}
