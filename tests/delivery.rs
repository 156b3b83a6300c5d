//! The shared delivery machinery: split, retry with backoff and Retry-After, rate limit.
//! Retry timing runs on paused tokio time.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backflow::destination::SendError;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivered, Delivery, DeliveryConfig};
use backflow::model::record::{Operation, Record};
use backflow::model::value::Document;
use support::fake_connector::{BadRecords, FakeConnector};

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            key: format!("k{i:03}"),
            identity: Document::new().into(),
            fields: Document::new().into(),
        })
        .collect()
}

fn config(max_attempts: u32) -> DeliveryConfig {
    DeliveryConfig {
        batch_size: 100,
        max_batch_bytes: backflow::destination::delivery::DEFAULT_MAX_BATCH_BYTES,
        max_concurrency: 1,
        max_attempts,
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_secs(2),
        requests_per_second: 10_000.0,
        burst: 10_000,
    }
}

fn delivery(fake: Arc<FakeConnector>, max_attempts: u32) -> Delivery {
    Delivery::new(
        fake,
        Arc::new(RateLimiter::new(10_000.0, 10_000)),
        config(max_attempts),
    )
}

fn count(outcomes: &[(Record, Delivered)], f: impl Fn(&Delivered) -> bool) -> usize {
    outcomes.iter().filter(|(_, d)| f(d)).count()
}

#[tokio::test(start_paused = true)]
async fn a_throttled_batch_waits_at_least_retry_after_then_lands() {
    let fake = Arc::new(
        FakeConnector::new(100).with_script(vec![Err(SendError::Retryable {
            reason: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(7)),
            throttled: true,
        })]),
    );
    let d = delivery(fake.clone(), 5);
    let start = tokio::time::Instant::now();
    let out = d.send_batch(Operation::Upsert, records(10)).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(7),
        "waited only {:?}",
        start.elapsed()
    );
    assert_eq!(count(&out, |d| *d == Delivered::Accepted), 10);
    assert_eq!(fake.call_count(), 2);
    assert_eq!(d.stats().throttled.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(d.stats().retries.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn time_waiting_out_a_throttle_counts_as_throttled_and_a_transient_failures_backoff_does_not() {
    let fake = Arc::new(FakeConnector::new(100).with_script(vec![
        Err(SendError::Retryable {
            reason: "HTTP 429".into(),
            retry_after: Some(Duration::from_secs(7)),
            throttled: true,
        }),
        Err(SendError::Retryable {
            reason: "HTTP 503".into(),
            retry_after: Some(Duration::from_secs(2)),
            throttled: false,
        }),
    ]));
    let d = delivery(fake.clone(), 5);
    let start = tokio::time::Instant::now();
    let out = d.send_batch(Operation::Upsert, records(10)).await.unwrap();
    assert_eq!(count(&out, |d| *d == Delivered::Accepted), 10);
    assert!(start.elapsed() >= Duration::from_secs(9));
    assert_eq!(d.stats().throttled_time.total(), Duration::from_secs(7));
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_and_give_up_after_max_attempts() {
    let err = || {
        Err(SendError::Retryable {
            reason: "HTTP 503".into(),
            retry_after: None,
            throttled: false,
        })
    };
    let fake = Arc::new(FakeConnector::new(100).with_script(vec![err(), err(), err(), err()]));
    let out = delivery(fake.clone(), 3)
        .send_batch(Operation::Upsert, records(4))
        .await
        .unwrap();
    assert_eq!(fake.call_count(), 3);
    assert_eq!(
        count(
            &out,
            |d| matches!(d, Delivered::Failed(r) if r.contains("HTTP 503") && r.contains("3 attempts"))
        ),
        4
    );
}

#[tokio::test(start_paused = true)]
async fn a_batch_refused_whole_is_split_until_the_bad_records_stand_alone() {
    let fake = Arc::new(FakeConnector::new(100).with_bad(&["k003", "k011"], BadRecords::RefuseBatch));
    let out = delivery(fake.clone(), 3)
        .send_batch(Operation::Upsert, records(16))
        .await
        .unwrap();
    assert_eq!(out.len(), 16);
    let rejected: Vec<_> = out
        .iter()
        .filter(|(_, d)| matches!(d, Delivered::Rejected(_)))
        .map(|(r, _)| r.key.clone())
        .collect();
    assert_eq!(rejected.len(), 2);
    assert!(rejected.contains(&"k003".to_string()) && rejected.contains(&"k011".to_string()));
    assert_eq!(fake.store.lock().unwrap().len(), 14, "every good record landed");
}

#[tokio::test(start_paused = true)]
async fn per_record_rejections_leave_the_rest_of_the_batch_accepted() {
    let fake = Arc::new(FakeConnector::new(100).with_bad(&["k001"], BadRecords::RejectEach));
    let out = delivery(fake.clone(), 3)
        .send_batch(Operation::Upsert, records(5))
        .await
        .unwrap();
    assert_eq!(fake.call_count(), 1);
    assert_eq!(
        count(
            &out,
            |d| matches!(d, Delivered::Rejected(r) if r == "record k001 is invalid")
        ),
        1
    );
    assert_eq!(count(&out, |d| *d == Delivered::Accepted), 4);
}

#[tokio::test(start_paused = true)]
async fn a_fatal_answer_stops_delivery() {
    let fake = Arc::new(FakeConnector::new(100).with_script(vec![Err(SendError::Fatal(
        "credentials rejected by crm (HTTP 401)".into(),
    ))]));
    let err = delivery(fake.clone(), 5)
        .send_batch(Operation::Upsert, records(3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("credentials rejected"));
    assert_eq!(fake.call_count(), 1, "no retry of a fatal error");
}

#[tokio::test(start_paused = true)]
async fn a_batch_refused_for_its_size_is_resent_at_the_named_limit_which_later_batches_keep() {
    let fake = Arc::new(FakeConnector::new(100).with_script(vec![Err(SendError::TooLarge {
        limit: 40,
        reason: "Max Input Length Exceeded".into(),
    })]));
    let d = delivery(fake.clone(), 3);
    assert_eq!(d.batch_size(), 100);

    let out = d.send_batch(Operation::Upsert, records(100)).await.unwrap();

    assert_eq!(count(&out, |d| *d == Delivered::Accepted), 100);
    let sizes: Vec<usize> = fake.calls.lock().unwrap().iter().map(|(_, k)| k.len()).collect();
    assert_eq!(sizes, [100, 40, 40, 20], "cut to the limit, not halved");
    assert_eq!(
        d.batch_size(),
        40,
        "the run's later batches are formed at the limit"
    );
    // A batch formed before the limit was known is cut before it is sent.
    d.send_batch(Operation::Upsert, records(50)).await.unwrap();
    let sizes: Vec<usize> = fake.calls.lock().unwrap().iter().map(|(_, k)| k.len()).collect();
    assert_eq!(&sizes[4..], [40, 10]);
}

#[tokio::test(start_paused = true)]
async fn rejection_reasons_leave_the_delivery_without_the_records_values() {
    let mut batch = records(1);
    batch[0].fields.insert(
        "email".into(),
        backflow::model::value::Value::Text("ada.example.com".into()),
    );
    let fake = Arc::new(
        FakeConnector::new(100).with_script(vec![Err(SendError::BatchRejected(
            "INVALID_EMAIL_ADDRESS: invalid email address: Ada.Example.com".into(),
        ))]),
    );
    let out = delivery(fake, 3)
        .send_batch(Operation::Upsert, batch)
        .await
        .unwrap();
    assert_eq!(
        out[0].1,
        Delivered::Rejected("INVALID_EMAIL_ADDRESS: invalid email address: <value>".into())
    );
}
