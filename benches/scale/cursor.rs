//! Cursor mode at scale: the same 1% change found by a full diff and by a run that reads only
//! past the high-water mark, end to end (File store, the sink of the other runs), next to
//! `COPY (query) TO STDOUT` of the whole model and, when `make bench-dlt` installed it, dlt's
//! cursor run of the same change to the same sink (`benches/dlt/cursor.py`).
//!
//! The model gains `updated_at` (a distinct instant per row, indexed, as a cursor column
//! should be). After a first run, 1% of rows change with `updated_at = clock_timestamp()` and
//! a full diff sends them; then, `BACKFLOW_BENCH_REPEAT` times, another 1% changes and a
//! Backflow run past the mark sends it, then dlt's cursor run (its state kept between runs,
//! as a scheduled dlt pipeline keeps it). Every run sends the same number of records, so the
//! difference is what each reads and plans; the medians are printed.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::phase::{self, Kind, Measured, Phase};

/// The model query with the cursor column.
const QUERY: &str = "SELECT id, email, first_name, last_name, plan, mrr, signed_up_at, is_active, score, \
                     updated_at FROM customers";

/// What the cursor phases measured.
#[derive(Debug, Default)]
pub struct CursorReport {
    pub rows: u64,
    pub copy: Measured,
    pub first: Measured,
    pub full_diff: Measured,
    /// Median of the runs past the mark, each after its own 1% change.
    pub past_mark: Measured,
    /// Every run past the mark, in order.
    pub past_mark_seconds: Vec<f64>,
    /// dlt's runs, when its virtual environment exists.
    pub dlt: Option<DltReport>,
}

/// dlt's runs of the same model to the same sink.
#[derive(Debug, Default)]
pub struct DltReport {
    /// Its first run: every row.
    pub first: DltRun,
    /// Median of its cursor runs after the same 1% changes as Backflow's runs past the mark.
    pub cursor: DltRun,
    /// Every cursor run's `pipeline.run` seconds, in order.
    pub cursor_seconds: Vec<f64>,
}

/// One dlt run: what the script measured around `pipeline.run` (in `run.seconds`), and the
/// whole process as the parent saw it (interpreter start and imports included).
#[derive(Debug, Clone, Copy, Default)]
pub struct DltRun {
    pub run: Measured,
    pub process_seconds: f64,
}

/// The Python of `make bench-dlt`'s virtual environment (or `BACKFLOW_BENCH_DLT_PYTHON`), if
/// it exists.
fn dlt_python() -> Option<PathBuf> {
    let path = std::env::var_os("BACKFLOW_BENCH_DLT_PYTHON").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/dlt/.venv/bin/python"
            ))
        },
        PathBuf::from,
    );
    path.exists().then_some(path)
}

/// Runs `benches/dlt/cursor.py` once against the model at `database_url`, its pipeline state
/// in `pipelines`.
async fn dlt_run(python: &Path, database_url: &str, sink: &str, pipelines: &Path) -> DltRun {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/dlt/cursor.py");
    let started = Instant::now();
    let out = tokio::process::Command::new(python)
        .arg(script)
        .args(["--database-url", database_url, "--sink", sink, "--pipelines-dir"])
        .arg(pipelines)
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("run the dlt script");
    let process_seconds = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "the dlt script failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("dlt script output {last:?}: {e}"));
    let number = |name: &str| json.get(name).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    DltRun {
        run: Measured {
            seconds: number("seconds"),
            rows: number("rows") as u64,
            accepted: number("rows") as u64,
            requests: number("requests") as u64,
            cpu_seconds: number("cpu_seconds"),
            peak_rss_mib: number("peak_rss_mib"),
            ..Measured::default()
        },
        process_seconds,
    }
}

/// The median by seconds of `runs` (not empty).
fn median_by<T: Copy>(runs: &[T], seconds: impl Fn(&T) -> f64) -> T {
    let mut sorted = runs.to_vec();
    sorted.sort_by(|a, b| seconds(a).total_cmp(&seconds(b)));
    sorted[sorted.len() / 2]
}

/// Runs the cursor phases on a model of `rows` rows.
pub async fn bench(
    admin_url: &str,
    rows: u64,
    repeat: usize,
    sink: &crate::sink::Sink,
    api_server: &str,
) -> CursorReport {
    eprintln!("cursor mode, {rows} rows ...");
    let model = crate::model::Model::create(admin_url, rows).await;
    model
        .exec(
            "ALTER TABLE customers ADD COLUMN updated_at timestamptz;
             UPDATE customers SET updated_at = timestamptz '2021-01-01' + id * interval '1 second';
             ALTER TABLE customers ALTER COLUMN updated_at SET NOT NULL;
             CREATE INDEX customers_updated_at ON customers (updated_at);",
        )
        .await;
    // The update left a dead copy of every row: COPY and the runs read a clean heap.
    model.exec("VACUUM FULL customers").await;
    let state = tempfile::tempdir().expect("temp dir");
    let dlt_state = tempfile::tempdir().expect("temp dir");
    let python = dlt_python();
    if python.is_none() {
        eprintln!("  (no dlt: `make bench-dlt` installs it in benches/dlt/.venv)");
    }
    let phase = |kind: Kind| Phase {
        kind,
        database_url: model.url.clone(),
        query: QUERY.to_owned(),
        state_dir: state.path().to_string_lossy().into_owned(),
        api_server: api_server.to_owned(),
    };
    let run = |full_diff: bool| {
        phase(Kind::CursorRun {
            sync: "customers-cursor".to_owned(),
            full_diff,
            destination: Box::new(crate::sink_destination(&sink.url)),
        })
    };
    let copy = crate::median(&phase(Kind::Copy), repeat).await;
    sink.reset(0, false);
    let first = phase::spawn(&run(false)).await;
    let dlt_first = match &python {
        Some(python) => {
            eprintln!("  dlt's first run ...");
            sink.reset(0, false);
            Some(dlt_run(python, &model.url, &sink.url, dlt_state.path()).await)
        }
        None => None,
    };
    model
        .exec("UPDATE customers SET plan = 'changed', updated_at = clock_timestamp() WHERE id % 100 = 0")
        .await;
    sink.reset(0, false);
    let full_diff = phase::spawn(&run(true)).await;
    if let Some(python) = &python {
        // dlt's mark moves past the same change (its run reads it; not measured).
        sink.reset(0, false);
        dlt_run(python, &model.url, &sink.url, dlt_state.path()).await;
    }
    let (mut past, mut dlt_cursor) = (Vec::new(), Vec::new());
    for k in 1..=repeat {
        model
            .exec(&format!(
                "UPDATE customers SET plan = 'changed {k}', updated_at = clock_timestamp() WHERE id % 100 = {k}"
            ))
            .await;
        sink.reset(0, false);
        past.push(phase::spawn(&run(false)).await);
        if let Some(python) = &python {
            sink.reset(0, false);
            dlt_cursor.push(dlt_run(python, &model.url, &sink.url, dlt_state.path()).await);
        }
    }
    drop(state);
    drop(dlt_state);
    model.drop_database().await;
    let past_mark = median_by(&past, |m| m.seconds);
    CursorReport {
        rows,
        copy,
        first,
        full_diff,
        past_mark: Measured {
            peak_rss_mib: past.iter().map(|m| m.peak_rss_mib).fold(0.0, f64::max),
            ..past_mark
        },
        past_mark_seconds: past.iter().map(|m| m.seconds).collect(),
        dlt: dlt_first.map(|first| DltReport {
            first,
            cursor: median_by(&dlt_cursor, |d| d.run.seconds),
            cursor_seconds: dlt_cursor.iter().map(|d| d.run.seconds).collect(),
        }),
    }
}

/// The child's side of [`Kind::CursorRun`].
pub async fn child(
    phase: &Phase,
    sync: &str,
    full_diff: bool,
    destination: &backflow::api::DestinationSpec,
) -> Measured {
    let mut spec = phase::sync_spec(&phase.query, phase::Store::File);
    spec.cursor = Some(backflow::api::reverse_sync::CursorSpec {
        column: "updated_at".to_owned(),
        full_diff: None,
    });
    let options = backflow::engine::run::RunOptions {
        full_diff,
        ..Default::default()
    };
    phase::run_spec(phase, &spec, phase::Store::File, sync, destination, &options).await
}

/// Prints the cursor figures.
pub fn print(r: &CursorReport) {
    let ratio = |m: &Measured| m.seconds / r.copy.seconds.max(1e-9);
    let list = |xs: &[f64]| {
        xs.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!();
    println!(
        "Cursor mode, {} rows, 1% changed (File store, end to end):",
        r.rows
    );
    println!("  COPY of the whole model      {:>8.2} s", r.copy.seconds);
    println!(
        "  first run (full)             {:>8.2} s  {:>8} rows read  {:>7.1}x COPY  {:>6.2} s CPU  {:>5.0} MiB peak",
        r.first.seconds,
        r.first.rows,
        ratio(&r.first),
        r.first.cpu_seconds,
        r.first.peak_rss_mib,
    );
    for (name, m) in [("full diff", &r.full_diff), ("past the mark", &r.past_mark)] {
        println!(
            "  1% changed, {name:<16} {:>8.2} s  {:>8} rows read  {:>7} sent  {:>5.0} MiB peak  {:>7.2}x COPY  {:>6.2} s CPU",
            m.seconds,
            m.rows,
            m.accepted,
            m.peak_rss_mib,
            ratio(m),
            m.cpu_seconds,
        );
    }
    println!(
        "  past the mark: median of {} runs ({} s); {:.1}x faster than the full diff",
        r.past_mark_seconds.len(),
        list(&r.past_mark_seconds),
        r.full_diff.seconds / r.past_mark.seconds.max(1e-9)
    );
    let Some(dlt) = &r.dlt else {
        println!("  dlt: not installed (`make bench-dlt`)");
        return;
    };
    for (name, d) in [("dlt first run", &dlt.first), ("dlt 1% cursor run", &dlt.cursor)] {
        println!(
            "  {name:<28} {:>8.2} s  {:>8} rows sent  {:>5} requests  {:>5.0} MiB peak  {:>6.2} s CPU  ({:.2} s with Python's start)",
            d.run.seconds,
            d.run.rows,
            d.run.requests,
            d.run.peak_rss_mib,
            d.run.cpu_seconds,
            d.process_seconds,
        );
    }
    println!(
        "  dlt cursor runs: median of {} ({} s); Backflow past the mark is {:.1}x faster (aim: >= 3x)",
        dlt.cursor_seconds.len(),
        list(&dlt.cursor_seconds),
        dlt.cursor.run.seconds / r.past_mark.seconds.max(1e-9)
    );
}
