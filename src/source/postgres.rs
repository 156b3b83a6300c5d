//! PostgreSQL source (and the databases that speak its protocol: CockroachDB, AlloyDB, …;
//! Redshift through its [`Flavour`] in `redshift.rs`).
//!
//! One connection per extraction, in a `READ ONLY` transaction with `SET LOCAL
//! statement_timeout`. The query is prepared first so its columns are known (and unsupported
//! types refused) before any row is read; rows then arrive in the binary format of the
//! extended protocol (or, for a flavour with `text_rows`, the text format of the simple
//! protocol) and are decoded by the kind decided for their column.

use std::str::FromStr;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Utc};
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow, PgTypeInfo, PgTypeKind, PgValueFormat};
use sqlx::{Column as _, Connection, Executor, Row, Statement, TypeInfo, ValueRef};
use uuid::Uuid;

use super::{Column, RowSender, RowStream, SourceError, SourceOptions, SourceRow, StreamEnd, ValueError};
use crate::model::value::Value;

/// SQLSTATE `read_only_sql_transaction`: the query tried to write.
const READ_ONLY_SQL_TRANSACTION: &str = "25006";
/// SQLSTATE `query_canceled`: raised when `statement_timeout` expires.
const QUERY_CANCELED: &str = "57014";

/// What differs between the servers that speak the PostgreSQL protocol.
#[derive(Debug)]
pub(super) struct Flavour {
    /// Statements that open the read-only transaction with the statement timeout (in
    /// milliseconds), run in order through the simple protocol.
    pub(super) setup: fn(u64) -> Vec<String>,
    /// Rows travel in the text format of the simple query protocol instead of the binary
    /// format of the extended one.
    pub(super) text_rows: bool,
    /// A server-specific reading of a query failure, before the generic one.
    pub(super) explain: fn(&sqlx::Error, std::time::Duration) -> Option<SourceError>,
    /// Whether to look for powers beyond reading in PostgreSQL's role catalog (a failed
    /// query would abort the read-only transaction on a server without it).
    pub(super) privileges: bool,
}

/// PostgreSQL itself: `BEGIN READ ONLY; SET LOCAL statement_timeout` in one round trip, rows
/// in binary.
const POSTGRES: Flavour = Flavour {
    setup: |millis| vec![format!("BEGIN READ ONLY; SET LOCAL statement_timeout = {millis}")],
    text_rows: false,
    explain: |_, _| None,
    privileges: true,
};

/// Runs `query` on the PostgreSQL database of `url` and streams its rows.
pub(super) async fn extract(
    url: &str,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let connect_options = PgConnectOptions::from_str(url).map_err(|e| super::connect_error(url, e))?;
    extract_with(url, &connect_options, query, options, &POSTGRES).await
}

/// Runs `query` with `connect_options` on a server of `flavour`; `url` names it in messages.
pub(super) async fn extract_with(
    url: &str,
    connect_options: &PgConnectOptions,
    query: &str,
    options: &SourceOptions,
    flavour: &'static Flavour,
) -> Result<RowStream, SourceError> {
    if connect_options.get_socket().is_none() && !connect_options.get_host().starts_with('/') {
        crate::egress::check_endpoint(connect_options.get_host(), connect_options.get_port()).await?;
    }
    let connect_options = super::model_read_logging(connect_options.clone());
    let mut conn = PgConnection::connect_with(&connect_options)
        .await
        .map_err(|e| super::connect_error(url, e))?;

    let timeout = options.statement_timeout;
    // statement_timeout is an int4 of milliseconds on the server.
    let millis = super::timeout_millis(timeout).min(i32::MAX as u64);
    for statement in (flavour.setup)(millis) {
        // A plain string runs through the simple protocol, which takes several statements
        // at once. (`sqlx::raw_sql` would too, but its future is not `Send` for every
        // lifetime, so a caller could not spawn `extract`.)
        if let Err(e) = conn.execute(statement.as_str()).await {
            let _ = conn.close().await;
            return Err(query_error(e, timeout, flavour));
        }
    }

    let privileges = match flavour.privileges {
        true => privileges(&mut conn).await,
        false => super::Privileges::Unknown("this server has no PostgreSQL role catalog to check".to_owned()),
    };
    let plan = match describe(&mut conn, query, timeout, flavour).await {
        // A statement without result columns is no model; a plain DELETE or UPDATE is one
        // that writes. Running it in the read-only transaction says which, in the server's
        // words, and cannot change anything.
        Ok(plan) if plan.is_empty() => {
            let refused = match conn.execute(query).await {
                Ok(_) => SourceError::NoColumns,
                Err(e) => query_error(e, timeout, flavour),
            };
            let _ = conn.close().await;
            return Err(refused);
        }
        Ok(plan) => plan,
        Err(e) => {
            // The connection is ours alone: closing it ends the transaction as well.
            let _ = conn.close().await;
            return Err(e);
        }
    };
    let (tx, rx) = super::row_channel(options);
    let columns = plan.iter().map(|c| c.column.clone()).collect();
    tokio::spawn(stream(conn, query.to_owned(), plan, tx, timeout, flavour));
    Ok(RowStream::new(columns, rx).with_privileges(privileges))
}

/// The predefined roles that read or write the server's files or run programs on it.
const SERVER_ROLES: [&str; 3] = [
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_read_server_files",
];

/// What the login may do beyond reading: superuser, membership in a role of
/// [`SERVER_ROLES`], or `dblink_exec` (a second connection, outside the read-only
/// transaction). Runs inside the read-only transaction; a failure is `Unknown`, never an error.
async fn privileges(conn: &mut PgConnection) -> super::Privileges {
    let check = sqlx::query_as::<_, (bool, Vec<String>, bool)>(
        "SELECT r.rolsuper,
                ARRAY(SELECT g.rolname::text FROM pg_roles g
                      WHERE g.rolname::text = ANY($1) AND pg_has_role(current_user, g.oid, 'MEMBER')
                      ORDER BY 1),
                EXISTS(SELECT 1 FROM pg_proc p
                       WHERE p.proname = 'dblink_exec' AND has_function_privilege(p.oid, 'EXECUTE'))
         FROM pg_roles r WHERE r.rolname = current_user",
    )
    .bind(SERVER_ROLES.to_vec())
    .fetch_optional(&mut *conn)
    .await;
    match check {
        Ok(Some((superuser, roles, dblink))) => {
            let mut found = Vec::new();
            if superuser {
                found.push("superuser".to_owned());
            } else {
                found.extend(roles.into_iter().map(|r| format!("member of {r}")));
            }
            if dblink {
                found.push("may run dblink_exec".to_owned());
            }
            if found.is_empty() {
                super::Privileges::Least
            } else {
                super::Privileges::Elevated(found)
            }
        }
        Ok(None) => super::Privileges::Unknown("the current role is not in pg_roles".to_owned()),
        Err(e) => super::Privileges::Unknown(e.to_string()),
    }
}

/// One column of the result and how its values are decoded.
#[derive(Debug, Clone)]
struct PlannedColumn {
    column: Column,
    decoder: Decoder,
}

/// How the values of a column are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Scalar(Kind),
    Array(Kind),
}

/// The PostgreSQL types Backflow reads, by their wire representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Oid,
    Float4,
    Float8,
    Numeric,
    /// Any type whose binary form is its text: text, varchar, bpchar, name, enums, citext.
    Text,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Json,
    Jsonb,
    Uuid,
    /// The result of a function returning `void` (`SELECT pg_sleep(1)`): always NULL.
    Void,
}

/// Prepares the query and decides a decoder for each of its columns.
async fn describe(
    conn: &mut PgConnection,
    query: &str,
    timeout: std::time::Duration,
    flavour: &'static Flavour,
) -> Result<Vec<PlannedColumn>, SourceError> {
    // Preparing (rather than `describe`) skips sqlx's nullability probing, and the prepared
    // statement is cached, so the `fetch` in `stream` reuses it.
    let statement = conn
        .prepare(query)
        .await
        .map_err(|e| query_error(e, timeout, flavour))?;
    statement
        .columns()
        .iter()
        .map(|c| {
            let type_info = c.type_info();
            let column = Column {
                name: c.name().to_owned(),
                type_name: type_info.name().to_owned(),
            };
            let decoder = decoder_for(type_info).ok_or_else(|| SourceError::UnsupportedType {
                column: column.name.clone(),
                type_name: column.type_name.clone(),
            })?;
            Ok(PlannedColumn { column, decoder })
        })
        .collect()
}

fn decoder_for(type_info: &PgTypeInfo) -> Option<Decoder> {
    match type_info.kind() {
        PgTypeKind::Array(element) => scalar_kind(element).map(Decoder::Array),
        _ => scalar_kind(type_info).map(Decoder::Scalar),
    }
}

fn scalar_kind(type_info: &PgTypeInfo) -> Option<Kind> {
    match type_info.kind() {
        PgTypeKind::Enum(_) => return Some(Kind::Text),
        // A domain reads like the type it constrains.
        PgTypeKind::Domain(base) => return scalar_kind(base),
        // `void` and `unknown` are pseudo-types that a query can still return.
        PgTypeKind::Simple | PgTypeKind::Pseudo => {}
        PgTypeKind::Composite(_) | PgTypeKind::Array(_) | PgTypeKind::Range(_) => {
            return None;
        }
    }
    // Built-in OIDs are fixed by the pg_type catalog; extension types are not, so citext is
    // recognised by name (its binary form is its text, like `text`).
    let kind = match type_info.oid().map(|o| o.0) {
        Some(16) => Kind::Bool,
        Some(21) => Kind::Int2,
        Some(23) => Kind::Int4,
        Some(20) => Kind::Int8,
        Some(26) => Kind::Oid,
        Some(700) => Kind::Float4,
        Some(701) => Kind::Float8,
        Some(1700) => Kind::Numeric,
        // text, varchar, bpchar, name, "char", unknown (an untyped literal)
        Some(25 | 1043 | 1042 | 19 | 18 | 705) => Kind::Text,
        Some(1082) => Kind::Date,
        Some(1083) => Kind::Time,
        Some(1114) => Kind::Timestamp,
        Some(1184) => Kind::TimestampTz,
        Some(114) => Kind::Json,
        Some(3802) => Kind::Jsonb,
        Some(2950) => Kind::Uuid,
        Some(2278) => Kind::Void,
        _ if type_info.name().eq_ignore_ascii_case("citext") => Kind::Text,
        _ => return None,
    };
    Some(kind)
}

/// The streaming task: fetch, decode, send, then end the transaction.
async fn stream(
    mut conn: PgConnection,
    query: String,
    plan: Vec<PlannedColumn>,
    tx: RowSender,
    timeout: std::time::Duration,
    flavour: &'static Flavour,
) {
    let decode = |row: &PgRow| decode_row(row, &plan);
    let error = |e| query_error(e, timeout, flavour);
    let end = if flavour.text_rows {
        super::pump(sqlx::raw_sql(&query).fetch(&mut conn), &tx, decode, error).await
    } else {
        super::pump(sqlx::query(&query).fetch(&mut conn), &tx, decode, error).await
    };
    if end != StreamEnd::ReceiverGone {
        // Nothing was written (the transaction is read-only); roll back to leave politely.
        let _ = conn.execute("ROLLBACK").await;
    }
    // When the receiver went away mid-result, the server is still sending rows: a ROLLBACK
    // would first have to read them all. Terminating the session aborts the transaction.
    let _ = conn.close().await;
}

fn decode_row(row: &PgRow, plan: &[PlannedColumn]) -> Result<SourceRow, SourceError> {
    super::decode_row(plan.len(), |i| {
        let c = &plan[i];
        let raw = row.try_get_raw(i).map_err(|e| SourceError::Decode {
            column: c.column.name.clone(),
            reason: e.to_string(),
        })?;
        if raw.is_null() {
            return Ok(Value::Null);
        }
        let text = raw.format() == PgValueFormat::Text;
        match c.decoder {
            Decoder::Scalar(kind) => decode_scalar(row, i, kind, text),
            Decoder::Array(kind) => decode_array(row, i, kind, text),
        }
    })
}

type DecodeResult = Result<Value, ValueError>;

/// The raw bytes of a non-NULL value.
fn bytes(row: &PgRow, i: usize) -> Result<&[u8], ValueError> {
    row.try_get_raw(i)
        .and_then(|raw| raw.as_bytes().map_err(sqlx::Error::Decode))
        .map_err(|_| ValueError::undecodable("a value the driver could not read"))
}

/// A JSON or JSONB value from its bytes, so that a domain over jsonb works too (sqlx strips
/// the jsonb version byte only for the jsonb type itself).
fn json(row: &PgRow, i: usize, kind: Kind, text: bool) -> DecodeResult {
    let mut bytes = bytes(row, i)?;
    // The version byte is part of the binary format only.
    if kind == Kind::Jsonb && !text {
        bytes = match bytes.split_first() {
            Some((1, rest)) => rest,
            _ => {
                return Err(ValueError::undecodable(
                    "jsonb in an unknown binary format version",
                ));
            }
        };
    }
    super::json_value(bytes)
}

fn get<'r, T>(row: &'r PgRow, i: usize, what: &'static str) -> Result<T, ValueError>
where
    T: sqlx::Decode<'r, sqlx::Postgres>,
{
    // The type was checked when the column was planned; sqlx's own check would refuse
    // enums, domains and citext read as text. The driver's message may quote the value, so
    // only the kind of value is reported.
    row.try_get_unchecked::<T, _>(i)
        .map_err(|_| ValueError::undecodable(what))
}

/// The special values of a numeric, from the sign field of its binary form (sqlx reads NaN
/// as an error and the infinities, valid since PostgreSQL 14, as an internal error).
fn numeric_special(bytes: &[u8]) -> Option<&'static str> {
    match bytes.get(4..6).map(|s| u16::from_be_bytes([s[0], s[1]])) {
        Some(0xC000) => Some("numeric NaN has no exact decimal form"),
        Some(0xD000) => Some("numeric Infinity has no exact decimal form"),
        Some(0xF000) => Some("numeric -Infinity has no exact decimal form"),
        _ => None,
    }
}

/// A numeric's binary form of at most 9 base-10000 digits (up to 36 decimal digits: every
/// `numeric(p, s)` with `p` ≤ 36), read straight into its decimal: the same integer and scale
/// as sqlx's decoder, without its two intermediate vectors and base-100 conversion. `None`
/// for anything else, which sqlx decodes (or refuses).
///
/// The layout (`numeric_send` in PostgreSQL's `numeric.c`): digit count, weight (the power of
/// 10000 of the first digit), sign (0 or 0x4000), display scale, then the digits, each a
/// big-endian `int16` from 0 to 9999.
fn small_numeric(bytes: &[u8]) -> Option<BigDecimal> {
    let word = |at: usize| Some(u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]));
    let count = usize::from(word(0)?);
    let weight = i64::from(word(2)? as i16);
    let negative = match word(4)? {
        0 => false,
        0x4000 => true,
        _ => return None,
    };
    if count > 9 || bytes.len() != 8 + 2 * count {
        return None;
    }
    if count == 0 {
        return Some(BigDecimal::from(0u64));
    }
    let mut digits: i128 = 0;
    for n in 0..count {
        let digit = word(8 + 2 * n)?;
        if digit > 9999 {
            return None;
        }
        // At most 9 digits of 10000: under 10^36, far from i128's 1.7·10^38.
        digits = digits * 10_000 + i128::from(digit);
    }
    if negative {
        digits = -digits;
    }
    // `count` ≤ 9 and `weight` an i16: no overflow.
    let scale = (count as i64 - weight - 1) * 4;
    Some(BigDecimal::new(digits.into(), scale))
}

/// The special values of a numeric in the text format.
fn numeric_special_text(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        b"NaN" => Some("numeric NaN has no exact decimal form"),
        b"Infinity" => Some("numeric Infinity has no exact decimal form"),
        b"-Infinity" => Some("numeric -Infinity has no exact decimal form"),
        _ => None,
    }
}

/// A scalar value, from the binary format or (`text`) the text format, where dates and
/// timestamps are read by sqlx's text parsers instead of from their day and microsecond
/// counts.
fn decode_scalar(row: &PgRow, i: usize, kind: Kind, text: bool) -> DecodeResult {
    const NOT_UTF8: &str = "text that is not valid UTF-8";
    Ok(match kind {
        Kind::Bool => Value::Bool(get(row, i, "a malformed bool")?),
        Kind::Int2 => Value::Int(get::<i16>(row, i, "a malformed int2")?.into()),
        Kind::Int4 => Value::Int(get::<i32>(row, i, "a malformed int4")?.into()),
        Kind::Int8 => Value::Int(get(row, i, "a malformed int8")?),
        Kind::Oid => Value::Int(get::<Oid>(row, i, "a malformed oid")?.0.into()),
        Kind::Float4 => super::float(super::widen_f32(get(row, i, "a malformed float4")?))?,
        Kind::Float8 => super::float(get(row, i, "a malformed float8")?)?,
        Kind::Numeric => {
            let bytes = bytes(row, i)?;
            let special = match text {
                true => numeric_special_text(bytes),
                false => numeric_special(bytes),
            };
            if let Some(reason) = special {
                return Err(ValueError::undecodable(reason));
            }
            // The text format is sqlx's to parse; only the binary one has a fast path.
            match (!text).then(|| small_numeric(bytes)).flatten() {
                Some(decimal) => Value::Decimal(decimal),
                None => Value::Decimal(get::<BigDecimal>(row, i, "a malformed numeric")?),
            }
        }
        Kind::Text => Value::Text(get(row, i, NOT_UTF8)?),
        Kind::Date if text => Value::Date(get(row, i, "a date that is not a point in time")?),
        Kind::Date => date(get(row, i, "a malformed date")?)?,
        Kind::Time => Value::Time(get::<NaiveTime>(row, i, "a malformed time")?),
        Kind::Timestamp if text => Value::Timestamp(
            get::<NaiveDateTime>(row, i, "a timestamp that is not a point in time")?.and_utc(),
        ),
        Kind::TimestampTz if text => {
            Value::Timestamp(get(row, i, "a timestamptz that is not a point in time")?)
        }
        Kind::Timestamp | Kind::TimestampTz => timestamp(get(row, i, "a malformed timestamp")?)?,
        Kind::Json | Kind::Jsonb => json(row, i, kind, text)?,
        Kind::Uuid => Value::Uuid(get::<Uuid>(row, i, "a malformed uuid")?),
        Kind::Void => Value::Null,
    })
}

fn decode_array(row: &PgRow, i: usize, kind: Kind, text: bool) -> DecodeResult {
    fn items<T>(values: Vec<Option<T>>, f: impl Fn(T) -> DecodeResult) -> DecodeResult {
        values
            .into_iter()
            .map(|v| v.map_or(Ok(Value::Null), &f))
            .collect::<Result<_, _>>()
            .map(Value::Array)
    }
    const MALFORMED: &str = "a malformed array";
    match kind {
        Kind::Bool => items(get(row, i, MALFORMED)?, |v| Ok(Value::Bool(v))),
        Kind::Int2 => items(get(row, i, MALFORMED)?, |v: i16| Ok(Value::Int(v.into()))),
        Kind::Int4 => items(get(row, i, MALFORMED)?, |v: i32| Ok(Value::Int(v.into()))),
        Kind::Int8 => items(get(row, i, MALFORMED)?, |v| Ok(Value::Int(v))),
        Kind::Oid => items(get(row, i, MALFORMED)?, |v: Oid| Ok(Value::Int(v.0.into()))),
        Kind::Float4 => items(get(row, i, MALFORMED)?, |v| super::float(super::widen_f32(v))),
        Kind::Float8 => items(get(row, i, MALFORMED)?, super::float),
        // sqlx refuses the whole array when an element is NaN or infinite.
        Kind::Numeric => items(
            get(
                row,
                i,
                "a numeric array holding NaN or Infinity, which have no exact decimal form",
            )?,
            |v| Ok(Value::Decimal(v)),
        ),
        Kind::Text => items(
            get(row, i, "a text array with text that is not valid UTF-8")?,
            |v| Ok(Value::Text(v)),
        ),
        Kind::Date if text => items(get(row, i, MALFORMED)?, |v| Ok(Value::Date(v))),
        Kind::Date => items(get(row, i, MALFORMED)?, date),
        Kind::Time => items(get(row, i, MALFORMED)?, |v| Ok(Value::Time(v))),
        Kind::Timestamp if text => items(get(row, i, MALFORMED)?, |v: NaiveDateTime| {
            Ok(Value::Timestamp(v.and_utc()))
        }),
        Kind::TimestampTz if text => items(get(row, i, MALFORMED)?, |v| Ok(Value::Timestamp(v))),
        Kind::Timestamp | Kind::TimestampTz => items(get(row, i, MALFORMED)?, timestamp),
        Kind::Json | Kind::Jsonb => items(
            get(row, i, super::JSON_UNREADABLE)?,
            |v: sqlx::types::Json<serde_json::Value>| Ok(Value::Json(v.0)),
        ),
        Kind::Uuid => items(get(row, i, MALFORMED)?, |v| Ok(Value::Uuid(v))),
        // There are no arrays of void.
        Kind::Void => Ok(Value::Null),
    }
}

/// A DATE from its wire form, days since 2000-01-01.
///
/// Decoded here because sqlx panics on `infinity` (the extremes of `i32`).
fn date(days: i32) -> DecodeResult {
    NaiveDate::from_ymd_opt(2000, 1, 1)
        .zip(TimeDelta::try_days(days.into()))
        .and_then(|(epoch, delta)| epoch.checked_add_signed(delta))
        .map(Value::Date)
        .ok_or_else(|| ValueError::undecodable(out_of_range("date", days.into(), 0x7fff_ffff, -0x8000_0000)))
}

/// A TIMESTAMP or TIMESTAMPTZ from its wire form, microseconds since 2000-01-01 00:00 UTC.
///
/// Both types travel as UTC on the wire (a TIMESTAMP without time zone is read as UTC).
/// Decoded here because sqlx panics on `infinity` (the extremes of `i64`).
fn timestamp(micros: i64) -> DecodeResult {
    DateTime::<Utc>::from_timestamp(946_684_800, 0)
        .and_then(|epoch| epoch.checked_add_signed(TimeDelta::microseconds(micros)))
        .map(Value::Timestamp)
        .ok_or_else(|| ValueError::undecodable(out_of_range("timestamp", micros, i64::MAX, i64::MIN)))
}

/// Why a date or timestamp has no canonical form: an infinity, or a year past what a
/// destination can hold (the canonical range is years -262143 to 262142).
fn out_of_range(what: &str, raw: i64, infinity: i64, minus_infinity: i64) -> String {
    if raw == infinity {
        format!("{what} infinity is not a point in time")
    } else if raw == minus_infinity {
        format!("{what} -infinity is not a point in time")
    } else {
        format!("a {what} outside the years -262143 to 262142")
    }
}

fn decode_reason(e: &sqlx::Error) -> String {
    match e {
        // The inner error is the useful part.
        sqlx::Error::ColumnDecode { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Sorts a query failure by SQLSTATE.
fn query_error(e: sqlx::Error, timeout: std::time::Duration, flavour: &Flavour) -> SourceError {
    if let Some(explained) = (flavour.explain)(&e, timeout) {
        return explained;
    }
    match &e {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some(READ_ONLY_SQL_TRANSACTION) => SourceError::ReadOnly(db.message().to_owned()),
            Some(QUERY_CANCELED) => SourceError::Timeout(timeout),
            _ => SourceError::Query(db.message().to_owned()),
        },
        sqlx::Error::ColumnDecode { .. } => SourceError::Query(decode_reason(&e)),
        other => SourceError::Query(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(r: DecodeResult) -> String {
        match r {
            Err(ValueError::Undecodable(reason)) => reason.into_owned(),
            other => panic!("expected an undecodable value, got {other:?}"),
        }
    }

    #[test]
    fn infinite_dates_and_timestamps_are_undecodable_values_not_panics() {
        assert!(reason(date(i32::MAX)).contains("date infinity"));
        assert!(reason(timestamp(i64::MIN)).contains("timestamp -infinity"));
        assert!(reason(date(i32::MAX - 1)).contains("outside the years"));
        assert_eq!(
            date(0).unwrap(),
            Value::Date(NaiveDate::from_ymd_opt(2000, 1, 1).unwrap())
        );
        assert_eq!(
            timestamp(-1).unwrap(),
            Value::Timestamp(
                DateTime::parse_from_rfc3339("1999-12-31T23:59:59.999999Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
    }

    #[test]
    fn small_numerics_are_read_as_sqlx_reads_them() {
        // (digit count, weight, sign, display scale, digits) and the decimal they hold.
        let numeric = |weight: i16, sign: u16, digits: &[u16]| {
            let mut bytes = Vec::new();
            for word in [digits.len() as u16, weight as u16, sign, 0] {
                bytes.extend_from_slice(&word.to_be_bytes());
            }
            for digit in digits {
                bytes.extend_from_slice(&digit.to_be_bytes());
            }
            bytes
        };
        let cases: [(Vec<u8>, &str, i64); 7] = [
            (numeric(0, 0, &[12, 3456]), "123456", 4),       // 12.3456
            (numeric(0, 0x4000, &[12, 3400]), "-123400", 4), // -12.34, as stored
            (numeric(-1, 0, &[500]), "500", 4),              // 0.05
            (numeric(2, 0, &[7]), "7", -8),                  // 700000000
            (numeric(0, 0, &[]), "0", 0),                    // 0
            (numeric(8, 0, &[9999; 9]), &"9".repeat(36), 0), // 36 nines
            (numeric(1, 0, &[1, 2, 3]), "100020003", 4),     // 10002.0003
        ];
        for (bytes, digits, scale) in cases {
            let decimal = small_numeric(&bytes).unwrap();
            let (int, found_scale) = decimal.as_bigint_and_scale();
            assert_eq!((int.to_string(), found_scale), (digits.to_owned(), scale));
        }
        // Beyond 9 digits, a digit out of range, a special sign or a short value: sqlx's.
        assert!(small_numeric(&numeric(9, 0, &[1; 10])).is_none());
        assert!(small_numeric(&numeric(0, 0, &[10_000])).is_none());
        assert!(small_numeric(&numeric(0, 0xC000, &[])).is_none());
        assert!(small_numeric(&numeric(0, 0, &[1, 2])[..10]).is_none());
    }

    #[test]
    fn numeric_specials_are_read_from_the_sign_field() {
        assert!(
            numeric_special(&[0, 0, 0, 0, 0xC0, 0, 0, 0])
                .unwrap()
                .contains("NaN")
        );
        assert!(
            numeric_special(&[0, 0, 0, 0, 0xD0, 0, 0, 0])
                .unwrap()
                .contains("Infinity")
        );
        assert!(
            numeric_special(&[0, 0, 0, 0, 0xF0, 0, 0, 0])
                .unwrap()
                .contains("-Infinity")
        );
        assert_eq!(numeric_special(&[0, 1, 0, 0, 0x40, 0, 0, 0]), None);
    }
}
