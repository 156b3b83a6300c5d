//! How long a delivery was held back by throttling: the wall-clock time during which at least
//! one of its requests waited for the rate limiter (a token, or a pause a throttling answer
//! imposed) or waited out a throttling answer before sending again.
//!
//! Concurrent waits overlap and count once, so the total never exceeds the run's own length:
//! four requests held back together for ten seconds make ten seconds, not forty. The clock
//! takes a short lock when a wait starts and ends (once per request, never per record).

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Wall-clock time during which at least one wait was under way.
#[derive(Debug, Default)]
pub struct WaitClock {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Waits under way now.
    waiting: usize,
    /// When the current stretch of waiting started (some wait under way).
    since: Option<Instant>,
    /// Time of the stretches that ended.
    total: Duration,
}

impl WaitClock {
    /// Runs `wait` and counts its time (a wait cancelled half-way counts up to then).
    pub async fn time<F: Future>(&self, wait: F) -> F::Output {
        let _waiting = self.start();
        wait.await
    }

    /// Time spent waiting so far, the stretch under way included.
    pub fn total(&self) -> Duration {
        let state = self.lock();
        match state.since {
            Some(since) => state.total.saturating_add(since.elapsed()),
            None => state.total,
        }
    }

    fn start(&self) -> Waiting<'_> {
        let mut state = self.lock();
        state.waiting += 1;
        if state.since.is_none() {
            state.since = Some(Instant::now());
        }
        Waiting { clock: self }
    }

    fn end(&self) {
        let mut state = self.lock();
        state.waiting = state.waiting.saturating_sub(1);
        if state.waiting == 0
            && let Some(since) = state.since.take()
        {
            state.total = state.total.saturating_add(since.elapsed());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state holds plain numbers that every update leaves consistent: a panic while
        // it was held leaves nothing half-written.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One wait under way; its end is counted when dropped.
struct Waiting<'a> {
    clock: &'a WaitClock,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.clock.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn overlapping_waits_count_once_and_a_wait_under_way_counts_so_far() {
        let clock = WaitClock::default();
        let sleep = |secs| tokio::time::sleep(Duration::from_secs(secs));
        // Two waits of 10 s and 4 s side by side: 10 s of waiting.
        tokio::join!(clock.time(sleep(10)), clock.time(sleep(4)));
        assert_eq!(clock.total(), Duration::from_secs(10));
        // Time with nothing waiting does not count.
        sleep(7).await;
        assert_eq!(clock.total(), Duration::from_secs(10));
        // A wait still under way counts up to now.
        let mut long = Box::pin(clock.time(sleep(60)));
        let _ = tokio::time::timeout(Duration::from_secs(3), &mut long).await;
        assert_eq!(clock.total(), Duration::from_secs(13));
        // A wait dropped before its end (a cancelled run) stops counting.
        drop(long);
        sleep(5).await;
        assert_eq!(clock.total(), Duration::from_secs(13));
    }
}
