//! The `zendesk` destination against the in-process Zendesk double: the connector on its own,
//! and whole sync runs from a SQLite model.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::zendesk::{JobPolling, ZendeskConnector};
use backflow::destination::{self, Connector, RecordOutcome, SendError};
use backflow::engine::run::{RunReport, RunResult};
use backflow::local::manifests::{Manifests, load_text};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use base64::Engine as _;
use support::sqlite::TempSqlite;
use support::zendesk_double::ZendeskDouble;

const EMAIL: &str = "agent@acme.com";
const TOKEN: &str = "6wiIBWbGkBMo1mRDMuVwkw1EPsNkeUj95PIz2akv";

fn destination(base_url: &str, object: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: zendesk\ncredentialsSecretRef: {{name: zendesk}}\n{extra}\nzendesk: {{subdomain: acme, object: {object}, baseUrl: \"{base_url}\"}}\n"
    ))
    .unwrap()
}

fn secret(token: &str) -> SecretData {
    SecretData::new(BTreeMap::from([
        ("email".to_owned(), EMAIL.to_owned()),
        ("token".to_owned(), token.to_owned()),
    ]))
}

async fn connector(double: &ZendeskDouble, object: &str) -> Arc<dyn Connector> {
    destination::build(&destination(&double.url, object, ""), Some(&secret(TOKEN)))
        .await
        .unwrap()
}

fn user(key: i64, email: &str, name: &str) -> Record {
    let identity = Document::from([("external_id".to_owned(), Value::Text(format!("c-{key}")))]);
    let mut fields = Document::new();
    fields.insert("email".into(), Value::Text(email.to_owned()));
    fields.insert("name".into(), Value::Text(name.to_owned()));
    fields.insert("user_fields.score".into(), Value::Int(key * 10));
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
destinationRef: {{name: zendesk}}
mode: {mode}
match: [external_id]
mappings:
  - {{from: id, to: external_id}}
  - {{from: email, to: email}}
  - {{from: name, to: name}}
  - {{from: ltv, to: user_fields.lifetime_value}}
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
async fn upsert_by_external_id_follows_the_job_then_updates_the_same_user() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "users").await;

    let outcomes = connector
        .send(Operation::Upsert, &[user(1, "Ada@Example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let created = double.find("users", "external_id", "c-1").unwrap();
    assert_eq!(created.text("name"), "Ada");
    assert_eq!(created.attributes["user_fields"]["score"], 10);

    let outcomes = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Augusta")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let users = double.records("users");
    assert_eq!(users.len(), 1, "the second upsert updated, not duplicated");
    assert_eq!(users[0].id, created.id);
    assert_eq!(users[0].text("name"), "Augusta");

    let requests = double.requests();
    let paths: Vec<_> = requests
        .iter()
        .map(|r| (r.method.as_str(), r.path.as_str()))
        .collect();
    assert_eq!(paths[0], ("POST", "/api/v2/users/create_or_update_many"));
    assert!(
        paths[1].1.starts_with("/api/v2/job_statuses/") && paths[1].1.ends_with(".json"),
        "{paths:?}"
    );
    assert_eq!(
        requests.iter().filter(|r| r.is_poll()).count(),
        4,
        "each job is polled until completed: queued → working → completed"
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{EMAIL}/token:{TOKEN}"));
    assert!(
        requests
            .iter()
            .all(|r| r.authorization.as_deref() == Some(&*format!("Basic {basic}")))
    );
    assert_eq!(
        double.calls()[1].body,
        serde_json::json!({"users": [{"external_id": "c-1", "email": "ada@example.com",
            "name": "Augusta", "user_fields": {"score": 10}}]})
    );
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let dest = destination(&double.url, "users", "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    let stored = double.find("users", "external_id", "7").unwrap();
    assert_eq!(stored.text("name"), "User 7");
    assert_eq!(stored.text("email"), "user7@example.com");
    assert_eq!(stored.attributes["user_fields"]["lifetime_value"], 10.5);

    let before = double.requests().len();
    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.requests().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    let last = double.calls().pop().unwrap();
    assert_eq!(last.objects(), 1, "only the changed row is sent");
    assert_eq!(
        double.find("users", "external_id", "3").unwrap().text("name"),
        "Renamed"
    );
    assert_eq!(double.records("users").len(), 30);
}

#[tokio::test]
async fn an_invalid_email_fails_in_the_job_results_and_the_rest_land() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "users").await;
    let batch = vec![
        user(1, "ada@example.com", "Ada"),
        user(2, "not-an-email", "Bob"),
        user(3, "grace@example.com", "Grace"),
    ];

    let outcomes = connector.send(Operation::Upsert, &batch).await.unwrap();

    assert_eq!(
        double.calls().len(),
        1,
        "one bulk call; the failure is in the job"
    );
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected("EmailNotValid: Email: not-an-email is not properly formatted".into()),
            RecordOutcome::Accepted,
        ]
    );
    assert_eq!(double.records("users").len(), 2);
}

#[tokio::test]
async fn a_request_refused_whole_with_422_is_split_so_the_good_records_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'broken' || id WHERE id IN (4, 21)")
        .await;
    let double = ZendeskDouble::whole_request_422(EMAIL, TOKEN).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, "users", ""),
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
        report.rejected_samples[0]
            .reason
            .starts_with("RecordInvalid: Record validation errors: Email: <value> is not"),
        "Zendesk's code and message, not the row's value: {}",
        report.rejected_samples[0].reason
    );
    assert_eq!(double.records("users").len(), 28);
    assert!(double.requests().iter().any(|r| r.status == 422));
}

#[tokio::test]
async fn throttling_is_retried_after_zendesks_retry_after() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "users").await;
    double.throttle_next(1, 1);

    let error = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Ada")])
        .await
        .unwrap_err();
    assert_eq!(
        error,
        SendError::Retryable {
            reason:
                "Zendesk is throttling requests (HTTP 429): TooManyRequests: You have exceeded the rate limit"
                    .into(),
            retry_after: Some(Duration::from_secs(1)),
            throttled: true,
        }
    );

    let model = TempSqlite::new(MODEL).await;
    double.throttle_next(1, 1);
    double.fail_next(1, 503);
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(
        &model,
        &destination(&double.url, "users", ""),
        TOKEN,
        state.path(),
        "upsert",
    )
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(report.throttled, 1);
    assert!(report.retries >= 2, "{}", report.retries);
    assert_eq!(double.records("users").len(), 30);
}

#[tokio::test]
async fn a_job_that_does_not_finish_in_time_leaves_the_batch_retryable() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let dest = destination(&double.url, "users", "");
    let connector = ZendeskConnector::new(
        dest.zendesk.as_ref().unwrap(),
        dest.credentials_secret_ref.as_ref(),
        Some(&secret(TOKEN)),
    )
    .unwrap()
    .with_polling(JobPolling {
        first_pause: Duration::from_millis(10),
        max_pause: Duration::from_millis(20),
        timeout: Duration::from_millis(150),
    });
    double.hold_jobs(true);

    let error = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Ada")])
        .await
        .unwrap_err();

    assert!(
        matches!(&error, SendError::Retryable { reason, throttled: false, .. } if reason.contains("did not finish")),
        "{error:?}"
    );
    assert!(double.requests().iter().filter(|r| r.is_poll()).count() >= 3);
    assert!(double.records("users").is_empty());

    double.hold_jobs(false);
    let outcomes = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
}

#[tokio::test]
async fn a_throttled_job_poll_is_polled_again_without_resending_the_batch() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "users").await;
    double.throttle_polls(2);

    let outcomes = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Ada")])
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(double.calls().len(), 1, "one bulk call");
    let polls: Vec<u16> = double
        .requests()
        .iter()
        .filter(|r| r.is_poll())
        .map(|r| r.status)
        .collect();
    assert_eq!(polls, [429, 429, 200, 200]);
    assert_eq!(double.records("users").len(), 1);
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_token_appears_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = ZendeskDouble::start(EMAIL, "the-right-token-0000").await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "users", "");

    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by Zendesk (HTTP 401)"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert!(
        double.requests().len() <= 4,
        "no retry loop: {}",
        double.requests().len()
    );
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{EMAIL}/token:{TOKEN}"));
    let everything = format!("{report:?} {error}");
    assert!(!everything.contains(TOKEN), "the token leaked: {everything}");
    assert!(
        !everything.contains(&basic),
        "the credential leaked: {everything}"
    );

    let connector = destination::build(&dest, Some(&secret(TOKEN))).await.unwrap();
    let check = connector.check().await.unwrap_err();
    assert!(
        matches!(&check, SendError::Fatal(m) if m.starts_with("credentials rejected by Zendesk (HTTP 401)")),
        "{check:?}"
    );
    assert!(!format!("{check:?}").contains(TOKEN));
}

#[tokio::test]
async fn the_connection_check_reads_the_tokens_own_user() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    connector(&double, "organizations").await.check().await.unwrap();
    let request = &double.requests()[0];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("GET", "/api/v2/users/me.json")
    );
}

#[tokio::test]
async fn mirror_deletes_destroy_users_by_external_id_and_an_unknown_one_counts_as_deleted() {
    let model = TempSqlite::new(MODEL).await;
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let dest = destination(&double.url, "users", "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, TOKEN, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.records("users").len(), 30);

    // Someone already deleted user 5 in Zendesk, through the API itself.
    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    {
        let connector = connector(&double, "users").await;
        let record = Record {
            key: "5".into(),
            identity: Document::from([("external_id".to_owned(), Value::Text("5".into()))]).into(),
            fields: Document::new().into(),
        };
        let outcomes = connector.send(Operation::Delete, &[record]).await.unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
        assert!(double.find("users", "external_id", "5").is_none());
    }
    let before = double.calls().len();

    let report = run_sync(&model, &dest, TOKEN, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    assert_eq!(double.records("users").len(), 28);
    assert!(double.find("users", "external_id", "2").is_none());
    let calls = double.calls().split_off(before);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].method.as_str(), calls[0].path.as_str()),
        ("DELETE", "/api/v2/users/destroy_many")
    );
    assert_eq!(calls[0].query["external_ids"], "2,5");
}

#[tokio::test]
async fn deletes_of_records_matched_on_email_are_rejected_with_the_reason() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "users").await;
    let record = Record {
        key: "1".into(),
        identity: Document::from([("email".to_owned(), Value::Text("ada@example.com".into()))]).into(),
        fields: Document::new().into(),
    };

    let outcomes = connector.send(Operation::Delete, &[record]).await.unwrap();

    assert!(
        matches!(&outcomes[0], RecordOutcome::Rejected(m) if m.contains("only by external_id")),
        "{outcomes:?}"
    );
    assert!(double.requests().is_empty(), "nothing was sent");
}

#[tokio::test]
async fn organizations_are_upserted_by_name_with_their_organization_fields() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "organizations").await;
    let org = |name: &str, tier: &str| {
        let identity = Document::from([("name".to_owned(), Value::Text(name.to_owned()))]);
        let mut custom = Document::new();
        custom.insert("tier".into(), Value::Text(tier.to_owned()));
        let mut fields = Document::new();
        fields.insert("notes".into(), Value::Text("from the warehouse".into()));
        fields.insert("organization_fields".into(), Value::Object(custom));
        Record {
            key: name.to_owned(),
            identity: identity.into(),
            fields: fields.into(),
        }
    };

    // Insert and update are upserts too: Zendesk's bulk write cannot tell them apart.
    let outcomes = connector
        .send(Operation::Insert, &[org("Acme", "gold"), org("Globex", "silver")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
    let outcomes = connector
        .send(Operation::Update, &[org("Acme", "platinum")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);

    let orgs = double.records("organizations");
    assert_eq!(orgs.len(), 2);
    let acme = double.find("organizations", "name", "Acme").unwrap();
    assert_eq!(acme.attributes["organization_fields"]["tier"], "platinum");
    let calls = double.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.path == "/api/v2/organizations/create_or_update_many")
    );
    assert_eq!(
        calls[1].body,
        serde_json::json!({"organizations": [{"name": "Acme", "notes": "from the warehouse",
            "organization_fields": {"tier": "platinum"}}]})
    );
}

#[tokio::test]
async fn a_batch_over_100_objects_is_never_sent() {
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    let connector = connector(&double, "users").await;
    assert_eq!(connector.capabilities().max_batch_size, 100);

    let big: Vec<Record> = (1..=101)
        .map(|i| user(i, &format!("u{i}@example.com"), "U"))
        .collect();
    let error = connector.send(Operation::Upsert, &big).await.unwrap_err();
    assert!(matches!(error, SendError::Fatal(_)), "{error:?}");
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at Zendesk's limit.
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, ltv REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250)
         INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User', 1 FROM n;",
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "users", "batchSize: 500");
    let report = run_sync(&model, &dest, TOKEN, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 250);
    let calls = double.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|r| r.objects() <= 100 && r.status == 200));
    assert_eq!(double.records("users").len(), 250);
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/zendesk.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/zendesk.md", &mut manifests).unwrap();
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
        (100, 3.0, 2)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(dest.spec.target(), "zendesk/acme/users");
}

#[tokio::test]
async fn throttled_job_polls_count_in_the_run_as_throttles_and_retries() {
    let model = TempSqlite::new(MODEL).await;
    let double = ZendeskDouble::start(EMAIL, TOKEN).await;
    double.throttle_polls(2);
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, "users", ""),
        TOKEN,
        state.path(),
        "upsert",
    )
    .await;

    assert!(report.error.is_none(), "{:?}", report.error);
    let throttled_polls = double
        .requests()
        .iter()
        .filter(|r| r.is_poll() && r.status == 429)
        .count();
    assert_eq!(throttled_polls, 2);
    assert_eq!(report.throttled, 2, "the throttled polls show in the run");
    assert!(report.retries >= 2, "{}", report.retries);
}
