//! Whole syncs through real connectors: a PostgreSQL model to the `http` destination (a
//! local double answering per-record errors, 429 with Retry-After and 5xx), and to a
//! PostgreSQL table in mirror mode.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::destination::{self, SecretData};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::state::file::FileStore;
use support::db::TestDb;
use support::http_server::{Behaviour, HttpDouble};

const MODEL: &str = "CREATE TABLE customers (id bigint PRIMARY KEY, email text, ltv numeric(20,2));
INSERT INTO customers SELECT i, 'user' || i || '@example.com', i * 1.25 FROM generate_series(1, 120) AS i;
UPDATE customers SET email = 'not-an-email' WHERE id IN (5, 77);";

fn sync_spec(mode: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, ltv FROM customers", primaryKey: [id]}}
destinationRef: {{name: d}}
mode: {mode}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email}}
  - {{from: ltv, to: ltv}}
"#
    ))
    .unwrap()
}

async fn run_sync(
    model_url: &str,
    dest: &DestinationSpec,
    secret: Option<&SecretData>,
    state: &std::path::Path,
    mode: &str,
) -> RunReport {
    let connector = destination::build(dest, secret).await.unwrap();
    let mut config = DeliveryConfig::resolve(dest, &connector.capabilities()).unwrap();
    config.initial_backoff = std::time::Duration::from_millis(20);
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let spec = sync_spec(mode);
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec: &spec,
        source_url: model_url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, limiter, config),
        scope: "default/d".into(),
    };
    run(
        job,
        &mut FileStore::new(state, "default", "customers"),
        &RunOptions::default(),
    )
    .await
}

#[tokio::test]
async fn an_http_sync_survives_throttling_and_outages_and_reports_rejected_records() {
    let model = TestDb::postgres("e2e_http").await;
    model.exec(MODEL).await;
    let double = HttpDouble::start(
        Behaviour::accept_all()
            .throttle_first(1, 1)
            .fail_first(2, 503)
            .reject_emails_without_at(),
    )
    .await;
    let dest: DestinationSpec = serde_yaml_ng::from_str(&format!(
        r#"
type: http
credentialsSecretRef: {{name: token}}
batchSize: 25
rateLimit: {{requestsPerSecond: 50}}
retry: {{maxAttempts: 5, initialBackoff: 20ms, maxBackoff: 200ms}}
http:
  url: "{}/ingest/{{{{operation}}}}"
  headers: {{Authorization: "Bearer {{{{secret.token}}}}"}}
  results: {{path: /results, errorField: error}}
"#,
        double.url
    ))
    .unwrap();
    let secret = SecretData::new(BTreeMap::from([("token".to_owned(), "tok-abcdef".to_owned())]));
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model.url, &dest, Some(&secret), state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected, report.failed), (118, 2, 0));
    assert_eq!(report.throttled, 1);
    assert!(
        report.retries >= 3,
        "one 429 and two 503 were retried: {}",
        report.retries
    );
    let mut rejected: Vec<_> = report.rejected_samples.iter().map(|r| r.key.as_str()).collect();
    rejected.sort();
    assert_eq!(rejected, vec!["5", "77"]);
    let first = &double.requests()[0];
    assert_eq!(first.path, "/ingest/upsert");
    assert_eq!(first.header("authorization"), Some("Bearer tok-abcdef"));
    assert!(
        double.requests().iter().any(|r| r
            .body_text()
            .contains(r#"{"email":"user1@example.com","id":1,"ltv":1.25}"#)),
        "canonical records with exact decimals in the body"
    );

    // The fixed rows are sent next run; nothing else is.
    model
        .exec("UPDATE customers SET email = 'fixed' || id || '@example.com' WHERE id IN (5, 77)")
        .await;
    let before = double.received_records().len();
    let report = run_sync(&model.url, &dest, Some(&secret), state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.received_records().len() - before, 2);
}

#[tokio::test]
async fn a_postgres_table_mirrors_the_model_and_a_second_run_writes_nothing() {
    let model = TestDb::postgres("e2e_src").await;
    model.exec(MODEL).await;
    let target = TestDb::postgres("e2e_dst").await;
    target
        .exec("CREATE TABLE contacts (id bigint PRIMARY KEY, email text, ltv numeric(20,2))")
        .await;
    let dest: DestinationSpec = serde_yaml_ng::from_str(
        "type: postgres\ncredentialsSecretRef: {name: db}\npostgres: {table: contacts}\n",
    )
    .unwrap();
    let secret = SecretData::new(BTreeMap::from([("url".to_owned(), target.url.clone())]));
    let state = tempfile::tempdir().unwrap();

    let first = run_sync(&model.url, &dest, Some(&secret), state.path(), "mirror").await;
    assert_eq!(
        (first.accepted, first.result),
        (120, RunResult::Succeeded),
        "{:?}",
        first.error
    );
    let second = run_sync(&model.url, &dest, Some(&secret), state.path(), "mirror").await;
    assert_eq!((second.plan.unchanged, second.requests), (120, 0));

    model
        .exec("DELETE FROM customers WHERE id > 100; UPDATE customers SET ltv = 99999999.99 WHERE id = 1")
        .await;
    let third = run_sync(&model.url, &dest, Some(&secret), state.path(), "mirror").await;
    assert_eq!((third.plan.changed, third.deleted), (1, 20));

    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&target.url)
        .await
        .unwrap();
    let (count, ltv): (i64, String) =
        sqlx::query_as("SELECT count(*), (SELECT ltv::text FROM contacts WHERE id = 1) FROM contacts")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!((count, ltv.as_str()), (100, "99999999.99"));
}
