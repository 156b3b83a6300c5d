//! The setup the cloud warehouse source tests share: Secret keys as credentials, and an
//! extraction whose requests go to a local double.

use std::collections::BTreeMap;
use std::time::Duration;

use backflow::source::{Connection, Credentials, RowStream, SourceError, SourceOptions, extract_from};

/// Credentials from key and value pairs, as the other keys of a source's Secret.
pub fn credentials(pairs: &[(&str, &str)]) -> Credentials {
    Credentials::new(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// Starts an extraction of `query` from the source at `url`, its requests sent to the double
/// at `endpoint`, with `timeout` as the statement timeout and a row buffer of 4, so the source
/// streams rather than reads ahead.
pub async fn extract_via(
    endpoint: &str,
    url: &str,
    credentials: &Credentials,
    query: &str,
    timeout: Duration,
) -> Result<RowStream, SourceError> {
    extract_from(
        Connection {
            url,
            credentials,
            endpoint_override: Some(endpoint),
        },
        query,
        &SourceOptions {
            statement_timeout: timeout,
            buffer_rows: 4,
        },
    )
    .await
}
