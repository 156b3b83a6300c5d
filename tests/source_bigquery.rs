//! The BigQuery source against the REST API double: service-account JWTs, the dry run's
//! statement type and byte guard, `jobComplete: false` polling, paging by `startIndex` ahead (or by `pageToken`), types
//! (exact NUMERIC/BIGNUMERIC, TIMESTAMP, DATETIME, ARRAY, STRUCT, JSON), retries, token
//! renewal, errors without secrets, cancellation.

mod support;

use std::str::FromStr;
use std::time::Duration;

use backflow::model::value::{Document, Value};
use backflow::source::{Credentials, RowStream, SourceError};
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde_json::{Value as Json, json};
use support::bigquery_double::{self as bq, BigQueryDouble, BqResult};
use support::http_server::Behaviour;
use support::warehouse::{credentials, extract_via};

const QUERY: &str = "SELECT * FROM marts.customers ORDER BY id";

fn key() -> Credentials {
    credentials(&[("service_account_json", &bq::service_account_json())])
}

async fn open_with(
    double: &BigQueryDouble,
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

async fn rows_of(double: &BigQueryDouble, url: &str) -> Result<Vec<Vec<Value>>, SourceError> {
    collect(open_with(double, url, &key(), QUERY, Duration::from_secs(30)).await?).await
}

fn field(name: &str, kind: &str) -> Json {
    json!({"name": name, "type": kind, "mode": "NULLABLE"})
}

fn ids(count: u64) -> BqResult {
    BqResult::rows(
        vec![field("id", "INTEGER")],
        (1..=count).map(|i| vec![json!(i.to_string())]).collect(),
    )
}

fn ts(text: &str) -> Value {
    Value::Timestamp(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
}

#[tokio::test]
async fn every_bigquery_type_maps_to_its_canonical_value() {
    let double = BigQueryDouble::start().await;
    double.serve(
        QUERY,
        BqResult::rows(
            vec![
                field("id", "INTEGER"),
                field("amount", "NUMERIC"),
                field("huge", "BIGNUMERIC"),
                field("ratio", "FLOAT"),
                field("name", "STRING"),
                field("active", "BOOLEAN"),
                field("born", "DATE"),
                field("wakes", "TIME"),
                field("local", "DATETIME"),
                field("seen", "TIMESTAMP"),
                field("doc", "JSON"),
                field("raw", "BYTES"),
                json!({"name": "tags", "type": "STRING", "mode": "REPEATED"}),
                json!({"name": "address", "type": "RECORD", "mode": "NULLABLE", "fields": [field("city", "STRING"), field("zip", "INTEGER")]}),
            ],
            vec![
                vec![
                    json!("1"),
                    json!("10.50"),
                    json!("123456789012345678901234567890.12345678901234567890"),
                    json!("0.1"),
                    json!("héllo ✓"),
                    json!("true"),
                    json!("2024-02-29"),
                    json!("13:44:15.500000"),
                    json!("2024-03-01T12:00:00"),
                    json!("1709294400000000"),
                    json!("{\"b\":[1,2],\"a\":null}"),
                    json!("3q2+7w=="),
                    json!([{"v": "x"}, {"v": "y"}]),
                    json!({"f": [{"v": "Paris"}, {"v": "75001"}]}),
                ],
                vec![json!("2"), Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, Json::Null, json!([]), Json::Null],
            ],
        ),
    );
    let rows = rows_of(&double, &double.source_url()).await.unwrap();
    let mut address = Document::new();
    address.insert("city".into(), Value::Text("Paris".into()));
    address.insert("zip".into(), Value::Int(75001));
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Decimal(BigDecimal::from_str("10.5").unwrap()),
            Value::Decimal(
                BigDecimal::from_str("123456789012345678901234567890.1234567890123456789").unwrap()
            ),
            Value::Float(0.1),
            Value::Text("héllo ✓".into()),
            Value::Bool(true),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            Value::Time(NaiveTime::from_hms_milli_opt(13, 44, 15, 500).unwrap()),
            ts("2024-03-01T12:00:00Z"),
            ts("2024-03-01T12:00:00Z"),
            Value::Json(json!({"a": null, "b": [1, 2]})),
            Value::Text("deadbeef".into()),
            Value::Array(vec![Value::Text("x".into()), Value::Text("y".into())]),
            Value::Object(address),
        ]
    );
    assert_eq!(rows[1][12], Value::Array(vec![]));
    assert!(rows[1][1..12].iter().all(|v| *v == Value::Null));

    let query = double
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/queries"))
        .unwrap()
        .json
        .unwrap();
    assert_eq!(query["location"], json!("EU"));
    assert_eq!(query["defaultDataset"]["datasetId"], json!(bq::DATASET));
    assert_eq!(query["useLegacySql"], json!(false));
    assert_eq!(query["formatOptions"]["useInt64Timestamp"], json!(true));
}

#[tokio::test]
async fn a_running_job_is_polled_and_its_pages_arrive_in_order() {
    let double = BigQueryDouble::start().await;
    double.running_polls(2);
    double.serve(QUERY, ids(25_005));
    let rows = rows_of(&double, &double.source_url()).await.unwrap();
    assert_eq!(rows.len(), 25_005);
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, r)| r[0] == Value::Int(i as i64 + 1))
    );
    let pages: Vec<String> = double
        .requests()
        .iter()
        .filter_map(|r| r.query.clone())
        .filter(|q| q.contains("startIndex"))
        .collect();
    assert_eq!(
        pages.len(),
        2,
        "10,000 rows a page: two more pages after the first, by row offset: {pages:?}"
    );
    for start in ["startIndex=10000", "startIndex=20000"] {
        assert!(pages.iter().any(|q| q.contains(start)), "{start} in {pages:?}");
    }
    assert!(pages.iter().all(|q| !q.contains("pageToken")));
    // The dry run came first.
    assert!(
        double
            .requests()
            .iter()
            .find(|r| r.path.ends_with("/jobs"))
            .unwrap()
            .json
            .as_ref()
            .unwrap()["configuration"]["dryRun"]
            == json!(true)
    );
}

#[tokio::test]
async fn pages_cut_short_are_completed_and_answers_without_a_row_count_page_by_token() {
    let double = BigQueryDouble::start().await;
    double.serve(QUERY, ids(25_005));
    // BigQuery cuts pages at about 10 MB: every window is fetched in several requests.
    double.page_cap(3_000);
    let rows = rows_of(&double, &double.source_url()).await.unwrap();
    assert_eq!(rows.len(), 25_005);
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, r)| r[0] == Value::Int(i as i64 + 1))
    );
    let by_offset = double
        .requests()
        .iter()
        .filter(|r| r.query.as_deref().is_some_and(|q| q.contains("startIndex")))
        .count();
    assert_eq!(
        by_offset, 9,
        "rows 3,000 to 25,005 in windows of 10,000, each in pages of at most 3,000"
    );

    let double = BigQueryDouble::start().await;
    double.serve(QUERY, ids(25_005));
    double.without_total_rows();
    let rows = rows_of(&double, &double.source_url()).await.unwrap();
    assert_eq!(rows.len(), 25_005);
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, r)| r[0] == Value::Int(i as i64 + 1))
    );
    let by_token = double
        .requests()
        .iter()
        .filter(|r| r.query.as_deref().is_some_and(|q| q.contains("pageToken")))
        .count();
    assert_eq!(by_token, 2, "without totalRows, the pages follow their tokens");
}

#[tokio::test]
async fn the_dry_run_refuses_writes_and_queries_over_the_byte_limit() {
    let double = BigQueryDouble::start().await;
    for query in [
        "DELETE FROM marts.customers WHERE true",
        "INSERT INTO marts.x SELECT 1",
        "MERGE marts.t USING s ON true WHEN MATCHED THEN DELETE",
    ] {
        let err = open_with(
            &double,
            &double.source_url(),
            &key(),
            query,
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&err, SourceError::ReadOnly(m) if m.contains("dry run")),
            "{query}: {err:?}"
        );
    }
    assert!(
        double.requests().iter().all(|r| !r.path.ends_with("/queries")),
        "nothing ran"
    );

    double.serve(QUERY, ids(3).processing(5_000_000));
    let url = format!("{}&maximumBytesBilled=1000000", double.source_url());
    let err = rows_of(&double, &url).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("maximumBytesBilled")),
        "{err:?}"
    );
    let url = format!("{}&maximumBytesBilled=9000000", double.source_url());
    assert_eq!(rows_of(&double, &url).await.unwrap().len(), 3);
    let sent = double
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.path.ends_with("/queries"))
        .unwrap()
        .json
        .unwrap();
    assert_eq!(sent["maximumBytesBilled"], json!("9000000"));
}

#[tokio::test]
async fn rate_limits_expired_tokens_and_unavailability_are_survived() {
    let double = BigQueryDouble::start_with(Behaviour::accept_all().fail_first(1, 503)).await;
    double.serve(QUERY, ids(25_000));
    let stream = open_with(
        &double,
        &double.source_url(),
        &key(),
        QUERY,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    double.throttle_pages(1);
    double.expire_tokens(1);
    assert_eq!(collect(stream).await.unwrap().len(), 25_000);
    let tokens: Vec<Option<u16>> = double
        .requests()
        .iter()
        .filter(|r| r.path == "/token")
        .map(|r| r.status)
        .collect();
    assert_eq!(
        tokens,
        [Some(503), Some(200), Some(200)],
        "a retried 503, one token, then a new one after the 401"
    );
    assert!(double.requests().iter().any(|r| r.status == Some(403)));
}

#[tokio::test]
async fn bad_credentials_a_missing_dataset_and_a_query_error_are_clear() {
    let double = BigQueryDouble::start().await;
    double.serve(QUERY, ids(1));
    let mut other: Json = serde_json::from_str(&bq::service_account_json()).unwrap();
    other["private_key"] = json!(support::snowflake_double::OTHER_PRIVATE_KEY);
    let other = other.to_string();
    let err = open_with(
        &double,
        &double.source_url(),
        &credentials(&[("service_account_json", &other)]),
        QUERY,
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(text.contains("invalid_grant"), "{text}");
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains("assertion"),
        "{text}"
    );

    let err = open_with(
        &double,
        &double.source_url(),
        &credentials(&[("service_account_json", "{not json")]),
        QUERY,
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Config { .. }), "{err:?}");

    let url = double.source_url().replace("/marts", "/missing");
    let err = rows_of(&double, &url).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("Dataset acme-analytics:missing was not found"),
        "{err}"
    );

    let err = open_with(
        &double,
        &double.source_url(),
        &key(),
        "SELECT * FROM nowhere",
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("notFound")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_job_past_the_timeout_is_cancelled_and_reported() {
    let double = BigQueryDouble::start().await;
    double.run_forever();
    double.serve(QUERY, ids(1));
    let err = open_with(
        &double,
        &double.source_url(),
        &key(),
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
async fn the_metadata_server_is_refused_unless_the_operator_allows_it() {
    let double = BigQueryDouble::start().await;
    double.serve(QUERY, ids(1));
    let url = format!("{}&auth=metadata", double.source_url());
    let err = open_with(
        &double,
        &url,
        &Credentials::default(),
        QUERY,
        Duration::from_secs(30),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SourceError::Config { reason, .. } if reason.contains("BACKFLOW_GCP_METADATA_AUTH")),
        "{err:?}"
    );
    assert_eq!(double.requests().len(), 0);
}
