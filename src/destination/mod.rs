//! Destinations: one trait every connector implements, and the registry that builds a
//! connector from a `Destination` spec.
//!
//! A connector says how to send one batch of records and how to read per-record outcomes;
//! batching, rate limiting, retries, splitting, concurrency and the check that a connector
//! supports an operation live once in [`delivery`]; what every HTTP connector shares (the
//! rules for reading an answer among it) lives in [`vendor`], never in a sibling connector.

pub mod braze;
pub mod customerio;
pub mod delivery;
pub mod http;
pub mod hubspot;
pub mod intercom;
pub mod mailchimp;
pub mod redis;
pub mod salesforce;
pub mod slack;
pub mod table;
pub mod vendor;
pub mod zendesk;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::api::{DestinationSpec, DestinationType};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::redact::{Scrub, Scrubber};

/// The outcome of one record in a batch the destination answered.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome {
    /// Written.
    Accepted,
    /// Refused for good (a validation error); the reason is the destination's.
    Rejected(String),
    /// Failed for a reason that may pass on retry (a per-record throttle or timeout).
    Retry(String),
}

impl RecordOutcome {
    /// A batch's outcomes where a record with none set was accepted: connectors fill in the
    /// rejections and retries they found and leave the rest `None`.
    pub fn accepted_unless_set(outcomes: Vec<Option<RecordOutcome>>) -> Vec<RecordOutcome> {
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(RecordOutcome::Accepted))
            .collect()
    }
}

/// Why a whole batch failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SendError {
    /// Transient (429, 5xx, timeout, connection lost): retry the batch after a backoff.
    #[error("{reason}")]
    Retryable {
        /// What happened, without secrets.
        reason: String,
        /// The destination's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// True when the destination said it is throttling (429 and the like).
        throttled: bool,
    },
    /// The batch was refused as a whole because of its content (a 400, a constraint
    /// violation): the delivery machinery splits it to find the records at fault.
    #[error("{0}")]
    BatchRejected(String),
    /// Nothing will pass until a person acts (credentials rejected, table missing): the run
    /// stops.
    #[error("{0}")]
    Fatal(String),
    /// The batch was refused for its size: the destination takes at most `limit` records per
    /// request. The delivery machinery sends these records again in batches of `limit`, and
    /// keeps that size for the rest of the run.
    #[error("{reason}")]
    TooLarge {
        /// Records per request the destination takes.
        limit: usize,
        /// What the destination said, without secrets.
        reason: String,
    },
}

impl From<crate::egress::EgressError> for SendError {
    /// A refusal of the egress policy needs a person (`Fatal`); a name that did not resolve
    /// may resolve later (`Retryable`).
    fn from(e: crate::egress::EgressError) -> SendError {
        if e.is_denied() {
            SendError::Fatal(e.to_string())
        } else {
            SendError::Retryable {
                reason: e.to_string(),
                retry_after: None,
                throttled: false,
            }
        }
    }
}

impl Scrub for SendError {
    fn scrubbed(self, scrubber: &Scrubber) -> SendError {
        match self {
            SendError::Retryable {
                reason,
                retry_after,
                throttled,
            } => SendError::Retryable {
                reason: scrubber.scrub(&reason),
                retry_after,
                throttled,
            },
            SendError::BatchRejected(reason) => SendError::BatchRejected(scrubber.scrub(&reason)),
            SendError::Fatal(reason) => SendError::Fatal(scrubber.scrub(&reason)),
            SendError::TooLarge { limit, reason } => SendError::TooLarge {
                limit,
                reason: scrubber.scrub(&reason),
            },
        }
    }
}

/// What a connector can do and its default limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Most records one request may carry.
    pub max_batch_size: usize,
    /// Operations the connector supports.
    pub operations: Vec<Operation>,
    /// Default sustained requests per second, from the vendor's documented limits.
    pub default_requests_per_second: f64,
    /// Default requests in flight at once.
    pub default_concurrency: usize,
}

/// What a run is about to send, counted once planning is done: records per operation. A hint
/// for choosing a transport, not a promise: rows of a key the model repeats are counted here
/// though they are rejected rather than sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlannedSends {
    counts: Vec<(Operation, u64)>,
}

impl PlannedSends {
    /// Adds `records` to the count of `operation`.
    pub fn add(&mut self, operation: Operation, records: u64) {
        match self.counts.iter_mut().find(|(o, _)| *o == operation) {
            Some((_, n)) => *n += records,
            None => self.counts.push((operation, records)),
        }
    }

    /// The records to send with `operation`.
    pub fn count(&self, operation: Operation) -> u64 {
        self.counts
            .iter()
            .find(|(o, _)| *o == operation)
            .map_or(0, |(_, n)| *n)
    }

    /// The records to send, all operations together.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }
}

/// A destination connector.
#[async_trait]
pub trait Connector: Send + Sync {
    /// What the connector supports and its defaults.
    fn capabilities(&self) -> Capabilities;

    /// Told once per run, after planning and before the first batch, what the run will send.
    /// A connector with another transport for large runs (Salesforce's Bulk API) answers the
    /// connector to use for this run instead, whose `capabilities().max_batch_size` then sets
    /// the run's batch size; `None` (the default) keeps this one as it is. The answer serves
    /// one run only, so runs sharing a connector do not affect each other.
    fn for_run(&self, _planned: &PlannedSends) -> Option<Arc<dyn Connector>> {
        None
    }

    /// Checks that the destination answers and the credentials work.
    async fn check(&self) -> Result<(), SendError>;

    /// Checks, before a sync runs, that the destination can find records by the sync's match
    /// fields when it upserts (a table needs a unique index on those columns). `Fatal` names
    /// what to create; the default has nothing to check.
    async fn check_match(&self, _match_fields: &[String]) -> Result<(), SendError> {
        Ok(())
    }

    /// False when the connector sends each record's fields as they are, as their canonical
    /// JSON ([`Fields::write_json`](crate::model::record::Fields::write_json)), so the engine
    /// builds no document for the records it reads back (their match fields are built only if
    /// the connector looks at them); true (the default) when it reads the fields one by one, so
    /// the engine builds each record's documents ahead, beside the requests.
    fn reads_fields(&self) -> bool {
        true
    }

    /// Sends one batch (at most `max_batch_size` records) and returns one outcome per record,
    /// in order.
    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError>;
}

/// Failures building a connector from a spec.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The spec lacks the block for its type.
    #[error("failed to configure destination: spec.{0} is required for type {0}")]
    MissingBlock(&'static str),
    /// A required Secret key is absent.
    #[error("failed to configure destination: key {key:?} not found in Secret {secret:?}")]
    MissingSecretKey {
        /// Secret name.
        secret: String,
        /// Missing key.
        key: String,
    },
    /// The destination needs credentials and none were referenced.
    #[error("failed to configure destination: type {0} needs spec.credentialsSecretRef")]
    MissingCredentials(&'static str),
    /// An invalid setting.
    #[error("failed to configure destination: {0}")]
    Invalid(String),
}

impl DestinationError {
    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            DestinationError::MissingSecretKey { .. } | DestinationError::MissingCredentials(_) => {
                "SecretInvalid"
            }
            DestinationError::MissingBlock(_) | DestinationError::Invalid(_) => "InvalidDestination",
        }
    }
}

/// Builds the connector for a Destination spec with its credentials.
pub async fn build(
    spec: &DestinationSpec,
    secret: Option<&SecretData>,
) -> Result<Arc<dyn Connector>, DestinationError> {
    match spec.destination_type {
        DestinationType::Http => {
            let block = spec.http.as_ref().ok_or(DestinationError::MissingBlock("http"))?;
            let connector = http::HttpConnector::new(block, secret)?;
            Ok(Arc::new(connector))
        }
        DestinationType::Slack => {
            let block = spec
                .slack
                .as_ref()
                .ok_or(DestinationError::MissingBlock("slack"))?;
            let secret_ref = spec.credentials_secret_ref.as_ref();
            let connector = slack::SlackConnector::new(
                block,
                secret,
                secret_ref.map_or("", |r| r.name.as_str()),
                secret_ref.and_then(|r| r.key.as_deref()),
            )?;
            Ok(Arc::new(connector))
        }
        DestinationType::Hubspot => {
            let block = spec
                .hubspot
                .as_ref()
                .ok_or(DestinationError::MissingBlock("hubspot"))?;
            Ok(Arc::new(hubspot::HubspotConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
        DestinationType::Postgres | DestinationType::Mysql | DestinationType::Sqlite => {
            table::build(spec, secret).await
        }
        DestinationType::Redis => self::redis::build(spec, secret),
        DestinationType::Braze => {
            let block = spec
                .braze
                .as_ref()
                .ok_or(DestinationError::MissingBlock("braze"))?;
            Ok(Arc::new(braze::BrazeConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
        DestinationType::Intercom => {
            let block = spec
                .intercom
                .as_ref()
                .ok_or(DestinationError::MissingBlock("intercom"))?;
            Ok(Arc::new(intercom::IntercomConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
        DestinationType::Customerio => {
            let block = spec
                .customerio
                .as_ref()
                .ok_or(DestinationError::MissingBlock("customerio"))?;
            Ok(Arc::new(customerio::CustomerioConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
        DestinationType::Mailchimp => {
            let block = spec
                .mailchimp
                .as_ref()
                .ok_or(DestinationError::MissingBlock("mailchimp"))?;
            Ok(Arc::new(mailchimp::MailchimpConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
        DestinationType::Zendesk => {
            let block = spec
                .zendesk
                .as_ref()
                .ok_or(DestinationError::MissingBlock("zendesk"))?;
            Ok(Arc::new(zendesk::ZendeskConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
        DestinationType::Salesforce => {
            let block = spec
                .salesforce
                .as_ref()
                .ok_or(DestinationError::MissingBlock("salesforce"))?;
            Ok(Arc::new(salesforce::SalesforceConnector::new(
                block,
                spec.credentials_secret_ref.as_ref(),
                secret,
            )?))
        }
    }
}
