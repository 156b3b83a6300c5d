//! The Redis destination against the real Redis on the machine (`BACKFLOW_TEST_REDIS_URL`,
//! default `redis://127.0.0.1:6379`). Every test writes under its own key prefix and removes
//! its keys (and any ACL user it made) when it ends.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bigdecimal::BigDecimal;
use serde_json::json;

use backflow::api::{DestinationSpec, ReverseSyncSpec};
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::destination::{self, Connector, DestinationError, RecordOutcome, SendError};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use backflow::state::file::FileStore;
use support::sqlite::TempSqlite;

fn server_url() -> String {
    std::env::var("BACKFLOW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix of one test on the real server; its keys and ACL users go when it drops.
struct TestRedis {
    prefix: String,
    users: Vec<String>,
}

impl TestRedis {
    fn new(test: &str) -> TestRedis {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        TestRedis {
            prefix: format!("backflow-test:{test}:{}:{nanos}:", std::process::id()),
            users: Vec::new(),
        }
    }

    fn conn(&self) -> redis::Connection {
        redis::Client::open(server_url().as_str())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    fn hash(&self, rest: &str) -> HashMap<String, String> {
        redis::cmd("HGETALL")
            .arg(self.key(rest))
            .query(&mut self.conn())
            .unwrap()
    }

    fn exists(&self, rest: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(self.key(rest))
            .query(&mut self.conn())
            .unwrap()
    }

    fn pttl(&self, rest: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(self.key(rest))
            .query(&mut self.conn())
            .unwrap()
    }

    fn count(&self) -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut self.conn())
            .unwrap();
        keys.len()
    }

    /// A Destination spec writing `<prefix><key_template>`.
    fn spec(&self, key_template: &str, ttl: Option<&str>) -> DestinationSpec {
        serde_json::from_value(json!({
            "type": "redis",
            "credentialsSecretRef": {"name": "redis"},
            "redis": {"key": format!("{}{key_template}", self.prefix), "ttl": ttl},
        }))
        .unwrap()
    }

    async fn connector_with_url(
        &self,
        url: &str,
        key_template: &str,
        ttl: Option<&str>,
    ) -> Arc<dyn Connector> {
        let secret = SecretData::new(BTreeMap::from([("url".to_owned(), url.to_owned())]));
        destination::build(&self.spec(key_template, ttl), Some(&secret))
            .await
            .unwrap()
    }

    async fn connector(&self, key_template: &str, ttl: Option<&str>) -> Arc<dyn Connector> {
        self.connector_with_url(&server_url(), key_template, ttl).await
    }

    /// An ACL user allowed only this test's keys and the documented commands; removed on drop.
    fn user(&mut self, name: &str, password: &str) -> String {
        let user = format!("backflow-test-{name}-{}", std::process::id());
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&user)
            .arg("reset")
            .arg("on")
            .arg(format!(">{password}"))
            .arg(format!("~{}*", self.prefix))
            // Exactly what docs/destinations/redis.md tells users to grant.
            .arg(
                &[
                    "+eval", "+exists", "+hset", "+hdel", "+pexpire", "+del", "+ping", "+select",
                ][..],
            )
            .exec(&mut self.conn())
            .unwrap();
        self.users.push(user.clone());
        user
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let Ok(client) = redis::Client::open(server_url().as_str()) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut conn)
            .unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
        for user in &self.users {
            let _: Result<i64, _> = redis::cmd("ACL").arg("DELUSER").arg(user).query(&mut conn);
        }
    }
}

/// `url` with `user:password@` put in front of the host.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    format!("{scheme}://{user}:{password}@{host}")
}

fn doc(pairs: &[(&str, Value)]) -> Document {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

/// A record identified by `id`, with `id` among its fields.
fn record(id: i64, fields: &[(&str, Value)]) -> Record {
    let mut fields = doc(fields);
    fields.insert("id".to_owned(), Value::Int(id));
    Record {
        key: id.to_string(),
        identity: doc(&[("id", Value::Int(id))]).into(),
        fields: fields.into(),
    }
}

fn key_only(id: i64) -> Record {
    Record {
        key: id.to_string(),
        identity: doc(&[("id", Value::Int(id))]).into(),
        fields: Document::new().into(),
    }
}

fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test]
async fn upsert_writes_one_hash_per_record_with_exact_values_and_the_ttl() {
    let r = TestRedis::new("upsert");
    let c = r.connector("customer:{{id}}", Some("30d")).await;
    c.check().await.unwrap();
    let caps = c.capabilities();
    assert_eq!((caps.max_batch_size, caps.default_concurrency), (500, 4));
    assert_eq!(caps.default_requests_per_second, 1000.0);
    assert_eq!(caps.operations.len(), 4);

    let batch = vec![
        record(
            1,
            &[
                ("email", text("ann@example.com")),
                (
                    "ltv",
                    Value::Decimal(BigDecimal::from_str("12345678901234567890.50").unwrap()),
                ),
                ("vip", Value::Bool(true)),
                (
                    "traits",
                    Value::Object(doc(&[("plan", text("pro")), ("age", Value::Int(41))])),
                ),
                ("tags", Value::Array(vec![text("a"), text("b")])),
            ],
        ),
        record(
            2,
            &[("email", text("bob@example.com")), ("score", Value::Float(0.1))],
        ),
    ];
    let outcomes = c.send(Operation::Upsert, &batch).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);

    assert_eq!(
        r.hash("customer:1"),
        map(&[
            ("id", "1"),
            ("email", "ann@example.com"),
            ("ltv", "12345678901234567890.5"),
            ("vip", "true"),
            ("traits", r#"{"age":41,"plan":"pro"}"#),
            ("tags", r#"["a","b"]"#),
        ])
    );
    assert_eq!(
        r.hash("customer:2"),
        map(&[("id", "2"), ("email", "bob@example.com"), ("score", "0.1")])
    );
    let thirty_days = 30 * 24 * 3600 * 1000;
    let ttl = r.pttl("customer:1");
    assert!(ttl > thirty_days - 60_000 && ttl <= thirty_days, "PTTL {ttl}");
    assert_eq!(r.count(), 2);

    // Upserting again replaces values and restarts the TTL.
    let again = vec![record(
        2,
        &[("email", text("bob@new.example.com")), ("score", Value::Int(3))],
    )];
    assert_eq!(
        c.send(Operation::Upsert, &again).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );
    assert_eq!(
        r.hash("customer:2"),
        map(&[("id", "2"), ("email", "bob@new.example.com"), ("score", "3")])
    );
}

#[tokio::test]
async fn a_field_that_becomes_null_disappears_from_the_hash() {
    let r = TestRedis::new("null");
    let c = r.connector("c:{{id}}", None).await;
    let first = vec![record(7, &[("plan", text("pro")), ("coupon", text("X1"))])];
    c.send(Operation::Upsert, &first).await.unwrap();
    assert_eq!(
        r.hash("c:7"),
        map(&[("id", "7"), ("plan", "pro"), ("coupon", "X1")])
    );
    assert_eq!(r.pttl("c:7"), -1, "no ttl set: the hash never expires");

    let second = vec![record(7, &[("plan", text("free")), ("coupon", Value::Null)])];
    assert_eq!(
        c.send(Operation::Upsert, &second).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );
    assert_eq!(r.hash("c:7"), map(&[("id", "7"), ("plan", "free")]));
}

#[tokio::test]
async fn update_of_a_missing_hash_is_rejected_and_an_existing_one_is_updated() {
    let r = TestRedis::new("update");
    let c = r.connector("c:{{id}}", Some("1h")).await;
    c.send(Operation::Upsert, &[record(1, &[("plan", text("free"))])])
        .await
        .unwrap();

    let outcomes = c
        .send(
            Operation::Update,
            &[
                record(1, &[("plan", text("pro"))]),
                record(2, &[("plan", text("pro"))]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected("no existing hash under this key to update".to_owned())
        ]
    );
    assert_eq!(r.hash("c:1"), map(&[("id", "1"), ("plan", "pro")]));
    assert!(!r.exists("c:2"), "an update never creates a hash");
}

#[tokio::test]
async fn insert_of_an_existing_hash_is_rejected_and_a_new_one_is_written() {
    let r = TestRedis::new("insert");
    let c = r.connector("c:{{id}}", None).await;
    c.send(Operation::Upsert, &[record(1, &[("plan", text("free"))])])
        .await
        .unwrap();

    let outcomes = c
        .send(
            Operation::Insert,
            &[
                record(1, &[("plan", text("pro"))]),
                record(2, &[("plan", text("pro"))]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Rejected("a hash already exists under this key".to_owned()),
            RecordOutcome::Accepted
        ]
    );
    assert_eq!(
        r.hash("c:1"),
        map(&[("id", "1"), ("plan", "free")]),
        "left as it was"
    );
    assert_eq!(r.hash("c:2"), map(&[("id", "2"), ("plan", "pro")]));
}

#[tokio::test]
async fn a_key_holding_a_string_rejects_that_record_and_the_rest_are_written() {
    let r = TestRedis::new("wrongtype");
    let _: () = redis::cmd("SET")
        .arg(r.key("c:2"))
        .arg("not a hash")
        .query(&mut r.conn())
        .unwrap();
    let c = r.connector("c:{{id}}", None).await;
    let batch = vec![
        record(1, &[("plan", text("a"))]),
        record(2, &[("plan", text("b"))]),
        record(3, &[("plan", text("c"))]),
    ];
    let outcomes = c.send(Operation::Upsert, &batch).await.unwrap();
    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert_eq!(outcomes[2], RecordOutcome::Accepted);
    match &outcomes[1] {
        RecordOutcome::Rejected(reason) => assert!(reason.starts_with("WRONGTYPE"), "{reason}"),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(r.hash("c:3"), map(&[("id", "3"), ("plan", "c")]));
    let kept: String = redis::cmd("GET").arg(r.key("c:2")).query(&mut r.conn()).unwrap();
    assert_eq!(kept, "not a hash");
}

#[tokio::test]
async fn a_record_without_the_key_field_is_rejected_alone() {
    let r = TestRedis::new("keyfield");
    let c = r.connector("c:{{email}}", None).await;
    let batch = vec![
        record(1, &[("email", text("a@x.io"))]),
        record(2, &[("email", Value::Null)]),
    ];
    let outcomes = c.send(Operation::Upsert, &batch).await.unwrap();
    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert!(
        matches!(&outcomes[1], RecordOutcome::Rejected(m) if m.contains("\"email\"")),
        "{outcomes:?}"
    );
    assert_eq!(r.count(), 1);
}

#[tokio::test]
async fn delete_removes_the_hash_and_an_absent_one_is_accepted() {
    let r = TestRedis::new("delete");
    let c = r.connector("c:{{id}}", None).await;
    c.send(Operation::Upsert, &[record(1, &[("plan", text("a"))])])
        .await
        .unwrap();
    let outcomes = c
        .send(Operation::Delete, &[key_only(1), key_only(99)])
        .await
        .unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);
    assert_eq!(r.count(), 0);
}

#[tokio::test]
async fn a_wrong_password_is_fatal_and_the_password_appears_nowhere() {
    let mut r = TestRedis::new("auth");
    let user = r.user("auth", "right-password-123");
    let wrong = "wrong-password-456";
    let c = r
        .connector_with_url(&with_credentials(&server_url(), &user, wrong), "c:{{id}}", None)
        .await;
    for err in [
        c.check().await.unwrap_err(),
        c.send(Operation::Upsert, &[record(1, &[])]).await.unwrap_err(),
    ] {
        match &err {
            SendError::Fatal(m) => {
                assert!(m.starts_with("credentials rejected by Redis"), "{m}");
                assert!(!m.contains(wrong) && !m.contains("right-password"), "{m}");
            }
            other => panic!("expected Fatal, got {other:?}"),
        }
    }
    assert_eq!(r.count(), 0);

    // The right password works, and that user may write only its own prefix.
    let ok = r
        .connector_with_url(
            &with_credentials(&server_url(), &user, "right-password-123"),
            "c:{{id}}",
            None,
        )
        .await;
    ok.check().await.unwrap();
    assert_eq!(
        ok.send(Operation::Upsert, &[record(1, &[("plan", text("a"))])])
            .await
            .unwrap(),
        vec![RecordOutcome::Accepted]
    );

    // A key the user's ACL does not cover (NOPERM) stops the run the same way.
    let outside: DestinationSpec = serde_json::from_value(json!({
        "type": "redis",
        "credentialsSecretRef": {"name": "redis"},
        "redis": {"key": format!("{}-outside:{{{{id}}}}", r.prefix.trim_end_matches(':'))},
    }))
    .unwrap();
    let secret = SecretData::new(BTreeMap::from([(
        "url".to_owned(),
        with_credentials(&server_url(), &user, "right-password-123"),
    )]));
    let denied = destination::build(&outside, Some(&secret)).await.unwrap();
    match denied.send(Operation::Upsert, &[record(1, &[])]).await {
        Err(SendError::Fatal(m)) => assert!(m.starts_with("credentials rejected by Redis"), "{m}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
}

#[tokio::test]
async fn an_unreachable_server_is_retryable() {
    let r = TestRedis::new("unreachable");
    let c = r
        .connector_with_url("redis://:secret-pw-789@127.0.0.1:1/0", "c:{{id}}", None)
        .await;
    for err in [
        c.check().await.unwrap_err(),
        c.send(Operation::Upsert, &[record(1, &[("plan", text("a"))])])
            .await
            .unwrap_err(),
    ] {
        match &err {
            SendError::Retryable { reason, .. } => {
                assert!(reason.contains("127.0.0.1:1"), "{reason}");
                assert!(!reason.contains("secret-pw-789"), "{reason}");
            }
            other => panic!("expected Retryable, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn settings_are_checked_when_the_connector_is_built() {
    let r = TestRedis::new("settings");
    let secret = |url: &str| SecretData::new(BTreeMap::from([("url".to_owned(), url.to_owned())]));
    let err = |spec: DestinationSpec, url: &str| {
        let secret = secret(url);
        async move {
            match destination::build(&spec, Some(&secret)).await {
                Err(e) => e,
                Ok(_) => panic!("expected an error"),
            }
        }
    };

    let e = err(r.spec("same-key", None), &server_url()).await;
    assert!(e.to_string().contains("at least one field"), "{e}");
    let e = err(r.spec("c:{{id}}", Some("soon")), &server_url()).await;
    assert!(e.to_string().contains("spec.redis.ttl"), "{e}");
    let e = err(r.spec("c:{{id}}", None), "rediss://:tls-secret@127.0.0.1:6380").await;
    assert!(
        e.to_string().contains("TLS") && !e.to_string().contains("tls-secret"),
        "{e}"
    );
    let e = err(r.spec("c:{{id}}", None), "postgres://u:p@h/db").await;
    assert!(e.to_string().contains("redis://"), "{e}");

    let no_secret = destination::build(&r.spec("c:{{id}}", None), None).await;
    assert!(matches!(
        no_secret,
        Err(DestinationError::MissingSecretKey { .. })
    ));
    assert_eq!(
        r.spec("c:{{id}}", None).target(),
        format!("redis/{}c:{{{{id}}}}", r.prefix)
    );
}

const WAREHOUSE: &str = "
CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, plan TEXT, ltv NUMERIC);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 120)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'free', i * 2 FROM n;
";

async fn run_sync(
    warehouse: &TempSqlite,
    dest: &DestinationSpec,
    state: &std::path::Path,
    mode: &str,
) -> RunReport {
    let secret = SecretData::new(BTreeMap::from([("url".to_owned(), server_url())]));
    let connector = destination::build(dest, Some(&secret)).await.unwrap();
    let mut config = DeliveryConfig::resolve(dest, &connector.capabilities()).unwrap();
    config.initial_backoff = Duration::from_millis(20);
    let limiter = Arc::new(RateLimiter::new(config.requests_per_second, config.burst));
    let spec: ReverseSyncSpec = serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, plan, ltv FROM customers", primaryKey: [id]}}
destinationRef: {{name: redis}}
mode: {mode}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email}}
  - {{from: plan, to: plan}}
  - {{from: ltv, to: ltv}}
"#
    ))
    .unwrap();
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec: &spec,
        source_url: &warehouse.url,
        source_credentials: Default::default(),
        delivery: Delivery::new(connector, limiter, config),
        scope: "default/redis".into(),
    };
    run(
        job,
        &mut FileStore::new(state, "default", "customers"),
        &RunOptions::default(),
    )
    .await
}

#[tokio::test]
async fn a_sqlite_model_is_mirrored_to_hashes_and_a_second_run_sends_nothing() {
    let r = TestRedis::new("mirror");
    let warehouse = TempSqlite::new(WAREHOUSE).await;
    let dest = r.spec("customer:{{id}}", Some("7d"));
    let state = tempfile::tempdir().unwrap();

    let first = run_sync(&warehouse, &dest, state.path(), "mirror").await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!((first.result, first.accepted), (RunResult::Succeeded, 120));
    assert_eq!(r.count(), 120);
    assert_eq!(
        r.hash("customer:42"),
        map(&[
            ("id", "42"),
            ("email", "user42@example.com"),
            ("plan", "free"),
            ("ltv", "84")
        ])
    );

    let second = run_sync(&warehouse, &dest, state.path(), "mirror").await;
    assert_eq!((second.plan.unchanged, second.requests), (120, 0));

    warehouse
        .exec("DELETE FROM customers WHERE id > 100; UPDATE customers SET plan = NULL, email = 'new@example.com' WHERE id = 1")
        .await;
    let third = run_sync(&warehouse, &dest, state.path(), "mirror").await;
    assert!(third.error.is_none(), "{:?}", third.error);
    assert_eq!((third.plan.changed, third.deleted), (1, 20));
    assert_eq!(r.count(), 100);
    assert!(!r.exists("customer:101"));
    assert_eq!(
        r.hash("customer:1"),
        map(&[("id", "1"), ("email", "new@example.com"), ("ltv", "2")])
    );
}
