//! Progress of a run in flight on a real Kubernetes control plane (`support::cluster`): the
//! operator binary writes `status.progress` through the API server (whose CRD schema prunes
//! any field it does not declare) and serves moving counters on `/metrics` while a run goes
//! on, then the run's summary takes over.

mod support;

use std::time::{Duration, Instant};

use kube::api::Api;

use backflow::api::ReverseSync;
use backflow::api::reverse_sync::RunProgress;
use support::cluster::{Process, control_plane};
use support::db::TestDb;

/// Rows of the model; at 4 requests a second of 10 rows, delivery takes about 3 s.
const ROWS: u64 = 120;

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The value of the series starting with `series` in a Prometheus exposition.
fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_run_shows_its_progress_in_status_and_metrics_until_it_ends() {
    let plane = control_plane();
    let ns = plane.namespace("progress");
    let db = TestDb::postgres("progress").await;
    db.exec(&format!(
        "CREATE TABLE customers (id INT PRIMARY KEY, email TEXT);
         INSERT INTO customers SELECT g, 'user' || g || '@example.com' FROM generate_series(1, {ROWS}) g;
         CREATE TABLE crm (id INT PRIMARY KEY, email TEXT);"
    ))
    .await;
    let operator = Process::operator(
        &plane.operator_kubeconfig(),
        "progress",
        &["--watch-namespace", &ns, "--progress-interval-seconds", "1"],
    );
    let yaml = format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: warehouse
  namespace: {ns}
  annotations: {{backflow.dev/allowed-references: "Destination/*, ReverseSync/*"}}
stringData: {{url: "{url}"}}
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: crm, namespace: {ns}}}
spec:
  type: postgres
  credentialsSecretRef: {{name: warehouse}}
  postgres: {{table: crm}}
  batchSize: 10
  rateLimit: {{requestsPerSecond: 4, burst: 1}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: paced, namespace: {ns}}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: SELECT id, email FROM customers
    primaryKey: [id]
  destinationRef: {{name: crm}}
  mappings:
    - {{from: id, to: id}}
    - {{from: email, to: email}}
  match: [id]
"#,
        url = db.url
    );
    let file = plane.dir.join(format!("progress-{ns}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    plane.kubectl(&["apply", "-f", &file.to_string_lossy()]);

    let client = plane.admin().await;
    let api: Api<ReverseSync> = Api::namespaced(client, &ns);
    let written =
        format!(r#"backflow_sync_rows_total{{namespace="{ns}",op="write",outcome="sent",sync="paced"}}"#);
    let throttled = format!(r#"backflow_sync_throttled_seconds_total{{namespace="{ns}",sync="paced"}}"#);
    let mut seen: Vec<RunProgress> = Vec::new();
    let mut metrics_mid_run = Vec::new();
    let mut wide = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    let end = loop {
        let s = api.get("paced").await.unwrap();
        let status = s.status.clone().unwrap_or_default();
        if status.last_run.is_some() {
            break s;
        }
        if let Some(p) = status.progress {
            if p.phase == "Delivering" && wide.is_none() {
                let table = plane.kubectl(&["get", "rsync", "-n", &ns, "-o", "wide"]);
                if table.contains("Delivering") {
                    wide = Some(table);
                }
            }
            let (_, exposition) = operator.get("/metrics").await;
            if let Some(n) = value(&exposition, &written) {
                metrics_mid_run.push(n);
            }
            seen.push(p);
        }
        assert!(
            Instant::now() < deadline,
            "the run did not end within 90 s; seen {seen:?}\n{}",
            tail(&operator.log_text(), 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let delivering: Vec<&RunProgress> = seen.iter().filter(|p| p.phase == "Delivering").collect();
    let sent: Vec<u64> = delivering.iter().map(|p| p.records_sent).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "only grows: {sent:?}");
    let mid: std::collections::BTreeSet<u64> =
        sent.iter().copied().filter(|n| (1..ROWS).contains(n)).collect();
    assert!(mid.len() >= 2, "watched the count move: {seen:?}");
    for p in &delivering {
        assert_eq!((p.rows_read, p.records_to_send), (ROWS, ROWS), "{p:?}");
    }
    assert!(
        delivering.iter().any(|p| p.throttled_seconds > 0.0),
        "the rate limit held delivery back: {delivering:?}"
    );
    assert!(
        delivering.iter().any(|p| p.estimated_seconds_left.is_some()),
        "{delivering:?}"
    );
    assert!(
        metrics_mid_run.iter().any(|n| *n > 0.0 && *n < ROWS as f64),
        "/metrics moved mid-run: {metrics_mid_run:?}"
    );

    let wide = wide.expect("kubectl get -o wide showed the run delivering");
    let header = wide.lines().next().unwrap_or_default();
    for column in ["PHASE", "SENT", "TO SEND"] {
        assert!(header.contains(column), "{wide}");
    }
    let row = wide.lines().find(|l| l.starts_with("paced")).unwrap_or_default();
    assert!(row.contains(&ROWS.to_string()), "{wide}");

    let status = end.status.unwrap();
    assert_eq!(status.progress, None, "the summary takes over");
    assert_eq!(status.last_run.unwrap().rows_added, ROWS);
    // The run records its metrics just after its status: give it a moment.
    let mut exposition = String::new();
    for _ in 0..50 {
        exposition = operator.get("/metrics").await.1;
        if value(&exposition, &written) == Some(ROWS as f64) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(value(&exposition, &written), Some(ROWS as f64), "counted once");
    assert!(value(&exposition, &throttled).is_some_and(|s| s > 0.0));
}
