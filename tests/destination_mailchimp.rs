//! The `mailchimp` destination against the in-process Mailchimp double: the connector on its
//! own, and whole sync runs from a SQLite model.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;

use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::{self, Connector, RecordOutcome, SendError};
use backflow::engine::run::{RunReport, RunResult};
use backflow::local::manifests::{Manifests, load_text};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use serde_json::json;
use support::mailchimp_double::{MailchimpDouble, subscriber_hash};
use support::sqlite::TempSqlite;

const KEY: &str = "0b1e2f3a5ecret9c8d7e6f5a4b3c2d1e-us21";
const LIST: &str = "a1b2c3d4e5";

fn destination(base_url: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: mailchimp\ncredentialsSecretRef: {{name: mailchimp}}\n{extra}\nmailchimp: {{listId: {LIST}, baseUrl: \"{base_url}\"}}\n"
    ))
    .unwrap()
}

fn secret(key: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("apiKey".to_owned(), key.to_owned())]))
}

async fn connector(double: &MailchimpDouble) -> Arc<dyn Connector> {
    destination::build(&destination(&double.url, ""), Some(&secret(KEY)))
        .await
        .unwrap()
}

fn member(key: i64, email: &str, first: &str) -> Record {
    let identity = Document::from([("email_address".to_owned(), Value::Text(email.to_owned()))]);
    let mut fields = identity.clone();
    fields.insert("FNAME".into(), Value::Text(first.to_owned()));
    fields.insert("SCORE".into(), Value::Int(key * 10));
    fields.insert("tags".into(), Value::Array(vec![Value::Text("customer".into())]));
    Record {
        key: key.to_string(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

// --- whole runs ---------------------------------------------------------------------------

const MODEL: &str = "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, plan TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User ' || i,
  CASE WHEN i % 2 = 0 THEN 'pro,paying' ELSE 'free' END FROM n;";

fn sync_spec(mode: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, name, plan FROM customers", primaryKey: [id]}}
destinationRef: {{name: mailchimp}}
mode: {mode}
match: [email_address]
mappings:
  - {{from: email, to: email_address}}
  - {{from: name, to: merge_fields.FNAME}}
  - {{from: plan, to: tags}}
"#
    ))
    .unwrap()
}

async fn run_sync(
    model: &TempSqlite,
    dest: &DestinationSpec,
    key: &str,
    state: &std::path::Path,
    mode: &str,
) -> RunReport {
    let spec = sync_spec(mode);
    support::engine::run_sync_once(&model.url, &spec, dest, &secret(key), state).await
}

#[tokio::test]
async fn batch_subscribe_adds_a_member_then_updates_it_by_email() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Upsert, &[member(1, "Ada@Example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let created = double.member("ada@example.com").unwrap();
    assert_eq!(created.status, "subscribed", "the default status of new members");
    assert_eq!(created.merge_fields["FNAME"], "Ada");
    assert_eq!(created.merge_fields["SCORE"], 10);
    assert_eq!(created.tags, ["customer"]);

    let outcomes = connector
        .send(Operation::Upsert, &[member(1, "ada@example.com", "Augusta")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(double.count(), 1, "the second call updated, not duplicated");
    assert_eq!(
        double.member("ada@example.com").unwrap().merge_fields["FNAME"],
        "Augusta"
    );

    let request = &double.requests()[1];
    assert_eq!(
        (request.method.as_str(), request.path.as_str()),
        ("POST", "/3.0/lists/a1b2c3d4e5")
    );
    let auth = request.authorization.as_deref().unwrap();
    assert!(auth.starts_with("Basic "), "{auth}");
    assert_eq!(
        request.body,
        json!({"members": [{"email_address": "ada@example.com", "status_if_new": "subscribed",
            "merge_fields": {"FNAME": "Augusta", "SCORE": 10}, "tags": ["customer"]}],
            "update_existing": true})
    );
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = MailchimpDouble::start(KEY, LIST).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, KEY, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(double.count(), 30);
    let stored = double.member("user8@example.com").unwrap();
    assert_eq!(stored.merge_fields["FNAME"], "User 8");
    assert_eq!(
        stored.tags,
        ["pro", "paying"],
        "comma-separated text is split into tags"
    );
    assert_eq!(double.requests().len(), 1, "30 members fit one call");

    let before = double.requests().len();
    let report = run_sync(&model, &dest, KEY, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.requests().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, KEY, state.path(), "upsert").await;
    let last = double.requests().pop().unwrap();
    assert_eq!(last.members(), 1, "only the changed row is sent");
    assert_eq!(
        double.member("user3@example.com").unwrap().merge_fields["FNAME"],
        "Renamed"
    );
    assert_eq!(double.count(), 30);
}

#[tokio::test]
async fn a_per_member_error_rejects_that_member_and_keeps_the_rest() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    let connector = connector(&double).await;
    let batch = vec![
        member(1, "ada@example.com", "Ada"),
        member(2, "not-an-email", "Bob"),
        member(3, "grace@example.com", "Grace"),
    ];

    let outcomes = connector.send(Operation::Upsert, &batch).await.unwrap();

    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected(
                "ERROR_GENERIC: not-an-email looks fake or invalid, please enter a real email address."
                    .into()
            ),
            RecordOutcome::Accepted,
        ]
    );
    assert_eq!(double.count(), 2);
    assert_eq!(double.requests().len(), 1);
}

#[tokio::test]
async fn a_field_that_is_no_member_field_rejects_the_record_before_sending() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    let connector = connector(&double).await;
    let mut bad = member(2, "bob@example.com", "Bob");
    bad.fields.insert("first_name".into(), Value::Text("Bob".into()));

    let outcomes = connector
        .send(Operation::Upsert, &[member(1, "ada@example.com", "Ada"), bad])
        .await
        .unwrap();

    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert!(
        matches!(&outcomes[1], RecordOutcome::Rejected(m) if m.contains("merge_fields.FIRST_NAME")),
        "{outcomes:?}"
    );
    assert_eq!(double.requests()[0].members(), 1);
}

#[tokio::test]
async fn a_batch_refused_whole_is_split_so_the_good_members_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'broken' || id WHERE id IN (4, 21)")
        .await;
    let double = MailchimpDouble::whole_batch_400(KEY, LIST).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &destination(&double.url, ""), KEY, state.path(), "upsert").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected), (28, 2));
    let mut keys: Vec<_> = report.rejected_samples.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["21", "4"]);
    assert!(
        report.rejected_samples[0].reason.contains("Invalid Resource")
            && report.rejected_samples[0]
                .reason
                .contains("looks fake or invalid"),
        "{}",
        report.rejected_samples[0].reason
    );
    assert_eq!(double.count(), 28);
    assert!(double.requests().iter().any(|r| r.status == 400));
}

#[tokio::test]
async fn throttling_and_server_errors_are_retried() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    let connector = connector(&double).await;
    double.throttle_next(1);

    let error = connector
        .send(Operation::Upsert, &[member(1, "ada@example.com", "Ada")])
        .await
        .unwrap_err();
    assert_eq!(
        error,
        SendError::Retryable {
            reason: "Mailchimp is throttling requests (HTTP 429): Too Many Requests: You have exceeded the limit of 10 simultaneous connections.".into(),
            retry_after: None,
            throttled: true,
        }
    );

    let model = TempSqlite::new(MODEL).await;
    double.throttle_next(2);
    double.fail_next(1, 503);
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &destination(&double.url, ""), KEY, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(report.throttled, 2);
    assert!(report.retries >= 3, "{}", report.retries);
    assert_eq!(double.count(), 30);
}

#[tokio::test]
async fn a_rejected_api_key_fails_the_run_and_the_key_appears_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = MailchimpDouble::start("the-right-one-us21", LIST).await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "");

    let report = run_sync(&model, &dest, KEY, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by Mailchimp (HTTP 401): API Key Invalid"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert!(
        double.requests().len() <= 4,
        "no retry loop: {}",
        double.requests().len()
    );
    let everything = format!("{report:?} {error}");
    assert!(!everything.contains(KEY), "the key leaked: {everything}");
    assert!(
        !everything.contains("0b1e2f3a"),
        "part of the key leaked: {everything}"
    );

    let connector = destination::build(&dest, Some(&secret(KEY))).await.unwrap();
    let check = connector.check().await.unwrap_err();
    assert!(
        matches!(&check, SendError::Fatal(m) if m.starts_with("credentials rejected by Mailchimp (HTTP 401)")),
        "{check:?}"
    );
    assert!(!format!("{check:?}").contains(KEY));
}

#[tokio::test]
async fn the_connection_check_pings_then_reads_the_audience_and_names_an_unknown_one() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    connector(&double).await.check().await.unwrap();
    let paths: Vec<_> = double
        .requests()
        .iter()
        .map(|r| (r.method.clone(), r.path.clone()))
        .collect();
    assert_eq!(
        paths,
        [
            ("GET".to_owned(), "/3.0/ping".to_owned()),
            ("GET".to_owned(), "/3.0/lists/a1b2c3d4e5".to_owned())
        ]
    );

    let mut dest = destination(&double.url, "");
    dest.mailchimp.as_mut().unwrap().list_id = "ffffffffff".into();
    let error = destination::build(&dest, Some(&secret(KEY)))
        .await
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("does not know audience \"ffffffffff\"")),
        "{error:?}"
    );
}

#[tokio::test]
async fn mirror_deletes_archive_members_and_a_member_already_gone_counts_as_deleted() {
    let model = TempSqlite::new(MODEL).await;
    let double = MailchimpDouble::start(KEY, LIST).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, KEY, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.count(), 30);

    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    {
        // Someone already archived user5 in Mailchimp: that counts as deleted.
        let connector = connector(&double).await;
        let outcomes = connector
            .send(Operation::Delete, &[member(5, "user5@example.com", "")])
            .await
            .unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
        assert!(double.member("user5@example.com").is_none());
    }
    let before = double.requests().len();

    let report = run_sync(&model, &dest, KEY, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    assert_eq!(double.count(), 28);
    assert!(double.member("user2@example.com").is_none());
    let mut requests: Vec<_> = double
        .requests()
        .split_off(before)
        .into_iter()
        .map(|r| (r.method, r.path, r.status))
        .collect();
    requests.sort();
    let mut expected = vec![
        (
            "DELETE".to_owned(),
            format!(
                "/3.0/lists/{LIST}/members/{}",
                subscriber_hash("user2@example.com")
            ),
            204,
        ),
        (
            "DELETE".to_owned(),
            format!(
                "/3.0/lists/{LIST}/members/{}",
                subscriber_hash("user5@example.com")
            ),
            404,
        ),
    ];
    expected.sort();
    assert_eq!(
        requests, expected,
        "one archive per member; user5 was already gone"
    );
}

#[tokio::test]
async fn update_only_writes_members_the_audience_has_and_rejects_the_rest() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    double.seed("ada@example.com", &[("FNAME", "A")]);
    let connector = connector(&double).await;

    let outcomes = connector
        .send(
            Operation::Update,
            &[
                member(1, "Ada@example.com", "Ada"),
                member(2, "new@example.com", "New"),
            ],
        )
        .await
        .unwrap();

    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert!(
        matches!(&outcomes[1], RecordOutcome::Rejected(m) if m.contains("new@example.com is not a member")),
        "{outcomes:?}"
    );
    let requests = double.requests();
    assert_eq!(
        requests.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(),
        ["GET", "GET", "POST"]
    );
    let ada = format!("/3.0/lists/{LIST}/members/{}", subscriber_hash("ada@example.com"));
    assert!(
        requests[..2].iter().any(|r| r.path == ada && r.status == 200),
        "members are looked up by subscriber hash"
    );
    assert_eq!(requests[2].members(), 1);
    assert_eq!(requests[2].body["update_existing"], true);
    assert_eq!(double.count(), 1);
    assert_eq!(
        double.member("ada@example.com").unwrap().merge_fields["FNAME"],
        "Ada"
    );
}

#[tokio::test]
async fn insert_adds_new_members_and_rejects_an_existing_one() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    double.seed("ada@example.com", &[("FNAME", "A")]);
    let connector = connector(&double).await;

    let outcomes = connector
        .send(
            Operation::Insert,
            &[
                member(1, "ada@example.com", "Ada"),
                member(2, "bob@example.com", "Bob"),
            ],
        )
        .await
        .unwrap();

    assert!(
        matches!(&outcomes[0], RecordOutcome::Rejected(m) if m.starts_with("ERROR_CONTACT_EXISTS: ada@example.com is already a list member")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], RecordOutcome::Accepted);
    assert_eq!(double.requests()[0].body["update_existing"], false);
    assert_eq!(
        double.member("ada@example.com").unwrap().merge_fields["FNAME"],
        "A",
        "the existing member was not touched"
    );
    assert_eq!(double.count(), 2);
}

#[tokio::test]
async fn a_batch_over_500_members_is_never_sent() {
    let double = MailchimpDouble::start(KEY, LIST).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().max_batch_size, 500);

    let big: Vec<Record> = (1..=501)
        .map(|i| member(i, &format!("u{i}@example.com"), "U"))
        .collect();
    let error = connector.send(Operation::Upsert, &big).await.unwrap_err();
    assert!(matches!(error, SendError::Fatal(_)), "{error:?}");
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at Mailchimp's limit.
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, plan TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1100)
         INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User', 'free' FROM n;",
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "batchSize: 5000");
    let report = run_sync(&model, &dest, KEY, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 1100);
    let requests = double.requests();
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|r| r.members() <= 500));
    assert!(requests.iter().all(|r| r.status == 200));
    assert_eq!(double.count(), 1100);
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/mailchimp.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/mailchimp.md", &mut manifests).unwrap();
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
        (500, 10.0, 4)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(dest.spec.target(), "mailchimp/a1b2c3d4e5");
}
