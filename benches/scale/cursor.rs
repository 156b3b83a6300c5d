//! Cursor mode at scale: the same 1% change found by a full diff and by a run that reads only
//! past the high-water mark, end to end (File store, the sink of the other runs), next to
//! `COPY (query) TO STDOUT` of the whole model.
//!
//! The model gains `updated_at` (indexed, as a cursor column should be). After a first run, 1%
//! of rows change with `updated_at = clock_timestamp()` and a full diff sends them; then
//! another 1% change and a cursor run sends those. Both runs send the same number of records,
//! so the difference is what each reads and plans.

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
    pub past_mark: Measured,
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
            "ALTER TABLE customers ADD COLUMN updated_at timestamptz NOT NULL DEFAULT '2021-01-01';
             CREATE INDEX customers_updated_at ON customers (updated_at);",
        )
        .await;
    let state = tempfile::tempdir().expect("temp dir");
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
    model
        .exec("UPDATE customers SET plan = 'changed', updated_at = clock_timestamp() WHERE id % 100 = 0")
        .await;
    sink.reset(0, false);
    let full_diff = phase::spawn(&run(true)).await;
    model
        .exec(
            "UPDATE customers SET plan = 'changed again', updated_at = clock_timestamp() WHERE id % 100 = 1",
        )
        .await;
    sink.reset(0, false);
    let past_mark = phase::spawn(&run(false)).await;
    drop(state);
    model.drop_database().await;
    CursorReport {
        rows,
        copy,
        first,
        full_diff,
        past_mark,
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
    println!();
    println!(
        "Cursor mode, {} rows, 1% changed (File store, end to end):",
        r.rows
    );
    println!("  COPY of the whole model      {:>8.2} s", r.copy.seconds);
    println!(
        "  first run (full)             {:>8.2} s  {:>8} rows read  {:>7.1}x COPY",
        r.first.seconds,
        r.first.rows,
        ratio(&r.first)
    );
    for (name, m) in [("full diff", &r.full_diff), ("past the mark", &r.past_mark)] {
        println!(
            "  1% changed, {name:<16} {:>8.2} s  {:>8} rows read  {:>7} sent  {:>5.0} MiB peak  {:>7.2}x COPY",
            m.seconds,
            m.rows,
            m.accepted,
            m.peak_rss_mib,
            ratio(m)
        );
    }
    println!(
        "  past the mark / full diff: {:.1}x faster",
        r.full_diff.seconds / r.past_mark.seconds.max(1e-9)
    );
}
