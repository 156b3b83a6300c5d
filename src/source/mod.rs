//! Sources: run a model query against a warehouse and stream its rows as canonical values.
//!
//! The query runs in a read-only transaction with a statement timeout, on a task of its own
//! that feeds a bounded channel, so rows are streamed and never collected whole.

mod mysql;
mod postgres;
mod sqlite;

use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::engine::value::Value;

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

/// A column of the model: its name and the database's name for its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name as the query returns it.
    pub name: String,
    /// The database's type name (`INT8`, `DECIMAL`, `TEXT`, …).
    pub type_name: String,
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
    pending: std::vec::IntoIter<Vec<Value>>,
    privileges: Privileges,
}

impl RowStream {
    /// Builds a stream from its columns and the receiving end of the row channel.
    pub(crate) fn new(
        columns: Vec<Column>,
        rows: mpsc::Receiver<Result<Vec<Vec<Value>>, SourceError>>,
    ) -> Self {
        RowStream {
            columns: columns.into(),
            rows,
            pending: Vec::new().into_iter(),
            privileges: Privileges::Least,
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
    pub async fn next(&mut self) -> Option<Result<Vec<Value>, SourceError>> {
        loop {
            if let Some(row) = self.pending.next() {
                return Some(Ok(row));
            }
            match self.rows.recv().await? {
                Ok(chunk) => self.pending = chunk.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// Failures of a source. Messages never contain the connection URL or its password.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The URL's scheme is not one Backflow reads.
    #[error(
        "failed to read source: unsupported connection URL scheme {0:?} (use postgres://, mysql:// or sqlite://)"
    )]
    UnsupportedUrl(String),
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
    /// The query ran past the statement timeout.
    #[error("failed to run model query: it ran longer than the statement timeout of {0:?}")]
    Timeout(Duration),
    /// A column has a type with no canonical mapping.
    #[error(
        "failed to read column {column:?}: its type {type_name} is not supported (cast it in the query, for example to text)"
    )]
    UnsupportedType {
        /// Column name.
        column: String,
        /// Database type name.
        type_name: String,
    },
    /// A value could not be decoded.
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

impl SourceError {
    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            SourceError::UnsupportedUrl(_) => "InvalidSourceURL",
            SourceError::Connect { .. } => "SourceUnreachable",
            SourceError::Query(_) | SourceError::ReadOnly(_) => "QueryFailed",
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

/// Starts the model query and returns its row stream.
pub async fn extract(url: &str, query: &str, options: &SourceOptions) -> Result<RowStream, SourceError> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "postgres" | "postgresql" => postgres::extract(url, query, options).await,
        "mysql" | "mariadb" => mysql::extract(url, query, options).await,
        "sqlite" => sqlite::extract(url, query, options).await,
        other => Err(SourceError::UnsupportedUrl(other.to_owned())),
    }
}

/// Host, port and database of a connection URL, without user or password, for messages.
pub fn describe_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let after_credentials = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
            let without_query = after_credentials.split('?').next().unwrap_or("");
            format!("{scheme}://{without_query}")
        }
        None => "<invalid URL>".to_owned(),
    }
}

/// Rows handed over at once: one hand-over per row costs a thread wake-up per row, which
/// dominated planning time in `make bench`.
const CHUNK_ROWS: usize = 256;

/// What travels over the row channel: a chunk of rows, or the error that ends the stream.
type RowChunk = Result<Vec<Vec<Value>>, SourceError>;

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

/// Decodes the rows of `rows` and sends them into `tx` until the result ends, an error
/// occurs (sent as the last item) or the receiver is dropped.
///
/// Waiting for the next row also watches the receiver, so a slow query stops as soon as
/// nobody listens instead of at its next row.
async fn pump<R, S>(
    rows: S,
    tx: &RowSender,
    mut decode: impl FnMut(&R) -> Result<Vec<Value>, SourceError>,
    query_error: impl Fn(sqlx::Error) -> SourceError,
) -> StreamEnd
where
    S: Stream<Item = Result<R, sqlx::Error>>,
{
    let mut rows = std::pin::pin!(rows);
    let mut chunk = Vec::with_capacity(CHUNK_ROWS);
    loop {
        let next = tokio::select! {
            next = rows.next() => next,
            () = tx.closed() => return StreamEnd::ReceiverGone,
        };
        let row = match next {
            None => {
                if !chunk.is_empty() && tx.send(Ok(chunk)).await.is_err() {
                    return StreamEnd::ReceiverGone;
                }
                return StreamEnd::Finished;
            }
            Some(Ok(row)) => decode(&row),
            Some(Err(e)) => Err(query_error(e)),
        };
        match row {
            Ok(values) => {
                chunk.push(values);
                if chunk.len() >= CHUNK_ROWS {
                    let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_ROWS));
                    if tx.send(Ok(full)).await.is_err() {
                        return StreamEnd::ReceiverGone;
                    }
                }
            }
            Err(e) => {
                // Rows before the error are delivered first, then the error ends the stream.
                if !chunk.is_empty() && tx.send(Ok(std::mem::take(&mut chunk))).await.is_err() {
                    return StreamEnd::ReceiverGone;
                }
                let _ = tx.send(Err(e)).await;
                return StreamEnd::Failed;
            }
        }
    }
}

/// A `Connect` error for `url` whose reason never shows the URL's password.
fn connect_error(url: &str, reason: impl Display) -> SourceError {
    SourceError::Connect {
        target: describe_url(url),
        reason: crate::redact::Scrubber::new()
            .with_url(url)
            .scrub(&reason.to_string()),
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
    }

    #[test]
    fn timeouts_never_round_down_to_no_timeout() {
        assert_eq!(timeout_millis(Duration::from_micros(10)), 1);
        assert_eq!(timeout_millis(Duration::from_millis(200)), 200);
    }
}
