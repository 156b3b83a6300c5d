//! PostgreSQL source (and the databases that speak its protocol: CockroachDB, AlloyDB, …;
//! Redshift through its [`Flavour`] in `redshift.rs`).
//!
//! One connection per extraction, in a `READ ONLY` transaction with `SET LOCAL
//! statement_timeout`. The query is prepared first so its columns are known (and unsupported
//! types refused) before any row is read; rows then arrive as binary `COPY` data ([`copy`]),
//! and are decoded by the kind decided for their column ([`binary`]). A server that will
//! not run the query inside `COPY` gets it through the extended protocol, rows in the same
//! binary format; a flavour with `text_rows` reads the text format of the simple protocol.

mod binary;
mod copy;

use std::str::FromStr;

use bigdecimal::BigDecimal;
use chrono::{NaiveDateTime, NaiveTime};
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgRow, PgTypeInfo, PgTypeKind, PgValueFormat};
use sqlx::{Column as _, Connection, Executor, Row, Statement, TypeInfo, ValueRef};
use uuid::Uuid;

use super::{
    Column, RowSender, RowSink, RowStream, SourceError, SourceOptions, SourceRow, StreamEnd, ValueError,
};
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
    /// Rows travel in the text format of the simple query protocol instead of binary `COPY`
    /// data.
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
    let timeout = options.statement_timeout;
    let mut conn = open(url, &connect_options, timeout, flavour).await?;

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
    let read = Read {
        url: url.to_owned(),
        connect_options,
        query: query.to_owned(),
        plan,
        timeout,
        flavour,
    };
    tokio::spawn(stream(conn, read, tx));
    Ok(RowStream::new(columns, rx).with_privileges(privileges))
}

/// Connects and opens the read-only transaction with the statement timeout.
async fn open(
    url: &str,
    connect_options: &PgConnectOptions,
    timeout: std::time::Duration,
    flavour: &'static Flavour,
) -> Result<PgConnection, SourceError> {
    let mut conn = PgConnection::connect_with(connect_options)
        .await
        .map_err(|e| super::connect_error(url, e))?;
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
    Ok(conn)
}

/// What the streaming task reads, and how to start over on a new connection.
struct Read {
    url: String,
    connect_options: PgConnectOptions,
    query: String,
    plan: Vec<PlannedColumn>,
    timeout: std::time::Duration,
    flavour: &'static Flavour,
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

/// The streaming task: read, decode, send, then end the transaction.
async fn stream(mut conn: PgConnection, read: Read, tx: RowSender) {
    let error = |e| query_error(e, read.timeout, read.flavour);
    let end = if read.flavour.text_rows {
        fetch(&mut conn, &read, &tx).await
    } else {
        let copied = match conn.copy_out_raw(&copy::statement(&read.query)).await {
            Ok(chunks) => Ok(copy::pump(chunks, RowSink::new(tx.clone()), &read.plan, error).await),
            Err(e) => Err(e),
        };
        match copied {
            Ok(end) => end,
            Err(e) if copy_refused(&e) => {
                // The query ran as a prepared statement but not inside COPY (a statement
                // COPY does not take, a server without binary COPY). After a refused COPY
                // the driver's connection is out of step with the server: start afresh.
                tracing::debug!(reason = %decode_reason(&e), "the model query cannot run inside COPY; reading it through the extended protocol");
                let _ = conn.close().await;
                conn = match open(&read.url, &read.connect_options, read.timeout, read.flavour).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        RowSink::new(tx).fail(e).await;
                        return;
                    }
                };
                fetch(&mut conn, &read, &tx).await
            }
            Err(e) => RowSink::new(tx.clone()).fail(error(e)).await,
        }
    };
    if end != StreamEnd::ReceiverGone {
        // Nothing was written (the transaction is read-only); roll back to leave politely.
        let _ = conn.execute("ROLLBACK").await;
    }
    // When the receiver went away mid-result, the server is still sending rows: a ROLLBACK
    // would first have to read them all. Terminating the session aborts the transaction.
    let _ = conn.close().await;
}

/// Whether a COPY that failed to start is worth running again through the extended
/// protocol: the server refused the statement, and not for a reason the query itself would
/// meet again (its timeout, a write in the read-only transaction).
fn copy_refused(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => !matches!(
            db.code().as_deref(),
            Some(QUERY_CANCELED | READ_ONLY_SQL_TRANSACTION)
        ),
        _ => false,
    }
}

/// Fetches the rows as query results: binary through the extended protocol, or text through
/// the simple one for a flavour with `text_rows`.
async fn fetch(conn: &mut PgConnection, read: &Read, tx: &RowSender) -> StreamEnd {
    let decode = |row: &PgRow| decode_row(row, &read.plan);
    let error = |e| query_error(e, read.timeout, read.flavour);
    if read.flavour.text_rows {
        super::pump(sqlx::raw_sql(&read.query).fetch(conn), tx, decode, error).await
    } else {
        super::pump(sqlx::query(&read.query).fetch(conn), tx, decode, error).await
    }
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
        match raw.format() {
            PgValueFormat::Binary => binary::decode(bytes(row, i)?, c.decoder),
            PgValueFormat::Text => match c.decoder {
                Decoder::Scalar(kind) => decode_text(row, i, kind),
                Decoder::Array(kind) => decode_text_array(row, i, kind),
            },
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

/// The special values of a numeric in the text format.
fn numeric_special_text(bytes: &[u8]) -> Option<&'static str> {
    match bytes {
        b"NaN" => Some("numeric NaN has no exact decimal form"),
        b"Infinity" => Some("numeric Infinity has no exact decimal form"),
        b"-Infinity" => Some("numeric -Infinity has no exact decimal form"),
        _ => None,
    }
}

/// A scalar value in the text format, read by sqlx's text parsers.
fn decode_text(row: &PgRow, i: usize, kind: Kind) -> DecodeResult {
    Ok(match kind {
        Kind::Bool => Value::Bool(get(row, i, "a malformed bool")?),
        Kind::Int2 => Value::Int(get::<i16>(row, i, "a malformed int2")?.into()),
        Kind::Int4 => Value::Int(get::<i32>(row, i, "a malformed int4")?.into()),
        Kind::Int8 => Value::Int(get(row, i, "a malformed int8")?),
        Kind::Oid => Value::Int(get::<Oid>(row, i, "a malformed oid")?.0.into()),
        Kind::Float4 => super::float(super::widen_f32(get(row, i, "a malformed float4")?))?,
        Kind::Float8 => super::float(get(row, i, "a malformed float8")?)?,
        Kind::Numeric => {
            if let Some(reason) = numeric_special_text(bytes(row, i)?) {
                return Err(ValueError::undecodable(reason));
            }
            Value::Decimal(get::<BigDecimal>(row, i, "a malformed numeric")?)
        }
        Kind::Text => Value::Text(get(row, i, "text that is not valid UTF-8")?),
        Kind::Date => Value::Date(get(row, i, "a date that is not a point in time")?),
        Kind::Time => Value::Time(get::<NaiveTime>(row, i, "a malformed time")?),
        Kind::Timestamp => Value::Timestamp(
            get::<NaiveDateTime>(row, i, "a timestamp that is not a point in time")?.and_utc(),
        ),
        Kind::TimestampTz => Value::Timestamp(get(row, i, "a timestamptz that is not a point in time")?),
        Kind::Json | Kind::Jsonb => super::json_value(bytes(row, i)?)?,
        Kind::Uuid => Value::Uuid(get::<Uuid>(row, i, "a malformed uuid")?),
        Kind::Void => Value::Null,
    })
}

/// An array in the text format, read by sqlx's text parsers.
fn decode_text_array(row: &PgRow, i: usize, kind: Kind) -> DecodeResult {
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
        Kind::Date => items(get(row, i, MALFORMED)?, |v| Ok(Value::Date(v))),
        Kind::Time => items(get(row, i, MALFORMED)?, |v| Ok(Value::Time(v))),
        Kind::Timestamp => items(get(row, i, MALFORMED)?, |v: NaiveDateTime| {
            Ok(Value::Timestamp(v.and_utc()))
        }),
        Kind::TimestampTz => items(get(row, i, MALFORMED)?, |v| Ok(Value::Timestamp(v))),
        Kind::Json | Kind::Jsonb => items(
            get(row, i, super::JSON_UNREADABLE)?,
            |v: sqlx::types::Json<serde_json::Value>| Ok(Value::Json(v.0)),
        ),
        Kind::Uuid => items(get(row, i, MALFORMED)?, |v| Ok(Value::Uuid(v))),
        // There are no arrays of void.
        Kind::Void => Ok(Value::Null),
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
