//! A scripted in-memory connector for engine and delivery tests.
//!
//! It records every call, answers from a script of whole-batch results, rejects records whose
//! key is in a "bad" set (as a per-record rejection or by refusing the whole batch), and keeps
//! the records it accepted like a destination would. It reproduces no vendor; the vendor
//! doubles live in their own modules.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use backflow::destination::{Capabilities, Connector, PlannedSends, RecordOutcome, SendError};
use backflow::model::record::{Operation, Record};

/// How the fake treats records whose key is in the bad set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRecords {
    /// One per-record rejection each; the rest of the batch lands.
    RejectEach,
    /// The whole batch is refused (like a 400 for one invalid record).
    RefuseBatch,
}

/// A scripted connector.
pub struct FakeConnector {
    /// Records per batch the fake accepts.
    pub max_batch: usize,
    script: Mutex<VecDeque<Result<(), SendError>>>,
    bad: BTreeSet<String>,
    bad_mode: BadRecords,
    /// Every call: operation and keys.
    pub calls: Mutex<Vec<(Operation, Vec<String>)>>,
    /// Accepted records by key: the last fields written (deleted ones removed).
    pub store: Mutex<BTreeMap<String, String>>,
    /// Delay per call.
    pub delay: Duration,
    /// What each run said it would send (`Connector::for_run`), with the calls made before.
    pub planned: Mutex<Vec<(PlannedSends, usize)>>,
}

impl FakeConnector {
    /// A fake that accepts everything.
    pub fn new(max_batch: usize) -> FakeConnector {
        FakeConnector {
            max_batch,
            script: Mutex::new(VecDeque::new()),
            bad: BTreeSet::new(),
            bad_mode: BadRecords::RejectEach,
            calls: Mutex::new(Vec::new()),
            store: Mutex::new(BTreeMap::new()),
            delay: Duration::ZERO,
            planned: Mutex::new(Vec::new()),
        }
    }

    /// Answers the next calls with these whole-batch results, then accepts as usual.
    pub fn with_script(self, script: Vec<Result<(), SendError>>) -> Self {
        *self.script.lock().unwrap() = script.into();
        self
    }

    /// Treats these keys as invalid records.
    pub fn with_bad(mut self, keys: &[&str], mode: BadRecords) -> Self {
        self.bad = keys.iter().map(|k| k.to_string()).collect();
        self.bad_mode = mode;
        self
    }

    /// Number of calls so far.
    pub fn call_count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// Keys sent so far, in call order.
    pub fn sent_keys(&self) -> Vec<String> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, k)| k.clone())
            .collect()
    }
}

#[async_trait]
impl Connector for FakeConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: self.max_batch,
            operations: vec![
                Operation::Upsert,
                Operation::Update,
                Operation::Insert,
                Operation::Delete,
            ],
            default_requests_per_second: 1000.0,
            default_concurrency: 2,
        }
    }

    async fn check(&self) -> Result<(), SendError> {
        Ok(())
    }

    fn for_run(&self, planned: &PlannedSends) -> Option<std::sync::Arc<dyn Connector>> {
        let calls = self.call_count();
        self.planned.lock().unwrap().push((planned.clone(), calls));
        None
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        assert!(
            batch.len() <= self.max_batch,
            "batch of {} over the limit {}",
            batch.len(),
            self.max_batch
        );
        self.calls
            .lock()
            .unwrap()
            .push((operation, batch.iter().map(|r| r.key.clone()).collect()));
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if let Some(scripted) = self.script.lock().unwrap().pop_front() {
            scripted?;
        }
        if self.bad_mode == BadRecords::RefuseBatch && batch.iter().any(|r| self.bad.contains(&r.key)) {
            return Err(SendError::BatchRejected("invalid record in batch".into()));
        }
        let mut store = self.store.lock().unwrap();
        Ok(batch
            .iter()
            .map(|r| {
                if self.bad.contains(&r.key) {
                    return RecordOutcome::Rejected(format!("record {} is invalid", r.key));
                }
                match operation {
                    Operation::Delete => {
                        store.remove(&r.key);
                    }
                    _ => {
                        let body =
                            String::from_utf8(backflow::model::value::canonical_bytes(&r.fields)).unwrap();
                        store.insert(r.key.clone(), body);
                    }
                }
                RecordOutcome::Accepted
            })
            .collect())
    }
}

/// Delivery into `fake` at its batch size, with up to `max_attempts` attempts, millisecond
/// retry waits and a limiter far above what a test sends.
pub fn fast_delivery(
    fake: Arc<FakeConnector>,
    max_attempts: u32,
) -> backflow::destination::delivery::Delivery {
    use backflow::destination::delivery::rate_limit::RateLimiter;
    use backflow::destination::delivery::{Delivery, DeliveryConfig};
    let config = DeliveryConfig {
        max_batch_bytes: backflow::destination::delivery::DEFAULT_MAX_BATCH_BYTES,
        batch_size: fake.max_batch,
        max_concurrency: 2,
        max_attempts,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        requests_per_second: 100_000.0,
        burst: 100_000,
    };
    Delivery::new(fake, Arc::new(RateLimiter::new(100_000.0, 100_000)), config)
}

/// A connector that panics, for tests of panic containment: in its connection check or in
/// its sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panicking {
    /// `check` panics (a Destination's reconcile, a run's setup).
    InCheck,
    /// `send` panics (inside a run).
    InSend,
}

#[async_trait]
impl Connector for Panicking {
    fn capabilities(&self) -> Capabilities {
        FakeConnector::new(100).capabilities()
    }

    async fn check(&self) -> Result<(), SendError> {
        if *self == Panicking::InCheck {
            // What an unchecked addition of a vendor's reset header used to do.
            let reset: u64 = "18446744073709551615".parse().unwrap();
            let _ = std::time::UNIX_EPOCH + Duration::from_secs(reset);
        }
        Ok(())
    }

    async fn send(&self, _operation: Operation, _batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        panic!("the test connector panics in send");
    }
}
