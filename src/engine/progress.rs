//! How far a run has got while it goes on: counters the engine moves as it reads, plans and
//! delivers, which whoever shows progress samples at its own pace (the status writer every
//! few seconds, live metrics, a terminal bar).
//!
//! Every counter is an atomic the engine adds to or sets with relaxed ordering: no lock on
//! the row path, and a reader sees each counter as it was at some recent instant. Time
//! spent throttled comes from the delivery's own clock ([`WaitClock`]).
//!
//! [`WaitClock`]: crate::destination::delivery::wait_clock::WaitClock

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::time::Instant;

use super::plan::PlanCounts;
use crate::destination::delivery::{AnswerClass, DeliveryStats};

/// The step a run is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading the model's rows (and, with an in-memory plan, deciding each as it comes).
    Reading,
    /// Comparing the rows read with the stored fingerprints.
    Planning,
    /// Sending the planned records.
    Delivering,
    /// Committing the last checkpoint of state.
    Committing,
}

impl Phase {
    const ALL: [Phase; 4] = [
        Phase::Reading,
        Phase::Planning,
        Phase::Delivering,
        Phase::Committing,
    ];

    /// The name used in status (`status.progress.phase`).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Reading => "Reading",
            Phase::Planning => "Planning",
            Phase::Delivering => "Delivering",
            Phase::Committing => "Committing",
        }
    }
}

/// Marks "not delivering yet" in [`Progress::delivering_since`].
const NOT_YET: u64 = u64::MAX;

/// The live counters of one run. Cheap to update from the engine; [`Progress::snapshot`]
/// reads them all.
#[derive(Debug)]
pub struct Progress {
    started: DateTime<Utc>,
    clock: Instant,
    phase: AtomicU8,
    rows_read: AtomicU64,
    rows_planned: AtomicU64,
    rows_unchanged: AtomicU64,
    rows_rejected: AtomicU64,
    records_to_send: AtomicU64,
    accepted: AtomicU64,
    deleted: AtomicU64,
    rejected: AtomicU64,
    failed: AtomicU64,
    /// Milliseconds from `clock` to the start of delivery; [`NOT_YET`] before.
    delivering_since: AtomicU64,
    delivery: OnceLock<Arc<DeliveryStats>>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// Counters of a run starting now, in [`Phase::Reading`].
    pub fn new() -> Progress {
        Progress {
            started: Utc::now(),
            clock: Instant::now(),
            phase: AtomicU8::new(0),
            rows_read: AtomicU64::new(0),
            rows_planned: AtomicU64::new(0),
            rows_unchanged: AtomicU64::new(0),
            rows_rejected: AtomicU64::new(0),
            records_to_send: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            deleted: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivering_since: AtomicU64::new(NOT_YET),
            delivery: OnceLock::new(),
        }
    }

    /// Reads the delivery's counters (requests, answers, time throttled) from now on; the
    /// first delivery attached is the run's.
    pub fn attach_delivery(&self, stats: Arc<DeliveryStats>) {
        let _ = self.delivery.set(stats);
    }

    /// The run entered `phase`.
    pub fn set_phase(&self, phase: Phase) {
        let index = Phase::ALL.iter().position(|p| *p == phase).unwrap_or(0);
        // Four phases fit a byte.
        self.phase.store(index as u8, Ordering::Relaxed);
    }

    /// One more row read from the model.
    pub fn row_read(&self) {
        self.rows_read.fetch_add(1, Ordering::Relaxed);
    }

    /// The planner decided one more row (sent, left alone or rejected).
    pub fn row_planned(&self) {
        self.rows_planned.fetch_add(1, Ordering::Relaxed);
    }

    /// The planner rejected one more row (it is also planned).
    pub fn row_rejected(&self) {
        self.rows_rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// The plan is complete: its counts replace the running ones (a store-side diff decides
    /// every row at once, and duplicated keys are only known at the end).
    pub fn planned(&self, counts: &PlanCounts) {
        self.rows_planned.store(counts.rows_in_model, Ordering::Relaxed);
        self.rows_unchanged.store(counts.unchanged, Ordering::Relaxed);
        self.rows_rejected.store(counts.rejected, Ordering::Relaxed);
    }

    /// Delivery starts with `records` to send.
    pub fn delivering(&self, records: u64) {
        self.records_to_send.store(records, Ordering::Relaxed);
        let since = u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(NOT_YET - 1);
        self.delivering_since.store(since, Ordering::Relaxed);
        self.set_phase(Phase::Delivering);
    }

    /// What the destination settled so far, in total: records accepted, deleted, rejected,
    /// and failed after every retry.
    pub fn delivered(&self, accepted: u64, deleted: u64, rejected: u64, failed: u64) {
        self.accepted.store(accepted, Ordering::Relaxed);
        self.deleted.store(deleted, Ordering::Relaxed);
        self.rejected.store(rejected, Ordering::Relaxed);
        self.failed.store(failed, Ordering::Relaxed);
    }

    /// Every counter as it stands.
    pub fn snapshot(&self) -> Snapshot {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let phase = Phase::ALL
            .get(usize::from(self.phase.load(Ordering::Relaxed)))
            .copied()
            .unwrap_or(Phase::Reading);
        let since = load(&self.delivering_since);
        let delivering_for =
            (since != NOT_YET).then(|| self.clock.elapsed().saturating_sub(Duration::from_millis(since)));
        let delivery = self.delivery.get();
        Snapshot {
            started: self.started,
            phase,
            rows_read: load(&self.rows_read),
            rows_planned: load(&self.rows_planned),
            rows_unchanged: load(&self.rows_unchanged),
            rows_rejected: load(&self.rows_rejected),
            records_to_send: load(&self.records_to_send),
            accepted: load(&self.accepted),
            deleted: load(&self.deleted),
            rejected: load(&self.rejected),
            failed: load(&self.failed),
            throttled_answers: delivery.map_or(0, |d| d.throttled.load(Ordering::Relaxed)),
            answers: delivery.map_or_else(Vec::new, |d| d.answer_counts()),
            throttled_time: delivery.map_or(Duration::ZERO, |d| d.throttled_time.total()),
            delivering_for,
        }
    }
}

/// The counters of a run at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// When the run started.
    pub started: DateTime<Utc>,
    /// The step it is in.
    pub phase: Phase,
    /// Rows read from the model.
    pub rows_read: u64,
    /// Rows the plan has decided.
    pub rows_planned: u64,
    /// Rows left alone because nothing changed (known once the plan is complete).
    pub rows_unchanged: u64,
    /// Rows the planner rejected.
    pub rows_rejected: u64,
    /// Records the plan sends (writes and deletes).
    pub records_to_send: u64,
    /// Records written that the destination accepted.
    pub accepted: u64,
    /// Records the destination deleted.
    pub deleted: u64,
    /// Records the destination rejected.
    pub rejected: u64,
    /// Records that failed after every retry.
    pub failed: u64,
    /// Throttling answers received.
    pub throttled_answers: u64,
    /// The destination's answers by class.
    pub answers: Vec<(AnswerClass, u64)>,
    /// Time the delivery was held back by the rate limit or throttling answers.
    pub throttled_time: Duration,
    /// How long delivery has been going on; `None` before it started.
    pub delivering_for: Option<Duration>,
}

impl Snapshot {
    /// Records the destination has settled: accepted, deleted, rejected or failed.
    pub fn records_sent(&self) -> u64 {
        self.accepted
            .saturating_add(self.deleted)
            .saturating_add(self.rejected)
            .saturating_add(self.failed)
    }

    /// Records the destination accepted, deletes included.
    pub fn records_accepted(&self) -> u64 {
        self.accepted.saturating_add(self.deleted)
    }

    /// The share of the records to send that are settled, 0 to 1 (0 before delivery).
    pub fn ratio(&self) -> f64 {
        if self.records_to_send == 0 {
            return if self.phase == Phase::Committing { 1.0 } else { 0.0 };
        }
        (self.records_sent() as f64 / self.records_to_send as f64).clamp(0.0, 1.0)
    }

    /// Seconds until the records left are sent at the rate seen so far; `None` until it can
    /// be told (see [`estimate_seconds_left`]).
    pub fn estimated_seconds_left(&self) -> Option<u64> {
        estimate_seconds_left(self.records_to_send, self.records_sent(), self.delivering_for?)
    }
}

/// Delivery shorter than this gives no estimate: the first answers say little of the rate.
pub const MIN_ESTIMATE_TIME: Duration = Duration::from_secs(1);

/// Seconds left to send `to_send` records when `sent` of them took `elapsed`, at that rate,
/// rounded up. `None` until something was sent over at least [`MIN_ESTIMATE_TIME`]; 0 once
/// everything is.
pub fn estimate_seconds_left(to_send: u64, sent: u64, elapsed: Duration) -> Option<u64> {
    let left = to_send.saturating_sub(sent);
    if left == 0 {
        return Some(0);
    }
    if sent == 0 || elapsed < MIN_ESTIMATE_TIME {
        return None;
    }
    let seconds = elapsed.as_secs_f64() * left as f64 / sent as f64;
    // A float past u64's range (an absurdly slow start) saturates in the cast.
    Some(seconds.ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_follows_the_rate_so_far_and_waits_for_a_first_answer() {
        let s = Duration::from_secs;
        // 250 of 1000 in 10 s: 750 more at 25/s.
        assert_eq!(estimate_seconds_left(1000, 250, s(10)), Some(30));
        // Rounded up: 1 left at 3 per 2 s.
        assert_eq!(estimate_seconds_left(4, 3, s(2)), Some(1));
        assert_eq!(estimate_seconds_left(1000, 0, s(60)), None, "nothing sent yet");
        assert_eq!(
            estimate_seconds_left(1000, 10, Duration::from_millis(300)),
            None,
            "too early to tell"
        );
        assert_eq!(estimate_seconds_left(1000, 1000, s(5)), Some(0));
        assert_eq!(estimate_seconds_left(0, 0, Duration::ZERO), Some(0));
        // More settled than planned (a split batch) still says done, never underflows.
        assert_eq!(estimate_seconds_left(10, 12, s(5)), Some(0));
        assert_eq!(
            estimate_seconds_left(u64::MAX, 1, s(3600)),
            Some(u64::MAX),
            "saturates"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_reads_the_counters_and_estimates_from_the_delivery_time() {
        let p = Progress::new();
        assert_eq!(p.snapshot().phase, Phase::Reading);
        for _ in 0..5 {
            p.row_read();
            p.row_planned();
        }
        p.row_rejected();
        p.set_phase(Phase::Planning);
        let s = p.snapshot();
        assert_eq!(
            (s.phase, s.rows_read, s.rows_planned, s.rows_rejected),
            (Phase::Planning, 5, 5, 1)
        );
        assert_eq!((s.estimated_seconds_left(), s.ratio()), (None, 0.0));

        p.planned(&PlanCounts {
            rows_in_model: 5,
            added: 4,
            unchanged: 0,
            rejected: 1,
            ..PlanCounts::default()
        });
        p.delivering(4);
        tokio::time::advance(Duration::from_secs(4)).await;
        p.delivered(1, 0, 1, 0);
        let s = p.snapshot();
        assert_eq!(s.phase, Phase::Delivering);
        assert_eq!((s.records_sent(), s.records_accepted()), (2, 1));
        assert_eq!(s.ratio(), 0.5);
        // 2 records in 4 s: 2 more take 4 s.
        assert_eq!(s.estimated_seconds_left(), Some(4));
        assert_eq!(s.throttled_time, Duration::ZERO, "no delivery attached");

        let stats = Arc::new(DeliveryStats::default());
        p.attach_delivery(Arc::clone(&stats));
        stats
            .throttled_time
            .time(tokio::time::sleep(Duration::from_secs(3)))
            .await;
        assert_eq!(p.snapshot().throttled_time, Duration::from_secs(3));
    }
}
