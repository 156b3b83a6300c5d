//! `make bench` (and `make bench-10m`): Backflow at scale, next to raw `COPY (query) TO
//! STDOUT` of the same query, printed in one run.
//!
//! For each model size (`BACKFLOW_BENCH_ROWS`, a comma-separated list, default `1000000`), a
//! `customers` table in a PostgreSQL database of its own, then:
//! 1. COPY baseline;
//! 2. for each state store (File, Warehouse, ConfigMap): plan only on an empty state, then a
//!    first run end to end into a local HTTP destination that accepts everything (a real
//!    `http` Destination; the server runs in this parent process and counts the requests).
//!    The ConfigMap store talks to the Kubernetes API server double of
//!    `tests/support/apiserver.rs`, also run by this parent: a real `kube::Client` over HTTP,
//!    but no etcd, no admission and no network latency, so its figures are a lower bound;
//! 3. the File store's state loaded whole into memory (only a migration does that): bytes
//!    per row;
//! 4. 1% of rows changed, COPY again, and for each store plan only and a second run end to
//!    end.
//!
//! `BACKFLOW_BENCH_ONLY=plan` runs only COPY, the source alone and the plan-only phases
//! (`plan.rs`), a few minutes at 1,000,000 rows.
//!
//! `BACKFLOW_BENCH_ONLY=warehouse` runs only COPY, the File store's first run and the
//! Warehouse store's first and second runs end to end (`warehouse.rs`).
//!
//! Then cursor mode at the smallest size (`cursor.rs`): the 1%-changed run reading past the
//! high-water mark next to the same change found by a full diff, and COPY (alone with
//! `BACKFLOW_BENCH_ONLY=cursor`).
//!
//! Then delivery throughput: 50,000 rows to a destination limited at R = 50 requests/s
//! (batches of 100), all accepted, then with every 10th request failing with 503: achieved
//! requests/s against R, retries, rows the server accepted against rows expected.
//!
//! Then templates: the per-row cost of the sync's template mapping next to the plain
//! `{{name}}` substitution of before, and of filter chains (`templates.rs`; alone with
//! `BACKFLOW_BENCH_ONLY=templates`).
//!
//! Then the warehouse sources, at 100,000 and 1,000,000 rows so their peak memory can be
//! compared: the cloud ones (Snowflake, Databricks, BigQuery) against their contract doubles,
//! next to the doubles' own serving speed (`cloud.rs`), and ClickHouse (`clickhouse.rs`):
//! rows/s of the source next to a raw HTTP read of the same body, in the same run. Alone, in
//! a few minutes, with `BACKFLOW_BENCH_ONLY=sources` (or `cloud` for the cloud ones only).
//!
//! Every phase runs in a child process of this binary (`--phase JSON`) so its peak RSS
//! (VmHWM) is its own. COPY and plan-only phases run `BACKFLOW_BENCH_REPEAT` times (3) and
//! report the median time and the highest peak; end-to-end runs change the state and run
//! once. The scale targets are printed next to the figures, computed from them. The server
//! is `BACKFLOW_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).

// The API server double of the integration tests, for the ConfigMap store.
#[allow(dead_code)]
#[path = "../../tests/support/apiserver.rs"]
mod apiserver;
mod ceiling;
mod clickhouse;
mod cloud;
mod cpus;
mod cursor;
mod delivery;
mod huge;
mod model;
mod phase;
mod plan;
mod report;
mod sink;
mod templates;
mod tmpwatch;
mod warehouse;

// The cloud warehouse doubles of the integration tests, run by the parent for the cloud phases
// (at the crate root, where they find each other as `super::…`).
#[allow(dead_code)]
#[path = "../../tests/support/bigquery_double.rs"]
mod bigquery_double;
#[allow(dead_code)]
#[path = "../../tests/support/databricks_double.rs"]
mod databricks_double;
#[allow(dead_code)]
#[path = "../../tests/support/http_server.rs"]
mod http_server;
#[allow(dead_code)]
#[path = "../../tests/support/snowflake_double.rs"]
mod snowflake_double;
#[allow(dead_code)]
#[path = "../../tests/support/statement_double.rs"]
mod statement_double;

use phase::{Kind, Measured, Phase, Store};
use report::{SizeReport, StoreReport};

/// The same allocator as the `backflow` binary, so the figures are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--phase") {
        phase::child(&args[2]).await;
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks for benchmark names; this binary has one.
    }
    // In this process, before any child or server competes for the CPU.
    let template_figures = templates::bench();
    if std::env::var("BACKFLOW_BENCH_ONLY").as_deref() == Ok("templates") {
        templates::print(&template_figures);
        return;
    }
    let sizes: Vec<u64> = std::env::var("BACKFLOW_BENCH_ROWS")
        .unwrap_or_else(|_| "1000000".to_owned())
        .split(',')
        .map(|s| {
            s.trim()
                .replace('_', "")
                .parse()
                .expect("BACKFLOW_BENCH_ROWS: row counts")
        })
        .collect();
    let repeat: usize = std::env::var("BACKFLOW_BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    let admin_url = std::env::var("BACKFLOW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    match std::env::var("BACKFLOW_BENCH_ONLY").as_deref() {
        // `BACKFLOW_BENCH_ONLY=cloud make bench`: the cloud sources alone, a minute or so.
        Ok("cloud") => {
            cloud::print(&cloud::bench().await);
            return;
        }
        // `BACKFLOW_BENCH_ONLY=sources make bench`: every warehouse source, a few minutes.
        Ok("sources") => {
            eprintln!("cloud warehouse sources ...");
            let cloud = cloud::bench().await;
            let clickhouse = clickhouse::bench(repeat).await;
            cloud::print(&cloud);
            clickhouse::print(&clickhouse);
            return;
        }
        _ => {}
    }
    let sink = sink::Sink::start().await;
    if std::env::var("BACKFLOW_BENCH_ONLY").as_deref() == Ok("huge") {
        // `make bench-100m`: one large model, File store, first and 1%-changed runs.
        huge::bench(&admin_url, &sink).await;
        return;
    }
    if std::env::var("BACKFLOW_BENCH_ONLY").as_deref() == Ok("ceiling") {
        // `BACKFLOW_BENCH_ONLY=ceiling`: File-store first runs against the sink's own ceiling.
        for &rows in &sizes {
            delivery::ceiling_mode(&admin_url, rows, repeat, &sink).await;
        }
        return;
    }
    let api_server = apiserver::ApiServer::start().await;
    let started = std::time::Instant::now();
    if std::env::var("BACKFLOW_BENCH_ONLY").as_deref() == Ok("cursor") {
        // `BACKFLOW_BENCH_ONLY=cursor make bench`: cursor mode alone, at the smallest size.
        let smallest = sizes.iter().copied().min().unwrap_or(1_000_000);
        cursor::print(&cursor::bench(&admin_url, smallest, repeat, &sink, api_server.url()).await);
        return;
    }

    if std::env::var("BACKFLOW_BENCH_ONLY").as_deref() == Ok("warehouse") {
        // `BACKFLOW_BENCH_ONLY=warehouse make bench`: COPY, File and Warehouse first runs, and
        // the Warehouse second run after 1% of rows changed.
        warehouse::bench(&admin_url, &sizes, repeat, &sink, api_server.url()).await;
        return;
    }

    if std::env::var("BACKFLOW_BENCH_ONLY").as_deref() == Ok("plan") {
        // `BACKFLOW_BENCH_ONLY=plan make bench`: COPY, the source alone and plan-only phases.
        plan::bench(&admin_url, &sizes, repeat, &sink, api_server.url()).await;
        return;
    }

    let mut sizes_done = Vec::new();
    for &rows in &sizes {
        sizes_done.push(bench_size(&admin_url, rows, repeat, &sink, api_server.url()).await);
    }
    let smallest = sizes.iter().copied().min().unwrap_or(1_000_000);
    let cursor = cursor::bench(&admin_url, smallest, repeat, &sink, api_server.url()).await;
    let delivery = delivery::bench(&admin_url, &sink).await;
    eprintln!("cloud warehouse sources ...");
    let cloud = cloud::bench().await;
    let clickhouse = clickhouse::bench(repeat).await;

    report::print(&sizes_done, &delivery, repeat, started.elapsed());
    cursor::print(&cursor);
    cloud::print(&cloud);
    clickhouse::print(&clickhouse);
    templates::print(&template_figures);
}

/// Every phase of one model size.
async fn bench_size(
    admin_url: &str,
    rows: u64,
    repeat: usize,
    sink: &sink::Sink,
    api_server: &str,
) -> SizeReport {
    eprintln!("creating a {rows}-row model ...");
    let model = model::Model::create(admin_url, rows).await;
    let state = tempfile::tempdir().expect("temp dir");
    let phase = |kind: Kind| model.phase(kind, state.path(), api_server);
    let destination = sink_destination(&sink.url);
    let run = |store: Store, dry_run: bool| phase(Kind::store_run(store, dry_run, &destination));

    eprintln!("  COPY, first runs ...");
    let copy_first = median(&phase(Kind::Copy), repeat).await;
    let mut stores: Vec<StoreReport> = Vec::new();
    for store in Store::ALL {
        let plan_first = median(&run(store, true), repeat).await;
        sink.reset(0, false);
        let run_first = phase::spawn(&run(store, false)).await;
        stores.push(StoreReport {
            store,
            plan_first,
            run_first,
            sink_first: sink.seen(),
            plan_second: Measured::default(),
            run_second: Measured::default(),
            sink_second: sink::Seen::default(),
        });
    }
    // The sink's own ceiling, right after the first runs: a bare client posting as many
    // requests as the File store's first run sent, at the same batch size and concurrency.
    let concurrency = default_concurrency(&destination).await;
    sink.reset(0, false);
    let ceiling = phase::spawn(&phase(Kind::SinkCeiling {
        url: format!("{}/upsert", sink.url),
        requests: stores.first().map_or(rows / 100, |s| s.run_first.requests.max(1)),
        concurrency,
    }))
    .await;
    let ceiling = report::Ceiling {
        measured: ceiling,
        seen: sink.seen(),
        concurrency,
    };
    // The same pair with the sink and its client each on CPUs of their own: the aim's measure.
    let split = match cpus::Split::new() {
        Some(split) => delivery::against_ceiling(&model, 1, sink, Some(&split))
            .await
            .pop()
            .map(|pair| (pair, split.describe())),
        None => None,
    };
    let fingerprints = phase::spawn(&phase(Kind::Fingerprints {
        sync: format!("customers-{}", Store::File.name().to_lowercase()),
    }))
    .await;

    eprintln!("  1% of rows changed, COPY, second runs ...");
    model.change_one_percent().await;
    let copy_second = median(&phase(Kind::Copy), repeat).await;
    for s in &mut stores {
        s.plan_second = median(&run(s.store, true), repeat).await;
        sink.reset(0, false);
        s.run_second = phase::spawn(&run(s.store, false)).await;
        s.sink_second = sink.seen();
    }
    drop(state);
    model.drop_database().await;
    SizeReport {
        rows,
        copy_first,
        copy_second,
        stores,
        fingerprints,
        ceiling,
        split,
    }
}

/// The `maxConcurrency` a destination gets when its spec sets none (its connector's default).
pub(crate) async fn default_concurrency(destination: &backflow::api::DestinationSpec) -> usize {
    let connector = backflow::destination::build(destination, None)
        .await
        .expect("build the http destination");
    backflow::destination::delivery::DeliveryConfig::resolve(destination, &connector.capabilities())
        .expect("destination settings")
        .max_concurrency
}

/// The Destination of the end-to-end runs: the generic `http` connector at its largest batch,
/// with a limit far above what the sink can take, so the engine is what is measured.
pub fn sink_destination(url: &str) -> backflow::api::DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: http\nhttp: {{url: \"{url}/upsert\"}}\nbatchSize: 100\nrateLimit: {{requestsPerSecond: 1000000}}\n"
    ))
    .expect("sink destination parses")
}

/// Runs a phase that changes nothing `repeat` times: the median time and the highest peak
/// RSS (these machines are shared, and one run can be a third off).
pub(crate) async fn median(phase: &Phase, repeat: usize) -> Measured {
    let mut runs = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        runs.push(phase::spawn(phase).await);
    }
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    let peak = runs.iter().map(|r| r.peak_rss_mib).fold(0.0, f64::max);
    Measured {
        peak_rss_mib: peak,
        ..runs[runs.len() / 2]
    }
}
