//! The local HTTP destination: an axum server in the parent process (so its memory and work
//! are not counted in a phase's peak RSS) that accepts every request with `200 {}`, or fails
//! every n-th with `503`. Like a real batch endpoint, it reads every body whole and parses it
//! as JSON, so its own ceiling ([`crate::ceiling`]) is that of an endpoint doing the work a
//! HubSpot-shaped API does per request, not of a socket that drops what it is sent.
//!
//! It counts requests and, when asked, the distinct `id`s of the records it accepted, to tell
//! rows delivered from rows lost. It tells retries from first attempts by their body (a retry
//! of a batch answered 503 carries the same bytes), so the rate can also be measured while new
//! batches remained, before the last retries wait out their backoff with nothing else left to
//! send. It keeps the first [`CAPTURED`] bodies it ever accepted (the first end-to-end run's) and
//! serves them at `GET /captured`, so the ceiling is measured with the very bodies the engine
//! sent.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::get;
use xxhash_rust::xxh3::xxh3_64;

/// Bodies kept for the ceiling to post again.
pub const CAPTURED: usize = 64;
/// The path serving them.
pub const CAPTURED_PATH: &str = "/captured";

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    failed: AtomicU64,
    /// Fail every n-th request with 503 (0: never).
    fail_every: AtomicU64,
    track_ids: AtomicBool,
    ids: Mutex<HashSet<u64>>,
    /// Arrival of the first and the last request.
    window: Mutex<Option<(Instant, Instant)>>,
    /// Hashes of the bodies answered 503.
    failed_bodies: Mutex<HashSet<u64>>,
    /// Arrival and number of the last request that was not a retry.
    last_first_attempt: Mutex<Option<(Instant, u64)>>,
    /// The first bodies accepted (not cleared by a reset).
    captured: Mutex<Vec<Bytes>>,
    /// Bodies that were not JSON.
    not_json: AtomicU64,
}

/// What the sink saw since the last [`Sink::reset`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub requests: u64,
    /// Requests answered 503.
    pub failed: u64,
    /// Distinct record ids accepted (when tracked).
    pub distinct_ids: u64,
    /// Seconds between the first and the last request's arrival.
    pub span_seconds: f64,
    /// Requests up to the last first attempt (retries among them included)...
    pub until_last_first_attempt: u64,
    /// ...and the seconds from the first request to it.
    pub seconds_to_last_first_attempt: f64,
    /// Bodies that did not parse as JSON (none, when the engine writes them right).
    pub not_json: u64,
}

/// A running sink.
pub struct Sink {
    pub url: String,
    counters: Arc<Counters>,
}

impl Sink {
    pub async fn start() -> Sink {
        let counters = Arc::new(Counters::default());
        let router = Router::new()
            .route(CAPTURED_PATH, get(captured))
            .fallback(handle)
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(counters.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the sink");
        let addr = listener.local_addr().expect("sink address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Sink {
            url: format!("http://{addr}"),
            counters,
        }
    }

    /// Clears the counters (not the captured bodies); from now on fail every `fail_every`-th
    /// request (0: none) and remember accepted ids if `track_ids`.
    pub fn reset(&self, fail_every: u64, track_ids: bool) {
        let c = &self.counters;
        c.requests.store(0, Ordering::SeqCst);
        c.failed.store(0, Ordering::SeqCst);
        c.not_json.store(0, Ordering::SeqCst);
        c.fail_every.store(fail_every, Ordering::SeqCst);
        c.track_ids.store(track_ids, Ordering::SeqCst);
        c.ids.lock().expect("ids").clear();
        *c.window.lock().expect("window") = None;
        c.failed_bodies.lock().expect("bodies").clear();
        *c.last_first_attempt.lock().expect("last") = None;
    }

    pub fn seen(&self) -> Seen {
        let c = &self.counters;
        let window = *c.window.lock().expect("window");
        let last_first = *c.last_first_attempt.lock().expect("last");
        Seen {
            requests: c.requests.load(Ordering::SeqCst),
            failed: c.failed.load(Ordering::SeqCst),
            distinct_ids: c.ids.lock().expect("ids").len() as u64,
            span_seconds: window.map_or(0.0, |(first, last)| (last - first).as_secs_f64()),
            until_last_first_attempt: last_first.map_or(0, |(_, n)| n),
            seconds_to_last_first_attempt: match (window, last_first) {
                (Some((first, _)), Some((at, _))) => (at - first).as_secs_f64(),
                _ => 0.0,
            },
            not_json: c.not_json.load(Ordering::SeqCst),
        }
    }
}

/// The bodies captured, as a JSON array of strings.
async fn captured(State(c): State<Arc<Counters>>) -> String {
    let bodies: Vec<String> = c
        .captured
        .lock()
        .expect("captured")
        .iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    serde_json::to_string(&bodies).expect("strings serialise")
}

async fn handle(State(c): State<Arc<Counters>>, body: Bytes) -> (StatusCode, &'static str) {
    let n = c.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let now = Instant::now();
    {
        let mut window = c.window.lock().expect("window");
        *window = Some(window.map_or((now, now), |(first, _)| (first, now)));
    }
    let hash = xxh3_64(&body);
    if !c.failed_bodies.lock().expect("bodies").contains(&hash) {
        let mut last = c.last_first_attempt.lock().expect("last");
        if last.is_none_or(|(_, m)| m < n) {
            *last = Some((now, n));
        }
    }
    let fail_every = c.fail_every.load(Ordering::SeqCst);
    if fail_every > 0 && n.is_multiple_of(fail_every) {
        c.failed.fetch_add(1, Ordering::SeqCst);
        c.failed_bodies.lock().expect("bodies").insert(hash);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"message":"temporarily unavailable"}"#,
        );
    }
    // What a batch endpoint does with every body it accepts: parse it, records and all.
    let json: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(json) => json,
        Err(_) => {
            c.not_json.fetch_add(1, Ordering::SeqCst);
            return (StatusCode::BAD_REQUEST, r#"{"message":"not JSON"}"#);
        }
    };
    {
        let mut captured = c.captured.lock().expect("captured");
        if captured.len() < CAPTURED {
            captured.push(body.clone());
        }
    }
    if c.track_ids.load(Ordering::SeqCst) {
        // The http connector's default body: {"operation":"upsert","records":[{"id":…},…]}.
        let ids = json
            .get("records")
            .and_then(serde_json::Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("id").and_then(serde_json::Value::as_u64));
        c.ids.lock().expect("ids").extend(ids);
    }
    (StatusCode::OK, "{}")
}
