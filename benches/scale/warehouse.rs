//! `BACKFLOW_BENCH_ONLY=warehouse`: the Warehouse store's runs end to end next to COPY and
//! the File store's first run, in a few minutes, for each size of `BACKFLOW_BENCH_ROWS`:
//! COPY, the File store's first run (the reference: its checkpoints go to a local journal),
//! the Warehouse store's first run (checkpoints journaled in `backflow_journal`, folded into
//! `backflow_state` at the end), then 1% of rows changed, COPY again and the Warehouse
//! store's second run. COPY runs `BACKFLOW_BENCH_REPEAT` times (median time, highest peak);
//! the runs change the state and run once.

use crate::phase::{self, Kind, Measured, Phase, Store};
use crate::report::{header, line};
use crate::sink::{Seen, Sink};

/// One line of the table: its name, what it measured, what the sink saw (end-to-end runs),
/// and the COPY it is set against.
struct Line {
    name: &'static str,
    measured: Measured,
    seen: Option<Seen>,
    copy: f64,
}

async fn bench_size(admin_url: &str, rows: u64, repeat: usize, sink: &Sink, api_server: &str) -> Vec<Line> {
    eprintln!("creating a {rows}-row model ...");
    let model = crate::model::Model::create(admin_url, rows).await;
    let state = tempfile::tempdir().expect("temp dir");
    let phase = |kind: Kind| model.phase(kind, state.path(), api_server);
    let destination = crate::sink_destination(&sink.url);
    let run = |store: Store| phase(Kind::store_run(store, false, &destination));
    let mut lines = Vec::new();
    eprintln!("  COPY, File and Warehouse first runs ...");
    let copy = crate::median(&phase(Kind::Copy), repeat).await;
    lines.push(Line {
        name: "COPY (query) TO STDOUT",
        measured: copy,
        seen: None,
        copy: copy.seconds,
    });
    lines.push(
        end_to_end(
            "File      end to end, first run",
            &run(Store::File),
            sink,
            copy.seconds,
        )
        .await,
    );
    lines.push(
        end_to_end(
            "Warehouse end to end, first run",
            &run(Store::Warehouse),
            sink,
            copy.seconds,
        )
        .await,
    );
    eprintln!("  1% of rows changed, COPY, Warehouse second run ...");
    model.change_one_percent().await;
    let copy_second = crate::median(&phase(Kind::Copy), repeat).await;
    lines.push(Line {
        name: "COPY, after 1% of rows changed",
        measured: copy_second,
        seen: None,
        copy: copy_second.seconds,
    });
    lines.push(
        end_to_end(
            "Warehouse end to end, second run",
            &run(Store::Warehouse),
            sink,
            copy_second.seconds,
        )
        .await,
    );
    drop(state);
    model.drop_database().await;
    lines
}

/// One run end to end into the sink, with what the sink saw.
async fn end_to_end(name: &'static str, run: &Phase, sink: &Sink, copy: f64) -> Line {
    sink.reset(0, false);
    let measured = phase::spawn(run).await;
    Line {
        name,
        measured,
        seen: Some(sink.seen()),
        copy,
    }
}

/// Runs the Warehouse store's phases at every size and prints one table per size.
pub async fn bench(admin_url: &str, sizes: &[u64], repeat: usize, sink: &Sink, api_server: &str) {
    let mut tables = Vec::new();
    for &rows in sizes {
        tables.push((rows, bench_size(admin_url, rows, repeat, sink, api_server).await));
    }
    println!(
        "\nThe Warehouse store end to end next to COPY and the File store, PostgreSQL, {} core(s); COPY: median of {repeat}; runs once",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (rows, lines) in tables {
        header(rows);
        for l in &lines {
            line(l.name, &l.measured, l.seen.as_ref(), l.copy, rows);
        }
    }
}
