//! The SQLite table destination on temporary database files.

mod support;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;
use sqlx::Connection;
use tempfile::TempDir;

use backflow::api::DestinationSpec;
use backflow::destination::{self, Connector, DestinationError, RecordOutcome, SendError};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};
use support::table_suite::{TableFixture, table_suite};

fn doc(pairs: &[(&str, Value)]) -> Document {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

/// A record matched on `match_fields` (taken from `fields`).
fn record(match_fields: &[&str], fields: &[(&str, Value)]) -> Record {
    let fields = doc(fields);
    let identity = match_fields
        .iter()
        .map(|k| ((*k).to_owned(), fields[*k].clone()))
        .collect();
    Record {
        key: format!("{identity:?}"),
        identity,
        fields: fields.into(),
    }
}

fn key_only(pairs: &[(&str, Value)]) -> Record {
    Record {
        key: format!("{pairs:?}"),
        identity: doc(pairs).into(),
        fields: Document::new().into(),
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn spec(table: &str, schema: Option<&str>) -> DestinationSpec {
    serde_json::from_value(json!({
        "type": "sqlite",
        "credentialsSecretRef": {"name": "local"},
        "sqlite": {"table": table, "schema": schema},
    }))
    .unwrap()
}

/// A temporary database file (not created yet) and its URL.
struct TestFile {
    dir: TempDir,
}

impl TestFile {
    fn new() -> TestFile {
        TestFile {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("dest.db").display())
    }

    async fn conn(&self) -> sqlx::SqliteConnection {
        let options = sqlx::sqlite::SqliteConnectOptions::from_str(&self.url())
            .unwrap()
            .create_if_missing(true);
        sqlx::SqliteConnection::connect_with(&options).await.unwrap()
    }

    async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql).execute(&mut self.conn().await).await.unwrap();
    }

    async fn connector(&self, table: &str, schema: Option<&str>) -> Arc<dyn Connector> {
        let secret = SecretData::new(BTreeMap::from([("url".to_owned(), self.url())]));
        destination::build(&spec(table, schema), Some(&secret))
            .await
            .unwrap()
    }
}

async fn contacts(f: &TestFile) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT email, name, visits FROM contacts ORDER BY email")
        .fetch_all(&mut f.conn().await)
        .await
        .unwrap()
}

const CONTACTS: &str = "CREATE TABLE contacts (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    visits INTEGER NOT NULL DEFAULT 0
)";

/// SQLite for the shared table suite.
impl TableFixture for TestFile {
    const CONTACTS: &'static str = CONTACTS;
    const NOT_NULL: &'static str = "NOT NULL";
    const DUPLICATE_KEY: &'static str = "UNIQUE";

    async fn create(_name: &str) -> Self {
        TestFile::new()
    }

    async fn exec(&self, sql: &str) {
        TestFile::exec(self, sql).await;
    }

    async fn connector(&self, table: &str) -> Arc<dyn Connector> {
        TestFile::connector(self, table, None).await
    }

    async fn contacts(&self) -> Vec<(String, String, i64)> {
        contacts(self).await
    }
}

table_suite!(TestFile);

#[tokio::test]
async fn the_database_file_is_created_in_wal_mode_when_missing() {
    let f = TestFile::new();
    let c = f.connector("contacts", None).await;
    // The file appears on first connection; the table does not exist yet.
    assert!(matches!(c.check().await, Err(SendError::Fatal(_))));
    assert!(f.dir.path().join("dest.db").exists());
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert_eq!(mode, "wal");

    f.exec(CONTACTS).await;
    c.check().await.unwrap();
    let caps = c.capabilities();
    assert_eq!(caps.default_concurrency, 1);
    assert_eq!(caps.operations.len(), 4);
}

/// id, amount, seen_at, ref, payload, active, born, ratio — as SQLite stores them.
type FactRow = (i64, String, String, String, String, i64, String, f64);

#[tokio::test]
async fn typed_values_are_stored_exactly() {
    let f = TestFile::new();
    f.exec(
        "CREATE TABLE facts (
            id INTEGER PRIMARY KEY,
            amount TEXT,
            seen_at TEXT,
            ref TEXT,
            payload TEXT,
            active BOOLEAN,
            born DATE,
            ratio REAL
        )",
    )
    .await;
    let c = f.connector("facts", Some("main")).await;
    let amount = "1234567890123456789012.1234567891";
    let at: DateTime<Utc> = DateTime::parse_from_rfc3339("2024-03-01T12:00:00.5+02:00")
        .unwrap()
        .into();
    let id = uuid::Uuid::parse_str("6f1c2a4e-8d0b-4c1e-9a3f-2b7d5e8c9a01").unwrap();
    let nested = Value::Object(doc(&[
        (
            "big",
            Value::Decimal(BigDecimal::from_str("98765432109876543210.5").unwrap()),
        ),
        ("list", Value::Array(vec![Value::Int(1), Value::Null])),
    ]));
    let batch = vec![record(
        &["id"],
        &[
            ("id", Value::Int(9_007_199_254_740_993)),
            ("amount", Value::Decimal(BigDecimal::from_str(amount).unwrap())),
            ("seen_at", Value::Timestamp(at)),
            ("ref", Value::Uuid(id)),
            ("payload", nested),
            ("active", Value::Bool(true)),
            (
                "born",
                Value::Date(NaiveDate::from_ymd_opt(1990, 12, 31).unwrap()),
            ),
            ("ratio", Value::Float(0.1)),
        ],
    )];
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );

    let row: FactRow =
        sqlx::query_as("SELECT id, amount, seen_at, ref, payload, active, born, ratio FROM facts")
            .fetch_one(&mut f.conn().await)
            .await
            .unwrap();
    assert_eq!(
        row,
        (
            9_007_199_254_740_993,
            amount.to_owned(),
            "2024-03-01T10:00:00.500Z".to_owned(),
            "6f1c2a4e-8d0b-4c1e-9a3f-2b7d5e8c9a01".to_owned(),
            r#"{"big":98765432109876543210.5,"list":[1,null]}"#.to_owned(),
            1,
            "1990-12-31".to_owned(),
            0.1,
        )
    );
    // SQLite's date functions read the timestamps as written.
    let epoch: i64 = sqlx::query_scalar("SELECT unixepoch(seen_at) FROM facts")
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert_eq!(epoch, at.timestamp());
}

#[tokio::test]
async fn upsert_without_a_unique_index_is_fatal_with_a_hint() {
    let f = TestFile::new();
    f.exec("CREATE TABLE people (email TEXT, name TEXT)").await;
    let c = f.connector("people", None).await;
    let err = c
        .send(
            Operation::Upsert,
            &[record(
                &["email"],
                &[("email", text("a@x.io")), ("name", text("A"))],
            )],
        )
        .await
        .unwrap_err();
    match err {
        SendError::Fatal(reason) => {
            assert!(
                reason.contains("create a unique index on (email) of table people"),
                "{reason}"
            )
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
}

#[tokio::test]
async fn check_fails_fatally_naming_a_missing_table() {
    let f = TestFile::new();
    f.exec(CONTACTS).await;
    let c = f.connector("nowhere", None).await;
    match c.check().await.unwrap_err() {
        SendError::Fatal(reason) => assert!(reason.contains("table nowhere does not exist"), "{reason}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
}

#[tokio::test]
async fn composite_match_keys_upsert_update_and_delete() {
    let f = TestFile::new();
    f.exec("CREATE TABLE seats (tenant TEXT, seat INTEGER, holder TEXT, PRIMARY KEY (tenant, seat))")
        .await;
    let c = f.connector("seats", None).await;
    let seat = |tenant: &str, n: i64, holder: &str| {
        record(
            &["tenant", "seat"],
            &[
                ("tenant", text(tenant)),
                ("seat", Value::Int(n)),
                ("holder", text(holder)),
            ],
        )
    };
    c.send(
        Operation::Upsert,
        &[
            seat("acme", 1, "ann"),
            seat("acme", 2, "bob"),
            seat("globex", 1, "cy"),
        ],
    )
    .await
    .unwrap();
    c.send(Operation::Upsert, &[seat("globex", 1, "di")])
        .await
        .unwrap();
    let outcomes = c
        .send(Operation::Update, &[seat("acme", 2, "eve"), seat("acme", 3, "x")])
        .await
        .unwrap();
    assert_eq!(outcomes[0], RecordOutcome::Accepted);
    assert!(matches!(outcomes[1], RecordOutcome::Rejected(_)));
    c.send(
        Operation::Delete,
        &[key_only(&[("tenant", text("acme")), ("seat", Value::Int(1))])],
    )
    .await
    .unwrap();

    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT tenant, seat, holder FROM seats ORDER BY 1, 2")
            .fetch_all(&mut f.conn().await)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![
            ("acme".into(), 2, "eve".into()),
            ("globex".into(), 1, "di".into())
        ]
    );
}

#[tokio::test]
async fn identifiers_that_need_quoting_are_written() {
    let f = TestFile::new();
    f.exec(
        r#"CREATE TABLE "Order ""Lines""" ("order" INTEGER PRIMARY KEY, "unit price" TEXT, "Select" TEXT)"#,
    )
    .await;
    let c = f.connector("Order \"Lines\"", Some("main")).await;
    c.check().await.unwrap();
    let line = |n: i64, price: &str, s: &str| {
        record(
            &["order"],
            &[
                ("order", Value::Int(n)),
                ("unit price", Value::Decimal(BigDecimal::from_str(price).unwrap())),
                ("Select", text(s)),
            ],
        )
    };
    c.send(Operation::Upsert, &[line(1, "9.99", "a"), line(2, "0.5", "b")])
        .await
        .unwrap();
    c.send(Operation::Update, &[line(2, "1.25", "c")]).await.unwrap();
    c.send(Operation::Delete, &[key_only(&[("order", Value::Int(1))])])
        .await
        .unwrap();
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as(r#"SELECT "order", "unit price", "Select" FROM "Order ""Lines""""#)
            .fetch_all(&mut f.conn().await)
            .await
            .unwrap();
    assert_eq!(rows, vec![(2, "1.25".into(), "c".into())]);
}

#[tokio::test]
async fn a_batch_wider_than_the_parameter_limit_is_split_into_statements() {
    // 500 records of 80 columns need 40 000 parameters: more than SQLite's 32 766.
    let f = TestFile::new();
    let cols: Vec<String> = (0..79).map(|i| format!("c{i}")).collect();
    f.exec(&format!(
        "CREATE TABLE wide (id INTEGER PRIMARY KEY, {})",
        cols.iter()
            .map(|c| format!("{c} INTEGER"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;
    let c = f.connector("wide", None).await;
    let batch: Vec<Record> = (0..500)
        .map(|i| {
            let mut fields = vec![("id".to_owned(), Value::Int(i))];
            fields.extend(cols.iter().map(|c| (c.clone(), Value::Int(i))));
            let pairs: Vec<(&str, Value)> = fields.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            record(&["id"], &pairs)
        })
        .collect();
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted; 500]
    );
    let sum: i64 = sqlx::query_scalar("SELECT SUM(c78) FROM wide")
        .fetch_one(&mut f.conn().await)
        .await
        .unwrap();
    assert_eq!(sum, (0..500).sum::<i64>());
}

#[tokio::test]
async fn an_unopenable_file_is_fatal_naming_the_path() {
    let secret = SecretData::new(BTreeMap::from([(
        "url".to_owned(),
        "sqlite:///nonexistent-dir-for-backflow/sub/dest.db".to_owned(),
    )]));
    let c = destination::build(&spec("t", None), Some(&secret)).await.unwrap();
    let err = c.check().await.unwrap_err();
    assert!(
        matches!(err, SendError::Fatal(ref r) if r.contains("nonexistent-dir-for-backflow/sub/dest.db")),
        "{err:?}"
    );
}

#[tokio::test]
async fn build_needs_a_secret_reference_and_key() {
    let no_ref: DestinationSpec =
        serde_json::from_value(json!({"type": "sqlite", "sqlite": {"table": "t"}})).unwrap();
    let err = destination::build(&no_ref, None).await.err().unwrap();
    assert!(
        matches!(err, DestinationError::MissingCredentials("sqlite")),
        "{err:?}"
    );

    let empty = SecretData::new(BTreeMap::new());
    let err = destination::build(&spec("t", None), Some(&empty))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, DestinationError::MissingSecretKey { ref secret, ref key } if secret == "local" && key == "url"),
        "{err:?}"
    );
}

fn fields(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[tokio::test]
async fn check_match_names_a_missing_unique_index_before_any_upsert() {
    let f = TestFile::new();
    f.exec("CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT, name TEXT)")
        .await;
    f.exec("CREATE UNIQUE INDEX people_name_partial ON people (name) WHERE name <> ''")
        .await;
    let c = f.connector("people", None).await;

    let Err(SendError::Fatal(reason)) = c.check_match(&fields(&["email"])).await else {
        panic!("a missing unique index is fatal");
    };
    assert!(
        reason.contains("create a unique index on (email) of table people"),
        "{reason}"
    );
    // A partial index cannot serve ON CONFLICT; an INTEGER PRIMARY KEY can, without an index.
    assert!(c.check_match(&fields(&["name"])).await.is_err());
    c.check_match(&fields(&["ID"])).await.unwrap();

    f.exec("CREATE UNIQUE INDEX people_email ON people (email)").await;
    c.check_match(&fields(&["email"])).await.unwrap();
}

/// A sync in upsert mode to a table without a unique index on its match field is refused when
/// it is prepared, with the reason its ReverseSync shows, before any row is read.
#[tokio::test]
async fn a_sync_to_a_table_without_a_unique_index_on_its_match_fields_is_not_prepared() {
    use backflow::destination::delivery::rate_limit::Limiters;
    use backflow::engine::setup::prepare;
    use backflow::local::manifests::{Manifests, load_text};

    let f = TestFile::new();
    f.exec("CREATE TABLE contacts (email TEXT, name TEXT)").await;
    let manifests_text = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: crm}}
stringData: {{url: "{url}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: warehouse}}
stringData: {{url: "{url}"}}
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: crm}}
spec:
  type: sqlite
  credentialsSecretRef: {{name: crm}}
  sqlite: {{table: contacts}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: people}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: SELECT email, name FROM contacts
    primaryKey: [email]
  destinationRef: {{name: crm}}
  mappings:
    - {{from: email, to: email}}
    - {{from: name, to: name}}
"#,
        url = f.url()
    );
    let mut manifests = Manifests::default();
    load_text(&manifests_text, "people.yaml", &mut manifests).unwrap();
    let sync = manifests.syncs.values().next().unwrap().clone();
    let limiters = Limiters::default();

    let Err(error) = prepare(&manifests, "default", &sync, &limiters, true).await else {
        panic!("a sync without a unique index on its match field was prepared");
    };
    assert_eq!(error.category(), "MatchIndexMissing");
    assert!(error.is_permanent());
    let message = error.to_string();
    assert!(
        message.contains("Destination \"crm\"")
            && message.contains("create a unique index on (email) of table contacts"),
        "{message}"
    );

    f.exec("CREATE UNIQUE INDEX contacts_email ON contacts (email)")
        .await;
    prepare(&manifests, "default", &sync, &limiters, true)
        .await
        .unwrap();
}
