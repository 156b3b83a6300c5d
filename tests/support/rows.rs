//! Reading a source's row stream in tests.

use backflow::model::value::Value;
use backflow::source::{RowStream, SourceError};

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
