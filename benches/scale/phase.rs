//! One phase of the benchmark, run in a child process of this binary so that its peak RSS
//! (VmHWM) is its own: the parent passes a [`Phase`] as JSON after `--phase`, the child
//! prints one [`Measured`] as JSON on stdout.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{RunOptions, SyncRun, run};
use backflow::state::StateStore;
use backflow::state::configmap::ConfigMapStore;
use backflow::state::file::FileStore;
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use serde::{Deserialize, Serialize};
use sqlx::Connection;

/// Namespace of every benchmark sync.
const NAMESPACE: &str = "bench";
/// What the fingerprints are about (stands for `namespace/destination/target`).
const SCOPE: &str = "bench/sink/http";

/// Where a sync keeps its fingerprints (`spec.state.store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Store {
    /// A local directory (`backflow run -f`).
    File,
    /// Tables in the source database, schema `backflow`.
    Warehouse,
    /// ConfigMaps, in the API server double of `tests/support/apiserver.rs` that the parent
    /// process runs: a real `kube::Client` over HTTP on loopback, no etcd, no admission.
    ConfigMap,
}

impl Kind {
    /// A run of `store` (plan only with `dry_run`) as the sync `customers-<store>`, into
    /// `destination`.
    pub fn store_run(store: Store, dry_run: bool, destination: &DestinationSpec) -> Kind {
        Kind::Run {
            store,
            sync: format!("customers-{}", store.name().to_lowercase()),
            dry_run,
            destination: Box::new(destination.clone()),
        }
    }
}

impl Store {
    pub const ALL: [Store; 3] = [Store::File, Store::Warehouse, Store::ConfigMap];

    pub fn name(self) -> &'static str {
        match self {
            Store::File => "File",
            Store::Warehouse => "Warehouse",
            Store::ConfigMap => "ConfigMap",
        }
    }
}

/// What a child process does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Kind {
    /// Raw `COPY (query) TO STDOUT`, lines counted: the baseline.
    Copy,
    /// One engine run through `backflow::engine::run::run`, dry or end to end.
    Run {
        store: Store,
        sync: String,
        dry_run: bool,
        destination: Box<DestinationSpec>,
    },
    /// Loads a File store's state and measures its fingerprints in memory.
    Fingerprints { sync: String },
    /// A cloud warehouse source against its double at `endpoint` (`database_url` is the
    /// source URL): the extraction, or with `raw` the same requests without the source.
    Cloud {
        source: crate::cloud::Source,
        endpoint: String,
        raw: bool,
    },
    /// The ClickHouse baseline: the query's RowBinary body read and discarded.
    ClickHouseRaw { rows: u64 },
    /// The source alone: every row extracted and decoded, nothing planned.
    SourceOnly,
    /// The sink's own ceiling: `requests` bodies of 100 records posted to `url` by a bare
    /// client, `concurrency` at a time (`ceiling.rs`).
    SinkCeiling {
        url: String,
        requests: u64,
        concurrency: usize,
    },
    /// An end-to-end File-store run of the sync with `cursor: {column: updated_at}`: past
    /// the mark, or a full diff.
    CursorRun {
        sync: String,
        full_diff: bool,
        destination: Box<DestinationSpec>,
    },
}

/// A phase and everything it needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase {
    pub kind: Kind,
    pub database_url: String,
    pub query: String,
    pub state_dir: String,
    /// Base URL of the API server double (ConfigMap store).
    pub api_server: String,
}

/// What a phase measured.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Measured {
    pub seconds: f64,
    /// Rows the model returned (COPY: lines; fingerprints: rows in the state).
    pub rows: u64,
    pub peak_rss_mib: f64,
    pub requests: u64,
    pub retries: u64,
    pub accepted: u64,
    pub failed: u64,
    pub rejected: u64,
    /// Rows the plan found added and changed.
    pub added: u64,
    pub changed: u64,
    /// `Fingerprints::memory_bytes()` (fingerprints phase).
    pub fingerprint_bytes: u64,
    /// Keys and identities as text, summed over the entries (fingerprints phase).
    pub text_bytes: u64,
    /// CPU time of the process, user and system.
    pub cpu_seconds: f64,
    /// Peak bytes of the temporary files the process held (spill, index, diff buckets).
    pub peak_tmp_bytes: u64,
    /// Bytes of the run's spill file alone.
    pub spill_bytes: u64,
}

/// The sync of every run: 9 columns, 8 mappings with a template, a transform and nested
/// targets; in `BACKFLOW_BENCH_MODE` (`spec.mode`, `upsert` when unset).
pub fn sync_spec(query: &str, store: Store) -> ReverseSyncSpec {
    let mode = std::env::var("BACKFLOW_BENCH_MODE").unwrap_or_else(|_| "upsert".to_owned());
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{query}", primaryKey: [id]}}
destinationRef: {{name: sink}}
mode: {mode}
state: {{store: {}}}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email, transforms: [lowercase]}}
  - {{template: "{{{{first_name}}}} {{{{last_name}}}}", to: properties.name}}
  - {{from: plan, to: properties.plan}}
  - {{from: mrr, to: properties.mrr}}
  - {{from: signed_up_at, to: properties.signed_up_at}}
  - {{from: is_active, to: properties.active}}
  - {{from: score, to: properties.score}}
"#,
        store.name()
    ))
    .expect("bench spec parses")
}

/// Runs `phase` in a child process and returns what it measured.
pub async fn spawn(phase: &Phase) -> Measured {
    spawn_on(phase, None).await
}

/// [`spawn`], with the child confined to `cpus` (a `taskset` CPU list) when given.
pub async fn spawn_on(phase: &Phase, cpus: Option<&str>) -> Measured {
    let exe = std::env::current_exe().expect("own path");
    let json = serde_json::to_string(phase).expect("phase serialises");
    let mut command = match cpus {
        Some(cpus) => {
            let mut c = tokio::process::Command::new("taskset");
            c.args(["-c", cpus]).arg(exe);
            c
        }
        None => tokio::process::Command::new(exe),
    };
    // tokio's `output` pipes stderr whatever it was set to: what the phase wrote there (its
    // logs with `BACKFLOW_BENCH_LOG`, a panic) is passed on once it ends.
    let out = command
        .args(["--phase", &json])
        .output()
        .await
        .expect("run phase");
    std::io::Write::write_all(&mut std::io::stderr(), &out.stderr).expect("write to stderr");
    assert!(out.status.success(), "phase {:?} failed", phase.kind);
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("phase output {last:?}: {e}"))
}

/// The child's side: runs the phase given as JSON and prints what it measured.
pub async fn child(json: &str) {
    let phase: Phase = serde_json::from_str(json).expect("phase JSON");
    // `BACKFLOW_BENCH_LOG=debug` (any filter): each phase logs to stderr, timed from its start.
    if let Ok(filter) = std::env::var("BACKFLOW_BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .init();
    }
    let except = (!phase.state_dir.is_empty()).then(|| std::path::PathBuf::from(&phase.state_dir));
    let watch = crate::tmpwatch::TmpWatch::start(except);
    let start = Instant::now();
    let mut m = match &phase.kind {
        Kind::Copy => copy(&phase).await,
        Kind::Run {
            store,
            sync,
            dry_run,
            destination,
        } => engine_run(&phase, *store, sync, *dry_run, destination).await,
        Kind::Fingerprints { sync } => fingerprints(&phase, sync).await,
        Kind::Cloud {
            source,
            endpoint,
            raw,
        } => crate::cloud::child(&phase, *source, endpoint, *raw).await,
        Kind::ClickHouseRaw { rows } => crate::clickhouse::raw_read(&phase, *rows).await,
        Kind::SourceOnly => crate::clickhouse::source_only(&phase).await,
        Kind::SinkCeiling {
            url,
            requests,
            concurrency,
        } => crate::ceiling::run(url, *requests, *concurrency).await,
        Kind::CursorRun {
            sync,
            full_diff,
            destination,
        } => crate::cursor::child(&phase, sync, *full_diff, destination).await,
    };
    m.seconds = start.elapsed().as_secs_f64();
    m.peak_tmp_bytes = watch.stop();
    m.peak_rss_mib = peak_rss_mib();
    m.cpu_seconds = cpu_seconds();
    println!("{}", serde_json::to_string(&m).expect("serialise"));
}

async fn copy(phase: &Phase) -> Measured {
    let mut conn = sqlx::PgConnection::connect(&phase.database_url)
        .await
        .expect("connect");
    let mut stream = conn
        .copy_out_raw(&format!("COPY ({}) TO STDOUT", phase.query))
        .await
        .expect("copy");
    let mut lines = 0u64;
    while let Some(chunk) = stream.next().await {
        lines += chunk.expect("copy chunk").iter().filter(|b| **b == b'\n').count() as u64;
    }
    Measured {
        rows: lines,
        ..Measured::default()
    }
}

/// A run as `backflow run` does it: the destination built from its spec through
/// `backflow::destination::build` behind the shared delivery layers, the store chosen by
/// `spec.state` with the File store as home (`state::migrate::choose`; the ConfigMap store in
/// the double for `Store::ConfigMap`, as the operator does), default run options.
async fn engine_run(
    phase: &Phase,
    store: Store,
    sync: &str,
    dry_run: bool,
    destination: &DestinationSpec,
) -> Measured {
    let spec = sync_spec(&phase.query, store);
    let options = RunOptions {
        dry_run,
        ..RunOptions::default()
    };
    run_spec(phase, &spec, store, sync, destination, &options).await
}

/// One engine run of `spec`, as [`engine_run`] describes, with `options`.
pub async fn run_spec(
    phase: &Phase,
    spec: &ReverseSyncSpec,
    store: Store,
    sync: &str,
    destination: &DestinationSpec,
    options: &RunOptions,
) -> Measured {
    let connector = backflow::destination::build(destination, None)
        .await
        .expect("build the http destination");
    let config =
        DeliveryConfig::resolve(destination, &connector.capabilities()).expect("destination settings");
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let job = SyncRun {
        namespace: NAMESPACE,
        name: sync,
        spec,
        source_url: &phase.database_url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, limiter, config),
        scope: SCOPE.to_owned(),
    };
    let home: Box<dyn StateStore> = match store {
        Store::ConfigMap => {
            let url = phase.api_server.parse().expect("the double's URL");
            let client = kube::Client::try_from(kube::Config::new(url)).expect("a client for the double");
            let owner = OwnerReference {
                api_version: "backflow.dev/v1alpha1".to_owned(),
                kind: "ReverseSync".to_owned(),
                name: sync.to_owned(),
                uid: format!("bench-{sync}"),
                ..OwnerReference::default()
            };
            Box::new(ConfigMapStore::new(client, NAMESPACE, sync, owner))
        }
        Store::File | Store::Warehouse => {
            Box::new(FileStore::new(Path::new(&phase.state_dir), NAMESPACE, sync))
        }
    };
    let mut store =
        backflow::state::migrate::choose(spec, NAMESPACE, sync, None, home, &phase.database_url, None);
    let report = run(job, store.as_mut(), options).await;
    if let Some(e) = report.error {
        panic!("bench run failed: {e}");
    }
    Measured {
        rows: report.plan.rows_in_model,
        requests: report.requests,
        retries: report.retries,
        accepted: report.accepted,
        failed: report.failed,
        rejected: report.rows_rejected(),
        added: report.plan.added,
        changed: report.plan.changed,
        spill_bytes: report.spill_bytes,
        ..Measured::default()
    }
}

async fn fingerprints(phase: &Phase, sync: &str) -> Measured {
    let mut store = FileStore::new(Path::new(&phase.state_dir), NAMESPACE, sync);
    let set = store.load(SCOPE).await.expect("load the File store");
    let text: usize = set.iter().map(|e| e.key.len() + e.identity.len()).sum();
    Measured {
        rows: set.len() as u64,
        fingerprint_bytes: set.memory_bytes() as u64,
        text_bytes: text as u64,
        ..Measured::default()
    }
}

/// User and system CPU seconds of this process so far (`/proc/self/stat`, in clock ticks of
/// 1/100 s, the value of `CLK_TCK` on Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which ends with the last ')': utime and stime are the
    // 12th and 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}
