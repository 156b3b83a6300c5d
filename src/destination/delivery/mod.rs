//! The shared delivery machinery: every connector's batches go through it.
//!
//! Layers, outermost first, in this fixed order:
//! 1. concurrency: at most `max_concurrency` requests are out at once (a batch waiting out a
//!    retry backoff holds no slot; the engine keeps a few more batches going than that);
//! 2. split: a batch refused as a whole ([`SendError::BatchRejected`]) is halved until the
//!    records at fault stand alone and are rejected, so the good records still land; a batch
//!    refused for its size ([`SendError::TooLarge`]) is cut to the size the destination named,
//!    which every later batch of the run keeps ([`Delivery::batch_size`]);
//! 3. retry: transient failures ([`SendError::Retryable`], [`RecordOutcome::Retry`]) are
//!    retried with exponential backoff and full jitter, never sooner than `Retry-After`;
//!    only the records that failed are sent again;
//! 4. rate limit: each request waits for a token of the Destination's shared bucket; a
//!    throttling answer pauses every sender of that Destination;
//! 5. the connector's `send`, which may report retries and throttles it handled itself
//!    ([`report`]).
//!
//! Rejection reasons leave this module without the record's own values ([`values`]): a
//! vendor's message that echoes what it refused (`invalid email address: a.example.com`)
//! keeps its code and field names, not the value, in status samples and logs.

pub mod rate_limit;
pub mod report;
pub mod values;
pub mod wait_clock;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use super::{Capabilities, Connector, PlannedSends, RecordOutcome, SendError};
use crate::api::DestinationSpec;
use crate::api::duration;
use crate::model::record::{Operation, Record};
use rate_limit::RateLimiter;

/// Longest `Retry-After` honoured as given; a longer one is capped so a run cannot hang.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Bytes of mapped records per request when nothing says otherwise: below every supported
/// vendor's payload limit (HubSpot's and Salesforce's are 10 MB or more), and small enough that
/// the batches in flight of many syncs fit in the operator's memory.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Batching, concurrency and retry settings of one Destination, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// Records per request.
    pub batch_size: usize,
    /// Bytes of mapped records per request, about (a batch is cut at whichever of
    /// `batch_size` and this comes first; a single record larger goes alone).
    pub max_batch_bytes: usize,
    /// Batches in flight at once.
    pub max_concurrency: usize,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Wait before the first retry.
    pub initial_backoff: Duration,
    /// Longest wait between retries.
    pub max_backoff: Duration,
    /// Sustained requests per second.
    pub requests_per_second: f64,
    /// Burst size of the token bucket.
    pub burst: u32,
}

impl DeliveryConfig {
    /// The spec's settings over the connector's defaults; the batch size is capped at the
    /// connector's limit.
    pub fn resolve(spec: &DestinationSpec, caps: &Capabilities) -> Result<DeliveryConfig, String> {
        let retry = spec.retry.clone().unwrap_or_default();
        let parse = |field: &str, text: &Option<String>, default: Duration| match text {
            Some(t) => duration::parse(t).map_err(|e| format!("spec.retry.{field}: {e}")),
            None => Ok(default),
        };
        let requests_per_second = spec
            .rate_limit
            .as_ref()
            .map(|r| r.requests_per_second)
            .unwrap_or(caps.default_requests_per_second);
        if !(requests_per_second.is_finite() && requests_per_second > 0.0) {
            return Err("spec.rateLimit.requestsPerSecond must be a number above 0".to_owned());
        }
        let burst = spec
            .rate_limit
            .as_ref()
            .and_then(|r| r.burst)
            .unwrap_or_else(|| requests_per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
        Ok(DeliveryConfig {
            batch_size: spec
                .batch_size
                .map_or(caps.max_batch_size, |b| b as usize)
                .clamp(1, caps.max_batch_size.max(1)),
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_concurrency: spec
                .max_concurrency
                .map_or(caps.default_concurrency, |c| c as usize)
                .max(1),
            max_attempts: retry.max_attempts.unwrap_or(5).max(1),
            initial_backoff: parse(
                "initialBackoff",
                &retry.initial_backoff,
                Duration::from_millis(500),
            )?,
            max_backoff: parse("maxBackoff", &retry.max_backoff, Duration::from_secs(30))?,
            requests_per_second,
            burst: burst.max(1),
        })
    }
}

/// The final outcome of one record after retries and splits.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivered {
    /// The destination accepted it.
    Accepted,
    /// The destination refused it for good; retried next run.
    Rejected(String),
    /// Transient failures outlasted the retries; retried next run.
    Failed(String),
}

/// Why every record of an operation the connector does not support is rejected.
fn unsupported(operation: Operation, supported: &[Operation]) -> String {
    let names: Vec<&str> = supported.iter().map(|o| o.as_str()).collect();
    let hint = if operation == Operation::Delete {
        "; use mode upsert"
    } else {
        ""
    };
    format!(
        "this destination cannot {} records (it supports {}){hint}",
        operation.as_str(),
        names.join(", ")
    )
}

/// A failure that stops the whole run (credentials rejected, table missing).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("failed to deliver: {0}")]
pub struct FatalDeliveryError(pub String);

/// Counters of one run's delivery.
#[derive(Debug, Default)]
pub struct DeliveryStats {
    /// Requests sent.
    pub requests: AtomicU64,
    /// Answers that said the destination is throttling.
    pub throttled: AtomicU64,
    /// Requests sent again after a transient failure.
    pub retries: AtomicU64,
    /// Answers by class, indexed by [`AnswerClass`].
    pub answers: [AtomicU64; AnswerClass::ALL.len()],
    /// Time requests were held back by the rate limit or by throttling answers.
    pub throttled_time: wait_clock::WaitClock,
}

impl DeliveryStats {
    fn answered(&self, class: AnswerClass) {
        self.answers[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Answers received per class, in [`AnswerClass::ALL`] order.
    pub fn answer_counts(&self) -> Vec<(AnswerClass, u64)> {
        AnswerClass::ALL
            .iter()
            .map(|c| (*c, self.answers[*c as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// How the destination answered one request (the `status_class` label of
/// `backflow_destination_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerClass {
    /// The request was answered with per-record outcomes.
    Success,
    /// The batch was refused whole for its content (a 400-like answer).
    Rejected,
    /// The destination said it is throttling (429 and the like).
    Throttled,
    /// A transient failure: 5xx, a timeout, a lost connection.
    Error,
    /// A failure that stops the run (credentials rejected, table missing).
    Fatal,
}

impl AnswerClass {
    /// Every class, in index order.
    pub const ALL: [AnswerClass; 5] = [
        AnswerClass::Success,
        AnswerClass::Rejected,
        AnswerClass::Throttled,
        AnswerClass::Error,
        AnswerClass::Fatal,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AnswerClass::Success => "success",
            AnswerClass::Rejected => "rejected",
            AnswerClass::Throttled => "throttled",
            AnswerClass::Error => "error",
            AnswerClass::Fatal => "fatal",
        }
    }
}

/// A connector behind the shared layers.
pub struct Delivery {
    connector: Arc<dyn Connector>,
    limiter: Arc<RateLimiter>,
    config: DeliveryConfig,
    stats: Arc<DeliveryStats>,
    /// Requests in flight at the destination: `max_concurrency` permits, held only while a
    /// request is out, not while a batch waits out a retry backoff.
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Records per request from now on: the configured batch size, lowered for the rest of the
    /// run when the destination refuses a batch as too large and names its limit.
    batch_limit: AtomicUsize,
    /// The operations the connector supports, read once from its capabilities: a batch of
    /// any other is rejected here, never sent.
    operations: Vec<Operation>,
}

impl Delivery {
    /// Wraps a connector with its Destination's limiter and settings.
    pub fn new(connector: Arc<dyn Connector>, limiter: Arc<RateLimiter>, config: DeliveryConfig) -> Delivery {
        Delivery {
            operations: connector.capabilities().operations,
            connector,
            limiter,
            in_flight: Arc::new(tokio::sync::Semaphore::new(config.max_concurrency.max(1))),
            batch_limit: AtomicUsize::new(config.batch_size.max(1)),
            config,
            stats: Arc::new(DeliveryStats::default()),
        }
    }

    /// Lets the connector adapt to what this run will send ([`Connector::for_run`]): call
    /// once after planning, before the first batch. A connector chosen for the run brings its
    /// own batch size (`spec.batchSize` tunes the connector's ordinary requests); the limiter,
    /// concurrency and retry settings stay.
    pub fn prepare(&mut self, planned: &PlannedSends) {
        if let Some(connector) = self.connector.for_run(planned) {
            let capabilities = connector.capabilities();
            let batch_size = capabilities.max_batch_size.max(1);
            tracing::debug!(
                records = planned.total(),
                batch_size,
                "the connector chose another transport for this run"
            );
            self.config.batch_size = batch_size;
            self.batch_limit.store(batch_size, Ordering::Relaxed);
            self.operations = capabilities.operations;
            self.connector = connector;
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &DeliveryConfig {
        &self.config
    }

    /// Records per batch from now on: [`DeliveryConfig::batch_size`] until the destination
    /// refuses a batch as too large ([`SendError::TooLarge`]), its limit after that.
    pub fn batch_size(&self) -> usize {
        self.batch_limit.load(Ordering::Relaxed).max(1)
    }

    /// The connector's [`Connector::check_match`]: can it find records by `match_fields`?
    pub async fn check_match(&self, match_fields: &[String]) -> Result<(), SendError> {
        self.connector.check_match(match_fields).await
    }

    /// The connector's [`Connector::reads_fields`]: does it look inside the records' fields,
    /// or send them as their canonical JSON?
    pub fn reads_fields(&self) -> bool {
        self.connector.reads_fields()
    }

    /// True when the connector can carry out `operation` (its capabilities list it).
    pub fn supports(&self, operation: Operation) -> bool {
        self.operations.contains(&operation)
    }

    /// The counters of this delivery.
    pub fn stats(&self) -> &DeliveryStats {
        &self.stats
    }

    /// The counters of this delivery, to read while it sends (run progress).
    pub fn shared_stats(&self) -> Arc<DeliveryStats> {
        Arc::clone(&self.stats)
    }

    /// Sends a batch through split, retry and rate limit; one outcome per record (in no particular order).
    pub async fn send_batch(
        &self,
        operation: Operation,
        batch: Vec<Record>,
    ) -> Result<Vec<(Record, Delivered)>, FatalDeliveryError> {
        if !self.supports(operation) {
            let reason = unsupported(operation, &self.operations);
            return Ok(batch
                .into_iter()
                .map(|r| (r, Delivered::Rejected(reason.clone())))
                .collect());
        }
        let mut done = Vec::with_capacity(batch.len());
        let mut stack = vec![batch];
        while let Some(mut part) = stack.pop() {
            // A batch formed before the destination named a smaller limit is cut to it.
            let limit = self.batch_size();
            if part.len() > limit {
                let mut pieces = Vec::new();
                while part.len() > limit {
                    let rest = part.split_off(limit);
                    pieces.push(std::mem::replace(&mut part, rest));
                }
                pieces.push(part);
                stack.extend(pieces.into_iter().rev());
                continue;
            }
            let attempted = self.send_with_retry(operation, part).await?;
            done.extend(attempted.finished);
            if !attempted.oversize.is_empty() {
                stack.push(attempted.oversize);
            }
            if let Some((records, reason)) = attempted.refused {
                {
                    if records.len() == 1 {
                        done.extend(records.into_iter().map(|r| {
                            let reason = values::without_values(&reason, &r);
                            (r, Delivered::Rejected(reason))
                        }));
                    } else {
                        let mut first = records;
                        let second = first.split_off(first.len() / 2);
                        stack.push(second);
                        stack.push(first);
                    }
                }
            }
        }
        Ok(done)
    }

    async fn send_with_retry(
        &self,
        operation: Operation,
        batch: Vec<Record>,
    ) -> Result<Attempted, FatalDeliveryError> {
        let mut backoff = ExponentialBuilder::default()
            .with_min_delay(self.config.initial_backoff)
            .with_max_delay(self.config.max_backoff)
            .with_max_times(self.config.max_attempts.saturating_sub(1) as usize)
            .with_jitter()
            .build();
        let mut finished: Vec<(Record, Delivered)> = Vec::with_capacity(batch.len());
        let mut pending = batch;
        let mut first_attempt = true;
        loop {
            if !first_attempt {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            first_attempt = false;
            // The semaphore is never closed, so acquiring only fails if it were; then the
            // request goes out without a permit rather than never.
            let permit = self.in_flight.acquire().await.ok();
            // The destination may have named a smaller limit while this batch waited its turn.
            if pending.len() > self.batch_size() {
                return Ok(Attempted {
                    finished,
                    refused: None,
                    oversize: pending,
                });
            }
            self.stats.throttled_time.time(self.limiter.acquire()).await;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let context = report::Context {
                stats: Arc::clone(&self.stats),
                limiter: Arc::clone(&self.limiter),
            };
            let answer = report::scope(context, self.connector.send(operation, &pending)).await;
            drop(permit);
            // With the reason and wait of a retry, whether the answer said the destination is
            // throttling: waiting before the next attempt is then time spent throttled.
            let (retry_reason, retry_after, throttled_answer) = match answer {
                Ok(outcomes) => {
                    self.stats.answered(AnswerClass::Success);
                    if outcomes.len() != pending.len() {
                        return Err(FatalDeliveryError(format!(
                            "the destination answered {} outcomes for {} records",
                            outcomes.len(),
                            pending.len()
                        )));
                    }
                    let mut again = Vec::new();
                    let mut reason = String::new();
                    for (record, outcome) in pending.into_iter().zip(outcomes) {
                        match outcome {
                            RecordOutcome::Accepted => finished.push((record, Delivered::Accepted)),
                            RecordOutcome::Rejected(r) => {
                                let r = values::without_values(&r, &record);
                                finished.push((record, Delivered::Rejected(r)));
                            }
                            RecordOutcome::Retry(r) => {
                                reason = values::without_values(&r, &record);
                                again.push(record);
                            }
                        }
                    }
                    if again.is_empty() {
                        return Ok(Attempted {
                            finished,
                            refused: None,
                            oversize: Vec::new(),
                        });
                    }
                    pending = again;
                    (reason, None, false)
                }
                Err(SendError::Retryable {
                    reason,
                    retry_after,
                    throttled,
                }) => {
                    self.stats.answered(if throttled {
                        AnswerClass::Throttled
                    } else {
                        AnswerClass::Error
                    });
                    if throttled {
                        self.stats.throttled.fetch_add(1, Ordering::Relaxed);
                        self.limiter.pause_for(
                            retry_after
                                .unwrap_or(self.config.initial_backoff)
                                .min(MAX_RETRY_AFTER),
                            rate_limit::PauseCause::Throttled,
                        );
                    }
                    (reason, retry_after, throttled)
                }
                Err(SendError::BatchRejected(reason)) => {
                    self.stats.answered(AnswerClass::Rejected);
                    // Records settled by an earlier attempt keep their outcome; only the rest
                    // goes on to be split.
                    return Ok(Attempted {
                        finished,
                        refused: Some((pending, reason)),
                        oversize: Vec::new(),
                    });
                }
                Err(SendError::TooLarge { limit, reason }) => {
                    self.stats.answered(AnswerClass::Rejected);
                    if limit == 0 || limit >= pending.len() {
                        // The limit named does not explain the refusal: find the records at
                        // fault as for any batch refused whole.
                        return Ok(Attempted {
                            finished,
                            refused: Some((pending, reason)),
                            oversize: Vec::new(),
                        });
                    }
                    let before = self.batch_limit.fetch_min(limit, Ordering::Relaxed);
                    if before > limit {
                        tracing::info!(
                            batch_size = limit,
                            was = before,
                            reason = %reason,
                            "the destination takes fewer records per request; this run sends smaller batches"
                        );
                    }
                    return Ok(Attempted {
                        finished,
                        refused: None,
                        oversize: pending,
                    });
                }
                Err(SendError::Fatal(reason)) => {
                    self.stats.answered(AnswerClass::Fatal);
                    return Err(FatalDeliveryError(reason));
                }
            };
            match backoff.next() {
                Some(delay) => {
                    let wait = retry_after.map_or(delay, |ra| ra.min(MAX_RETRY_AFTER).max(delay));
                    tracing::debug!(records = pending.len(), wait_ms = wait.as_millis() as u64, reason = %retry_reason, "retrying");
                    if throttled_answer {
                        self.stats.throttled_time.time(tokio::time::sleep(wait)).await;
                    } else {
                        tokio::time::sleep(wait).await;
                    }
                }
                None => {
                    let reason = format!(
                        "{retry_reason} (gave up after {} attempts)",
                        self.config.max_attempts
                    );
                    finished.extend(pending.into_iter().map(|r| {
                        let reason = values::without_values(&reason, &r);
                        (r, Delivered::Failed(reason))
                    }));
                    return Ok(Attempted {
                        finished,
                        refused: None,
                        oversize: Vec::new(),
                    });
                }
            }
        }
    }
}

/// What one retried send came to: records with a final outcome, records the destination
/// refused as a whole (to be split), with its reason, and records of a batch refused for its
/// size (to be sent again in batches of the lowered size).
struct Attempted {
    finished: Vec<(Record, Delivered)>,
    refused: Option<(Vec<Record>, String)>,
    oversize: Vec<Record>,
}
