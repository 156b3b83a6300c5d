//! `make bench-100m`: one model of `BACKFLOW_BENCH_ROWS` rows (default 100,000,000) with 1%
//! of its rows changed (`BACKFLOW_BENCH_CHANGED_PERCENT` for more; with
//! `BACKFLOW_BENCH_REMOVED_PERCENT`, that share of the rows is also deleted from the model), File store, run as one process each within the chart's defaults
//! (`resources.limits.memory` 256 MiB, `tmpSizeLimit`, aimed at under 10 GB of `/tmp`). A first
//! run end to end builds the state; then 1% of rows change and the second run is planned and
//! run end to end. Prints each phase next to COPY with its peak RSS and its peak of local disk.

use crate::model::Model;
use crate::phase::{self, Kind, Measured, Store};
use crate::report::thousands;
use crate::sink::Sink;

/// Peak RSS allowed by the chart's default memory limit.
const AIM_PEAK_MIB: f64 = 256.0;
/// Local disk a run may hold in `/tmp`.
const AIM_TMP_BYTES: f64 = 10e9;
/// Second-run plan against COPY.
const AIM_PLAN_VS_COPY: f64 = 3.0;

pub async fn bench(admin_url: &str, sink: &Sink) {
    let rows: u64 = std::env::var("BACKFLOW_BENCH_ROWS")
        .ok()
        .and_then(|r| r.replace('_', "").parse().ok())
        .unwrap_or(100_000_000);
    let percent: u8 = std::env::var("BACKFLOW_BENCH_CHANGED_PERCENT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(1)
        .clamp(1, 100);
    let removed_percent: u8 = std::env::var("BACKFLOW_BENCH_REMOVED_PERCENT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
        .min(100 - percent);
    eprintln!("creating a {rows}-row model ...");
    let model = Model::create(admin_url, rows).await;
    let state = tempfile::tempdir().expect("temp dir");
    let phase = |kind: Kind| model.phase(kind, state.path(), "");
    let destination = crate::sink_destination(&sink.url);
    let run = |dry_run: bool| {
        phase(Kind::Run {
            store: Store::File,
            sync: "customers-huge".to_owned(),
            dry_run,
            destination: Box::new(destination.clone()),
        })
    };
    eprintln!("  COPY, first run end to end ...");
    let copy_first = phase::spawn(&phase(Kind::Copy)).await;
    sink.reset(0, false);
    let first = phase::spawn(&run(false)).await;
    eprintln!("  {percent}% of rows changed, COPY, plan, second run end to end ...");
    model.change_percent(percent).await;
    if removed_percent > 0 {
        eprintln!("  and {removed_percent}% of rows deleted ...");
        model
            .exec(&format!(
                "DELETE FROM customers WHERE id % 100 >= {}",
                100 - u32::from(removed_percent)
            ))
            .await;
    }
    let copy_second = phase::spawn(&phase(Kind::Copy)).await;
    let plan = phase::spawn(&run(true)).await;
    sink.reset(0, false);
    let second = phase::spawn(&run(false)).await;
    drop(state);
    model.drop_database().await;

    println!(
        "\n== {} rows, File store, {percent}% changed, {removed_percent}% deleted: each phase one process ==",
        thousands(rows)
    );
    println!(
        "{:<40} {:>9} {:>8} {:>9} {:>9} {:>12} {:>10} {:>9}",
        "phase", "seconds", "vs COPY", "CPU s", "peak MiB", "peak /tmp MB", "/tmp B/row", "requests"
    );
    let line = |name: &str, m: &Measured, copy: f64| {
        println!(
            "{name:<40} {:>9.1} {:>7.2}x {:>9.1} {:>9.1} {:>12.0} {:>10.1} {:>9}",
            m.seconds,
            m.seconds / copy.max(1e-9),
            m.cpu_seconds,
            m.peak_rss_mib,
            m.peak_tmp_bytes as f64 / 1e6,
            m.peak_tmp_bytes as f64 / rows.max(1) as f64,
            m.requests
        );
    };
    line("COPY (query) TO STDOUT", &copy_first, copy_first.seconds);
    line("end to end, first run", &first, copy_first.seconds);
    line(
        &format!("COPY, after {percent}% of rows changed"),
        &copy_second,
        copy_second.seconds,
    );
    line("plan only, second run", &plan, copy_second.seconds);
    line("end to end, second run", &second, copy_second.seconds);
    let peak = [&first, &plan, &second]
        .iter()
        .map(|m| m.peak_rss_mib)
        .fold(0.0, f64::max);
    let tmp = [&first, &plan, &second]
        .iter()
        .map(|m| m.peak_tmp_bytes as f64)
        .fold(0.0, f64::max);
    let ratio = plan.seconds / copy_second.seconds.max(1e-9);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "aims at {} rows: peak RSS under {AIM_PEAK_MIB} MiB: {peak:.1} MiB ({}); /tmp under {:.0} GB: {:.2} GB ({}); \
         second-run plan within {AIM_PLAN_VS_COPY}x of COPY: {ratio:.2}x ({}); spill {:.1} B/row",
        thousands(rows),
        verdict(peak < AIM_PEAK_MIB),
        AIM_TMP_BYTES / 1e9,
        tmp / 1e9,
        verdict(tmp < AIM_TMP_BYTES),
        verdict(ratio <= AIM_PLAN_VS_COPY),
        first.spill_bytes as f64 / rows.max(1) as f64,
    );
}
