//! `BACKFLOW_BENCH_ONLY=plan`: the plan alone next to raw `COPY (query) TO STDOUT`, in a few
//! minutes, for each size of `BACKFLOW_BENCH_ROWS`: COPY, the source alone (every row read
//! and decoded, nothing mapped), plan only on an empty state for each store, then a File
//! store first run end to end (to have a state), 1% of rows changed, COPY again and the File
//! store's plan only against that state. COPY, source and plan phases run
//! `BACKFLOW_BENCH_REPEAT` times (median time, highest peak).

use crate::phase::{self, Kind, Measured, Store};

/// One line of the table: its name, what it measured, and the COPY it is set against.
struct Line {
    name: String,
    measured: Measured,
    copy: f64,
}

/// Runs the plan phases for one model size and returns the lines of its table.
async fn bench_size(
    admin_url: &str,
    rows: u64,
    repeat: usize,
    sink: &crate::sink::Sink,
    api_server: &str,
) -> Vec<Line> {
    eprintln!("creating a {rows}-row model ...");
    let model = crate::model::Model::create(admin_url, rows).await;
    let state = tempfile::tempdir().expect("temp dir");
    let phase = |kind: Kind| model.phase(kind, state.path(), api_server);
    let destination = crate::sink_destination(&sink.url);
    let run = |store: Store, dry_run: bool| phase(Kind::store_run(store, dry_run, &destination));
    let mut lines = Vec::new();
    eprintln!("  COPY, source alone, plan only ...");
    let copy = crate::median(&phase(Kind::Copy), repeat).await;
    let mut line = |name: String, measured: Measured, copy: &Measured| {
        lines.push(Line {
            name,
            measured,
            copy: copy.seconds,
        });
    };
    line("COPY (query) TO STDOUT".to_owned(), copy, &copy);
    let source = crate::median(&phase(Kind::SourceOnly), repeat).await;
    line("source alone (read and decode)".to_owned(), source, &copy);
    for store in Store::ALL {
        let plan = crate::median(&run(store, true), repeat).await;
        line(format!("{:<9} plan only, first run", store.name()), plan, &copy);
    }
    eprintln!("  File store first run, 1% of rows changed, plan only ...");
    sink.reset(0, false);
    let first = phase::spawn(&run(Store::File, false)).await;
    line("File      end to end, first run".to_owned(), first, &copy);
    model.change_one_percent().await;
    let copy_second = crate::median(&phase(Kind::Copy), repeat).await;
    line(
        "COPY, after 1% of rows changed".to_owned(),
        copy_second,
        &copy_second,
    );
    let plan_second = crate::median(&run(Store::File, true), repeat).await;
    line(
        "File      plan only, second run".to_owned(),
        plan_second,
        &copy_second,
    );
    drop(state);
    model.drop_database().await;
    lines
}

/// Runs the plan phases at every size and prints one table per size.
pub async fn bench(
    admin_url: &str,
    sizes: &[u64],
    repeat: usize,
    sink: &crate::sink::Sink,
    api_server: &str,
) {
    let mut tables = Vec::new();
    for &rows in sizes {
        tables.push((rows, bench_size(admin_url, rows, repeat, sink, api_server).await));
    }
    println!(
        "\nThe plan next to COPY, PostgreSQL, {} core(s); COPY, source and plan-only phases: median of {repeat}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (rows, lines) in tables {
        println!("\n== {rows} rows ==");
        println!(
            "{:<40} {:>8} {:>8} {:>7} {:>10} {:>9} {:>11}",
            "phase", "seconds", "vs COPY", "CPU s", "CPU µs/row", "peak MiB", "spill B/row"
        );
        let per_row = |x: f64| x / rows.max(1) as f64;
        for l in lines {
            let m = &l.measured;
            println!(
                "{:<40} {:>8.2} {:>7.2}x {:>7.2} {:>10.2} {:>9.0} {:>11.1}",
                l.name,
                m.seconds,
                m.seconds / l.copy.max(1e-9),
                m.cpu_seconds,
                per_row(m.cpu_seconds * 1e6),
                m.peak_rss_mib,
                per_row(m.spill_bytes as f64),
            );
        }
    }
}
