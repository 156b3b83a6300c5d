//! The `intercom` destination against the in-process Intercom double: the connector on its own,
//! and whole sync runs from a SQLite model.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::{self, Connector, RecordOutcome, SendError};
use backflow::engine::run::{RunReport, RunResult};
use backflow::local::manifests::{Manifests, load_text};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use serde_json::json;
use support::intercom_double::IntercomDouble;
use support::sqlite::TempSqlite;

const TOKEN: &str = "dG9rOjFhMmIzYzRkXzVlY3JldA==";

fn destination(base_url: &str, extra: &str, block: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: intercom\ncredentialsSecretRef: {{name: intercom}}\n{extra}\nintercom: {{{block}baseUrl: \"{base_url}\"}}\n"
    ))
    .unwrap()
}

fn secret(token: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("token".to_owned(), token.to_owned())]))
}

async fn connector_with(double: &IntercomDouble, block: &str) -> Arc<dyn Connector> {
    destination::build(&destination(&double.url, "", block), Some(&secret(TOKEN)))
        .await
        .unwrap()
}

async fn connector(double: &IntercomDouble) -> Arc<dyn Connector> {
    connector_with(double, "").await
}

fn contact(key: i64, external_id: &str, email: &str, name: &str) -> Record {
    let identity = Document::from([("external_id".to_owned(), Value::Text(external_id.to_owned()))]);
    let mut fields = identity.clone();
    fields.insert("email".into(), Value::Text(email.to_owned()));
    fields.insert("name".into(), Value::Text(name.to_owned()));
    fields.insert("score".into(), Value::Int(key * 10));
    Record {
        key: key.to_string(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

// --- whole runs ---------------------------------------------------------------------------

const MODEL: &str =
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, user_id TEXT, email TEXT, name TEXT, ltv REAL);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO customers SELECT i, 'u-' || i, 'user' || i || '@example.com', 'User ' || i, i * 1.5 FROM n;";

fn sync_spec(mode: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, user_id, email, name, ltv FROM customers", primaryKey: [id]}}
destinationRef: {{name: intercom}}
mode: {mode}
match: [external_id]
mappings:
  - {{from: user_id, to: external_id}}
  - {{from: email, to: email}}
  - {{from: name, to: name}}
  - {{from: ltv, to: custom_attributes.ltv}}
"#
    ))
    .unwrap()
}

async fn run_sync(
    model: &TempSqlite,
    dest: &DestinationSpec,
    token: &str,
    state: &std::path::Path,
    mode: &str,
) -> RunReport {
    let spec = sync_spec(mode);
    support::engine::run_sync_once(&model.url, &spec, dest, &secret(token), state).await
}

#[tokio::test]
async fn upsert_searches_by_external_id_creates_the_contact_then_updates_it() {
    let double = IntercomDouble::start(TOKEN).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Upsert, &[contact(1, "u-1", "Ada@Example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let created = double.find("external_id", "u-1").unwrap();
    assert_eq!(created.attributes["role"], "user");
    assert_eq!(created.attributes["email"], "ada@example.com");
    assert_eq!(
        created.custom("score"),
        Some(&json!(10)),
        "other fields are custom attributes"
    );

    let outcomes = connector
        .send(
            Operation::Upsert,
            &[contact(1, "u-1", "ada@example.com", "Augusta")],
        )
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let contacts = double.contacts();
    assert_eq!(contacts.len(), 1, "the second upsert updated, not duplicated");
    assert_eq!(contacts[0].id, created.id);
    assert_eq!(contacts[0].attributes["name"], "Augusta");

    let requests = double.requests();
    let calls: Vec<_> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        calls,
        [
            "POST /contacts/search".to_owned(),
            "POST /contacts".to_owned(),
            "POST /contacts/search".to_owned(),
            format!("PUT /contacts/{}", created.id),
        ]
    );
    assert_eq!(
        requests[0].body,
        json!({"query": {"field": "external_id", "operator": "=", "value": "u-1"}})
    );
    assert_eq!(
        requests[1].body,
        json!({"role": "user", "external_id": "u-1", "email": "Ada@Example.com", "name": "Ada",
            "custom_attributes": {"score": 10}})
    );
    assert_eq!(
        requests[3].body,
        json!({"external_id": "u-1", "email": "ada@example.com", "name": "Augusta",
            "custom_attributes": {"score": 10}})
    );
    for request in &requests {
        assert_eq!(
            request.authorization.as_deref(),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(request.version.as_deref(), Some("2.11"));
    }
}

#[tokio::test]
async fn leads_found_by_email_are_created_with_the_lead_role() {
    let double = IntercomDouble::start(TOKEN).await;
    let connector = connector_with(&double, "identifyBy: email, role: lead, ").await;
    let record = Record {
        key: "1".into(),
        identity: Document::from([("email".to_owned(), Value::Text("lead@example.com".into()))]).into(),
        fields: Document::from([("plan".to_owned(), Value::Text("trial".into()))]).into(),
    };

    let outcomes = connector.send(Operation::Upsert, &[record]).await.unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let requests = double.requests();
    assert_eq!(requests[0].body["query"]["field"], "email");
    assert_eq!(
        requests[1].body,
        json!({"role": "lead", "email": "lead@example.com", "custom_attributes": {"plan": "trial"}})
    );
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = IntercomDouble::start(TOKEN).await;
    let dest = destination(&double.url, "", "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    let stored = double.find("external_id", "u-7").unwrap();
    assert_eq!(stored.attributes["name"], "User 7");
    assert_eq!(
        stored.custom("ltv"),
        Some(&json!(10.5)),
        "custom_attributes.ltv nests"
    );

    let before = double.requests().len();
    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.requests().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    let sent = double.requests().split_off(before);
    assert_eq!(sent.len(), 2, "only the changed row is searched and updated");
    assert_eq!(sent[1].method, "PUT");
    assert_eq!(
        double.find("external_id", "u-3").unwrap().attributes["name"],
        "Renamed"
    );
    assert_eq!(double.contacts().len(), 30);
}

#[tokio::test]
async fn a_refused_contact_is_rejected_with_intercoms_message_and_the_rest_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'broken' || id WHERE id IN (4, 21)")
        .await;
    // Another user already holds user9's email: Intercom answers 409.
    let double = IntercomDouble::start(TOKEN).await;
    double.seed(json!({"role": "user", "external_id": "someone-else", "email": "user9@example.com"}));
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, "", ""),
        TOKEN,
        state.path(),
        "upsert",
    )
    .await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected), (27, 3));
    let mut rejected: Vec<_> = report
        .rejected_samples
        .iter()
        .map(|r| (r.key.as_str(), r.reason.as_str()))
        .collect();
    rejected.sort();
    assert_eq!(
        rejected[0],
        (
            "21",
            "Intercom refused the contact (HTTP 400): parameter_invalid: Invalid email address"
        )
    );
    assert_eq!(rejected[1].0, "4");
    assert_eq!(rejected[2].0, "9");
    assert!(
        rejected[2]
            .1
            .contains("HTTP 409): conflict: A contact matching those details already exists"),
        "{}",
        rejected[2].1
    );
    assert_eq!(double.contacts().len(), 28);
}

#[tokio::test]
async fn throttling_is_retried_after_the_rate_limit_reset() {
    let double = IntercomDouble::start(TOKEN).await;
    let connector = connector(&double).await;
    double.throttle_next(1, 1);

    let error = connector
        .send(Operation::Upsert, &[contact(1, "u-1", "ada@example.com", "Ada")])
        .await
        .unwrap_err();
    match &error {
        SendError::Retryable {
            reason,
            retry_after: Some(wait),
            throttled: true,
        } => {
            assert_eq!(
                reason,
                "Intercom is throttling requests (HTTP 429): rate_limit_exceeded: Exceeded rate limit of 1666 in 10 seconds"
            );
            assert!(*wait <= Duration::from_secs(1), "{wait:?}");
        }
        other => panic!("{other:?}"),
    }

    let model = TempSqlite::new(MODEL).await;
    double.throttle_next(2, 0);
    double.fail_next(1, 502);
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(
        &model,
        &destination(&double.url, "", ""),
        TOKEN,
        state.path(),
        "upsert",
    )
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(report.throttled, 2);
    assert!(report.retries >= 3, "{}", report.retries);
    assert_eq!(double.contacts().len(), 30);
}

#[tokio::test]
async fn an_exhausted_window_holds_the_next_request_until_the_reset() {
    let double = IntercomDouble::start(TOKEN).await;
    let connector = connector(&double).await;
    // The search succeeds but uses up the window, which resets 2 s later (1–2 s from now,
    // as the reset is in whole seconds).
    double.exhaust_next(1, 2);

    let started = Instant::now();
    let outcomes = connector
        .send(Operation::Upsert, &[contact(1, "u-1", "ada@example.com", "Ada")])
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(double.contacts().len(), 1);
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_token_appears_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = IntercomDouble::start("the-right-token").await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "", "");

    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by Intercom (HTTP 401)"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert!(
        double.requests().len() <= 4,
        "no retry loop: {}",
        double.requests().len()
    );
    let everything = format!("{report:?} {error}");
    assert!(!everything.contains(TOKEN), "the token leaked: {everything}");
    assert!(
        !everything.contains("dG9rOjFh"),
        "part of the token leaked: {everything}"
    );

    let connector = destination::build(&dest, Some(&secret(TOKEN))).await.unwrap();
    let check = connector.check().await.unwrap_err();
    assert_eq!(
        check,
        SendError::Fatal("credentials rejected by Intercom (HTTP 401)".into())
    );
}

#[tokio::test]
async fn the_connection_check_asks_for_the_admin_behind_the_token() {
    let double = IntercomDouble::start(TOKEN).await;
    connector(&double).await.check().await.unwrap();
    let request = &double.requests()[0];
    assert_eq!((request.method.as_str(), request.path.as_str()), ("GET", "/me"));
    assert_eq!(request.version.as_deref(), Some("2.11"));
}

#[tokio::test]
async fn mirror_deletes_search_for_the_contact_and_delete_it() {
    let model = TempSqlite::new(MODEL).await;
    let double = IntercomDouble::start(TOKEN).await;
    let dest = destination(&double.url, "", "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, TOKEN, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.contacts().len(), 30);
    let gone = double.find("external_id", "u-2").unwrap().id;

    // Someone already deleted u-5 in Intercom: that counts as deleted.
    {
        let connector = connector(&double).await;
        let outcomes = connector
            .send(Operation::Delete, &[contact(5, "u-5", "", "")])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
        assert!(double.find("external_id", "u-5").is_none());
    }
    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    let before = double.requests().len();

    let report = run_sync(&model, &dest, TOKEN, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    assert_eq!(double.contacts().len(), 28);
    let mut calls: Vec<_> = double
        .requests()
        .split_off(before)
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    calls.sort();
    assert_eq!(
        calls,
        [
            format!("DELETE /contacts/{gone}"),
            "POST /contacts/search".to_owned(),
            "POST /contacts/search".to_owned(),
        ],
        "only the contact Intercom still has is deleted"
    );
}

#[tokio::test]
async fn update_never_creates_and_insert_never_overwrites() {
    let double = IntercomDouble::start(TOKEN).await;
    let seeded = double.seed(json!({"role": "user", "external_id": "u-1", "name": "A"}));
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Update, &[contact(1, "u-1", "ada@example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let outcomes = connector
        .send(Operation::Update, &[contact(2, "u-2", "new@example.com", "New")])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![RecordOutcome::Rejected(
            "no Intercom contact with external_id \"u-2\"".into()
        )]
    );
    assert_eq!(double.contacts().len(), 1);
    assert_eq!(double.contacts()[0].attributes["name"], "Ada");

    let outcomes = connector
        .send(
            Operation::Insert,
            &[contact(1, "u-1", "ada@example.com", "Again")],
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![RecordOutcome::Rejected(format!(
            "Intercom already has contact {seeded} with external_id \"u-1\""
        ))]
    );
    let outcomes = connector
        .send(
            Operation::Insert,
            &[contact(3, "u-3", "grace@example.com", "Grace")],
        )
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(double.contacts().len(), 2);
    assert_eq!(double.contacts()[0].attributes["name"], "Ada");
}

#[tokio::test]
async fn a_batch_over_one_contact_is_never_sent() {
    let double = IntercomDouble::start(TOKEN).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().max_batch_size, 1);

    let two = vec![
        contact(1, "u-1", "a@example.com", "A"),
        contact(2, "u-2", "b@example.com", "B"),
    ];
    let error = connector.send(Operation::Upsert, &two).await.unwrap_err();
    assert!(matches!(error, SendError::Fatal(_)), "{error:?}");
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at one contact per request.
    let model = TempSqlite::new(MODEL).await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "batchSize: 50", "");
    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    let requests = double.requests();
    assert_eq!(requests.len(), 60, "one search and one create per contact");
    assert!(requests.iter().all(|r| r.body.is_object() && r.status == 200));
    assert_eq!(double.contacts().len(), 30);
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/intercom.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/intercom.md", &mut manifests).unwrap();
    let (_, dest) = manifests.destinations.iter().next().expect("a Destination");
    validate_destination(&dest.spec).unwrap();
    let (_, sync) = manifests.syncs.iter().next().expect("a ReverseSync");
    validate_reverse_sync(&sync.spec).unwrap();
    let (_, secret) = manifests.secrets.iter().next().expect("a Secret");
    let connector = destination::build(&dest.spec, Some(secret)).await.unwrap();
    let caps = connector.capabilities();
    assert_eq!(
        (
            caps.max_batch_size,
            caps.default_requests_per_second,
            caps.default_concurrency
        ),
        (1, 16.0, 4)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(dest.spec.target(), "intercom/user/external_id");
}

#[tokio::test]
async fn an_exhausted_window_holds_back_every_sender_of_the_destination() {
    use backflow::destination::delivery::rate_limit::RateLimiter;
    use backflow::destination::delivery::{Delivery, DeliveryConfig};
    let double = IntercomDouble::start(TOKEN).await;
    let dest = destination(&double.url, "", "");
    let connector = connector(&double).await;
    let limiter = Arc::new(RateLimiter::new(1000.0, 1000));
    let config = DeliveryConfig::resolve(&dest, &connector.capabilities()).unwrap();
    let delivery = Delivery::new(connector, Arc::clone(&limiter), config);
    // The last call of the batch uses up the window, which resets 2 s later.
    double.exhaust_next(2, 2);

    delivery
        .send_batch(
            Operation::Upsert,
            vec![contact(1, "u-1", "ada@example.com", "Ada")],
        )
        .await
        .unwrap();

    // Another sync sharing the Destination's limiter waits for the reset as well.
    let started = Instant::now();
    limiter.acquire().await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn an_endless_answer_is_read_up_to_the_cap_and_refused_as_retryable() {
    let endless =
        support::http_server::HttpDouble::start(support::http_server::Behaviour::endless_body(200)).await;
    let c = destination::build(&destination(&endless.url, "", ""), Some(&secret(TOKEN)))
        .await
        .unwrap();
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        c.send(Operation::Upsert, &[contact(1, "u1", "u1@example.com", "Ann")]),
    )
    .await
    .expect("the body is not read to the request timeout");
    let reason = match answer {
        Err(SendError::Retryable { reason, .. }) => reason,
        Ok(outcomes) => match &outcomes[..] {
            [RecordOutcome::Retry(reason)] => reason.clone(),
            other => panic!("expected a retry, got {other:?}"),
        },
        Err(other) => panic!("expected a retryable error, got {other:?}"),
    };
    assert!(reason.contains("larger than"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(20));
    let cap = backflow::destination::vendor::MAX_RESPONSE_BYTES;
    assert!(
        endless.bytes_streamed() < 2 * cap,
        "{} bytes",
        endless.bytes_streamed()
    );
}
