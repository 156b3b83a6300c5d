//! A run killed mid-delivery (SIGKILL of a real process, a slow destination) loses no row on
//! the rerun and resends at most one checkpoint plus the batches that were in flight, in a
//! full run and in a cursor run (whose high-water mark does not move).

mod support;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::http_server::{Behaviour, HttpDouble};
use support::sqlite::TempSqlite;

const ROWS: u64 = 2000;
const BATCH: u64 = 20;
const CONCURRENCY: u64 = 2;
const CHECKPOINT: u64 = 100;

fn manifests(warehouse: &str, url: &str) -> String {
    manifests_with(warehouse, url, "SELECT id, email FROM customers", "")
}

fn manifests_with(warehouse: &str, url: &str, query: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: warehouse}}
stringData: {{url: "{warehouse}"}}
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: hook}}
spec:
  type: http
  batchSize: {BATCH}
  maxConcurrency: {CONCURRENCY}
  rateLimit: {{requestsPerSecond: 1000}}
  http: {{url: "{url}/ingest"}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: customers}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: "{query}"
    primaryKey: [id]
  destinationRef: {{name: hook}}
  mappings:
    - {{from: id, to: id}}
    - {{from: email, to: email}}
{extra}"#
    )
}

fn backflow(file: &std::path::Path, state: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backflow"));
    c.args([
        "run",
        "--output",
        "json",
        "--checkpoint-records",
        &CHECKPOINT.to_string(),
        "-f",
    ])
    .arg(file)
    .arg("--state-dir")
    .arg(state)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_killed_mid_delivery_loses_nothing_and_resends_at_most_one_checkpoint() {
    let warehouse = TempSqlite::new(&format!(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
         INSERT INTO customers SELECT i, 'u' || i || '@example.com' FROM n;"
    ))
    .await;
    let double = HttpDouble::start(Behaviour::accept_all().with_delay(Duration::from_millis(40))).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sync.yaml");
    std::fs::write(&file, manifests(&warehouse.url, &double.url)).unwrap();
    let state = dir.path().join("state");

    // Kill the first run once a good part of the rows has been delivered.
    let mut child = backflow(&file, &state).spawn().unwrap();
    kill_after(&mut child, &double, 30).await;
    let before_rerun = double.received_records().len() as u64;
    assert!(before_rerun < ROWS, "the kill came too late to test anything");

    let out = backflow(&file, &state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut times_received: HashMap<i64, u64> = HashMap::new();
    for r in double.received_records() {
        *times_received.entry(r["id"].as_i64().unwrap()).or_default() += 1;
    }
    assert_eq!(times_received.len() as u64, ROWS, "every row arrived");
    let resent: u64 = times_received.values().map(|n| n - 1).sum();
    assert!(
        resent <= CHECKPOINT + BATCH * CONCURRENCY,
        "resent {resent} records; at most one checkpoint ({CHECKPOINT}) plus in-flight batches may be resent"
    );

    // A third run finds everything committed.
    let out = backflow(&file, &state).output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary[0]["unchanged"], ROWS);
    assert_eq!(summary[0]["requests"], 0);
}

/// Waits until the double has seen `requests` requests, then SIGKILLs the run: no cleanup, no
/// final commit.
async fn kill_after(child: &mut std::process::Child, double: &HttpDouble, requests: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while double.request_count() < requests {
        assert!(tokio::time::Instant::now() < deadline, "the run never got going");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it was killed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_run_killed_mid_delivery_keeps_its_mark_skips_no_row_and_resends_at_most_one_checkpoint() {
    let warehouse = TempSqlite::new(&format!(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, updated_at TIMESTAMP);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
         INSERT INTO customers SELECT i, 'u' || i || '@example.com', '2026-01-01 00:00:00' FROM n;"
    ))
    .await;
    let double = HttpDouble::start(Behaviour::accept_all().with_delay(Duration::from_millis(40))).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sync.yaml");
    std::fs::write(
        &file,
        manifests_with(
            &warehouse.url,
            &double.url,
            "SELECT id, email, updated_at FROM customers",
            "  cursor: {column: updated_at}\n",
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let first = backflow(&file, &state).output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );

    // Every row moves; the cursor run that sends them is killed midway.
    warehouse
        .exec("UPDATE customers SET email = 'v2-' || email, updated_at = '2026-01-01 00:01:00'")
        .await;
    let before = double.request_count();
    let mut child = backflow(&file, &state).spawn().unwrap();
    kill_after(&mut child, &double, before + 30).await;
    let v2 = |double: &HttpDouble| -> Vec<i64> {
        double
            .received_records()
            .iter()
            .filter(|r| r["email"].as_str().unwrap().starts_with("v2-"))
            .map(|r| r["id"].as_i64().unwrap())
            .collect()
    };
    assert!(
        (v2(&double).len() as u64) < ROWS,
        "the kill came too late to test anything"
    );

    // The mark did not move: the rerun reads past the first run's mark and sends the rest.
    let out = backflow(&file, &state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary[0]["cursor"]["read"], "pastMark");
    assert_eq!(summary[0]["cursor"]["mark"]["value"], "2026-01-01T00:00:00Z");
    let mut times_received: HashMap<i64, u64> = HashMap::new();
    for id in v2(&double) {
        *times_received.entry(id).or_default() += 1;
    }
    assert_eq!(times_received.len() as u64, ROWS, "every moved row arrived");
    let resent: u64 = times_received.values().map(|n| n - 1).sum();
    assert!(
        resent <= CHECKPOINT + BATCH * CONCURRENCY,
        "resent {resent} records; at most one checkpoint ({CHECKPOINT}) plus in-flight batches may be resent"
    );

    // Now the mark has moved: the next run reads the rows at it and sends nothing.
    let out = backflow(&file, &state).output().unwrap();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary[0]["cursor"]["mark"]["value"], "2026-01-01T00:01:00Z");
    assert_eq!(summary[0]["unchanged"], ROWS);
    assert_eq!(summary[0]["requests"], 0);
}
