//! The `salesforce` destination against the in-process Salesforce double: the connector on its
//! own, and whole sync runs from a SQLite model.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::salesforce::SalesforceConnector;
use backflow::destination::salesforce::bulk::BulkPolling;
use backflow::destination::{self, Connector, RecordOutcome, SendError};
use backflow::engine::run::{RunReport, RunResult};
use backflow::local::manifests::{Manifests, load_text};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use serde_json::json;
use support::salesforce_double::{SalesforceDouble, SalesforceRequest};
use support::sqlite::TempSqlite;

const CLIENT_ID: &str = "3MVG9rnryk9FxFMUz4B_consumer_key";
const CLIENT_SECRET: &str = "E4B2C1D0F9A8consumer-secret-77";

fn destination(login_url: &str, object: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: salesforce\ncredentialsSecretRef: {{name: salesforce}}\n{extra}\nsalesforce: {{object: {object}, externalIdField: Email__c, loginUrl: \"{login_url}\"}}\n"
    ))
    .unwrap()
}

/// A throwaway RSA key for signing test assertions (the double does not verify signatures).
const TEST_PRIVATE_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQDAr5KhRxlULYcw\n\
Ax+8FugLzU9ToyWImjNgdSPEx7L4hBhIKx0XAs4CA2ttKjz+H8Ym+oSnBEOOgC47\n\
wQUuwPaxS22+J8czQ+tZMNY4rpY6ioZHsHdJNWdn6qo4MRJFVjv9mGZKzkKpPgJd\n\
HstbOS4uhobCIO+0oaWTTL6Sh2dbgNaYVUp+3ZUfyrqkmLheA/9uZCCMpxvlJVWO\n\
Op9apl+wqPyoau31kq64ESnoPsEZoQRtt9ug1OxQiPLau7drv2mQNfnY/o5DtMWk\n\
2Awt3bXAvawwS7rz6SnCOz6mBB6KQpbxuDWbG1ArNadOSAGHFs5wnXhh7AbTykpg\n\
ytTuf17lAgMBAAECggEADzGZApogY2yeoRjR9wsoW4viMjJmaoXcQMIj4qerk2CZ\n\
KJGrvs2EEJET9rzyp8g6IAc3kBLsP8+YNbKD9dqV6UeNHQY2dTKpG3SYI8qSgoW7\n\
TmpaEZ4CLCXLK9iku+5vlxDeGg53H7DJz2129BfHbjhB5oth03C+pWWTDmtaaVLV\n\
fRUk5DfH9wn8bfhUJqQwEv5BahdLTKJCXXTOQVvHMczC9RoR0wMMOowETTimrRvQ\n\
tUf4T2cAa133lPb5cA/8/dV6aieM2JX1nigUaTtqvr00IP8DcrqY57q+kjMtQp8m\n\
hfF3kroadoWJgQn6yQMDKnYBEwQb3cncLxoal9F8qQKBgQD3p1h/6i+GWXwKDNNf\n\
uf6SYEWBsdAdnmThO35BEegYcmEfuAWfsFqeqPO6vllhLKFuGRIvhU1/GbSgD92y\n\
nLTIpSMY0d0hCQt02ZHCoEJS+DVUVNYDgBW6JOHgf1CwmnRPerxluNd7Mn7/1YMC\n\
iE+HCksgOXZXTzdS3lro8WeunQKBgQDHLfyoCOy211nTNa9rcR3TPjq86EEYwgyI\n\
TRR8ZSbTW49SPUosyoHf8/S737PqhS32wGiDW0GvmgKVANxjjGEhs3sxmEdV6i8l\n\
Ei2tDBLZD1mGINSr3GX8zniS/6Pp5AuAPjnYXrhvWbvRN1Sj5TCQKPKydv4+MUCZ\n\
UJzLKUOa6QKBgQDEPSPAgHZWNDQ41n7r3LsfjA+nvJmXzrpLS1Q5BZJvRLs3Yh96\n\
sUitbl1rfYffm3jzgARMCYomC9138/qNnOUYFNrhwPJDSiJ83iZFHa5QhoPjpjHL\n\
pkQRM0aVGO18c3d0v2HoDPcalSHTYYGlkRPLgtmS2FWwy4GgNbe93AR3dQKBgDCM\n\
TvcOJdRzLRvEDBveGGzy0BJXcfZ85d0bHJEtfocp3AcplTjRq1JQ/igE4K+bApcQ\n\
UukhhyMsIND8wrso7kvumWp/OXQBfrhEdAmn1bg+e42r1uqE7/7svIrn8KYDxaHe\n\
iO7qN348mwDlwaWpKWsZ7/377wBttNcpxO3oAuhxAoGBAMzSOONPkEvbelR71ssD\n\
CARikjYfJrG4KsO8WAWCWgP83jH9RPU4WhYM2/zsdI/pI+zp3gs9fY+EyKjPKg+h\n\
HLx0oeIHBAn6jMRIbgwWXkhU4Pts/9EmX4mOWV0ccaTaXdTJTkOHEpqbHQAA7lfl\n\
mGUF327QlYF80CRXKZ7e/ZRn\n\
-----END PRIVATE KEY-----\n\
";

fn jwt_secret(username: &str) -> SecretData {
    SecretData::new(BTreeMap::from([
        ("clientId".to_owned(), CLIENT_ID.to_owned()),
        ("username".to_owned(), username.to_owned()),
        ("privateKey".to_owned(), TEST_PRIVATE_KEY.to_owned()),
    ]))
}

fn secret(client_secret: &str) -> SecretData {
    SecretData::new(BTreeMap::from([
        ("clientId".to_owned(), CLIENT_ID.to_owned()),
        ("clientSecret".to_owned(), client_secret.to_owned()),
    ]))
}

async fn connector(double: &SalesforceDouble) -> Arc<dyn Connector> {
    destination::build(
        &destination(&double.url, "Contact", ""),
        Some(&secret(CLIENT_SECRET)),
    )
    .await
    .unwrap()
}

fn contact(email: &str, last_name: Option<&str>) -> Record {
    let identity = Document::from([("Email__c".to_owned(), Value::Text(email.to_owned()))]);
    let mut fields = Document::new();
    fields.insert("Email__c".into(), Value::Text(email.to_owned()));
    fields.insert(
        "LastName".into(),
        last_name.map_or(Value::Null, |n| Value::Text(n.to_owned())),
    );
    fields.insert("LTV__c".into(), Value::Float(12.5));
    Record {
        key: email.to_owned(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

// --- whole runs ---------------------------------------------------------------------------

const MODEL: &str = "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, birthdate TEXT, ltv REAL);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User ' || i, '1990-01-' || printf('%02d', i), i * 1.5 FROM n;";

fn sync_spec(mode: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, name, birthdate, ltv FROM customers", primaryKey: [id]}}
destinationRef: {{name: salesforce}}
mode: {mode}
match: [Email__c]
mappings:
  - {{from: email, to: Email__c}}
  - {{from: name, to: LastName}}
  - {{from: birthdate, to: Birthdate}}
  - {{from: ltv, to: LTV__c}}
"#
    ))
    .unwrap()
}

async fn run_sync(
    model: &TempSqlite,
    dest: &DestinationSpec,
    client_secret: &str,
    state: &std::path::Path,
    mode: &str,
) -> RunReport {
    let spec = sync_spec(mode);
    support::engine::run_sync_once(&model.url, &spec, dest, &secret(client_secret), state).await
}

#[tokio::test]
async fn upsert_obtains_a_token_once_and_updates_the_same_contact_on_its_external_id() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = connector(&double).await;

    let outcomes = connector
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let created = double.find("Contact", "Email__c", "ada@example.com").unwrap();
    assert_eq!(created.text("LastName"), "Lovelace");

    let outcomes = connector
        .send(Operation::Update, &[contact("ada@example.com", Some("King"))])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let contacts = double.records("Contact");
    assert_eq!(contacts.len(), 1, "the second upsert updated, not duplicated");
    assert_eq!(contacts[0].id, created.id);
    assert_eq!(contacts[0].text("LastName"), "King");

    assert_eq!(double.tokens_issued(), 1, "the token is cached");
    let requests = double.requests();
    assert_eq!(
        (requests[0].method.as_str(), requests[0].path.as_str()),
        ("POST", "/services/oauth2/token")
    );
    assert!(requests[0].body.contains("grant_type=client_credentials"));
    let calls = double.calls();
    assert_eq!(
        (calls[0].method.as_str(), calls[0].path.as_str()),
        (
            "PATCH",
            "/services/data/v61.0/composite/sobjects/Contact/Email__c"
        )
    );
    assert!(calls.iter().all(|c| {
        c.authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer 00D"))
    }));
    assert_eq!(
        calls[1].json(),
        json!({"allOrNone": false, "records": [{"attributes": {"type": "Contact"},
            "Email__c": "ada@example.com", "LastName": "King", "LTV__c": 12.5}]})
    );
}

#[tokio::test]
async fn a_sync_lands_every_row_and_a_second_run_without_changes_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = destination(&double.url, "Contact", "");
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, CLIENT_SECRET, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    let stored = double.find("Contact", "Email__c", "user7@example.com").unwrap();
    assert_eq!(stored.text("LastName"), "User 7");
    assert_eq!(stored.text("Birthdate"), "1990-01-07");
    assert_eq!(stored.fields["LTV__c"], 10.5);

    let before = double.calls().len();
    let report = run_sync(&model, &dest, CLIENT_SECRET, state.path(), "upsert").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.calls().len(), before, "nothing changed, nothing sent");

    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    run_sync(&model, &dest, CLIENT_SECRET, state.path(), "upsert").await;
    let last = double.calls().pop().unwrap();
    assert_eq!(last.records(), 1, "only the changed row is sent");
    assert_eq!(
        double
            .find("Contact", "Email__c", "user3@example.com")
            .unwrap()
            .text("LastName"),
        "Renamed"
    );
    assert_eq!(double.records("Contact").len(), 30);
}

#[tokio::test]
async fn a_contact_missing_its_required_last_name_is_rejected_and_the_rest_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET name = NULL WHERE id IN (4, 21)")
        .await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, "Contact", ""),
        CLIENT_SECRET,
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
    assert_eq!(
        report.rejected_samples[0].reason,
        "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (LastName)"
    );
    assert_eq!(double.records("Contact").len(), 28);
    assert_eq!(double.calls().len(), 1, "one call, no split");
}

#[tokio::test]
async fn a_request_refused_whole_for_one_bad_date_is_split_so_the_good_records_land() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE customers SET birthdate = 'soon' WHERE id = 9")
        .await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(
        &model,
        &destination(&double.url, "Contact", ""),
        CLIENT_SECRET,
        state.path(),
        "upsert",
    )
    .await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected), (29, 1));
    assert_eq!(report.rejected_samples[0].key, "9");
    assert!(
        report.rejected_samples[0].reason.starts_with(
            "JSON_PARSER_ERROR: Cannot deserialize instance of date from VALUE_STRING value <value>"
        ),
        "Salesforce's code and message, not the row's value: {}",
        report.rejected_samples[0].reason
    );
    assert_eq!(double.records("Contact").len(), 29);
    assert!(double.calls().iter().any(|r| r.status == 400));
}

#[tokio::test]
async fn the_orgs_request_limit_is_a_long_throttle_and_503_is_retried() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = connector(&double).await;
    double.limit_exceeded_next(1);

    let error = connector
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap_err();
    assert_eq!(
        error,
        SendError::Retryable {
            reason: "Salesforce org API request limit exceeded (HTTP 403): REQUEST_LIMIT_EXCEEDED: \
                     TotalRequests Limit exceeded."
                .into(),
            retry_after: Some(Duration::from_secs(60)),
            throttled: true,
        }
    );

    double.fail_next(1);
    let error = connector
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Retryable { throttled: false, reason, .. } if reason.contains("HTTP 503")),
        "{error:?}"
    );

    // A whole run retries 503s and lands everything (the limit's 60 s wait is left out of
    // runs to keep the test fast).
    let model = TempSqlite::new(MODEL).await;
    double.fail_next(2);
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(
        &model,
        &destination(&double.url, "Contact", ""),
        CLIENT_SECRET,
        state.path(),
        "upsert",
    )
    .await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert!(report.retries >= 2, "{}", report.retries);
    assert_eq!(double.records("Contact").len(), 30);
}

#[tokio::test]
async fn an_expired_session_gets_a_new_token_once_and_the_call_is_repeated() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = connector(&double).await;
    connector
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap();
    double.expire_tokens();

    let outcomes = connector
        .send(Operation::Upsert, &[contact("alan@example.com", Some("Turing"))])
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(double.tokens_issued(), 2);
    let statuses: Vec<u16> = double.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [200, 401, 200]);
    assert_eq!(double.records("Contact").len(), 2);
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_secret_appears_nowhere() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, "the-right-secret-0000").await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "Contact", "");

    let report = run_sync(&model, &dest, CLIENT_SECRET, state.path(), "upsert").await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    assert!(
        error.contains("credentials rejected by Salesforce (invalid_client)"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert!(double.calls().is_empty(), "no data call without a token");
    assert!(
        double.requests().len() <= 4,
        "no retry loop: {}",
        double.requests().len()
    );
    let everything = format!("{report:?} {error}");
    assert!(
        !everything.contains(CLIENT_SECRET),
        "the secret leaked: {everything}"
    );

    let connector = destination::build(&dest, Some(&secret(CLIENT_SECRET)))
        .await
        .unwrap();
    let check = connector.check().await.unwrap_err();
    assert!(
        matches!(&check, SendError::Fatal(m) if m.starts_with("credentials rejected by Salesforce (invalid_client)")),
        "{check:?}"
    );
    assert!(!format!("{check:?}").contains(CLIENT_SECRET));
}

#[tokio::test]
async fn the_connection_check_describes_the_object_and_an_unknown_object_is_fatal() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    connector(&double).await.check().await.unwrap();
    let call = &double.calls()[0];
    assert_eq!(
        (call.method.as_str(), call.path.as_str()),
        ("GET", "/services/data/v61.0/sobjects/Contact/describe")
    );

    let unknown = destination::build(
        &destination(&double.url, "Custmer__c", ""),
        Some(&secret(CLIENT_SECRET)),
    )
    .await
    .unwrap();
    let error = unknown.check().await.unwrap_err();
    assert!(
        matches!(&error, SendError::Fatal(m) if m.contains("no object \"Custmer__c\"")),
        "{error:?}"
    );
}

#[tokio::test]
async fn mirror_deletes_look_ids_up_by_external_id_and_a_missing_contact_counts_as_deleted() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = destination(&double.url, "Contact", "");
    let state = tempfile::tempdir().unwrap();
    let report = run_sync(&model, &dest, CLIENT_SECRET, state.path(), "mirror").await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.records("Contact").len(), 30);

    // A value with a quote is escaped in the SOQL and still found.
    let quoted = double.insert(
        "Contact",
        json!({"Email__c": "o'brien@example.com", "LastName": "O'Brien"}),
    );
    {
        let connector = connector(&double).await;
        let outcomes = connector
            .send(
                Operation::Delete,
                &[
                    contact("o'brien@example.com", None),
                    contact("nobody@example.com", None),
                ],
            )
            .await
            .unwrap();
        assert_eq!(outcomes, vec![RecordOutcome::Accepted, RecordOutcome::Accepted]);
        assert!(double.records("Contact").iter().all(|r| r.id != quoted));
    }

    model.exec("DELETE FROM customers WHERE id IN (2, 5)").await;
    let before = double.calls().len();
    let report = run_sync(&model, &dest, CLIENT_SECRET, state.path(), "mirror").await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 2);
    assert_eq!(double.records("Contact").len(), 28);
    assert!(double.find("Contact", "Email__c", "user2@example.com").is_none());
    let calls = double.calls().split_off(before);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert_eq!(calls[0].path, "/services/data/v61.0/query");
    assert_eq!(
        calls[0].query["q"],
        "SELECT Id, Email__c FROM Contact WHERE Email__c IN ('user2@example.com', 'user5@example.com')"
    );
    assert_eq!(
        (calls[1].method.as_str(), calls[1].path.as_str()),
        ("DELETE", "/services/data/v61.0/composite/sobjects")
    );
    assert_eq!(calls[1].query["allOrNone"], "false");
    assert_eq!(calls[1].query["ids"].split(',').count(), 2);
}

#[tokio::test]
async fn a_batch_over_200_records_is_never_sent() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = connector(&double).await;
    assert_eq!(connector.capabilities().max_batch_size, 200);

    let big: Vec<Record> = (1..=201)
        .map(|i| contact(&format!("u{i}@example.com"), Some("U")))
        .collect();
    let error = connector.send(Operation::Upsert, &big).await.unwrap_err();
    assert!(matches!(error, SendError::Fatal(_)), "{error:?}");
    assert!(double.requests().is_empty(), "nothing was sent");

    // A spec asking for bigger batches is capped at Salesforce's limit.
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, birthdate TEXT, ltv REAL);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 450)
         INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'User', NULL, 1 FROM n;",
    )
    .await;
    let state = tempfile::tempdir().unwrap();
    let dest = destination(&double.url, "Contact", "batchSize: 500");
    let report = run_sync(&model, &dest, CLIENT_SECRET, state.path(), "upsert").await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 450);
    let calls = double.calls();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|r| r.records() <= 200 && r.status == 200));
    assert_eq!(double.records("Contact").len(), 450);
}

/// A token from the double's client-credentials flow, asked for directly.
async fn access_token(client: &reqwest::Client, double: &SalesforceDouble) -> String {
    let token: serde_json::Value = client
        .post(format!("{}/services/oauth2/token", double.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=client_credentials&client_id={CLIENT_ID}&client_secret={CLIENT_SECRET}"
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    token["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_double_refuses_more_than_200_records_as_salesforce_does() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let client = reqwest::Client::new();
    let token = access_token(&client, &double).await;
    let records: Vec<_> = (0..201)
        .map(|i| json!({"attributes": {"type": "Contact"}, "Email__c": format!("u{i}@x.com"), "LastName": "U"}))
        .collect();
    let response = client
        .patch(format!(
            "{}/services/data/v61.0/composite/sobjects/Contact/Email__c",
            double.url
        ))
        .bearer_auth(&token)
        .json(&json!({"allOrNone": false, "records": records}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body[0]["errorCode"], "EXCEEDED_ID_LIMIT");
    assert!(double.records("Contact").is_empty());
}

#[tokio::test]
async fn the_documented_example_is_valid_and_builds_a_connector() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/destinations/salesforce.md"),
    )
    .unwrap();
    let yaml = page
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the page has a yaml example");
    let mut manifests = Manifests::default();
    load_text(yaml, "docs/destinations/salesforce.md", &mut manifests).unwrap();
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
        (200, 5.0, 2)
    );
    assert_eq!(caps.operations.len(), 4);
    assert_eq!(
        dest.spec.target(),
        "salesforce/https://acme.my.salesforce.com/Contact/Email__c"
    );
}

#[tokio::test]
async fn the_jwt_bearer_flow_signs_an_assertion_for_the_username_and_a_wrong_user_is_rejected() {
    use base64::Engine as _;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    double.accept_jwt_for("integration@acme.com");
    let dest: DestinationSpec = serde_yaml_ng::from_str(&format!(
        "type: salesforce\ncredentialsSecretRef: {{name: salesforce}}\nsalesforce: {{object: Contact, externalIdField: Email__c, auth: jwtBearer, loginUrl: \"{}\"}}\n",
        double.url
    ))
    .unwrap();
    let connector = destination::build(&dest, Some(&jwt_secret("integration@acme.com")))
        .await
        .unwrap();

    let outcomes = connector
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let token_request = &double.requests()[0];
    assert!(token_request.is_token() && token_request.status == 200);
    let assertion = &support::salesforce_double::form(&token_request.body)["assertion"];
    let claims = assertion.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["iss"], CLIENT_ID);
    assert_eq!(claims["sub"], "integration@acme.com");
    assert_eq!(claims["aud"], double.url.as_str());
    assert!(!token_request.body.contains("BEGIN PRIVATE KEY"));

    let wrong = destination::build(&dest, Some(&jwt_secret("someone@acme.com")))
        .await
        .unwrap();
    let error = wrong.check().await.unwrap_err();
    assert!(
        matches!(&error, SendError::Fatal(m) if m.starts_with("credentials rejected by Salesforce (invalid_grant)")),
        "{error:?}"
    );

    let broken = SecretData::new(BTreeMap::from([
        ("clientId".to_owned(), CLIENT_ID.to_owned()),
        ("username".to_owned(), "integration@acme.com".to_owned()),
        ("privateKey".to_owned(), "not a key".to_owned()),
    ]));
    let built = destination::build(&dest, Some(&broken)).await;
    assert!(built.is_err(), "a bad PEM key fails at construction");
}

// --- Bulk API 2.0 -------------------------------------------------------------------------

/// A destination with extra settings in its `salesforce` block (like `bulk: always`).
fn bulk_destination(login_url: &str, salesforce_extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        "type: salesforce\ncredentialsSecretRef: {{name: salesforce}}\nsalesforce: {{object: Contact, externalIdField: Email__c, loginUrl: \"{login_url}\", {salesforce_extra}}}\n"
    ))
    .unwrap()
}

/// The connector for `dest`, polling bulk jobs every few milliseconds.
fn fast_connector(dest: &DestinationSpec) -> SalesforceConnector {
    SalesforceConnector::new(
        dest.salesforce.as_ref().unwrap(),
        dest.credentials_secret_ref.as_ref(),
        Some(&secret(CLIENT_SECRET)),
    )
    .unwrap()
    .with_bulk_polling(BulkPolling {
        first_pause: Duration::from_millis(1),
        max_pause: Duration::from_millis(5),
        timeout: Duration::from_secs(10),
    })
}

/// The bulk connector view a run with `records` to send would get.
fn bulk_view(dest: &DestinationSpec, records: u64) -> Arc<dyn Connector> {
    let mut planned = destination::PlannedSends::default();
    planned.add(Operation::Upsert, records);
    fast_connector(dest)
        .for_run(&planned)
        .expect("the run is large enough for Bulk API 2.0")
}

async fn run_fast(
    model: &TempSqlite,
    dest: &DestinationSpec,
    state: &std::path::Path,
    spec: &ReverseSyncSpec,
) -> RunReport {
    let connector: Arc<dyn Connector> = Arc::new(fast_connector(dest));
    support::engine::run_with_connector(&model.url, spec, dest, connector, state).await
}

fn bulk_steps(calls: &[SalesforceRequest]) -> Vec<&'static str> {
    calls.iter().filter_map(SalesforceRequest::bulk_step).collect()
}

const ONE_JOB: [&str; 7] = [
    "create",
    "upload",
    "close",
    "poll",
    "poll",
    "failedResults",
    "successfulResults",
];

#[tokio::test]
async fn a_run_at_the_bulk_threshold_lands_every_row_in_one_job_and_a_second_run_sends_nothing() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = bulk_destination(&double.url, "bulkThreshold: 30");
    let state = tempfile::tempdir().unwrap();

    let report = run_fast(&model, &dest, state.path(), &sync_spec("upsert")).await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.accepted, 30);
    assert_eq!(report.requests, 1, "one job is one request to the limiter");
    let calls = double.calls();
    assert_eq!(bulk_steps(&calls), ONE_JOB);
    assert_eq!(calls.len(), ONE_JOB.len(), "nothing but the job: {calls:?}");
    assert!(calls.iter().all(|c| c.status < 300), "{calls:?}");
    assert_eq!(calls[0].path, "/services/data/v61.0/jobs/ingest");
    assert_eq!(
        calls[0].json(),
        json!({"object": "Contact", "externalIdFieldName": "Email__c", "contentType": "CSV",
               "operation": "upsert", "lineEnding": "LF"})
    );
    let job = &double.jobs()[0];
    assert_eq!(job.state, "JobComplete");
    assert_eq!(
        calls[1].path,
        format!("/services/data/v61.0/jobs/ingest/{}/batches", job.id)
    );
    assert_eq!(calls[1].content_type.as_deref(), Some("text/csv"));
    let mut lines = calls[1].body.lines();
    assert_eq!(lines.next(), Some("Birthdate,Email__c,LTV__c,LastName"));
    assert_eq!(lines.next(), Some("1990-01-01,user1@example.com,1.5,User 1"));
    assert_eq!(calls[1].body.lines().count(), 31);
    assert_eq!(calls[2].json(), json!({"state": "UploadComplete"}));
    assert_eq!(
        calls[5].path,
        format!("/services/data/v61.0/jobs/ingest/{}/failedResults/", job.id)
    );
    let stored = double.find("Contact", "Email__c", "user7@example.com").unwrap();
    assert_eq!(stored.text("LastName"), "User 7");
    assert_eq!(stored.text("Birthdate"), "1990-01-07");
    assert_eq!(stored.text("LTV__c"), "10.5");
    assert_eq!(double.records("Contact").len(), 30);

    let before = double.calls().len();
    let report = run_fast(&model, &dest, state.path(), &sync_spec("upsert")).await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.calls().len(), before, "nothing changed, nothing sent");

    // One changed row is below the threshold: it goes through sObject Collections.
    model
        .exec("UPDATE customers SET name = 'Renamed' WHERE id = 3")
        .await;
    let report = run_fast(&model, &dest, state.path(), &sync_spec("upsert")).await;
    assert_eq!(report.accepted, 1);
    let last = double.calls().pop().unwrap();
    assert!(last.is_upsert() && last.records() == 1, "{last:?}");
    assert_eq!(double.jobs().len(), 1);
    assert_eq!(
        double
            .find("Contact", "Email__c", "user3@example.com")
            .unwrap()
            .text("LastName"),
        "Renamed"
    );
}

#[tokio::test]
async fn a_run_below_the_threshold_or_with_bulk_never_uses_sobject_collections() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    for (extra, state) in [
        ("bulkThreshold: 31", tempfile::tempdir().unwrap()),
        ("bulk: never, bulkThreshold: 1", tempfile::tempdir().unwrap()),
    ] {
        let dest = bulk_destination(&double.url, extra);
        let report = run_fast(&model, &dest, state.path(), &sync_spec("upsert")).await;
        assert!(report.error.is_none(), "{:?}", report.error);
        assert_eq!(report.accepted, 30);
    }
    assert!(double.jobs().is_empty());
    assert!(double.calls().iter().all(|c| c.is_upsert()));
    assert_eq!(double.calls().len(), 2);

    // The default threshold is 10,000 records: 30 is far below it.
    let connector = fast_connector(&destination(&double.url, "Contact", ""));
    let mut planned = destination::PlannedSends::default();
    planned.add(Operation::Upsert, 9_999);
    assert!(connector.for_run(&planned).is_none());
    planned.add(Operation::Delete, 1);
    let view = connector
        .for_run(&planned)
        .expect("10,000 records use Bulk API 2.0");
    assert_eq!(view.capabilities().max_batch_size, 10_000);
}

#[tokio::test]
async fn bulk_per_record_failures_are_rejected_with_salesforces_message_and_the_rest_land() {
    let model = TempSqlite::new(MODEL).await;
    model.exec("UPDATE customers SET name = NULL WHERE id = 4").await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    double.reject_bulk_row(
        "user9@example.com",
        "FIELD_CUSTOM_VALIDATION_EXCEPTION:Customers in Texas need a phone number:--",
    );
    let dest = bulk_destination(&double.url, "bulk: always");
    let state = tempfile::tempdir().unwrap();

    let report = run_fast(&model, &dest, state.path(), &sync_spec("upsert")).await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected), (28, 2));
    let mut rejected: Vec<(&str, &str)> = report
        .rejected_samples
        .iter()
        .map(|r| (r.key.as_str(), r.reason.as_str()))
        .collect();
    rejected.sort();
    assert_eq!(
        rejected,
        [
            (
                "4",
                "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (LastName)"
            ),
            (
                "9",
                "FIELD_CUSTOM_VALIDATION_EXCEPTION: Customers in Texas need a phone number"
            ),
        ]
    );
    let upload = double
        .calls()
        .into_iter()
        .find(|c| c.bulk_step() == Some("upload"))
        .unwrap();
    assert!(
        upload.body.contains("\n1990-01-04,user4@example.com,6,#N/A\n"),
        "a NULL is sent as #N/A: {}",
        upload.body
    );
    assert_eq!(double.jobs().len(), 1, "no split, no second job");
    assert_eq!(double.records("Contact").len(), 28);

    // The rejected rows are retried next run; once fixed they land.
    model
        .exec("UPDATE customers SET name = 'Four' WHERE id = 4")
        .await;
    let report = run_fast(&model, &dest, state.path(), &sync_spec("upsert")).await;
    assert_eq!((report.accepted, report.rejected), (1, 1));
    assert_eq!(double.jobs().len(), 2);
}

#[tokio::test]
async fn mirror_deletes_in_a_bulk_run_look_ids_up_and_go_through_a_bulk_delete_job() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = bulk_destination(&double.url, "bulk: always");
    let state = tempfile::tempdir().unwrap();
    let report = run_fast(&model, &dest, state.path(), &sync_spec("mirror")).await;
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(double.records("Contact").len(), 30);
    let two = double.find("Contact", "Email__c", "user2@example.com").unwrap();
    let five = double.find("Contact", "Email__c", "user5@example.com").unwrap();

    model.exec("DELETE FROM customers WHERE id IN (2, 5, 8)").await;
    // Someone already deleted one of them in Salesforce: its lookup finds nothing.
    let eight = double.find("Contact", "Email__c", "user8@example.com").unwrap();
    assert!(double.remove(&eight.id));
    let before = double.calls().len();

    let report = run_fast(&model, &dest, state.path(), &sync_spec("mirror")).await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!(report.deleted, 3);
    assert_eq!(double.records("Contact").len(), 27);
    assert!(double.find("Contact", "Email__c", "user2@example.com").is_none());
    let calls = double.calls().split_off(before);
    assert_eq!(calls[0].path, "/services/data/v61.0/query");
    assert_eq!(
        calls[0].query["q"],
        "SELECT Id, Email__c FROM Contact WHERE Email__c IN ('user2@example.com', 'user5@example.com', 'user8@example.com')"
    );
    assert_eq!(bulk_steps(&calls[1..]), ONE_JOB);
    assert_eq!(
        calls[1].json(),
        json!({"object": "Contact", "contentType": "CSV", "operation": "delete", "lineEnding": "LF"})
    );
    let mut ids: Vec<&str> = calls[2].body.lines().collect();
    assert_eq!(ids.remove(0), "Id");
    ids.sort();
    let mut expected = vec![two.id.as_str(), five.id.as_str()];
    expected.sort();
    assert_eq!(ids, expected, "only the records Salesforce has are in the job");
}

#[tokio::test]
async fn a_bulk_job_that_fails_on_an_unknown_field_stops_the_run_with_salesforces_message() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = bulk_destination(&double.url, "bulk: always");
    let state = tempfile::tempdir().unwrap();
    let mut spec = sync_spec("upsert");
    spec.mappings[3].to = "Phne".into();

    let report = run_fast(&model, &dest, state.path(), &spec).await;

    let error = report.error.as_ref().expect("the run fails").to_string();
    let job = &double.jobs()[0];
    assert_eq!(job.state, "Failed");
    assert_eq!(
        error,
        format!(
            "failed to deliver: Salesforce bulk job {} ended Failed: InvalidBatch : Field name not found : Phne",
            job.id
        )
    );
    assert_eq!(report.result, RunResult::Failed);
    assert_eq!(report.accepted, 0);
    assert_eq!(double.jobs().len(), 1, "not retried, not split");
    assert!(double.records("Contact").is_empty());
    let steps = bulk_steps(&double.calls());
    assert!(
        !steps.contains(&"failedResults"),
        "a failed job has no results to read: {steps:?}"
    );
}

#[tokio::test]
async fn an_expired_session_in_the_middle_of_a_bulk_job_gets_a_new_token_and_the_job_goes_on() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = bulk_view(&bulk_destination(&double.url, "bulk: always"), 2);
    double.expire_tokens_after(2);

    let outcomes = connector
        .send(
            Operation::Upsert,
            &[
                contact("ada@example.com", Some("Lovelace")),
                contact("alan@example.com", Some("Turing")),
            ],
        )
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted, RecordOutcome::Accepted]);
    assert_eq!(double.tokens_issued(), 2);
    let calls = double.calls();
    let steps: Vec<(&str, u16)> = calls
        .iter()
        .map(|c| (c.bulk_step().unwrap_or("?"), c.status))
        .collect();
    assert_eq!(
        steps,
        [
            ("create", 200),
            ("upload", 201),
            ("close", 401),
            ("close", 200),
            ("poll", 200),
            ("poll", 200),
            ("failedResults", 200),
            ("successfulResults", 200),
        ]
    );
    assert_eq!(double.jobs().len(), 1, "the same job went on");
    assert_eq!(double.records("Contact").len(), 2);
}

#[tokio::test]
async fn the_orgs_request_limit_on_a_bulk_job_is_a_throttle_and_an_unfinished_job_is_aborted() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = bulk_view(&bulk_destination(&double.url, "bulk: always"), 1);
    double.limit_exceeded_next(1);

    let error = connector
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Retryable { throttled: true, retry_after: Some(d), .. } if *d == Duration::from_secs(60)),
        "{error:?}"
    );
    assert!(double.jobs().is_empty());

    let dest = bulk_destination(&double.url, "bulk: always");
    let mut planned = destination::PlannedSends::default();
    planned.add(Operation::Upsert, 1);
    let impatient = fast_connector(&dest)
        .with_bulk_polling(BulkPolling {
            first_pause: Duration::from_millis(5),
            max_pause: Duration::from_millis(10),
            timeout: Duration::from_millis(100),
        })
        .for_run(&planned)
        .unwrap();
    double.hold_jobs(true);
    let error = impatient
        .send(Operation::Upsert, &[contact("ada@example.com", Some("Lovelace"))])
        .await
        .unwrap_err();
    assert!(
        matches!(&error, SendError::Retryable { throttled: false, reason, .. } if reason.contains("did not finish")),
        "{error:?}"
    );
    let job = &double.jobs()[0];
    assert_eq!(job.state, "Aborted");
    assert_eq!(bulk_steps(&double.calls()).last(), Some(&"abort"));
    assert!(double.records("Contact").is_empty());
}

#[tokio::test]
async fn the_double_keeps_bulk_jobs_to_their_states_as_salesforce_does() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let client = reqwest::Client::new();
    let token = access_token(&client, &double).await;
    let jobs = format!("{}/services/data/v61.0/jobs/ingest", double.url);
    let call = |method: reqwest::Method, url: String, body: Option<(&str, String)>| {
        let mut request = client.request(method, url).bearer_auth(&token);
        if let Some((content_type, body)) = body {
            request = request.header("content-type", content_type).body(body);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let json_body = |v: serde_json::Value| Some(("application/json", v.to_string()));

    let (status, body) = call(
        reqwest::Method::POST,
        jobs.clone(),
        json_body(json!({"object": "Contact", "externalIdFieldName": "Email__c", "contentType": "CSV", "operation": "upsert", "lineEnding": "LF"})),
    )
    .await;
    assert_eq!(status, 200);
    let job: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["state"], "Open");
    let id = job["id"].as_str().unwrap().to_owned();
    let job_url = format!("{jobs}/{id}");
    let close = || json_body(json!({"state": "UploadComplete"}));

    let (status, _) = call(reqwest::Method::PATCH, job_url.clone(), close()).await;
    assert_eq!(status, 400, "no close without data");
    let (status, _) = call(
        reqwest::Method::GET,
        format!("{job_url}/successfulResults/"),
        None,
    )
    .await;
    assert_eq!(status, 409, "no results before the job ends");
    let csv = "Email__c,LastName,Phne\nada@example.com,Lovelace,1\n".to_owned();
    let (status, body) = call(
        reqwest::Method::PUT,
        format!("{job_url}/batches"),
        Some(("text/csv", csv.clone())),
    )
    .await;
    assert_eq!((status, body.as_str()), (201, ""));
    let (status, _) = call(reqwest::Method::PATCH, job_url.clone(), close()).await;
    assert_eq!(status, 200);
    let (status, _) = call(
        reqwest::Method::PUT,
        format!("{job_url}/batches"),
        Some(("text/csv", csv)),
    )
    .await;
    assert_eq!(status, 409, "no upload to a job that is not Open");

    let mut states = Vec::new();
    for _ in 0..3 {
        let (_, body) = call(reqwest::Method::GET, job_url.clone(), None).await;
        let job: serde_json::Value = serde_json::from_str(&body).unwrap();
        states.push(job["state"].as_str().unwrap().to_owned());
        if let Some(message) = job["errorMessage"].as_str() {
            assert_eq!(message, "InvalidBatch : Field name not found : Phne");
        }
    }
    assert_eq!(states, ["InProgress", "Failed", "Failed"]);
    assert!(double.records("Contact").is_empty());
}

// --- the documented contract: formats, request errors, counts ------------------------------

fn last_order(email: &str, last_name: &str, stamp: &str) -> Record {
    let mut record = contact(email, Some(last_name));
    let stamp = chrono::DateTime::parse_from_rfc3339(stamp)
        .unwrap()
        .with_timezone(&chrono::Utc);
    record
        .fields
        .insert("Last_Order__c".into(), Value::Timestamp(stamp));
    record
}

#[tokio::test]
async fn timestamps_go_out_in_salesforces_millisecond_format_on_both_paths() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;

    let outcomes = connector(&double)
        .await
        .send(
            Operation::Upsert,
            &[last_order(
                "ada@example.com",
                "Lovelace",
                "2024-01-01T00:37:00.362470Z",
            )],
        )
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let sent = double.calls().pop().unwrap().json();
    assert_eq!(sent["records"][0]["Last_Order__c"], "2024-01-01T00:37:00.362Z");

    let view = bulk_view(&bulk_destination(&double.url, "bulk: always"), 1);
    let outcomes = view
        .send(
            Operation::Upsert,
            &[last_order(
                "alan@example.com",
                "Turing",
                "2024-12-31T23:59:59.999999Z",
            )],
        )
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    let upload = double
        .calls()
        .into_iter()
        .find(|c| c.bulk_step() == Some("upload"))
        .unwrap();
    assert!(
        upload.body.contains(",2024-12-31T23:59:59.999Z\n"),
        "truncated, never rounded into the next year: {}",
        upload.body
    );
    for (email, stamp) in [
        ("ada@example.com", "2024-01-01T00:37:00.362Z"),
        ("alan@example.com", "2024-12-31T23:59:59.999Z"),
    ] {
        let stored = double.find("Contact", "Email__c", email).unwrap();
        assert_eq!(stored.text("Last_Order__c"), stamp);
    }
}

#[tokio::test]
async fn a_misspelled_field_stops_the_run_after_one_call_instead_of_rejecting_every_row() {
    let model = TempSqlite::new(MODEL).await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = destination(&double.url, "Contact", "");
    let state = tempfile::tempdir().unwrap();
    let mut spec = sync_spec("upsert");
    spec.mappings[3].to = "Phne".into();

    let report =
        support::engine::run_sync_once(&model.url, &spec, &dest, &secret(CLIENT_SECRET), state.path()).await;

    assert_eq!(report.result, RunResult::Failed);
    let error = report.error.as_ref().expect("the run stops").to_string();
    assert!(
        error.contains("INVALID_FIELD: No such column 'Phne' on sobject of type Contact")
            && error.contains("spec.salesforce.object"),
        "{error}"
    );
    assert_eq!(report.rejected, 0, "no row is blamed for the mapping");
    let upserts = double.calls().into_iter().filter(|c| c.is_upsert()).count();
    assert_eq!(upserts, 1, "not split down to single records");
    assert!(double.records("Contact").is_empty());

    // An object or an External ID field the org does not have is the request's fault too.
    for (object, field) in [("Contct", "Email__c"), ("Contact", "Emial__c")] {
        let dest: DestinationSpec = serde_yaml_ng::from_str(&format!(
            "type: salesforce\ncredentialsSecretRef: {{name: salesforce}}\nsalesforce: {{object: {object}, externalIdField: {field}, loginUrl: \"{}\"}}\n",
            double.url
        ))
        .unwrap();
        let connector = destination::build(&dest, Some(&secret(CLIENT_SECRET)))
            .await
            .unwrap();
        let mut record = contact("ada@example.com", Some("Lovelace"));
        record.identity = Document::from([(field.to_owned(), Value::Text("ada@example.com".into()))]).into();
        record.fields.remove("Email__c");
        let error = connector.send(Operation::Upsert, &[record]).await.unwrap_err();
        assert!(
            matches!(&error, SendError::Fatal(m) if m.contains("refused the request, not a record")),
            "{object}.{field}: {error:?}"
        );
    }
}

#[tokio::test]
async fn a_record_refused_whole_for_a_bad_value_is_still_split_and_the_value_is_not_echoed() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let connector = connector(&double).await;
    let mut bad = contact("grace@example.com", Some("Hopper"));
    bad.fields
        .insert("Last_Order__c".into(), Value::Text("last tuesday at noon".into()));
    let batch = vec![contact("ada@example.com", Some("Lovelace")), bad];
    let dest = destination(&double.url, "Contact", "");
    let config =
        backflow::destination::delivery::DeliveryConfig::resolve(&dest, &connector.capabilities()).unwrap();
    let delivery = backflow::destination::delivery::Delivery::new(
        connector,
        Arc::new(backflow::destination::delivery::rate_limit::RateLimiter::new(
            1000.0, 1000,
        )),
        config,
    );

    let mut done = delivery.send_batch(Operation::Upsert, batch).await.unwrap();
    done.sort_by(|a, b| a.0.key.cmp(&b.0.key));

    assert_eq!(done[0].1, backflow::destination::delivery::Delivered::Accepted);
    assert_eq!(
        done[1].1,
        backflow::destination::delivery::Delivered::Rejected(
            "JSON_PARSER_ERROR: Cannot deserialize instance of datetime from VALUE_STRING value <value>"
                .into()
        ),
        "the code stays, the echoed value does not"
    );
}

#[tokio::test]
async fn bulk_rejection_reasons_keep_salesforces_code_and_field_but_not_the_value() {
    let model = TempSqlite::new(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, name TEXT, last_order TEXT);
         INSERT INTO customers VALUES (1, 'user1@example.com', 'One', '2024-01-01T10:00:00Z'),
                                      (2, 'user2@example.com', 'Two', '2024-01-01 10:00');",
    )
    .await;
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = bulk_destination(&double.url, "bulk: always");
    let state = tempfile::tempdir().unwrap();
    let spec: ReverseSyncSpec = serde_yaml_ng::from_str(
        r#"
source: {connectionSecretRef: {name: wh}, query: "SELECT id, email, name, last_order FROM customers", primaryKey: [id]}
destinationRef: {name: salesforce}
mode: upsert
match: [Email__c]
mappings:
  - {from: email, to: Email__c}
  - {from: name, to: LastName}
  - {from: last_order, to: Last_Order__c}
"#,
    )
    .unwrap();

    let report = run_fast(&model, &dest, state.path(), &spec).await;

    assert_eq!((report.accepted, report.rejected), (1, 1));
    assert_eq!(
        report.rejected_samples[0].reason,
        "INVALID_TYPE_ON_FIELD_IN_RECORD: Last Order: value not of required type: <value> (Last_Order__c)"
    );
}

/// A delivery over `connector` as a run builds it, with a fast limiter.
fn delivery_over(
    connector: Arc<dyn Connector>,
    dest: &DestinationSpec,
) -> backflow::destination::delivery::Delivery {
    use backflow::destination::delivery::{Delivery, DeliveryConfig, rate_limit::RateLimiter};
    let mut config = DeliveryConfig::resolve(dest, &connector.capabilities()).unwrap();
    config.initial_backoff = Duration::from_millis(10);
    config.max_backoff = Duration::from_millis(100);
    Delivery::new(connector, Arc::new(RateLimiter::new(1000.0, 1000)), config)
}

#[tokio::test]
async fn a_throttled_poll_and_a_new_token_count_in_the_run_and_the_throttle_pauses_every_job() {
    let double = SalesforceDouble::start(CLIENT_ID, CLIENT_SECRET).await;
    let dest = bulk_destination(&double.url, "bulk: always");
    let wait = Duration::from_millis(400);
    let mut planned = destination::PlannedSends::default();
    planned.add(Operation::Upsert, 2);
    let view = fast_connector(&dest)
        .with_request_limit_wait(wait)
        .for_run(&planned)
        .unwrap();
    let delivery = delivery_over(view, &dest);
    double.limit_exceeded_on_polls(1);
    double.expire_tokens_after(1);

    // Two jobs at once, as a run with two batches in flight sends them; both keep polling
    // until the jobs are let go.
    double.hold_jobs(true);
    let (a, b, ()) = tokio::join!(
        delivery.send_batch(
            Operation::Upsert,
            vec![contact("ada@example.com", Some("Lovelace"))]
        ),
        delivery.send_batch(
            Operation::Upsert,
            vec![contact("alan@example.com", Some("Turing"))]
        ),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            double.hold_jobs(false);
        },
    );
    assert_eq!(
        a.unwrap()[0].1,
        backflow::destination::delivery::Delivered::Accepted
    );
    assert_eq!(
        b.unwrap()[0].1,
        backflow::destination::delivery::Delivered::Accepted
    );

    let stats = delivery.stats();
    use std::sync::atomic::Ordering;
    assert_eq!(
        stats.throttled.load(Ordering::Relaxed),
        1,
        "the throttled poll counts"
    );
    assert!(
        stats.retries.load(Ordering::Relaxed) >= 2,
        "the repeated poll and the call repeated with a new token count as retries: {}",
        stats.retries.load(Ordering::Relaxed)
    );
    assert_eq!(
        stats.requests.load(Ordering::Relaxed),
        2,
        "a job is still one request"
    );
    let calls = double.calls();
    let throttled = calls
        .iter()
        .find(|c| c.status == 403)
        .expect("a throttled poll")
        .at;
    // A call already on its way when the throttle was answered may still arrive just after it.
    let during: Vec<Duration> = calls
        .iter()
        .filter(|c| c.at > throttled)
        .map(|c| c.at - throttled)
        .filter(|d| *d > Duration::from_millis(20) && *d < wait - Duration::from_millis(50))
        .collect();
    assert!(
        during.is_empty(),
        "no job called Salesforce during the pause, yet calls came after {during:?}"
    );
    assert_eq!(double.records("Contact").len(), 2);
}
