//! The Redshift flavour of the PostgreSQL source, run against a real PostgreSQL through a
//! `redshift://` URL: its login parameters, setup statements and text-format row path. A
//! Redshift cluster cannot run here; `docs/sources/redshift.md` lists what this does not
//! cover.

mod support;

use std::time::{Duration, Instant};

use backflow::model::value::Value;
use backflow::source::{RowStream, SourceError, SourceOptions, SourceRow, extract};
use support::db::TestDb;

fn options() -> SourceOptions {
    SourceOptions {
        statement_timeout: Duration::from_secs(30),
        buffer_rows: 64,
    }
}

fn redshift_url(db: &TestDb) -> String {
    db.url.replacen("postgres://", "redshift://", 1)
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

#[tokio::test]
async fn the_text_path_reads_every_type_exactly_as_the_binary_path() {
    let db = TestDb::postgres("rs_types").await;
    db.exec(
        "CREATE TYPE mood AS ENUM ('happy', 'sad');
         CREATE TABLE t (
           id int4, b bool, i2 int2, i8 int8, o oid, f4 float4, f8 float8, n numeric,
           t text, v varchar(10), c char(3), m mood,
           d date, tm time, tsn timestamp, tstz timestamptz,
           j json, jb jsonb, u uuid,
           ai int4[], at text[], an numeric[], ats timestamptz[], ad date[]
         );
         INSERT INTO t VALUES (
           1, true, -32768, -9223372036854775808, 4294967295, 0.1, 0.30000000000000004, -123.450,
           'héllo ✓ \"q\" \\ 日本', 'v', 'ab', 'sad',
           '2024-02-29', '13:14:15.5', '2024-03-01 12:00:00.123456', '2024-03-01 12:00:00+02',
           '{\"b\": [1, 2], \"a\": null}', '{\"z\": 1.5}', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
           '{1,NULL,3}', '{\"x\",NULL,\"ü, \\\\\"}', '{1.10,-2}', '{\"2024-01-01 00:00:00+01\"}', '{2024-02-29,NULL}'
         ),
         (2, false, 0, 0, 0, 3.4028235e38, 1e-300, 12345678901234567890.000000000001,
          '', '', '', 'happy', '0001-01-01', '00:00:00', '1900-01-01 00:00:00', '1969-12-31 23:59:59.999999+00',
          'null', '[]', '00000000-0000-0000-0000-000000000000', '{}', '{}', '{}', '{}', '{}');
         INSERT INTO t (id) VALUES (3);",
    )
    .await;
    let query = "SELECT * FROM t ORDER BY id";
    let binary = rows_of(&db.url, query).await.unwrap();
    let text = rows_of(&redshift_url(&db), query).await.unwrap();
    assert_eq!(binary.len(), 3);
    for (b, t) in binary.iter().zip(&text) {
        assert_eq!(b, t);
    }
    assert_eq!(text[0][6], Value::Float(0.30000000000000004));
    // A float4 widens through its shortest form, on both paths.
    assert_eq!(text[1][5], Value::Float(3.4028235e38));
}

#[tokio::test]
async fn the_session_has_redshifts_float_digits_a_read_only_transaction_and_the_timeout() {
    let db = TestDb::postgres("rs_session").await;
    let rows = rows_of(
        &redshift_url(&db),
        "SELECT current_setting('extra_float_digits') AS digits,
                current_setting('transaction_read_only') AS read_only,
                current_setting('statement_timeout') AS timeout",
    )
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![vec![
            Value::Text("2".into()),
            Value::Text("on".into()),
            Value::Text("30s".into())
        ]]
    );
}

#[tokio::test]
async fn writes_are_refused_and_leave_the_table_unchanged() {
    let db = TestDb::postgres("rs_write").await;
    db.exec("CREATE TABLE accounts (id int primary key); INSERT INTO accounts VALUES (1);")
        .await;
    let err = rows_of(&redshift_url(&db), "INSERT INTO accounts VALUES (2) RETURNING id")
        .await
        .unwrap_err();
    assert!(matches!(err, SourceError::ReadOnly(_)), "{err:?}");
    let rows = rows_of(&db.url, "SELECT count(*) AS n FROM accounts")
        .await
        .unwrap();
    assert_eq!(rows, vec![vec![Value::Int(1)]]);
}

#[tokio::test]
async fn timeouts_bad_values_and_bad_sql_are_reported_like_the_postgres_source() {
    let db = TestDb::postgres("rs_errors").await;
    let url = redshift_url(&db);
    let started = Instant::now();
    let short = SourceOptions {
        statement_timeout: Duration::from_millis(200),
        buffer_rows: 16,
    };
    let err = collect(
        extract(&url, "SELECT pg_sleep(5) AS slept", &short)
            .await
            .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SourceError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A value with no canonical form rejects its row, not the run.
    let rows = collect_rows(
        extract(
            &url,
            "SELECT 1 AS id, 'NaN'::numeric AS ratio UNION ALL SELECT 2, 0.5",
            &options(),
        )
        .await
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    match &rows[0] {
        SourceRow::Undecodable(bad) => {
            assert_eq!((bad.column, bad.values[0].clone()), (1, Value::Int(1)));
            assert!(bad.reason.contains("NaN"), "{}", bad.reason);
        }
        other => panic!("expected an undecodable row, got {other:?}"),
    }
    assert!(matches!(&rows[1], SourceRow::Decoded(_)), "{rows:?}");
    // Infinite dates and timestamps arrive as text the parsers refuse: the row, not the run.
    let rows = collect_rows(
        extract(
            &url,
            "SELECT 'infinity'::timestamptz AS t, '-infinity'::date AS d, 'NaN'::float8 AS f",
            &options(),
        )
        .await
        .unwrap(),
    )
    .await
    .unwrap();
    match &rows[..] {
        [SourceRow::Undecodable(bad)] => {
            assert_eq!(bad.column, 0);
            assert_eq!(bad.values, vec![Value::Null, Value::Null, Value::Null]);
        }
        other => panic!("expected one undecodable row, got {other:?}"),
    }
    let err = rows_of(&url, "SELECT * FROM no_such_table").await.unwrap_err();
    assert!(
        matches!(&err, SourceError::Query(m) if m.contains("no_such_table")),
        "{err:?}"
    );
    let err = extract(&url, "SELECT interval '1 day' AS span", &options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::UnsupportedType { column, .. } if column == "span"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_url_without_a_port_goes_to_5439_and_errors_hide_the_password() {
    // A listener on Redshift's port that accepts and hangs up proves where the source went.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:5439")
        .await
        .expect("port 5439 is free for this test");
    let accepted = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        drop(socket);
    });
    let err = rows_of("redshift://reader:Sup3r-S3cret@127.0.0.1/dev", "SELECT 1")
        .await
        .unwrap_err();
    tokio::time::timeout(Duration::from_secs(5), accepted)
        .await
        .expect("a connection on 5439")
        .unwrap();
    let message = err.to_string();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    assert!(message.contains("redshift://127.0.0.1/dev"), "{message}");
    assert!(!message.contains("Sup3r-S3cret"), "{message}");
}

#[tokio::test]
async fn two_hundred_thousand_rows_stream_through_the_text_path() {
    let db = TestDb::postgres("rs_stream").await;
    let mut stream = extract(
        &redshift_url(&db),
        "SELECT n AS id, 'row ' || n AS label FROM generate_series(1, 200000) n",
        &SourceOptions {
            statement_timeout: Duration::from_secs(60),
            buffer_rows: 16,
        },
    )
    .await
    .unwrap();
    let mut count = 0_i64;
    while let Some(row) = stream.next().await {
        count += 1;
        assert_eq!(row.unwrap().values()[0], Value::Int(count));
    }
    assert_eq!(count, 200_000);
}
