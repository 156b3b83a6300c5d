//! Sources: run a model query against a warehouse and stream its rows as canonical values.
//!
//! The query runs read-only with a statement timeout (a read-only transaction for the SQL
//! databases, a statement-type check for the cloud warehouses), on a task of its own that
//! feeds a bounded channel, so rows are streamed and never collected whole.
//!
//! The connection URL's scheme picks the source. Credentials that do not fit in a URL (a
//! private key, a service-account key, an OAuth client secret) come from the other keys of the
//! same Secret, as [`Credentials`].

mod bigquery;
mod clickhouse;
pub mod cursor;
mod databricks;
mod mysql;
mod postgres;
mod redshift;
mod rest;
mod snowflake;
mod sqlite;
mod statement;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use crate::model::value::Value;

/// Settings of one extraction.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// Longest time the model query may run.
    pub statement_timeout: Duration,
    /// Rows buffered between the database task and the planner.
    pub buffer_rows: usize,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            statement_timeout: Duration::from_secs(600),
            // Deep enough to keep the database streaming while the state loads.
            buffer_rows: 32_768,
        }
    }
}

/// Where a source connects and as whom: the connection URL of its Secret and the Secret's
/// other keys.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The connection URL (never logged).
    pub url: &'a str,
    /// The Secret's other keys.
    pub credentials: &'a Credentials,
    /// Sends every request of the cloud warehouses (API, token and metadata endpoints) to
    /// this base URL instead of the vendor's hosts. Only code sets it (the tests, against
    /// local doubles): no manifest, Secret or flag maps to it.
    pub endpoint_override: Option<&'a str>,
}

/// The keys of the source's Secret besides the connection URL (a PEM private key, a
/// service-account key, an OAuth client secret). Its `Debug` shows the keys, never a value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    values: BTreeMap<String, String>,
}

impl Credentials {
    /// Wraps the decoded keys of a Secret.
    pub fn new(values: BTreeMap<String, String>) -> Self {
        Credentials { values }
    }

    /// The value under `key`, when present and not blank.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// Every value, to scrub them out of messages.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.values.values().map(String::as_str)
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}

/// A column of the model: its name and the database's name for its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name as the query returns it.
    pub name: String,
    /// The database's type name (`INT8`, `DECIMAL`, `TEXT`, …).
    pub type_name: String,
}

/// One row of the model as the source read it.
///
/// A value that cannot become a canonical value (a numeric `NaN`, an infinite timestamp, a
/// zero date, bytes that are not UTF-8) does not end the stream: its row arrives as
/// [`SourceRow::Undecodable`], the planner rejects that row with its key and the run goes on.
/// Rows that decode whole cost nothing more than their values.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceRow {
    /// Every value decoded.
    Decoded(Vec<Value>),
    /// At least one value could not be decoded (boxed: the rare case pays for itself).
    Undecodable(Box<UndecodableRow>),
}

impl SourceRow {
    /// The row's values; an undecodable value reads as NULL.
    pub fn values(&self) -> &[Value] {
        match self {
            SourceRow::Decoded(values) => values,
            SourceRow::Undecodable(row) => &row.values,
        }
    }

    /// The values of a row that decoded whole, or what could not be decoded.
    pub fn decoded(self) -> Result<Vec<Value>, Box<UndecodableRow>> {
        match self {
            SourceRow::Decoded(values) => Ok(values),
            SourceRow::Undecodable(row) => Err(row),
        }
    }
}

impl From<Vec<Value>> for SourceRow {
    fn from(values: Vec<Value>) -> Self {
        SourceRow::Decoded(values)
    }
}

/// A row with a value that could not be decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct UndecodableRow {
    /// The row's values, NULL in place of each value that could not be decoded (so the key
    /// can still be read when the key columns decoded).
    pub values: Vec<Value>,
    /// Index of the first column whose value could not be decoded.
    pub column: usize,
    /// What kind of value it was and why it has no canonical form; never the value itself.
    pub reason: Cow<'static, str>,
}

/// Why one value could not be decoded.
#[derive(Debug)]
pub enum ValueError {
    /// The value has no canonical form: its row is rejected, the run goes on. The text says
    /// what kind of value it is (`numeric NaN`), never the value.
    Undecodable(Cow<'static, str>),
    /// The run cannot go on (for example a column type found unsupported at its first value).
    Fatal(SourceError),
}

impl ValueError {
    /// An undecodable value of the kind `reason` describes.
    pub fn undecodable(reason: impl Into<Cow<'static, str>>) -> ValueError {
        ValueError::Undecodable(reason.into())
    }
}

impl From<SourceError> for ValueError {
    fn from(e: SourceError) -> Self {
        ValueError::Fatal(e)
    }
}

/// Decodes a row of `width` columns value by value with `value(i)`: a value that cannot be
/// decoded becomes NULL and marks the row undecodable (the first such column is reported);
/// a fatal error ends the row and the stream. Every source builds its rows through this.
pub fn decode_row(
    width: usize,
    mut value: impl FnMut(usize) -> Result<Value, ValueError>,
) -> Result<SourceRow, SourceError> {
    let mut values = Vec::with_capacity(width);
    let mut undecodable: Option<(usize, Cow<'static, str>)> = None;
    for i in 0..width {
        match value(i) {
            Ok(v) => values.push(v),
            Err(ValueError::Undecodable(reason)) => {
                undecodable.get_or_insert((i, reason));
                values.push(Value::Null);
            }
            Err(ValueError::Fatal(e)) => return Err(e),
        }
    }
    Ok(match undecodable {
        None => SourceRow::Decoded(values),
        Some((column, reason)) => SourceRow::Undecodable(Box::new(UndecodableRow {
            values,
            column,
            reason,
        })),
    })
}

/// Decodes one result row of a REST warehouse against its planned columns: a row of another
/// width ends the stream (the answer is malformed); a value `value` cannot decode rejects its
/// row, naming only the column's type, since a decoder's own reason may quote the value; so
/// does a float NaN or infinity (the warehouses send them as `"NaN"`, `"inf"`), alone or in
/// an array, as for every other source.
fn decode_planned_row<K>(
    width: usize,
    plan: &[(Column, K)],
    mut value: impl FnMut(usize, &K) -> Result<Value, String>,
) -> Result<SourceRow, SourceError> {
    if width != plan.len() {
        return Err(SourceError::Query(format!(
            "a result row has {width} values for {} columns",
            plan.len()
        )));
    }
    decode_row(width, |i| {
        let (column, kind) = &plan[i];
        match value(i, kind) {
            Ok(v) => finite(v),
            Err(_) => Err(ValueError::undecodable(format!(
                "a {} value with no canonical form",
                column.type_name
            ))),
        }
    })
}

/// `value`, unless it is or holds a float NaN or infinity.
fn finite(value: Value) -> Result<Value, ValueError> {
    match value {
        Value::Float(f) => float(f),
        Value::Array(items) => items
            .into_iter()
            .map(finite)
            .collect::<Result<_, _>>()
            .map(Value::Array),
        other => Ok(other),
    }
}

/// What the source's login may do beyond reading, as a catalog query found when the
/// extraction started. A read-only transaction stops plain writes, not these: a superuser
/// writes files with `COPY … TO PROGRAM`, a `FILE` holder with `SELECT … INTO OUTFILE`. The
/// real guarantee is a least-privilege role (docs/operations.md, "Security model").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Privileges {
    /// None of the powers that escape a read-only transaction were found.
    #[default]
    Least,
    /// The powers found, in words ("superuser", "FILE on *.*").
    Elevated(Vec<String>),
    /// The check could not run (its reason); the extraction went on.
    Unknown(String),
}

/// The rows of a running model query.
#[derive(Debug)]
pub struct RowStream {
    columns: Arc<[Column]>,
    rows: mpsc::Receiver<RowChunk>,
    pending: std::vec::IntoIter<SourceRow>,
    privileges: Privileges,
    /// The cursor column followed as rows pass (cursor mode).
    watch: Option<cursor::Watch>,
}

impl RowStream {
    /// Builds a stream from its columns and the receiving end of the row channel.
    pub(crate) fn new(columns: Vec<Column>, rows: mpsc::Receiver<RowChunk>) -> Self {
        RowStream {
            columns: columns.into(),
            rows,
            pending: Vec::new().into_iter(),
            privileges: Privileges::Least,
            watch: None,
        }
    }

    /// Follows the largest value of the column at `index` from here on (cursor mode): see
    /// [`RowStream::cursor_max`].
    pub fn watch_cursor(&mut self, index: usize) {
        self.watch = Some(cursor::Watch::new(index));
    }

    /// The largest value of the watched cursor column among the rows read so far (`None`
    /// when no row had one), or the kind of value that column cannot order by.
    pub fn cursor_max(&self) -> Result<Option<&cursor::Mark>, &str> {
        match &self.watch {
            Some(w) => w.result(),
            None => Ok(None),
        }
    }

    /// The stream with what the source's login may do beyond reading.
    pub(crate) fn with_privileges(mut self, privileges: Privileges) -> Self {
        self.privileges = privileges;
        self
    }

    /// What the source's login may do beyond reading.
    pub fn privileges(&self) -> &Privileges {
        &self.privileges
    }

    /// The model's columns, known before the first row.
    pub fn columns(&self) -> &Arc<[Column]> {
        &self.columns
    }

    /// The next row, an error that ends the stream, or `None` at the end.
    pub async fn next(&mut self) -> Option<Result<SourceRow, SourceError>> {
        loop {
            if let Some(row) = self.pending.next() {
                if let Some(watch) = &mut self.watch {
                    watch.see(row.values());
                }
                return Some(Ok(row));
            }
            match self.rows.recv().await? {
                Ok(chunk) => self.pending = chunk.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }

    /// The next rows in order, as many as arrived together (a few hundred): an empty
    /// chunk never; an error that ends the stream; `None` at the end. Rows handed out one at
    /// a time by [`RowStream::next`] and not yet taken come first.
    pub async fn next_chunk(&mut self) -> Option<Result<Vec<SourceRow>, SourceError>> {
        let chunk = if !self.pending.as_slice().is_empty() {
            std::mem::take(&mut self.pending).collect()
        } else {
            loop {
                match self.rows.recv().await? {
                    Ok(chunk) if chunk.is_empty() => continue,
                    Ok(chunk) => break chunk,
                    Err(e) => return Some(Err(e)),
                }
            }
        };
        if let Some(watch) = &mut self.watch {
            for row in &chunk {
                watch.see(row.values());
            }
        }
        Some(Ok(chunk))
    }
}

/// Failures of a source. Messages never contain the connection URL or its password.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL's scheme is not one Backflow reads.
    #[error(
        "failed to read source: unsupported connection URL scheme {0:?} (use postgres://, mysql://, sqlite://, clickhouse://, clickhouses://, redshift://, snowflake://, databricks:// or bigquery://)"
    )]
    UnsupportedUrl(String),
    /// The connection URL or the Secret's other keys do not describe a usable connection.
    #[error("failed to configure source {target}: {reason}")]
    Config {
        /// The source, without credentials.
        target: String,
        /// What is missing or wrong.
        reason: String,
    },
    /// The service refused the credentials (wrong, expired, or lacking a grant).
    #[error("failed to authenticate to source {target}: {reason}")]
    Auth {
        /// The source, without credentials.
        target: String,
        /// The service's reason.
        reason: String,
    },
    /// The database could not be reached or refused the login.
    #[error("failed to connect to source {target}: {reason}")]
    Connect {
        /// Host and database, without credentials.
        target: String,
        /// The driver's reason.
        reason: String,
    },
    /// The query failed (syntax, missing table, permission).
    #[error("failed to run model query: {0}")]
    Query(String),
    /// The query tried to write.
    #[error("failed to run model query: it tried to write, and model queries run read-only ({0})")]
    ReadOnly(String),
    /// The query returns no columns and did not try to write (`SELECT FROM t`, `SET ...`).
    #[error(
        "failed to run model query: it returns no columns (a model is a SELECT, or a statement with RETURNING, whose columns the mappings read)"
    )]
    NoColumns,
    /// The query ran past the statement timeout.
    #[error("failed to run model query: it ran longer than the statement timeout of {0:?}")]
    Timeout(Duration),
    /// A column has a type with no canonical mapping.
    #[error(
        "failed to read column {column:?}: its type {type_name} is not supported (cast it in the query: {})",
        cast_hint(column, type_name)
    )]
    UnsupportedType {
        /// Column name.
        column: String,
        /// Database type name.
        type_name: String,
    },
    /// The driver could not read a column of a row at all (not one value: the row itself).
    #[error("failed to decode column {column:?}: {reason}")]
    Decode {
        /// Column name.
        column: String,
        /// What went wrong.
        reason: String,
    },
    /// The egress policy refused the database's address (or its name did not resolve).
    #[error(transparent)]
    Egress(#[from] crate::egress::EgressError),
}

/// The cast that turns a column of an unsupported type into one Backflow reads, in the
/// dialect the type name shows where it shows one.
fn cast_hint(column: &str, type_name: &str) -> String {
    let upper = type_name.to_ascii_uppercase();
    // ClickHouse names its types in CamelCase: `Tuple(UInt8, String)`, `IPv4`, `Map(…)`.
    const CLICKHOUSE: &[&str] = &[
        "Tuple(",
        "Map(",
        "Nested(",
        "IPv4",
        "IPv6",
        "AggregateFunction(",
        "SimpleAggregateFunction(",
        "Variant(",
        "Dynamic",
        "Object(",
        "Point",
        "Ring",
        "Polygon",
        "MultiPolygon",
        "Interval",
    ];
    if CLICKHOUSE.iter().any(|prefix| type_name.starts_with(prefix)) {
        return format!("toString({column}) AS {column}");
    }
    match upper.as_str() {
        "BYTEA" => format!("encode({column}, 'base64') AS {column}"),
        "INTERVAL" => format!(
            "EXTRACT(EPOCH FROM {column}) AS {column} for seconds, or {column}::text; on BigQuery CAST({column} AS STRING) AS {column}"
        ),
        // Databricks spells its intervals out: `INTERVAL DAY TO SECOND`.
        u if u.starts_with("INTERVAL ") => format!("CAST({column} AS STRING) AS {column}"),
        "BIT" | "VARBIT" => {
            format!("{column}::text on PostgreSQL, CAST({column} AS UNSIGNED) AS {column} on MySQL")
        }
        "GEOMETRY" | "POINT" | "LINESTRING" | "POLYGON" | "GEOGRAPHY" => {
            format!("ST_AsText({column}) AS {column}")
        }
        _ => format!(
            "{column}::text on PostgreSQL, CAST({column} AS CHAR) AS {column} on MySQL, CAST({column} AS STRING) AS {column} on BigQuery or Databricks, TO_VARCHAR({column}) AS {column} on Snowflake, or another type it can become"
        ),
    }
}

impl SourceError {
    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            SourceError::UnsupportedUrl(_) | SourceError::Config { .. } => "InvalidSourceURL",
            SourceError::Auth { .. } => "SourceAuthFailed",
            SourceError::Connect { .. } => "SourceUnreachable",
            SourceError::Query(_) | SourceError::ReadOnly(_) | SourceError::NoColumns => "QueryFailed",
            SourceError::Timeout(_) => "QueryTimeout",
            SourceError::UnsupportedType { .. } | SourceError::Decode { .. } => "UnsupportedColumn",
            SourceError::Egress(e) if e.is_denied() => "EgressDenied",
            SourceError::Egress(_) => "SourceUnreachable",
        }
    }

    /// True when running again unchanged cannot help (the user must fix the query or spec).
    pub fn is_permanent(&self) -> bool {
        match self {
            SourceError::Connect { .. } | SourceError::Timeout(_) => false,
            SourceError::Egress(e) => e.is_denied(),
            _ => true,
        }
    }
}

/// The statement logging of a connection that reads a model. sqlx warns of any statement
/// over a second, but a model read lasts as long as its rows take to stream (a million rows,
/// a few seconds), bounded by the statement timeout: it is not a slow statement, so sqlx
/// reports it at debug level only, with the statements themselves.
pub(crate) fn model_read_logging<O: sqlx::ConnectOptions>(options: O) -> O {
    options
        .log_statements(log::LevelFilter::Debug)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1))
}

/// Starts the model query on the source of `url` (a source that needs no other credential)
/// and returns its row stream.
pub async fn extract(url: &str, query: &str, options: &SourceOptions) -> Result<RowStream, SourceError> {
    let credentials = Credentials::default();
    let connection = Connection {
        url,
        credentials: &credentials,
        endpoint_override: None,
    };
    extract_from(connection, query, options).await
}

/// Starts the model query on `connection` and returns its row stream.
pub async fn extract_from(
    connection: Connection<'_>,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let url = connection.url;
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "postgres" | "postgresql" => postgres::extract(url, query, options).await,
        "mysql" | "mariadb" => mysql::extract(url, query, options).await,
        "sqlite" => sqlite::extract(url, query, options).await,
        "clickhouse" | "clickhouses" => clickhouse::extract(url, query, options).await,
        "redshift" => redshift::extract(url, query, options).await,
        "snowflake" => snowflake::extract(connection, query, options).await,
        "databricks" => databricks::extract(connection, query, options).await,
        "bigquery" => bigquery::extract(connection, query, options).await,
        other => Err(SourceError::UnsupportedUrl(other.to_owned())),
    }
}

/// Rows handed over at once: one hand-over per row costs a thread wake-up per row, which
/// dominated planning time in `make bench`.
const CHUNK_ROWS: usize = 256;

/// What travels over the row channel: a chunk of rows, or the error that ends the stream.
type RowChunk = Result<Vec<SourceRow>, SourceError>;

/// The sending end of a row channel, held by the task that runs the query.
type RowSender = mpsc::Sender<RowChunk>;

/// The bounded channel between the database task and the planner, in chunks of rows.
fn row_channel(options: &SourceOptions) -> (RowSender, mpsc::Receiver<RowChunk>) {
    // `mpsc::channel(0)` panics; one chunk is the smallest buffer that streams.
    mpsc::channel((options.buffer_rows / CHUNK_ROWS).max(1))
}

/// The statement timeout in whole milliseconds, at least 1: the databases read 0 as "no timeout".
fn timeout_millis(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// How the streaming of a result ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// Every row was sent.
    Finished,
    /// The receiver was dropped: nobody wants the rest.
    ReceiverGone,
    /// An error was sent (or the receiver was gone when it happened).
    Failed,
}

/// The sending side of a row stream: gathers rows into chunks and hands them over, for
/// sources that do not read through [`pump`] (HTTP warehouses page by page).
struct RowSink {
    tx: RowSender,
    chunk: Vec<SourceRow>,
}

impl RowSink {
    /// A sink feeding `tx`.
    fn new(tx: RowSender) -> RowSink {
        RowSink {
            tx,
            chunk: Vec::with_capacity(CHUNK_ROWS),
        }
    }

    /// Queues a row; false once the receiver is gone (stop reading).
    async fn push(&mut self, row: SourceRow) -> bool {
        self.chunk.push(row);
        if self.chunk.len() < CHUNK_ROWS {
            return true;
        }
        let full = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK_ROWS));
        self.tx.send(Ok(full)).await.is_ok()
    }

    /// Hands over the last rows: the stream ends cleanly.
    async fn finish(mut self) -> StreamEnd {
        if !self.chunk.is_empty() && self.tx.send(Ok(std::mem::take(&mut self.chunk))).await.is_err() {
            return StreamEnd::ReceiverGone;
        }
        StreamEnd::Finished
    }

    /// Hands over the rows read so far, then `error`, which ends the stream.
    async fn fail(mut self, error: SourceError) -> StreamEnd {
        if !self.chunk.is_empty() && self.tx.send(Ok(std::mem::take(&mut self.chunk))).await.is_err() {
            return StreamEnd::ReceiverGone;
        }
        let _ = self.tx.send(Err(error)).await;
        StreamEnd::Failed
    }

    /// Resolves once nobody reads the stream any more.
    async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// [`pump`] for results that arrive in parts (Snowflake partitions, Databricks chunks,
/// BigQuery pages): each part's rows in order, a failed part ends the stream with its error.
async fn pump_parts<R, S>(
    parts: S,
    tx: &RowSender,
    decode: impl FnMut(&R) -> Result<SourceRow, SourceError>,
) -> StreamEnd
where
    S: Stream<Item = Result<Vec<R>, SourceError>>,
{
    let rows = parts
        .map_ok(|rows| futures::stream::iter(rows.into_iter().map(Ok::<_, SourceError>)))
        .try_flatten();
    pump(rows, tx, decode, |e| e).await
}

/// Decodes the rows of `rows` and sends them into `tx` until the result ends, an error
/// occurs (sent as the last item) or the receiver is dropped. A row with an undecodable
/// value is sent like any other (as [`SourceRow::Undecodable`]): only errors of the query or
/// the row itself end the stream.
///
/// Waiting for the next row also watches the receiver, so a slow query stops as soon as
/// nobody listens instead of at its next row.
async fn pump<R, E, S>(
    rows: S,
    tx: &RowSender,
    mut decode: impl FnMut(&R) -> Result<SourceRow, SourceError>,
    query_error: impl Fn(E) -> SourceError,
) -> StreamEnd
where
    S: Stream<Item = Result<R, E>>,
{
    let mut rows = std::pin::pin!(rows);
    let mut sink = RowSink::new(tx.clone());
    loop {
        let next = tokio::select! {
            next = rows.next() => next,
            () = sink.closed() => return StreamEnd::ReceiverGone,
        };
        let row = match next {
            None => return sink.finish().await,
            Some(Ok(row)) => decode(&row),
            Some(Err(e)) => Err(query_error(e)),
        };
        match row {
            Ok(row) => {
                if !sink.push(row).await {
                    return StreamEnd::ReceiverGone;
                }
            }
            Err(e) => return sink.fail(e).await,
        }
    }
}

/// A `Connect` error for `url` whose reason never shows the URL's password.
fn connect_error(url: &str, reason: impl Display) -> SourceError {
    SourceError::Connect {
        target: crate::redact::describe_url(url),
        reason: crate::redact::Scrubber::new()
            .with_url(url)
            .scrub(&reason.to_string()),
    }
}

/// Why a JSON value has no canonical form (serde_json reads numbers as `f64`, so a number
/// past its range, valid in a `jsonb`, does not parse).
const JSON_UNREADABLE: &str = "JSON that does not parse or holds a number beyond the range of a double";

/// A JSON document from its text.
fn json_value(bytes: &[u8]) -> Result<Value, ValueError> {
    serde_json::from_slice(bytes)
        .map(Value::Json)
        .map_err(|_| ValueError::undecodable(JSON_UNREADABLE))
}

/// A float, or why it has no canonical form: JSON has no NaN or infinity, and sending one as
/// a string or as NULL would change its meaning at the destination, so its row is rejected.
fn float(f: f64) -> Result<Value, ValueError> {
    if f.is_finite() {
        Ok(Value::Float(f))
    } else if f.is_nan() {
        Err(ValueError::undecodable(
            "float NaN, which is not a number any destination can hold",
        ))
    } else if f > 0.0 {
        Err(ValueError::undecodable(
            "float Infinity, which is not a number any destination can hold",
        ))
    } else {
        Err(ValueError::undecodable(
            "float -Infinity, which is not a number any destination can hold",
        ))
    }
}

/// Widens a single-precision float through its shortest decimal form, so a `REAL` 0.1
/// becomes the `f64` 0.1 (and hashes like a `DOUBLE` 0.1) rather than 0.100000001490116.
fn widen_f32(f: f32) -> f64 {
    if f.is_finite() {
        f.to_string().parse().unwrap_or(f64::from(f))
    } else {
        f64::from(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_name_the_host_but_not_the_credentials() {
        let err = connect_error(
            "mysql://root:hunter2@127.0.0.1:1/shop?ssl-mode=disabled",
            "refused: hunter2",
        );
        let text = err.to_string();
        assert!(text.contains("mysql://127.0.0.1:1/shop"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn non_finite_floats_are_undecodable_and_name_their_kind() {
        assert_eq!(float(1.5).unwrap(), Value::Float(1.5));
        for (f, kind) in [
            (f64::NAN, "float NaN"),
            (f64::INFINITY, "float Infinity"),
            (f64::NEG_INFINITY, "float -Infinity"),
        ] {
            match float(f) {
                Err(ValueError::Undecodable(reason)) => assert!(reason.starts_with(kind), "{reason}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_row_keeps_decoding_past_an_undecodable_value_and_reports_the_first() {
        let row = decode_row(4, |i| match i {
            1 => Err(ValueError::undecodable("first")),
            2 => Err(ValueError::undecodable("second")),
            _ => Ok(Value::Int(i as i64)),
        })
        .unwrap();
        let SourceRow::Undecodable(bad) = row else {
            panic!("{row:?}")
        };
        assert_eq!((bad.column, bad.reason.as_ref()), (1, "first"));
        assert_eq!(
            bad.values,
            vec![Value::Int(0), Value::Null, Value::Null, Value::Int(3)]
        );
        assert_eq!(
            decode_row(2, |i| Ok(Value::Int(i as i64))).unwrap(),
            SourceRow::Decoded(vec![Value::Int(0), Value::Int(1)])
        );
        let fatal = decode_row(2, |_| Err(ValueError::Fatal(SourceError::Query("x".into()))));
        assert!(matches!(fatal, Err(SourceError::Query(_))));
    }

    #[test]
    fn single_precision_floats_widen_to_their_shortest_form() {
        assert_eq!(widen_f32(0.1), 0.1);
        assert_eq!(widen_f32(-2.5), -2.5);
        assert!(widen_f32(f32::NAN).is_nan());
    }

    #[test]
    fn extraction_can_run_on_a_spawned_task() {
        // Compiles only while every driver's `extract` future is `Send`: sqlx futures over a
        // borrowed connection easily lose it, and the engine runs extractions on tasks.
        fn spawnable<F: std::future::Future + Send + 'static>(_: F) {}
        spawnable(async {
            let options = SourceOptions::default();
            let _ = postgres::extract("x", "SELECT 1", &options).await;
        });
        spawnable(async {
            let options = SourceOptions::default();
            let _ = mysql::extract("x", "SELECT 1", &options).await;
        });
        spawnable(async {
            let options = SourceOptions::default();
            let _ = sqlite::extract("x", "SELECT 1", &options).await;
        });
        spawnable(async {
            let options = SourceOptions::default();
            let _ = clickhouse::extract("x", "SELECT 1", &options).await;
        });
        spawnable(async {
            let options = SourceOptions::default();
            let _ = redshift::extract("x", "SELECT 1", &options).await;
        });
    }

    #[test]
    fn an_unsupported_type_names_the_column_and_the_cast() {
        let err = SourceError::UnsupportedType {
            column: "payload".into(),
            type_name: "BYTEA".into(),
        };
        assert!(
            err.to_string()
                .ends_with("(cast it in the query: encode(payload, 'base64') AS payload)"),
            "{err}"
        );
        let err = SourceError::UnsupportedType {
            column: "span".into(),
            type_name: "INTERVAL".into(),
        };
        assert!(err.to_string().contains("EXTRACT(EPOCH FROM span)"), "{err}");
        let hint = |type_name: &str| {
            SourceError::UnsupportedType {
                column: "c".into(),
                type_name: type_name.into(),
            }
            .to_string()
        };
        assert!(hint("Tuple(UInt8, String)").contains("toString(c) AS c"));
        assert!(hint("INTERVAL DAY TO SECOND").contains("(cast it in the query: CAST(c AS STRING) AS c)"));
        assert!(hint("GEOGRAPHY").contains("ST_AsText(c) AS c"));
        assert!(hint("RANGE<DATE>").contains("CAST(c AS STRING) AS c on BigQuery"));
    }

    #[test]
    fn timeouts_never_round_down_to_no_timeout() {
        assert_eq!(timeout_millis(Duration::from_micros(10)), 1);
        assert_eq!(timeout_millis(Duration::from_millis(200)), 200);
    }
}
