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

    /// Holds every sender back for `delay` (the destination said it is throttling).
    pub fn pause_for(&self, delay: Duration) {
        // The delay comes from a vendor's answer; one past what a clock holds is capped.
        let delay = delay.min(MAX_PAUSE);
        let Some(until) = Instant::now().checked_add(delay) else {
            return;
        };
        let mut guard = self.paused_until.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none_or(|t| t < until) {
            *guard = Some(until);
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
        limiter.pause_for(Duration::from_secs(3));
        let start = Instant::now();
        limiter.acquire().await;
        assert!(start.elapsed() >= Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_no_clock_can_hold_pauses_for_the_cap_without_overflowing() {
        let limiter = RateLimiter::new(1000.0, 100);
        limiter.pause_for(Duration::MAX);
        let start = Instant::now();
        limiter.acquire().await;
        assert_eq!(start.elapsed().as_secs(), MAX_PAUSE.as_secs());
    }
}
