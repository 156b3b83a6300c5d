//! The `hubspot` destination against the in-process HubSpot double: the connector on its own,
//! and whole sync runs from a SQLite model.

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
use support::hubspot_double::HubspotDouble;
use support::sqlite::TempSqlite;

const TOKEN: &str = "pat-na1-0b1e2f3a-5ecret";

fn destination(base_url: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: hubspot\ncredentialsSecretRef: {{name: hubspot}}\n{extra}\nhubspot: {{object: contacts, idProperty: email, baseUrl: \"{base_url}\"}}\n"
    ))
    .unwrap()
}

fn secret(token: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("token".to_owned(), token.to_owned())]))
}

async fn connector(double: &HubspotDouble) -> Arc<dyn Connector> {
    destination::build(&destination(&double.url, ""), Some(&secret(TOKEN)))
        .await
        .unwrap()
}

fn contact(key: i64, email: &str, first: &str) -> Record {
    let identity = Document::from([("email".to_owned(), Value::Text(email.to_owned()))]);
    let mut fields = identity.clone();
    fields.insert("firstname".into(), Value::Text(first.to_owned()));
    fields.insert("score".into(), Value::Int(key * 10));
    Record {
        key: key.to_string(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

// --- whole runs ---------------------------------------------------------------------------

const MODEL: &str = "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, ltv REAL);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User ' || i, i * 1.5 FROM n;";

fn sync_spec(mode: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, name, ltv FROM customers", primaryKey: [id]}}
destinationRef: {{name: hubspot}}
mode: {mode}
match: [email]
mappings:
  - {{from: email, to: email}}
  - {{from: name, to: firstname}}
  - {{from: ltv, to: properties.ltv}}
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
async fn upsert_by_email_creates_a_contact_then_updates_it() {
    let double = HubspotDouble::start(TOKEN).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Upsert, &[contact(1, "Ada@Example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let created = double.find("contacts", "email", "ada@example.com").unwrap();
    assert_eq!(created.properties["firstname"], "Ada");
    assert_eq!(created.properties["score"], "10", "numbers are written as text");

    let outcomes = connector
        .send(Operation::Upsert, &[contact(1, "ada@example.com", "Augusta")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let contacts = double.objects("contacts");
    assert_eq!(contacts.len(), 1, "the second upsert updated, not duplicated");
    assert_eq!(contacts[0].id, created.id);
    assert_eq!(contacts[0].properties["firstname"], "Augusta");

    let request = &double.requests()[1];
    assert_eq!(request.path, "/crm/v3/objects/contacts/batch/upsert");
    assert_eq!(
        request.authorization.as_deref(),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(
        request.body,
        serde_json::json!({"inputs": [{"idProperty": "email", "id": "ada@example.com",
            "properties": {"firstname": "Augusta", "score": "10"}}]})
    );
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = HubspotDouble::start(TOKEN).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    let stored = double.find("contacts", "email", "user7@example.com").unwrap();
    assert_eq!(stored.properties["firstname"], "User 7");
    assert_eq!(stored.properties["ltv"], "10.5", "properties.ltv is flattened");

    let before = double.requests().len();
    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.requests().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    let last = double.requests().pop().unwrap();
    assert_eq!(last.inputs(), 1, "only the changed row is sent");
    assert_eq!(
        double
            .find("contacts", "email", "user3@example.com")
            .unwrap()
            .properties["firstname"],
        "Renamed"
    );
    assert_eq!(double.objects("contacts").len(), 30);
}

#[tokio::test]
async fn a_per_record_validation_error_rejects_that_record_and_keeps_the_rest() {
    let double = HubspotDouble::start(TOKEN).await;
    let connector = connector(&double).await;
    let batch = vec![
        contact(1, "ada@example.com", "Ada"),
        contact(2, "not-an-email", "Bob"),
        contact(3, "grace@example.com", "Grace"),
    ];

    let outcomes = connector.send(Operation::Upsert, &batch).await.unwrap();

    assert_eq!(double.requests()[0].status, 207);
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected("Email address not-an-email is invalid".into()),
            RecordOutcome::Accepted,
        ]
    );
    assert_eq!(double.objects("contacts").len(), 2);
}

#[tokio::test]
async fn a_batch_refused_whole_is_split_so_the_good_records_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'broken' || id WHERE id IN (4, 21)")
        .await;
    let double = HubspotDouble::whole_batch_400(TOKEN).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, ""),
        TOKEN,
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
        report.rejected_samples[0].reason.contains("INVALID_EMAIL"),
        "{}",
        report.rejected_samples[0].reason
    );
    assert_eq!(double.objects("contacts").len(), 28);
    assert!(double.requests().iter().any(|r| r.status == 400));
}

#[tokio::test]
async fn throttling_is_retried_after_hubspots_rate_limit_window() {
    let double = HubspotDouble::start(TOKEN).await;
    let connector = connector(&double).await;
    double.throttle_next(1, 40);

    let error = connector
        .send(Operation::Upsert, &[contact(1, "ada@example.com", "Ada")])
        .await
        .unwrap_err();
    assert_eq!(
        error,
        SendError::Retryable {
            reason: "HubSpot is throttling requests (HTTP 429): You have reached your secondly limit.".into(),
            retry_after: Some(Duration::from_millis(40)),
            throttled: true,
        }
    );

    let model = TempSqlite::new(MODEL).await;
    double.throttle_next(2, 40);
    double.fail_next(1, 502);
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(
        &model,
        &destination(&double.url, ""),
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
    assert_eq!(double.objects("contacts").len(), 30);
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_token_appears_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = HubspotDouble::start("pat-na1-the-right-one").await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "");

    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by HubSpot (HTTP 401)"),
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
        !everything.contains("0b1e2f3a"),
        "part of the token leaked: {everything}"
    );

    let connector = destination::build(&dest, Some(&secret(TOKEN))).await.unwrap();
    let check = connector.check().await.unwrap_err();
    assert!(
        matches!(&check, SendError::Fatal(m) if m.starts_with("credentials rejected by HubSpot (HTTP 401)"))
    );
    assert!(!format!("{check:?}").contains(TOKEN));
}

#[tokio::test]
async fn the_connection_check_lists_one_record_and_names_an_unknown_object() {
    let double = HubspotDouble::start(TOKEN).await;
    connector(&double).await.check().await.unwrap();
    let request = &double.requests()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/crm/v3/objects/contacts")
    );

    let mut dest = destination(&double.url, "");
    dest.hubspot.as_mut().unwrap().object = "2-12345".into();
    destination::build(&dest, Some(&secret(TOKEN)))
        .await
        .unwrap()
        .check()
        .await
        .unwrap();
    dest.hubspot.as_mut().unwrap().object = "contactz".into();
    let error = destination::build(&dest, Some(&secret(TOKEN)))
        .await
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("does not know object type \"contactz\"")),
        "{error:?}"
    );
}

#[tokio::test]
async fn mirror_deletes_look_ids_up_with_batch_read_and_archive_them() {
    let model = TempSqlite::new(MODEL).await;
    let double = HubspotDouble::start(TOKEN).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, TOKEN, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.objects("contacts").len(), 30);
    let gone_id = double.find("contacts", "email", "user2@example.com").unwrap().id;

    // Someone already deleted user5 in HubSpot: that counts as deleted.
    let user5 = double.find("contacts", "email", "user5@example.com").unwrap().id;
    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    {
        // Remove user5 behind the sync's back through the API itself.
        let connector = connector(&double).await;
        let record = contact(5, "user5@example.com", "");
        let outcomes = connector.send(Operation::Delete, &[record]).await.unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
        assert!(double.objects("contacts").iter().all(|o| o.id != user5));
    }
    let before = double.requests().len();

    let report = run_sync(&model, &dest, TOKEN, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    let contacts = double.objects("contacts");
    assert_eq!(contacts.len(), 28);
    assert!(contacts.iter().all(|o| o.id != gone_id));
    let requests = double.requests().split_off(before);
    let actions: Vec<_> = requests.iter().map(|r| r.action().to_owned()).collect();
    assert_eq!(actions, ["read", "archive"]);
    assert_eq!(
        requests[0].body["idProperty"], "email",
        "ids are looked up by the id property"
    );
    assert_eq!(requests[0].inputs(), 2);
    assert_eq!(
        requests[1].body,
        serde_json::json!({"inputs": [{"id": gone_id}]}),
        "only the record HubSpot still has is archived"
    );
}

#[tokio::test]
async fn update_never_creates_and_an_unknown_record_is_rejected() {
    let double = HubspotDouble::start(TOKEN).await;
    double.seed("contacts", &[("email", "ada@example.com"), ("firstname", "A")]);
    let connector = connector(&double).await;

    let outcomes = connector
        .send(
            Operation::Update,
            &[
                contact(1, "ada@example.com", "Ada"),
                contact(2, "new@example.com", "New"),
            ],
        )
        .await
        .unwrap();

    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert!(
        matches!(&outcomes[1], RecordOutcome::Rejected(m) if m.contains("new@example.com")),
        "{outcomes:?}"
    );
    assert_eq!(double.requests()[0].action(), "update");
    let contacts = double.objects("contacts");
    assert_eq!(contacts.len(), 1);
    assert_eq!(contacts[0].properties["firstname"], "Ada");
}

#[tokio::test]
async fn insert_creates_with_the_id_property_and_a_duplicate_is_refused() {
    let double = HubspotDouble::start(TOKEN).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Insert, &[contact(1, "ada@example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let request = &double.requests()[0];
    assert_eq!(request.action(), "create");
    assert_eq!(
        request.body,
        serde_json::json!({"inputs": [{"properties": {"email": "ada@example.com", "firstname": "Ada", "score": "10"}}]})
    );

    let error = connector
        .send(Operation::Insert, &[contact(1, "ada@example.com", "Ada")])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::BatchRejected(m) if m.contains("CONFLICT: Contact already exists")),
        "{error:?}"
    );
    assert_eq!(double.objects("contacts").len(), 1);
}

#[tokio::test]
async fn a_batch_over_100_inputs_is_never_sent() {
    let double = HubspotDouble::start(TOKEN).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().max_batch_size, 100);

    let big: Vec<Record> = (1..=101)
        .map(|i| contact(i, &format!("u{i}@example.com"), "U"))
        .collect();
    let error = connector.send(Operation::Upsert, &big).await.unwrap_err();
    assert!(matches!(error, SendError::Fatal(_)), "{error:?}");
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at HubSpot's limit.
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, ltv REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250)
         INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User', 1 FROM n;",
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "batchSize: 500");
    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 250);
    let requests = double.requests();
    assert!(requests.iter().all(|r| r.inputs() <= 100));
    assert!(requests.iter().all(|r| r.status == 200));
    assert_eq!(double.objects("contacts").len(), 250);
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/hubspot.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/hubspot.md", &mut manifests).unwrap();
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
        (100, 9.0, 4)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(dest.spec.target(), "hubspot/contacts/email");
}

// --- errors about the request, not a record ------------------------------------------------

#[tokio::test]
async fn a_property_hubspot_does_not_have_stops_the_run_after_one_call() {
    let model = TempSqlite::new(MODEL).await;
    let double = HubspotDouble::start(TOKEN).await;
    double.define_properties("contacts", &["email", "firstname"]);
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, ""),
        TOKEN,
        state.path(),
        "upsert",
    )
    .await;

    assert_eq!(report.result, RunResult::Failed);
    let error = report.error.as_ref().expect("the run stops").to_string();
    assert!(
        error.contains("has no property ltv (PROPERTY_DOESNT_EXIST)"),
        "{error}"
    );
    assert_eq!(report.rejected, 0, "no row is blamed for the mapping");
    let writes = double
        .requests()
        .iter()
        .filter(|r| r.action() == "upsert")
        .count();
    assert_eq!(writes, 1, "not split down to single records");
    assert!(double.objects("contacts").is_empty());
}

#[tokio::test]
async fn rejection_reasons_keep_hubspots_message_but_not_the_value() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'user13.example.com' WHERE id = 13")
        .await;
    let double = HubspotDouble::start(TOKEN).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, ""),
        TOKEN,
        state.path(),
        "upsert",
    )
    .await;

    assert_eq!((report.accepted, report.rejected), (29, 1));
    assert_eq!(
        report.rejected_samples[0].reason,
        "Email address <value> is invalid"
    );
}
