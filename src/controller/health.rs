//! What `/readyz` and `/healthz` answer, from the controllers' own state.
//!
//! - Ready: a standby replica waiting for the leader lease (so rolling updates go on), or a
//!   replica whose every watch finished its first list (the caches are synced).
//! - Live: no controller loop stopped while the operator was not shutting down, and no watch
//!   has failed without a break for longer than [`WATCH_FAILURE_LIMIT`] (a wedged replica the
//!   kubelet should restart; a watch that failed and then resumed quietly is live).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a watch may keep failing before the replica reports itself not live.
pub const WATCH_FAILURE_LIMIT: Duration = Duration::from_secs(300);

/// A watch still failing has an error at most this old (watches retry every 5 s at most).
const STILL_FAILING: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct WatchState {
    synced: bool,
    failing_since: Option<Instant>,
    last_error: Option<(Instant, String)>,
}

#[derive(Debug, Default)]
struct State {
    standby: bool,
    stopping: bool,
    watches: BTreeMap<String, WatchState>,
    stopped: Vec<String>,
}

/// Liveness and readiness, shared by the controllers and the HTTP port.
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State>>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain flags that are still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This replica waits for the leader lease (`true`) or holds it (`false`).
    pub fn set_standby(&self, standby: bool) {
        self.lock().standby = standby;
    }

    /// The controllers are stopping (shutdown or lost lease): not ready any more.
    pub fn set_stopping(&self) {
        self.lock().stopping = true;
    }

    /// A watch started; readiness waits for its first list.
    pub fn watch_started(&self, name: &str) {
        self.lock().watches.entry(name.to_owned()).or_default();
    }

    /// A watch finished its (re)list. True when it was failing.
    pub fn watch_synced(&self, name: &str) -> bool {
        let mut state = self.lock();
        let watch = state.watches.entry(name.to_owned()).or_default();
        watch.synced = true;
        watch.failing_since.take().is_some()
    }

    /// A watch delivered an event. True when it was failing.
    pub fn watch_ok(&self, name: &str) -> bool {
        self.lock()
            .watches
            .get_mut(name)
            .is_some_and(|watch| watch.failing_since.take().is_some())
    }

    /// A watch failed (it retries by itself). True when this starts a run of failures or the
    /// error changed, so the caller logs it loudly once rather than at every retry.
    pub fn watch_failed(&self, name: &str, error: &str) -> bool {
        let now = Instant::now();
        let error: String = error.chars().take(300).collect();
        let mut state = self.lock();
        let watch = state.watches.entry(name.to_owned()).or_default();
        let new =
            watch.failing_since.is_none() || watch.last_error.as_ref().is_none_or(|(_, last)| *last != error);
        watch.failing_since.get_or_insert(now);
        watch.last_error = Some((now, error));
        new
    }

    /// A controller loop ended.
    pub fn controller_stopped(&self, name: &str) {
        let mut state = self.lock();
        if !state.stopping {
            state.stopped.push(name.to_owned());
        }
    }

    /// `Ok(message)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<String, String> {
        let state = self.lock();
        if state.stopping {
            return Err("not ready: the controllers are stopping".to_owned());
        }
        if state.standby {
            return Ok("ready: standby, waiting for the leader lease".to_owned());
        }
        if state.watches.is_empty() {
            return Err("not ready: the controllers are starting".to_owned());
        }
        let syncing: Vec<&str> = state
            .watches
            .iter()
            .filter(|(_, w)| !w.synced)
            .map(|(n, _)| n.as_str())
            .collect();
        if syncing.is_empty() {
            Ok(format!("ready: {} watches synced", state.watches.len()))
        } else {
            Err(format!("not ready: caches syncing: {}", syncing.join(", ")))
        }
    }

    /// True when ready.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// `Ok(message)` when live, `Err(why not)` otherwise.
    pub fn liveness(&self) -> Result<String, String> {
        self.liveness_at(Instant::now())
    }

    fn liveness_at(&self, now: Instant) -> Result<String, String> {
        let state = self.lock();
        if !state.stopped.is_empty() {
            return Err(format!(
                "not live: controller loop stopped: {}",
                state.stopped.join(", ")
            ));
        }
        let failing: Vec<String> = state
            .watches
            .iter()
            .filter_map(|(name, w)| {
                let since = w.failing_since?;
                let (at, error) = w.last_error.as_ref()?;
                let long = now.saturating_duration_since(since) > WATCH_FAILURE_LIMIT;
                let recent = now.saturating_duration_since(*at) < STILL_FAILING;
                (long && recent).then(|| {
                    format!(
                        "{name} failing for {}s: {error}",
                        now.saturating_duration_since(since).as_secs()
                    )
                })
            })
            .collect();
        if failing.is_empty() {
            Ok("ok".to_owned())
        } else {
            Err(format!("not live: watches failing: {}", failing.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_once_every_watch_listed_or_while_standing_by() {
        let h = Health::default();
        assert!(h.readiness().is_err(), "nothing started yet");
        h.set_standby(true);
        assert!(h.is_ready(), "a standby is ready");
        h.set_standby(false);
        h.watch_started("ReverseSync");
        h.watch_started("Destination");
        h.watch_synced("ReverseSync");
        let why = h.readiness().unwrap_err();
        assert!(
            why.contains("Destination") && !why.contains("ReverseSync"),
            "{why}"
        );
        h.watch_synced("Destination");
        assert!(h.is_ready());
        h.watch_failed("Destination", "connection refused");
        assert!(h.is_ready(), "a relisting watch keeps its cache");
        h.set_stopping();
        assert!(h.readiness().is_err());
    }

    #[test]
    fn a_stopped_loop_or_a_watch_failing_for_minutes_is_not_live() {
        let h = Health::default();
        h.watch_started("Secret");
        h.watch_failed("Secret", "403 forbidden");
        let start = Instant::now();
        assert!(h.liveness_at(start).is_ok(), "a fresh failure is retried");
        let later = start + WATCH_FAILURE_LIMIT + Duration::from_secs(1);
        assert!(h.liveness_at(later).is_ok(), "no error since: it resumed quietly");
        h.state
            .lock()
            .unwrap()
            .watches
            .get_mut("Secret")
            .unwrap()
            .last_error = Some((later, "403 forbidden".into()));
        let why = h.liveness_at(later).unwrap_err();
        assert!(why.contains("Secret") && why.contains("403"), "{why}");
        h.watch_ok("Secret");
        assert!(h.liveness_at(later).is_ok());

        h.controller_stopped("ReverseSync");
        assert!(h.liveness().unwrap_err().contains("ReverseSync"));
        let h = Health::default();
        h.set_stopping();
        h.controller_stopped("ReverseSync");
        assert!(h.liveness().is_ok(), "stopping on shutdown is expected");
    }
}
