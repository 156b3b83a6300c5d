//! The Warehouse state store on the real PostgreSQL and MariaDB servers: round trips,
//! checkpoint durability, scopes, the run lock, full engine runs, sync logs, migration from
//! and back to the File store, errors that never show a password, checkpoints killed or
//! failing mid-commit (all or nothing), concurrent engine runs of one sync, and the journal:
//! folded before the next run reads the state after a crash, the last change of a key
//! winning, a failing fold applying nothing, emptied by `TRUNCATE` only when nothing else is
//! in it, and tables of an older release without it.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backflow::api::ReverseSyncSpec;
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::state::file::FileStore;
use backflow::state::warehouse::{WarehouseConfig, WarehouseStore};
use backflow::state::{EntryRef, Fingerprints, RunLog, StateChange, StateError, StateStore, migrate};
use sqlx::Connection;
use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use support::db::{Server, TestDb};
use support::fake_connector::{BadRecords, FakeConnector, fast_delivery};

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
    db.exec("CREATE TABLE customers (id INT PRIMARY KEY, email TEXT, plan TEXT)")
        .await;
    // Blocks of 1000: MariaDB stops a recursive CTE after 1000 iterations.
    for start in (1..=rows).step_by(1000) {
        let last = (start + 999).min(rows);
        db.exec(&format!(
            "INSERT INTO customers (id, email, plan) WITH RECURSIVE n(i) AS (SELECT {start} UNION ALL SELECT i + 1 FROM n WHERE i < {last})
SELECT i, CONCAT('user', i, '@example.com'), 'free' FROM n"
        ))
        .await;
    }
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
    run_with(db, spec, fake, dir, &RunOptions::default()).await
}

/// [`run_once`] with run options (checkpoint size).
async fn run_with(
    db: &TestDb,
    spec: &ReverseSyncSpec,
    fake: Arc<FakeConnector>,
    dir: &std::path::Path,
    options: &RunOptions,
) -> RunReport {
    run_as(db, spec, fake, dir, options, None).await
}

/// [`run_with`] as the operator of cluster `cluster` runs it (`None`: a local run).
async fn run_as(
    db: &TestDb,
    spec: &ReverseSyncSpec,
    fake: Arc<FakeConnector>,
    dir: &std::path::Path,
    options: &RunOptions,
    cluster: Option<&str>,
) -> RunReport {
    let job = SyncRun {
        namespace: "default",
        name: "customers",
        spec,
        source_url: &db.url,
        source_credentials: Default::default(),
        delivery: fast_delivery(fake, 3),
        scope: "default/fake".into(),
    };
    let file = Box::new(FileStore::new(dir, "default", "customers"));
    let mut store = migrate::choose(spec, "default", "customers", cluster, file, &db.url, None);
    run(job, store.as_mut(), options).await
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
    // A first fold packs the state into blocks.
    let stored: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM backflow.backflow_state) \
         + (SELECT COALESCE(sum(row_count), 0) FROM backflow.backflow_state_blocks)",
    )
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

/// Runs `first` (SQL) when given, then creates a PostgreSQL login `role` with only the rights
/// a DBA grants on the state tables (`SELECT, INSERT, UPDATE, DELETE`); returns the test
/// server's URL as that role.
async fn pg_dml_role(db: &TestDb, role: &str, first: Option<&str>) -> String {
    if let Some(first) = first {
        db.exec(first).await;
    }
    db.exec(&format!(
        "CREATE ROLE \"{role}\" LOGIN; GRANT USAGE ON SCHEMA backflow TO \"{role}\"; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA backflow TO \"{role}\""
    ))
    .await;
    let url = db
        .url
        .replacen("postgres://postgres@", &format!("postgres://{role}@"), 1);
    assert_ne!(url, db.url, "the test server URL has an unexpected form");
    url
}

#[tokio::test]
async fn a_state_user_who_may_not_create_temporary_tables_still_writes_whole_checkpoints() {
    let db = TestDb::postgres("whnotemp").await;
    // The tables exist (created by an administrator's run); the writer has the four rights on
    // them and no TEMP right on the database, so checkpoints go as array upserts.
    let mut admin = WarehouseStore::new(config(&db, "default/customers"));
    admin.load("s").await.unwrap();
    admin.end_run(&end(true)).await.unwrap();
    drop(admin);
    let role = format!("{}_notemp", db.name);
    let revoke = format!("REVOKE TEMPORARY ON DATABASE \"{}\" FROM PUBLIC", db.name);
    let url = pg_dml_role(&db, &role, Some(&revoke)).await;
    let mut c = PgConnection::connect(&url).await.unwrap();
    let may: bool = sqlx::query_scalar("SELECT has_database_privilege(current_database(), 'TEMPORARY')")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert!(!may, "the role should not have the TEMP right");
    drop(c);

    let writer = WarehouseConfig {
        url,
        ..config(&db, "default/customers")
    };
    let mut store = WarehouseStore::new(writer.clone());
    assert!(load_after_drop(&mut store, "s").await.is_empty());
    let first: Vec<StateChange> = (0..3000).map(|i| put(&format!("k{i}"), i, "{}")).collect();
    store.commit("s", &first).await.unwrap();
    store
        .commit(
            "s",
            &[
                put("k1", 99, "{\"id\":1}"),
                StateChange::Remove { key: "k2".into() },
            ],
        )
        .await
        .unwrap();
    store.end_run(&end(false)).await.unwrap();
    drop(store);

    let mut again = WarehouseStore::new(writer);
    let loaded = load_after_drop(&mut again, "s").await;
    assert_eq!(loaded.len(), 2999);
    let k1 = loaded.get(loaded.position("k1").unwrap()).unwrap();
    assert_eq!((k1.fingerprint, k1.identity), (99, "{\"id\":1}"));
    assert!(loaded.position("k2").is_none());
    again.end_run(&end(true)).await.unwrap();
    drop(again);
    drop(db);
    support::db::exec_admin_postgres(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;
}

/// An SQL condition, in a trigger on `backflow_checkpoints`, true when the packed row `NEW`
/// holds a change of `key`: its length (u32) then its bytes.
fn packed_holds(key: &str) -> String {
    let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
    format!("position('\\x{:08x}{hex}'::bytea in NEW.data) > 0", key.len())
}

/// Holds a checkpoint in the middle of its transaction: a trigger makes the append of `key`
/// wait for a lock that the blocker's own connection holds until [`Blocker::release`], so
/// what the checkpoint wrote is written but not committed. On PostgreSQL the trigger fires
/// once the packed row holding `key` is written to `backflow_checkpoints`; on MariaDB before
/// the journal row of `key` is.
enum Blocker {
    Pg(PgConnection),
    My(MySqlConnection, u64, String),
}

impl Blocker {
    async fn hold(db: &TestDb, key: &str) -> Blocker {
        let schema = schema(db);
        match db.server {
            Server::Postgres => {
                let mut c = PgConnection::connect(&db.url).await.unwrap();
                // Advisory locks are per database: no other test shares this one.
                sqlx::raw_sql(&format!(
                    "SELECT pg_advisory_lock(4242);
CREATE FUNCTION {schema}.hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF {holds} THEN PERFORM pg_advisory_xact_lock_shared(4242); END IF; RETURN NEW; END $$;
CREATE TRIGGER hold AFTER INSERT ON {schema}.backflow_checkpoints FOR EACH ROW EXECUTE FUNCTION {schema}.hold()",
                    holds = packed_holds(key)
                ))
                .execute(&mut c)
                .await
                .unwrap();
                Blocker::Pg(c)
            }
            Server::Mysql => {
                let mut c = MySqlConnection::connect(&db.url).await.unwrap();
                let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                    .fetch_one(&mut c)
                    .await
                    .unwrap();
                // Named locks are server-wide: the database's name keeps this one apart.
                let lock = format!("{}:hold", db.name);
                sqlx::query("SELECT GET_LOCK(?, 0)")
                    .bind(&lock)
                    .execute(&mut c)
                    .await
                    .unwrap();
                sqlx::raw_sql(&format!(
                    "CREATE TRIGGER `{schema}`.hold BEFORE INSERT ON `{schema}`.backflow_journal FOR EACH ROW \
                     BEGIN IF NEW.`key` = '{key}' THEN SET @held = GET_LOCK('{lock}', 60); END IF; END"
                ))
                .execute(&mut c)
                .await
                .unwrap();
                Blocker::My(c, id, schema)
            }
        }
    }

    /// The MariaDB connection id of the blocker, which the killer must spare.
    fn id(&self) -> u64 {
        match self {
            Blocker::Pg(_) => 0,
            Blocker::My(_, id, _) => *id,
        }
    }

    async fn release(self) {
        match self {
            Blocker::Pg(mut c) => sqlx::raw_sql(
                "SELECT pg_advisory_unlock(4242); DROP TRIGGER hold ON backflow.backflow_checkpoints",
            )
            .execute(&mut c)
            .await
            .map(drop),
            Blocker::My(mut c, _, schema) => sqlx::raw_sql(&format!(
                "SELECT RELEASE_ALL_LOCKS(); DROP TRIGGER `{schema}`.hold"
            ))
            .execute(&mut c)
            .await
            .map(drop),
        }
        .unwrap();
    }
}

/// Kills the state connection while it is in the middle of writing a checkpoint: on
/// PostgreSQL the `backflow-state` session of `db` whose transaction has written
/// (`backend_xid` set), on MariaDB the connection to `db` (other than `spare`) running an
/// insert into `backflow_journal`. Returns false when it found none within 30 seconds.
async fn kill_state_connection_mid_write(db: &TestDb, spare: u64) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    match db.server {
        Server::Postgres => {
            let mut admin = PgConnection::connect(&support::db::postgres_admin_url())
                .await
                .unwrap();
            while std::time::Instant::now() < deadline {
                let pid: Option<i32> = sqlx::query_scalar(
                    "SELECT pid FROM pg_stat_activity WHERE datname = $1 \
                     AND application_name = 'backflow-state' AND backend_xid IS NOT NULL",
                )
                .bind(&db.name)
                .fetch_optional(&mut admin)
                .await
                .unwrap();
                if let Some(pid) = pid {
                    return sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                        .bind(pid)
                        .fetch_one(&mut admin)
                        .await
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
        Server::Mysql => {
            let mut admin = MySqlConnection::connect(&support::db::mysql_admin_url())
                .await
                .unwrap();
            while std::time::Instant::now() < deadline {
                // INNODB_TRX does not always list a transaction waiting for a row lock on
                // MariaDB 10.11: look for the statement instead.
                let id: Option<u64> = sqlx::query_scalar(
                    "SELECT CAST(ID AS UNSIGNED) FROM information_schema.PROCESSLIST \
                     WHERE DB = ? AND ID <> ? AND INFO LIKE 'INSERT INTO%backflow_journal%'",
                )
                .bind(&db.name)
                .bind(spare)
                .fetch_optional(&mut admin)
                .await
                .unwrap();
                if let Some(id) = id {
                    sqlx::raw_sql(&format!("KILL CONNECTION {id}"))
                        .execute(&mut admin)
                        .await
                        .unwrap();
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    }
}

fn count_prefix(set: &Fingerprints, prefix: &str) -> usize {
    set.iter().filter(|e| e.key.starts_with(prefix)).count()
}

async fn killed_mid_checkpoint(db: TestDb, rows: u64) {
    let mut store = WarehouseStore::new(config(&db, "ns/crash"));
    store.load("s").await.unwrap();
    let earlier: Vec<StateChange> = (0..100).map(|i| put(&format!("old-{i}"), i, "{}")).collect();
    store.commit("s", &earlier).await.unwrap();
    let big: Vec<StateChange> = (0..rows)
        .map(|i| put(&format!("new-{i}"), i, &format!("{{\"id\":{i}}}")))
        .collect();

    // The checkpoint's last row waits for another transaction: the checkpoint is then
    // certainly in flight, its earlier rows written but not committed, when it is killed.
    let last_key = format!("new-{}", rows - 1);
    let blocker = Blocker::hold(&db, &last_key).await;
    let spare = blocker.id();
    let kill = async {
        let killed = kill_state_connection_mid_write(&db, spare).await;
        blocker.release().await;
        killed
    };
    let (result, killed) = tokio::join!(store.commit("s", &big), kill);
    assert!(
        killed,
        "the state connection was never seen writing the checkpoint: {result:?}"
    );
    assert!(result.is_err(), "a killed checkpoint reports a failure");
    drop(store);

    let mut again = WarehouseStore::new(config(&db, "ns/crash"));
    let loaded = load_after_drop(&mut again, "s").await;
    assert_eq!(count_prefix(&loaded, "old-"), 100, "earlier checkpoints stay");
    assert_eq!(
        count_prefix(&loaded, "new-"),
        0,
        "nothing of the killed checkpoint is kept"
    );
    assert!(loaded.position("blocker").is_none());

    // Writing the checkpoint again completes it.
    again.commit("s", &big).await.unwrap();
    again.end_run(&end(false)).await.unwrap();
    let mut last = WarehouseStore::new(config(&db, "ns/crash"));
    let loaded = last.load("s").await.unwrap();
    assert_eq!(
        (
            count_prefix(&loaded, "old-"),
            count_prefix(&loaded, "new-") as u64
        ),
        (100, rows)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_connection_is_killed_mid_commit_is_kept_whole_or_not_at_all_on_postgres() {
    killed_mid_checkpoint(TestDb::postgres("whkill").await, 50_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_connection_is_killed_mid_commit_is_kept_whole_or_not_at_all_on_mariadb() {
    killed_mid_checkpoint(TestDb::mysql("whkill").await, 5_000).await;
}

/// Keys of one sync in the state table.
async fn stored_keys(db: &TestDb, sync_id: &str) -> BTreeSet<String> {
    let mut store = WarehouseStore::new(config(db, sync_id));
    let set = load_after_drop(&mut store, "default/fake").await;
    store.end_run(&end(true)).await.unwrap();
    set.iter().map(|e| e.key.to_owned()).collect()
}

async fn failing_checkpoint(server: Server) {
    let db = customers(server, 5000).await;
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        "upsert",
        MODEL,
        &format!("{{store: Warehouse, schema: {}}}", schema(&db)),
    );
    // Create the tables, then make the checkpoint holding row 3500 fail midway: what it wrote
    // before in the same transaction (rows of the journal on MariaDB, packed rows of
    // backflow_checkpoints on PostgreSQL) is there when the trigger fires.
    let mut store = WarehouseStore::new(config(&db, "default/customers"));
    store.load("default/fake").await.unwrap();
    store.end_run(&end(true)).await.unwrap();
    drop(store);
    let schema = schema(&db);
    match server {
        Server::Postgres => {
            db.exec(&format!(
                "CREATE FUNCTION backflow.poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF {holds} THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
CREATE TRIGGER poison BEFORE INSERT ON backflow.backflow_checkpoints FOR EACH ROW EXECUTE FUNCTION backflow.poison()",
                holds = packed_holds("3500")
            ))
            .await
        }
        Server::Mysql => {
            db.exec(&format!(
                "CREATE TRIGGER `{schema}`.poison BEFORE INSERT ON `{schema}`.backflow_journal FOR EACH ROW \
                 BEGIN IF NEW.`key` = '3500' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END"
            ))
            .await
        }
    }
    let options = RunOptions {
        checkpoint_records: 2000,
        checkpoint_interval: Duration::from_secs(3600),
        ..RunOptions::default()
    };
    let report = run_with(&db, &s, Arc::new(FakeConnector::new(100)), dir.path(), &options).await;
    let err = report.error.expect("the failing checkpoint fails the run");
    assert_eq!(err.category(), "StateUnavailable", "{err}");
    assert!(err.to_string().contains("injected failure"), "{err}");

    let committed = stored_keys(&db, "default/customers").await;
    assert!(
        !committed.is_empty() && committed.len() % 2000 == 0 && !committed.contains("3500"),
        "whole checkpoints only: {} rows kept",
        committed.len()
    );

    match server {
        Server::Postgres => {
            db.exec("DROP TRIGGER poison ON backflow.backflow_checkpoints")
                .await
        }
        Server::Mysql => db.exec(&format!("DROP TRIGGER `{schema}`.poison")).await,
    }
    let fake = Arc::new(FakeConnector::new(100));
    let next = run_with(&db, &s, fake.clone(), dir.path(), &options).await;
    assert!(next.error.is_none(), "{:?}", next.error);
    assert_eq!(next.plan.unchanged as usize, committed.len());
    let mut sent = fake.sent_keys();
    sent.sort();
    let mut expected: Vec<String> = (1..=5000)
        .map(|i: u32| i.to_string())
        .filter(|k| !committed.contains(k))
        .collect();
    expected.sort();
    assert_eq!(sent, expected, "exactly the rows not committed are sent again");
    assert_eq!(stored_keys(&db, "default/customers").await.len(), 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_failing_midway_is_rolled_back_and_the_next_run_resends_exactly_the_rest_on_postgres() {
    failing_checkpoint(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_failing_midway_is_rolled_back_and_the_next_run_resends_exactly_the_rest_on_mariadb() {
    failing_checkpoint(Server::Mysql).await;
}

async fn concurrent_engine_runs(server: Server) {
    let db = customers(server, 1000).await;
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        "upsert",
        MODEL,
        &format!("{{store: Warehouse, schema: {}}}", schema(&db)),
    );
    let mut slow = FakeConnector::new(50);
    slow.delay = Duration::from_millis(60);
    let slow = Arc::new(slow);
    let first_done = AtomicBool::new(false);
    let first = async {
        let report = run_once(&db, &s, slow.clone(), dir.path()).await;
        first_done.store(true, Ordering::SeqCst);
        report
    };
    let second_fake = Arc::new(FakeConnector::new(50));
    let second = async {
        // The first run holds the lock from its load, before it sends anything.
        while slow.call_count() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = std::time::Instant::now();
        let report = run_once(&db, &s, second_fake.clone(), dir.path()).await;
        (report, started.elapsed(), first_done.load(Ordering::SeqCst))
    };
    let (first, (second, took, first_was_done)) = tokio::join!(first, second);
    let err = second.error.expect("the second run fails");
    assert_eq!(err.category(), "RunInProgress", "{err}");
    assert!(
        err.to_string()
            .contains("another run of this sync is in progress"),
        "{err}"
    );
    assert!(!first_was_done, "the second run failed while the first still ran");
    assert!(
        took < Duration::from_secs(3),
        "the second run failed fast: {took:?}"
    );
    assert_eq!(second_fake.call_count(), 0);
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.accepted, 1000);
    assert_eq!(stored_keys(&db, "default/customers").await.len(), 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_engine_run_fails_fast_with_run_in_progress_while_the_first_completes_on_postgres()
 {
    concurrent_engine_runs(Server::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_concurrent_engine_run_fails_fast_with_run_in_progress_while_the_first_completes_on_mariadb()
{
    concurrent_engine_runs(Server::Mysql).await;
}

#[tokio::test]
async fn clusters_sharing_a_warehouse_keep_their_state_apart_and_the_first_adopts_unnamed_rows() {
    let db = customers(Server::Postgres, 50).await;
    let s = spec(
        "upsert",
        MODEL,
        &format!("{{store: Warehouse, schema: {}}}", schema(&db)),
    );
    let run = |cluster: Option<&'static str>| {
        let (db, s) = (&db, &s);
        async move {
            let dir = tempfile::tempdir().unwrap();
            let fake = Arc::new(FakeConnector::new(100));
            let report = run_as(db, s, fake.clone(), dir.path(), &RunOptions::default(), cluster).await;
            assert!(report.error.is_none(), "{:?}", report.error);
            fake.sent_keys().len()
        }
    };
    // Written before the cluster had a name (or by a local run): `default/customers`.
    assert_eq!(run(None).await, 50);
    // Cluster A adopts those rows: nothing is sent again, and its own rows now exist.
    assert_eq!(run(Some("cluster-a")).await, 0);
    assert_eq!(run(Some("cluster-a")).await, 0);
    db.exec("UPDATE customers SET plan = 'pro' WHERE id <= 5").await;
    assert_eq!(run(Some("cluster-a")).await, 5);
    // Cluster B has state of its own: the unnamed rows moved to A, so B starts empty.
    assert_eq!(run(Some("cluster-b")).await, 50);
    assert_eq!(run(Some("cluster-b")).await, 0);
    assert_eq!(run(Some("cluster-a")).await, 0, "B's runs left A's state alone");
    let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let ids: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT sync_id FROM {}.backflow_syncs ORDER BY sync_id",
        schema(&db)
    ))
    .fetch_all(&mut c)
    .await
    .unwrap();
    assert_eq!(
        ids,
        ["cluster-a/default/customers", "cluster-b/default/customers"]
    );
}

/// Rows of `sync_id` in one of the state tables (`None`: the table does not exist).
async fn rows_in(db: &TestDb, table: &str, sync_id: &str) -> Option<i64> {
    let schema = schema(db);
    match db.server {
        Server::Postgres => support::db::pg_sync_rows(&db.url, &schema, table, sync_id).await,
        Server::Mysql => {
            let mut c = MySqlConnection::connect(&db.url).await.unwrap();
            let exists: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            )
            .bind(&schema)
            .bind(table)
            .fetch_one(&mut c)
            .await
            .unwrap();
            if exists == 0 {
                return None;
            }
            let sql = format!("SELECT count(*) FROM `{schema}`.`{table}` WHERE sync_id = ?");
            Some(
                sqlx::query_scalar(&sql)
                    .bind(sync_id)
                    .fetch_one(&mut c)
                    .await
                    .unwrap(),
            )
        }
    }
}

fn hash(key: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

async fn crash_before_the_fold(db: TestDb) {
    let mut store = WarehouseStore::new(config(&db, "ns/j"));
    store.load("s").await.unwrap();
    store
        .commit(
            "s",
            &[
                put("k1", 1, "{\"id\":1}"),
                put("k2", 2, "{\"id\":2}"),
                put("k3", 3, "{\"id\":3}"),
            ],
        )
        .await
        .unwrap();
    store
        .commit(
            "s",
            &[
                put("k1", 10, "{\"id\":1}"),
                StateChange::Remove { key: "k2".into() },
            ],
        )
        .await
        .unwrap();
    // A crash between the checkpoints and the fold: no finish, no end_run.
    drop(store);
    assert_eq!(rows_in(&db, "backflow_journal", "ns/j").await, Some(5));
    assert_eq!(rows_in(&db, "backflow_state", "ns/j").await, Some(0));

    // The next run's diff sees both checkpoints: k1 at 10, k2 gone, k3 stored.
    let mut next = WarehouseStore::new(config(&db, "ns/j"));
    let diff = loop {
        match next.store_diff().unwrap().begin("s").await {
            Err(StateError::Locked(_)) => tokio::time::sleep(Duration::from_millis(40)).await,
            other => break other.unwrap(),
        }
    };
    assert!(diff, "the store diffs on its own");
    assert_eq!(rows_in(&db, "backflow_journal", "ns/j").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/j").await, Some(2));
    let d = next.store_diff().unwrap();
    assert!(d.holds_state("s"));
    d.stage(&[(hash("k1"), 10), (hash("k4"), 4)]).await.unwrap();
    let found = d.diff("s", false).await.unwrap();
    assert_eq!(
        found.change(hash("k1")),
        None,
        "k1 is stored at its last fingerprint"
    );
    assert_eq!(found.change(hash("k4")), Some(true));
    let removed: Vec<(String, String)> = found.removed.iter().map(Result::unwrap).collect();
    assert_eq!(removed, vec![("k3".to_owned(), "{\"id\":3}".to_owned())]);
    assert_eq!(found.removed_rows, 1);
    next.end_run(&end(true)).await.unwrap();
    drop(next);

    // And so does load, after another crash.
    let mut again = WarehouseStore::new(config(&db, "ns/j"));
    load_after_drop(&mut again, "s").await;
    again.commit("s", &[put("k5", 5, "{}")]).await.unwrap();
    drop(again);
    let mut last = WarehouseStore::new(config(&db, "ns/j"));
    assert_eq!(
        entries(&load_after_drop(&mut last, "s").await),
        vec![
            ("k1".to_owned(), 10, "{\"id\":1}".to_owned()),
            ("k3".to_owned(), 3, "{\"id\":3}".to_owned()),
            ("k5".to_owned(), 5, "{}".to_owned()),
        ]
    );
    assert_eq!(rows_in(&db, "backflow_journal", "ns/j").await, Some(0));

    // Deleting the sync's state takes its journal rows too.
    last.commit("s", &[put("k6", 6, "{}")]).await.unwrap();
    drop(last);
    assert_eq!(rows_in(&db, "backflow_journal", "ns/j").await, Some(1));
    let deleted = backflow::state::warehouse::delete_sync_state(&config(&db, "ns/j"))
        .await
        .unwrap();
    assert_eq!(deleted, 3);
    assert_eq!(rows_in(&db, "backflow_journal", "ns/j").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/j").await, Some(0));
}

#[tokio::test]
async fn checkpoints_journaled_before_a_crash_are_folded_before_the_next_diff_or_load_on_postgres() {
    crash_before_the_fold(TestDb::postgres("whjcrash").await).await;
}

#[tokio::test]
async fn checkpoints_journaled_before_a_crash_are_folded_before_the_next_diff_or_load_on_mariadb() {
    crash_before_the_fold(TestDb::mysql("whjcrash").await).await;
}

async fn fold_order(db: TestDb) {
    let mut store = WarehouseStore::new(config(&db, "ns/o"));
    store.load("s").await.unwrap();
    store
        .commit(
            "s",
            &[put("kept", 1, "{}"), put("gone", 1, "{}"), put("back", 1, "{}")],
        )
        .await
        .unwrap();
    store.commit("s", &[put("twice", 1, "{}")]).await.unwrap();
    store
        .commit("s", &[put("twice", 2, "{\"v\":2}"), put("dropped", 1, "{}")])
        .await
        .unwrap();
    store
        .commit(
            "s",
            &[StateChange::Remove {
                key: "dropped".into(),
            }],
        )
        .await
        .unwrap();
    store.finish("s").await.unwrap();
    // The first fold, into a state without rows, inserts the last put of each key (the
    // load below finds "twice" at its second put and no "dropped").
    assert_eq!(rows_in(&db, "backflow_state", "ns/o").await, Some(4));
    // One checkpoint each: the journal holds every change, the fold keeps the last.
    store.commit("s", &[put("kept", 2, "{\"v\":2}")]).await.unwrap();
    store.commit("s", &[put("kept", 3, "{\"v\":3}")]).await.unwrap();
    store.commit("s", &[put("new", 1, "{}")]).await.unwrap();
    store
        .commit("s", &[StateChange::Remove { key: "new".into() }])
        .await
        .unwrap();
    store
        .commit("s", &[StateChange::Remove { key: "gone".into() }])
        .await
        .unwrap();
    store
        .commit("s", &[StateChange::Remove { key: "back".into() }])
        .await
        .unwrap();
    store.commit("s", &[put("back", 4, "{\"v\":4}")]).await.unwrap();
    assert_eq!(rows_in(&db, "backflow_journal", "ns/o").await, Some(7));
    store.finish("s").await.unwrap();
    assert_eq!(rows_in(&db, "backflow_journal", "ns/o").await, Some(0));
    store.end_run(&end(false)).await.unwrap();
    let mut again = WarehouseStore::new(config(&db, "ns/o"));
    assert_eq!(
        entries(&load_after_drop(&mut again, "s").await),
        vec![
            ("back".to_owned(), 4, "{\"v\":4}".to_owned()),
            ("kept".to_owned(), 3, "{\"v\":3}".to_owned()),
            ("twice".to_owned(), 2, "{\"v\":2}".to_owned()),
        ]
    );
    again.end_run(&end(true)).await.unwrap();
    drop(again);

    // The order is seq's, not the order rows lie in the table: a later seq written first
    // still wins.
    let (schema, h) = (schema(&db), hash("late").to_be_bytes().to_vec());
    match db.server {
        Server::Postgres => {
            let mut c = PgConnection::connect(&db.url).await.unwrap();
            for (seq, fp) in [(1_000_000i64, 7i64), (999_999, 6)] {
                sqlx::query(&format!(
                    "INSERT INTO {schema}.backflow_journal (sync_id, seq, key_hash, key, fingerprint, identity, removed) \
                     OVERRIDING SYSTEM VALUE VALUES ('ns/o', $1, $2, 'late', $3, '{{}}', false)"
                ))
                .bind(seq)
                .bind(&h)
                .bind(fp)
                .execute(&mut c)
                .await
                .unwrap();
            }
        }
        Server::Mysql => {
            let mut c = MySqlConnection::connect(&db.url).await.unwrap();
            for (seq, fp) in [(1_000_000i64, 7i64), (999_999, 6)] {
                sqlx::query(&format!(
                    "INSERT INTO `{schema}`.backflow_journal (sync_id, seq, key_hash, `key`, fingerprint, identity, removed) \
                     VALUES ('ns/o', ?, ?, 'late', ?, '{{}}', false)"
                ))
                .bind(seq)
                .bind(&h)
                .bind(fp)
                .execute(&mut c)
                .await
                .unwrap();
            }
        }
    }
    let mut last = WarehouseStore::new(config(&db, "ns/o"));
    let loaded = load_after_drop(&mut last, "s").await;
    let late = loaded.get(loaded.position("late").unwrap()).unwrap();
    assert_eq!(late.fingerprint, 7);
    assert_eq!(loaded.len(), 4);
}

#[tokio::test]
async fn the_fold_keeps_the_last_change_of_each_key_and_a_put_then_remove_folds_to_absent_on_postgres() {
    fold_order(TestDb::postgres("whjorder").await).await;
}

#[tokio::test]
async fn the_fold_keeps_the_last_change_of_each_key_and_a_put_then_remove_folds_to_absent_on_mariadb() {
    fold_order(TestDb::mysql("whjorder").await).await;
}

/// The file PostgreSQL keeps the packed checkpoints in: `TRUNCATE` gives the table a new one,
/// a `DELETE` keeps it.
async fn checkpoints_file(db: &TestDb) -> i64 {
    let mut c = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar("SELECT pg_relation_filenode('backflow.backflow_checkpoints')::bigint")
        .fetch_one(&mut c)
        .await
        .unwrap()
}

/// One run of `config`'s sync that journals `keys` new keys and folds them.
async fn journal_and_fold(config: WarehouseConfig, keys: u64) {
    let mut store = WarehouseStore::new(config);
    load_after_drop(&mut store, "s").await;
    let puts: Vec<StateChange> = (0..keys).map(|i| put(&format!("k{i}"), i, "{}")).collect();
    store.commit("s", &puts).await.unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(20), store.finish("s")).await;
    finished
        .expect("the fold never waits on another session")
        .unwrap();
    store.end_run(&end(true)).await.unwrap();
}

#[tokio::test]
async fn the_fold_truncates_the_checkpoints_only_when_it_holds_nothing_else_the_user_may_and_no_one_else_uses_it()
 {
    let db = TestDb::postgres("whjtrunc").await;

    // Alone in the table: truncated, and the state holds every key.
    journal_and_fold(config(&db, "ns/a"), 300).await;
    let first = checkpoints_file(&db).await;
    journal_and_fold(config(&db, "ns/a"), 400).await;
    assert_ne!(
        checkpoints_file(&db).await,
        first,
        "the checkpoints were truncated"
    );
    assert_eq!(rows_in(&db, "backflow_journal", "ns/a").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/a").await, Some(400));

    // Another sync's rows, left by its interrupted run, are kept: this sync's rows are deleted.
    let mut other = WarehouseStore::new(config(&db, "ns/other"));
    load_after_drop(&mut other, "s").await;
    other.commit("s", &[put("o1", 1, "{}")]).await.unwrap();
    drop(other);
    let before = checkpoints_file(&db).await;
    journal_and_fold(config(&db, "ns/b"), 200).await;
    assert_eq!(
        checkpoints_file(&db).await,
        before,
        "the checkpoints were not truncated"
    );
    assert_eq!(rows_in(&db, "backflow_journal", "ns/other").await, Some(1));
    assert_eq!(rows_in(&db, "backflow_journal", "ns/b").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/b").await, Some(200));
    // Its next run folds them, and then the table is its alone again.
    let mut other = WarehouseStore::new(config(&db, "ns/other"));
    load_after_drop(&mut other, "s").await;
    drop(other);
    assert_eq!(rows_in(&db, "backflow_journal", "ns/other").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/other").await, Some(1));

    // Another session's open transaction on the table (a checkpoint being written): the fold
    // waits a moment for the lock, then deletes its rows instead.
    let mut writer = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut writer).await.unwrap();
    sqlx::query(
        "INSERT INTO backflow.backflow_checkpoints (sync_id, changes, data) VALUES ('ns/busy', 1, '')",
    )
    .execute(&mut writer)
    .await
    .unwrap();
    let before = checkpoints_file(&db).await;
    journal_and_fold(config(&db, "ns/c"), 200).await;
    assert_eq!(
        checkpoints_file(&db).await,
        before,
        "the checkpoints were not truncated"
    );
    assert_eq!(rows_in(&db, "backflow_journal", "ns/c").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/c").await, Some(200));
    sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    assert_eq!(rows_in(&db, "backflow_journal", "ns/busy").await, Some(1));
    sqlx::query("DELETE FROM backflow.backflow_checkpoints WHERE sync_id = 'ns/busy'")
        .execute(&mut writer)
        .await
        .unwrap();
    drop(writer);

    // Another sync's fold: it read the table and asks for its exclusive lock while this fold
    // reads it. When this fold then asks too, the server fails its request at once (a
    // deadlock), and the fold still completes.
    let mut rival = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut rival).await.unwrap();
    sqlx::query("SELECT count(*) FROM backflow.backflow_checkpoints")
        .execute(&mut rival)
        .await
        .unwrap();
    let mut store = WarehouseStore::new(config(&db, "ns/e"));
    load_after_drop(&mut store, "s").await;
    // Enough changes that the fold holds its lock on the table for a while.
    let puts: Vec<StateChange> = (0..100_000).map(|i| put(&format!("k{i}"), i, "{}")).collect();
    store.commit("s", &puts).await.unwrap();
    let fold = tokio::spawn(async move {
        let finished = store.finish("s").await;
        store.end_run(&end(true)).await.unwrap();
        finished
    });
    let mut reading = false;
    for _ in 0..500 {
        reading = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE relation = 'backflow.backflow_checkpoints'::regclass \
             AND mode = 'AccessShareLock' AND granted AND pid <> pg_backend_pid())",
        )
        .fetch_one(&mut rival)
        .await
        .unwrap();
        if reading {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(reading, "the fold read the checkpoints");
    sqlx::query("LOCK TABLE backflow.backflow_checkpoints IN ACCESS EXCLUSIVE MODE")
        .execute(&mut rival)
        .await
        .unwrap();
    sqlx::query("ROLLBACK").execute(&mut rival).await.unwrap();
    let finished = tokio::time::timeout(Duration::from_secs(60), fold).await;
    finished.expect("the fold never waits long").unwrap().unwrap();
    assert_eq!(rows_in(&db, "backflow_journal", "ns/e").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/e").await, Some(100_000));
    drop(rival);

    // A state user with only the four rights of a DBA's grant may not truncate: deleted.
    let role = format!("{}_dml", db.name);
    let url = pg_dml_role(&db, &role, None).await;
    let before = checkpoints_file(&db).await;
    journal_and_fold(
        WarehouseConfig {
            url,
            ..config(&db, "ns/d")
        },
        200,
    )
    .await;
    assert_eq!(
        checkpoints_file(&db).await,
        before,
        "the checkpoints were not truncated"
    );
    assert_eq!(rows_in(&db, "backflow_journal", "ns/d").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/d").await, Some(200));
    drop(db);
    support::db::exec_admin_postgres(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;
}

/// Tables of an older release: all but the journal, created by an administrator; the state
/// user has `SELECT, INSERT, UPDATE, DELETE` and may not create tables.
async fn without_journal(db: TestDb) {
    let mut admin = WarehouseStore::new(config(&db, "ns/old"));
    admin.load("s").await.unwrap();
    admin.end_run(&end(true)).await.unwrap();
    drop(admin);
    let user = format!("{}_dml", db.name);
    let schema = schema(&db);
    let url = match db.server {
        Server::Postgres => pg_dml_role(&db, &user, Some("DROP TABLE backflow.backflow_journal")).await,
        Server::Mysql => {
            db.exec(&format!(
                "DROP TABLE `{schema}`.backflow_journal; CREATE USER '{user}'@'%'; \
                 GRANT SELECT, INSERT, UPDATE, DELETE ON `{schema}`.* TO '{user}'@'%'"
            ))
            .await;
            db.url.replacen("mysql://root@", &format!("mysql://{user}@"), 1)
        }
    };
    assert_ne!(url, db.url, "the test server URL has an unexpected form");
    let writer = WarehouseConfig {
        url,
        ..config(&db, "ns/old")
    };
    let mut store = WarehouseStore::new(writer.clone());
    assert!(load_after_drop(&mut store, "s").await.is_empty());
    let first: Vec<StateChange> = (0..1500).map(|i| put(&format!("k{i}"), i, "{}")).collect();
    store.commit("s", &first).await.unwrap();
    // Written straight into backflow_state, checkpoint by checkpoint: no finish needed.
    assert_eq!(rows_in(&db, "backflow_state", "ns/old").await, Some(1500));
    store
        .commit(
            "s",
            &[
                put("k1", 99, "{\"id\":1}"),
                StateChange::Remove { key: "k2".into() },
            ],
        )
        .await
        .unwrap();
    store.finish("s").await.unwrap();
    store.end_run(&end(false)).await.unwrap();
    drop(store);
    assert_eq!(
        rows_in(&db, "backflow_journal", "ns/old").await,
        None,
        "nothing was created"
    );

    let mut again = WarehouseStore::new(writer);
    let loaded = load_after_drop(&mut again, "s").await;
    assert_eq!(loaded.len(), 1499);
    let k1 = loaded.get(loaded.position("k1").unwrap()).unwrap();
    assert_eq!((k1.fingerprint, k1.identity), (99, "{\"id\":1}"));
    assert!(loaded.position("k2").is_none());
    again.end_run(&end(true)).await.unwrap();
    drop(again);
    match db.server {
        Server::Postgres => {
            drop(db);
            support::db::exec_admin_postgres(&format!("DROP ROLE IF EXISTS \"{user}\"")).await;
        }
        Server::Mysql => db.exec(&format!("DROP USER IF EXISTS '{user}'@'%'")).await,
    }
}

#[tokio::test]
async fn tables_without_the_journal_and_no_right_to_create_it_keep_the_direct_upserts_on_postgres() {
    without_journal(TestDb::postgres("whjold").await).await;
}

#[tokio::test]
async fn tables_without_the_journal_and_no_right_to_create_it_keep_the_direct_upserts_on_mariadb() {
    without_journal(TestDb::mysql("whjold").await).await;
}

/// The fingerprint stored in `backflow_state` for `key` of `sync_id`, read with SQL.
async fn stored_fingerprint(db: &TestDb, sync_id: &str, key: &str) -> Option<i64> {
    let (schema, h) = (schema(db), hash(key).to_be_bytes().to_vec());
    match db.server {
        Server::Postgres => {
            let mut c = PgConnection::connect(&db.url).await.unwrap();
            // A row of backflow_state, or a row of a block: its count, then the key hashes
            // (16 bytes each), then the fingerprints (8 bytes each).
            let sql = format!(
                "SELECT fingerprint FROM {schema}.backflow_state WHERE sync_id = $1 AND key_hash = $2 \
                 UNION ALL \
                 SELECT ('x' || encode(substring(data from 5 + row_count * 16 + 8 * i for 8), 'hex'))::bit(64)::bigint \
                 FROM {schema}.backflow_state_blocks, generate_series(0, row_count - 1) AS i \
                 WHERE sync_id = $1 AND substring(data from 5 + 16 * i for 16) = $2"
            );
            sqlx::query_scalar(&sql)
                .bind(sync_id)
                .bind(h)
                .fetch_optional(&mut c)
                .await
                .unwrap()
        }
        Server::Mysql => {
            let mut c = MySqlConnection::connect(&db.url).await.unwrap();
            let sql = format!(
                "SELECT fingerprint FROM `{schema}`.backflow_state WHERE sync_id = ? AND key_hash = ?"
            );
            sqlx::query_scalar(&sql)
                .bind(sync_id)
                .bind(h)
                .fetch_optional(&mut c)
                .await
                .unwrap()
        }
    }
}

async fn failing_fold(db: TestDb) {
    let mut store = WarehouseStore::new(config(&db, "ns/f"));
    store.load("s").await.unwrap();
    let first: Vec<StateChange> = (0..1000).map(|i| put(&format!("f{i}"), i, "{}")).collect();
    store.commit("s", &first).await.unwrap();
    store.finish("s").await.unwrap();
    let mut second: Vec<StateChange> = (0..1000).map(|i| put(&format!("g{i}"), i, "{}")).collect();
    second.push(put("f0", 77, "{}"));
    second.push(StateChange::Remove { key: "f1".into() });
    store.commit("s", &second).await.unwrap();

    // The fold fails midway: on MariaDB its insert at g500, after the remove of f1 and the
    // rows before g500; on PostgreSQL, where the state is blocks, the write of the new blocks,
    // after the rewritten ones were deleted.
    let schema = schema(&db);
    match db.server {
        Server::Postgres => {
            db.exec(
                "CREATE FUNCTION backflow.poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'injected failure'; END $$;
CREATE TRIGGER poison BEFORE INSERT ON backflow.backflow_state_blocks FOR EACH ROW EXECUTE FUNCTION backflow.poison()",
            )
            .await
        }
        Server::Mysql => {
            db.exec(&format!(
                "CREATE TRIGGER `{schema}`.poison BEFORE INSERT ON `{schema}`.backflow_state FOR EACH ROW \
                 BEGIN IF NEW.`key` = 'g500' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END"
            ))
            .await
        }
    }
    let err = store.finish("s").await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    // Nothing of the fold applied; the checkpoint is still whole in the journal.
    assert_eq!(rows_in(&db, "backflow_state", "ns/f").await, Some(1000));
    assert_eq!(stored_fingerprint(&db, "ns/f", "f0").await, Some(0));
    assert_eq!(stored_fingerprint(&db, "ns/f", "f1").await, Some(1));
    assert_eq!(stored_fingerprint(&db, "ns/f", "g0").await, None);
    assert_eq!(rows_in(&db, "backflow_journal", "ns/f").await, Some(1002));
    store.end_run(&end(false)).await.unwrap();
    drop(store);

    match db.server {
        Server::Postgres => {
            db.exec("DROP TRIGGER poison ON backflow.backflow_state_blocks")
                .await
        }
        Server::Mysql => db.exec(&format!("DROP TRIGGER `{schema}`.poison")).await,
    }
    let mut next = WarehouseStore::new(config(&db, "ns/f"));
    let loaded = load_after_drop(&mut next, "s").await;
    assert_eq!(loaded.len(), 1999);
    assert!(loaded.position("f1").is_none());
    assert_eq!(
        loaded.get(loaded.position("f0").unwrap()).unwrap().fingerprint,
        77
    );
    assert_eq!(
        loaded.get(loaded.position("g999").unwrap()).unwrap().fingerprint,
        999
    );
    assert_eq!(rows_in(&db, "backflow_journal", "ns/f").await, Some(0));
}

#[tokio::test]
async fn a_fold_failing_midway_applies_nothing_and_the_next_run_folds_it_whole_on_postgres() {
    failing_fold(TestDb::postgres("whjfold").await).await;
}

#[tokio::test]
async fn a_fold_failing_midway_applies_nothing_and_the_next_run_folds_it_whole_on_mariadb() {
    failing_fold(TestDb::mysql("whjfold").await).await;
}

/// Rows of `backflow_state` and blocks (with the rows they hold) of `sync_id`, on PostgreSQL.
async fn rows_and_blocks(db: &TestDb, sync_id: &str) -> (i64, Vec<i32>) {
    let mut c = PgConnection::connect(&db.url).await.unwrap();
    let rows = sqlx::query_scalar("SELECT count(*) FROM backflow.backflow_state WHERE sync_id = $1")
        .bind(sync_id)
        .fetch_one(&mut c)
        .await
        .unwrap();
    let blocks = sqlx::query_scalar(
        "SELECT row_count FROM backflow.backflow_state_blocks WHERE sync_id = $1 ORDER BY first_hash",
    )
    .bind(sync_id)
    .fetch_all(&mut c)
    .await
    .unwrap();
    (rows, blocks)
}

/// A key whose hash is below every key's of `keys`.
fn key_below(keys: &Expected) -> String {
    let lowest = keys.keys().map(|k| hash(k)).min().unwrap();
    (0..)
        .map(|i| format!("low{i}"))
        .find(|k| hash(k) < lowest)
        .unwrap()
}

/// The sync's blocks hold their keys in order: each block's first hash is its first row's,
/// and its rows lie below the next block's first hash (read with SQL from the layout).
async fn blocks_are_in_order(db: &TestDb, sync_id: &str) -> bool {
    let mut c = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar(
        "WITH b AS (SELECT first_hash, row_count, data, \
                           lead(first_hash) OVER (ORDER BY first_hash) AS next_hash \
                    FROM backflow.backflow_state_blocks WHERE sync_id = $1), \
              r AS (SELECT b.*, i, substring(data from 5 + 16 * i for 16) AS h \
                    FROM b, generate_series(0, row_count - 1) AS i) \
         SELECT bool_and((i > 0 OR h = first_hash) AND h >= first_hash \
                         AND (next_hash IS NULL OR h < next_hash) AND row_count BETWEEN 1 AND 32) FROM r",
    )
    .bind(sync_id)
    .fetch_one(&mut c)
    .await
    .unwrap()
}

/// Expected state: key to fingerprint and identity.
type Expected = std::collections::BTreeMap<String, (u64, String)>;

/// One run of `sync_id` in `scope` that commits `checkpoints` and folds them, as the state
/// user of `url`.
async fn run_checkpoints(url: &str, sync_id: &str, scope: &str, checkpoints: &[Vec<StateChange>]) {
    let mut store = WarehouseStore::new(as_user(url, sync_id));
    load_after_drop(&mut store, scope).await;
    for checkpoint in checkpoints {
        store.commit(scope, checkpoint).await.unwrap();
    }
    store.finish(scope).await.unwrap();
    store.end_run(&end(false)).await.unwrap();
}

/// The store's configuration of `sync_id` for the state user of `url`.
fn as_user(url: &str, sync_id: &str) -> WarehouseConfig {
    WarehouseConfig {
        url: url.to_owned(),
        schema: "backflow".into(),
        sync_id: sync_id.into(),
        sync_logs: false,
    }
}

/// The sync's state is `expected`, all of it in blocks that hold their keys in order, as the
/// state user of `url` loads it.
async fn state_in_blocks_is(db: &TestDb, url: &str, sync_id: &str, expected: &Expected) {
    let (rows, blocks) = rows_and_blocks(db, sync_id).await;
    assert_eq!(rows, 0, "the state is in blocks, not rows");
    let in_blocks: i64 = blocks.iter().map(|&n| i64::from(n)).sum();
    assert_eq!(in_blocks, expected.len() as i64);
    assert!(blocks_are_in_order(db, sync_id).await);
    let mut store = WarehouseStore::new(as_user(url, sync_id));
    let loaded = entries(&load_after_drop(&mut store, "s").await);
    let want: Vec<(String, u64, String)> = expected
        .iter()
        .map(|(k, (f, i))| (k.clone(), *f, i.clone()))
        .collect();
    assert_eq!(loaded, want);
}

#[tokio::test]
async fn a_state_is_kept_in_blocks_through_adds_changes_removes_and_a_new_scope_on_postgres() {
    let db = TestDb::postgres("whblocks").await;
    kept_in_blocks(&db, &db.url.clone(), "backflow_checkpoints").await;
}

#[tokio::test]
async fn without_the_packed_checkpoints_table_a_state_in_blocks_is_written_through_the_journal() {
    let db = TestDb::postgres("whblkjrn").await;
    // The tables, made by an administrator's run, but for backflow_checkpoints, which the
    // state user may not create: its checkpoints go to the journal's rows.
    journal_and_fold(config(&db, "ns/other"), 10).await;
    let role = format!("{}_dml", db.name);
    let url = pg_dml_role(&db, &role, Some("DROP TABLE backflow.backflow_checkpoints")).await;
    kept_in_blocks(&db, &url, "backflow_journal").await;
    let packed = sqlx::query_scalar::<_, bool>("SELECT to_regclass('backflow.backflow_checkpoints') IS NULL")
        .fetch_one(&mut PgConnection::connect(&db.url).await.unwrap())
        .await
        .unwrap();
    assert!(packed, "the state user did not create backflow_checkpoints");
    drop(db);
    support::db::exec_admin_postgres(&format!("DROP ROLE IF EXISTS \"{role}\"")).await;
}

/// Rows of `sync_id` in `table` on PostgreSQL (none when the table is missing).
async fn pg_rows(db: &TestDb, table: &str, sync_id: &str) -> i64 {
    let mut c = PgConnection::connect(&db.url).await.unwrap();
    let missing: bool = sqlx::query_scalar(&format!("SELECT to_regclass('backflow.{table}') IS NULL"))
        .fetch_one(&mut c)
        .await
        .unwrap();
    if missing {
        return 0;
    }
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM backflow.{table} WHERE sync_id = $1"
    ))
    .bind(sync_id)
    .fetch_one(&mut c)
    .await
    .unwrap()
}

/// A state kept in blocks through four runs and a new scope, written by the state user of
/// `url`, its checkpoints appended to `appended` (`backflow_checkpoints` or
/// `backflow_journal`).
async fn kept_in_blocks(db: &TestDb, url: &str, appended: &str) {
    let mut expected = Expected::new();
    let first: Vec<Vec<StateChange>> = (0..2000u64)
        .collect::<Vec<_>>()
        .chunks(700)
        .map(|chunk| {
            chunk
                .iter()
                .map(|&i| put(&format!("k{i}"), i, &format!("{{\"n\":{i}}}")))
                .collect()
        })
        .collect();
    for i in 0..2000u64 {
        expected.insert(format!("k{i}"), (i, format!("{{\"n\":{i}}}")));
    }
    // Another sync's first checkpoint, then a crash: the checkpoint waits in the table it
    // went to, and the next run folds it into blocks before anything else.
    let mut crashed = WarehouseStore::new(as_user(url, "ns/crashed"));
    load_after_drop(&mut crashed, "s").await;
    crashed.commit("s", &first[0]).await.unwrap();
    drop(crashed);
    let other = ["backflow_checkpoints", "backflow_journal"]
        .into_iter()
        .find(|t| *t != appended)
        .unwrap();
    assert_eq!(
        pg_rows(db, other, "ns/crashed").await,
        0,
        "nothing went to {other}"
    );
    assert!(
        pg_rows(db, appended, "ns/crashed").await > 0,
        "the checkpoint went to {appended}"
    );
    run_checkpoints(url, "ns/crashed", "s", &[]).await;
    assert_eq!(pg_rows(db, appended, "ns/crashed").await, 0);
    let in_first: Expected = expected
        .iter()
        .filter(|(k, _)| {
            first[0]
                .iter()
                .any(|c| matches!(c, StateChange::Put { key, .. } if key == *k))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(in_first.len(), 700);
    state_in_blocks_is(db, url, "ns/crashed", &in_first).await;
    run_checkpoints(url, "ns/b", "s", &first).await;
    assert_eq!(rows_and_blocks(db, "ns/b").await.1.len(), 63);
    state_in_blocks_is(db, url, "ns/b", &expected).await;

    // A second run: every third key removed, every fifth changed, 700 new keys, a key changed
    // in two checkpoints (the last wins), a key removed then put back, and a key below every
    // block's first hash (it joins the first block). Its blocks are looked up by key.
    let mut early = Vec::new();
    for i in 0..2000u64 {
        let key = format!("k{i}");
        if i % 3 == 0 {
            early.push(StateChange::Remove { key: key.clone() });
            expected.remove(&key);
        } else if i % 5 == 0 {
            early.push(put(&key, i + 1_000_000, "{}"));
            expected.insert(key, (i + 1_000_000, "{}".into()));
        }
    }
    early.push(put("k1", 7, "{\"early\":1}"));
    let mut late: Vec<StateChange> = (0..700u64)
        .map(|i| put(&format!("new{i}"), i, "{\"new\":true}"))
        .collect();
    for i in 0..700u64 {
        expected.insert(format!("new{i}"), (i, "{\"new\":true}".into()));
    }
    late.push(put("k1", 8, "{\"late\":1}"));
    expected.insert("k1".into(), (8, "{\"late\":1}".into()));
    let low = key_below(&expected);
    late.push(put(&low, 5, "{}"));
    expected.insert(low, (5, "{}".into()));
    late.push(put("k3", 33, "{}"));
    expected.insert("k3".into(), (33, "{}".into()));
    run_checkpoints(url, "ns/b", "s", &[early, late]).await;
    state_in_blocks_is(db, url, "ns/b", &expected).await;
    assert_eq!(stored_fingerprint(db, "ns/b", "k1").await, Some(8));
    assert_eq!(stored_fingerprint(db, "ns/b", "k3").await, Some(33));
    assert_eq!(stored_fingerprint(db, "ns/b", "k6").await, None);

    // A third run with more changes than the fold looks up by key: it reads every block.
    let mut third: Vec<StateChange> = (0..10_500u64)
        .map(|i| put(&format!("more{i}"), i, "{}"))
        .collect();
    for i in 0..10_500u64 {
        expected.insert(format!("more{i}"), (i, "{}".into()));
    }
    for i in (1..2000u64).filter(|i| i % 3 != 0 && i % 7 == 0) {
        third.push(StateChange::Remove { key: format!("k{i}") });
        expected.remove(&format!("k{i}"));
    }
    let low = key_below(&expected);
    third.push(put(&low, 6, "{}"));
    expected.insert(low, (6, "{}".into()));
    run_checkpoints(url, "ns/b", "s", &[third]).await;
    state_in_blocks_is(db, url, "ns/b", &expected).await;

    // A run whose only change is a key below every block's: it joins the first block, looked
    // up though no other change falls in it.
    let low = key_below(&expected);
    run_checkpoints(url, "ns/b", "s", &[vec![put(&low, 9, "{}")]]).await;
    expected.insert(low, (9, "{}".into()));
    state_in_blocks_is(db, url, "ns/b", &expected).await;

    // A new scope (another destination): the blocks of the old one go with its first
    // checkpoint.
    run_checkpoints(url, "ns/b", "t", &[vec![put("only", 1, "{}")]]).await;
    assert_eq!(rows_and_blocks(db, "ns/b").await, (0, vec![1]));
    assert_eq!(rows_in(db, "backflow_state", "ns/b").await, Some(1));
}

#[tokio::test]
async fn a_state_an_earlier_release_kept_in_rows_stays_in_rows_on_postgres() {
    let db = TestDb::postgres("whrows").await;
    // The tables, made by a first run of another sync.
    journal_and_fold(config(&db, "ns/other"), 10).await;
    // An earlier release's state: rows of backflow_state.
    let mut c = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("INSERT INTO backflow.backflow_syncs (sync_id, scope) VALUES ('ns/old', 's')")
        .execute(&mut c)
        .await
        .unwrap();
    for i in 0..100u64 {
        let key = format!("k{i}");
        sqlx::query(
            "INSERT INTO backflow.backflow_state (sync_id, key_hash, key, fingerprint, identity) \
             VALUES ('ns/old', $1, $2, $3, '{}')",
        )
        .bind(hash(&key).to_be_bytes().to_vec())
        .bind(&key)
        .bind(i as i64)
        .execute(&mut c)
        .await
        .unwrap();
    }
    let mut store = WarehouseStore::new(config(&db, "ns/old"));
    assert_eq!(load_after_drop(&mut store, "s").await.len(), 100);
    drop(store);
    let changes = vec![
        put("k1", 11, "{}"),
        put("k200", 200, "{}"),
        StateChange::Remove { key: "k2".into() },
    ];
    run_checkpoints(&db.url, "ns/old", "s", &[changes]).await;
    assert_eq!(rows_and_blocks(&db, "ns/old").await, (100, vec![]));
    assert_eq!(stored_fingerprint(&db, "ns/old", "k1").await, Some(11));
    assert_eq!(stored_fingerprint(&db, "ns/old", "k2").await, None);
    assert_eq!(stored_fingerprint(&db, "ns/old", "k200").await, Some(200));
}

#[tokio::test]
async fn a_first_fold_into_blocks_failing_midway_applies_nothing_and_the_next_run_folds_it_whole_on_postgres()
{
    let db = TestDb::postgres("whbfail").await;
    // The tables, made by a first run of another sync.
    journal_and_fold(config(&db, "ns/other"), 10).await;
    db.exec(
        "CREATE FUNCTION backflow.poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.sync_id = 'ns/f' THEN RAISE EXCEPTION 'injected failure'; END IF; RETURN NEW; END $$;
CREATE TRIGGER poison BEFORE INSERT ON backflow.backflow_state_blocks FOR EACH ROW EXECUTE FUNCTION backflow.poison()",
    )
    .await;
    let mut store = WarehouseStore::new(config(&db, "ns/f"));
    load_after_drop(&mut store, "s").await;
    let puts: Vec<StateChange> = (0..5000).map(|i| put(&format!("f{i}"), i, "{}")).collect();
    store.commit("s", &puts).await.unwrap();
    let err = store.finish("s").await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert_eq!(rows_and_blocks(&db, "ns/f").await, (0, vec![]));
    assert_eq!(rows_in(&db, "backflow_journal", "ns/f").await, Some(5000));
    store.end_run(&end(false)).await.unwrap();
    drop(store);

    db.exec("DROP TRIGGER poison ON backflow.backflow_state_blocks")
        .await;
    let mut next = WarehouseStore::new(config(&db, "ns/f"));
    assert_eq!(load_after_drop(&mut next, "s").await.len(), 5000);
    assert_eq!(rows_in(&db, "backflow_journal", "ns/f").await, Some(0));
    assert_eq!(rows_in(&db, "backflow_state", "ns/f").await, Some(5000));
}
