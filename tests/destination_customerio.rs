//! The `customerio` destination against the in-process Customer.io Track API double: the
//! connector on its own, and whole sync runs from a SQLite model.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::{self, Connector, RecordOutcome, SendError};
use backflow::engine::run::{RunReport, RunResult};
use backflow::local::manifests::{Manifests, load_text};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use serde_json::json;
use support::customerio_double::CustomerioDouble;
use support::sqlite::TempSqlite;

const SITE_ID: &str = "5ite1d0a7b3c";
const API_KEY: &str = "ak-9f8e7d6c5b4a-5ecret";

fn destination(base_url: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: customerio\ncredentialsSecretRef: {{name: customerio}}\n{extra}\ncustomerio: {{baseUrl: \"{base_url}\"}}\n"
    ))
    .unwrap()
}

fn secret(site_id: &str, api_key: &str) -> SecretData {
    SecretData::new(BTreeMap::from([
        ("siteId".to_owned(), site_id.to_owned()),
        ("apiKey".to_owned(), api_key.to_owned()),
    ]))
}

async fn connector(double: &CustomerioDouble) -> Arc<dyn Connector> {
    destination::build(&destination(&double.url, ""), Some(&secret(SITE_ID, API_KEY)))
        .await
        .unwrap()
}

fn person(match_field: &str, identifier: Value, name: &str) -> Record {
    let identity = Document::from([(match_field.to_owned(), identifier)]);
    let mut fields = identity.clone();
    fields.insert("first_name".into(), Value::Text(name.to_owned()));
    fields.insert("seats".into(), Value::Int(3));
    Record {
        key: "1".into(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

// --- whole runs ---------------------------------------------------------------------------

const MODEL: &str = "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, ltv REAL, bio TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO customers SELECT i, 'user' || i || '+cio@example.com', 'User ' || i, i * 1.5, 'bio ' || i FROM n;";

fn sync_spec(mode: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, name, ltv, bio FROM customers", primaryKey: [id]}}
destinationRef: {{name: customerio}}
mode: {mode}
match: [email]
mappings:
  - {{from: email, to: email}}
  - {{from: name, to: first_name}}
  - {{from: ltv, to: ltv}}
  - {{from: bio, to: bio}}
"#
    ))
    .unwrap()
}

async fn run_sync(
    model: &TempSqlite,
    dest: &DestinationSpec,
    api_key: &str,
    state: &std::path::Path,
    mode: &str,
) -> RunReport {
    let spec = sync_spec(mode);
    support::engine::run_sync_once(&model.url, &spec, dest, &secret(SITE_ID, api_key), state).await
}

#[tokio::test]
async fn identify_by_id_creates_a_person_then_updates_its_attributes() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Upsert, &[person("id", Value::Int(42), "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let stored = double.person("42").unwrap();
    assert_eq!(stored["first_name"], "Ada");
    assert_eq!(stored["seats"], 3, "numbers stay numbers");

    let mut renamed = person("id", Value::Int(42), "Augusta");
    renamed.fields.insert("seats".into(), Value::Null);
    let outcomes = connector.send(Operation::Upsert, &[renamed]).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(double.identifiers(), ["42"], "updated, not duplicated");
    let stored = double.person("42").unwrap();
    assert_eq!(stored["first_name"], "Augusta");
    assert!(!stored.contains_key("seats"), "a NULL removes the attribute");

    let request = &double.requests()[1];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("PUT", "/api/v1/customers/42")
    );
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{SITE_ID}:{API_KEY}"),
    );
    assert_eq!(request.authorization.as_deref(), Some(&*format!("Basic {basic}")));
    assert_eq!(
        request.body,
        json!({"id": 42, "first_name": "Augusta", "seats": ""})
    );
}

#[tokio::test]
async fn an_email_identifier_is_percent_encoded_and_reaches_customerio_as_written() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let connector = connector(&double).await;
    let email = "ada+news@example.com";

    let outcomes = connector
        .send(
            Operation::Upsert,
            &[person("email", Value::Text(email.into()), "Ada")],
        )
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(double.identifiers(), [email]);
    assert_eq!(double.requests()[0].identifier, email);
}

#[tokio::test]
async fn insert_and_update_are_identify_calls_too() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().operations.len(), 4);

    for (operation, name) in [(Operation::Insert, "Ada"), (Operation::Update, "Augusta")] {
        let outcomes = connector
            .send(operation, &[person("id", Value::Text("u-1".into()), name)])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    }
    // An update of a person Customer.io does not have creates it: identify always upserts.
    connector
        .send(
            Operation::Update,
            &[person("id", Value::Text("u-2".into()), "New")],
        )
        .await
        .unwrap();
    assert_eq!(double.identifiers(), ["u-1", "u-2"]);
    assert_eq!(double.person("u-1").unwrap()["first_name"], "Augusta");
    assert!(double.requests().iter().all(|r| r.method == "PUT"));
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(report.requests, 30, "one request per person");
    let stored = double.person("user7+cio@example.com").unwrap();
    assert_eq!(stored["first_name"], "User 7");
    assert_eq!(stored["ltv"], 10.5);

    let before = double.requests().len();
    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.requests().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    let sent = double.requests().split_off(before);
    assert_eq!(sent.len(), 1, "only the changed row is sent");
    assert_eq!(sent[0].identifier, "user3+cio@example.com");
    assert_eq!(
        double.person("user3+cio@example.com").unwrap()["first_name"],
        "Renamed"
    );
    assert_eq!(double.identifiers().len(), 30);
}

#[tokio::test]
async fn a_record_customerio_refuses_is_rejected_with_its_message_and_the_rest_land() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let connector = connector(&double).await;
    let mut long = person("id", Value::Int(2), "Bob");
    long.fields.insert("bio".into(), Value::Text("x".repeat(1200)));
    let outcomes = connector.send(Operation::Upsert, &[long]).await.unwrap();
    assert_eq!(
        outcomes,
        vec![RecordOutcome::Rejected(
            "attribute \"bio\" value is longer than 1000 bytes".into()
        )]
    );
    assert_eq!(double.requests()[0].status, 400);
    assert!(double.identifiers().is_empty());

    // In a run, Customer.io refuses each request whole; with one person per request the refusal
    // is that row's alone, and the other rows land.
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET bio = hex(zeroblob(600)) WHERE id IN (4, 21)")
        .await;
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(
        &model,
        &destination(&double.url, "batchSize: 50"),
        API_KEY,
        state.path(),
        "upsert",
    )
    .await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected), (28, 2));
    let mut keys: Vec<_> = report.rejected_samples.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["21", "4"]);
    assert!(
        report.rejected_samples[0]
            .reason
            .contains("value is longer than 1000 bytes"),
        "{}",
        report.rejected_samples[0].reason
    );
    assert_eq!(double.identifiers().len(), 28);
    assert!(double.person("user4+cio@example.com").is_none());
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried_honouring_retry_after() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let connector = connector(&double).await;
    double.throttle_next(1, Some(2));

    let error = connector
        .send(Operation::Upsert, &[person("id", Value::Int(1), "Ada")])
        .await
        .unwrap_err();
    assert_eq!(
        error,
        SendError::Retryable {
            reason: "Customer.io is throttling requests (HTTP 429): Too many requests, please slow down"
                .into(),
            retry_after: Some(Duration::from_secs(2)),
            throttled: true,
        }
    );
    double.fail_next(1, 503);
    let error = connector
        .send(Operation::Upsert, &[person("id", Value::Int(1), "Ada")])
        .await
        .unwrap_err();
    assert!(
        matches!(error, SendError::Retryable { throttled: false, .. }),
        "{error:?}"
    );

    let model = TempSqlite::new(MODEL).await;
    double.throttle_next(2, None);
    double.fail_next(1, 502);
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(
        &model,
        &destination(&double.url, ""),
        API_KEY,
        state.path(),
        "upsert",
    )
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(report.throttled, 2);
    assert!(report.retries >= 3, "{}", report.retries);
    assert_eq!(double.identifiers().len(), 30);
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_keys_appear_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = CustomerioDouble::start(SITE_ID, "ak-the-right-one").await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "");

    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by Customer.io (HTTP 401)"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert!(
        double.requests().len() <= 16,
        "no retry loop: {}",
        double.requests().len()
    );
    let everything = format!("{report:?} {error}");
    for leak in [API_KEY, SITE_ID, "9f8e7d6c5b4a"] {
        assert!(!everything.contains(leak), "{leak} leaked: {everything}");
    }

    let connector = destination::build(&dest, Some(&secret(SITE_ID, API_KEY)))
        .await
        .unwrap();
    let check = connector.check().await.unwrap_err();
    assert_eq!(
        check,
        SendError::Fatal("credentials rejected by Customer.io (HTTP 401)".into())
    );
    assert!(!format!("{check:?}").contains(API_KEY));
}

#[tokio::test]
async fn the_connection_check_reads_the_workspace_region_with_the_credentials() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    connector(&double).await.check().await.unwrap();
    let request = &double.requests()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/api/v1/accounts/region")
    );
    assert!(request.authorization.as_deref().unwrap().starts_with("Basic "));

    let mut dest = destination(&double.url, "");
    dest.customerio.as_mut().unwrap().base_url = Some(format!("{}/nowhere", double.url));
    let wrong = destination::build(&dest, Some(&secret(SITE_ID, API_KEY)))
        .await
        .unwrap();
    let error = wrong.check().await.unwrap_err();
    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("HTTP 404")),
        "{error:?}"
    );
    // An identify answered 404 means a wrong base URL, not a refused person.
    let error = wrong
        .send(Operation::Upsert, &[person("id", Value::Int(1), "Ada")])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("HTTP 404") && m.contains("{identifier}")),
        "{error:?}"
    );
}

#[tokio::test]
async fn mirror_deletes_remove_people_and_one_already_gone_counts_as_deleted() {
    let model = TempSqlite::new(MODEL).await;
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, API_KEY, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.identifiers().len(), 30);

    // Someone already deleted user5 in Customer.io: that counts as deleted.
    let connector = connector(&double).await;
    let gone = person("email", Value::Text("user5+cio@example.com".into()), "");
    assert_eq!(
        connector.send(Operation::Delete, &[gone]).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );
    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    let before = double.requests().len();

    let report = run_sync(&model, &dest, API_KEY, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    assert_eq!(double.identifiers().len(), 28);
    assert!(double.person("user2+cio@example.com").is_none());
    let mut sent: Vec<_> = double
        .requests()
        .split_off(before)
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    sent.sort();
    assert_eq!(
        sent,
        [
            (
                "DELETE".to_owned(),
                "/api/v1/customers/user2%2Bcio%40example%2Ecom".to_owned(),
                200
            ),
            (
                "DELETE".to_owned(),
                "/api/v1/customers/user5%2Bcio%40example%2Ecom".to_owned(),
                404
            ),
        ]
    );
}

#[tokio::test]
async fn a_batch_over_one_person_or_a_body_over_32_kb_is_never_sent() {
    let double = CustomerioDouble::start(SITE_ID, API_KEY).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().max_batch_size, 1);

    let two = [person("id", Value::Int(1), "A"), person("id", Value::Int(2), "B")];
    let error = connector.send(Operation::Upsert, &two).await.unwrap_err();
    assert!(matches!(error, SendError::Fatal(_)), "{error:?}");

    let mut huge = person("id", Value::Int(3), "C");
    for i in 0..40 {
        huge.fields
            .insert(format!("note_{i}"), Value::Text("y".repeat(900)));
    }
    let outcomes = connector.send(Operation::Upsert, &[huge]).await.unwrap();
    assert!(
        matches!(&outcomes[..], [RecordOutcome::Rejected(m)] if m.contains("32768-byte request limit")),
        "{outcomes:?}"
    );
    let long_id = person("id", Value::Text("z".repeat(151)), "D");
    let outcomes = connector.send(Operation::Upsert, &[long_id]).await.unwrap();
    assert!(
        matches!(&outcomes[..], [RecordOutcome::Rejected(m)] if m.contains("150-byte limit")),
        "{outcomes:?}"
    );
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at one person per request.
    let model = TempSqlite::new(MODEL).await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "batchSize: 500");
    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.requests, 30);
    assert!(double.requests().iter().all(|r| r.status == 200));
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/customerio.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/customerio.md", &mut manifests).unwrap();
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
        (1, 100.0, 8)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(dest.spec.target(), "customerio/eu");
}
