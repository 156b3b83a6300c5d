//! One token bucket per Destination, shared by every sync that sends to it, with a pause that
//! a throttling answer (429, `Retry-After`) imposes on all of them at once.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota};
use tokio::time::Instant;

/// Longest pause a throttling answer imposes (the retry layer caps `Retry-After` lower still).
const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// Why senders pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// A throttling answer (429 and the like), with or without `Retry-After`.
    Throttled,
    /// The destination said its rate-limit window is used up, refusing nothing yet.
    WindowUsedUp,
}

impl PauseCause {
    /// The name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Throttled => "throttled",
            PauseCause::WindowUsedUp => "window_used_up",
        }
    }
}

/// A destination's rate limit: `governor`'s GCRA token bucket plus a shared pause.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: DefaultDirectRateLimiter,
    requests_per_second: f64,
    burst: u32,
    paused_until: Mutex<Option<Instant>>,
}

impl RateLimiter {
    /// A bucket refilling at `requests_per_second` that holds `burst` requests.
    pub fn new(requests_per_second: f64, burst: u32) -> RateLimiter {
        let burst_nz = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs_f64(1.0 / requests_per_second.max(0.001));
        // A zero period would mean no limit; governor rejects it, so clamp to a nanosecond.
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst_nz);
        RateLimiter {
            bucket: DefaultDirectRateLimiter::direct(quota),
            requests_per_second,
            burst,
            paused_until: Mutex::new(None),
        }
    }

    /// Waits until a request may be sent: after any pause, then for a token.
    pub async fn acquire(&self) {
        self.wait_out_pause().await;
        self.bucket.until_ready().await;
    }

    /// Waits until no pause holds senders back, taking no token (a follow-up call of a request
    /// that already took one, like a poll of a running job).
    pub async fn wait_out_pause(&self) {
        loop {
            let until = *self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => break,
            }
        }
    }

    /// Holds every sender back for `delay` because of `cause` (the destination said it is
    /// throttling, or that its window is used up). A pause that begins is logged at info, once:
    /// answers that extend a pause in effect are not.
    pub fn pause_for(&self, delay: Duration, cause: PauseCause) {
        // The delay comes from a vendor's answer; one past what a clock holds is capped.
        let delay = delay.min(MAX_PAUSE);
        let now = Instant::now();
        let Some(until) = now.checked_add(delay) else {
            return;
        };
        let mut guard = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        let in_effect = guard.is_some_and(|t| t > now);
        if guard.is_none_or(|t| t < until) {
            *guard = Some(until);
        }
        drop(guard);
        if !in_effect {
            tracing::info!(
                wait_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                cause = cause.as_str(),
                "destination rate limit: every sender to it pauses"
            );
        }
    }

    fn same_quota(&self, requests_per_second: f64, burst: u32) -> bool {
        (self.requests_per_second - requests_per_second).abs() < f64::EPSILON && self.burst == burst
    }
}

/// The process-wide registry of limiters, keyed by destination (`namespace/name`).
#[derive(Debug, Default)]
pub struct Limiters {
    by_destination: Mutex<HashMap<String, Arc<RateLimiter>>>,
}

impl Limiters {
    /// The limiter of a destination; a new quota replaces the old limiter.
    pub fn get(&self, destination: &str, requests_per_second: f64, burst: u32) -> Arc<RateLimiter> {
        let mut map = self.by_destination.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(destination) {
            Some(l) if l.same_quota(requests_per_second, burst) => Arc::clone(l),
            _ => {
                let l = Arc::new(RateLimiter::new(requests_per_second, burst));
                map.insert(destination.to_owned(), Arc::clone(&l));
                l
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_of_one_destination_share_a_limiter_and_a_new_quota_replaces_it() {
        let limiters = Limiters::default();
        let a = limiters.get("ns/crm", 10.0, 10);
        let b = limiters.get("ns/crm", 10.0, 10);
        assert!(Arc::ptr_eq(&a, &b));
        let c = limiters.get("ns/crm", 5.0, 10);
        assert!(!Arc::ptr_eq(&a, &c));
        assert!(!Arc::ptr_eq(&c, &limiters.get("ns/other", 5.0, 10)));
    }

    #[tokio::test]
    async fn the_bucket_lets_a_burst_through_then_paces_requests() {
        let limiter = RateLimiter::new(20.0, 5);
        let start = std::time::Instant::now();
        for _ in 0..5 {
            limiter.acquire().await;
        }
        // Five tokens at 20/s would take 200 ms; a burst takes none (slack for a busy machine).
        assert!(
            start.elapsed() < Duration::from_millis(120),
            "the burst should not wait"
        );
        for _ in 0..4 {
            limiter.acquire().await;
        }
        // Four more tokens at 20/s need at least ~150 ms (one token period of slack).
        assert!(
            start.elapsed() >= Duration::from_millis(150),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_sender_back() {
        let limiter = RateLimiter::new(1000.0, 100);
        limiter.pause_for(Duration::from_secs(3), PauseCause::Throttled);
        let start = Instant::now();
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    /// Log lines written while `f` runs, at info and above.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_is_logged_once_at_info_with_its_wait_and_answers_that_extend_it_are_not() {
        let limiter = RateLimiter::new(1000.0, 100);
        let log = logged(|| {
            limiter.pause_for(Duration::from_secs(2), PauseCause::Throttled);
            limiter.pause_for(Duration::from_secs(3), PauseCause::Throttled);
        });
        assert_eq!(log.matches("every sender to it pauses").count(), 1, "{log}");
        assert!(
            log.contains("INFO") && log.contains("wait_ms=2000") && log.contains("cause=\"throttled\""),
            "{log}"
        );
        limiter.acquire().await;
        let log = logged(|| limiter.pause_for(Duration::from_millis(500), PauseCause::WindowUsedUp));
        assert!(
            log.contains("wait_ms=500") && log.contains("window_used_up"),
            "a new pause after the last: {log}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_no_clock_can_hold_pauses_for_the_cap_without_overflowing() {
        let limiter = RateLimiter::new(1000.0, 100);
        limiter.pause_for(Duration::MAX, PauseCause::Throttled);
        let start = Instant::now();
        limiter.acquire().await;
        assert_eq!(start.elapsed().as_secs(), MAX_PAUSE.as_secs());
    }
}
