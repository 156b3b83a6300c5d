//! Cursor mode end to end: runs read only the rows at or past the high-water mark, rows tied
//! with the mark are read again and skipped by fingerprint, full diffs (scheduled or asked
//! for) catch deletes and changes that did not move the cursor, and the mark only advances
//! with a run that committed. On SQLite (timestamps as text, integers), PostgreSQL
//! (timestamptz, also through the Redshift flavour), MariaDB (DATETIME) and ClickHouse
//! (DateTime, Decimal, on the real server), with the File, ConfigMap and Warehouse stores.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;

use backflow::api::ReverseSyncSpec;
use backflow::destination::SendError;
use backflow::engine::run::{CursorRead, RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::state::StateStore;
use backflow::state::configmap::ConfigMapStore;
use backflow::state::file::FileStore;
use backflow::state::warehouse::{WarehouseConfig, WarehouseStore};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use support::apiserver::ApiServer;
use support::clickhouse::TestClickHouse;
use support::db::TestDb;
use support::fake_connector::{FakeConnector, fast_delivery};
use support::sqlite::TempSqlite;

/// 100 customers, all at 00:00:00 but 99 and 100, tied at 00:00:05 (the first mark).
const SETUP: &str = "
CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, plan TEXT, updated_at TIMESTAMP);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'free',
  CASE WHEN i >= 99 THEN '2026-01-01 00:00:05' ELSE '2026-01-01 00:00:00' END FROM n;
";

fn spec(mode: &str, column: &str, full_diff: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "SELECT id, email, plan, updated_at, version FROM customers", primaryKey: [id]}}
destinationRef: {{name: fake}}
mode: {mode}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: email}}
  - {{from: plan, to: plan}}
cursor: {{column: {column}{full_diff}}}
"#
    ))
    .unwrap()
}

/// A warehouse to read and a store to keep the state in, for one test.
struct Harness {
    source_url: String,
    store: Box<dyn Fn() -> Box<dyn StateStore> + Send + Sync>,
    /// The warehouse, to change rows in.
    warehouse: Warehouse,
}

/// The warehouse of a [`Harness`]: its kind and URL.
enum Warehouse {
    Sqlite(String),
    Postgres(String),
    Mysql(String),
    /// The database's name.
    ClickHouse(String),
}

impl Harness {
    async fn sqlite(dir: &tempfile::TempDir) -> (Harness, TempSqlite) {
        let db = TempSqlite::new(&format!(
            "{SETUP} ALTER TABLE customers ADD COLUMN version INTEGER; UPDATE customers SET version = id / 99;"
        ))
        .await;
        let state = dir.path().to_owned();
        let h = Harness {
            source_url: db.url.clone(),
            store: Box::new(move || Box::new(FileStore::new(&state, "default", "customers"))),
            warehouse: Warehouse::Sqlite(db.url.clone()),
        };
        (h, db)
    }

    async fn run(&self, spec: &ReverseSyncSpec, fake: &Arc<FakeConnector>, options: RunOptions) -> RunReport {
        let job = SyncRun {
            namespace: "default",
            name: "customers",
            spec,
            source_url: &self.source_url,
            source_credentials: Default::default(),
            delivery: fast_delivery(Arc::clone(fake), 1),
            scope: "default/fake".into(),
        };
        let mut store = (self.store)();
        run(job, store.as_mut(), &options).await
    }

    async fn exec(&self, sql: &str) {
        use sqlx::Connection;
        match &self.warehouse {
            Warehouse::Sqlite(url) => {
                let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            }
            Warehouse::Postgres(url) => {
                let mut c = sqlx::PgConnection::connect(url).await.unwrap();
                let sql = format!("SET TIME ZONE 'UTC'; {sql}");
                sqlx::raw_sql(&sql).execute(&mut c).await.unwrap();
            }
            Warehouse::Mysql(url) => {
                let mut c = sqlx::MySqlConnection::connect(url).await.unwrap();
                sqlx::raw_sql(sql).execute(&mut c).await.unwrap();
            }
            Warehouse::ClickHouse(database) => {
                for statement in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    let response = reqwest::Client::new()
                        .post(format!(
                            "{}/?database={database}",
                            support::clickhouse::http_url()
                        ))
                        .body(clickhouse_statement(statement))
                        .send()
                        .await
                        .unwrap();
                    let status = response.status();
                    assert!(
                        status.is_success(),
                        "{statement}: {}",
                        response.text().await.unwrap()
                    );
                    wait_for_mutations(database).await;
                }
            }
        }
    }
}

/// A statement of the scenario in ClickHouse's words: `UPDATE` and `DELETE` are mutations
/// (`ALTER TABLE … UPDATE|DELETE`), a mutation assigns a timestamp to a `DateTime` column
/// only from a `DateTime`, and an `INSERT` names its columns (`amount` takes its default).
fn clickhouse_statement(statement: &str) -> String {
    if let Some(rest) = statement.strip_prefix("INSERT INTO customers VALUES ") {
        return format!("INSERT INTO customers (id, email, plan, updated_at, version) VALUES {rest}");
    }
    if let Some(rest) = statement.strip_prefix("DELETE FROM customers WHERE ") {
        return format!("ALTER TABLE customers DELETE WHERE {rest}");
    }
    let Some(rest) = statement.strip_prefix("UPDATE customers SET ") else {
        return statement.to_owned();
    };
    let mut rest = rest.to_owned();
    let assignment = "updated_at = '";
    if let Some(start) = rest.find(assignment) {
        let from = start + assignment.len();
        let end = from + rest[from..].find('\'').unwrap();
        let at = rest[from..end].to_owned();
        rest.replace_range(start..=end, &format!("updated_at = toDateTime('{at}', 'UTC')"));
    }
    format!("ALTER TABLE customers UPDATE {rest}")
}

/// Waits until the mutations of `database` are applied (they run in the background).
async fn wait_for_mutations(database: &str) {
    for _ in 0..200 {
        let pending = support::clickhouse::exec(&format!(
            "SELECT count() FROM system.mutations WHERE database = '{database}' AND is_done = 0"
        ))
        .await;
        if pending.trim() == "0" {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the mutations of {database} did not finish in 10 s");
}

fn keys(fake: &FakeConnector, from_call: usize) -> BTreeSet<String> {
    fake.calls.lock().unwrap()[from_call..]
        .iter()
        .flat_map(|(_, k)| k.clone())
        .collect()
}

fn set(ids: &[i64]) -> BTreeSet<String> {
    ids.iter().map(|i| i.to_string()).collect()
}

fn ok(r: &RunReport) {
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.result, RunResult::Succeeded);
}

/// The cursor scenario every source and store goes through: a full first run, a run that
/// reads only the bumped rows and the ties at the mark, a row committed late at the mark,
/// and a full diff that catches a delete and a change that did not move the cursor.
async fn scenario(h: &Harness, column: &str) {
    let spec = spec("mirror", column, "");
    let fake = Arc::new(FakeConnector::new(10));

    let first = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&first);
    assert_eq!(first.cursor, Some(CursorRead::FullDiff("no high-water mark yet")));
    assert_eq!((first.plan.rows_in_model, first.plan.added), (100, 100));

    // Three rows change and move the cursor: only they and the two rows at the mark are read.
    h.exec("UPDATE customers SET plan = 'pro', updated_at = '2026-01-01 00:00:07', version = 2 WHERE id IN (1, 2, 3)")
        .await;
    let calls = fake.call_count();
    let second = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&second);
    assert!(
        matches!(second.cursor, Some(CursorRead::PastMark(_))),
        "{:?}",
        second.cursor
    );
    assert_eq!(
        second.plan.rows_in_model, 5,
        "rows 1-3 and the two tied at the old mark"
    );
    assert_eq!((second.plan.changed, second.plan.unchanged), (3, 2));
    assert_eq!(keys(&fake, calls), set(&[1, 2, 3]));

    // A row committed late with the mark's value, and one changed to it: both are read.
    h.exec(
        "INSERT INTO customers VALUES (101, 'late@example.com', 'free', '2026-01-01 00:00:07', 2);
         UPDATE customers SET plan = 'team', updated_at = '2026-01-01 00:00:07', version = 2 WHERE id = 98",
    )
    .await;
    let calls = fake.call_count();
    let third = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&third);
    assert_eq!(third.plan.rows_in_model, 5, "1-3 tied at the mark, 98 and 101");
    assert_eq!(
        (third.plan.added, third.plan.changed, third.plan.unchanged),
        (1, 1, 3)
    );
    assert_eq!(keys(&fake, calls), set(&[98, 101]));

    // A delete and a change that leaves the cursor alone: a cursor run cannot see them...
    h.exec("DELETE FROM customers WHERE id = 50; UPDATE customers SET plan = 'pro' WHERE id = 60")
        .await;
    let calls = fake.call_count();
    let blind = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&blind);
    assert!(matches!(blind.cursor, Some(CursorRead::PastMark(_))));
    assert_eq!((blind.plan.removed, blind.plan.changed), (0, 0));
    assert_eq!(blind.deleted, 0, "a cursor run never deletes");
    assert_eq!(fake.call_count(), calls);

    // ...a full diff does.
    let full = h
        .run(
            &spec,
            &fake,
            RunOptions {
                full_diff: true,
                ..RunOptions::default()
            },
        )
        .await;
    ok(&full);
    assert_eq!(full.cursor, Some(CursorRead::FullDiff("asked for")));
    assert_eq!(full.plan.rows_in_model, 100);
    assert_eq!((full.plan.removed, full.plan.changed, full.deleted), (1, 1, 1));
    assert!(!fake.store.lock().unwrap().contains_key("50"));
    assert!(fake.store.lock().unwrap()["60"].contains("pro"));

    // And the runs after it read past the mark again, sending nothing.
    let calls = fake.call_count();
    let after = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&after);
    assert!(matches!(after.cursor, Some(CursorRead::PastMark(_))));
    assert_eq!(after.plan.rows_in_model, 5);
    assert_eq!(fake.call_count(), calls);
}

#[tokio::test]
async fn with_the_file_store_on_sqlite_timestamps_runs_read_only_past_the_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _db) = Harness::sqlite(&dir).await;
    scenario(&h, "updated_at").await;
}

#[tokio::test]
async fn an_integer_cursor_reads_from_its_mark_too() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _db) = Harness::sqlite(&dir).await;
    let spec = spec("upsert", "version", "");
    let fake = Arc::new(FakeConnector::new(10));
    ok(&h.run(&spec, &fake, RunOptions::default()).await);
    h.exec("UPDATE customers SET plan = 'pro', version = 2 WHERE id = 7")
        .await;
    let calls = fake.call_count();
    let r = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&r);
    assert_eq!(
        r.cursor,
        Some(CursorRead::PastMark(r#"{"type":"int","value":1}"#.into()))
    );
    // Rows 99 and 100 hold version 1 (the mark), row 7 now 2.
    assert_eq!((r.plan.rows_in_model, r.plan.changed), (3, 1));
    assert_eq!(keys(&fake, calls), set(&[7]));
}

#[tokio::test]
async fn a_full_diff_runs_on_its_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _db) = Harness::sqlite(&dir).await;
    let fake = Arc::new(FakeConnector::new(10));
    let every_second = spec("upsert", "updated_at", ", fullDiff: {interval: 1s}");
    ok(&h.run(&every_second, &fake, RunOptions::default()).await);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let due = h.run(&every_second, &fake, RunOptions::default()).await;
    assert_eq!(due.cursor, Some(CursorRead::FullDiff("scheduled")));
    assert_eq!(due.plan.rows_in_model, 100);
}

#[tokio::test]
async fn a_run_that_fails_delivery_keeps_the_mark_and_the_next_run_sends_only_what_was_not_committed() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _db) = Harness::sqlite(&dir).await;
    let spec = spec("upsert", "updated_at", "");
    ok(&h.run(&spec, &fake_ok(), RunOptions::default()).await);
    h.exec("UPDATE customers SET plan = 'pro', updated_at = '2026-01-01 00:01:00' WHERE id <= 60")
        .await;
    // Two batches land, then the destination refuses for good: the run fails mid-delivery.
    let failing = Arc::new(FakeConnector::new(10).with_script(vec![
        Ok(()),
        Ok(()),
        Err(SendError::Fatal("refused".into())),
    ]));
    let broken = h
        .run(
            &spec,
            &failing,
            RunOptions {
                checkpoint_records: 10,
                ..RunOptions::default()
            },
        )
        .await;
    assert_eq!(broken.result, RunResult::Failed);
    assert!(broken.accepted < 60, "{}", broken.accepted);
    let landed: BTreeSet<String> = failing.store.lock().unwrap().keys().cloned().collect();

    // The mark did not move: the rerun reads the same rows and sends only the rest.
    let fake = fake_ok();
    let rerun = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&rerun);
    assert!(matches!(rerun.cursor, Some(CursorRead::PastMark(ref m)) if m.contains("00:00:05")));
    let resent = keys(&fake, 0);
    assert_eq!(
        resent.len() as u64,
        60 - broken.accepted,
        "exactly the rows whose acceptance was not committed are sent again"
    );
    let mut all = landed;
    all.extend(resent);
    assert_eq!(
        all,
        (1..=60).map(|i| i.to_string()).collect(),
        "no row was skipped"
    );

    // Now the mark moved past them.
    let after = h.run(&spec, &fake_ok(), RunOptions::default()).await;
    assert_eq!(after.plan.rows_in_model, 60);
    assert!(matches!(after.cursor, Some(CursorRead::PastMark(ref m)) if m.contains("00:01:00")));
}

fn fake_ok() -> Arc<FakeConnector> {
    Arc::new(FakeConnector::new(10))
}

#[tokio::test]
async fn a_dry_run_leaves_the_mark_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _db) = Harness::sqlite(&dir).await;
    let spec = spec("upsert", "updated_at", "");
    let dry = RunOptions {
        dry_run: true,
        ..RunOptions::default()
    };
    let r = h.run(&spec, &fake_ok(), dry.clone()).await;
    assert_eq!(r.cursor, Some(CursorRead::FullDiff("no high-water mark yet")));
    let r = h.run(&spec, &fake_ok(), dry).await;
    assert_eq!(r.cursor, Some(CursorRead::FullDiff("no high-water mark yet")));
}

#[tokio::test]
async fn a_cursor_column_the_model_lacks_or_cannot_order_fails_before_sending() {
    let dir = tempfile::tempdir().unwrap();
    let (h, _db) = Harness::sqlite(&dir).await;
    let fake = fake_ok();
    let r = h
        .run(&spec("upsert", "missing", ""), &fake, RunOptions::default())
        .await;
    assert!(r.error.unwrap().to_string().contains("no column \"missing\""));
    let r = h
        .run(&spec("upsert", "email", ""), &fake, RunOptions::default())
        .await;
    assert!(r.error.unwrap().to_string().contains("holds text values"));
    assert_eq!(fake.call_count(), 0);
}

async fn postgres_harness(db: &TestDb) -> Harness {
    db.exec(
        "CREATE TABLE customers (id BIGINT PRIMARY KEY, email TEXT, plan TEXT, updated_at TIMESTAMPTZ, version BIGINT);
         INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'free',
           CASE WHEN i >= 99 THEN TIMESTAMPTZ '2026-01-01 00:00:05Z' ELSE TIMESTAMPTZ '2026-01-01 00:00:00Z' END, i / 99
         FROM generate_series(1, 100) AS i;",
    )
    .await;
    let url = db.url.clone();
    let config = WarehouseConfig {
        url: db.url.clone(),
        schema: "backflow".into(),
        sync_id: "default/customers".into(),
        sync_logs: false,
    };
    Harness {
        source_url: url.clone(),
        store: Box::new(move || Box::new(WarehouseStore::new(config.clone()))),
        warehouse: Warehouse::Postgres(url),
    }
}

#[tokio::test]
async fn with_the_warehouse_store_on_postgresql_timestamptz() {
    let db = TestDb::postgres("cursor_pg").await;
    let h = postgres_harness(&db).await;
    scenario(&h, "updated_at").await;
}

#[tokio::test]
async fn with_the_warehouse_store_on_mariadb_datetime() {
    let db = TestDb::mysql("cursor_my").await;
    db.exec(
        "CREATE TABLE customers (id BIGINT PRIMARY KEY, email TEXT, plan TEXT, updated_at DATETIME(6), version BIGINT);
         INSERT INTO customers WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100)
           SELECT i, CONCAT('user', i, '@example.com'), 'free',
             CASE WHEN i >= 99 THEN '2026-01-01 00:00:05' ELSE '2026-01-01 00:00:00' END, i DIV 99 FROM n;",
    )
    .await;
    let config = WarehouseConfig {
        url: db.url.clone(),
        schema: db.name.clone(),
        sync_id: "default/customers".into(),
        sync_logs: false,
    };
    let h = Harness {
        source_url: db.url.clone(),
        store: Box::new(move || Box::new(WarehouseStore::new(config.clone()))),
        warehouse: Warehouse::Mysql(db.url.clone()),
    };
    scenario(&h, "updated_at").await;
}

#[tokio::test]
async fn with_the_configmap_store() {
    let server = ApiServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (mut h, _db) = Harness::sqlite(&dir).await;
    let client = server.client();
    h.store = Box::new(move || {
        let owner = OwnerReference {
            api_version: "backflow.dev/v1alpha1".into(),
            kind: "ReverseSync".into(),
            name: "customers".into(),
            uid: "uid-customers".into(),
            controller: Some(false),
            block_owner_deletion: None,
        };
        Box::new(ConfigMapStore::new(client.clone(), "default", "customers", owner))
    });
    scenario(&h, "updated_at").await;
}

#[tokio::test]
async fn a_mark_belongs_to_its_scope_and_goes_with_the_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut file = FileStore::new(dir.path(), "default", "customers");
    assert_eq!(file.cursor("a").await.unwrap(), None);
    file.commit_cursor("a", "{\"m\":1}").await.unwrap();
    assert_eq!(file.cursor("a").await.unwrap().as_deref(), Some("{\"m\":1}"));
    assert_eq!(
        file.cursor("b").await.unwrap(),
        None,
        "another destination has no mark"
    );
    file.discard().await.unwrap();
    assert_eq!(file.cursor("a").await.unwrap(), None);

    let db = TestDb::postgres("cursor_scope").await;
    let config = WarehouseConfig {
        url: db.url.clone(),
        schema: "backflow".into(),
        sync_id: "default/customers".into(),
        sync_logs: false,
    };
    let mut wh = WarehouseStore::new(config.clone());
    assert_eq!(wh.cursor("a").await.unwrap(), None, "no cursor table yet");
    wh.commit_cursor("a", "{\"m\":2}").await.unwrap();
    wh.commit_cursor("a", "{\"m\":3}").await.unwrap();
    assert_eq!(wh.cursor("a").await.unwrap().as_deref(), Some("{\"m\":3}"));
    assert_eq!(wh.cursor("b").await.unwrap(), None);
    wh.discard().await.unwrap();
    assert_eq!(wh.cursor("a").await.unwrap(), None);
}

/// The scenario's table on the real ClickHouse server: `DateTime('UTC')`, which every
/// server version has (18.16 has no `DateTime64`), so the marks are whole seconds.
async fn clickhouse_harness(db: &TestClickHouse, dir: &tempfile::TempDir) -> Harness {
    db.exec(
        "CREATE TABLE customers (id UInt64, email String, plan String, updated_at DateTime('UTC'), \
           version UInt64, amount Decimal(12, 2)) ENGINE = MergeTree ORDER BY id;
         INSERT INTO customers SELECT number + 1, concat('user', toString(number + 1), '@example.com'), 'free',
           if(number + 1 >= 99, toDateTime('2026-01-01 00:00:05', 'UTC'), toDateTime('2026-01-01 00:00:00', 'UTC')),
           intDiv(number + 1, 99), toDecimal64(number + 1, 2) / 100 FROM system.numbers LIMIT 100",
    )
    .await;
    let state = dir.path().to_owned();
    Harness {
        source_url: db.url(),
        store: Box::new(move || Box::new(FileStore::new(&state, "default", "customers"))),
        warehouse: Warehouse::ClickHouse(db.name.clone()),
    }
}

#[tokio::test]
async fn on_clickhouse_datetime_runs_read_only_past_the_mark_and_ties_at_it() {
    let db = TestClickHouse::new("cursor").await;
    let dir = tempfile::tempdir().unwrap();
    let h = clickhouse_harness(&db, &dir).await;
    scenario(&h, "updated_at").await;
}

#[tokio::test]
async fn on_clickhouse_a_decimal_cursor_reads_from_its_mark() {
    let db = TestClickHouse::new("cursor_dec").await;
    let dir = tempfile::tempdir().unwrap();
    let h = clickhouse_harness(&db, &dir).await;
    let mut spec = spec("upsert", "amount", "");
    spec.source.query = "SELECT id, email, plan, amount FROM customers".into();
    let fake = fake_ok();
    let first = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&first);
    assert_eq!(first.plan.rows_in_model, 100);
    // Row 100 holds the mark, 1.00; row 7 moves past it, row 8 below it.
    h.exec(
        "UPDATE customers SET plan = 'pro', amount = toDecimal64('2.50', 2) WHERE id = 7;
         UPDATE customers SET plan = 'pro' WHERE id = 8",
    )
    .await;
    let calls = fake.call_count();
    let r = h.run(&spec, &fake, RunOptions::default()).await;
    ok(&r);
    assert_eq!(
        r.cursor,
        Some(CursorRead::PastMark(
            r#"{"type":"decimal","value":"1.00"}"#.into()
        ))
    );
    assert_eq!(
        (r.plan.rows_in_model, r.plan.changed, r.plan.unchanged),
        (2, 1, 1)
    );
    assert_eq!(keys(&fake, calls), set(&[7]));
}

#[tokio::test]
async fn through_the_redshift_flavour_of_the_postgresql_source() {
    // Redshift's text-format rows and login, on PostgreSQL (no Redshift cluster runs here).
    let db = TestDb::postgres("cursor_rs").await;
    let dir = tempfile::tempdir().unwrap();
    let mut h = postgres_harness(&db).await;
    h.source_url = db.url.replacen("postgres://", "redshift://", 1);
    let state = dir.path().to_owned();
    h.store = Box::new(move || Box::new(FileStore::new(&state, "default", "customers")));
    scenario(&h, "updated_at").await;
}
