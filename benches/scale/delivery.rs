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

use crate::cpus::Split;
use crate::model::Model;
use crate::phase::{self, Kind, Measured, Store};
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
        let kind = Kind::Run {
            store: Store::File,
            sync: format!("delivery-{i}"),
            dry_run: false,
            destination: Box::new(destination),
        };
        s.measured = phase::spawn(&model.phase(kind, state.path(), "")).await;
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

/// One pair of figures of [`against_ceiling`].
pub struct Pair {
    /// The File store's first run end to end.
    pub run: Measured,
    /// What the sink saw of it.
    pub seen: Seen,
    /// The bare client's run, and what the sink saw of it.
    pub ceiling: Measured,
    pub ceiling_seen: Seen,
}

/// `repeat` times a File-store first run end to end of `model` into the sink at the
/// destination's default concurrency, each followed by the sink's own ceiling at the same
/// number of requests, the same concurrency and the same bodies (a fresh state each time).
/// With `split`, the sink and its client each run on CPUs of their own ([`crate::cpus`]).
pub async fn against_ceiling(model: &Model, repeat: usize, sink: &Sink, split: Option<&Split>) -> Vec<Pair> {
    let destination = crate::sink_destination(&sink.url);
    let concurrency = crate::default_concurrency(&destination).await;
    let client = split.map(|s| s.client.as_str());
    let mut pairs = Vec::new();
    for i in 0..repeat {
        let state = tempfile::tempdir().expect("temp dir");
        let phase = |kind: Kind| model.phase(kind, state.path(), "");
        let pinned = split.map(Split::pin_sink);
        sink.reset(0, false);
        let run = phase::spawn_on(
            &phase(Kind::Run {
                store: Store::File,
                sync: format!("ceiling-{i}"),
                dry_run: false,
                destination: Box::new(destination.clone()),
            }),
            client,
        )
        .await;
        let seen = sink.seen();
        sink.reset(0, false);
        let ceiling = phase::spawn_on(
            &phase(Kind::SinkCeiling {
                url: format!("{}/upsert", sink.url),
                requests: run.requests.max(1),
                concurrency,
            }),
            client,
        )
        .await;
        drop(pinned);
        pairs.push(Pair {
            run,
            seen,
            ceiling,
            ceiling_seen: sink.seen(),
        });
    }
    pairs
}

/// `BACKFLOW_BENCH_ONLY=ceiling`: a `rows`-row model, then [`against_ceiling`] `repeat` times
/// with the sink and the client sharing the machine's CPUs, and `repeat` times with CPUs of
/// their own (when the machine has two or more).
pub async fn ceiling_mode(admin_url: &str, rows: u64, repeat: usize, sink: &Sink) {
    eprintln!(
        "delivery against the sink's ceiling: {rows} rows, {repeat} times shared, {repeat} times split ..."
    );
    let model = Model::create(admin_url, rows).await;
    let shared = against_ceiling(&model, repeat, sink, None).await;
    let split = Split::new();
    let own = match &split {
        Some(split) => against_ceiling(&model, repeat, sink, Some(split)).await,
        None => Vec::new(),
    };
    model.drop_database().await;
    print_against_ceiling(rows, &shared, None);
    if let Some(split) = &split {
        print_against_ceiling(rows, &own, Some(split));
    }
}

/// The engine's requests per second against the ceiling's, at the sink.
pub fn share(pair: &Pair) -> f64 {
    rate(&pair.seen) / rate(&pair.ceiling_seen).max(1e-9)
}

fn rate(s: &Seen) -> f64 {
    s.requests.saturating_sub(1) as f64 / s.span_seconds.max(1e-9)
}

/// Prints [`against_ceiling`]'s pairs.
pub fn print_against_ceiling(rows: u64, pairs: &[Pair], split: Option<&Split>) {
    let cpus = split.map_or_else(|| "sink and client share every CPU".to_owned(), Split::describe);
    println!(
        "\n== delivery against the sink's own ceiling: {rows} rows, File store, first run, default concurrency; \
         the sink reads and parses every body; the ceiling posts the bodies the engine sent; {cpus} =="
    );
    println!(
        "{:>4} {:>9} {:>7} {:>9} {:>12} {:>12} {:>13} {:>8} {:>8}",
        "run",
        "seconds",
        "CPU s",
        "requests",
        "engine rq/s",
        "ceiling rq/s",
        "ceiling CPU s",
        "share",
        "non-JSON"
    );
    for (i, p) in pairs.iter().enumerate() {
        let engine = rate(&p.seen);
        let ceiling = rate(&p.ceiling_seen);
        println!(
            "{:>4} {:>9.2} {:>7.2} {:>9} {:>12.0} {:>12.0} {:>13.2} {:>7.0}% {:>8}",
            i + 1,
            p.run.seconds,
            p.run.cpu_seconds,
            p.seen.requests,
            engine,
            ceiling,
            p.ceiling.cpu_seconds,
            100.0 * share(p),
            p.seen.not_json
        );
    }
}
