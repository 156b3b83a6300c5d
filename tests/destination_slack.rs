//! The `slack` destination against the in-process Slack double: the connector alone, and
//! whole runs from a SQLite model.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use backflow::api::reverse_sync::SyncMode;
use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::delivery::rate_limit::{Limiters, RateLimiter};
use backflow::destination::delivery::{Delivered, Delivery, DeliveryConfig};
use backflow::destination::{self, Connector, DestinationError, RecordOutcome, SendError};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::engine::setup::{SetupError, prepare};
use backflow::local::manifests::{Manifests, load_text};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use backflow::state::file::FileStore;
use backflow::template::Template;
use support::slack_double::SlackDouble;
use support::sqlite::TempSqlite;

const TOKEN: &str = "xoxb-1111-2222-s3cr3tT0ken";

const MODEL: &str = "CREATE TABLE accounts (id integer PRIMARY KEY, name text, score integer, channel text);
INSERT INTO accounts VALUES (1, 'Acme', 71, '#alerts'), (2, 'Globex', 55, '#alerts'), (3, 'Initech', 90, '#alerts');";

fn secret(token: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("token".to_owned(), token.to_owned())]))
}

/// A Slack destination pointed at the double; `extra` adds top-level spec lines.
fn destination(base_url: &str, extra: &str) -> DestinationSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
type: slack
credentialsSecretRef: {{name: slack-bot}}
{extra}
slack:
  channel: "{{{{channel}}}}"
  text: "{{{{properties.name}}}}'s score is now {{{{score}}}}"
  baseUrl: "{base_url}"
"#
    ))
    .unwrap()
}

async fn connector(spec: &DestinationSpec, token: &str) -> Arc<dyn Connector> {
    destination::build(spec, Some(&secret(token)))
        .await
        .expect("a valid slack destination")
}

fn record(id: i64, name: &str, score: i64, channel: &str) -> Record {
    let identity = Document::from([("id".to_owned(), Value::Int(id))]);
    let mut fields = identity.clone();
    fields.insert(
        "properties".into(),
        Value::Object(Document::from([(
            "name".to_owned(),
            Value::Text(name.to_owned()),
        )])),
    );
    fields.insert("score".into(), Value::Int(score));
    fields.insert("channel".into(), Value::Text(channel.to_owned()));
    Record {
        key: id.to_string(),
        identity: identity.into(),
        fields: fields.into(),
    }
}

fn sync_spec() -> ReverseSyncSpec {
    serde_yaml_ng::from_str(
        r#"
source: {connectionSecretRef: {name: wh}, query: "SELECT id, name, score, channel FROM accounts", primaryKey: [id]}
destinationRef: {name: slack}
mode: upsert
mappings:
  - {from: id, to: id}
  - {from: name, to: properties.name}
  - {from: score, to: score}
  - {from: channel, to: channel}
"#,
    )
    .unwrap()
}

async fn run_sync(
    model: &TempSqlite,
    dest: &DestinationSpec,
    token: &str,
    state: &std::path::Path,
) -> RunReport {
    let connector = connector(dest, token).await;
    let mut config = DeliveryConfig::resolve(dest, &connector.capabilities()).unwrap();
    config.initial_backoff = Duration::from_millis(20);
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let spec = sync_spec();
    let job = SyncRun {
        namespace: "default",
        name: "accounts",
        spec: &spec,
        source_url: &model.url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, limiter, config),
        scope: "default/slack".into(),
    };
    run(
        job,
        &mut FileStore::new(state, "default", "accounts"),
        &RunOptions::default(),
    )
    .await
}

/// Fast enough for tests; the defaults (1/s) are checked on their own.
const FAST: &str = "rateLimit: {requestsPerSecond: 100}";

fn assert_no_token(text: &str) {
    assert!(!text.contains(TOKEN), "the token leaked into: {text}");
    assert!(
        !text.contains("s3cr3tT0ken"),
        "part of the token leaked into: {text}"
    );
}

#[tokio::test]
async fn a_message_carries_the_channel_and_text_rendered_from_the_record_fields() {
    let double = SlackDouble::builder(TOKEN).start().await;
    let slack = connector(&destination(&double.base_url, ""), TOKEN).await;

    let outcomes = slack
        .send(Operation::Upsert, &[record(1, "Acme", 92, "#alerts")])
        .await
        .unwrap();

    assert_eq!(outcomes, vec![RecordOutcome::Accepted]);
    assert_eq!(
        double.posted(),
        vec![("#alerts".to_owned(), "Acme's score is now 92".to_owned())]
    );
    let request = &double.requests()[0];
    assert_eq!(request.method, "chat.postMessage");
    assert_eq!(
        request.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        request.content_type.as_deref(),
        Some("application/json; charset=utf-8")
    );
    assert_eq!(
        request.json.as_ref().unwrap().as_object().unwrap().len(),
        2,
        "only channel and text are sent"
    );
}

#[tokio::test]
async fn a_second_run_sends_nothing_and_a_changed_row_sends_exactly_one_message() {
    let model = TempSqlite::new(MODEL).await;
    let double = SlackDouble::builder(TOKEN).start().await;
    let dest = destination(&double.base_url, FAST);
    let state = tempfile::tempdir().unwrap();

    let first = run_sync(&model, &dest, TOKEN, state.path()).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.result, RunResult::Succeeded);
    assert_eq!(first.accepted, 3);
    assert_eq!(double.posted().len(), 3);

    let second = run_sync(&model, &dest, TOKEN, state.path()).await;
    assert_eq!(second.result, RunResult::Succeeded);
    assert_eq!(second.requests, 0);
    assert_eq!(double.posted().len(), 3, "an unchanged model posts nothing");

    model.exec("UPDATE accounts SET score = 97 WHERE id = 2").await;
    let third = run_sync(&model, &dest, TOKEN, state.path()).await;
    assert_eq!(third.result, RunResult::Succeeded);
    assert_eq!(third.accepted, 1);
    let posted = double.posted();
    assert_eq!(posted.len(), 4);
    assert_eq!(
        posted[3],
        ("#alerts".to_owned(), "Globex's score is now 97".to_owned())
    );
}

#[tokio::test]
async fn an_unknown_channel_rejects_that_record_and_the_rest_are_sent() {
    let model = TempSqlite::new(MODEL).await;
    model
        .exec("UPDATE accounts SET channel = '#no-such-channel' WHERE id = 2")
        .await;
    let double = SlackDouble::builder(TOKEN).start().await;
    let dest = destination(&double.base_url, FAST);
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, TOKEN, state.path()).await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!((report.accepted, report.rejected, report.failed), (2, 1, 0));
    let rejected = &report.rejected_samples[0];
    assert_eq!(rejected.key, "2");
    assert!(
        rejected.reason.contains("channel_not_found"),
        "{}",
        rejected.reason
    );
    let mut texts: Vec<_> = double.posted().into_iter().map(|(_, text)| text).collect();
    texts.sort();
    assert_eq!(texts, vec!["Acme's score is now 71", "Initech's score is now 90"]);
}

#[tokio::test]
async fn a_throttled_message_is_retried_after_retry_after_and_then_posted() {
    let model = TempSqlite::new(
        "CREATE TABLE accounts (id integer PRIMARY KEY, name text, score integer, channel text);
INSERT INTO accounts VALUES (1, 'Acme', 71, '#alerts');",
    )
    .await;
    let double = SlackDouble::builder(TOKEN).throttle_first(1, 1).start().await;
    let dest = destination(&double.base_url, FAST);
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, TOKEN, state.path()).await;

    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::Succeeded);
    assert_eq!((report.accepted, report.throttled), (1, 1));
    assert!(report.retries >= 1);
    let requests = double.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].status, 429);
    let waited = requests[1].at - requests[0].at;
    assert!(
        waited >= Duration::from_millis(950),
        "the retry waited only {waited:?}, not the 1s Retry-After"
    );
    assert_eq!(double.posted().len(), 1);
}

#[tokio::test]
async fn the_throttle_answer_carries_retry_after_and_server_errors_are_retryable() {
    let double = SlackDouble::builder(TOKEN)
        .throttle_first(1, 7)
        .fail_first(1, 503)
        .start()
        .await;
    let slack = connector(&destination(&double.base_url, ""), TOKEN).await;
    let batch = [record(1, "Acme", 92, "#alerts")];

    match slack.send(Operation::Upsert, &batch).await {
        Err(SendError::Retryable {
            retry_after,
            throttled,
            ..
        }) => {
            assert!(throttled);
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
        }
        other => panic!("expected a throttle, got {other:?}"),
    }
    match slack.send(Operation::Upsert, &batch).await {
        Err(SendError::Retryable {
            throttled, reason, ..
        }) => {
            assert!(!throttled);
            assert!(reason.contains("503"), "{reason}");
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    assert_eq!(
        slack.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );
}

#[tokio::test]
async fn rejected_credentials_fail_the_run_and_the_token_appears_in_no_message() {
    let model = TempSqlite::new(MODEL).await;
    let double = SlackDouble::builder("xoxb-the-right-one").start().await;
    let dest = destination(&double.base_url, FAST);
    let state = tempfile::tempdir().unwrap();

    let report = run_sync(&model, &dest, TOKEN, state.path()).await;

    assert_eq!(report.result, RunResult::Failed);
    let error = report.error.as_ref().expect("the run failed").to_string();
    assert!(
        error.contains("credentials rejected by Slack (invalid_auth)"),
        "{error}"
    );
    assert_eq!(report.accepted, 0);
    assert_no_token(&error);
    assert_no_token(&format!("{report:?}"));

    let slack = connector(&dest, TOKEN).await;
    let check = slack.check().await.unwrap_err();
    assert_eq!(
        check,
        SendError::Fatal("credentials rejected by Slack (invalid_auth)".into())
    );
    assert_no_token(&format!("{check} {check:?}"));
}

#[tokio::test]
async fn check_posts_auth_test_with_the_token() {
    let double = SlackDouble::builder(TOKEN).start().await;
    let slack = connector(&destination(&double.base_url, ""), TOKEN).await;

    slack.check().await.unwrap();

    let requests = double.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].method, "auth.test");
    assert_eq!(
        requests[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
}

#[tokio::test]
async fn deletes_are_rejected_by_the_shared_delivery_and_send_nothing() {
    let double = SlackDouble::builder(TOKEN).start().await;
    let dest = destination(&double.base_url, "");
    let slack = connector(&dest, TOKEN).await;
    assert!(!slack.capabilities().operations.contains(&Operation::Delete));
    let config = DeliveryConfig::resolve(&dest, &slack.capabilities()).unwrap();
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let delivery = Delivery::new(slack, limiter, config);
    assert!(!delivery.supports(Operation::Delete));

    let delivered = delivery
        .send_batch(Operation::Delete, vec![record(1, "Acme", 92, "#alerts")])
        .await
        .unwrap();

    assert_eq!(delivered.len(), 1);
    assert_eq!(
        delivered[0].1,
        Delivered::Rejected(
            "this destination cannot delete records (it supports upsert, update, insert); use mode upsert"
                .into()
        )
    );
    assert_eq!(double.requests().len(), 0);
}

#[tokio::test]
async fn a_field_the_record_lacks_rejects_it_with_a_reason_naming_the_field() {
    let double = SlackDouble::builder(TOKEN).start().await;
    let mut spec = destination(&double.base_url, "");
    spec.slack.as_mut().unwrap().text = "{{properties.owner}} should call {{properties.name}}".into();
    let slack = connector(&spec, TOKEN).await;

    let outcomes = slack
        .send(Operation::Upsert, &[record(1, "Acme", 92, "#alerts")])
        .await
        .unwrap();

    let [RecordOutcome::Rejected(reason)] = outcomes.as_slice() else {
        panic!("expected a rejection, got {outcomes:?}");
    };
    assert!(reason.contains("{{properties.owner}}"), "{reason}");
    assert_eq!(double.requests().len(), 0);
}

#[tokio::test]
async fn defaults_are_one_message_per_request_at_one_per_second_one_at_a_time() {
    let spec = destination("https://slack.example.com/api", "");
    let slack = connector(&spec, TOKEN).await;
    let caps = slack.capabilities();
    assert_eq!(caps.max_batch_size, 1);
    assert_eq!(
        caps.operations,
        vec![Operation::Upsert, Operation::Update, Operation::Insert]
    );
    let config = DeliveryConfig::resolve(&spec, &caps).unwrap();
    assert_eq!(
        (
            config.batch_size,
            config.requests_per_second,
            config.burst,
            config.max_concurrency
        ),
        (1, 1.0, 1, 1)
    );
    assert_eq!(spec.target(), "slack/{{channel}}");
}

#[tokio::test]
async fn the_token_is_read_from_the_secret_key_the_reference_names() {
    let mut spec = destination("https://slack.example.com/api", "");
    spec.credentials_secret_ref.as_mut().unwrap().key = Some("bot-token".into());
    let err = destination::build(&spec, Some(&secret(TOKEN)))
        .await
        .err()
        .expect("the key is missing");
    assert!(matches!(
        &err,
        DestinationError::MissingSecretKey { secret, key } if secret == "slack-bot" && key == "bot-token"
    ));
    let data = SecretData::new(BTreeMap::from([("bot-token".to_owned(), TOKEN.to_owned())]));
    assert!(destination::build(&spec, Some(&data)).await.is_ok());
    assert!(matches!(
        destination::build(&spec, None).await.err(),
        Some(DestinationError::MissingCredentials("slack"))
    ));
}

#[test]
fn the_documented_example_is_valid() {
    let page = include_str!("../docs/destinations/slack.md");
    let example = page
        .split("## Example")
        .nth(1)
        .and_then(|rest| rest.split("```yaml").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("docs/destinations/slack.md has a yaml block under ## Example");
    let mut manifests = Manifests::default();
    load_text(example, "docs/destinations/slack.md", &mut manifests).unwrap();
    let dest = &manifests
        .destinations
        .values()
        .next()
        .expect("a Destination")
        .spec;
    validate_destination(dest).unwrap();
    let sync = &manifests.syncs.values().next().expect("a ReverseSync").spec;
    validate_reverse_sync(sync).unwrap();

    let slack = dest.slack.as_ref().unwrap();
    let mapped: Vec<&str> = sync.mappings.iter().map(|m| m.to.as_str()).collect();
    for text in [&slack.channel, &slack.text] {
        for name in Template::parse(text).unwrap().variables() {
            assert!(mapped.contains(&name), "{{{{{name}}}}} is not a mapped field");
        }
    }
}

#[tokio::test]
async fn a_mirror_sync_to_slack_is_refused_before_it_runs() {
    let page = include_str!("../docs/destinations/slack.md");
    let example = page
        .split("## Example")
        .nth(1)
        .and_then(|rest| rest.split("```yaml").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("docs/destinations/slack.md has a yaml block under ## Example");
    let warehouse = r#"
apiVersion: v1
kind: Secret
metadata:
  name: warehouse
  annotations:
    backflow.dev/allowed-references: "ReverseSync/score-alerts"
stringData:
  url: postgres://reader@127.0.0.1:5432/analytics
"#;
    let mut manifests = Manifests::default();
    load_text(example, "docs/destinations/slack.md", &mut manifests).unwrap();
    load_text(warehouse, "warehouse.yaml", &mut manifests).unwrap();
    let mut sync = manifests.syncs.values().next().expect("a ReverseSync").clone();
    let limiters = Limiters::default();

    // The documented upsert sync prepares; the same sync in mirror mode would delete messages.
    assert!(
        prepare(&manifests, "default", &sync, &limiters, false)
            .await
            .is_ok()
    );
    sync.spec.mode = SyncMode::Mirror;
    let Err(error) = prepare(&manifests, "default", &sync, &limiters, false).await else {
        panic!("a mirror sync to Slack was prepared");
    };
    assert!(matches!(error, SetupError::InvalidSync(_)), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("mirror") && message.contains("\"slack\"") && message.contains("cannot delete"),
        "{message}"
    );
}
