//! Reading a source's row stream in tests.

use std::str::FromStr;
use std::time::Duration;

use backflow::model::value::Value;
use backflow::source::{RowStream, SourceError, SourceOptions, SourceRow, extract};
use bigdecimal::BigDecimal;

use super::db::TestDb;

/// Every row of the stream; a row with a value that cannot be decoded (which the planner would
/// reject, naming its key) comes back as a `Decode` error naming its column.
pub async fn collect_decoded(mut stream: RowStream) -> Result<Vec<Vec<Value>>, SourceError> {
    let mut rows = Vec::new();
    while let Some(row) = stream.next().await {
        match row?.decoded() {
            Ok(values) => rows.push(values),
            Err(bad) => {
                return Err(SourceError::Decode {
                    column: stream.columns()[bad.column].name.clone(),
                    reason: bad.reason.to_string(),
                });
            }
        }
    }
    Ok(rows)
}

// The database sources' tests (PostgreSQL, MySQL): the same reading helpers for each.

/// Options of the database source tests: a small buffer, a generous timeout.
pub fn options() -> SourceOptions {
    SourceOptions {
        statement_timeout: Duration::from_secs(30),
        buffer_rows: 64,
    }
}

/// Every row of the stream, decodable or not.
pub async fn collect_rows(mut stream: RowStream) -> Result<Vec<SourceRow>, SourceError> {
    let mut rows = Vec::new();
    while let Some(row) = stream.next().await {
        rows.push(row?);
    }
    Ok(rows)
}

/// The rows of a stream whose values all decode.
pub async fn collect(stream: RowStream) -> Result<Vec<Vec<Value>>, SourceError> {
    Ok(collect_rows(stream)
        .await?
        .into_iter()
        .map(|r| {
            r.decoded()
                .unwrap_or_else(|bad| panic!("undecodable row: {bad:?}"))
        })
        .collect())
}

/// Every row of `query`, decodable or not.
pub async fn source_rows_of(db: &TestDb, query: &str) -> Result<Vec<SourceRow>, SourceError> {
    collect_rows(extract(&db.url, query, &options()).await?).await
}

/// The undecodable column and reason of each row (`None` for a row that decoded).
pub fn undecodable(rows: &[SourceRow]) -> Vec<Option<(usize, String)>> {
    rows.iter()
        .map(|r| match r {
            SourceRow::Decoded(_) => None,
            SourceRow::Undecodable(bad) => Some((bad.column, bad.reason.to_string())),
        })
        .collect()
}

/// The decoded rows of `query`.
pub async fn rows_of(db: &TestDb, query: &str) -> Result<Vec<Vec<Value>>, SourceError> {
    collect(extract(&db.url, query, &options()).await?).await
}

/// An exact decimal value.
pub fn dec(s: &str) -> Value {
    Value::Decimal(BigDecimal::from_str(s).unwrap())
}
