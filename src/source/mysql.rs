//! MySQL and MariaDB source (and the databases that speak their protocol: TiDB, StarRocks, …).
//!
//! One connection per extraction: the session is put in UTC (`time_zone = '+00:00'`, so
//! TIMESTAMP columns arrive in UTC and DATETIME columns are read as UTC), given a statement
//! timeout (`max_statement_time` in seconds on MariaDB, `max_execution_time` in milliseconds on
//! MySQL) and a `START TRANSACTION READ ONLY`. The query is prepared first so its columns are
//! known before any row.
//!
//! sqlx does not expose a column's character set, only its BINARY flag, which MySQL also sets
//! for text with a binary collation (`utf8mb4_bin`, MariaDB's JSON columns, a `CONCAT` over
//! such a column). Binary-flagged strings are therefore read as text when their bytes are
//! UTF-8; a value that is not (real binary data: a BLOB, a `BINARY(16)` UUID) rejects its
//! row rather than reaching a destination as garbage, though a binary column whose values
//! all happen to be valid UTF-8 reads as text.

use std::str::FromStr;
use std::time::Duration;

use bigdecimal::BigDecimal;
use chrono::NaiveDateTime;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError, MySqlRow};
use sqlx::{Column as _, Connection, Executor, Row, Statement, TypeInfo, ValueRef};

use super::{Column, RowSender, RowStream, SourceError, SourceOptions, SourceRow, StreamEnd, ValueError};
use crate::model::value::Value;

/// ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION.
const ER_READ_ONLY_TRANSACTION: u16 = 1792;
/// MariaDB's ER_STATEMENT_TIMEOUT (`max_statement_time` exceeded).
const ER_STATEMENT_TIMEOUT: u16 = 1969;
/// MySQL's ER_QUERY_TIMEOUT (`max_execution_time` exceeded), before and after 5.7.8.
const ER_QUERY_TIMEOUT: [u16; 2] = [1907, 3024];

/// Runs `query` on the MySQL or MariaDB database of `url` and streams its rows.
pub(super) async fn extract(
    url: &str,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    // sqlx reads `mariadb://` as unknown; the protocol is the same.
    let normalized = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_owned(),
    };
    let connect_options = MySqlConnectOptions::from_str(&normalized)
        .map_err(|e| super::connect_error(url, e))?
        // Overrides a `timezone` URL parameter: canonical timestamps are UTC.
        .timezone(Some("+00:00".to_owned()));
    let connect_options = super::model_read_logging(connect_options);
    if connect_options.get_socket().is_none() {
        crate::egress::check_endpoint(connect_options.get_host(), connect_options.get_port()).await?;
    }
    let mut conn = MySqlConnection::connect_with(&connect_options)
        .await
        .map_err(|e| super::connect_error(url, e))?;

    let timeout = options.statement_timeout;
    let prepared = match start(&mut conn, query, timeout).await {
        Ok(prepared) => prepared,
        Err(e) => {
            let _ = conn.close().await;
            return Err(e);
        }
    };
    let privileges = privileges(&mut conn).await;
    let (tx, rx) = super::row_channel(options);
    tokio::spawn(stream(conn, query.to_owned(), prepared.clone(), tx, timeout));
    Ok(RowStream::new(prepared, rx).with_privileges(privileges))
}

/// The global privileges that escape a read-only transaction: `FILE` (`SELECT … INTO
/// OUTFILE`, `LOAD_FILE`) and `SUPER` (and `ALL PRIVILEGES`, which holds both).
const ESCAPING: [&str; 3] = ["ALL PRIVILEGES", "FILE", "SUPER"];

/// What the login may do beyond reading, from `SHOW GRANTS` (which, unlike
/// `information_schema.USER_PRIVILEGES`, lists the current role's grants on MariaDB). A
/// failure is `Unknown`, never an error.
async fn privileges(conn: &mut MySqlConnection) -> super::Privileges {
    let rows = match conn.fetch_all("SHOW GRANTS").await {
        Ok(rows) => rows,
        Err(e) => return super::Privileges::Unknown(e.to_string()),
    };
    let grants: Vec<String> = rows
        .iter()
        .filter_map(|row| {
            let bytes = row.try_get_unchecked::<&[u8], _>(0).ok()?;
            Some(String::from_utf8_lossy(bytes).into_owned())
        })
        .collect();
    let found = escaping_privileges(&grants);
    if found.is_empty() {
        super::Privileges::Least
    } else {
        super::Privileges::Elevated(found.into_iter().map(|p| format!("{p} on *.*")).collect())
    }
}

/// The [`ESCAPING`] privileges that `SHOW GRANTS` lines give on `*.*`.
fn escaping_privileges(grants: &[String]) -> Vec<&'static str> {
    let mut found = Vec::new();
    for line in grants {
        let Some(rest) = line.strip_prefix("GRANT ") else {
            continue;
        };
        let Some((list, target)) = rest.split_once(" ON ") else {
            continue;
        };
        if !target.trim_start().starts_with("*.*") {
            continue;
        }
        for privilege in list.split(',').map(str::trim) {
            if let Some(p) = ESCAPING.iter().find(|p| privilege.eq_ignore_ascii_case(p))
                && !found.contains(p)
            {
                found.push(*p);
            }
        }
    }
    found
}

/// Sets up the session and the read-only transaction, and learns the columns.
async fn start(
    conn: &mut MySqlConnection,
    query: &str,
    timeout: Duration,
) -> Result<Vec<Column>, SourceError> {
    let setup_error = |e| query_error(e, timeout);
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&mut *conn)
        .await
        .map_err(setup_error)?;
    let set_timeout = if version.contains("MariaDB") {
        // Seconds, with microsecond precision.
        let seconds = super::timeout_millis(timeout) as f64 / 1000.0;
        format!("SET SESSION max_statement_time = {seconds:.3}")
    } else {
        // Milliseconds; MySQL applies it to read-only SELECT statements, which is all we run.
        format!(
            "SET SESSION max_execution_time = {}",
            super::timeout_millis(timeout)
        )
    };
    for statement in [
        set_timeout.as_str(),
        "SET SESSION time_zone = '+00:00'",
        "START TRANSACTION READ ONLY",
    ] {
        conn.execute(statement).await.map_err(setup_error)?;
    }

    let statement = conn.prepare(query).await.map_err(setup_error)?;
    if statement.columns().is_empty() {
        // No result columns: no model. Run in the read-only transaction, a plain DELETE or
        // UPDATE is refused by the server (it tried to write) and changes nothing.
        return Err(match conn.execute(query).await {
            Ok(_) => SourceError::NoColumns,
            Err(e) => setup_error(e),
        });
    }
    statement
        .columns()
        .iter()
        .map(|c| {
            let column = Column {
                name: c.name().to_owned(),
                type_name: c.type_info().name().to_owned(),
            };
            match kind_of(&column.type_name) {
                Some(_) => Ok(column),
                None => Err(SourceError::UnsupportedType {
                    column: column.name,
                    type_name: column.type_name,
                }),
            }
        })
        .collect()
}

/// How values of a MySQL type are decoded, by sqlx's name for the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Null,
    Bool,
    Signed,
    Unsigned,
    Float,
    Double,
    Decimal,
    Text,
    /// A binary-flagged string: text with a binary collation, or real binary data.
    MaybeText,
    Date,
    Time,
    Datetime,
    Json,
}

fn kind_of(type_name: &str) -> Option<Kind> {
    let kind = match type_name {
        "NULL" => Kind::Null,
        // sqlx calls TINYINT(1) BOOLEAN, MySQL's own alias for it.
        "BOOLEAN" => Kind::Bool,
        "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" => Kind::Signed,
        "TINYINT UNSIGNED" | "SMALLINT UNSIGNED" | "MEDIUMINT UNSIGNED" | "INT UNSIGNED"
        | "BIGINT UNSIGNED" | "YEAR" => Kind::Unsigned,
        "FLOAT" => Kind::Float,
        "DOUBLE" => Kind::Double,
        "DECIMAL" => Kind::Decimal,
        "CHAR" | "VARCHAR" | "TINYTEXT" | "TEXT" | "MEDIUMTEXT" | "LONGTEXT" | "ENUM" | "SET" => Kind::Text,
        "BINARY" | "VARBINARY" | "TINYBLOB" | "BLOB" | "MEDIUMBLOB" | "LONGBLOB" => Kind::MaybeText,
        "DATE" => Kind::Date,
        "TIME" => Kind::Time,
        "DATETIME" | "TIMESTAMP" => Kind::Datetime,
        "JSON" => Kind::Json,
        // BIT, GEOMETRY
        _ => return None,
    };
    Some(kind)
}

/// The streaming task: fetch, decode, send, then end the transaction.
async fn stream(
    mut conn: MySqlConnection,
    query: String,
    columns: Vec<Column>,
    tx: RowSender,
    timeout: Duration,
) {
    let rows = sqlx::query(&query).fetch(&mut conn);
    let end = super::pump(
        rows,
        &tx,
        |row: &MySqlRow| decode_row(row, &columns),
        |e| query_error(e, timeout),
    )
    .await;
    if end != StreamEnd::ReceiverGone {
        let _ = conn.execute("ROLLBACK").await;
    }
    // When the receiver went away mid-result, a ROLLBACK would first read every remaining
    // row; closing the session aborts the query and the transaction instead.
    let _ = conn.close().await;
}

fn decode_row(row: &MySqlRow, columns: &[Column]) -> Result<SourceRow, SourceError> {
    super::decode_row(columns.len(), |i| decode_value(row, i, &columns[i]))
}

fn decode_value(row: &MySqlRow, i: usize, column: &Column) -> Result<Value, ValueError> {
    let raw = row.try_get_raw(i).map_err(|e| SourceError::Decode {
        column: column.name.clone(),
        reason: e.to_string(),
    })?;
    // The executed statement's metadata can differ from the prepared one (a wider integer, a
    // different string type); the value's own type decides, so an unsigned byte is never
    // read as signed.
    let type_info = raw.type_info();
    let type_name = type_info.name();
    let kind = kind_of(type_name);
    // sqlx calls a zero date NULL: it must be told apart first, or it would arrive as NULL.
    if matches!(kind, Some(Kind::Date | Kind::Datetime)) {
        reject_zero_date(row, i)?;
    }
    if raw.is_null() {
        return Ok(Value::Null);
    }
    let kind = kind.ok_or_else(|| SourceError::UnsupportedType {
        column: column.name.clone(),
        type_name: type_name.to_owned(),
    })?;
    // The driver's messages quote the value ("invalid date: 2024/0/10"), so only the kind of
    // value is reported.
    fn get<'r, T: sqlx::Decode<'r, sqlx::MySql>>(
        row: &'r MySqlRow,
        i: usize,
        what: &'static str,
    ) -> Result<T, ValueError> {
        row.try_get_unchecked::<T, _>(i)
            .map_err(|_| ValueError::undecodable(what))
    }
    Ok(match kind {
        Kind::Null => Value::Null,
        Kind::Bool => Value::Bool(get(row, i, "a malformed boolean")?),
        Kind::Signed => Value::Int(get(row, i, "a malformed integer")?),
        Kind::Unsigned => {
            let n: u64 = get(row, i, "a malformed unsigned integer")?;
            match i64::try_from(n) {
                Ok(n) => Value::Int(n),
                Err(_) => Value::Decimal(BigDecimal::from(n)),
            }
        }
        Kind::Float => super::float(super::widen_f32(get(row, i, "a malformed FLOAT")?))?,
        Kind::Double => super::float(get(row, i, "a malformed DOUBLE")?)?,
        Kind::Decimal => Value::Decimal(get(row, i, "a malformed DECIMAL")?),
        Kind::Text => Value::Text(get(row, i, "text that is not valid UTF-8")?),
        Kind::MaybeText => {
            let bytes: &[u8] = get(row, i, "a malformed binary string")?;
            match std::str::from_utf8(bytes) {
                Ok(text) => Value::Text(text.to_owned()),
                Err(_) => {
                    return Err(ValueError::undecodable(
                        "binary data that is not UTF-8 text (send it as HEX() or TO_BASE64() in the query)",
                    ));
                }
            }
        }
        Kind::Date => Value::Date(get(row, i, INVALID_DATE)?),
        Kind::Time => {
            // sqlx drops the sign of a negative TIME (`-01:00:00` would read as 01:00).
            let bytes: &[u8] = get(row, i, DURATION)?;
            if matches!(bytes, [len, 1, ..] if *len >= 8) {
                return Err(ValueError::undecodable(DURATION));
            }
            Value::Time(get(row, i, DURATION)?)
        }
        Kind::Datetime => {
            // The session time zone is UTC, so both DATETIME and TIMESTAMP are UTC here.
            Value::Timestamp(get::<NaiveDateTime>(row, i, INVALID_DATE)?.and_utc())
        }
        Kind::Json => {
            Value::Json(get::<sqlx::types::Json<serde_json::Value>>(row, i, super::JSON_UNREADABLE)?.0)
        }
    })
}

/// Why a TIME is no time of day.
const DURATION: &str = "a TIME that is negative or past 24 hours, which is a duration and not a time of day (cast it to a number of seconds with TIME_TO_SEC in the query)";

/// A date MySQL accepts but the calendar does not (with `NO_ZERO_IN_DATE` off).
const INVALID_DATE: &str = "a date with a zero month or day, which is not a calendar date (turn it into NULL in the query with NULLIF)";

/// MySQL's zero date (`0000-00-00`) travels as an empty binary value, which sqlx reads as
/// NULL: a zero date would become NULL without a word.
fn reject_zero_date(row: &MySqlRow, i: usize) -> Result<(), ValueError> {
    match row.try_get_unchecked::<&[u8], _>(i) {
        Ok([0, ..]) => Err(ValueError::undecodable(
            "the zero date 0000-00-00, which is not a calendar date (turn it into NULL in the query with NULLIF)",
        )),
        _ => Ok(()),
    }
}

fn decode_reason(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Sorts a query failure by the server's error number.
fn query_error(e: sqlx::Error, timeout: Duration) -> SourceError {
    let sqlx::Error::Database(db) = &e else {
        return SourceError::Query(decode_reason(&e));
    };
    let number = db
        .try_downcast_ref::<MySqlDatabaseError>()
        .map(MySqlDatabaseError::number);
    match number {
        Some(ER_READ_ONLY_TRANSACTION) => SourceError::ReadOnly(db.message().to_owned()),
        Some(n) if n == ER_STATEMENT_TIMEOUT || ER_QUERY_TIMEOUT.contains(&n) => {
            SourceError::Timeout(timeout)
        }
        _ => SourceError::Query(db.message().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_super_and_all_privileges_count_only_on_every_database() {
        let grants =
            |lines: &[&str]| escaping_privileges(&lines.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>());
        assert_eq!(
            grants(&[
                "GRANT SELECT, FILE ON *.* TO `u`@`%`",
                "GRANT SUPER ON *.* TO `r`"
            ]),
            ["FILE", "SUPER"]
        );
        assert_eq!(
            grants(&["GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost`"]),
            ["ALL PRIVILEGES"]
        );
        assert!(
            grants(&[
                "GRANT ALL PRIVILEGES ON `shop`.* TO `u`@`%`",
                "GRANT `r` TO `u`@`%`"
            ])
            .is_empty()
        );
        assert!(
            grants(&[
                "GRANT USAGE ON *.* TO `u`@`%`",
                "GRANT SELECT ON `shop`.* TO `u`@`%`"
            ])
            .is_empty()
        );
    }

    #[test]
    fn binary_and_spatial_types_are_told_apart_from_text() {
        assert_eq!(kind_of("VARCHAR"), Some(Kind::Text));
        assert_eq!(kind_of("VARBINARY"), Some(Kind::MaybeText));
        assert_eq!(kind_of("BIGINT UNSIGNED"), Some(Kind::Unsigned));
        assert_eq!(kind_of("BIT"), None);
        assert_eq!(kind_of("GEOMETRY"), None);
    }
}
