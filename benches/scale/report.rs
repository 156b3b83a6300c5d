//! Printing: one table per model size, the File store's memory per row, delivery throughput,
//! and the scale targets with whether this run met them (computed, never assumed).

use std::time::Duration;

use crate::delivery::{self, Scenario};
use crate::phase::{Measured, Store};
use crate::sink::Seen;

/// The size the scale targets are stated for.
const AIM_ROWS: u64 = 10_000_000;
/// Warehouse store, second-run plan: at most this many times the COPY time...
const AIM_WAREHOUSE_VS_COPY: f64 = 3.0;
/// ...and under this peak RSS.
const AIM_WAREHOUSE_PEAK_MIB: f64 = 256.0;
/// File store: bytes of memory per stored row, under this.
const AIM_FILE_BYTES_PER_ROW: f64 = 64.0;
/// Delivery: at least this share of the rate limit.
const AIM_RATE_SHARE: f64 = 0.95;
/// The bench's earlier aim: File store plan only within this many times COPY.
const AIM_FILE_PLAN_VS_COPY: f64 = 2.0;
/// Plan only within this many times COPY (first and second run).
const AIM_PLAN_VS_COPY: f64 = 1.5;
/// CPU of a first run end to end, per model row (0.45 s for 100,000 rows).
const AIM_CPU_MICROS_PER_ROW: f64 = 4.5;
/// Spill bytes per model row.
const AIM_SPILL_BYTES_PER_ROW: f64 = 100.0;
/// Delivery against the sink's own ceiling.
const AIM_SINK_SHARE: f64 = 0.90;

/// The sink's own ceiling, measured in the same run.
pub struct Ceiling {
    pub measured: Measured,
    pub seen: Seen,
    /// Requests in flight, the destination's default `maxConcurrency`.
    pub concurrency: usize,
}

/// Requests per second the sink saw between its first and its last request.
fn sink_rate(seen: &Seen) -> f64 {
    seen.requests.saturating_sub(1) as f64 / seen.span_seconds.max(1e-9)
}

/// The figures of one store at one size.
pub struct StoreReport {
    pub store: Store,
    pub plan_first: Measured,
    pub run_first: Measured,
    pub sink_first: Seen,
    pub plan_second: Measured,
    pub run_second: Measured,
    pub sink_second: Seen,
}

/// The figures of one model size.
pub struct SizeReport {
    pub rows: u64,
    pub copy_first: Measured,
    pub copy_second: Measured,
    pub stores: Vec<StoreReport>,
    /// The File store's state loaded whole into memory (as a migration does), after the
    /// first run.
    pub fingerprints: Measured,
    /// The sink's own ceiling.
    pub ceiling: Ceiling,
    /// A File-store first run and the ceiling with the sink and its client on CPUs of their
    /// own, and which (none on a machine of one CPU).
    pub split: Option<(crate::delivery::Pair, String)>,
}

impl SizeReport {
    fn store(&self, store: Store) -> Option<&StoreReport> {
        self.stores.iter().find(|s| s.store == store)
    }
}

pub fn print(sizes: &[SizeReport], scenarios: &[Scenario], repeat: usize, wall: Duration) {
    println!(
        "\nbackflow scale benchmark: PostgreSQL, {} core(s); COPY and plan-only phases: median of {repeat}; \
         end-to-end runs once; wall time {:.0} s",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        wall.as_secs_f64()
    );
    println!(
        "stores: File, Warehouse, and ConfigMap (in the API server double of tests/support/apiserver.rs: no etcd, no network latency)"
    );
    for size in sizes {
        print_size(size);
    }
    print_delivery(scenarios);
    print_aims(sizes, scenarios);
}

fn print_size(size: &SizeReport) {
    header(size.rows);
    let copy_line = |m: &Measured| line("COPY (query) TO STDOUT", m, None, m.seconds, size.rows);
    copy_line(&size.copy_first);
    for s in &size.stores {
        let name = s.store.name();
        line(
            &format!("{name:<9} plan only, first run (empty state)"),
            &s.plan_first,
            None,
            size.copy_first.seconds,
            size.rows,
        );
        line(
            &format!("{name:<9} end to end, first run"),
            &s.run_first,
            Some(&s.sink_first),
            size.copy_first.seconds,
            size.rows,
        );
    }
    println!("-- 1% of rows changed --");
    copy_line(&size.copy_second);
    for s in &size.stores {
        let name = s.store.name();
        line(
            &format!("{name:<9} plan only, second run"),
            &s.plan_second,
            None,
            size.copy_second.seconds,
            size.rows,
        );
        line(
            &format!("{name:<9} end to end, second run"),
            &s.run_second,
            Some(&s.sink_second),
            size.copy_second.seconds,
            size.rows,
        );
    }
    let c = &size.ceiling;
    if let Some(file) = size.store(Store::File) {
        let engine = sink_rate(&file.sink_first);
        let ceiling = sink_rate(&c.seen);
        println!(
            "delivery: File first run reached {engine:.0} requests/s at the sink; the sink's own ceiling, a bare client \
             posting {} bodies of 100 records {} at a time: {ceiling:.0} requests/s ({:.2} CPU s) = {:.0}%",
            thousands(c.measured.requests),
            c.concurrency,
            c.measured.cpu_seconds,
            100.0 * engine / ceiling.max(1e-9)
        );
    }
    if let Some((pair, cpus)) = &size.split {
        println!(
            "delivery, {cpus}: File first run {:.0} requests/s, the sink's own ceiling {:.0} requests/s = {:.0}%",
            sink_rate(&pair.seen),
            sink_rate(&pair.ceiling_seen),
            100.0 * crate::delivery::share(pair)
        );
    }
    let f = &size.fingerprints;
    let rows = f.rows.max(1) as f64;
    let per_row = f.fingerprint_bytes as f64 / rows;
    let text = f.text_bytes as f64 / rows;
    // 32 bytes is `size_of::<Slot>()` (a unit test in src/state pins it).
    let slots = 32.0;
    if let Some(file) = size.store(Store::File) {
        let (held, whole) = file_bytes_per_row(file, size.rows);
        println!(
            "memory: File store runs hold no per-row state but a sample of at most 16 MiB of the stored pairs: \
             second-run plan peaks at {:.1} MiB against {:.1} MiB planning against an empty state = {held:.1} B per stored row \
             ({whole:.1} B/row counting the whole process)",
            file.plan_second.peak_rss_mib, file.plan_first.peak_rss_mib,
        );
    }
    println!(
        "        File state loaded whole into memory (a migration to another store only): {} rows, {:.1} MiB = \
         {per_row:.1} B/row (slots {slots:.1} + key and identity text {text:.1} + index and spare capacity {:.1}), {:.1} MiB peak",
        thousands(f.rows),
        f.fingerprint_bytes as f64 / 1048576.0,
        per_row - slots - text,
        f.peak_rss_mib
    );
    let rss_per_row = |m: &Measured| m.peak_rss_mib * 1048576.0 / size.rows.max(1) as f64;
    let rss: Vec<String> = size
        .stores
        .iter()
        .map(|s| format!("{} {:.0} B/row", s.store.name(), rss_per_row(&s.plan_second)))
        .collect();
    println!(
        "        peak RSS per row, plan only second run: {}",
        rss.join(", ")
    );
}

/// The File store's memory per stored row: what the second-run plan's peak RSS adds over the
/// plan against an empty state (same rows, same spill, nothing stored; negative when the
/// difference is within the allocator's noise), and the second-run peak over the row count
/// (an upper bound that includes the process itself).
fn file_bytes_per_row(file: &StoreReport, rows: u64) -> (f64, f64) {
    let rows = rows.max(1) as f64;
    let mib = 1048576.0;
    let held = (file.plan_second.peak_rss_mib - file.plan_first.peak_rss_mib) * mib / rows;
    (held, file.plan_second.peak_rss_mib * mib / rows)
}

/// The title and column heads of one size's table.
pub fn header(rows: u64) {
    println!("\n== {} rows ==", thousands(rows));
    println!(
        "{:<48} {:>8} {:>11} {:>9} {:>9} {:>10} {:>8} {:>7} {:>10} {:>11}",
        "phase",
        "seconds",
        "rows/s",
        "peak MiB",
        "requests",
        "rows sent",
        "vs COPY",
        "CPU s",
        "/tmp B/row",
        "spill B/row"
    );
}

/// One table line; end-to-end lines also check the sink saw the requests the engine counted.
pub fn line(name: &str, m: &Measured, sink: Option<&Seen>, copy_seconds: f64, rows: u64) {
    let requests = match sink {
        Some(seen) if seen.requests != m.requests => {
            format!("{}≠{}", m.requests, seen.requests)
        }
        Some(_) => m.requests.to_string(),
        None => "-".to_owned(),
    };
    let sent = sink.map_or("-".to_owned(), |_| m.accepted.to_string());
    let per_row = |bytes: u64| bytes as f64 / rows.max(1) as f64;
    println!(
        "{name:<48} {:>8.2} {:>11} {:>9.1} {requests:>9} {sent:>10} {:>7.2}x {:>7.2} {:>10.1} {:>11.1}",
        m.seconds,
        thousands((m.rows as f64 / m.seconds.max(1e-9)) as u64),
        m.peak_rss_mib,
        m.seconds / copy_seconds.max(1e-9),
        m.cpu_seconds,
        per_row(m.peak_tmp_bytes),
        per_row(m.spill_bytes)
    );
}

fn print_delivery(scenarios: &[Scenario]) {
    println!(
        "\n== delivery: {} rows to an http destination limited at R = {} requests/s (burst 1), batches of {} ==",
        thousands(delivery::ROWS),
        delivery::RATE,
        delivery::BATCH
    );
    println!(
        "{:<24} {:>11} {:>8} {:>5} {:>7} {:>8} {:>15} {:>17} {:>15} {:>6} {:>5}",
        "scenario",
        "concurrency",
        "requests",
        "503s",
        "retries",
        "seconds",
        "req/s whole run",
        "req/s sustained",
        "rows delivered",
        "failed",
        "lost"
    );
    for s in scenarios {
        let share = |rate: f64| format!("{rate:.1} ({:.1}%)", 100.0 * rate / delivery::RATE);
        println!(
            "{:<24} {:>11} {:>8} {:>5} {:>7} {:>8.2} {:>15} {:>17} {:>15} {:>6} {:>5}",
            s.label,
            s.concurrency,
            s.seen.requests,
            s.seen.failed,
            s.measured.retries,
            s.seen.span_seconds,
            share(s.rate()),
            share(s.sustained_rate()),
            format!("{}/{}", s.seen.distinct_ids, delivery::ROWS),
            s.measured.failed,
            s.lost()
        );
    }
}

fn print_aims(sizes: &[SizeReport], scenarios: &[Scenario]) {
    println!("\n== targets (stated for {} rows) ==", thousands(AIM_ROWS));
    for size in sizes {
        let at = format!(" [at {} rows]", thousands(size.rows));
        if let Some(w) = size.store(Store::Warehouse) {
            let ratio = w.plan_second.seconds / size.copy_second.seconds.max(1e-9);
            let peak = w.plan_second.peak_rss_mib;
            println!(
                "Warehouse store, second-run plan within {AIM_WAREHOUSE_VS_COPY}x of COPY: {ratio:.2}x ({}); \
                 peak RSS under {AIM_WAREHOUSE_PEAK_MIB} MiB: {peak:.1} MiB ({}){at}",
                verdict(ratio <= AIM_WAREHOUSE_VS_COPY),
                verdict(peak < AIM_WAREHOUSE_PEAK_MIB)
            );
        }
        if let Some(file) = size.store(Store::File) {
            let (held, whole) = file_bytes_per_row(file, size.rows);
            let by = if held < AIM_FILE_BYTES_PER_ROW {
                String::new()
            } else {
                format!(", {:.1} B/row over", held - AIM_FILE_BYTES_PER_ROW)
            };
            println!(
                "File store under {AIM_FILE_BYTES_PER_ROW} B per stored row in memory: {held:.1} B/row ({}{by}; \
                 {whole:.1} B/row counting the whole process){at}",
                verdict(held < AIM_FILE_BYTES_PER_ROW)
            );
        }
        if let Some(file) = size.store(Store::File) {
            let first = file.plan_first.seconds / size.copy_first.seconds.max(1e-9);
            let second = file.plan_second.seconds / size.copy_second.seconds.max(1e-9);
            println!(
                "(earlier aim) File store plan only within {AIM_FILE_PLAN_VS_COPY}x of COPY: first run {first:.2}x, \
                 second run {second:.2}x ({}){at}",
                verdict(first <= AIM_FILE_PLAN_VS_COPY && second <= AIM_FILE_PLAN_VS_COPY)
            );
        }
    }
    println!("-- per-row cost --");
    for size in sizes {
        let at = format!(" [at {} rows]", thousands(size.rows));
        let Some(file) = size.store(Store::File) else {
            continue;
        };
        let rows = size.rows.max(1) as f64;
        let cpu = file.run_first.cpu_seconds * 1e6 / rows;
        println!(
            "CPU of a first run end to end (File store) at most {AIM_CPU_MICROS_PER_ROW} µs per row: {cpu:.2} µs/row = \
             {:.2} s per 100,000 rows ({}){at}",
            cpu / 10.0,
            verdict(cpu <= AIM_CPU_MICROS_PER_ROW)
        );
        for s in &size.stores {
            let first = s.plan_first.seconds / size.copy_first.seconds.max(1e-9);
            let second = s.plan_second.seconds / size.copy_second.seconds.max(1e-9);
            println!(
                "{} store plan only within {AIM_PLAN_VS_COPY}x of COPY: first run {first:.2}x, second run {second:.2}x ({}){at}",
                s.store.name(),
                verdict(first <= AIM_PLAN_VS_COPY && second <= AIM_PLAN_VS_COPY)
            );
        }
        let spill = file.plan_first.spill_bytes as f64 / rows;
        println!(
            "spill at most {AIM_SPILL_BYTES_PER_ROW} B per model row (File store, every row spilled): {spill:.1} B/row ({}); \
             all of /tmp at its peak (spill, row index, both sides of the diff): {:.1} B/row{at}",
            verdict(spill <= AIM_SPILL_BYTES_PER_ROW),
            file.plan_second.peak_tmp_bytes as f64 / rows,
        );
        // Measured with the sink on a CPU of its own where the machine has two; sharing the
        // CPUs, the sink's ceiling depends on how much CPU its client leaves it.
        let (share, how) = match &size.split {
            Some((pair, cpus)) => (crate::delivery::share(pair), cpus.clone()),
            None => (
                sink_rate(&file.sink_first) / sink_rate(&size.ceiling.seen).max(1e-9),
                "sink and client sharing every CPU".to_owned(),
            ),
        };
        println!(
            "delivery at default concurrency at least {:.0}% of the sink's own ceiling ({how}): {:.0}% ({}){at}",
            AIM_SINK_SHARE * 100.0,
            share * 100.0,
            verdict(share >= AIM_SINK_SHARE)
        );
    }
    for s in scenarios {
        let share = s.sustained_rate() / delivery::RATE;
        println!(
            "delivery, {} (maxConcurrency {}): at least {:.0}% of R sustained: {:.1}% ({}; whole run {:.1}%); \
             zero lost rows: {} lost ({})",
            s.label,
            s.concurrency,
            AIM_RATE_SHARE * 100.0,
            share * 100.0,
            verdict(share >= AIM_RATE_SHARE),
            100.0 * s.rate() / delivery::RATE,
            s.lost(),
            verdict(s.lost() == 0 && s.measured.failed == 0)
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// `1234567` as `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
