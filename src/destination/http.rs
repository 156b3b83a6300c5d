//! Placeholder until implemented.

use async_trait::async_trait;

use super::{
    Capabilities, Connector, DestinationError, Operation, Record, RecordOutcome, SecretData, SendError,
};
use crate::api::destination::HttpSpec;

/// The generic HTTP destination.
pub struct HttpConnector;

impl HttpConnector {
    /// Builds the connector.
    pub fn new(_spec: &HttpSpec, _secret: Option<&SecretData>) -> Result<Self, DestinationError> {
        Err(DestinationError::Invalid("not implemented yet".into()))
    }
}

#[async_trait]
impl Connector for HttpConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: 100,
            operations: vec![],
            default_requests_per_second: 10.0,
            default_concurrency: 4,
        }
    }
    async fn check(&self) -> Result<(), SendError> {
        Ok(())
    }
    async fn send(&self, _operation: Operation, _batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        Err(SendError::Fatal("not implemented".into()))
    }
}
