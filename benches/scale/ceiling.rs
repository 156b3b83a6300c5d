//! The sink's own ceiling: what the local HTTP destination takes from a bare client at the
//! batch size and concurrency of the end-to-end runs, measured in the same run, so the
//! engine's delivery rate is read against what the sink itself can take.
//!
//! The client posts the very bodies the engine sent in the last end-to-end run (the sink
//! keeps the first of them, [`crate::sink::CAPTURED`]), so the sink reads and parses the same
//! bytes as during delivery; bodies built here, shaped like the benchmark's records, stand in
//! only when the sink captured none.

use futures::StreamExt;

use crate::phase::Measured;

/// Records per request, as in the end-to-end runs.
pub const BATCH: u64 = 100;

/// A request body of `BATCH` records shaped like the benchmark's mapped rows, as the `http`
/// connector writes them.
fn body(first_id: u64) -> Vec<u8> {
    let mut out = br#"{"operation":"upsert","records":["#.to_vec();
    for i in first_id..first_id + BATCH {
        if i > first_id {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                r#"{{"email":"user{i}@example.com","id":{i},"properties":{{"active":true,"mrr":{}.{:02},"name":"First{} Last{}","plan":"growth","score":{:.2},"signed_up_at":"2021-03-04T05:06:00Z"}}}}"#,
                i % 50,
                i % 100,
                i % 1000,
                i % 777,
                i as f64 * 0.37
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"]}");
    out
}

/// The bodies to post: those the sink captured from the engine, or built ones.
async fn bodies(client: &reqwest::Client, url: &str) -> Vec<Vec<u8>> {
    let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
    let captured: Vec<String> = client
        .get(format!("{base}{}", crate::sink::CAPTURED_PATH))
        .send()
        .await
        .expect("the sink answers")
        .json()
        .await
        .expect("the captured bodies");
    if captured.is_empty() {
        (0..16).map(|n| body(n * BATCH)).collect()
    } else {
        captured.into_iter().map(String::into_bytes).collect()
    }
}

/// Posts `requests` bodies to `url` with `concurrency` requests in flight, from a plain
/// reqwest client, and counts them (the rate is read at the sink, like the engine's).
pub async fn run(url: &str, requests: u64, concurrency: usize) -> Measured {
    let client = reqwest::Client::new();
    // Bodies are ready before the clock matters: the sink's window starts at the first
    // request it receives.
    let bodies = bodies(&client, url).await;
    let count = bodies.len() as u64;
    futures::stream::iter(0..requests)
        .map(|n| {
            let request = client
                .post(url)
                .header("content-type", "application/json")
                .body(bodies[(n % count) as usize].clone());
            async move {
                let answer = request.send().await.expect("the sink answers");
                assert!(answer.status().is_success(), "the sink accepts every request");
                answer.bytes().await.expect("the sink's body");
            }
        })
        .buffer_unordered(concurrency.max(1))
        .for_each(|()| async {})
        .await;
    Measured {
        requests,
        ..Measured::default()
    }
}
