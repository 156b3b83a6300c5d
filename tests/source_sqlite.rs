//! The SQLite source against real database files: type mapping by storage class and
//! declared type, read-only enforcement, timeouts, errors and streaming.

use std::time::{Duration, Instant};

use backflow::model::value::Value;
use backflow::source::{RowStream, SourceError, SourceOptions, SourceRow, extract};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, Executor};
use tempfile::TempDir;

/// A database file in its own temporary directory, removed with it.
struct TestFile {
    _dir: TempDir,
    url: String,
}

impl TestFile {
    /// Creates the file and runs `setup` in it through a writable connection.
    async fn with(setup: &str) -> TestFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.db");
        let mut conn = SqliteConnection::connect_with(
            &SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
        conn.execute(setup).await.unwrap();
        conn.close().await.unwrap();
        TestFile {
            url: format!("sqlite://{}", path.display()),
            _dir: dir,
        }
    }

    async fn scalar(&self, query: &str) -> i64 {
        let mut conn = SqliteConnection::connect(&self.url).await.unwrap();
        sqlx::query_scalar(query).fetch_one(&mut conn).await.unwrap()
    }
}

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

/// Every row of `query`, decodable or not.
async fn source_rows_of(file: &TestFile, query: &str) -> Result<Vec<SourceRow>, SourceError> {
    collect_rows(extract(&file.url, query, &options()).await?).await
}

/// The undecodable column and reason of each row (`None` for a row that decoded).
fn undecodable(rows: &[SourceRow]) -> Vec<Option<(usize, String)>> {
    rows.iter()
        .map(|r| match r {
            SourceRow::Decoded(_) => None,
            SourceRow::Undecodable(bad) => Some((bad.column, bad.reason.to_string())),
        })
        .collect()
}

async fn rows_of(file: &TestFile, query: &str) -> Result<Vec<Vec<Value>>, SourceError> {
    collect(extract(&file.url, query, &options()).await?).await
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn ts(s: &str) -> Value {
    Value::Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
}

#[tokio::test]
async fn every_supported_type_maps_to_its_canonical_value() {
    let file = TestFile::with(
        "CREATE TABLE t (
           id INTEGER, flag BOOLEAN, n BIGINT, r REAL, amount DECIMAL(10, 2), big TEXT,
           label VARCHAR(20), d DATE, at DATETIME, ts TIMESTAMP, tm TIME, doc JSON, bad_date DATE, anything
         );
         INSERT INTO t VALUES (
           1, 1, -9223372036854775808, 0.1, '10.50', '12345678901234567890123456789012345678',
           'héllo ✓ 日本', '2024-02-29', '2024-03-01 12:00:00', '2024-03-01T12:00:00+02:00', '13:14:15.5',
           '{\"b\": [1, 2], \"a\": null}', 'not a date', 7
         );
         INSERT INTO t (id, flag) VALUES (2, 0);
         INSERT INTO t (id) VALUES (3);",
    )
    .await;

    let stream = extract(&file.url, "SELECT * FROM t ORDER BY id", &options())
        .await
        .unwrap();
    let types: Vec<&str> = stream.columns().iter().map(|c| c.type_name.as_str()).collect();
    assert_eq!(
        types,
        [
            "INTEGER",
            "BOOLEAN",
            "BIGINT",
            "REAL",
            "DECIMAL(10, 2)",
            "TEXT",
            "VARCHAR(20)",
            "DATE",
            "DATETIME",
            "TIMESTAMP",
            "TIME",
            "JSON",
            "DATE",
            // What SQLite's pragma_table_info calls a column declared without a type.
            "BLOB"
        ]
    );
    let rows = collect(stream).await.unwrap();
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Bool(true),
            Value::Int(i64::MIN),
            Value::Float(0.1),
            // SQLite's NUMERIC affinity stores '10.50' as the REAL 10.5: the digits after the
            // point are SQLite's, not ours, to keep.
            Value::Float(10.5),
            text("12345678901234567890123456789012345678"),
            text("héllo ✓ 日本"),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            ts("2024-03-01T12:00:00Z"),
            ts("2024-03-01T10:00:00Z"),
            Value::Time(NaiveTime::from_hms_milli_opt(13, 14, 15, 500).unwrap()),
            Value::Json(serde_json::json!({"a": null, "b": [1, 2]})),
            text("not a date"),
            Value::Int(7),
        ]
    );
    assert_eq!(rows[1][1], Value::Bool(false));
    assert_eq!(rows[2][0], Value::Int(3));
    assert!(rows[2][1..].iter().all(|v| *v == Value::Null), "{:?}", rows[2]);
}

#[tokio::test]
async fn numbers_come_back_exactly_as_sqlite_stored_them() {
    // A NUMERIC column keeps text that is not a well-formed number as text, and a TEXT
    // column keeps every digit; both come back exact. A DECIMAL column holding numbers holds
    // SQLite integers and doubles, read as such.
    let file = TestFile::with(
        "CREATE TABLE amounts (id INTEGER, exact TEXT, n NUMERIC);
         INSERT INTO amounts VALUES (1, '-0.000000000000000000000000000000000001', 42),
                                    (2, '0.00', 'n/a');",
    )
    .await;
    let rows = rows_of(
        &file,
        "SELECT exact, CAST(exact AS NUMERIC) AS as_number, n FROM amounts ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            vec![
                text("-0.000000000000000000000000000000000001"),
                Value::Float(-1e-36),
                Value::Int(42)
            ],
            vec![text("0.00"), Value::Int(0), text("n/a")],
        ]
    );
    let rows = rows_of(&file, "SELECT n FROM amounts WHERE id = 2")
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![text("n/a")]]);
}

#[tokio::test]
async fn a_value_that_is_not_text_rejects_only_its_row() {
    let file = TestFile::with(
        "CREATE TABLE files (id INTEGER, payload BLOB, loose, name TEXT);
         INSERT INTO files VALUES (1, CAST('utf8' AS BLOB), 'x', 'ok'), (2, x'00ff', NULL, NULL),
           (3, NULL, x'cafe', NULL), (4, NULL, NULL, CAST(x'ff' AS TEXT)), (5, NULL, NULL, 'fine');",
    )
    .await;
    // SQLite types values, not columns: a blob can sit in any column, and TEXT can hold any
    // bytes. A blob of UTF-8 is text; anything else rejects its row, whatever the column.
    let rows = source_rows_of(&file, "SELECT id, payload, loose, name FROM files ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].values()[1], text("utf8"));
    let bad = undecodable(&rows);
    assert_eq!((bad[0].clone(), bad[4].clone()), (None, None));
    for (row, column, kind) in [
        (1, 1, "blob that is not UTF-8"),
        (2, 2, "blob that is not UTF-8"),
        (3, 3, "text that is not valid UTF-8"),
    ] {
        let (c, reason) = bad[row].clone().unwrap_or_else(|| panic!("row {row} decoded"));
        assert_eq!(c, column, "row {row}: {reason}");
        assert!(reason.contains(kind), "row {row}: {reason}");
        assert_eq!(rows[row].values()[0], Value::Int(row as i64 + 1));
    }
}

#[tokio::test]
async fn writes_are_refused_and_leave_the_table_unchanged() {
    let file = TestFile::with(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT);
         INSERT INTO accounts VALUES (1, 'a');",
    )
    .await;
    for write in [
        "INSERT INTO accounts VALUES (2, 'b')",
        "INSERT INTO accounts VALUES (3, 'c') RETURNING id",
        "WITH n(x) AS (SELECT 4) INSERT INTO accounts SELECT x, 'd' FROM n",
        "DELETE FROM accounts",
    ] {
        let err = rows_of(&file, write).await.unwrap_err();
        assert!(matches!(err, SourceError::ReadOnly(_)), "{write}: {err:?}");
    }
    assert_eq!(file.scalar("SELECT count(*) FROM accounts").await, 1);
}

#[tokio::test]
async fn bad_sql_reports_the_database_message() {
    let file = TestFile::with("CREATE TABLE t (id INTEGER);").await;
    let err = extract(&file.url, "SELECT * FROM no_such_table", &options())
        .await
        .unwrap_err();
    match err {
        SourceError::Query(message) => assert!(message.contains("no_such_table"), "{message}"),
        other => panic!("expected Query, got {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_file_is_a_connect_error_and_is_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.db");
    let url = format!("sqlite://{}", path.display());
    let err = extract(&url, "SELECT 1", &options()).await.unwrap_err();
    match &err {
        SourceError::Connect { reason, .. } => assert!(reason.contains("does not exist"), "{reason}"),
        other => panic!("expected Connect, got {other:?}"),
    }
    assert!(!path.exists());
}

#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_timeout() {
    let file = TestFile::with("CREATE TABLE t (id INTEGER);").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_millis(200),
        buffer_rows: 16,
    };
    // Counting a billion generated rows takes minutes; nothing is sent before the end.
    let started = Instant::now();
    let stream = extract(
        &file.url,
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000000000)
         SELECT count(*) AS total FROM c",
        &options,
    )
    .await
    .unwrap();
    let err = collect(stream).await.unwrap_err();
    assert!(
        matches!(err, SourceError::Timeout(d) if d == Duration::from_millis(200)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_slow_consumer_past_the_statement_timeout_gets_a_timeout() {
    let file = TestFile::with("CREATE TABLE t (id INTEGER);").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_millis(300),
        buffer_rows: 1,
    };
    let mut stream = extract(
        &file.url,
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000) SELECT n FROM c",
        &options,
    )
    .await
    .unwrap();
    stream.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut last = None;
    while let Some(row) = stream.next().await {
        last = Some(row);
    }
    assert!(matches!(last, Some(Err(SourceError::Timeout(_)))), "{last:?}");
}

#[tokio::test]
async fn two_hundred_thousand_rows_stream_through_a_small_buffer() {
    let file = TestFile::with("CREATE TABLE t (id INTEGER);").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_secs(60),
        buffer_rows: 16,
    };
    let mut stream = extract(
        &file.url,
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 200000)
         SELECT n, 'row ' || n AS label FROM c",
        &options,
    )
    .await
    .unwrap();
    let mut count = 0_i64;
    while let Some(row) = stream.next().await {
        let row = row.unwrap();
        count += 1;
        assert_eq!(row.values()[0], Value::Int(count));
    }
    assert_eq!(count, 200_000);
}

#[tokio::test]
async fn dropping_the_stream_early_stops_without_error() {
    let file = TestFile::with("CREATE TABLE t (id INTEGER);").await;
    let mut stream = extract(
        &file.url,
        "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT n FROM c",
        &options(),
    )
    .await
    .unwrap();
    for expected in 1..=10 {
        assert_eq!(
            stream.next().await.unwrap().unwrap(),
            SourceRow::Decoded(vec![Value::Int(expected)])
        );
    }
    drop(stream);
    // The file is free again: a writer can take the lock right away.
    let mut writer = SqliteConnection::connect(&file.url).await.unwrap();
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&mut writer)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_second_statement_or_a_vacuum_into_writes_no_file() {
    let file = TestFile::with("CREATE TABLE t (id INTEGER); INSERT INTO t VALUES (1);").await;
    let out = tempfile::tempdir().unwrap();
    let copy = out.path().join("copy.db");
    let attached = out.path().join("attached.db");
    for query in [
        // Before, the type probe ran this whole text on a writable connection.
        format!("SELECT id FROM t; VACUUM INTO '{}'", copy.display()),
        format!(
            "SELECT id FROM t; ATTACH '{}' AS x; CREATE TABLE x.y (a)",
            attached.display()
        ),
        format!("VACUUM INTO '{}'", copy.display()),
        format!("/* a comment */ vacuum into '{}';", copy.display()),
    ] {
        let err = rows_of(&file, &query).await.unwrap_err();
        assert!(
            matches!(err, SourceError::Query(_) | SourceError::ReadOnly(_)),
            "{query}: {err:?}"
        );
    }
    assert!(!copy.exists(), "VACUUM INTO wrote {}", copy.display());
    assert!(!attached.exists(), "ATTACH created {}", attached.display());
    // One statement with a trailing semicolon and comment still runs.
    let rows = rows_of(&file, "SELECT id FROM t; -- the model").await.unwrap();
    assert_eq!(rows, vec![vec![Value::Int(1)]]);
}
