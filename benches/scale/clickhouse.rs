//! The ClickHouse source at scale, next to ClickHouse's own serving speed of the same query
//! measured in the same run.
//!
//! For each size (`BACKFLOW_BENCH_SOURCE_ROWS`, default `100000,1000000`), the same
//! `customers` model in a ClickHouse database of its own (the server of
//! `BACKFLOW_TEST_CLICKHOUSE_URL`, default `http://127.0.0.1:8123`, user `default`), then,
//! each in a child process for its own peak RSS (VmHWM): a raw HTTP read of the query's body
//! in the format the source reads (the baseline: the server producing it, the client
//! discarding it), the source alone (`backflow::source::extract`, every row decoded and
//! counted), and a plan-only run with the File store. Two sizes show whether the source's
//! peak memory grows with the rows. Skipped with a note when no server answers.

use std::time::Duration;

use crate::model::QUERY;
use crate::phase::{Kind, Measured, Phase, Store};

/// The figures of the ClickHouse section.
pub struct ClickHouseReport {
    pub rows: u64,
    pub raw: Measured,
    pub source: Measured,
    pub plan: Measured,
}

fn http_url() -> String {
    std::env::var("BACKFLOW_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".to_owned())
}

async fn exec(sql: &str) -> Result<String, String> {
    let response = reqwest::Client::new()
        .post(http_url())
        .body(sql.to_owned())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let ok = response.status().is_success();
    let text = response.text().await.map_err(|e| e.to_string())?;
    if ok { Ok(text) } else { Err(text) }
}

/// Sizes from `BACKFLOW_BENCH_SOURCE_ROWS`.
pub fn sizes() -> Vec<u64> {
    std::env::var("BACKFLOW_BENCH_SOURCE_ROWS")
        .unwrap_or_else(|_| "100000,1000000".to_owned())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .collect()
}

/// Every size in turn; empty when no ClickHouse answers.
pub async fn bench(repeat: usize) -> Vec<ClickHouseReport> {
    if exec("SELECT 1").await.is_err() {
        eprintln!("no ClickHouse at {}: skipping the ClickHouse source", http_url());
        return Vec::new();
    }
    let state = tempfile::tempdir().expect("temp dir");
    let mut reports = Vec::new();
    for rows in sizes() {
        reports.push(bench_size(rows, repeat, &state.path().to_string_lossy()).await);
    }
    reports
}

/// Creates the model, measures, drops the model.
async fn bench_size(rows: u64, repeat: usize, state_dir: &str) -> ClickHouseReport {
    let db = format!("bf_bench_{}_{rows}", std::process::id());
    eprintln!("creating a {rows}-row ClickHouse model ...");
    exec(&format!("CREATE DATABASE {db}"))
        .await
        .expect("create database");
    exec(&format!(
        "CREATE TABLE {db}.customers (id Int64, email String, first_name String, last_name String,
           plan String, mrr Decimal(12, 2), signed_up_at DateTime('UTC'), is_active UInt8, score Float64)
         ENGINE = MergeTree ORDER BY id"
    ))
    .await
    .expect("create table");
    exec(&format!(
        "INSERT INTO {db}.customers SELECT number + 1 AS i, concat('User', toString(i), '@Example.com'),
           concat('First', toString(i % 1000)), concat('Last', toString(i % 777)),
           ['free', 'starter', 'growth', 'enterprise'][1 + i % 4], toDecimal64(i % 5000, 2) / 100,
           toDateTime('2021-01-01 00:00:00', 'UTC') + i * 60, i % 10 != 0, i * 0.37
         FROM numbers({rows})"
    ))
    .await
    .expect("fill table");
    let host = http_url().trim_start_matches("http://").to_owned();
    let url = format!("clickhouse://default@{host}/{db}");
    let phase = |kind: Kind| Phase {
        kind,
        database_url: url.clone(),
        query: QUERY.to_owned(),
        state_dir: state_dir.to_owned(),
        api_server: String::new(),
    };
    eprintln!("  raw HTTP read, source, plan ...");
    let raw = crate::median(&phase(Kind::ClickHouseRaw { rows }), repeat).await;
    let source = crate::median(&phase(Kind::SourceOnly), repeat).await;
    let plan = crate::median(
        &phase(Kind::Run {
            store: Store::File,
            sync: "customers-clickhouse".to_owned(),
            dry_run: true,
            destination: Box::new(crate::sink_destination("http://127.0.0.1:9")),
        }),
        repeat,
    )
    .await;
    let _ = exec(&format!("DROP DATABASE {db}")).await;
    assert_eq!(source.rows, rows, "ClickHouse source rows");
    ClickHouseReport {
        rows,
        raw,
        source,
        plan,
    }
}

/// The baseline: the query's body in RowBinary read and discarded, as fast as the server
/// sends it. `RowBinaryWithNamesAndTypes` where the server has it, else `RowBinary` (the
/// formats the source reads).
pub async fn raw_read(phase: &Phase, rows: u64) -> Measured {
    let db = phase
        .database_url
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let client = reqwest::Client::new();
    let mut bytes = 0_u64;
    for format in ["RowBinaryWithNamesAndTypes", "RowBinary"] {
        let mut response = client
            .post(format!(
                "{}/?database={db}&default_format={format}&readonly=2",
                http_url()
            ))
            .body(phase.query.clone())
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .expect("raw read");
        if !response.status().is_success() {
            continue;
        }
        while let Some(chunk) = response.chunk().await.expect("raw read chunk") {
            bytes += chunk.len() as u64;
        }
        break;
    }
    assert!(bytes > 0, "the raw read got no body");
    Measured {
        rows,
        ..Measured::default()
    }
}

/// The source alone: every row extracted, decoded and counted.
pub async fn source_only(phase: &Phase) -> Measured {
    let options = backflow::source::SourceOptions::default();
    let mut stream = backflow::source::extract(&phase.database_url, &phase.query, &options)
        .await
        .expect("extract");
    let mut rows = 0_u64;
    while let Some(row) = stream.next().await {
        row.expect("row");
        rows += 1;
    }
    Measured {
        rows,
        ..Measured::default()
    }
}

/// Prints the section: one table for every size, then the source's peak memory across them.
pub fn print(reports: &[ClickHouseReport]) {
    let Some(first) = reports.first() else {
        return;
    };
    println!("\n== ClickHouse source (server {}) ==", http_url());
    println!(
        "{:<48} {:>10} {:>8} {:>11} {:>9} {:>8}",
        "phase", "rows", "seconds", "rows/s", "peak MiB", "vs raw"
    );
    for report in reports {
        let raw = report.raw.seconds;
        for (name, m) in [
            ("raw HTTP read of the same RowBinary body", &report.raw),
            ("ClickHouse source: extract, decode every row", &report.source),
            ("File store plan only (empty state)", &report.plan),
        ] {
            println!(
                "{name:<48} {:>10} {:>8.2} {:>11} {:>9.1} {:>7.2}x",
                crate::report::thousands(report.rows),
                m.seconds,
                crate::report::thousands((m.rows as f64 / m.seconds.max(1e-9)) as u64),
                m.peak_rss_mib,
                m.seconds / raw.max(1e-9)
            );
        }
    }
    if let Some(last) = reports.last().filter(|l| l.rows != first.rows) {
        println!(
            "source peak RSS (VmHWM of its own process): {:.1} MiB at {} rows, {:.1} MiB at {} rows ({:+.1} MiB)",
            first.source.peak_rss_mib,
            crate::report::thousands(first.rows),
            last.source.peak_rss_mib,
            crate::report::thousands(last.rows),
            last.source.peak_rss_mib - first.source.peak_rss_mib
        );
    }
}
