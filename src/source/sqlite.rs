//! SQLite source: a local database file, `sqlite://path/to/file.db`.
//!
//! The file is opened read-only (never created: a missing file is a connection error) with
//! `PRAGMA query_only = ON` on top, set when the connection opens, before any text of the
//! query reaches SQLite. A read-only open alone is no sandbox: `VACUUM INTO` and `ATTACH`
//! write new files from a read-only connection. So the query must also be one statement that
//! starts with `SELECT`, `WITH` or `VALUES` ([`one_statement`]); the probe of declared types,
//! which needs a temporary view, runs on a second, throwaway connection only after that check.
//! SQLite has no server-side statement timeout, so the
//! timeout is enforced twice from this side: a progress handler interrupts the SQLite engine
//! once the deadline passes (so a runaway query stops using the CPU), and
//! `tokio::time::timeout` around the streaming task covers time spent waiting, for example on
//! a slow consumer. Either way the stream ends with [`SourceError::Timeout`].
//!
//! SQLite types values, not columns, so each value is decoded by its storage class, refined
//! by the column's declared type where there is one: INTEGER in a BOOLEAN column is a
//! boolean; ISO text in a DATE, DATETIME, TIMESTAMP or TIME column is a date, timestamp or
//! time; text in a JSON column is JSON; text in a NUMERIC or DECIMAL column is an exact
//! decimal — in each case only when the text parses, otherwise it stays text.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteRow};
use sqlx::{Column as _, Connection, Executor, Row, Statement, TypeInfo, ValueRef};
use tokio::time::Instant;

use super::{Column, RowSender, RowStream, SourceError, SourceOptions, SourceRow, ValueError};
use crate::model::value::Value;

/// SQLITE_READONLY: a write to a read-only database (extended codes share the low byte).
const SQLITE_READONLY: i64 = 8;
/// SQLITE_INTERRUPT: the progress handler stopped the statement at the deadline.
const SQLITE_INTERRUPT: i64 = 9;
/// The temporary view through which the declared types of the query's columns are read.
const PROBE_VIEW: &str = "backflow_model_columns";
/// SQLite virtual machine steps between two looks at the clock.
const PROGRESS_STEPS: i32 = 1000;

/// Runs `query` on the SQLite file of `url` and streams its rows.
pub(super) async fn extract(
    url: &str,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let (query, first_word) = one_statement(query)?;
    let probe_options = SqliteConnectOptions::from_str(url)
        .map_err(|e| super::connect_error(url, e))?
        .read_only(true)
        .create_if_missing(false);
    // In force from the first statement of the connection that runs the query.
    let connect_options = super::model_read_logging(probe_options.clone().pragma("query_only", "ON"));
    let path = connect_options.get_filename();
    if !is_in_memory(url, path) && !path.exists() {
        return Err(super::connect_error(
            url,
            format!("the database file {} does not exist", path.display()),
        ));
    }
    let mut conn = SqliteConnection::connect_with(&connect_options)
        .await
        .map_err(|e| super::connect_error(url, e))?;

    let timeout = options.statement_timeout;
    if !is_select(first_word) {
        // Preparing runs nothing, and gives a typo its syntax error.
        let prepared = conn.prepare(query).await.map(|_| ());
        let _ = conn.close().await;
        prepared.map_err(|e| query_error(e, timeout))?;
        return Err(SourceError::ReadOnly(format!(
            "a model query is one SELECT statement, and this one starts with {first_word:?}"
        )));
    }
    // The timeout is bounded by validation; a clock overflow still means "no deadline soon".
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
    let declared_types = declared_types(&probe_options, query).await;
    let columns = match start(&mut conn, query, declared_types, timeout, deadline).await {
        Ok(columns) => columns,
        Err(e) => {
            let _ = conn.close().await;
            return Err(e);
        }
    };
    let (tx, rx) = super::row_channel(options);
    let public = columns.iter().map(|c| c.column.clone()).collect();
    tokio::spawn(stream(conn, query.to_owned(), columns, tx, timeout, deadline));
    Ok(RowStream::new(public, rx))
}

fn is_in_memory(url: &str, path: &Path) -> bool {
    path.as_os_str() == ":memory:" || url.contains("mode=memory")
}

/// A column of the result and the meaning its declared type gives to its values.
#[derive(Debug, Clone)]
struct PlannedColumn {
    column: Column,
    declared: Declared,
}

/// What a declared type says about a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declared {
    Bool,
    Date,
    Time,
    Timestamp,
    Json,
    Decimal,
    /// No declared type (an expression) or one that adds nothing to the storage class.
    Other,
}

fn declared(type_name: &str) -> Declared {
    let t = type_name.trim().to_ascii_uppercase();
    if t.contains("BOOL") {
        Declared::Bool
    } else if t.starts_with("DATETIME") || t.starts_with("TIMESTAMP") {
        Declared::Timestamp
    } else if t == "DATE" {
        Declared::Date
    } else if t.starts_with("TIME") {
        Declared::Time
    } else if t == "JSON" {
        Declared::Json
    } else if t.starts_with("NUMERIC") || t.starts_with("DECIMAL") {
        Declared::Decimal
    } else {
        Declared::Other
    }
}

/// Sets the deadline and learns the columns, with the declared types the probe found.
async fn start(
    conn: &mut SqliteConnection,
    query: &str,
    declared_types: Option<Vec<String>>,
    timeout: Duration,
    deadline: Instant,
) -> Result<Vec<PlannedColumn>, SourceError> {
    let deadline = deadline.into_std();
    conn.lock_handle()
        .await
        .map_err(|e| query_error(e, timeout))?
        .set_progress_handler(PROGRESS_STEPS, move || std::time::Instant::now() < deadline);

    let statement = conn.prepare(query).await.map_err(|e| query_error(e, timeout))?;
    if statement.columns().is_empty() {
        // No result columns past the SELECT check: a `WITH … DELETE` (or `UPDATE`, `INSERT`).
        // Refused without running, like any statement that is not a SELECT.
        return Err(SourceError::ReadOnly(
            "the statement returns no columns: a model query is one SELECT statement".to_owned(),
        ));
    }
    statement
        .columns()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            // sqlx only knows the declared types it maps to Rust types (and calls an
            // expression NULL before the first step); the probe view knows them all.
            let type_name = match declared_types.as_ref().and_then(|t| t.get(i)) {
                Some(t) if !t.is_empty() => t.clone(),
                Some(_) => "ANY".to_owned(),
                None => match c.type_info().name() {
                    "NULL" => "ANY".to_owned(),
                    other => other.to_owned(),
                },
            };
            let column = Column {
                name: c.name().to_owned(),
                type_name,
            };
            // A BLOB declaration is no refusal up front: through a view SQLite also calls a
            // column declared without a type BLOB, and such a column may hold anything. A
            // blob that is not UTF-8 text rejects its row.
            let declared = declared(&column.type_name);
            Ok(PlannedColumn { column, declared })
        })
        .collect()
}

/// The declared type of each column of `query` ("" for an expression), or `None` when the
/// query cannot be a view.
///
/// sqlx exposes a column's declared type only when it maps it to a Rust type, and
/// `sqlite3_column_decltype` is out of reach without unsafe code, so the query is wrapped in
/// a temporary view and `pragma_table_info` reads the declared types back. A view is a write
/// (to the connection's private temp schema), which `query_only` forbids, so the probe has a
/// connection of its own, opened read-only and closed at once; `query` is one SELECT
/// ([`one_statement`]), so the view's text is one statement and nothing else runs there.
async fn declared_types(options: &SqliteConnectOptions, query: &str) -> Option<Vec<String>> {
    let mut conn = SqliteConnection::connect_with(options).await.ok()?;
    let types = probe(&mut conn, query).await;
    let _ = conn.close().await;
    types
}

async fn probe(conn: &mut SqliteConnection, query: &str) -> Option<Vec<String>> {
    let create = format!("CREATE TEMP VIEW {PROBE_VIEW} AS {query}");
    conn.execute(create.as_str()).await.ok()?;
    let types = sqlx::query_scalar::<_, String>(&format!(
        "SELECT type FROM pragma_table_info('{PROBE_VIEW}') ORDER BY cid"
    ))
    .fetch_all(&mut *conn)
    .await
    .ok();
    let _ = conn
        .execute(format!("DROP VIEW temp.{PROBE_VIEW}").as_str())
        .await;
    types
}

/// The streaming task: fetch and send until done, an error, the receiver leaves or the
/// deadline passes.
async fn stream(
    mut conn: SqliteConnection,
    query: String,
    columns: Vec<PlannedColumn>,
    tx: RowSender,
    timeout: Duration,
    deadline: Instant,
) {
    let rows = sqlx::query(&query).fetch(&mut conn);
    let pumped = super::pump(
        rows,
        &tx,
        |row: &SqliteRow| decode_row(row, &columns),
        |e| query_error(e, timeout),
    );
    if tokio::time::timeout_at(deadline, pumped).await.is_err() {
        let _ = tx.send(Err(SourceError::Timeout(timeout))).await;
    }
    // Nothing to roll back: no transaction was opened, as a single SELECT already reads one
    // consistent snapshot of the file.
    let _ = conn.close().await;
}

fn decode_row(row: &SqliteRow, columns: &[PlannedColumn]) -> Result<SourceRow, SourceError> {
    super::decode_row(columns.len(), |i| decode_value(row, i, &columns[i]))
}

/// Why text cannot be read: SQLite stores whatever bytes it is given as TEXT.
const NOT_UTF8: &str = "text that is not valid UTF-8";

fn decode_value(row: &SqliteRow, i: usize, planned: &PlannedColumn) -> Result<Value, ValueError> {
    let raw = row.try_get_raw(i).map_err(|e| SourceError::Decode {
        column: planned.column.name.clone(),
        reason: e.to_string(),
    })?;
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let malformed = |_| ValueError::undecodable("a value the driver could not read");
    Ok(match raw.type_info().name() {
        "INTEGER" => {
            let n = row.try_get_unchecked::<i64, _>(i).map_err(malformed)?;
            match planned.declared {
                Declared::Bool => Value::Bool(n != 0),
                _ => Value::Int(n),
            }
        }
        "REAL" => super::float(row.try_get_unchecked::<f64, _>(i).map_err(malformed)?)?,
        "TEXT" => {
            let bytes = row.try_get_unchecked::<&[u8], _>(i).map_err(malformed)?;
            let text = std::str::from_utf8(bytes).map_err(|_| ValueError::undecodable(NOT_UTF8))?;
            text_value(text.to_owned(), planned.declared)
        }
        // SQLite types values, not columns: a blob can sit in any column. Like a MySQL
        // binary string, it is text when its bytes are UTF-8.
        _ => {
            let bytes = row.try_get_unchecked::<&[u8], _>(i).map_err(malformed)?;
            match std::str::from_utf8(bytes) {
                Ok(text) => text_value(text.to_owned(), planned.declared),
                Err(_) => {
                    return Err(ValueError::undecodable(
                        "a blob that is not UTF-8 text (send it as hex(column) in the query)",
                    ));
                }
            }
        }
    })
}

/// Text refined by the declared type when it parses as that type, else kept as text.
fn text_value(text: String, declared: Declared) -> Value {
    let refined = match declared {
        Declared::Date => NaiveDate::parse_from_str(&text, "%Y-%m-%d").ok().map(Value::Date),
        Declared::Time => parse_time(&text).map(Value::Time),
        Declared::Timestamp => parse_timestamp(&text).map(Value::Timestamp),
        Declared::Json => serde_json::from_str(&text).ok().map(Value::Json),
        // Parsed without the exponent check: an out-of-range decimal stays a decimal, so the
        // planner rejects its row naming the column instead of sending it as text.
        Declared::Decimal => text.trim().parse().ok().map(Value::Decimal),
        Declared::Bool | Declared::Other => None,
    };
    refined.unwrap_or(Value::Text(text))
}

fn parse_time(text: &str) -> Option<NaiveTime> {
    ["%H:%M:%S%.f", "%H:%M"]
        .iter()
        .find_map(|f| NaiveTime::parse_from_str(text, f).ok())
}

/// The timestamp forms SQLite's date functions and common drivers write: a date, a space or
/// `T`, a time with optional fraction, then an optional `Z` or offset. No offset means UTC.
fn parse_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    let (body, utc_suffix) = match text.strip_suffix(['Z', 'z']) {
        Some(body) => (body, true),
        None => (text, false),
    };
    if !utc_suffix {
        for format in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
            if let Ok(t) = DateTime::parse_from_str(body, format) {
                return Some(t.with_timezone(&Utc));
            }
        }
    }
    let naive = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(body, f).ok())
    .or_else(|| {
        NaiveDate::parse_from_str(body, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
    })?;
    Some(naive.and_utc())
}

/// True when a statement starting with `word` is a query (`SELECT`, `WITH`, `VALUES`).
fn is_select(word: &str) -> bool {
    ["SELECT", "WITH", "VALUES"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k))
}

/// The query without its trailing `;`, and its first word, when it is one statement. SQLite
/// runs every statement of a text, and a read-only connection still writes files through
/// `VACUUM INTO` and `ATTACH`: a model query is one SELECT ([`is_select`]).
///
/// Strings (`'…'`), quoted names (`"…"`, `` `…` ``, `[…]`) and comments (`--`, `/* */`) are
/// skipped when looking for `;`, as SQLite's tokenizer does.
pub(super) fn one_statement(query: &str) -> Result<(&str, &str), SourceError> {
    let more_than_one = || {
        SourceError::Query(
            "the model query holds more than one statement; a model query is one SELECT".to_owned(),
        )
    };
    // The index just past the first `closing` at or after `from` (the end when unclosed).
    let past = |from: usize, closing: &str| {
        query
            .get(from..)
            .and_then(|rest| rest.find(closing))
            .map_or(query.len(), |at| from + at + closing.len())
    };
    let bytes = query.as_bytes();
    let (mut i, mut end, mut first_word) = (0, None, None);
    while let Some(&c) = bytes.get(i) {
        let (next, content) = match c {
            b'-' if bytes.get(i + 1) == Some(&b'-') => (past(i + 2, "\n"), false),
            b'/' if bytes.get(i + 1) == Some(&b'*') => (past(i + 2, "*/"), false),
            b'\'' => (past(i + 1, "'"), true),
            b'"' => (past(i + 1, "\""), true),
            b'`' => (past(i + 1, "`"), true),
            b'[' => (past(i + 1, "]"), true),
            b';' => {
                end.get_or_insert(i);
                (i + 1, false)
            }
            c if c.is_ascii_whitespace() => (i + 1, false),
            _ => {
                let word = bytes[i..]
                    .iter()
                    .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                    .count()
                    .max(1);
                first_word.get_or_insert((i, i + word));
                (i + word, true)
            }
        };
        if content && end.is_some() {
            return Err(more_than_one());
        }
        i = next;
    }
    let word = first_word.and_then(|(a, b)| query.get(a..b)).unwrap_or_default();
    let body = query.get(..end.unwrap_or(query.len())).unwrap_or(query).trim();
    Ok((body, word))
}

/// Sorts a query failure by SQLite's result code.
fn query_error(e: sqlx::Error, timeout: Duration) -> SourceError {
    let sqlx::Error::Database(db) = &e else {
        return SourceError::Query(e.to_string());
    };
    let primary = db.code().and_then(|c| c.parse::<i64>().ok()).map(|c| c & 0xff);
    match primary {
        Some(SQLITE_READONLY) => SourceError::ReadOnly(db.message().to_owned()),
        Some(SQLITE_INTERRUPT) => SourceError::Timeout(timeout),
        _ => SourceError::Query(db.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bigdecimal::BigDecimal;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn timestamps_in_the_usual_sqlite_forms_are_read_as_utc() {
        assert_eq!(
            parse_timestamp("2024-03-01 12:00:00"),
            Some(utc("2024-03-01T12:00:00Z"))
        );
        assert_eq!(
            parse_timestamp("2024-03-01T12:00:00.250Z"),
            Some(utc("2024-03-01T12:00:00.25Z"))
        );
        assert_eq!(
            parse_timestamp("2024-03-01 12:00:00+02:00"),
            Some(utc("2024-03-01T10:00:00Z"))
        );
        assert_eq!(parse_timestamp("2024-03-01"), Some(utc("2024-03-01T00:00:00Z")));
        assert_eq!(parse_timestamp("yesterday"), None);
    }

    #[test]
    fn a_model_query_is_one_statement_whatever_its_strings_and_comments_hold() {
        for (ok, word) in [
            ("SELECT 1", "SELECT"),
            (
                "  select 'a;b' AS \"x;y\", [c;d] FROM t; -- done; really\n",
                "select",
            ),
            ("/* lead; */ WITH n(x) AS (SELECT 1) SELECT x FROM n;", "WITH"),
            ("VACUUM INTO '/tmp/x.db'", "VACUUM"),
        ] {
            let (body, first) = one_statement(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert!(!body.ends_with(';'), "{body}");
            assert_eq!(first, word);
        }
        for two in [
            "SELECT 1; VACUUM INTO '/tmp/x.db'",
            "SELECT 1;ATTACH 'x' AS y",
            "SELECT 1; 'text'",
        ] {
            assert!(matches!(one_statement(two), Err(SourceError::Query(_))), "{two}");
        }
        assert!(is_select("values") && is_select("With") && !is_select("PRAGMA") && !is_select(""));
    }

    #[test]
    fn declared_types_are_read_like_sqlite_reads_affinity() {
        assert_eq!(declared("boolean"), Declared::Bool);
        assert_eq!(declared("DECIMAL(38, 0)"), Declared::Decimal);
        assert_eq!(declared("TIMESTAMP WITH TIME ZONE"), Declared::Timestamp);
        assert_eq!(declared("datetime"), Declared::Timestamp);
        assert_eq!(declared("DATE"), Declared::Date);
        assert_eq!(declared("json"), Declared::Json);
        assert_eq!(declared("VARCHAR(10)"), Declared::Other);
        assert_eq!(declared(""), Declared::Other);
    }

    #[test]
    fn text_that_does_not_parse_as_its_declared_type_stays_text() {
        assert_eq!(
            text_value("soon".into(), Declared::Date),
            Value::Text("soon".into())
        );
        assert_eq!(
            text_value("10.50".into(), Declared::Decimal),
            Value::Decimal(BigDecimal::from_str("10.50").unwrap())
        );
        assert_eq!(
            text_value("{oops".into(), Declared::Json),
            Value::Text("{oops".into())
        );
    }
}
