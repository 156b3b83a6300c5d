//! The BigQuery source with the GKE metadata server's credentials (Workload Identity), which
//! the operator allows only when started with `BACKFLOW_GCP_METADATA_AUTH=enabled`. A test
//! binary of its own, because it sets that variable for the whole process.

mod support;

use std::time::Duration;

use backflow::model::value::Value;
use backflow::source::{Connection, Credentials, SourceOptions, extract_from};
use serde_json::json;
use support::bigquery_double::{BigQueryDouble, BqResult};

#[test]
fn workload_identity_reads_with_the_metadata_servers_token_when_allowed() {
    // SAFETY: the only test of this binary, run before any other thread (the runtime below)
    // exists, so nothing reads the environment concurrently.
    unsafe { std::env::set_var("BACKFLOW_GCP_METADATA_AUTH", "enabled") };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let double = BigQueryDouble::start().await;
        let query = "SELECT 1 AS one";
        double.serve(
            query,
            BqResult::rows(
                vec![json!({"name": "one", "type": "INT64"})],
                vec![vec![json!("1")]],
            ),
        );
        let url = format!("{}&auth=metadata", double.source_url());
        let credentials = Credentials::default();
        let mut stream = extract_from(
            Connection {
                url: &url,
                credentials: &credentials,
                endpoint_override: Some(&double.url),
            },
            query,
            &SourceOptions {
                statement_timeout: Duration::from_secs(30),
                buffer_rows: 4,
            },
        )
        .await
        .unwrap();
        assert_eq!(
            stream.next().await.unwrap().unwrap().decoded().unwrap(),
            vec![Value::Int(1)]
        );
        let metadata: Vec<_> = double
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/computeMetadata/"))
            .collect();
        assert_eq!(metadata.len(), 1);
        assert_eq!(metadata[0].header("metadata-flavor"), Some("Google"));
        assert!(double.requests().iter().all(|r| r.path != "/token"));
    });
}
