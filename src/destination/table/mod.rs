//! Placeholder until implemented.

use std::sync::Arc;

use super::{Connector, DestinationError, SecretData};
use crate::api::DestinationSpec;

/// Builds a table connector.
pub async fn build(
    _spec: &DestinationSpec,
    _secret: Option<&SecretData>,
) -> Result<Arc<dyn Connector>, DestinationError> {
    Err(DestinationError::Invalid("not implemented yet".into()))
}
