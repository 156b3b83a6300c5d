//! `make bench`: planning a 1,000,000-row PostgreSQL model, next to raw `COPY (query) TO
//! STDOUT` of the same query, in one run.
//!
//! Every phase runs in a child process of this binary so its peak RSS (VmHWM) is its own.
//! Phases: COPY baseline; plan-only first run (empty state); a real first run into a
//! destination that accepts everything (seeds the state); 1% of rows changed; COPY again;
//! plan-only second run. Phases that change nothing run `BACKFLOW_BENCH_REPEAT` times (3)
//! and report the median. Override the server with `BACKFLOW_TEST_POSTGRES_URL` and the size
//! with `BACKFLOW_BENCH_ROWS`.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use backflow::api::ReverseSyncSpec;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::destination::{Capabilities, Connector, Operation, Record, RecordOutcome, SendError};
use backflow::engine::run::{RunOptions, SyncRun, run};
use backflow::state::file::FileStore;
use futures::StreamExt;
use sqlx::Connection;

/// The same allocator as the `backflow` binary, so the figures are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const QUERY: &str =
    "SELECT id, email, first_name, last_name, plan, mrr, signed_up_at, is_active, score FROM customers";

/// A destination that accepts every record at once: the bench measures the engine.
struct AcceptAll;

#[async_trait]
impl Connector for AcceptAll {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: 1000,
            operations: vec![Operation::Upsert],
            default_requests_per_second: 1e9,
            default_concurrency: 4,
        }
    }
    async fn check(&self) -> Result<(), SendError> {
        Ok(())
    }
    async fn send(&self, _: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        Ok(vec![RecordOutcome::Accepted; batch.len()])
    }
}

fn spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{QUERY}", primaryKey: [id]}}
destinationRef: {{name: null}}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email, transforms: [lowercase]}}
  - {{template: "{{{{first_name}}}} {{{{last_name}}}}", to: properties.name}}
  - {{from: plan, to: properties.plan}}
  - {{from: mrr, to: properties.mrr}}
  - {{from: signed_up_at, to: properties.signed_up_at}}
  - {{from: is_active, to: properties.active}}
  - {{from: score, to: properties.score}}
"#
    ))
    .expect("bench spec parses")
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

async fn child(phase: &str, url: &str, state_dir: &str) {
    let start = Instant::now();
    let rows: u64 = match phase {
        "copy" => {
            let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
            let mut stream = conn
                .copy_out_raw(&format!("COPY ({QUERY}) TO STDOUT"))
                .await
                .expect("copy");
            let mut lines = 0u64;
            while let Some(chunk) = stream.next().await {
                lines += chunk.expect("copy chunk").iter().filter(|b| **b == b'\n').count() as u64;
            }
            lines
        }
        "plan" | "seed" => {
            let spec = spec();
            let config = DeliveryConfig {
                batch_size: 1000,
                max_concurrency: 4,
                max_attempts: 1,
                initial_backoff: std::time::Duration::from_millis(10),
                max_backoff: std::time::Duration::from_millis(10),
                requests_per_second: 1e9,
                burst: 1_000_000,
            };
            let job = SyncRun {
                namespace: "bench",
                name: "customers",
                spec: &spec,
                source_url: url,
                delivery: Delivery::new(
                    Arc::new(AcceptAll),
                    Arc::new(RateLimiter::new(1e9, 1_000_000)),
                    config,
                ),
                scope: "bench/null".into(),
            };
            let mut store = FileStore::new(std::path::Path::new(state_dir), "bench", "customers");
            let options = RunOptions {
                dry_run: phase == "plan",
                checkpoint_records: 200_000,
                ..RunOptions::default()
            };
            let report = run(job, &mut store, &options).await;
            if let Some(e) = report.error {
                panic!("bench run failed: {e}");
            }
            eprintln!(
                "    [{phase}] added {} changed {} unchanged {} accepted {}",
                report.plan.added, report.plan.changed, report.plan.unchanged, report.accepted
            );
            report.plan.rows_in_model
        }
        other => panic!("unknown phase {other}"),
    };
    println!("{} {} {}", start.elapsed().as_secs_f64(), rows, peak_rss_mib());
}

/// Runs a phase that changes nothing `repeat` times: the median time and the highest peak
/// RSS (these machines are shared, and one run can be a third off).
fn median_phase(phase: &str, url: &str, state_dir: &str, repeat: usize) -> (f64, u64, f64) {
    let mut runs: Vec<(f64, u64, f64)> = (0..repeat.max(1))
        .map(|_| run_phase(phase, url, state_dir))
        .collect();
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let peak = runs.iter().map(|r| r.2).fold(0.0, f64::max);
    let (secs, rows, _) = runs[runs.len() / 2];
    (secs, rows, peak)
}

fn run_phase(phase: &str, url: &str, state_dir: &str) -> (f64, u64, f64) {
    let exe = std::env::current_exe().expect("own path");
    let out = Command::new(exe)
        .args(["--phase", phase, url, state_dir])
        .output()
        .expect("run phase");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "phase {phase} failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let secs = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let rows = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let rss = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0.0);
    (secs, rows, rss)
}

async fn admin(url: &str, sql: &str) {
    let mut c = sqlx::PgConnection::connect(url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::raw_sql(sql).execute(&mut c).await.expect("bench SQL");
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--phase") {
        child(&args[2], &args[3], &args[4]).await;
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks for benchmark names; this binary has one.
    }
    let rows: u64 = std::env::var("BACKFLOW_BENCH_ROWS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let admin_url = std::env::var("BACKFLOW_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let db = format!("bf_bench_{}", std::process::id());
    admin(&admin_url, &format!("CREATE DATABASE {db}")).await;
    let url = format!(
        "{}/{db}",
        admin_url.rsplit_once('/').map(|(p, _)| p).unwrap_or(&admin_url)
    );
    eprintln!("creating a {rows}-row model in {db} ...");
    admin(
        &url,
        &format!(
            "CREATE TABLE customers (id bigint PRIMARY KEY, email text, first_name text, last_name text, plan text,
               mrr numeric(12,2), signed_up_at timestamptz, is_active boolean, score float8);
             INSERT INTO customers SELECT i, 'User' || i || '@Example.com', 'First' || (i % 1000), 'Last' || (i % 777),
               (ARRAY['free','starter','growth','enterprise'])[1 + i % 4], (i % 5000) / 100.0,
               timestamptz '2021-01-01' + i * interval '1 minute', i % 10 <> 0, i * 0.37
             FROM generate_series(1, {rows}) AS i;
             ANALYZE customers;"
        ),
    )
    .await;
    let state = tempfile::tempdir().expect("temp dir");
    let state_dir = state.path().to_string_lossy().into_owned();

    let repeat: usize = std::env::var("BACKFLOW_BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let copy1 = median_phase("copy", &url, &state_dir, repeat);
    let plan1 = median_phase("plan", &url, &state_dir, repeat);
    let seed = run_phase("seed", &url, &state_dir);
    admin(&url, "UPDATE customers SET plan = 'changed' WHERE id % 100 = 0").await;
    // VACUUM refuses any transaction, even the implicit one of a simple-protocol string.
    let mut c = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to PostgreSQL");
    sqlx::query("VACUUM ANALYZE customers")
        .execute(&mut c)
        .await
        .expect("vacuum");
    drop(c);
    let copy2 = median_phase("copy", &url, &state_dir, repeat);
    let plan2 = median_phase("plan", &url, &state_dir, repeat);
    admin(&admin_url, &format!("DROP DATABASE {db} WITH (FORCE)")).await;

    println!(
        "\nbackflow plan benchmark: {rows} rows, PostgreSQL; median of {repeat} runs per phase (one for the first end-to-end run)\n"
    );
    println!(
        "{:<44} {:>9} {:>12} {:>10} {:>9}",
        "phase", "seconds", "rows/s", "peak MiB", "vs COPY"
    );
    let line = |name: &str, (s, n, rss): (f64, u64, f64), base: f64| {
        println!(
            "{name:<44} {s:>9.2} {:>12.0} {rss:>10.1} {:>8.2}x",
            n as f64 / s.max(1e-9),
            s / base.max(1e-9)
        );
    };
    line("COPY (query) TO STDOUT (baseline)", copy1, copy1.0);
    line("plan only, first run (empty state)", plan1, copy1.0);
    line("first run end to end, accept-all destination", seed, copy1.0);
    line("COPY again after 1% changed", copy2, copy2.0);
    line("plan only, second run (1% changed)", plan2, copy2.0);
    let first = plan1.0 / copy1.0.max(1e-9);
    let second = plan2.0 / copy2.0.max(1e-9);
    let peak = plan1.2.max(plan2.2);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "\naims: plan within 2x of COPY: first run {first:.2}x, second run {second:.2}x ({}); \
         plan peak RSS under 150 MiB: {peak:.1} MiB ({})",
        verdict(first <= 2.0 && second <= 2.0),
        verdict(peak < 150.0)
    );
}
