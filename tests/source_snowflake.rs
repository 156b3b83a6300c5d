//! The Snowflake source against the SQL API double: key-pair and OAuth authentication,
//! asynchronous execution and partitions, types, read-only refusal, retries, token renewal,
//! errors without secrets, cancellation.

mod support;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::ReverseSyncSpec;
use backflow::engine::run::{RunOptions, SyncRun, run};
use backflow::model::value::Value;
use backflow::source::{Credentials, RowStream, SourceError};
use backflow::state::file::FileStore;
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use serde_json::{Value as Json, json};
use support::fake_connector::{FakeConnector, fast_delivery};
use support::http_server::Behaviour;
use support::snowflake_double::{self as sf, SfResult, SnowflakeDouble};
use support::warehouse::{credentials, extract_via};

const QUERY: &str = "SELECT * FROM customers ORDER BY id";

fn key_pair() -> Credentials {
    credentials(&[("private_key", sf::PRIVATE_KEY)])
}

async fn open(
    double: &SnowflakeDouble,
    url: &str,
    credentials: &Credentials,
    query: &str,
) -> Result<RowStream, SourceError> {
    extract_via(&double.url, url, credentials, query, Duration::from_secs(30)).await
}

async fn collect(stream: RowStream) -> Result<Vec<Vec<Value>>, SourceError> {
    support::rows::collect_decoded(stream).await
}

async fn rows_of(
    double: &SnowflakeDouble,
    credentials: &Credentials,
) -> Result<Vec<Vec<Value>>, SourceError> {
    collect(open(double, &double.source_url(), credentials, QUERY).await?).await
}

fn col(name: &str, kind: &str) -> Json {
    json!({"name": name, "type": kind, "nullable": true})
}

fn fixed(name: &str, precision: u32, scale: u32) -> Json {
    json!({"name": name, "type": "fixed", "precision": precision, "scale": scale, "nullable": true})
}

fn ids(count: usize) -> SfResult {
    let rows = (1..=count).map(|i| Box::leak(i.to_string().into_boxed_str()) as &str);
    SfResult::rows(vec![fixed("ID", 38, 0)], rows.map(|i| vec![Some(i)]).collect())
}

fn ts(text: &str) -> Value {
    Value::Timestamp(DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc))
}

#[tokio::test]
async fn every_snowflake_type_maps_to_its_canonical_value() {
    let double = SnowflakeDouble::start().await;
    double.serve(
        QUERY,
        SfResult::rows(
            vec![
                fixed("ID", 38, 0),
                fixed("AMOUNT", 12, 2),
                fixed("HUGE", 38, 0),
                col("RATIO", "real"),
                col("NAME", "text"),
                col("ACTIVE", "boolean"),
                col("BORN", "date"),
                col("WAKES", "time"),
                col("NTZ", "timestamp_ntz"),
                col("LTZ", "timestamp_ltz"),
                col("TZ", "timestamp_tz"),
                col("V", "variant"),
                col("O", "object"),
                col("A", "array"),
                col("BIN", "binary"),
            ],
            vec![
                vec![
                    Some("1"),
                    Some("10.50"),
                    Some("99999999999999999999999999999999999999"),
                    Some("0.1"),
                    Some("héllo ✓"),
                    Some("true"),
                    Some("19782"),
                    Some("49455.500000000"),
                    Some("1709294400.000000000"),
                    Some("1709294400.123456789"),
                    Some("1709294400.000000000 1560"),
                    Some("\"text\""),
                    Some("{\n  \"b\": [1, 2],\n  \"a\": null\n}"),
                    Some("[1, \"x\"]"),
                    Some("DEADBEEF"),
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
                    None,
                    None,
                    None,
                ],
            ],
        ),
    );
    let stream = open(&double, &double.source_url(), &key_pair(), QUERY)
        .await
        .unwrap();
    let types: Vec<String> = stream.columns().iter().map(|c| c.type_name.clone()).collect();
    assert_eq!(types[..3], ["NUMBER(38,0)", "NUMBER(12,2)", "NUMBER(38,0)"]);
    assert_eq!(types[10], "TIMESTAMP_TZ");
    let rows = collect(stream).await.unwrap();
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Decimal(BigDecimal::from_str("10.5").unwrap()),
            Value::Decimal(BigDecimal::from_str("99999999999999999999999999999999999999").unwrap()),
            Value::Float(0.1),
            Value::Text("héllo ✓".into()),
            Value::Bool(true),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            Value::Time(NaiveTime::from_hms_milli_opt(13, 44, 15, 500).unwrap()),
            ts("2024-03-01T12:00:00Z"),
            ts("2024-03-01T12:00:00.123456789Z"),
            ts("2024-03-01T12:00:00Z"),
            Value::Json(json!("text")),
            Value::Json(json!({"a": null, "b": [1, 2]})),
            Value::Json(json!([1, "x"])),
            Value::Text("deadbeef".into()),
        ]
    );
    assert!(rows[1][1..].iter().all(|v| *v == Value::Null), "{:?}", rows[1]);

    // The session travels in the body, with one statement allowed and the timeout in seconds.
    let body = &double.submitted()[0];
    assert_eq!(body["warehouse"], json!(sf::WAREHOUSE));
    assert_eq!(body["role"], json!(sf::ROLE));
    assert_eq!(body["database"], json!("ANALYTICS"));
    assert_eq!(body["schema"], json!("MARTS"));
    assert_eq!(body["timeout"], json!(30));
    assert_eq!(body["parameters"]["MULTI_STATEMENT_COUNT"], json!("1"));
}

#[tokio::test]
async fn a_running_statement_is_polled_and_its_partitions_arrive_in_order() {
    let double = SnowflakeDouble::start().await;
    double.running_polls(3);
    double.serve(QUERY, ids(9).partitioned(2));
    let rows = rows_of(&double, &key_pair()).await.unwrap();
    let got: Vec<Value> = rows.into_iter().map(|mut r| r.remove(0)).collect();
    assert_eq!(got, (1..=9).map(Value::Int).collect::<Vec<_>>());

    let requests = double.requests();
    let polls = requests
        .iter()
        .filter(|r| r.method == "GET" && r.query.is_none())
        .count();
    assert_eq!(polls, 4, "three 202s, then the result");
    let mut partitions: Vec<String> = requests
        .iter()
        .filter_map(|r| r.query.clone())
        .filter(|q| q.starts_with("partition="))
        .collect();
    partitions.sort();
    assert_eq!(
        partitions,
        ["partition=1", "partition=2", "partition=3", "partition=4"]
    );
    for request in &requests {
        assert!(
            request
                .header("authorization")
                .is_some_and(|h| h.starts_with("Bearer "))
        );
        assert_eq!(
            request.header("x-snowflake-authorization-token-type"),
            Some("KEYPAIR_JWT")
        );
    }
}

#[tokio::test]
async fn a_pkcs1_key_and_an_oauth_token_authenticate_too() {
    let double = SnowflakeDouble::start().await;
    double.serve(QUERY, ids(3));
    let pkcs1 = credentials(&[("private_key", sf::PRIVATE_KEY_PKCS1)]);
    assert_eq!(rows_of(&double, &pkcs1).await.unwrap().len(), 3);

    double.accept_oauth("oauth-access-token-1");
    let oauth = credentials(&[("token", "oauth-access-token-1")]);
    assert_eq!(rows_of(&double, &oauth).await.unwrap().len(), 3);
    let last = double.requests().pop().unwrap();
    assert_eq!(last.header("x-snowflake-authorization-token-type"), Some("OAUTH"));
}

#[tokio::test]
async fn throttled_and_unavailable_answers_are_retried() {
    let double = SnowflakeDouble::start_with(Behaviour::accept_all().fail_first(1, 503)).await;
    double.throttle_partitions(2);
    double.serve(QUERY, ids(5).partitioned(2));
    let rows = rows_of(&double, &key_pair()).await.unwrap();
    assert_eq!(rows.len(), 5);
    let statuses: Vec<Option<u16>> = double.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == Some(429)).count(), 2);
    assert_eq!(statuses[0], Some(503));
    // The resubmitted statement keeps its request id and says it is a retry.
    let posts: Vec<String> = double
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.query.clone().unwrap_or_default())
        .collect();
    let id = |q: &str| {
        q.split('&')
            .find(|kv| kv.starts_with("requestId="))
            .map(str::to_owned)
    };
    assert!(
        !posts[0].contains("retry=true") && posts[1].contains("retry=true"),
        "{posts:?}"
    );
    assert_eq!(id(&posts[0]), id(&posts[1]));
}

#[tokio::test]
async fn an_expired_token_is_renewed_once_and_the_run_goes_on() {
    let double = SnowflakeDouble::start().await;
    double.serve(QUERY, ids(4).partitioned(2));
    double.expire_tokens(1);
    assert_eq!(rows_of(&double, &key_pair()).await.unwrap().len(), 4);
    assert_eq!(double.requests()[0].status, Some(401));

    // A token refused again after renewal is an authentication error, not a loop.
    double.expire_tokens(2);
    let err = rows_of(&double, &key_pair()).await.unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(err.is_permanent());
}

#[tokio::test]
async fn a_key_snowflake_does_not_know_is_refused_without_showing_it() {
    let double = SnowflakeDouble::start().await;
    double.serve(QUERY, ids(1));
    let err = rows_of(&double, &credentials(&[("private_key", sf::OTHER_PRIVATE_KEY)]))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Auth { .. }), "{err:?}");
    assert_eq!(err.category(), "SourceAuthFailed");
    let text = format!("{err} {err:?}");
    assert!(text.contains("JWT token is invalid"), "{text}");
    let key_line = sf::OTHER_PRIVATE_KEY.lines().nth(1).unwrap();
    assert!(!text.contains(key_line), "{text}");
    assert!(!text.contains("Bearer"), "{text}");

    let err = rows_of(&double, &credentials(&[("private_key", "not a key")]))
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::Config { .. }), "{err:?}");
    assert!(!err.to_string().contains("not a key"), "{err}");
}

#[tokio::test]
async fn a_query_that_writes_is_refused_before_anything_is_sent() {
    let double = SnowflakeDouble::start().await;
    for query in [
        "DELETE FROM customers",
        "SELECT 1; DROP TABLE customers",
        "CALL refresh()",
    ] {
        let err = open(&double, &double.source_url(), &key_pair(), query)
            .await
            .unwrap_err();
        assert!(matches!(err, SourceError::ReadOnly(_)), "{query}: {err:?}");
    }
    assert_eq!(double.requests().len(), 0);
}

#[tokio::test]
async fn query_errors_and_a_missing_warehouse_or_role_are_clear() {
    let double = SnowflakeDouble::start().await;
    let err = open(
        &double,
        &double.source_url(),
        &key_pair(),
        "SELECT * FROM nowhere",
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("does not exist") && m.contains("002003")),
        "{err:?}"
    );
    let no_warehouse = double.source_url().replace("warehouse=COMPUTE_WH&", "");
    let err = open(&double, &no_warehouse, &key_pair(), QUERY)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("No active warehouse"), "{err}");
    let bad_role = double.source_url().replace("role=REPORTER", "role=ADMIN");
    let err = open(&double, &bad_role, &key_pair(), QUERY).await.unwrap_err();
    assert!(err.to_string().contains("Role specified"), "{err}");
    assert!(err.is_permanent());
}

#[tokio::test]
async fn a_statement_stopped_by_its_timeout_is_a_timeout() {
    let double = SnowflakeDouble::start().await;
    double.fail(
        QUERY,
        "000630",
        "Statement reached its statement or warehouse timeout of 30 second(s) and was canceled.",
    );
    let err = rows_of(&double, &key_pair()).await.unwrap_err();
    assert!(
        matches!(err, SourceError::Timeout(d) if d == Duration::from_secs(30)),
        "{err:?}"
    );
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn a_value_that_cannot_be_decoded_names_its_column_and_an_unknown_type_stops_the_run() {
    let double = SnowflakeDouble::start().await;
    double.serve(
        QUERY,
        SfResult::rows(
            vec![fixed("ID", 38, 0), col("BORN", "date")],
            vec![vec![Some("1"), Some("not-a-day")]],
        ),
    );
    let err = rows_of(&double, &key_pair()).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Decode { column, .. } if column == "BORN"),
        "{err:?}"
    );

    double.serve(QUERY, SfResult::rows(vec![col("SHAPE", "geography")], vec![]));
    let err = rows_of(&double, &key_pair()).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::UnsupportedType { column, type_name } if column == "SHAPE" && type_name == "GEOGRAPHY"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_cancelled_run_cancels_the_running_statement() {
    let double = SnowflakeDouble::start().await;
    double.run_forever();
    let spec: ReverseSyncSpec = serde_yaml_ng::from_str(&format!(
        "source: {{connectionSecretRef: {{name: wh}}, query: \"{QUERY}\", primaryKey: [ID]}}\ndestinationRef: {{name: fake}}\nmappings: [{{from: ID, to: id}}]\n"
    ))
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let options = RunOptions {
        source_endpoint_override: Some(double.url.clone()),
        ..RunOptions::default()
    };
    let cancel = options.cancel.clone();
    let url = double.source_url();
    let running = {
        let options = options.clone();
        let spec = spec.clone();
        let state = state.path().to_owned();
        tokio::spawn(async move {
            let job = SyncRun {
                namespace: "default",
                name: "x",
                spec: &spec,
                source_url: &url,
                source_credentials: key_pair(),
                delivery: fast_delivery(Arc::new(FakeConnector::new(100)), 1),
                scope: "s".into(),
            };
            run(job, &mut FileStore::new(&state, "default", "x"), &options).await
        })
    };
    // Wait until the statement is running, then stop the run.
    for _ in 0..100 {
        if double.requests().len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cancel.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.error.map(|e| e.category()), Some("Cancelled"));
    for _ in 0..100 {
        if !double.cancelled().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(double.cancelled().len(), 1);
}
