//! The PostgreSQL source against the real server: type mapping, read-only enforcement,
//! timeouts, errors and streaming.

mod support;

use std::time::{Duration, Instant};

use backflow::model::value::Value;
use backflow::source::{Column, Privileges, SourceError, SourceOptions, extract};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use sqlx::Connection;
use support::db::TestDb;
use support::rows::{collect, dec, options, rows_of, source_rows_of, undecodable};

fn ts(s: &str) -> Value {
    Value::Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

#[tokio::test]
async fn every_supported_type_maps_to_its_canonical_value() {
    let db = TestDb::postgres("src_types").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE DOMAIN short_text AS varchar(20);
         CREATE TABLE t (
           id int4, b bool, i2 int2, i8 int8, o oid, f4 float4, f8 float8, n numeric,
           t text, v varchar(10), c char(3), nm name, m mood, dt short_text,
           d date, tm time, tsn timestamp, tstz timestamptz,
           j json, jb jsonb, u uuid,
           ai int4[], at text[], an numeric[], ats timestamptz[], am mood[]
         );
         INSERT INTO t VALUES (
           1, true, -32768, 9223372036854775807, 4294967295, 0.1, 2.5, 123.450,
           'héllo ✓ 日本', 'v', 'ab', 'pg_name', 'sad', 'domain',
           '2024-02-29', '13:14:15.5', '2024-03-01 12:00:00', '2024-03-01 12:00:00+02',
           '{\"b\": [1, 2], \"a\": null}', '{\"z\": 1.5}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{1,NULL,3}', '{\"x\",NULL,\"ü\"}', '{1.10,-2}', '{\"2024-01-01 00:00:00+01\"}', '{happy,sad}'
         );
         INSERT INTO t (id) VALUES (2);",
    )
    .await;

    let stream = extract(&db.url, "SELECT * FROM t ORDER BY id", &options())
        .await
        .unwrap();
    let types: Vec<&str> = stream.columns().iter().map(|c| c.type_name.as_str()).collect();
    assert_eq!(
        types,
        [
            "INT4",
            "BOOL",
            "INT2",
            "INT8",
            "OID",
            "FLOAT4",
            "FLOAT8",
            "NUMERIC",
            "TEXT",
            "VARCHAR",
            "CHAR",
            "NAME",
            "mood",
            // A domain reaches the client as its base type.
            "VARCHAR",
            "DATE",
            "TIME",
            "TIMESTAMP",
            "TIMESTAMPTZ",
            "JSON",
            "JSONB",
            "UUID",
            "INT4[]",
            "TEXT[]",
            "NUMERIC[]",
            "TIMESTAMPTZ[]",
            "mood[]"
        ]
    );
    let rows = collect(stream).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Bool(true),
            Value::Int(-32768),
            Value::Int(i64::MAX),
            Value::Int(4_294_967_295),
            Value::Float(0.1),
            Value::Float(2.5),
            dec("123.450"),
            text("héllo ✓ 日本"),
            text("v"),
            // char(n) pads with spaces, as PostgreSQL returns it.
            text("ab "),
            text("pg_name"),
            text("sad"),
            text("domain"),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            Value::Time(NaiveTime::from_hms_milli_opt(13, 14, 15, 500).unwrap()),
            ts("2024-03-01T12:00:00Z"),
            ts("2024-03-01T10:00:00Z"),
            Value::Json(serde_json::json!({"a": null, "b": [1, 2]})),
            Value::Json(serde_json::json!({"z": 1.5})),
            Value::Uuid(uuid::Uuid::parse_str("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").unwrap()),
            Value::Array(vec![Value::Int(1), Value::Null, Value::Int(3)]),
            Value::Array(vec![text("x"), Value::Null, text("ü")]),
            Value::Array(vec![dec("1.10"), dec("-2")]),
            Value::Array(vec![ts("2023-12-31T23:00:00Z")]),
            Value::Array(vec![text("happy"), text("sad")]),
        ]
    );
    assert_eq!(rows[1][0], Value::Int(2));
    assert!(rows[1][1..].iter().all(|v| *v == Value::Null), "{:?}", rows[1]);
}

#[tokio::test]
async fn numeric_columns_keep_every_digit() {
    let db = TestDb::postgres("src_numeric").await;
    let rows = rows_of(
        &db,
        "SELECT n FROM (VALUES
           (12345678901234567890123456789012345678::numeric),
           (-0.000000000000000000000000000000000001),
           (0.00), (-42.50)) AS v(n)",
    )
    .await
    .unwrap();
    let values: Vec<Value> = rows.into_iter().map(|mut r| r.remove(0)).collect();
    assert_eq!(
        values,
        [
            dec("12345678901234567890123456789012345678"),
            dec("-0.000000000000000000000000000000000001"),
            dec("0"),
            dec("-42.5"),
        ]
    );
}

#[tokio::test]
async fn numerics_read_from_their_binary_form_equal_their_text() {
    // Up to 36 digits are read straight from the binary form, longer ones by the driver:
    // both must give what PostgreSQL's own text says.
    let db = TestDb::postgres("src_numeric_binary").await;
    let rows = rows_of(
        &db,
        "SELECT n, n::text FROM (
           SELECT ((random() - 0.5) * 10 ^ (g % 30))::numeric(40, 8) FROM generate_series(1, 2000) g
           UNION ALL VALUES (0.0001), (-0.0001), (100000000), (1e35), (-1e36), (1.5e-20),
             (123456789012345678901234567890123456), (1234567890123456789012345678901234567),
             (0.000000000000000000000000000000000001), (99999999.99990000)
         ) AS v(n)",
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 2010);
    for row in rows {
        let Value::Text(text) = &row[1] else {
            panic!("{row:?}")
        };
        assert_eq!(row[0], dec(text), "{text}");
    }
}

#[tokio::test]
async fn a_value_without_a_canonical_form_rejects_only_its_row_and_never_shows_the_value() {
    let db = TestDb::postgres("src_undecodable").await;
    let rows = source_rows_of(
        &db,
        "SELECT id, n, tz, d, ts, ns, f FROM (VALUES
           (1, 1.5::numeric, '2024-01-01T00:00:00Z'::timestamptz, '2024-01-01'::date, '2024-01-01'::timestamp, ARRAY[1.5]::numeric[], 1e308::float8),
           (2, 'NaN', NULL, NULL, NULL, NULL, NULL),
           (3, 'Infinity', NULL, NULL, NULL, NULL, NULL),
           (4, '-Infinity', NULL, NULL, NULL, NULL, NULL),
           (5, NULL, 'infinity', NULL, NULL, NULL, NULL),
           (6, NULL, '-infinity', NULL, NULL, NULL, NULL),
           (7, NULL, NULL, 'infinity', NULL, NULL, NULL),
           (8, NULL, NULL, '5874897-12-31', NULL, NULL, NULL),
           (9, NULL, NULL, NULL, '-infinity', NULL, NULL),
           (10, NULL, NULL, NULL, NULL, ARRAY['NaN']::numeric[], NULL),
           (11, 2, NULL, NULL, NULL, NULL, NULL),
           (12, NULL, NULL, NULL, NULL, NULL, 'NaN'),
           (13, NULL, NULL, NULL, NULL, NULL, '-Infinity')
         ) AS t(id, n, tz, d, ts, ns, f) ORDER BY id",
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 13, "the stream goes on past every bad value");
    let ids: Vec<Value> = rows.iter().map(|r| r.values()[0].clone()).collect();
    assert_eq!(
        ids,
        (1..=13).map(Value::Int).collect::<Vec<_>>(),
        "the key still decodes"
    );
    assert_eq!(
        rows[0].values()[6],
        Value::Float(1e308),
        "a huge float is a float"
    );
    let bad = undecodable(&rows);
    assert_eq!(bad[0], None);
    assert_eq!(bad[10], None);
    let expect = [
        (1, 1, "numeric NaN"),
        (2, 1, "numeric Infinity"),
        (3, 1, "numeric -Infinity"),
        (4, 2, "timestamp infinity"),
        (5, 2, "timestamp -infinity"),
        (6, 3, "date infinity"),
        (7, 3, "a date outside the years"),
        (8, 4, "timestamp -infinity"),
        (9, 5, "NaN or Infinity"),
        (11, 6, "float NaN"),
        (12, 6, "float -Infinity"),
    ];
    for (row, column, kind) in expect {
        let (c, reason) = bad[row].clone().unwrap_or_else(|| panic!("row {row} decoded"));
        assert_eq!(c, column, "row {row}: {reason}");
        assert!(reason.contains(kind), "row {row}: {reason}");
        assert!(
            !reason.contains("5874897") && !reason.contains("0xD000"),
            "{reason}"
        );
    }
}

#[tokio::test]
async fn an_unsupported_column_type_names_the_column_before_any_row() {
    let db = TestDb::postgres("src_unsupported").await;
    db.exec("CREATE TABLE files (id int, payload bytea)").await;
    let err = extract(&db.url, "SELECT id, payload FROM files", &options())
        .await
        .unwrap_err();
    match err {
        SourceError::UnsupportedType { column, type_name } => {
            assert_eq!(column, "payload");
            assert_eq!(type_name, "BYTEA");
        }
        other => panic!("expected UnsupportedType, got {other:?}"),
    }
    let err = extract(&db.url, "SELECT interval '1 day' AS span", &options())
        .await
        .unwrap_err();
    assert!(
        matches!(err, SourceError::UnsupportedType { ref column, .. } if column == "span"),
        "{err:?}"
    );
}

#[tokio::test]
async fn writes_are_refused_and_leave_the_table_unchanged() {
    let db = TestDb::postgres("src_write").await;
    db.exec(
        "CREATE TABLE accounts (id int primary key, name text);
         INSERT INTO accounts VALUES (1, 'a');
         CREATE SEQUENCE ids;",
    )
    .await;
    for write in [
        "INSERT INTO accounts VALUES (2, 'b') RETURNING id",
        "WITH gone AS (DELETE FROM accounts RETURNING id) SELECT id FROM gone",
        "SELECT nextval('ids') AS id",
        "DELETE FROM accounts",
        "UPDATE accounts SET name = 'changed'",
    ] {
        let err = rows_of(&db, write).await.unwrap_err();
        assert!(matches!(err, SourceError::ReadOnly(_)), "{write}: {err:?}");
        assert_eq!(err.category(), "QueryFailed");
    }
    let rows = rows_of(&db, "SELECT id FROM accounts").await.unwrap();
    assert_eq!(rows, vec![vec![Value::Int(1)]]);
}

#[tokio::test]
async fn bad_sql_reports_the_database_message() {
    let db = TestDb::postgres("src_badsql").await;
    let err = extract(&db.url, "SELECT * FROM no_such_table", &options())
        .await
        .unwrap_err();
    match err {
        SourceError::Query(message) => assert!(message.contains("no_such_table"), "{message}"),
        other => panic!("expected Query, got {other:?}"),
    }
    let err = rows_of(&db, "SELECT 1 / (n - 3) AS x FROM generate_series(1, 5) n")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("division by zero")),
        "{err:?}"
    );
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error_without_the_password() {
    let url = "postgres://backflow:Sup3r-S3cret@127.0.0.1:1/warehouse";
    let err = extract(url, "SELECT 1", &options()).await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(!message.contains("Sup3r-S3cret"), "{message}");
    assert!(message.contains("127.0.0.1:1/warehouse"), "{message}");
    assert!(!err.is_permanent());
}

#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_timeout() {
    let db = TestDb::postgres("src_timeout").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_millis(200),
        buffer_rows: 16,
    };
    let started = Instant::now();
    let stream = extract(&db.url, "SELECT pg_sleep(5) AS slept", &options)
        .await
        .unwrap();
    let err = collect(stream).await.unwrap_err();
    assert!(
        matches!(err, SourceError::Timeout(d) if d == Duration::from_millis(200)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn two_hundred_thousand_rows_stream_through_a_small_buffer() {
    let db = TestDb::postgres("src_stream").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_secs(60),
        buffer_rows: 16,
    };
    let mut stream = extract(
        &db.url,
        "SELECT n AS id, 'row ' || n AS label FROM generate_series(1, 200000) n",
        &options,
    )
    .await
    .unwrap();
    assert_eq!(
        stream.columns().to_vec(),
        vec![
            Column {
                name: "id".into(),
                type_name: "INT4".into()
            },
            Column {
                name: "label".into(),
                type_name: "TEXT".into()
            },
        ]
    );
    let mut count = 0_i64;
    while let Some(row) = stream.next().await {
        let row = row.unwrap();
        count += 1;
        assert_eq!(row.values()[0], Value::Int(count));
    }
    assert_eq!(count, 200_000);
}

#[tokio::test]
async fn rows_are_read_as_binary_copy_data() {
    let db = TestDb::postgres("src_copy").await;
    let marker = format!("backflow_copy_marker_{}", std::process::id());
    let query = format!("SELECT generate_series(1, 100000000) AS n, '{marker}' AS tag");
    let mut stream = extract(&db.url, &query, &options()).await.unwrap();
    stream.next().await.unwrap().unwrap();
    // The server runs the query inside COPY while the stream is held.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let running: String = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
    )
    .bind(&marker)
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(
        running.starts_with("COPY (") && running.ends_with("TO STDOUT (FORMAT binary)"),
        "{running}"
    );
    drop(stream);
}

#[tokio::test]
async fn a_query_copy_will_not_take_is_read_through_the_extended_protocol() {
    let db = TestDb::postgres("src_copy_refused").await;
    // SHOW and EXPLAIN prepare, and return rows, but are not queries COPY can wrap.
    let rows = rows_of(&db, "SHOW server_encoding").await.unwrap();
    assert_eq!(rows, vec![vec![text("UTF8")]]);
    let rows = rows_of(&db, "EXPLAIN SELECT 1").await.unwrap();
    assert!(!rows.is_empty());
    // A trailing semicolon or line comment does not break the query.
    for query in [
        "SELECT 1 AS one;",
        "SELECT 1 AS one -- the last line",
        "SELECT 1 AS one ; \n",
    ] {
        assert_eq!(
            rows_of(&db, query).await.unwrap(),
            vec![vec![Value::Int(1)]],
            "{query}"
        );
    }
}

#[tokio::test]
async fn arrays_of_several_dimensions_are_nested_lists() {
    let db = TestDb::postgres("src_arrays").await;
    let rows = rows_of(
        &db,
        "SELECT '{{1,2,3},{4,NULL,6}}'::int4[] AS grid, '[0:1]={a,b}'::text[] AS shifted, \
                '{}'::int4[] AS empty, '{{{1}},{{2}}}'::int8[] AS deep",
    )
    .await
    .unwrap();
    let int = Value::Int;
    assert_eq!(
        rows,
        vec![vec![
            Value::Array(vec![
                Value::Array(vec![int(1), int(2), int(3)]),
                Value::Array(vec![int(4), Value::Null, int(6)]),
            ]),
            Value::Array(vec![text("a"), text("b")]),
            Value::Array(vec![]),
            Value::Array(vec![
                Value::Array(vec![Value::Array(vec![int(1)])]),
                Value::Array(vec![Value::Array(vec![int(2)])]),
            ]),
        ]]
    );
}

#[tokio::test]
async fn dropping_the_stream_early_ends_the_query_on_the_server() {
    let db = TestDb::postgres("src_drop").await;
    let marker = format!("backflow_drop_marker_{}", std::process::id());
    // A set-returning function in the select list streams; in FROM it would be materialised
    // before the first row.
    let query = format!("SELECT generate_series(1, 100000000) AS n, '{marker}' AS tag");
    let mut stream = extract(&db.url, &query, &options()).await.unwrap();
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);

    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
        )
        .bind(&marker)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        if running == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the query still runs after the stream was dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_source_user_that_can_escape_the_read_only_transaction_is_reported_and_a_reader_is_not() {
    let db = TestDb::postgres("privileges").await;
    db.exec("CREATE TABLE t (id INT); INSERT INTO t VALUES (1)").await;
    let reader = format!("{}_reader", db.name);
    let files = format!("{}_files", db.name);
    support::db::exec_admin_postgres(&format!(
        "CREATE ROLE \"{reader}\" LOGIN; CREATE ROLE \"{files}\" LOGIN IN ROLE pg_write_server_files"
    ))
    .await;
    db.exec(&format!("GRANT SELECT ON t TO \"{reader}\", \"{files}\""))
        .await;
    let as_role = |role: &str| db.url.replacen("postgres@", &format!("{role}@"), 1);
    let privileges = |url: String| async move {
        let stream = extract(&url, "SELECT id FROM t", &options()).await.unwrap();
        stream.privileges().clone()
    };
    let of_reader = privileges(as_role(&reader)).await;
    let of_files = privileges(as_role(&files)).await;
    let of_superuser = privileges(db.url.clone()).await;
    // dblink_exec opens a second connection, outside the read-only transaction.
    db.exec("CREATE EXTENSION dblink").await;
    let of_reader_with_dblink = privileges(as_role(&reader)).await;
    db.exec(&format!("DROP OWNED BY \"{reader}\", \"{files}\"")).await;
    support::db::exec_admin_postgres(&format!("DROP ROLE \"{reader}\"; DROP ROLE \"{files}\"")).await;

    assert_eq!(of_reader, Privileges::Least);
    assert_eq!(
        of_files,
        Privileges::Elevated(vec!["member of pg_write_server_files".into()])
    );
    assert!(
        matches!(&of_superuser, Privileges::Elevated(found) if found[0] == "superuser"),
        "{of_superuser:?}"
    );
    assert_eq!(
        of_reader_with_dblink,
        Privileges::Elevated(vec!["may run dblink_exec".into()])
    );
}

#[tokio::test]
async fn a_model_read_longer_than_a_second_is_not_warned_of_as_a_slow_statement() {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let db = TestDb::postgres("src_slow").await;
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // The test's runtime has one thread: the source's task logs through this subscriber too.
    let _guard = tracing::subscriber::set_default(subscriber);
    let rows = rows_of(&db, "SELECT pg_sleep(1.3) AS slept, 1 AS x")
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    let log = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    assert!(!log.contains("slow statement"), "{log}");
}
