//! Whole syncs through real connectors: a PostgreSQL model to the `http` destination (a
//! local double answering per-record errors, 429 with Retry-After and 5xx), and to a
//! PostgreSQL table in mirror mode.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::destination::{self};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::model::secret::SecretData;
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

fn spec_of(mode: &str, query: &str, columns: &[&str]) -> ReverseSyncSpec {
    let mappings: String = columns
        .iter()
        .map(|c| format!("  - {{from: {c}, to: {c}}}\n"))
        .collect();
    serde_yaml_ng::from_str(&format!(
        "source: {{connectionSecretRef: {{name: wh}}, query: \"{query}\", primaryKey: [id]}}\n\
         destinationRef: {{name: d}}\nmode: {mode}\nmappings:\n{mappings}"
    ))
    .unwrap()
}

async fn run_spec(
    model_url: &str,
    spec: &ReverseSyncSpec,
    table_url: &str,
    state: &std::path::Path,
) -> RunReport {
    let dest: DestinationSpec = serde_yaml_ng::from_str(
        "type: postgres\ncredentialsSecretRef: {name: db}\npostgres: {table: contacts}\n",
    )
    .unwrap();
    let secret = SecretData::new(BTreeMap::from([("url".to_owned(), table_url.to_owned())]));
    let connector = destination::build(&dest, Some(&secret)).await.unwrap();
    let config = DeliveryConfig::resolve(&dest, &connector.capabilities()).unwrap();
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec,
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

/// The ids in the destination table, sorted.
async fn ids_in(table_url: &str) -> Vec<i64> {
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(table_url)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT id FROM contacts ORDER BY id")
        .fetch_all(&mut c)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_postgres_value_without_a_canonical_form_rejects_its_row_and_mirror_keeps_its_record() {
    let model = TestDb::postgres("e2e_nan_src").await;
    model
        .exec(
            "CREATE TABLE customers (id bigint PRIMARY KEY, ltv numeric, seen timestamptz);
             INSERT INTO customers SELECT i, i * 1.5, '2024-01-01T00:00:00Z' FROM generate_series(1, 20) AS i;",
        )
        .await;
    let target = TestDb::postgres("e2e_nan_dst").await;
    target
        .exec("CREATE TABLE contacts (id bigint PRIMARY KEY, ltv numeric, seen timestamptz)")
        .await;
    let state = tempfile::tempdir().unwrap();
    let spec = spec_of(
        "mirror",
        "SELECT id, ltv, seen FROM customers",
        &["id", "ltv", "seen"],
    );
    let first = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert_eq!(
        (first.accepted, first.result),
        (20, RunResult::Succeeded),
        "{:?}",
        first.error
    );

    model
        .exec(
            "UPDATE customers SET ltv = 'NaN' WHERE id = 3;
             UPDATE customers SET ltv = 'Infinity' WHERE id = 4;
             UPDATE customers SET seen = '-infinity' WHERE id = 5;
             UPDATE customers SET ltv = 1000 WHERE id = 6;",
        )
        .await;
    let second = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert!(second.error.is_none(), "the run goes on: {:?}", second.error);
    assert_eq!(second.result, RunResult::PartiallySucceeded);
    assert_eq!((second.plan.rows_in_model, second.plan.rejected), (20, 3));
    assert_eq!(
        (second.plan.removed, second.deleted),
        (0, 0),
        "a rejected row is not a removed row"
    );
    assert_eq!(
        (second.plan.changed, second.accepted),
        (1, 1),
        "the good change still goes out"
    );
    let mut samples: Vec<_> = second
        .rejected_samples
        .iter()
        .map(|r| (r.key.as_str(), r.reason.as_str()))
        .collect();
    samples.sort();
    assert_eq!(samples.len(), 3, "{samples:?}");
    assert!(
        samples[0].0 == "3" && samples[0].1.contains("\"ltv\"") && samples[0].1.contains("numeric NaN"),
        "{samples:?}"
    );
    assert!(
        samples[1].0 == "4" && samples[1].1.contains("numeric Infinity"),
        "{samples:?}"
    );
    assert!(
        samples[2].0 == "5" && samples[2].1.contains("\"seen\"") && samples[2].1.contains("-infinity"),
        "{samples:?}"
    );
    assert_eq!(ids_in(&target.url).await, (1..=20).collect::<Vec<_>>());

    // Fixed rows go out on the next run, like any rejected row.
    model
        .exec("UPDATE customers SET ltv = 7, seen = '2024-02-01T00:00:00Z' WHERE id IN (3, 4, 5)")
        .await;
    let third = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert_eq!((third.result, third.accepted), (RunResult::Succeeded, 3));
}

#[tokio::test]
async fn a_mysql_zero_date_or_binary_value_rejects_its_row_and_the_run_goes_on() {
    let model = TestDb::mysql("e2e_zero_src").await;
    model
        .exec(
            "SET SESSION sql_mode = '';
             CREATE TABLE customers (id BIGINT PRIMARY KEY, born DATE, tag VARBINARY(8));
             INSERT INTO customers VALUES (1, '1990-01-01', 'a'), (2, '0000-00-00', 'b'),
               (3, '1991-02-03', UNHEX('FF')), (4, '1992-03-04', 'd');",
        )
        .await;
    let target = TestDb::postgres("e2e_zero_dst").await;
    target
        .exec("CREATE TABLE contacts (id bigint PRIMARY KEY, born date, tag text)")
        .await;
    let state = tempfile::tempdir().unwrap();
    let spec = spec_of(
        "upsert",
        "SELECT id, born, tag FROM customers",
        &["id", "born", "tag"],
    );
    let report = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.accepted, report.plan.rejected), (2, 2));
    let mut samples: Vec<_> = report
        .rejected_samples
        .iter()
        .map(|r| (r.key.as_str(), r.reason.as_str()))
        .collect();
    samples.sort();
    assert!(
        samples[0].0 == "2" && samples[0].1.contains("\"born\"") && samples[0].1.contains("zero date"),
        "{samples:?}"
    );
    assert!(
        samples[1].0 == "3" && samples[1].1.contains("\"tag\"") && samples[1].1.contains("not UTF-8"),
        "{samples:?}"
    );
    assert_eq!(ids_in(&target.url).await, vec![1, 4]);

    model
        .exec("UPDATE customers SET born = '1993-01-01', tag = 'c' WHERE id IN (2, 3)")
        .await;
    let again = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert_eq!((again.result, again.accepted), (RunResult::Succeeded, 2));
    assert_eq!(ids_in(&target.url).await, vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn a_plain_delete_or_update_model_says_it_tried_to_write_on_postgres_and_mysql() {
    let pg = TestDb::postgres("e2e_write_pg").await;
    pg.exec("CREATE TABLE customers (id bigint PRIMARY KEY); INSERT INTO customers VALUES (1), (2);")
        .await;
    let my = TestDb::mysql("e2e_write_my").await;
    my.exec("CREATE TABLE customers (id BIGINT PRIMARY KEY); INSERT INTO customers VALUES (1), (2);")
        .await;
    let target = TestDb::postgres("e2e_write_dst").await;
    target.exec("CREATE TABLE contacts (id bigint PRIMARY KEY)").await;
    for (url, model) in [
        (&pg.url, "DELETE FROM customers"),
        (&pg.url, "UPDATE customers SET id = id + 10"),
        (&my.url, "DELETE FROM customers"),
        (&my.url, "UPDATE customers SET id = id + 10"),
    ] {
        let state = tempfile::tempdir().unwrap();
        let report = run_spec(url, &spec_of("upsert", model, &["id"]), &target.url, state.path()).await;
        let error = report.error.as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(error.contains("it tried to write"), "{model}: {error}");
        assert!(!error.contains("has no column"), "{model}: {error}");
        assert_eq!(report.requests, 0);
    }
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&pg.url)
        .await
        .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM customers ORDER BY id")
        .fetch_all(&mut c)
        .await
        .unwrap();
    assert_eq!(ids, vec![1, 2], "nothing was written");
}

async fn run_spec_with(
    model_url: &str,
    spec: &ReverseSyncSpec,
    table_url: &str,
    state: &std::path::Path,
    options: RunOptions,
) -> RunReport {
    let dest: DestinationSpec = serde_yaml_ng::from_str(
        "type: postgres\ncredentialsSecretRef: {name: db}\npostgres: {table: contacts}\n",
    )
    .unwrap();
    let secret = SecretData::new(BTreeMap::from([("url".to_owned(), table_url.to_owned())]));
    let connector = destination::build(&dest, Some(&secret)).await.unwrap();
    let config = DeliveryConfig::resolve(&dest, &connector.capabilities()).unwrap();
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec,
        source_url: model_url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, limiter, config),
        scope: "default/d".into(),
    };
    run(job, &mut FileStore::new(state, "default", "customers"), &options).await
}

#[tokio::test]
async fn a_model_that_lost_most_rows_deletes_nothing_until_its_plan_is_approved_on_postgres_and_mysql() {
    let pg = TestDb::postgres("e2e_guard_pg").await;
    pg.exec("CREATE TABLE customers (id bigint PRIMARY KEY, plan text); INSERT INTO customers SELECT i, 'free' FROM generate_series(1, 40) AS i;")
        .await;
    let my = TestDb::mysql("e2e_guard_my").await;
    my.exec(
        "CREATE TABLE customers (id BIGINT PRIMARY KEY, plan TEXT);
         INSERT INTO customers SELECT seq, 'free' FROM seq_1_to_40;",
    )
    .await;
    for (model, url) in [(&pg, pg.url.clone()), (&my, my.url.clone())] {
        let target = TestDb::postgres("e2e_guard_dst").await;
        target
            .exec("CREATE TABLE contacts (id bigint PRIMARY KEY, plan text)")
            .await;
        let state = tempfile::tempdir().unwrap();
        let spec = spec_of("mirror", "SELECT id, plan FROM customers", &["id", "plan"]);
        let first = run_spec_with(&url, &spec, &target.url, state.path(), RunOptions::default()).await;
        assert_eq!(first.accepted, 40, "{:?}", first.error);

        // A wrong filter upstream: 30 of 40 rows gone, and one real change.
        model
            .exec("DELETE FROM customers WHERE id > 10; UPDATE customers SET plan = 'pro' WHERE id = 1;")
            .await;
        let held = run_spec_with(&url, &spec, &target.url, state.path(), RunOptions::default()).await;
        assert!(held.deletes_held_back(), "{url}");
        assert_eq!(
            (held.deleted, held.accepted, held.result),
            (0, 1, RunResult::Failed)
        );
        assert_eq!(ids_in(&target.url).await.len(), 40, "nothing deleted");

        let preview = run_spec_with(
            &url,
            &spec,
            &target.url,
            state.path(),
            RunOptions {
                dry_run: true,
                ..RunOptions::default()
            },
        )
        .await;
        let plan_id = preview.delete_check.clone().unwrap().plan_id;
        assert!(
            preview.deletes_held_back() && plan_id.starts_with("30-"),
            "{plan_id}"
        );
        assert_eq!(
            plan_id,
            held.delete_check.unwrap().plan_id,
            "the held-back rows are still planned"
        );

        let approved = run_spec_with(
            &url,
            &spec,
            &target.url,
            state.path(),
            RunOptions {
                approved_deletes: Some(plan_id),
                ..RunOptions::default()
            },
        )
        .await;
        assert_eq!((approved.deleted, approved.result), (30, RunResult::Succeeded));
        assert_eq!(ids_in(&target.url).await, (1..=10).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_jsonb_null_and_sql_null_are_different_values_and_arrive_as_such() {
    let model = TestDb::postgres("e2e_jnull_src").await;
    model
        .exec(
            "CREATE TABLE customers (id bigint PRIMARY KEY, j jsonb);
             INSERT INTO customers VALUES (1, 'null'), (2, NULL), (3, '{\"a\": null}');",
        )
        .await;
    let target = TestDb::postgres("e2e_jnull_dst").await;
    target
        .exec("CREATE TABLE contacts (id bigint PRIMARY KEY, j jsonb)")
        .await;
    let state = tempfile::tempdir().unwrap();
    let spec = spec_of("upsert", "SELECT id, j FROM customers", &["id", "j"]);
    let read = || async {
        let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&target.url)
            .await
            .unwrap();
        sqlx::query_as::<_, (i64, Option<String>)>("SELECT id, jsonb_typeof(j) FROM contacts ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap()
    };
    let first = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert_eq!(first.accepted, 3, "{:?}", first.error);
    assert_eq!(
        read().await,
        vec![
            (1, Some("null".to_owned())),
            (2, None),
            (3, Some("object".to_owned()))
        ],
        "JSON null arrives as JSON null, SQL NULL as SQL NULL"
    );

    model
        .exec("UPDATE customers SET j = NULL WHERE id = 1; UPDATE customers SET j = 'null' WHERE id = 2;")
        .await;
    let second = run_spec(&model.url, &spec, &target.url, state.path()).await;
    assert_eq!(
        (second.plan.changed, second.plan.unchanged),
        (2, 1),
        "both flips are changes"
    );
    assert_eq!(
        read().await,
        vec![
            (1, None),
            (2, Some("null".to_owned())),
            (3, Some("object".to_owned()))
        ]
    );
}

#[tokio::test]
async fn huge_floats_reach_a_json_destination_as_numbers_and_non_finite_floats_reject_their_row() {
    let model = TestDb::postgres("e2e_float_src").await;
    model
        .exec(
            "CREATE TABLE customers (id bigint PRIMARY KEY, f float8);
             INSERT INTO customers VALUES (1, 1e308), (2, 'NaN'), (3, '-Infinity'), (4, 0.1), (5, -2.5e21);",
        )
        .await;
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let dest: DestinationSpec =
        serde_yaml_ng::from_str(&format!("type: http\nhttp:\n  url: \"{}/ingest\"\n", double.url)).unwrap();
    let connector = destination::build(&dest, None).await.unwrap();
    let config = DeliveryConfig::resolve(&dest, &connector.capabilities()).unwrap();
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let spec = spec_of("upsert", "SELECT id, f FROM customers", &["id", "f"]);
    let state = tempfile::tempdir().unwrap();
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec: &spec,
        source_url: &model.url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, limiter, config),
        scope: "default/d".into(),
    };
    let report = run(
        job,
        &mut FileStore::new(state.path(), "default", "customers"),
        &RunOptions::default(),
    )
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.accepted, report.plan.rejected), (3, 2));
    let body: String = double.requests().iter().map(|r| r.body_text()).collect();
    assert!(body.contains(r#""f":1e308"#), "{body}");
    assert!(body.contains(r#""f":-2.5e21"#), "{body}");
    assert!(body.contains(r#""f":0.1"#), "{body}");
    assert!(
        !body.contains("NaN") && !body.contains("inf") && !body.contains("0000000000"),
        "{body}"
    );
    let mut reasons: Vec<_> = report
        .rejected_samples
        .iter()
        .map(|r| format!("{}: {}", r.key, r.reason))
        .collect();
    reasons.sort();
    assert!(
        reasons[0].starts_with("2: column \"f\"") && reasons[0].contains("float NaN"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("3: column \"f\"") && reasons[1].contains("float -Infinity"),
        "{reasons:?}"
    );
}
