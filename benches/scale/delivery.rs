//! Delivery throughput: does a destination limited at R requests/s get close to R, with no
//! row lost, also when every 10th request fails with 503?
//!
//! Each scenario is a first run end to end (File store, fresh state) of a 50,000-row model
//! into the sink. The limit's burst is 1, so the rate measured at the sink — requests after
//! the first over the seconds between the first and the last arrival — can't exceed R by
//! spending a saved-up bucket. Retries go through the same limiter, so they count.
//!
//! Two rates: over the whole run, and sustained — up to the last first attempt, while new
//! batches remained to fill the limit. They differ by the tail: the last batches answered
//! 503 wait out their backoff (0.5–1 s, longer if a retry fails again) with nothing else
//! left to send, a fixed cost that a longer run makes smaller. The aim is checked on the
//! sustained rate; both are printed.

use crate::model::{Model, QUERY};
use crate::phase::{self, Kind, Measured, Phase, Store};
use crate::sink::{Seen, Sink};

/// The limit, in requests per second.
pub const RATE: f64 = 50.0;
/// Records per request.
pub const BATCH: u64 = 100;
/// Rows of the model: 500 requests, about 10 seconds at R.
pub const ROWS: u64 = 50_000;

/// One scenario's settings and figures.
pub struct Scenario {
    pub label: &'static str,
    /// Fail every n-th request with 503 (0: none).
    pub fail_every: u64,
    /// `spec.maxConcurrency`.
    pub concurrency: u32,
    pub measured: Measured,
    pub seen: Seen,
}

impl Scenario {
    /// Requests per second at the sink over the whole run, retries and failed requests
    /// included.
    pub fn rate(&self) -> f64 {
        (self.seen.requests.saturating_sub(1)) as f64 / self.seen.span_seconds.max(1e-9)
    }

    /// Requests per second up to the last first attempt.
    pub fn sustained_rate(&self) -> f64 {
        (self.seen.until_last_first_attempt.saturating_sub(1)) as f64
            / self.seen.seconds_to_last_first_attempt.max(1e-9)
    }

    /// Rows expected at the sink that it never accepted.
    pub fn lost(&self) -> u64 {
        ROWS.saturating_sub(self.seen.distinct_ids)
    }
}

pub async fn bench(admin_url: &str, sink: &Sink) -> Vec<Scenario> {
    eprintln!("delivery throughput: {ROWS} rows at R = {RATE} requests/s ...");
    let model = Model::create(admin_url, ROWS).await;
    let state = tempfile::tempdir().expect("temp dir");
    let mut scenarios = vec![
        scenario("all accepted", 0, 4),
        scenario("every 10th request 503", 10, 4),
        scenario("every 10th request 503", 10, 16),
    ];
    for (i, s) in scenarios.iter_mut().enumerate() {
        let destination = serde_yaml_ng::from_str(&format!(
            "type: http\nhttp: {{url: \"{}/upsert\"}}\nbatchSize: {BATCH}\nmaxConcurrency: {}\n\
             rateLimit: {{requestsPerSecond: {RATE}, burst: 1}}\n",
            sink.url, s.concurrency
        ))
        .expect("destination parses");
        sink.reset(s.fail_every, true);
        s.measured = phase::spawn(&Phase {
            kind: Kind::Run {
                store: Store::File,
                sync: format!("delivery-{i}"),
                dry_run: false,
                destination: Box::new(destination),
            },
            database_url: model.url.clone(),
            query: QUERY.to_owned(),
            state_dir: state.path().to_string_lossy().into_owned(),
            api_server: String::new(),
        })
        .await;
        s.seen = sink.seen();
    }
    model.drop_database().await;
    scenarios
}

fn scenario(label: &'static str, fail_every: u64, concurrency: u32) -> Scenario {
    Scenario {
        label,
        fail_every,
        concurrency,
        measured: Measured::default(),
        seen: Seen::default(),
    }
}
