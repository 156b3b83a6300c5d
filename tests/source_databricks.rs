//! The Databricks SQL source against the Statement Execution API double: personal access
//! token and OAuth M2M, polling, chunks behind external links (never sent the token, never
//! shown), types, read-only refusal, retries, token renewal, errors, timeout and cancellation.

mod support;

use std::str::FromStr;
use std::time::Duration;

use backflow::model::value::Value;
use backflow::source::{Credentials, RowStream, SourceError};
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Value as Json, json};
use support::databricks_double::{self as db, DatabricksDouble, DbResult};
use support::http_server::Behaviour;
use support::warehouse::{credentials, extract_via};

const QUERY: &str = "SELECT * FROM main.marts.customers ORDER BY id";

fn pat() -> Credentials {
    credentials(&[("token", db::PAT)])
}

async fn open_with(
    double: &DatabricksDouble,
    url: &str,
    credentials: &Credentials,
    query: &str,
    timeout: Duration,
) -> Result<RowStream, SourceError> {
    extract_via(&double.url, url, credentials, query, timeout).await
}

async fn collect(stream: RowStream) -> Result<Vec<Vec<Value>>, SourceError> {
    support::rows::collect_decoded(stream).await
}

async fn rows_of(
    double: &DatabricksDouble,
    credentials: &Credentials,
) -> Result<Vec<Vec<Value>>, SourceError> {
    let stream = open_with(
        double,
        &double.source_url(),
        credentials,
        QUERY,
        Duration::from_secs(30),
    )
    .await?;
    collect(stream).await
}

fn col(name: &str, type_name: &str, type_text: &str) -> Json {
    json!({"name": name, "type_name": type_name, "type_text": type_text, "position": 0})
}

fn ids(count: usize) -> DbResult {
    let rows: Vec<Vec<Option<&str>>> = (1..=count)
        .map(|i| vec![Some(&*Box::leak(i.to_string().into_boxed_str()))])
        .collect();
    DbResult::rows(vec![col("id", "LONG", "bigint")], rows)
}

fn ts(text: &str) -> Value {
    Value::Timestamp(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
}

fn assert_no_secret(text: &str) {
    for secret in [
        db::PAT,
        db::CLIENT_SECRET,
        DatabricksDouble::link_signature_prefix(),
        "Bearer",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test]
async fn every_databricks_type_maps_to_its_canonical_value() {
    let double = DatabricksDouble::start().await;
    double.serve(
        QUERY,
        DbResult::rows(
            vec![
                col("id", "LONG", "bigint"),
                col("small", "SHORT", "smallint"),
                col("amount", "DECIMAL", "decimal(12,2)"),
                col("ratio", "DOUBLE", "double"),
                col("name", "STRING", "string"),
                col("active", "BOOLEAN", "boolean"),
                col("born", "DATE", "date"),
                col("seen", "TIMESTAMP", "timestamp"),
                col("local", "TIMESTAMP_NTZ", "timestamp_ntz"),
                col("tags", "ARRAY", "array<string>"),
                col("attrs", "STRUCT", "struct<a:int>"),
                col("raw", "BINARY", "binary"),
            ],
            vec![
                vec![
                    Some("1"),
                    Some("-3"),
                    Some("10.50"),
                    Some("0.1"),
                    Some("héllo ✓"),
                    Some("true"),
                    Some("2024-02-29"),
                    Some("2024-03-01T12:00:00.000Z"),
                    Some("2024-03-01T12:00:00"),
                    Some("[\"a\",\"b\"]"),
                    Some("{\"a\":1}"),
                    Some("3q2+7w=="),
                ],
                vec![
                    Some("2"),
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                    None,
                ],
            ],
        ),
    );
    let stream = open_with(
        &double,
        &double.source_url(),
        &pat(),
        QUERY,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(stream.columns()[2].type_name, "DECIMAL(12,2)");
    let rows = collect(stream).await.unwrap();
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Int(-3),
            Value::Decimal(BigDecimal::from_str("10.5").unwrap()),
            Value::Float(0.1),
            Value::Text("héllo ✓".into()),
            Value::Bool(true),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            ts("2024-03-01T12:00:00Z"),
            ts("2024-03-01T12:00:00Z"),
            Value::Json(json!(["a", "b"])),
            Value::Json(json!({"a": 1})),
            Value::Text("deadbeef".into()),
        ]
    );
    assert!(rows[1][1..].iter().all(|v| *v == Value::Null));

    let submitted = double
        .requests()
        .into_iter()
        .find(|r| r.method == "POST")
        .unwrap()
        .json
        .unwrap();
    assert_eq!(submitted["warehouse_id"], json!(db::WAREHOUSE_ID));
    assert_eq!(submitted["catalog"], json!("main"));
    assert_eq!(submitted["schema"], json!("marts"));
    assert_eq!(submitted["disposition"], json!("EXTERNAL_LINKS"));
    assert_eq!(submitted["format"], json!("JSON_ARRAY"));
    assert_eq!(submitted["on_wait_timeout"], json!("CONTINUE"));
}

#[tokio::test]
async fn a_running_statement_is_polled_and_its_chunks_arrive_in_order_without_the_token() {
    let double = DatabricksDouble::start().await;
    double.running_polls(3);
    double.serve(QUERY, ids(9).chunked(2));
    let rows = rows_of(&double, &pat()).await.unwrap();
    let got: Vec<Value> = rows.into_iter().map(|mut r| r.remove(0)).collect();
    assert_eq!(got, (1..=9).map(Value::Int).collect::<Vec<_>>());

    let downloads = double.downloads();
    assert_eq!(downloads.len(), 5);
    for download in &downloads {
        assert_eq!(
            download.header("authorization"),
            None,
            "the token reached cloud storage"
        );
        assert_eq!(download.status, Some(200));
        assert_eq!(
            download.header("x-amz-server-side-encryption-customer-algorithm"),
            Some("AES256"),
            "the link's own headers are sent"
        );
    }
    let chunk_calls = double
        .requests()
        .iter()
        .filter(|r| r.path.contains("/result/chunks/"))
        .count();
    assert_eq!(chunk_calls, 4, "chunk 0 comes with the statement");
}

#[tokio::test]
async fn oauth_machine_to_machine_gets_a_token_and_renews_it_when_refused() {
    let double = DatabricksDouble::start().await;
    double.serve(QUERY, ids(4).chunked(2));
    let url = double
        .source_url()
        .replace("databricks://", &format!("databricks://{}@", db::CLIENT_ID));
    let oauth = credentials(&[("client_secret", db::CLIENT_SECRET)]);
    let stream = open_with(&double, &url, &oauth, QUERY, Duration::from_secs(30))
        .await
        .unwrap();
    double.expire_tokens(1);
    assert_eq!(collect(stream).await.unwrap().len(), 4);
    let token_calls = double
        .requests()
        .iter()
        .filter(|r| r.path == "/oidc/v1/token")
        .count();
    assert_eq!(token_calls, 2, "one token, then a new one after the 401");

    let wrong = credentials(&[
        ("client_secret", "wrong-secret-value"),
        ("client_id", db::CLIENT_ID),
    ]);
    let err = open_with(
        &double,
        &double.source_url(),
        &wrong,
        QUERY,
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    assert!(!err.to_string().contains("wrong-secret-value"), "{err}");
}

#[tokio::test]
async fn an_expired_link_is_asked_for_again_and_a_dead_one_is_never_shown() {
    let double = DatabricksDouble::start().await;
    double.serve(QUERY, ids(4).chunked(2));
    double.expire_links(1);
    assert_eq!(rows_of(&double, &pat()).await.unwrap().len(), 4);

    double.expire_links(10);
    let err = rows_of(&double, &pat()).await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(text.contains("cloud storage") && text.contains("403"), "{text}");
    assert_no_secret(&text);
}

#[tokio::test]
async fn throttled_and_unavailable_answers_are_retried() {
    let double = DatabricksDouble::start_with(Behaviour::accept_all().fail_first(1, 503)).await;
    double.throttle_chunks(2);
    double.serve(QUERY, ids(5).chunked(2));
    assert_eq!(rows_of(&double, &pat()).await.unwrap().len(), 5);
    let statuses: Vec<Option<u16>> = double.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses[0], Some(503));
    assert_eq!(statuses.iter().filter(|s| **s == Some(429)).count(), 2);
}

#[tokio::test]
async fn a_wrong_token_a_missing_warehouse_and_a_query_error_are_clear() {
    let double = DatabricksDouble::start().await;
    double.serve(QUERY, ids(1));
    let err = rows_of(&double, &credentials(&[("token", "dapi-not-valid-at-all")]))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("Invalid access token"), "{err}");
    assert!(!err.to_string().contains("dapi-not-valid-at-all"), "{err}");

    let url = double.source_url().replace(db::WAREHOUSE_ID, "0000deadbeef");
    let err = open_with(&double, &url, &pat(), QUERY, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Config { .. }), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    let err = open_with(
        &double,
        &double.source_url(),
        &pat(),
        "SELECT * FROM nowhere",
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("TABLE_OR_VIEW_NOT_FOUND")),
        "{err:?}"
    );
    assert_no_secret(&err.to_string());
}

#[tokio::test]
async fn a_query_that_writes_is_refused_before_anything_is_sent() {
    let double = DatabricksDouble::start().await;
    for query in [
        "DELETE FROM t",
        "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
        "SELECT 1; DROP TABLE t",
    ] {
        let err = open_with(
            &double,
            &double.source_url(),
            &pat(),
            query,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, SourceError::ReadOnly(_)), "{query}: {err:?}");
    }
    assert_eq!(double.requests().len(), 0);
}

#[tokio::test]
async fn a_statement_past_the_timeout_is_cancelled_and_reported() {
    let double = DatabricksDouble::start().await;
    double.run_forever();
    double.serve(QUERY, ids(1));
    let err = open_with(
        &double,
        &double.source_url(),
        &pat(),
        QUERY,
        Duration::from_millis(500),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Timeout(_)), "{err:?}");
    for _ in 0..100 {
        if !double.cancelled().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(double.cancelled().len(), 1);
}

#[tokio::test]
async fn an_unsupported_type_stops_the_run_naming_the_column() {
    let double = DatabricksDouble::start().await;
    double.serve(
        QUERY,
        DbResult::rows(vec![col("span", "INTERVAL", "interval day to second")], vec![]),
    );
    let err = rows_of(&double, &pat()).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::UnsupportedType { column, .. } if column == "span"),
        "{err:?}"
    );
}
