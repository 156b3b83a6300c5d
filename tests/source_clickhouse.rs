//! The ClickHouse source against the real server (Debian's ClickHouse 18.16, started by
//! `.ci/run`): type mapping, read-only enforcement, timeouts, errors and streaming; and,
//! for the output format and types newer than that server, against bodies a current
//! ClickHouse engine wrote (`tests/fixtures/clickhouse/`, made by its `make_fixtures.py`).

mod support;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backflow::model::value::Value;
use backflow::source::{RowStream, SourceError, SourceOptions, SourceRow, extract};
use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, Utc};
use support::clickhouse::{LOCKED_PASSWORD, READER_PASSWORD, TestClickHouse, exec};

fn options() -> SourceOptions {
    SourceOptions {
        statement_timeout: Duration::from_secs(30),
        buffer_rows: 64,
    }
}

async fn collect_rows(mut stream: RowStream) -> Result<Vec<SourceRow>, SourceError> {
    let mut rows = Vec::new();
    while let Some(row) = stream.next().await {
        rows.push(row?);
    }
    Ok(rows)
}

/// The rows of a stream whose values all decode.
async fn collect(stream: RowStream) -> Result<Vec<Vec<Value>>, SourceError> {
    Ok(collect_rows(stream)
        .await?
        .into_iter()
        .map(|r| {
            r.decoded()
                .unwrap_or_else(|bad| panic!("undecodable row: {bad:?}"))
        })
        .collect())
}

async fn rows_of(url: &str, query: &str) -> Result<Vec<Vec<Value>>, SourceError> {
    collect(extract(url, query, &options()).await?).await
}

fn dec(s: &str) -> Value {
    Value::Decimal(BigDecimal::from_str(s).unwrap())
}

fn ts(s: &str) -> Value {
    Value::Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn date(y: i32, m: u32, d: u32) -> Value {
    Value::Date(NaiveDate::from_ymd_opt(y, m, d).unwrap())
}

#[tokio::test]
async fn every_supported_type_maps_to_its_canonical_value() {
    let ch = TestClickHouse::new("src_types").await;
    ch.exec(
        "CREATE TABLE t (
           id UInt32, i8 Int8, i16 Int16, i32 Int32, i64 Int64,
           u8 UInt8, u16 UInt16, u64 UInt64, f32 Float32, f64 Float64,
           d32 Decimal32(2), d64 Decimal(18, 4), d128 Decimal128(10),
           s String, fs FixedString(4), u UUID, d Date,
           paris DateTime('Europe/Paris'), utc DateTime,
           n Nullable(Int32), ns Nullable(String),
           ai Array(Nullable(Int32)), a_s Array(String), e Enum8('red' = 1, 'it''s' = -2)
         ) ENGINE = Memory;
         INSERT INTO t VALUES (
           1, -128, -32768, -2147483648, -9223372036854775808,
           255, 65535, 18446744073709551615, 0.1, 2.5,
           -1.5, 123.4500, 12345678901234567890.0123456789,
           'héllo ✓ 日本', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2024-02-29',
           toDateTime(1729989000, 'Europe/Paris'), toDateTime(1729992600, 'UTC'),
           7, 'x', [1, NULL, 3], ['a', ''], 'it''s'
         );
         INSERT INTO t (id) VALUES (2)",
    )
    .await;

    let stream = extract(
        &ch.url(),
        "SELECT *, toLowCardinality(s) AS lc FROM t ORDER BY id",
        &options(),
    )
    .await
    .unwrap();
    let types: Vec<&str> = stream.columns().iter().map(|c| c.type_name.as_str()).collect();
    assert_eq!(types[17], "DateTime('Europe/Paris')");
    assert_eq!(types[24], "LowCardinality(String)");
    let rows = collect(stream).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Int(-128),
            Value::Int(-32768),
            Value::Int(-2_147_483_648),
            Value::Int(i64::MIN),
            Value::Int(255),
            Value::Int(65535),
            // Past i64: an exact decimal, never a float.
            dec("18446744073709551615"),
            Value::Float(0.1),
            Value::Float(2.5),
            dec("-1.5"),
            dec("123.45"),
            dec("12345678901234567890.0123456789"),
            text("héllo ✓ 日本"),
            // FixedString's zero padding is not part of the text.
            text("ab"),
            Value::Uuid(uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap()),
            date(2024, 2, 29),
            // 02:30 happened twice in Paris that night; the instant is kept, not the wall clock.
            ts("2024-10-27T00:30:00Z"),
            ts("2024-10-27T01:30:00Z"),
            Value::Int(7),
            text("x"),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
            Value::Array(vec![text("a"), text("")]),
            text("it's"),
            text("héllo ✓ 日本"),
        ]
    );
    // Non-nullable columns hold their defaults, nullable ones NULL.
    assert_eq!(rows[1][19], Value::Null);
    assert_eq!(rows[1][20], Value::Null);
    assert_eq!(rows[1][13], text(""));
    assert_eq!(rows[1][17], ts("1970-01-01T00:00:00Z"));
}

#[tokio::test]
async fn text_that_is_not_utf8_rejects_its_row_naming_the_column_and_the_next_row_reads() {
    let ch = TestClickHouse::new("src_utf8").await;
    let rows = collect_rows(
        extract(
            &ch.url(),
            "SELECT number AS id, if(number = 0, unhex('FFFE'), 'ok') AS payload FROM system.numbers LIMIT 2",
            &options(),
        )
        .await
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let SourceRow::Undecodable(bad) = &rows[0] else {
        panic!("expected an undecodable row, got {:?}", rows[0])
    };
    assert_eq!(bad.column, 1);
    assert!(bad.reason.contains("UTF-8"), "{}", bad.reason);
    // The key still reads; the bad value is NULL in its place.
    assert_eq!(bad.values, vec![Value::Int(0), Value::Null]);
    assert_eq!(rows[1], SourceRow::Decoded(vec![Value::Int(1), text("ok")]));
}

#[tokio::test]
async fn non_finite_floats_reject_their_row() {
    let ch = TestClickHouse::new("src_nan").await;
    let rows = collect_rows(
        extract(
            &ch.url(),
            "SELECT 1 AS id, nan AS f UNION ALL SELECT 2 AS id, -inf AS f UNION ALL SELECT 3 AS id, 1.5 AS f",
            &options(),
        )
        .await
        .unwrap(),
    )
    .await
    .unwrap();
    let mut seen: Vec<(Value, Option<String>)> = rows
        .iter()
        .map(|r| match r {
            SourceRow::Decoded(v) => (v[0].clone(), None),
            SourceRow::Undecodable(bad) => (bad.values[0].clone(), Some(bad.reason.to_string())),
        })
        .collect();
    seen.sort_by_key(|(id, _)| id.as_text().into_owned());
    assert_eq!(seen.len(), 3, "{rows:?}");
    assert!(
        seen[0].1.as_deref().is_some_and(|r| r.starts_with("float NaN")),
        "{seen:?}"
    );
    assert!(
        seen[1]
            .1
            .as_deref()
            .is_some_and(|r| r.starts_with("float -Infinity")),
        "{seen:?}"
    );
    assert_eq!(seen[2].1, None, "{seen:?}");
}

#[tokio::test]
async fn an_unsupported_column_type_names_the_column_before_any_row() {
    let ch = TestClickHouse::new("src_unsupported").await;
    let err = extract(&ch.url(), "SELECT 1 AS id, tuple(1, 'a') AS pair", &options())
        .await
        .unwrap_err();
    match &err {
        SourceError::UnsupportedType { column, type_name } => {
            assert_eq!(column, "pair");
            assert_eq!(type_name, "Tuple(UInt8, String)");
            assert!(err.to_string().contains("cast it in the query"), "{err}");
        }
        other => panic!("expected UnsupportedType, got {other:?}"),
    }
}

#[tokio::test]
async fn writes_are_refused_before_they_run_and_leave_the_table_unchanged() {
    let ch = TestClickHouse::new("src_write").await;
    ch.exec(
        "CREATE TABLE accounts (id UInt32, name String) ENGINE = MergeTree ORDER BY id;
         INSERT INTO accounts VALUES (1, 'a')",
    )
    .await;
    for url in [ch.url(), ch.url_as("default", "")] {
        for write in [
            "INSERT INTO accounts SELECT 2, 'b'",
            "CREATE TABLE stolen ENGINE = Memory AS SELECT * FROM accounts",
            "ALTER TABLE accounts DELETE WHERE 1",
            "DROP TABLE accounts",
            "SELECT 1 SETTINGS readonly = 0",
        ] {
            let err = rows_of(&url, write).await.unwrap_err();
            assert!(
                matches!(&err, SourceError::ReadOnly(_) | SourceError::Query(_)),
                "{write}: {err:?}"
            );
            assert_eq!(err.category(), "QueryFailed");
            if !write.starts_with("SELECT") {
                assert!(matches!(err, SourceError::ReadOnly(_)), "{write}: {err:?}");
            }
        }
    }
    let rows = rows_of(&ch.url(), "SELECT id, name FROM accounts").await.unwrap();
    assert_eq!(rows, vec![vec![Value::Int(1), text("a")]]);
    let tables = exec(&format!(
        "SELECT name FROM system.tables WHERE database = '{}'",
        ch.name
    ))
    .await;
    assert_eq!(tables.trim(), "accounts");
}

#[tokio::test]
async fn bad_credentials_and_a_missing_database_are_connect_errors_without_the_password() {
    let ch = TestClickHouse::new("src_login").await;
    let wrong = ch.url_as("backflow_reader", "Wr0ng-Passw0rd");
    let err = rows_of(&wrong, "SELECT 1").await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("Wrong password"), "{message}");
    assert!(!message.contains("Wr0ng-Passw0rd"), "{message}");
    assert!(
        message.contains(&format!("127.0.0.1:8123/{}", ch.name)),
        "{message}"
    );

    let missing =
        format!("clickhouse://backflow_reader:{READER_PASSWORD}@127.0.0.1:8123/no_such_database_here");
    let err = rows_of(&missing, "SELECT 1").await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Connect { reason, .. } if reason.contains("no_such_database_here")),
        "{err:?}"
    );
    assert!(!err.to_string().contains(READER_PASSWORD));

    let unreachable = "clickhouse://backflow_reader:Sup3r-S3cret@127.0.0.1:1/db";
    let err = rows_of(unreachable, "SELECT 1").await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    assert!(!err.is_permanent());
    assert!(!err.to_string().contains("Sup3r-S3cret"), "{err}");
}

#[tokio::test]
async fn a_server_in_a_denied_range_is_refused_before_any_request() {
    // Local runs deny link-local addresses (cloud metadata endpoints).
    let err = rows_of("clickhouse://reader:Sup3r-S3cret@169.254.169.254/db", "SELECT 1")
        .await
        .unwrap_err();
    assert_eq!(err.category(), "EgressDenied", "{err:?}");
    assert!(!err.to_string().contains("Sup3r-S3cret"), "{err}");
}

#[tokio::test]
async fn a_login_that_may_not_change_settings_is_told_to_use_readonly_2() {
    let ch = TestClickHouse::new("src_locked").await;
    let err = rows_of(&ch.url_as("backflow_locked", LOCKED_PASSWORD), "SELECT 1")
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("readonly = 2"), "{message}");
    assert!(!message.contains(LOCKED_PASSWORD), "{message}");
}

#[tokio::test]
async fn bad_sql_and_errors_after_the_first_rows_report_the_server_message() {
    let ch = TestClickHouse::new("src_badsql").await;
    let err = rows_of(&ch.url(), "SELECT * FROM no_such_table")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("no_such_table") && m.contains("code 60")),
        "{err:?}"
    );

    let err = rows_of(&ch.url(), "SELECT 1 FORMAT Null").await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("no columns")),
        "{err:?}"
    );

    // The server has sent rows (status 200) when the exception happens: it arrives inside
    // the body, after the last whole block.
    let mut stream = extract(
        &ch.url(),
        "SELECT number AS n, throwIf(number = 300000) AS boom FROM numbers(400000) \
         SETTINGS max_block_size = 1000",
        &options(),
    )
    .await
    .unwrap();
    let mut seen = 0_u64;
    let err = loop {
        match stream.next().await {
            Some(Ok(row)) => {
                assert_eq!(row.values()[0], Value::Int(seen as i64));
                seen += 1;
            }
            Some(Err(e)) => break e,
            None => panic!("the stream ended without the error after {seen} rows"),
        }
    };
    assert!(seen > 0 && seen <= 300_000, "{seen}");
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("throwIf") && m.contains("code 395")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_timeout() {
    let ch = TestClickHouse::new("src_timeout").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_millis(500),
        buffer_rows: 16,
    };
    let started = Instant::now();
    let result = match extract(
        &ch.url(),
        "SELECT sleepEachRow(0.5) AS slept FROM numbers(40) SETTINGS max_block_size = 1",
        &options,
    )
    .await
    {
        Ok(stream) => collect(stream).await,
        Err(e) => Err(e),
    };
    let err = result.unwrap_err();
    assert!(
        matches!(err, SourceError::Timeout(d) if d == Duration::from_millis(500)),
        "{err:?}"
    );
    assert!(!err.is_permanent());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn two_hundred_thousand_rows_stream_through_a_small_buffer() {
    let ch = TestClickHouse::new("src_stream").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_secs(60),
        buffer_rows: 16,
    };
    let mut stream = extract(
        &ch.url(),
        "SELECT number + 1 AS id, concat('row ', toString(number + 1)) AS label FROM numbers(200000)",
        &options,
    )
    .await
    .unwrap();
    let names: Vec<&str> = stream.columns().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["id", "label"]);
    let mut count = 0_i64;
    while let Some(row) = stream.next().await {
        let row = row.unwrap();
        count += 1;
        assert_eq!(
            row,
            SourceRow::Decoded(vec![Value::Int(count), text(&format!("row {count}"))])
        );
    }
    assert_eq!(count, 200_000);
}

#[tokio::test]
async fn dropping_the_stream_early_ends_the_query_on_the_server() {
    let ch = TestClickHouse::new("src_drop").await;
    let marker = format!("backflow_drop_marker_{}", std::process::id());
    let query = format!("SELECT number, '{marker}' AS tag FROM system.numbers");
    let mut stream = extract(&ch.url(), &query, &options()).await.unwrap();
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = exec(&format!(
            "SELECT count() FROM system.processes WHERE query LIKE '%{marker}%' AND query NOT LIKE '%system.processes%'"
        ))
        .await;
        if running.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the query still runs after the stream was dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A stand-in for a current ClickHouse server: answers `SELECT version()` with 26.9 and
/// every other query with a body a ClickHouse 26.9 engine wrote, recording the URL settings
/// of each request. It reproduces the HTTP exchange of a successful query only (no errors,
/// no authentication, no streaming pace).
struct ModernServer {
    url: String,
    queries: Arc<Mutex<Vec<String>>>,
}

impl ModernServer {
    async fn start(fixture: &'static str) -> ModernServer {
        use axum::body::Bytes;
        use axum::http::Uri;
        let body = std::fs::read(format!(
            "{}/tests/fixtures/clickhouse/{fixture}.rowbinary",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let queries = Arc::new(Mutex::new(Vec::new()));
        let recorded = queries.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, sql: Bytes| {
            let body = body.clone();
            let recorded = recorded.clone();
            async move {
                recorded
                    .lock()
                    .unwrap()
                    .push(uri.query().unwrap_or("").to_owned());
                if sql.as_ref() == b"SELECT version()" {
                    b"26.9.2.1\n".to_vec()
                } else {
                    body
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        ModernServer {
            url: format!("clickhouse://reader:{READER_PASSWORD}@{addr}/analytics"),
            queries,
        }
    }
}

#[tokio::test]
async fn types_newer_than_the_test_server_decode_from_a_current_engines_bytes() {
    let server = ModernServer::start("new_types").await;
    let stream = extract(&server.url, "SELECT …", &options()).await.unwrap();
    let types: Vec<String> = stream.columns().iter().map(|c| c.type_name.clone()).collect();
    assert_eq!(types[1], "DateTime64(6, 'Europe/Paris')");
    assert_eq!(types[5], "Decimal(76, 9)");
    let rows = collect(stream).await.unwrap();
    assert_eq!(rows.len(), 2);
    let mut map = backflow::model::value::Document::new();
    map.insert("a".into(), Value::Int(1));
    map.insert("b".into(), Value::Int(2));
    let mut nested = backflow::model::value::Document::new();
    nested.insert("k".into(), Value::Array(vec![Value::Int(1), Value::Null]));
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            ts("2024-03-31T00:59:59.123456Z"),
            ts("1969-12-31T23:59:59.5Z"),
            Value::Object(map),
            Value::Json(
                serde_json::json!({"ok": true, "user": {"id": 12345678901234_i64, "tags": ["x", "y"]}})
            ),
            dec("-12345678901234567890123456789012345678901234567890.123456789"),
            dec("-170141183460469231731687303715884105728"),
            dec("115792089237316195423570985008687907853269984665640564039457584007913129639935"),
            Value::Int(42),
            date(1900, 1, 1),
            text("192.168.1.10"),
            text("2001:db8::ff00:42:8329"),
            text("::ffff:10.0.0.1"),
            Value::Bool(true),
            ts("2023-12-31T15:00:00Z"),
            Value::Object(nested),
        ]
    );
    assert_eq!(rows[1][3], Value::Object(Default::default()));
    assert_eq!(rows[1][4], Value::Json(serde_json::json!({})));
    assert_eq!(rows[1][14], Value::Null);

    let queries = server.queries.lock().unwrap().clone();
    assert_eq!(queries.len(), 2, "{queries:?}");
    let settings = &queries[1];
    for expected in [
        "database=analytics",
        "readonly=2",
        "max_execution_time=30",
        "cancel_http_readonly_queries_on_client_close=1",
        "output_format_binary_write_json_as_string=1",
        "default_format=RowBinaryWithNamesAndTypes",
    ] {
        assert!(settings.contains(expected), "{expected} missing from {settings}");
    }
    assert!(!settings.contains(READER_PASSWORD), "{settings}");
}

#[tokio::test]
async fn a_result_without_rows_still_has_its_columns() {
    let server = ModernServer::start("empty").await;
    let stream = extract(&server.url, "SELECT …", &options()).await.unwrap();
    let names: Vec<&str> = stream.columns().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["n", "s"]);
    assert!(collect(stream).await.unwrap().is_empty());

    let server = ModernServer::start("tuple").await;
    let err = extract(&server.url, "SELECT …", &options()).await.unwrap_err();
    assert!(
        matches!(&err, SourceError::UnsupportedType { column, .. } if column == "pair"),
        "{err:?}"
    );
}
