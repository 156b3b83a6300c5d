//! The generic `http` destination against the in-process HTTP double.

mod support;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use backflow::api::destination::{HttpDeleteSpec, HttpResultsSpec, HttpSpec};
use backflow::destination::http::HttpConnector;
use backflow::destination::{Connector, DestinationError, RecordOutcome, SendError};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use bigdecimal::BigDecimal;
use serde_json::json;
use support::http_server::{Behaviour, HttpDouble, Reply};

const TOKEN: &str = "tok-5ecret-123";

fn spec(url: String) -> HttpSpec {
    HttpSpec {
        url,
        method: None,
        headers: BTreeMap::new(),
        body: None,
        record: None,
        delete: None,
        results: None,
        timeout: None,
        check_url: None,
    }
}

fn authorized(url: String) -> HttpSpec {
    let mut spec = spec(url);
    spec.headers
        .insert("Authorization".into(), "Bearer {{secret.token}}".into());
    spec
}

fn secret() -> SecretData {
    SecretData::new(BTreeMap::from([("token".to_owned(), TOKEN.to_owned())]))
}

fn connector(spec: &HttpSpec) -> HttpConnector {
    HttpConnector::new(spec, Some(&secret())).expect("a valid http destination")
}

fn record(id: i64, email: &str, name: &str) -> Record {
    let identity = Document::from([("email".to_owned(), Value::Text(email.to_owned()))]);
    let mut fields = identity.clone();
    fields.insert("name".into(), Value::Text(name.to_owned()));
    fields.insert("id".into(), Value::Int(id));
    Record {
        key: id.to_string(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

fn batch() -> Vec<Record> {
    vec![
        record(1, "ada@example.com", "Ada"),
        record(2, "grace@example.com", "Grace"),
    ]
}

fn assert_no_secret(error: &SendError) {
    let text = format!("{error} {error:?}");
    assert!(!text.contains(TOKEN), "the secret leaked into: {text}");
}

#[tokio::test]
async fn a_batch_arrives_as_one_json_body_with_templated_headers() {
    let double =
        HttpDouble::start(Behaviour::accept_all().require_header("authorization", "Bearer tok-5ecret-123"))
            .await;
    let mut spec = authorized(double.url_for("/sync/{{operation}}"));
    spec.headers.insert("X-Source".into(), "backflow".into());

    let outcomes = connector(&spec).send(Operation::Upsert, &batch()).await.unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
    let requests = double.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/sync/upsert");
    assert_eq!(request.header("authorization"), Some("Bearer tok-5ecret-123"));
    assert_eq!(request.header("x-source"), Some("backflow"));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(
        request.body_text(),
        r#"{"operation":"upsert","records":[{"email":"ada@example.com","id":1,"name":"Ada"},{"email":"grace@example.com","id":2,"name":"Grace"}]}"#
    );
    assert_eq!(double.accepted_records().len(), 2);
}

#[tokio::test]
async fn a_custom_body_template_and_method_shape_the_request() {
    let double = HttpDouble::start(Behaviour::accept_all().records_at("/data")).await;
    let mut spec = spec(double.url_for("/items"));
    spec.method = Some("put".into());
    spec.body = Some(r#"{"action":"{{ operation }}","data":{{records}}}"#.into());

    connector(&spec).send(Operation::Insert, &batch()).await.unwrap();

    let request = &double.requests()[0];
    assert_eq!(request.method, "PUT");
    let body = request.json.as_ref().unwrap();
    assert_eq!(body["action"], "insert");
    assert_eq!(double.received_records().len(), 2);
}

#[tokio::test]
async fn per_record_results_reject_and_accept_each_record_in_order() {
    let double = HttpDouble::start(Behaviour::accept_all().reject_emails_without_at()).await;
    let mut spec = spec(double.url_for("/contacts"));
    spec.results = Some(HttpResultsSpec {
        path: "/results".into(),
        error_field: "error".into(),
    });
    let records = vec![
        record(1, "ada@example.com", "Ada"),
        record(2, "not-an-email", "Bob"),
        record(3, "grace@example.com", "Grace"),
    ];

    let outcomes = connector(&spec).send(Operation::Upsert, &records).await.unwrap();

    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected("invalid email: not-an-email".into()),
            RecordOutcome::Accepted,
        ]
    );
    let accepted: Vec<_> = double
        .accepted_records()
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(accepted, [json!(1), json!(3)]);
}

#[tokio::test]
async fn a_results_array_of_the_wrong_length_is_a_fatal_contract_violation() {
    let double = HttpDouble::start(Behaviour::always(200, r#"{"results":[{"error":null}]}"#)).await;
    let mut spec = spec(double.url_for("/contacts?key={{secret.token}}"));
    spec.results = Some(HttpResultsSpec {
        path: "/results".into(),
        error_field: "error".into(),
    });

    let error = connector(&spec)
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    let SendError::Fatal(message) = &error else {
        panic!("expected Fatal, got {error:?}");
    };
    assert!(message.contains("has 1 results for 2 records"), "{message}");
    assert!(message.contains("/contacts?key={{secret.token}}"), "{message}");
    assert_no_secret(&error);
}

#[tokio::test]
async fn throttling_is_retryable_and_carries_retry_after() {
    let double = HttpDouble::start(Behaviour::accept_all().throttle_first(1, 1)).await;
    let connector = connector(&spec(double.url_for("/contacts")));

    let error = connector.send(Operation::Upsert, &batch()).await.unwrap_err();
    let SendError::Retryable {
        retry_after,
        throttled,
        reason,
    } = &error
    else {
        panic!("expected Retryable, got {error:?}");
    };
    assert!(*throttled);
    assert_eq!(*retry_after, Some(Duration::from_secs(1)));
    assert!(reason.contains("HTTP 429"), "{reason}");

    let outcomes = connector.send(Operation::Upsert, &batch()).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
}

#[tokio::test]
async fn service_unavailable_is_retryable_without_throttling() {
    let double = HttpDouble::start(Behaviour::accept_all().fail_first(2, 503)).await;
    let connector = connector(&spec(double.url_for("/contacts")));

    for _ in 0..2 {
        let error = connector.send(Operation::Upsert, &batch()).await.unwrap_err();
        assert!(
            matches!(
                &error,
                SendError::Retryable {
                    throttled: false,
                    retry_after: None,
                    ..
                }
            ),
            "{error:?}"
        );
    }
    assert!(connector.send(Operation::Upsert, &batch()).await.is_ok());
}

#[tokio::test]
async fn rejected_credentials_are_fatal() {
    let double = HttpDouble::start(Behaviour::unauthorized()).await;
    let connector = connector(&authorized(double.url_for("/contacts")));

    let error = connector.send(Operation::Upsert, &batch()).await.unwrap_err();

    let SendError::Fatal(message) = &error else {
        panic!("expected Fatal, got {error:?}");
    };
    assert!(
        message.starts_with("credentials rejected by 127.0.0.1 (HTTP 401)"),
        "{message}"
    );
    assert_no_secret(&error);
}

#[tokio::test]
async fn a_bad_request_rejects_the_batch_with_a_short_excerpt() {
    let body = format!(
        r#"{{"message":"field name is required","detail":"{}"}}"#,
        "x".repeat(2000)
    );
    let double = HttpDouble::start(Behaviour::always(400, body)).await;

    let error = connector(&spec(double.url_for("/contacts")))
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    let SendError::BatchRejected(message) = &error else {
        panic!("expected BatchRejected, got {error:?}");
    };
    assert!(message.contains("HTTP 400"), "{message}");
    assert!(message.contains("field name is required"), "{message}");
    assert!(message.chars().count() < 400, "{} chars", message.chars().count());
}

#[tokio::test]
async fn secret_values_never_appear_in_error_messages_even_when_echoed() {
    let echo = format!(r#"{{"message":"token {TOKEN} is malformed"}}"#);
    let double = HttpDouble::start(Behaviour::always(422, echo.clone())).await;
    let mut spec = authorized(double.url_for("/contacts?api_key={{secret.token}}"));
    spec.results = None;

    let error = connector(&spec)
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();
    assert!(matches!(error, SendError::BatchRejected(_)), "{error:?}");
    assert!(error.to_string().contains("token *** is malformed"), "{error}");
    assert_no_secret(&error);

    let forbidden = HttpDouble::start(Behaviour::always(403, echo)).await;
    let spec = authorized(forbidden.url_for("/contacts?api_key={{secret.token}}"));
    let error = connector(&spec)
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("credentials rejected"), "{error}");
    assert_no_secret(&error);

    let error = connector(&authorized(format!(
        "http://127.0.0.1:{}/x?k={{{{secret.token}}}}",
        closed_port().await
    )))
    .send(Operation::Upsert, &batch())
    .await
    .unwrap_err();
    assert!(matches!(error, SendError::Retryable { .. }), "{error:?}");
    assert_no_secret(&error);
}

#[tokio::test]
async fn a_wrong_path_is_fatal_and_says_to_check_the_url() {
    let double = HttpDouble::start(Behaviour::always(404, "not found")).await;

    let error = connector(&spec(double.url_for("/nope")))
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    let SendError::Fatal(message) = &error else {
        panic!("expected Fatal, got {error:?}");
    };
    assert!(message.contains("HTTP 404"), "{message}");
    assert!(
        message.contains("check the destination's URL and method"),
        "{message}"
    );
}

#[tokio::test]
async fn redirects_are_not_followed_so_a_post_never_turns_into_a_get() {
    let double = HttpDouble::start(
        Behaviour::accept_all().steady(Reply::new(302, "").header("location", "/elsewhere")),
    )
    .await;

    let error = connector(&spec(double.url_for("/contacts")))
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("redirect")),
        "{error:?}"
    );
    assert_eq!(double.request_count(), 1);
}

#[tokio::test]
async fn deletes_use_the_delete_block_and_send_identities_only() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let mut spec = authorized(double.url_for("/contacts/{{operation}}"));
    spec.delete = Some(HttpDeleteSpec {
        url: double.url_for("/contacts/remove"),
        method: Some("DELETE".into()),
        body: Some(r#"{"remove":{{records}}}"#.into()),
        record: None,
    });

    let outcomes = connector(&spec).send(Operation::Delete, &batch()).await.unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
    let request = &double.requests()[0];
    assert_eq!(request.method, "DELETE");
    assert_eq!(request.path, "/contacts/remove");
    assert_eq!(request.header("authorization"), Some("Bearer tok-5ecret-123"));
    assert_eq!(
        request.json,
        Some(json!({"remove": [{"email": "ada@example.com"}, {"email": "grace@example.com"}]}))
    );
}

#[tokio::test]
async fn deletes_without_a_delete_block_go_to_the_main_url_as_operation_delete() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;

    connector(&spec(double.url_for("/{{operation}}")))
        .send(Operation::Delete, &batch())
        .await
        .unwrap();

    let request = &double.requests()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/delete")
    );
    assert_eq!(
        request.json,
        Some(json!({
            "operation": "delete",
            "records": [{"email": "ada@example.com"}, {"email": "grace@example.com"}]
        }))
    );
}

#[tokio::test]
async fn exact_decimals_arrive_unrounded_in_the_body() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let mut record = record(1, "ada@example.com", "Ada");
    record.fields.insert(
        "balance".into(),
        Value::Decimal(BigDecimal::from_str("12345678901234567890.123").unwrap()),
    );
    record.fields.insert(
        "rate".into(),
        Value::Decimal(BigDecimal::from_str("0.10").unwrap()),
    );

    connector(&spec(double.url.clone()))
        .send(Operation::Upsert, &[record])
        .await
        .unwrap();

    let body = double.requests()[0].body_text();
    assert!(body.contains(r#""balance":12345678901234567890.123,"#), "{body}");
    assert!(body.contains(r#""rate":0.1}"#), "{body}");
}

#[tokio::test]
async fn an_empty_batch_sends_nothing() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;

    let outcomes = connector(&spec(double.url.clone()))
        .send(Operation::Upsert, &[])
        .await
        .unwrap();

    assert!(outcomes.is_empty());
    assert_eq!(double.request_count(), 0);
}

#[tokio::test]
async fn a_slow_destination_times_out_as_retryable() {
    let double = HttpDouble::start(Behaviour::accept_all().with_delay(Duration::from_secs(5))).await;
    let mut spec = spec(double.url_for("/slow"));
    spec.timeout = Some("200ms".into());

    let error = connector(&spec)
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    assert!(
        matches!(&error, SendError::Retryable { reason, throttled: false, .. } if reason.contains("timed out after 200ms")),
        "{error:?}"
    );
    assert_eq!(double.requests()[0].status, None);
}

#[tokio::test]
async fn an_unreachable_destination_is_retryable() {
    let url = format!("http://127.0.0.1:{}/contacts", closed_port().await);

    let error = connector(&spec(url))
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    assert!(
        matches!(&error, SendError::Retryable { reason, .. } if reason.contains("failed to connect to 127.0.0.1")),
        "{error:?}"
    );
}

#[tokio::test]
async fn check_gets_the_check_url_with_the_configured_headers() {
    let double =
        HttpDouble::start(Behaviour::accept_all().require_header("authorization", "Bearer tok-5ecret-123"))
            .await;
    let mut spec = authorized(double.url_for("/api/v1/{{operation}}"));
    spec.check_url = Some("/api/v1/me".into());

    connector(&spec).check().await.unwrap();

    let request = &double.requests()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/api/v1/me")
    );
    assert_eq!(request.header("authorization"), Some("Bearer tok-5ecret-123"));
}

#[tokio::test]
async fn check_reports_rejected_credentials_as_fatal() {
    let double =
        HttpDouble::start(Behaviour::accept_all().require_header("authorization", "Bearer right")).await;
    let mut spec = authorized(double.url_for("/contacts"));
    spec.check_url = Some(double.url_for("/me"));

    let error = connector(&spec).check().await.unwrap_err();

    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("credentials rejected by 127.0.0.1")),
        "{error:?}"
    );
    assert_no_secret(&error);
}

#[tokio::test]
async fn check_without_a_check_url_sends_nothing() {
    let double = HttpDouble::start(Behaviour::unauthorized()).await;

    connector(&spec(double.url.clone())).check().await.unwrap();

    assert_eq!(double.request_count(), 0);
}

#[tokio::test]
async fn a_missing_secret_key_fails_before_any_request() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let mut spec = spec(double.url.clone());
    spec.headers
        .insert("Authorization".into(), "Bearer {{secret.api_key}}".into());

    let error = HttpConnector::new(&spec, Some(&secret())).err().unwrap();

    assert!(
        matches!(&error, DestinationError::MissingSecretKey { key, .. } if key == "api_key"),
        "{error:?}"
    );
    assert!(!error.to_string().contains(TOKEN));
    assert_eq!(double.request_count(), 0);
}

#[tokio::test]
async fn the_double_counts_concurrent_requests() {
    let double = HttpDouble::start(Behaviour::accept_all().with_delay(Duration::from_millis(100))).await;
    let connector = connector(&spec(double.url.clone()));
    let records = batch();

    let sends = (0..3).map(|_| connector.send(Operation::Upsert, &records));
    for result in futures::future::join_all(sends).await {
        result.unwrap();
    }

    assert_eq!(double.max_in_flight(), 3);
    assert_eq!(double.received_records().len(), 6);
}

/// A port nothing listens on: bound, then released.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn a_record_template_inside_a_json_api_envelope_shapes_each_record() {
    let double = HttpDouble::start(Behaviour::accept_all().records_at("/data")).await;
    let mut spec = authorized(double.url_for("/people"));
    spec.headers
        .insert("Content-Type".into(), "application/vnd.api+json".into());
    spec.body = Some(r#"{"data": {{ records }}}"#.into());
    spec.record = Some(
        r#"{"type": "people", "id": {{ id | string }}, "attributes": {"email": {{ email }}, "name": {{ name | upper }}}}"#
            .into(),
    );

    let outcomes = connector(&spec).send(Operation::Upsert, &batch()).await.unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
    let request = &double.requests()[0];
    assert_eq!(request.header("content-type"), Some("application/vnd.api+json"));
    assert_eq!(request.header("authorization"), Some("Bearer tok-5ecret-123"));
    assert_eq!(
        request.body_text(),
        r#"{"data": [{"type": "people", "id": "1", "attributes": {"email": "ada@example.com", "name": "ADA"}},{"type": "people", "id": "2", "attributes": {"email": "grace@example.com", "name": "GRACE"}}]}"#
    );
}

#[tokio::test]
async fn an_array_of_objects_and_one_object_per_request_are_plain_bodies() {
    let double = HttpDouble::start(Behaviour::always(200, "{}")).await;
    let mut spec = spec(double.url_for("/hook/{{ operation }}"));
    spec.body = Some("{{ records }}".into());
    spec.record = Some(r#"{"who": {{ name }}, "op": {{ operation }}}"#.into());
    connector(&spec).send(Operation::Insert, &batch()).await.unwrap();

    spec.body = Some("{{ record }}".into());
    let one = connector(&spec);
    assert_eq!(one.capabilities().max_batch_size, 1, "one record per request");
    for record in batch() {
        one.send(Operation::Upsert, std::slice::from_ref(&record))
            .await
            .unwrap();
    }

    let bodies: Vec<(String, String)> = double
        .requests()
        .iter()
        .map(|r| (r.path.clone(), r.body_text()))
        .collect();
    assert_eq!(
        bodies,
        [
            (
                "/hook/insert".to_owned(),
                r#"[{"who": "Ada", "op": "insert"},{"who": "Grace", "op": "insert"}]"#.to_owned()
            ),
            (
                "/hook/upsert".to_owned(),
                r#"{"who": "Ada", "op": "upsert"}"#.to_owned()
            ),
            (
                "/hook/upsert".to_owned(),
                r#"{"who": "Grace", "op": "upsert"}"#.to_owned()
            ),
        ]
    );
}

#[tokio::test]
async fn a_record_whose_template_fails_is_rejected_alone_and_the_others_are_sent() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let mut spec = spec(double.url_for("/contacts"));
    spec.results = Some(HttpResultsSpec {
        path: "/results".into(),
        error_field: "error".into(),
    });
    // Grace's record prints her name raw (`safe`): not JSON, so it is refused before sending.
    spec.record = Some(
        r#"{"email": {{ email }}, "name": {% if id == 2 %}{{ name | safe }}{% else %}{{ name }}{% endif %}}"#
            .into(),
    );
    let records = vec![
        record(1, "ada@example.com", "Ada"),
        record(2, "grace@example.com", "Grace"),
        record(3, "linus@example.com", "Linus"),
    ];

    let outcomes = connector(&spec).send(Operation::Upsert, &records).await.unwrap();

    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert_eq!(outcomes[2], RecordOutcome::Accepted);
    let RecordOutcome::Rejected(reason) = &outcomes[1] else {
        panic!("Grace's record is rejected: {outcomes:?}");
    };
    assert!(
        reason.starts_with("spec.http.record: the record template did not render valid JSON"),
        "{reason}"
    );
    assert!(!reason.contains("Grace"), "{reason}");
    let sent: Vec<_> = double
        .received_records()
        .iter()
        .map(|r| r["email"].clone())
        .collect();
    assert_eq!(sent, [json!("ada@example.com"), json!("linus@example.com")]);
}

#[tokio::test]
async fn deletes_are_shaped_by_the_delete_record_template_from_match_fields() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let mut spec = spec(double.url_for("/contacts"));
    spec.record = Some(r#"{"never": {{ name }}}"#.into());
    spec.delete = Some(HttpDeleteSpec {
        url: double.url_for("/contacts/remove"),
        method: None,
        body: None,
        record: Some(r#"{"email": {{ email }}, "gone": true}"#.into()),
    });

    connector(&spec).send(Operation::Delete, &batch()).await.unwrap();

    assert_eq!(
        double.requests()[0].body_text(),
        r#"{"operation":"delete","records":[{"email": "ada@example.com", "gone": true},{"email": "grace@example.com", "gone": true}]}"#
    );
}

#[tokio::test]
async fn a_record_template_naming_a_field_the_records_lack_fails_the_batch_naming_it() {
    let double = HttpDouble::start(Behaviour::accept_all()).await;
    let mut spec = spec(double.url_for("/contacts"));
    spec.record = Some(r#"{"email": {{ emial }}}"#.into());

    let error = connector(&spec)
        .send(Operation::Upsert, &batch())
        .await
        .unwrap_err();

    let SendError::Fatal(message) = &error else {
        panic!("a fatal error: {error:?}");
    };
    assert!(
        message.contains("spec.http.record: {{ emial }} is not a field"),
        "{message}"
    );
    assert_eq!(double.request_count(), 0);
}

#[tokio::test]
async fn secrets_are_refused_in_record_templates_when_the_connector_is_built() {
    let mut spec = spec("https://api.example.com/x".into());
    spec.record = Some(r#"{"token": {{ secret.token }}}"#.into());
    let error = HttpConnector::new(&spec, Some(&secret())).err().expect("refused");
    assert!(
        error
            .to_string()
            .contains("spec.http.record: {{ secret.KEY }} is available only in the URL and headers"),
        "{error}"
    );
    assert!(!error.to_string().contains(TOKEN));
}

#[tokio::test]
async fn a_success_without_results_is_not_read_and_a_body_past_the_cap_is_refused() {
    let double = HttpDouble::start(Behaviour::endless_body(200)).await;
    // No results block: the 2xx is all the connector needs; the endless body is not read.
    let c = connector(&spec(double.url_for("/sync")));
    let sent = tokio::time::timeout(Duration::from_secs(10), c.send(Operation::Upsert, &batch()))
        .await
        .expect("the answer's body is not read to its end");
    assert_eq!(sent.unwrap(), vec![RecordOutcome::Accepted; 2]);

    // With a results block the body is read, up to the cap, then refused as retryable.
    let mut with_results = spec(double.url_for("/sync"));
    with_results.results = Some(HttpResultsSpec {
        path: "/results".into(),
        error_field: "error".into(),
    });
    let c = connector(&with_results);
    let err = tokio::time::timeout(Duration::from_secs(20), c.send(Operation::Upsert, &batch()))
        .await
        .expect("reading stops at the cap")
        .unwrap_err();
    assert!(
        matches!(&err, SendError::Retryable { reason, .. } if reason.contains("larger than")),
        "{err:?}"
    );
    let cap = backflow::destination::vendor::MAX_RESPONSE_BYTES;
    assert!(
        double.bytes_streamed() < 2 * cap,
        "{} bytes streamed",
        double.bytes_streamed()
    );
}
