//! What a connector tells the delivery from inside one `send`: a request it repeated on its
//! own (a new access token, a poll of a running job tried again) and a throttling answer it
//! waited out itself. Both count in the run's `retries` and `throttled`, and a throttle pauses
//! every sender of the Destination, as it does when the connector hands it back as
//! [`SendError::Retryable`](crate::destination::SendError::Retryable). A connector that makes
//! several calls per `send` (a Salesforce Bulk API job) also waits out, before each call, a
//! pause another sender's throttle imposed.
//!
//! The delivery sets the context around each `send` (a task-local value, as `tracing` keeps its
//! current span); outside one (a connection check, a connector's unit test) every function
//! here does nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::rate_limit::{PauseCause, RateLimiter};
use super::{AnswerClass, DeliveryStats, MAX_RETRY_AFTER};

/// The counters and the limiter of the delivery a `send` runs under.
#[derive(Clone)]
pub(super) struct Context {
    pub(super) stats: Arc<DeliveryStats>,
    pub(super) limiter: Arc<RateLimiter>,
}

tokio::task_local! {
    static CONTEXT: Context;
}

/// Runs `future` (one `send`) with `context` as its delivery's.
pub(super) async fn scope<F: std::future::Future>(context: Context, future: F) -> F::Output {
    CONTEXT.scope(context, future).await
}

/// The connector repeated a request on its own (counted in `retries`).
pub fn retried() {
    let _ = CONTEXT.try_with(|c| c.stats.retries.fetch_add(1, Ordering::Relaxed));
}

/// The destination said it is throttling and the connector waits `wait` before calling again:
/// counted in `throttled` (and as a throttled answer), and every sender of the Destination is
/// held back as long (at most five minutes).
pub fn throttled(wait: Duration) {
    let _ = CONTEXT.try_with(|c| {
        c.stats.throttled.fetch_add(1, Ordering::Relaxed);
        c.stats.answered(AnswerClass::Throttled);
        c.limiter
            .pause_for(wait.min(MAX_RETRY_AFTER), PauseCause::Throttled);
    });
}

/// The destination said its rate-limit window is used up (a remaining count of 0) without
/// refusing anything yet: every sender of the Destination is held back for `wait` (at most
/// five minutes), nothing is counted.
pub fn hold_back(wait: Duration) {
    let _ = CONTEXT.try_with(|c| {
        c.limiter
            .pause_for(wait.min(MAX_RETRY_AFTER), PauseCause::WindowUsedUp)
    });
}

/// Waits out a pause a throttle imposed on the Destination (takes no token).
pub async fn pause_over() {
    let context = CONTEXT.try_with(Clone::clone).ok();
    if let Some(c) = context {
        c.stats.throttled_time.time(c.limiter.wait_out_pause()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn reports_inside_a_send_count_and_pause_and_outside_do_nothing() {
        let stats = Arc::new(DeliveryStats::default());
        let limiter = Arc::new(RateLimiter::new(1000.0, 100));
        retried();
        throttled(Duration::from_secs(9));
        assert_eq!(stats.retries.load(Ordering::Relaxed), 0);
        let context = Context {
            stats: Arc::clone(&stats),
            limiter: Arc::clone(&limiter),
        };
        scope(context, async {
            retried();
            throttled(Duration::from_secs(3));
        })
        .await;
        assert_eq!(stats.retries.load(Ordering::Relaxed), 1);
        assert_eq!(stats.throttled.load(Ordering::Relaxed), 1);
        let start = tokio::time::Instant::now();
        limiter.acquire().await;
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "the pause holds every sender"
        );
    }
}
