//! The `braze` destination against the in-process Braze double: the connector on its own, and
//! whole sync runs from a SQLite model.

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
use support::braze_double::{BrazeDouble, NO_VALID_DATA};
use support::sqlite::TempSqlite;

const API_KEY: &str = "7c1f0d2e-aaaa-4bcd-9e0f-5ecre7b2a2e1";

fn destination(base_url: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: braze\ncredentialsSecretRef: {{name: braze}}\n{extra}\nbraze: {{baseUrl: \"{base_url}\"}}\n"
    ))
    .unwrap()
}

fn secret(api_key: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("apiKey".to_owned(), api_key.to_owned())]))
}

async fn connector(double: &BrazeDouble) -> Arc<dyn Connector> {
    destination::build(&destination(&double.url, ""), Some(&secret(API_KEY)))
        .await
        .unwrap()
}

fn user(key: i64, email: &str, first: &str) -> Record {
    let identity = Document::from([("external_id".to_owned(), Value::Text(format!("u-{key}")))]);
    let mut fields = identity.clone();
    fields.insert("email".into(), Value::Text(email.to_owned()));
    fields.insert("first_name".into(), Value::Text(first.to_owned()));
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
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT 'c-' || id AS external_id, id, email, name, ltv FROM customers", primaryKey: [id]}}
destinationRef: {{name: braze}}
mode: {mode}
match: [external_id]
mappings:
  - {{from: external_id, to: external_id}}
  - {{from: email, to: email}}
  - {{from: name, to: first_name}}
  - {{from: ltv, to: loyalty.ltv}}
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
    support::engine::run_sync_once(&model.url, &spec, dest, &secret(api_key), state).await
}

#[tokio::test]
async fn upsert_creates_a_profile_by_external_id_then_updates_it() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Ada")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let created = double.user("u-1").unwrap();
    assert_eq!(created["first_name"], "Ada");
    assert_eq!(created["score"], 10, "numbers stay numbers");

    let outcomes = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Augusta")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(
        double.user_count(),
        1,
        "the second upsert updated, not duplicated"
    );
    assert_eq!(double.user("u-1").unwrap()["first_name"], "Augusta");

    let request = &double.requests()[1];
    assert_eq!(request.path, "/users/track");
    assert_eq!(request.status, 201);
    assert_eq!(
        request.authorization.as_deref(),
        Some(&*format!("Bearer {API_KEY}"))
    );
    assert_eq!(
        request.body,
        json!({"attributes": [{"external_id": "u-1", "email": "ada@example.com",
            "first_name": "Augusta", "score": 10}]})
    );
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = BrazeDouble::start(API_KEY).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    let stored = double.user("c-7").unwrap();
    assert_eq!(stored["first_name"], "User 7");
    assert_eq!(
        stored["loyalty"],
        json!({"ltv": 10.5}),
        "a nested object stays nested"
    );

    let before = double.requests().len();
    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.requests().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    let last = double.requests().pop().unwrap();
    assert_eq!(last.items(), 1, "only the changed row is sent");
    assert_eq!(double.user("c-3").unwrap()["first_name"], "Renamed");
    assert_eq!(double.user_count(), 30);
}

#[tokio::test]
async fn a_minor_error_rejects_that_record_and_keeps_the_rest() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;
    let batch = vec![
        user(1, "ada@example.com", "Ada"),
        user(2, "not-an-email", "Bob"),
        user(3, "grace@example.com", "Grace"),
    ];

    let outcomes = connector.send(Operation::Upsert, &batch).await.unwrap();

    assert_eq!(double.requests()[0].status, 201);
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected("'not-an-email' is not a valid email address".into()),
            RecordOutcome::Accepted,
        ]
    );
    assert_eq!(double.user_count(), 2);
    assert!(double.user("u-2").is_none());
}

#[tokio::test]
async fn a_request_with_no_valid_record_rejects_each_by_its_index() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;
    let mut no_id = user(2, "bob@example.com", "Bob");
    no_id.identity.clear();
    no_id.fields.remove("external_id");
    let batch = vec![user(1, "nope", "Ada"), no_id, user(3, "also-nope", "Grace")];

    let outcomes = connector.send(Operation::Upsert, &batch).await.unwrap();

    let requests = double.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].status, 400);
    assert_eq!(requests[0].items(), 2, "the record without an id is not sent");
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Rejected("'nope' is not a valid email address".into()),
            RecordOutcome::Rejected(
                "the record has no external_id; map it and list it in the sync's match".into()
            ),
            RecordOutcome::Rejected("'also-nope' is not a valid email address".into()),
        ]
    );
    assert_eq!(double.user_count(), 0);
}

#[tokio::test]
async fn a_batch_refused_whole_is_split_so_the_good_records_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'broken' || id WHERE id IN (4, 21)")
        .await;
    let double = BrazeDouble::whole_batch_400(API_KEY).await;
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
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected), (28, 2));
    let mut keys: Vec<_> = report.rejected_samples.iter().map(|r| r.key.as_str()).collect();
    keys.sort();
    assert_eq!(keys, ["21", "4"]);
    assert!(
        report.rejected_samples[0]
            .reason
            .contains("Braze refused the batch (HTTP 400): Invalid attributes in the request"),
        "{}",
        report.rejected_samples[0].reason
    );
    assert_eq!(double.user_count(), 28);
    assert!(double.requests().iter().any(|r| r.status == 400));
}

#[tokio::test]
async fn throttling_is_retried_after_the_rate_limit_window_resets() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;
    double.throttle_next(1, 2);

    let error = connector
        .send(Operation::Upsert, &[user(1, "ada@example.com", "Ada")])
        .await
        .unwrap_err();
    let SendError::Retryable {
        reason,
        retry_after,
        throttled,
    } = error
    else {
        panic!("a 429 is retryable: {error:?}");
    };
    assert_eq!(
        reason,
        "Braze is throttling requests (HTTP 429): Rate limit exceeded"
    );
    assert!(throttled);
    let wait = retry_after.expect("the wait comes from X-RateLimit-Reset");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    assert!(double.user("u-1").is_none());

    let model = TempSqlite::new(MODEL).await;
    double.throttle_next(2, 0);
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
    assert_eq!(double.user_count(), 30);
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_key_appears_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = BrazeDouble::start("the-right-key").await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "");

    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by Braze (HTTP 401)"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert!(
        double.requests().len() <= 4,
        "no retry loop: {}",
        double.requests().len()
    );
    let everything = format!("{report:?} {error}");
    assert!(!everything.contains(API_KEY), "the key leaked: {everything}");
    assert!(
        !everything.contains("5ecre7b2a2e1"),
        "part of the key leaked: {everything}"
    );

    let connector = destination::build(&dest, Some(&secret(API_KEY))).await.unwrap();
    let check = connector.check().await.unwrap_err();
    assert!(
        matches!(&check, SendError::Fatal(m) if m.starts_with("credentials rejected by Braze (HTTP 401)")),
        "{check:?}"
    );
    assert!(!format!("{check:?}").contains(API_KEY));
}

#[tokio::test]
async fn the_connection_check_posts_an_empty_track_request_that_writes_nothing() {
    let double = BrazeDouble::start(API_KEY).await;
    connector(&double).await.check().await.unwrap();
    let requests = double.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/users/track");
    assert_eq!(requests[0].body, json!({}));
    assert_eq!(requests[0].status, 400, "Braze: {NO_VALID_DATA}");
    assert_eq!(double.user_count(), 0);

    double.fail_next(1, 503);
    let error = connector(&double).await.check().await.unwrap_err();
    assert!(matches!(error, SendError::Retryable { .. }), "{error:?}");
}

#[tokio::test]
async fn mirror_deletes_remove_profiles_by_external_id() {
    let model = TempSqlite::new(MODEL).await;
    let double = BrazeDouble::start(API_KEY).await;
    let dest = destination(&double.url, "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, API_KEY, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.user_count(), 30);

    // Someone already deleted c-5 in Braze: that still counts as deleted.
    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    let gone = Record {
        key: "5".into(),
        identity: Document::from([("external_id".to_owned(), Value::Text("c-5".into()))]).into(),
        fields: Document::new().into(),
    };
    connector(&double)
        .await
        .send(Operation::Delete, &[gone])
        .await
        .unwrap();
    assert!(double.user("c-5").is_none());
    let before = double.requests().len();

    let report = run_sync(&model, &dest, API_KEY, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    assert_eq!(double.user_count(), 28);
    assert!(double.user("c-2").is_none());
    let requests = double.requests().split_off(before);
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].path, "/users/delete");
    let mut ids: Vec<_> = requests[0].body["external_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    assert_eq!(ids, ["c-2", "c-5"]);
}

#[tokio::test]
async fn a_full_batch_of_deletes_goes_out_in_chunks_of_50() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;
    let batch: Vec<Record> = (1..=75).map(|i| user(i, "x@example.com", "X")).collect();
    for chunk in batch.chunks(50) {
        assert!(
            connector
                .send(Operation::Upsert, chunk)
                .await
                .unwrap()
                .iter()
                .all(|o| *o == RecordOutcome::Accepted)
        );
    }
    assert_eq!(double.user_count(), 75);
    let before = double.requests().len();

    let outcomes = connector.send(Operation::Delete, &batch).await.unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 75]);
    assert_eq!(double.user_count(), 0);
    let sizes: Vec<_> = double.requests()[before..]
        .iter()
        .map(|r| (r.path.clone(), r.items(), r.status))
        .collect();
    assert_eq!(
        sizes,
        [
            ("/users/delete".to_owned(), 50, 201),
            ("/users/delete".to_owned(), 25, 201)
        ]
    );
}

#[tokio::test]
async fn update_never_creates_a_profile_and_insert_behaves_as_upsert() {
    let double = BrazeDouble::start(API_KEY).await;
    double.seed("u-1", json!({"first_name": "A", "plan": "pro"}));
    let connector = connector(&double).await;

    let outcomes = connector
        .send(
            Operation::Update,
            &[
                user(1, "ada@example.com", "Ada"),
                user(2, "new@example.com", "New"),
            ],
        )
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
    assert_eq!(
        double.requests()[0].body["attributes"][1]["_update_existing_only"],
        true
    );
    assert_eq!(double.user_count(), 1, "Braze skips an unknown profile");
    let ada = double.user("u-1").unwrap();
    assert_eq!((&ada["first_name"], &ada["plan"]), (&json!("Ada"), &json!("pro")));

    let outcomes = connector
        .send(Operation::Insert, &[user(1, "ada@example.com", "Again")])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert!(double.requests()[1].body["attributes"][0]["_update_existing_only"].is_null());
    assert_eq!(double.user("u-1").unwrap()["first_name"], "Again");
}

#[tokio::test]
async fn a_batch_over_75_records_is_never_sent() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().max_batch_size, 75);

    let big: Vec<Record> = (1..=76).map(|i| user(i, "u@example.com", "U")).collect();
    for operation in [Operation::Upsert, Operation::Delete] {
        let error = connector.send(operation, &big).await.unwrap_err();
        assert!(matches!(error, SendError::Fatal(_)), "{error:?}");
    }
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at Braze's limit.
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, ltv REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200)
         INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User', 1 FROM n;",
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "batchSize: 500");
    let report = run_sync(&model, &dest, API_KEY, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 200);
    let requests = double.requests();
    assert!(requests.iter().all(|r| r.items() <= 75));
    assert!(requests.iter().all(|r| r.status == 201));
    assert_eq!(double.user_count(), 200);
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/braze.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/braze.md", &mut manifests).unwrap();
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
        (75, 100.0, 4)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(dest.spec.target(), "braze/https://rest.iad-01.braze.com");
}

// --- what Braze accepts and then drops ----------------------------------------------------

#[tokio::test]
async fn a_null_under_a_nested_attribute_is_left_out_so_the_other_profiles_nested_updates_land() {
    let model = TempSqlite::new(MODEL).await;
    model.exec("UPDATE customers SET ltv = NULL WHERE id = 4").await;
    let double = BrazeDouble::start(API_KEY).await;
    double.seed("c-4", json!({"loyalty": {"ltv": 99.0}}));
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
    assert_eq!(report.accepted, 30);
    assert_eq!(
        double.dropped_nested_updates(),
        0,
        "no request carried a null inside a nested attribute"
    );
    assert_eq!(
        double.user("c-5").unwrap()["loyalty"],
        json!({"ltv": 7.5}),
        "the other profiles' nested updates landed"
    );
    assert_eq!(
        double.user("c-4").unwrap()["loyalty"],
        json!(null),
        "the emptied object is removed the documented way, a top-level null"
    );
    let sent = &double.requests()[0].body["attributes"];
    let four = sent
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["external_id"] == "c-4")
        .unwrap();
    assert_eq!(four["loyalty"], json!(null));
}

#[tokio::test]
async fn a_nested_attribute_braze_would_drop_rejects_its_record_only() {
    let double = BrazeDouble::start(API_KEY).await;
    let connector = connector(&double).await;
    let mut dotted = user(2, "bob@example.com", "Bob");
    dotted
        .fields
        .insert("prefs".into(), Value::Json(json!({"mail.daily": true})));
    let mut nested = user(1, "ada@example.com", "Ada");
    nested
        .fields
        .insert("prefs".into(), Value::Json(json!({"daily": true})));

    let outcomes = connector
        .send(Operation::Upsert, &[nested, dotted])
        .await
        .unwrap();

    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert!(
        matches!(&outcomes[1], RecordOutcome::Rejected(r) if r.contains("nested attribute \"prefs\"")),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(
        double.requests()[0].items(),
        1,
        "the record Braze would drop is not sent"
    );
    assert_eq!(double.user("u-1").unwrap()["prefs"], json!({"daily": true}));
}

#[tokio::test]
async fn a_workspace_that_takes_50_objects_settles_the_run_on_batches_of_50() {
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, ltv REAL);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User ' || i, i * 1.5 FROM n;",
    )
    .await;
    let double = BrazeDouble::start(API_KEY).await;
    double.mau_pricing();
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, "maxConcurrency: 1"),
        API_KEY,
        state.path(),
        "upsert",
    )
    .await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.accepted, report.rejected), (1000, 0));
    assert_eq!(double.user_count(), 1000);
    let requests = double.requests();
    let refused: Vec<usize> = requests
        .iter()
        .filter(|r| r.status == 400)
        .map(|r| r.items())
        .collect();
    assert_eq!(
        refused,
        [75],
        "refused once, then the run kept to 50: {refused:?}"
    );
    let sizes: Vec<usize> = requests
        .iter()
        .filter(|r| r.status == 201)
        .map(|r| r.items())
        .collect();
    assert!(sizes.iter().all(|n| *n <= 50), "{sizes:?}");
    // Only the batches already formed when Braze refused (the engine keeps a few going) are
    // cut in two; the rest of the run is formed at 50.
    let cut = sizes.iter().filter(|n| **n < 50).count();
    assert!(cut <= 6, "{cut} partial requests: {sizes:?}");
    assert!(
        sizes.len() <= 1000 / 50 + 6,
        "{} requests: {sizes:?}",
        sizes.len()
    );
}

#[tokio::test]
async fn rejection_reasons_name_the_problem_without_the_value() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET email = 'user13.example.com' WHERE id = 13")
        .await;
    let double = BrazeDouble::start(API_KEY).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, ""),
        API_KEY,
        state.path(),
        "upsert",
    )
    .await;

    assert_eq!((report.accepted, report.rejected), (29, 1));
    assert_eq!(
        report.rejected_samples[0].reason,
        "'<value>' is not a valid email address"
    );
}

#[tokio::test]
async fn the_double_drops_every_nested_update_of_a_request_with_a_null_inside_one_as_braze_does() {
    let double = BrazeDouble::start(API_KEY).await;
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        client
            .post(format!("{}/users/track", double.url))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
    };

    let answer = post(json!({"attributes": [
        {"external_id": "a", "first_name": "Ada", "loyalty": {"ltv": 1.5}},
        {"external_id": "b", "loyalty": {"ltv": null}},
    ]}))
    .await
    .unwrap();
    assert_eq!(answer.status().as_u16(), 201, "accepted all the same");
    assert_eq!(double.dropped_nested_updates(), 2);
    let a = double.user("a").unwrap();
    assert_eq!(a["first_name"], "Ada", "flat attributes land");
    assert!(
        a.get("loyalty").is_none(),
        "the nested update of another profile is lost"
    );

    double.mau_pricing();
    let objects: Vec<serde_json::Value> = (0..51).map(|i| json!({"external_id": format!("m{i}")})).collect();
    let answer = post(json!({ "attributes": objects })).await.unwrap();
    assert_eq!(answer.status().as_u16(), 400);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["message"], "Max Input Length Exceeded");
}

#[tokio::test]
async fn a_record_braze_drops_with_an_error_naming_no_index_is_found_and_rejected_not_counted_delivered() {
    let model = TempSqlite::new(MODEL).await;
    let double = BrazeDouble::start(API_KEY).await;
    double.block("c-13");
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
    assert_eq!((report.accepted, report.rejected), (29, 1));
    assert_eq!(report.rejected_samples[0].key, "13");
    assert_eq!(
        report.rejected_samples[0].reason,
        "Braze reported an error it did not tie to a record: provided external_id is blacklisted and disallowed"
    );
    assert_eq!(double.user_count(), 29);

    // The rejected row is sent again next run, alone.
    let before = double.requests().len();
    run_sync(
        &model,
        &destination(&double.url, ""),
        API_KEY,
        state.path(),
        "upsert",
    )
    .await;
    let again = &double.requests()[before..];
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].items(), 1);
}
