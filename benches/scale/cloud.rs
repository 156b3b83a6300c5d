//! The cloud warehouse sources against their contract doubles: rows/s and peak RSS of an
//! extraction (`backflow::source::extract_from`, every row decoded to canonical values) next to
//! the double's own serving speed (the same requests from a bare HTTP client, partitions or
//! chunks fetched as far ahead, bodies counted but not decoded; BigQuery's pages are parsed
//! for their rows, fetched by `startIndex` as far ahead), at two result sizes so a flat peak shows memory does not
//! grow with the rows.
//!
//! The doubles run in the parent process; each measurement is a child process (peak RSS its
//! own). Sizes: `BACKFLOW_BENCH_CLOUD_ROWS` (default `100000,1000000`).

use std::collections::BTreeMap;
use std::sync::Arc;

use backflow::source::{Connection, Credentials, SourceOptions, extract_from};
use futures::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bigquery_double::{self as bq, BigQueryDouble, BqResult};
use crate::databricks_double::{self as db, DatabricksDouble, DbResult};
use crate::phase::{self, Kind, Measured, Phase};
use crate::snowflake_double::{self as sf, SfResult, SnowflakeDouble};

/// The statement both doubles serve.
const QUERY: &str = "SELECT id, email, plan, mrr, signed_up_at FROM customers";
/// The OAuth token the raw Snowflake client sends.
const RAW_TOKEN: &str = "bench-raw-token";
/// Partitions, chunks or pages fetched at once by the raw client (the sources fetch 3 ahead).
const RAW_AHEAD: usize = 3;
/// Rows of a BigQuery page, as the source asks.
const PAGE_ROWS: u32 = 10_000;

/// Which source a phase measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    Snowflake,
    Databricks,
    BigQuery,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Snowflake, Source::Databricks, Source::BigQuery];

    pub fn name(self) -> &'static str {
        match self {
            Source::Snowflake => "Snowflake",
            Source::Databricks => "Databricks",
            Source::BigQuery => "BigQuery",
        }
    }
}

/// One line of the report.
pub struct CloudLine {
    pub source: Source,
    pub rows: u64,
    pub raw: Measured,
    pub extract: Measured,
}

/// Sizes from `BACKFLOW_BENCH_CLOUD_ROWS`.
fn sizes() -> Vec<u64> {
    std::env::var("BACKFLOW_BENCH_CLOUD_ROWS")
        .unwrap_or_else(|_| "100000,1000000".to_owned())
        .split(',')
        .filter_map(|s| s.trim().replace('_', "").parse().ok())
        .collect()
}

fn snowflake_row(i: u64) -> Vec<Option<String>> {
    vec![
        Some((i + 1).to_string()),
        Some(format!("user{i}@example.com")),
        Some(["free", "pro", "team"][(i % 3) as usize].to_owned()),
        Some(format!("{}.{:02}", i % 1000, i % 100)),
        Some(format!("{}.000000000 1440", 1_700_000_000 + i)),
    ]
}

fn databricks_row(i: u64) -> Vec<Option<String>> {
    vec![
        Some((i + 1).to_string()),
        Some(format!("user{i}@example.com")),
        Some(["free", "pro", "team"][(i % 3) as usize].to_owned()),
        Some(format!("{}.{:02}", i % 1000, i % 100)),
        Some(format!("2024-01-01T00:00:{:02}.000Z", i % 60)),
    ]
}

fn bigquery_row(i: u64) -> Vec<serde_json::Value> {
    vec![
        json!((i + 1).to_string()),
        json!(format!("user{i}@example.com")),
        json!(["free", "pro", "team"][(i % 3) as usize]),
        json!(format!("{}.{:02}", i % 1000, i % 100)),
        json!(((1_700_000_000 + i) * 1_000_000).to_string()),
    ]
}

/// Runs every cloud phase.
pub async fn bench() -> Vec<CloudLine> {
    let mut lines = Vec::new();
    for rows in sizes() {
        for source in Source::ALL {
            eprintln!("  {} double, {rows} rows ...", source.name());
            let (endpoint, url, _keep) = start(source, rows).await;
            let phase = |raw: bool| Phase {
                kind: Kind::Cloud {
                    source,
                    endpoint: endpoint.clone(),
                    raw,
                },
                database_url: url.clone(),
                query: QUERY.to_owned(),
                state_dir: String::new(),
                api_server: String::new(),
            };
            let raw = phase::spawn(&phase(true)).await;
            let extract = phase::spawn(&phase(false)).await;
            assert_eq!(raw.rows, rows, "{} raw rows", source.name());
            assert_eq!(extract.rows, rows, "{} extracted rows", source.name());
            lines.push(CloudLine {
                source,
                rows,
                raw,
                extract,
            });
        }
    }
    lines
}

/// Starts the double of `source` holding a generated result of `rows` rows: its endpoint,
/// the source URL, and the double (kept alive by the caller).
async fn start(source: Source, rows: u64) -> (String, String, Box<dyn std::any::Any + Send>) {
    match source {
        Source::Snowflake => {
            let double = SnowflakeDouble::start().await;
            double.running_polls(0);
            double.accept_oauth(RAW_TOKEN);
            let column = |name: &str, kind: &str, scale: u32| json!({"name": name, "type": kind, "scale": scale, "precision": 38});
            double.serve(
                QUERY,
                SfResult::generated(
                    vec![
                        column("id", "fixed", 0),
                        column("email", "text", 0),
                        column("plan", "text", 0),
                        column("mrr", "fixed", 2),
                        column("signed_up_at", "timestamp_tz", 9),
                    ],
                    rows,
                    Arc::new(snowflake_row),
                ),
            );
            (double.url.clone(), double.source_url(), Box::new(double))
        }
        Source::Databricks => {
            let double = DatabricksDouble::start().await;
            double.running_polls(0);
            let column = |name: &str, kind: &str| json!({"name": name, "type_name": kind});
            double.serve(
                QUERY,
                DbResult::generated(
                    vec![
                        column("id", "LONG"),
                        column("email", "STRING"),
                        column("plan", "STRING"),
                        column("mrr", "DECIMAL"),
                        column("signed_up_at", "TIMESTAMP"),
                    ],
                    rows,
                    Arc::new(databricks_row),
                ),
            );
            (double.url.clone(), double.source_url(), Box::new(double))
        }
        Source::BigQuery => {
            let double = BigQueryDouble::start().await;
            double.running_polls(0);
            let field = |name: &str, kind: &str| json!({"name": name, "type": kind, "mode": "NULLABLE"});
            double.serve(
                QUERY,
                BqResult::generated(
                    vec![
                        field("id", "INTEGER"),
                        field("email", "STRING"),
                        field("plan", "STRING"),
                        field("mrr", "NUMERIC"),
                        field("signed_up_at", "TIMESTAMP"),
                    ],
                    rows,
                    Arc::new(bigquery_row),
                ),
            );
            (double.url.clone(), double.source_url(), Box::new(double))
        }
    }
}

/// The child's side of a cloud phase.
pub async fn child(phase: &Phase, source: Source, endpoint: &str, raw: bool) -> Measured {
    let rows = if raw {
        match source {
            Source::Snowflake => raw_snowflake(endpoint).await,
            Source::Databricks => raw_databricks(endpoint).await,
            Source::BigQuery => raw_bigquery(endpoint).await,
        }
    } else {
        extract(phase, source, endpoint).await
    };
    Measured {
        rows,
        ..Measured::default()
    }
}

async fn extract(phase: &Phase, source: Source, endpoint: &str) -> u64 {
    let credentials = Credentials::new(match source {
        Source::Snowflake => BTreeMap::from([("private_key".to_owned(), sf::PRIVATE_KEY.to_owned())]),
        Source::Databricks => BTreeMap::from([("token".to_owned(), db::PAT.to_owned())]),
        Source::BigQuery => BTreeMap::from([("service_account_json".to_owned(), bq::service_account_json())]),
    });
    let connection = Connection {
        url: &phase.database_url,
        credentials: &credentials,
        endpoint_override: Some(endpoint),
    };
    let mut stream = extract_from(connection, &phase.query, &SourceOptions::default())
        .await
        .expect("start the extraction");
    let mut rows = 0;
    while let Some(row) = stream.next().await {
        row.expect("a row");
        rows += 1;
    }
    rows
}

/// Snowflake's requests without the source: submit, poll, fetch every partition.
async fn raw_snowflake(endpoint: &str) -> u64 {
    let client = reqwest::Client::new();
    let auth = |r: reqwest::RequestBuilder| {
        r.bearer_auth(RAW_TOKEN)
            .header("X-Snowflake-Authorization-Token-Type", "OAUTH")
    };
    let body = json!({"statement": QUERY, "warehouse": sf::WAREHOUSE, "role": sf::ROLE, "parameters": {"MULTI_STATEMENT_COUNT": "1"}});
    let submitted: serde_json::Value = auth(client.post(format!("{endpoint}/api/v2/statements?async=true")))
        .json(&body)
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("handle");
    let handle = submitted["statementHandle"]
        .as_str()
        .expect("a handle")
        .to_owned();
    let first: serde_json::Value = auth(client.get(format!("{endpoint}/api/v2/statements/{handle}")))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("result set");
    let counts: Vec<u64> = first["resultSetMetaData"]["partitionInfo"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["rowCount"].as_u64().unwrap_or(0))
        .collect();
    let fetched = stream::iter(1..counts.len())
        .map(|i| {
            let request = auth(client.get(format!("{endpoint}/api/v2/statements/{handle}?partition={i}")));
            async move {
                request
                    .send()
                    .await
                    .expect("partition")
                    .bytes()
                    .await
                    .expect("body")
                    .len()
            }
        })
        .buffered(RAW_AHEAD)
        .collect::<Vec<usize>>()
        .await;
    assert!(fetched.iter().all(|b| *b > 0));
    counts.iter().sum()
}

/// Databricks' requests without the source: submit, fetch every chunk's link and download it.
async fn raw_databricks(endpoint: &str) -> u64 {
    let client = reqwest::Client::new();
    let body = json!({"statement": QUERY, "warehouse_id": db::WAREHOUSE_ID, "wait_timeout": "10s", "disposition": "EXTERNAL_LINKS", "format": "JSON_ARRAY"});
    let answer: serde_json::Value = client
        .post(format!("{endpoint}/api/2.0/sql/statements"))
        .bearer_auth(db::PAT)
        .json(&body)
        .send()
        .await
        .expect("submit")
        .json()
        .await
        .expect("answer");
    let id = answer["statement_id"].as_str().expect("an id").to_owned();
    let total: u64 = answer["manifest"]["total_row_count"].as_u64().expect("rows");
    let chunks = answer["manifest"]["total_chunk_count"].as_u64().expect("chunks") as usize;
    let fetched = stream::iter(0..chunks)
        .map(|i| {
            let client = client.clone();
            let id = id.clone();
            let endpoint = endpoint.to_owned();
            async move {
                let meta: serde_json::Value = client
                    .get(format!(
                        "{endpoint}/api/2.0/sql/statements/{id}/result/chunks/{i}"
                    ))
                    .bearer_auth(db::PAT)
                    .send()
                    .await
                    .expect("chunk")
                    .json()
                    .await
                    .expect("chunk answer");
                let link = meta["external_links"][0]["external_link"]
                    .as_str()
                    .expect("a link")
                    .to_owned();
                client
                    .get(link)
                    .send()
                    .await
                    .expect("download")
                    .bytes()
                    .await
                    .expect("body")
                    .len()
            }
        })
        .buffered(RAW_AHEAD)
        .collect::<Vec<usize>>()
        .await;
    assert!(fetched.iter().all(|b| *b > 0));
    total
}

/// Prints the cloud lines: the double's serving speed, then the source's, and their ratio.
pub fn print(lines: &[CloudLine]) {
    if lines.is_empty() {
        return;
    }
    println!("\n== cloud warehouse sources, against their contract doubles (tests/support) ==");
    println!(
        "{:<52} {:>10} {:>8} {:>11} {:>9} {:>9}",
        "phase", "rows", "seconds", "rows/s", "peak MiB", "vs double"
    );
    for l in lines {
        let rate = |m: &Measured| m.rows as f64 / m.seconds.max(1e-9);
        println!(
            "{:<52} {:>10} {:>8.2} {:>11.0} {:>9.1} {:>9}",
            format!("{} double serving, raw HTTP client", l.source.name()),
            l.rows,
            l.raw.seconds,
            rate(&l.raw),
            l.raw.peak_rss_mib,
            ""
        );
        println!(
            "{:<52} {:>10} {:>8.2} {:>11.0} {:>9.1} {:>8.2}x",
            format!("{} source, every row decoded", l.source.name()),
            l.rows,
            l.extract.seconds,
            rate(&l.extract),
            l.extract.peak_rss_mib,
            l.extract.seconds / l.raw.seconds.max(1e-9)
        );
    }
}

/// BigQuery's requests without the source: a token, the query, then the other pages by
/// `startIndex`, as many at once as the source fetches ahead.
async fn raw_bigquery(endpoint: &str) -> u64 {
    let client = reqwest::Client::new();
    let token: serde_json::Value = client
        .get(format!(
            "{endpoint}/computeMetadata/v1/instance/service-accounts/default/token"
        ))
        .header("Metadata-Flavor", "Google")
        .send()
        .await
        .expect("token")
        .json()
        .await
        .expect("token answer");
    let token = token["access_token"].as_str().expect("a token").to_owned();
    let base = format!("{endpoint}/bigquery/v2/projects/{}", bq::PROJECT);
    let body = json!({"query": QUERY, "useLegacySql": false, "maxResults": PAGE_ROWS, "formatOptions": {"useInt64Timestamp": true}});
    let first: serde_json::Value = client
        .post(format!("{base}/queries"))
        .bearer_auth(&token)
        .json(&body)
        .send()
        .await
        .expect("query")
        .json()
        .await
        .expect("first page");
    let job = first["jobReference"]["jobId"].as_str().expect("a job").to_owned();
    let total: u64 = first["totalRows"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("totalRows");
    let read = first["rows"].as_array().map_or(0, Vec::len) as u64;
    let pages = stream::iter((read..total).step_by(PAGE_ROWS as usize))
        .map(|start| {
            let request = client
                .get(format!("{base}/queries/{job}"))
                .query(&[
                    ("startIndex", start.to_string()),
                    ("maxResults", PAGE_ROWS.to_string()),
                    ("formatOptions.useInt64Timestamp", "true".to_owned()),
                ])
                .bearer_auth(&token);
            async move {
                let page: serde_json::Value = request
                    .send()
                    .await
                    .expect("page")
                    .json()
                    .await
                    .expect("page answer");
                page["rows"].as_array().map_or(0, Vec::len) as u64
            }
        })
        .buffered(RAW_AHEAD)
        .collect::<Vec<u64>>()
        .await;
    read + pages.iter().sum::<u64>()
}
