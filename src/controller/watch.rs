//! The controllers' watches. Each watch has its own backoff and reports to [`Health`]: when its
//! first list completed (readiness) and whether it keeps failing (liveness).
//!
//! kube's `Controller::new(...).owns(...).watches(...)` merges every watch into one stream
//! behind one backoff: one failing watch (an API server that restarted with an empty watch
//! cache, a `410 Gone` after etcd compaction, a watch RBAC forbids) paused all of them, up to
//! 30 s per error, and after an outage of a few minutes the controllers took minutes to see
//! new objects. Here each watch retries alone, quickly, and its errors never reach the
//! controller: it is logged and counted instead.
//!
//! Lists use `ListSemantic::MostRecent` (no `resourceVersion`): a quorum read from etcd, never
//! from the API server's watch cache, which is empty or behind right after that server
//! restarted. The watch then resumes from the list's resourceVersion; a `410 Gone` (the
//! version was compacted away) starts over with a fresh list.

use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, ListSemantic};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

use super::api_server;
use super::health::Health;

/// First wait after a watch error.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// Longest wait between two attempts of one watch (kube's default is 30 s, shared by every
/// watch of a controller).
const MAX_RETRY: Duration = Duration::from_secs(5);

/// The watch settings of every controller watch: paged lists read from etcd.
pub fn config() -> watcher::Config {
    watcher::Config::default().list_semantic(ListSemantic::MostRecent)
}

/// Exponential backoff with jitter from `FIRST_RETRY` to `MAX_RETRY`, reset by any
/// successful event.
pub struct WatchBackoff {
    builder: backon::ExponentialBuilder,
    inner: backon::ExponentialBackoff,
}

impl Default for WatchBackoff {
    fn default() -> Self {
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(FIRST_RETRY)
            .with_max_delay(MAX_RETRY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        WatchBackoff {
            inner: backon::BackoffBuilder::build(builder),
            builder,
        }
    }
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        self.inner.next()
    }
}

impl Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.inner = backon::BackoffBuilder::build(self.builder);
    }
}

/// The events of one watch of `api`, errors retried with [`WatchBackoff`], logged and reported
/// to `health` under `name`; the stream itself never yields an error.
pub fn events<K>(
    api: Api<K>,
    config: watcher::Config,
    name: String,
    health: Health,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    reported(watcher::watcher(api, config), name, health)
}

/// The objects a watch of `api` applied or deleted, for `owns_stream` and `watches_stream`.
pub fn objects<K>(
    api: Api<K>,
    config: watcher::Config,
    name: String,
    health: Health,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    events(api, config, name, health).touched_objects()
}

fn reported<K, S>(
    stream: S,
    name: String,
    health: Health,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    health.watch_started(&name);
    stream.backoff(WatchBackoff::default()).filter_map(move |event| {
        let out = match event {
            Ok(event) => {
                let recovered = if matches!(event, watcher::Event::InitDone) {
                    tracing::debug!(watch = %name, "list done");
                    health.watch_synced(&name)
                } else {
                    health.watch_ok(&name)
                };
                if recovered {
                    tracing::info!(watch = %name, "watch recovered");
                }
                Some(Ok(event))
            }
            Err(error) => {
                if let watcher::Error::InitialListFailed(e)
                | watcher::Error::WatchStartFailed(e)
                | watcher::Error::WatchFailed(e) = &error
                {
                    api_server::note(e);
                }
                let text = error.to_string();
                if health.watch_failed(&name, &text) {
                    tracing::warn!(watch = %name, error = %text, "watch failed; retrying");
                } else {
                    tracing::debug!(watch = %name, error = %text, "watch failed again; retrying");
                }
                None
            }
        };
        futures::future::ready(out)
    })
}
