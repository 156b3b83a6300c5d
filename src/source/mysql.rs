//! Placeholder until implemented.

use super::{RowStream, SourceError, SourceOptions};

pub(super) async fn extract(
    _url: &str,
    _query: &str,
    _options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    Err(SourceError::UnsupportedUrl("not implemented yet".into()))
}
