//! The Warehouse state store on the real PostgreSQL and MariaDB servers: round trips,
//! checkpoint durability, scopes, the run lock, full engine runs, sync logs, migration from
//! and back to the File store, and errors that never show a password.

mod support;

use std::sync::Arc;
use std::time::Duration;

use backflow::api::ReverseSyncSpec;
use backflow::destination::delivery::rate_limit::RateLimiter;
use backflow::destination::delivery::{Delivery, DeliveryConfig};
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::state::file::FileStore;
use backflow::state::warehouse::{WarehouseConfig, WarehouseStore};
use backflow::state::{EntryRef, Fingerprints, RunLog, StateChange, StateError, StateStore, migrate};
use support::db::{Server, TestDb};
use support::fake_connector::{BadRecords, FakeConnector};

/// The schema of the state tables: the default on PostgreSQL (each test has its own
/// database), the test's own database on MariaDB (where a schema is a server-wide database).
fn schema(db: &TestDb) -> String {
    match db.server {
        Server::Postgres => "backflow".into(),
        Server::Mysql => db.name.clone(),
    }
}

fn config(db: &TestDb, sync_id: &str) -> WarehouseConfig {
    WarehouseConfig {
        url: db.url.clone(),
        schema: schema(db),
        sync_id: sync_id.into(),
        sync_logs: false,
    }
}

fn put(key: &str, fingerprint: u64, identity: &str) -> StateChange {
    StateChange::Put {
        key: key.into(),
        fingerprint,
        identity: identity.into(),
    }
}

fn entries(set: &Fingerprints) -> Vec<(String, u64, String)> {
    let mut v: Vec<_> = set
        .iter()
        .map(|e: EntryRef<'_>| (e.key.to_owned(), e.fingerprint, e.identity.to_owned()))
        .collect();
    v.sort();
    v
}

fn end(dry_run: bool) -> RunLog {
    let now = chrono::Utc::now();
    RunLog {
        started: now,
        finished: now,
        result: "Succeeded".into(),
        dry_run,
        rows_in_model: 0,
        rows_added: 0,
        rows_changed: 0,
        rows_removed: 0,
        rows_unchanged: 0,
        rows_rejected: 0,
        rows_failed: 0,
        requests: 0,
        error: None,
    }
}

/// Loads, retrying while the lock of a store dropped a moment ago is still held: the server
/// ends the dropped session asynchronously.
async fn load_after_drop(store: &mut WarehouseStore, scope: &str) -> Fingerprints {
    for _ in 0..50 {
        match store.load(scope).await {
            Err(StateError::Locked(_)) => tokio::time::sleep(Duration::from_millis(40)).await,
            other => return other.unwrap(),
        }
    }
    panic!("the lock of the dropped store was never released")
}

async fn round_trip(db: TestDb) {
    let long_identity = format!("{{\"email\":\"{}@example.com\"}}", "x".repeat(100_000));
    let long_key = "k".repeat(5_000);
    let mut store = WarehouseStore::new(config(&db, "default/customers"));
    assert!(store.load("dest").await.unwrap().is_empty());
    store
        .commit(
            "dest",
            &[
                put("1", u64::MAX, "{\"id\":1}"),
                put("Zoë/東京/🚀", 42, "{\"id\":\"Zoë\"}"),
                put(&long_key, 7, &long_identity),
                put("gone", 9, "{}"),
            ],
        )
        .await
        .unwrap();
    store
        .commit(
            "dest",
            &[
                put("1", 5, "{\"id\":1}"),
                StateChange::Remove { key: "gone".into() },
            ],
        )
        .await
        .unwrap();
    store.finish("dest").await.unwrap();
    store.end_run(&end(false)).await.unwrap();
    drop(store);

    let mut again = WarehouseStore::new(config(&db, "default/customers"));
    let loaded = again.load("dest").await.unwrap();
    let mut expected = vec![
        ("1".to_owned(), 5, "{\"id\":1}".to_owned()),
        ("Zoë/東京/🚀".to_owned(), 42, "{\"id\":\"Zoë\"}".to_owned()),
        (long_key.clone(), 7, long_identity.clone()),
    ];
    expected.sort();
    assert_eq!(entries(&loaded), expected);
    assert!(loaded.position("Zoë/東京/🚀").is_some());
    // Another sync in the same tables sees nothing of this one.
    let mut other = WarehouseStore::new(config(&db, "default/other"));
    assert!(other.load("dest").await.unwrap().is_empty());
}

#[tokio::test]
async fn fingerprints_round_trip_with_unicode_keys_and_long_identities_on_postgres() {
    round_trip(TestDb::postgres("whrt").await).await;
}

#[tokio::test]
async fn fingerprints_round_trip_with_unicode_keys_and_long_identities_on_mariadb() {
    round_trip(TestDb::mysql("whrt").await).await;
}

async fn durability_and_scope(db: TestDb) {
    let mut store = WarehouseStore::new(config(&db, "ns/s"));
    store.load("a").await.unwrap();
    store.commit("a", &[put("1", 1, "{}")]).await.unwrap();
    store.commit("a", &[put("2", 2, "{}")]).await.unwrap();
    // A crash: no finish, no end_run.
    drop(store);
    let mut again = WarehouseStore::new(config(&db, "ns/s"));
    assert_eq!(load_after_drop(&mut again, "a").await.len(), 2);
    again.end_run(&end(false)).await.unwrap();

    // Another destination: empty, and its first commit replaces the old scope's rows.
    let mut moved = WarehouseStore::new(config(&db, "ns/s"));
    assert!(moved.load("b").await.unwrap().is_empty());
    moved.commit("b", &[put("9", 9, "{}")]).await.unwrap();
    moved.end_run(&end(false)).await.unwrap();
    let mut back = WarehouseStore::new(config(&db, "ns/s"));
    assert!(back.load("a").await.unwrap().is_empty());
    back.end_run(&end(false)).await.unwrap();
    let mut b = WarehouseStore::new(config(&db, "ns/s"));
    assert_eq!(
        entries(&b.load("b").await.unwrap()),
        vec![("9".to_owned(), 9, "{}".to_owned())]
    );
}

#[tokio::test]
async fn checkpoints_survive_a_crash_and_another_scope_loads_empty_on_postgres() {
    durability_and_scope(TestDb::postgres("whdur").await).await;
}

#[tokio::test]
async fn checkpoints_survive_a_crash_and_another_scope_loads_empty_on_mariadb() {
    durability_and_scope(TestDb::mysql("whdur").await).await;
}

async fn lock(db: TestDb) {
    let mut first = WarehouseStore::new(config(&db, "ns/locked"));
    first.load("s").await.unwrap();
    let mut second = WarehouseStore::new(config(&db, "ns/locked"));
    let err = second.load("s").await.unwrap_err();
    assert!(matches!(err, StateError::Locked(_)), "{err}");
    assert!(err.to_string().contains("ns/locked"), "{err}");
    // Another sync is not held up.
    WarehouseStore::new(config(&db, "ns/free"))
        .load("s")
        .await
        .unwrap();
    first.end_run(&end(false)).await.unwrap();
    second.load("s").await.unwrap();
}

#[tokio::test]
async fn a_concurrent_second_run_is_refused_by_the_lock_on_postgres() {
    lock(TestDb::postgres("whlock").await).await;
}

#[tokio::test]
async fn a_concurrent_second_run_is_refused_by_the_lock_on_mariadb() {
    lock(TestDb::mysql("whlock").await).await;
}

const MODEL: &str = "SELECT id, email, plan FROM customers";

fn spec(mode: &str, query: &str, state: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{query}", primaryKey: [id]}}
destinationRef: {{name: fake}}
mode: {mode}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email}}
  - {{from: plan, to: plan}}
state: {state}
"#
    ))
    .unwrap()
}

async fn customers(server: Server, rows: u32) -> TestDb {
    let db = match server {
        Server::Postgres => TestDb::postgres("wheng").await,
        Server::Mysql => TestDb::mysql("wheng").await,
    };
    db.exec(&format!(
        "CREATE TABLE customers (id INT PRIMARY KEY, email TEXT, plan TEXT);
INSERT INTO customers (id, email, plan) WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
SELECT i, CONCAT('user', i, '@example.com'), 'free' FROM n"
    ))
    .await;
    db
}

/// Runs `spec` once from `db` into `fake`, with the store local runs would choose (File in
/// `dir` as the previous or current store).
async fn run_once(
    db: &TestDb,
    spec: &ReverseSyncSpec,
    fake: Arc<FakeConnector>,
    dir: &std::path::Path,
) -> RunReport {
    let config = DeliveryConfig {
        batch_size: fake.max_batch,
        max_concurrency: 2,
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(5),
        requests_per_second: 100_000.0,
        burst: 100_000,
    };
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec,
        source_url: &db.url,
        delivery: Delivery::new(fake, Arc::new(RateLimiter::new(100_000.0, 100_000)), config),
        scope: "default/fake".into(),
    };
    let file = Box::new(FileStore::new(dir, "default", "customers"));
    let mut store = migrate::choose(spec, "default", "customers", file, &db.url, None);
    run(job, store.as_mut(), &RunOptions::default()).await
}

async fn full_runs(server: Server) {
    let db = customers(server, 1000).await;
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        "mirror",
        MODEL,
        &format!("{{store: Warehouse, schema: {}}}", schema(&db)),
    );
    let fake = Arc::new(FakeConnector::new(200));
    let first = run_once(&db, &s, fake.clone(), dir.path()).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!((first.plan.added, first.accepted), (1000, 1000));

    let second_fake = Arc::new(FakeConnector::new(200));
    let second = run_once(&db, &s, second_fake.clone(), dir.path()).await;
    assert!(second.error.is_none(), "{:?}", second.error);
    assert_eq!((second.plan.unchanged, second_fake.call_count()), (1000, 0));

    db.exec("UPDATE customers SET plan = 'pro' WHERE id % 100 = 0")
        .await;
    db.exec("DELETE FROM customers WHERE id IN (1, 2, 3)").await;
    let third_fake = Arc::new(FakeConnector::new(200));
    let third = run_once(&db, &s, third_fake.clone(), dir.path()).await;
    assert!(third.error.is_none(), "{:?}", third.error);
    assert_eq!(
        (third.plan.changed, third.plan.removed, third.deleted),
        (10, 3, 3)
    );
    let mut sent = third_fake.sent_keys();
    sent.sort();
    let mut expected: Vec<String> = (1..=10)
        .map(|i| (i * 100).to_string())
        .chain(["1", "2", "3"].map(String::from))
        .collect();
    expected.sort();
    assert_eq!(sent, expected);

    let fourth_fake = Arc::new(FakeConnector::new(200));
    run_once(&db, &s, fourth_fake.clone(), dir.path()).await;
    assert_eq!(fourth_fake.call_count(), 0);
    // Nothing went to the File store.
    assert!(!dir.path().join("default/customers.state").exists());
    assert!(!dir.path().join("default/customers.journal").exists());
}

#[tokio::test]
async fn engine_runs_with_the_warehouse_store_send_only_changes_and_mirror_deletes_on_postgres() {
    full_runs(Server::Postgres).await;
}

#[tokio::test]
async fn engine_runs_with_the_warehouse_store_send_only_changes_and_mirror_deletes_on_mariadb() {
    full_runs(Server::Mysql).await;
}

#[tokio::test]
async fn the_model_query_still_cannot_write_while_the_state_connection_can() {
    let db = customers(Server::Postgres, 10).await;
    let dir = tempfile::tempdir().unwrap();
    let writing = spec(
        "upsert",
        "WITH w AS (UPDATE customers SET plan = 'x' RETURNING id, email, plan) SELECT * FROM w",
        "{store: Warehouse}",
    );
    let report = run_once(&db, &writing, Arc::new(FakeConnector::new(100)), dir.path()).await;
    let err = report.error.expect("a writing model query fails").to_string();
    assert!(err.contains("read-only"), "{err}");
    let ok = run_once(
        &db,
        &spec("upsert", MODEL, "{store: Warehouse}"),
        Arc::new(FakeConnector::new(100)),
        dir.path(),
    )
    .await;
    assert!(ok.error.is_none(), "{:?}", ok.error);
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM backflow.backflow_state")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(stored, 10);
}

/// result, rows_in_model, rows_rejected of a `backflow_runs` row.
type RunRow = (String, i64, i64);
/// key, operation, reason of a `backflow_rejections` row.
type RejectionRow = (String, String, String);

async fn sync_logs(server: Server) {
    let db = customers(server, 50).await;
    let dir = tempfile::tempdir().unwrap();
    let logs = match server {
        Server::Postgres => "ops_state".to_owned(),
        Server::Mysql => db.name.clone(),
    };
    let s = spec(
        "upsert",
        MODEL,
        &format!("{{store: Warehouse, schema: {logs}, syncLogs: true}}"),
    );
    let fake = Arc::new(FakeConnector::new(20).with_bad(&["7", "8", "9"], BadRecords::RejectEach));
    let report = run_once(&db, &s, fake, dir.path()).await;
    assert_eq!(report.result, RunResult::PartiallySucceeded, "{:?}", report.error);
    let runs = format!(
        "SELECT CAST(result AS CHAR), rows_in_model, rows_rejected FROM {logs}.backflow_runs WHERE sync_id = 'default/customers'"
    );
    let rejections = format!(
        "SELECT CAST(`key` AS CHAR), CAST(operation AS CHAR), CAST(reason AS CHAR) FROM {logs}.backflow_rejections ORDER BY `key`"
    );
    let (run, rejected): (RunRow, Vec<RejectionRow>) = match server {
        Server::Postgres => {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
                .await
                .unwrap();
            (
                sqlx::query_as(&runs.replace(" AS CHAR", " AS TEXT"))
                    .fetch_one(&mut c)
                    .await
                    .unwrap(),
                sqlx::query_as(&rejections.replace('`', "\"").replace(" AS CHAR", " AS TEXT"))
                    .fetch_all(&mut c)
                    .await
                    .unwrap(),
            )
        }
        Server::Mysql => {
            let mut c = <sqlx::MySqlConnection as sqlx::Connection>::connect(&db.url)
                .await
                .unwrap();
            (
                sqlx::query_as(&runs).fetch_one(&mut c).await.unwrap(),
                sqlx::query_as(&rejections).fetch_all(&mut c).await.unwrap(),
            )
        }
    };
    assert_eq!(run, ("PartiallySucceeded".to_owned(), 50, 3));
    assert_eq!(
        rejected,
        ["7", "8", "9"]
            .map(|k| (
                k.to_owned(),
                "upsert".to_owned(),
                format!("record {k} is invalid")
            ))
            .to_vec()
    );
}

#[tokio::test]
async fn sync_logs_keep_one_row_per_run_and_per_rejected_row_on_postgres() {
    sync_logs(Server::Postgres).await;
}

#[tokio::test]
async fn sync_logs_keep_one_row_per_run_and_per_rejected_row_on_mariadb() {
    sync_logs(Server::Mysql).await;
}

#[tokio::test]
async fn switching_from_the_file_store_to_the_warehouse_and_back_sends_nothing_extra() {
    let db = customers(Server::Postgres, 300).await;
    let dir = tempfile::tempdir().unwrap();
    let file_spec = spec("mirror", MODEL, "{store: File}");
    let first = run_once(&db, &file_spec, Arc::new(FakeConnector::new(100)), dir.path()).await;
    assert_eq!(
        (first.accepted, first.error.is_none()),
        (300, true),
        "{:?}",
        first.error
    );
    assert!(dir.path().join("default/customers.state").exists());

    let wh_spec = spec("mirror", MODEL, "{store: Warehouse}");
    let fake = Arc::new(FakeConnector::new(100));
    let moved = run_once(&db, &wh_spec, fake.clone(), dir.path()).await;
    assert!(moved.error.is_none(), "{:?}", moved.error);
    assert_eq!((moved.plan.unchanged, fake.call_count()), (300, 0));
    assert!(
        !dir.path().join("default/customers.state").exists(),
        "the imported File state is discarded"
    );
    let fake = Arc::new(FakeConnector::new(100));
    let again = run_once(&db, &wh_spec, fake.clone(), dir.path()).await;
    assert_eq!((again.plan.unchanged, fake.call_count()), (300, 0));

    db.exec("UPDATE customers SET plan = 'pro' WHERE id = 5").await;
    let fake = Arc::new(FakeConnector::new(100));
    let back = run_once(&db, &file_spec, fake.clone(), dir.path()).await;
    assert!(back.error.is_none(), "{:?}", back.error);
    assert_eq!((back.plan.changed, back.plan.unchanged), (1, 299));
    assert_eq!(fake.sent_keys(), vec!["5".to_owned()]);
    assert!(dir.path().join("default/customers.state").exists());
}

#[tokio::test]
async fn a_state_user_without_rights_gets_an_error_naming_the_schema_but_never_the_password() {
    let db = TestDb::postgres("whdeny").await;
    let role = format!("{}_writer", db.name);
    let password = "pw-Sup3r-s3cret";
    db.exec(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'"))
        .await;
    let url = db.url.replacen(
        "postgres://postgres@",
        &format!("postgres://{role}:{password}@"),
        1,
    );
    assert_ne!(url, db.url, "the test server URL has an unexpected form");
    let mut store = WarehouseStore::new(WarehouseConfig {
        url: url.clone(),
        schema: "analytics_state".into(),
        sync_id: "default/customers".into(),
        sync_logs: false,
    });
    let err = store.load("s").await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(matches!(err, StateError::Unusable { .. }), "{text}");
    assert!(text.contains("analytics_state"), "{text}");
    assert!(!text.contains(password), "{text}");
    drop(store);

    // Unreachable server: the password stays out of the message too.
    let unreachable = format!("postgres://{role}:{password}@127.0.0.1:1/x");
    let mut store = WarehouseStore::new(WarehouseConfig {
        url: unreachable,
        schema: "backflow".into(),
        sync_id: "default/customers".into(),
        sync_logs: false,
    });
    let err = store.load("s").await.unwrap_err().to_string();
    assert!(!err.contains(password) && err.contains("127.0.0.1:1"), "{err}");
    drop(db);
    support::db::exec_admin_postgres(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;
}
