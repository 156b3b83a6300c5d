//! The MySQL/MariaDB source against the real server: type mapping, read-only enforcement,
//! timeouts, errors and streaming.

mod support;

use std::time::{Duration, Instant};

use backflow::model::value::Value;
use backflow::source::{Privileges, SourceError, SourceOptions, extract};
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
    let db = TestDb::mysql("src_types").await;
    db.exec(
        "CREATE TABLE t (
           id INT, flag BOOLEAN, ti TINYINT, si SMALLINT, mi MEDIUMINT, bi BIGINT,
           tu TINYINT UNSIGNED, bu BIGINT UNSIGNED, bu_small BIGINT UNSIGNED,
           f FLOAT, d DOUBLE, n DECIMAL(38, 0), m DECIMAL(10, 2),
           c CHAR(3), v VARCHAR(20), vb VARCHAR(20) COLLATE utf8mb4_bin, tx TEXT, e ENUM('red', 'green'),
           s SET('a', 'b'), j JSON, dt DATE, tm TIME(3), dtm DATETIME(6), tsp TIMESTAMP NULL, y YEAR
         );
         SET time_zone = '+02:00';
         INSERT INTO t VALUES (
           1, TRUE, -128, -32768, 8388607, -9223372036854775808,
           255, 18446744073709551615, 42,
           0.1, 2.5, 12345678901234567890123456789012345678, -0.50,
           'ab', 'héllo ✓ 日本', 'Case', 'long text', 'green',
           'a,b', '{\"b\": [1, 2], \"a\": null}', '2024-02-29', '13:14:15.500', '2024-03-01 12:00:00.123456',
           '2024-03-01 12:00:00', 2024
         );
         INSERT INTO t (id) VALUES (2);",
    )
    .await;

    let stream = extract(&db.url, "SELECT * FROM t ORDER BY id", &options())
        .await
        .unwrap();
    let types: Vec<&str> = stream.columns().iter().map(|c| c.type_name.as_str()).collect();
    assert_eq!(types[..4], ["INT", "BOOLEAN", "TINYINT", "SMALLINT"]);
    let rows = collect(stream).await.unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0],
        vec![
            Value::Int(1),
            Value::Bool(true),
            Value::Int(-128),
            Value::Int(-32768),
            Value::Int(8_388_607),
            Value::Int(i64::MIN),
            Value::Int(255),
            dec("18446744073709551615"),
            Value::Int(42),
            Value::Float(0.1),
            Value::Float(2.5),
            dec("12345678901234567890123456789012345678"),
            dec("-0.50"),
            text("ab"),
            text("héllo ✓ 日本"),
            text("Case"),
            text("long text"),
            text("green"),
            text("a,b"),
            // MariaDB's JSON is LONGTEXT with a binary collation: it arrives as its text.
            text("{\"b\": [1, 2], \"a\": null}"),
            Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap()),
            Value::Time(NaiveTime::from_hms_milli_opt(13, 14, 15, 500).unwrap()),
            ts("2024-03-01T12:00:00.123456Z"),
            // Written at +02:00, read back in UTC.
            ts("2024-03-01T10:00:00Z"),
            Value::Int(2024),
        ]
    );
    assert_eq!(rows[1][0], Value::Int(2));
    assert!(rows[1][1..].iter().all(|v| *v == Value::Null), "{:?}", rows[1]);
}

#[tokio::test]
async fn text_expressions_over_binary_collations_come_back_as_text() {
    let db = TestDb::mysql("src_concat").await;
    db.exec(
        "CREATE TABLE people (name VARCHAR(20) COLLATE utf8mb4_bin, code TINYTEXT COLLATE utf8mb4_bin);
         INSERT INTO people VALUES ('Zoë', 'x1');",
    )
    .await;
    let rows = rows_of(
        &db,
        "SELECT CONCAT(name, ' #', 1) AS label, CONCAT('a', 1) AS plain, UPPER(code) AS code, 1 + 1 AS two, 1.5 AS one_and_half, NULL AS nothing FROM people",
    )
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![vec![
            text("Zoë #1"),
            text("a1"),
            text("X1"),
            Value::Int(2),
            dec("1.5"),
            Value::Null
        ]]
    );
}

#[tokio::test]
async fn numeric_columns_keep_every_digit() {
    let db = TestDb::mysql("src_numeric").await;
    db.exec(
        "CREATE TABLE amounts (id INT, n DECIMAL(38, 10));
         INSERT INTO amounts VALUES (1, 1234567890123456789012345678.0123456789), (2, 0), (3, -0.0000000001);",
    )
    .await;
    let rows = rows_of(&db, "SELECT n FROM amounts ORDER BY id").await.unwrap();
    let values: Vec<Value> = rows.into_iter().map(|mut r| r.remove(0)).collect();
    assert_eq!(
        values,
        [
            dec("1234567890123456789012345678.0123456789"),
            dec("0"),
            dec("-0.0000000001")
        ]
    );
}

#[tokio::test]
async fn an_unsupported_column_type_names_the_column() {
    let db = TestDb::mysql("src_unsupported").await;
    db.exec(
        "CREATE TABLE shapes (id INT, flags BIT(3), payload VARBINARY(16));
         INSERT INTO shapes VALUES (1, b'101', UNHEX('FF00FE'));",
    )
    .await;
    let err = extract(&db.url, "SELECT id, flags FROM shapes", &options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::UnsupportedType { column, type_name } if column == "flags" && type_name == "BIT"),
        "{err:?}"
    );
    let err = extract(&db.url, "SELECT POINT(1, 2) AS place", &options())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SourceError::UnsupportedType { column, .. } if column == "place"),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_value_without_a_canonical_form_rejects_only_its_row_and_never_shows_the_value() {
    let db = TestDb::mysql("src_undecodable").await;
    db.exec(
        "SET SESSION sql_mode = '';
         CREATE TABLE odd (id INT, d DATE, dt DATETIME, t TIME, b VARBINARY(16));
         INSERT INTO odd VALUES
           (1, '2024-01-01', '2024-01-01 10:00:00', '10:00:00', 'plain'),
           (2, '0000-00-00', NULL, NULL, NULL),
           (3, NULL, '0000-00-00 00:00:00', NULL, NULL),
           (4, '2024-00-10', NULL, NULL, NULL),
           (5, NULL, '2024-02-00 00:00:00', NULL, NULL),
           (6, NULL, NULL, '838:59:59', NULL),
           (7, NULL, NULL, '-01:00:00', NULL),
           (8, NULL, NULL, NULL, UNHEX('FF00FE')),
           (9, '2024-01-02', NULL, NULL, NULL);",
    )
    .await;
    let rows = source_rows_of(&db, "SELECT id, d, dt, t, b FROM odd ORDER BY id")
        .await
        .unwrap();
    assert_eq!(rows.len(), 9, "the stream goes on past every bad value");
    let ids: Vec<Value> = rows.iter().map(|r| r.values()[0].clone()).collect();
    assert_eq!(
        ids,
        (1..=9).map(Value::Int).collect::<Vec<_>>(),
        "the key still decodes"
    );
    assert_eq!(rows[0].values()[4], text("plain"));
    let bad = undecodable(&rows);
    assert_eq!((bad[0].clone(), bad[8].clone()), (None, None));
    let expect = [
        (1, 1, "zero date"),
        (2, 2, "zero date"),
        (3, 1, "zero month or day"),
        (4, 2, "zero month or day"),
        (5, 3, "past 24 hours"),
        (6, 3, "negative"),
        (7, 4, "not UTF-8"),
    ];
    for (row, column, kind) in expect {
        let (c, reason) = bad[row].clone().unwrap_or_else(|| panic!("row {row} decoded"));
        assert_eq!(c, column, "row {row}: {reason}");
        assert!(reason.contains(kind), "row {row}: {reason}");
        assert!(!reason.contains("838") && !reason.contains("2024"), "{reason}");
    }
}

#[tokio::test]
async fn writes_are_refused_and_leave_the_table_unchanged() {
    let db = TestDb::mysql("src_write").await;
    db.exec(
        "CREATE TABLE accounts (id INT PRIMARY KEY, name TEXT);
         INSERT INTO accounts VALUES (1, 'a');
         CREATE FUNCTION add_account() RETURNS INT MODIFIES SQL DATA
           BEGIN INSERT INTO accounts VALUES (99, 'sneaky'); RETURN 1; END;",
    )
    .await;
    for write in [
        "UPDATE accounts SET name = 'changed'",
        "INSERT INTO accounts VALUES (2, 'b')",
        "SELECT add_account() AS added",
        "DELETE FROM accounts",
    ] {
        let err = rows_of(&db, write).await.unwrap_err();
        assert!(matches!(err, SourceError::ReadOnly(_)), "{write}: {err:?}");
    }
    let rows = rows_of(&db, "SELECT id, name FROM accounts").await.unwrap();
    assert_eq!(rows, vec![vec![Value::Int(1), text("a")]]);
}

#[tokio::test]
async fn bad_sql_reports_the_database_message() {
    let db = TestDb::mysql("src_badsql").await;
    let err = extract(&db.url, "SELECT * FROM no_such_table", &options())
        .await
        .unwrap_err();
    match err {
        SourceError::Query(message) => assert!(message.contains("no_such_table"), "{message}"),
        other => panic!("expected Query, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_server_is_a_connect_error_without_the_password() {
    let url = "mysql://backflow:Sup3r-S3cret@127.0.0.1:1/warehouse";
    let err = extract(url, "SELECT 1", &options()).await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    let message = err.to_string();
    assert!(!message.contains("Sup3r-S3cret"), "{message}");
    assert!(message.contains("127.0.0.1:1/warehouse"), "{message}");
}

#[tokio::test]
async fn a_wrong_password_is_a_connect_error_without_the_password() {
    let admin = support::db::mysql_admin_url();
    let (scheme_user, rest) = admin.split_once('@').unwrap();
    let user = scheme_user.split(':').nth(1).unwrap().trim_start_matches('/');
    let url = format!("mysql://{user}:Wr0ng-S3cret@{rest}");
    let err = extract(&url, "SELECT 1", &options()).await.unwrap_err();
    assert!(matches!(err, SourceError::Connect { .. }), "{err:?}");
    assert!(!err.to_string().contains("Wr0ng-S3cret"), "{err}");
}

#[tokio::test]
async fn a_query_past_the_statement_timeout_is_a_timeout() {
    let db = TestDb::mysql("src_timeout").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_millis(200),
        buffer_rows: 16,
    };
    let started = Instant::now();
    // MariaDB 10.11 fails SLEEP() with error 1969 when max_statement_time cuts it short (some
    // servers make an interrupted SLEEP() return 1 instead). Accept the error at either step.
    let err = match extract(&db.url, "SELECT SLEEP(5) AS slept", &options).await {
        Ok(stream) => collect(stream).await.unwrap_err(),
        Err(e) => e,
    };
    assert!(matches!(err, SourceError::Timeout(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(4));
}

fn numbers_query(count: usize, extra: &str) -> String {
    // Portable across MySQL (whose recursive CTEs stop at 1000 levels) and MariaDB: a cross
    // join of digit tables.
    let digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL SELECT 4 \
                  UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL SELECT 8 UNION ALL SELECT 9)";
    let places = count.ilog10() as usize;
    let mut select = String::from("SELECT 1");
    let mut from = Vec::new();
    for p in 0..places {
        select.push_str(&format!(" + d{p}.d * {}", 10_usize.pow(p as u32)));
        from.push(format!("{digits} AS d{p}"));
    }
    format!("{select} AS n{extra} FROM {}", from.join(" CROSS JOIN "))
}

#[tokio::test]
async fn two_hundred_thousand_rows_stream_through_a_small_buffer() {
    let db = TestDb::mysql("src_stream").await;
    let options = SourceOptions {
        statement_timeout: Duration::from_secs(60),
        buffer_rows: 16,
    };
    let query = format!(
        "{} CROSS JOIN (SELECT 0 AS half UNION ALL SELECT 1) AS h",
        numbers_query(100_000, ", h.half")
    );
    let mut stream = extract(&db.url, &query, &options).await.unwrap();
    assert_eq!(stream.columns().len(), 2);
    let mut count = 0;
    let mut sum = 0_i64;
    while let Some(row) = stream.next().await {
        let row = row.unwrap();
        count += 1;
        if let Value::Int(n) = row.values()[0] {
            sum += n;
        }
    }
    assert_eq!(count, 200_000);
    assert_eq!(sum, 2 * (100_000 * 100_001 / 2));
}

#[tokio::test]
async fn dropping_the_stream_early_ends_the_query_on_the_server() {
    let db = TestDb::mysql("src_drop").await;
    let marker = format!("backflow_drop_marker_{}", std::process::id());
    let query = numbers_query(10_000_000, &format!(", '{marker}' AS tag"));
    let mut stream = extract(&db.url, &query, &options()).await.unwrap();
    for _ in 0..10 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);

    let mut admin = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE CONCAT('%', ?, '%') AND ID <> CONNECTION_ID()",
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
async fn a_source_user_with_file_or_super_is_reported_and_a_reader_is_not() {
    let db = TestDb::mysql("privileges").await;
    db.exec("CREATE TABLE t (id INT); INSERT INTO t VALUES (1)").await;
    let reader = format!("{}_r", db.name);
    let files = format!("{}_f", db.name);
    db.exec(&format!(
        "CREATE USER '{reader}'@'%' IDENTIFIED BY 'pw';
         CREATE USER '{files}'@'%' IDENTIFIED BY 'pw';
         GRANT SELECT ON `{db}`.* TO '{reader}'@'%';
         GRANT SELECT ON `{db}`.* TO '{files}'@'%';
         GRANT FILE ON *.* TO '{files}'@'%'",
        db = db.name
    ))
    .await;
    let as_user = |user: &str| db.url.replacen("root@", &format!("{user}:pw@"), 1);
    let privileges = |url: String| async move {
        let stream = extract(&url, "SELECT id FROM t", &options()).await.unwrap();
        stream.privileges().clone()
    };
    let of_reader = privileges(as_user(&reader)).await;
    let of_files = privileges(as_user(&files)).await;
    let of_root = privileges(db.url.clone()).await;
    db.exec(&format!("DROP USER '{reader}'@'%'; DROP USER '{files}'@'%'"))
        .await;

    assert_eq!(of_reader, Privileges::Least);
    assert_eq!(of_files, Privileges::Elevated(vec!["FILE on *.*".into()]));
    assert!(
        matches!(&of_root, Privileges::Elevated(found) if found.contains(&"ALL PRIVILEGES on *.*".to_owned())),
        "{of_root:?}"
    );
}
