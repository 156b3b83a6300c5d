//! Sources: run a model query against a warehouse and stream its rows as canonical values.
//!
//! The query runs in a read-only transaction with a statement timeout, on a task of its own
//! that feeds a bounded channel, so rows are streamed and never collected whole.

mod mysql;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

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
            buffer_rows: 4096,
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

/// The rows of a running model query.
#[derive(Debug)]
pub struct RowStream {
    columns: Arc<[Column]>,
    rows: mpsc::Receiver<Result<Vec<Value>, SourceError>>,
}

impl RowStream {
    /// Builds a stream from its columns and the receiving end of the row channel.
    pub(crate) fn new(columns: Vec<Column>, rows: mpsc::Receiver<Result<Vec<Value>, SourceError>>) -> Self {
        RowStream {
            columns: columns.into(),
            rows,
        }
    }

    /// The model's columns, known before the first row.
    pub fn columns(&self) -> &Arc<[Column]> {
        &self.columns
    }

    /// The next row, an error that ends the stream, or `None` at the end.
    pub async fn next(&mut self) -> Option<Result<Vec<Value>, SourceError>> {
        self.rows.recv().await
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
        }
    }

    /// True when running again unchanged cannot help (the user must fix the query or spec).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, SourceError::Connect { .. } | SourceError::Timeout(_))
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
