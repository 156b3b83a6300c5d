//! The MySQL/MariaDB table destination against the real MariaDB server of the machine.

mod support;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};
use serde_json::json;
use sqlx::Connection;
use support::db::TestDb;
use support::table_suite::{TableFixture, table_suite};

use backflow::api::DestinationSpec;
use backflow::destination::{self, Connector, RecordOutcome, SendError};
use backflow::model::record::{Operation, Record};
use backflow::model::secret::SecretData;
use backflow::model::value::{Document, Value};

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

fn secret(url: &str) -> SecretData {
    SecretData::new(BTreeMap::from([("url".to_owned(), url.to_owned())]))
}

async fn connector(db_url: &str, table: &str, schema: Option<&str>) -> Arc<dyn Connector> {
    let spec: DestinationSpec = serde_json::from_value(json!({
        "type": "mysql",
        "credentialsSecretRef": {"name": "warehouse"},
        "mysql": {"table": table, "schema": schema},
    }))
    .unwrap();
    destination::build(&spec, Some(&secret(db_url))).await.unwrap()
}

async fn my(db: &TestDb) -> sqlx::MySqlConnection {
    sqlx::MySqlConnection::connect(&db.url).await.unwrap()
}

async fn contacts(db: &TestDb) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT email, name, visits FROM contacts ORDER BY email")
        .fetch_all(&mut my(db).await)
        .await
        .unwrap()
}

const CONTACTS: &str = "CREATE TABLE contacts (
    id BIGINT AUTO_INCREMENT PRIMARY KEY,
    email VARCHAR(190) NOT NULL UNIQUE,
    name VARCHAR(100) NOT NULL,
    visits BIGINT NOT NULL DEFAULT 0
)";

fn contact(email: &str, name: &str, visits: i64) -> Record {
    record(
        &["email"],
        &[
            ("email", text(email)),
            ("name", text(name)),
            ("visits", Value::Int(visits)),
        ],
    )
}

/// MySQL/MariaDB for the shared table suite.
struct My(TestDb);

impl TableFixture for My {
    const CONTACTS: &'static str = CONTACTS;
    const NOT_NULL: &'static str = "error 1048";
    const DUPLICATE_KEY: &'static str = "error 1062";

    async fn create(name: &str) -> Self {
        My(TestDb::mysql(name).await)
    }

    async fn exec(&self, sql: &str) {
        self.0.exec(sql).await;
    }

    async fn connector(&self, table: &str) -> Arc<dyn Connector> {
        connector(&self.0.url, table, None).await
    }

    async fn contacts(&self) -> Vec<(String, String, i64)> {
        contacts(&self.0).await
    }
}

table_suite!(My);

/// id, amount as text, seen_at, logged_at, ref, payload as text, active, born, opens, ratio.
type FactRow = (
    i64,
    String,
    NaiveDateTime,
    DateTime<Utc>,
    String,
    String,
    bool,
    NaiveDate,
    NaiveTime,
    f64,
);

#[tokio::test]
async fn typed_columns_receive_exact_values() {
    let db = TestDb::mysql("tbl_types").await;
    db.exec(
        "CREATE TABLE facts (
            id BIGINT PRIMARY KEY,
            amount DECIMAL(38,10),
            seen_at DATETIME(6),
            logged_at TIMESTAMP(6) NULL,
            ref CHAR(36),
            payload JSON,
            active BOOLEAN,
            born DATE,
            opens TIME(6),
            ratio DOUBLE
        )",
    )
    .await;
    let c = connector(&db.url, "facts", Some(&db.name)).await;
    let amount = "1234567890123456789012.1234567891";
    let at: DateTime<Utc> = DateTime::parse_from_rfc3339("2024-03-01T10:00:00.123456Z")
        .unwrap()
        .into();
    let id = uuid::Uuid::parse_str("6f1c2a4e-8d0b-4c1e-9a3f-2b7d5e8c9a01").unwrap();
    let nested = Value::Object(doc(&[
        (
            "big",
            Value::Decimal(BigDecimal::from_str("98765432109876543210.5").unwrap()),
        ),
        ("name", text("x\"y")),
        ("list", Value::Array(vec![Value::Int(1), Value::Null])),
    ]));
    let opens = NaiveTime::from_hms_micro_opt(8, 30, 0, 250_000).unwrap();
    let batch = vec![record(
        &["id"],
        &[
            ("id", Value::Int(9_007_199_254_740_993)),
            ("amount", Value::Decimal(BigDecimal::from_str(amount).unwrap())),
            ("seen_at", Value::Timestamp(at)),
            ("logged_at", Value::Timestamp(at)),
            ("ref", Value::Uuid(id)),
            ("payload", nested),
            ("active", Value::Bool(true)),
            (
                "born",
                Value::Date(NaiveDate::from_ymd_opt(1990, 12, 31).unwrap()),
            ),
            ("opens", Value::Time(opens)),
            ("ratio", Value::Float(0.1)),
        ],
    )];
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );

    let row: FactRow = sqlx::query_as(
        "SELECT id, CAST(amount AS CHAR), seen_at, logged_at, ref, CAST(payload AS CHAR), active, born, opens, ratio
         FROM facts",
    )
    .fetch_one(&mut my(&db).await)
    .await
    .unwrap();
    assert_eq!(row.0, 9_007_199_254_740_993);
    assert_eq!(row.1, amount);
    assert_eq!(row.2, at.naive_utc());
    assert_eq!(row.3, at);
    assert_eq!(row.4, id.hyphenated().to_string());
    // MariaDB keeps JSON text as sent (every digit); MySQL 8 normalises it.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&row.5).unwrap(),
        json!({"big": 98765432109876543210.5, "list": [1, null], "name": "x\"y"})
    );
    assert!(row.6);
    assert_eq!(row.7, NaiveDate::from_ymd_opt(1990, 12, 31).unwrap());
    assert_eq!(row.8, opens);
    assert_eq!(row.9, 0.1);
}

#[tokio::test]
async fn upsert_without_a_unique_index_is_fatal_with_a_hint_and_writes_nothing() {
    let db = TestDb::mysql("tbl_noindex").await;
    // A primary key on another column does not identify records by email.
    db.exec("CREATE TABLE people (id BIGINT AUTO_INCREMENT PRIMARY KEY, email VARCHAR(190), name TEXT)")
        .await;
    let c = connector(&db.url, "people", None).await;
    let batch = [record(
        &["email"],
        &[("email", text("a@x.io")), ("name", text("A"))],
    )];
    match c.send(Operation::Upsert, &batch).await.unwrap_err() {
        SendError::Fatal(reason) => {
            assert!(
                reason.contains("create a unique index on (email) of table people"),
                "{reason}"
            )
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    // Without the check, ON DUPLICATE KEY UPDATE would have inserted a duplicate.
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM people")
        .fetch_one(&mut my(&db).await)
        .await
        .unwrap();
    assert_eq!(count, 0);

    db.exec("CREATE UNIQUE INDEX people_email ON people (email)")
        .await;
    let c = connector(&db.url, "people", None).await;
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );
}

#[tokio::test]
async fn check_fails_fatally_naming_a_missing_table() {
    let db = TestDb::mysql("tbl_missing").await;
    let c = connector(&db.url, "nowhere", None).await;
    match c.check().await.unwrap_err() {
        SendError::Fatal(reason) => assert!(reason.contains("table nowhere does not exist"), "{reason}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    let err = c
        .send(Operation::Upsert, &[contact("a@x.io", "Ann", 1)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::Fatal(ref r) if r.contains("does not exist")),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_value_too_long_rejects_the_batch() {
    let db = TestDb::mysql("tbl_toolong").await;
    db.exec(CONTACTS).await;
    let c = connector(&db.url, "contacts", None).await;
    let err = c
        .send(Operation::Insert, &[contact("a@x.io", &"n".repeat(101), 1)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::BatchRejected(ref r) if r.contains("error 1406")),
        "{err:?}"
    );
}

#[tokio::test]
async fn composite_match_keys_upsert_update_and_delete() {
    let db = TestDb::mysql("tbl_composite").await;
    db.exec("CREATE TABLE seats (tenant VARCHAR(50), seat INT, holder TEXT, PRIMARY KEY (tenant, seat))")
        .await;
    let c = connector(&db.url, "seats", None).await;
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
        &[
            key_only(&[("tenant", text("acme")), ("seat", Value::Int(1))]),
            key_only(&[("tenant", text("nobody")), ("seat", Value::Int(1))]),
        ],
    )
    .await
    .unwrap();

    let rows: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT tenant, seat, holder FROM seats ORDER BY 1, 2")
            .fetch_all(&mut my(&db).await)
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
    let db = TestDb::mysql("tbl_quote").await;
    db.exec("CREATE TABLE `Order ``Lines``` (`order` BIGINT PRIMARY KEY, `unit price` DECIMAL(10,2), `Select` TEXT)")
        .await;
    let c = connector(&db.url, "Order `Lines`", Some(&db.name)).await;
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
        sqlx::query_as("SELECT `order`, CAST(`unit price` AS CHAR), `Select` FROM `Order ``Lines```")
            .fetch_all(&mut my(&db).await)
            .await
            .unwrap();
    assert_eq!(rows, vec![(2, "1.25".into(), "c".into())]);
}

#[tokio::test]
async fn records_with_different_field_sets_leave_unmentioned_columns_alone() {
    let db = TestDb::mysql("tbl_fieldsets").await;
    db.exec(CONTACTS).await;
    let c = connector(&db.url, "contacts", None).await;
    c.send(Operation::Upsert, &[contact("a@x.io", "Ann", 7)])
        .await
        .unwrap();
    let batch = vec![
        record(&["email"], &[("email", text("a@x.io")), ("name", text("Anna"))]),
        contact("b@x.io", "Bob", 2),
    ];
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted; 2]
    );
    assert_eq!(
        contacts(&db).await,
        vec![
            ("a@x.io".into(), "Anna".into(), 7),
            ("b@x.io".into(), "Bob".into(), 2)
        ]
    );
}

#[tokio::test]
async fn an_unreachable_server_errors_without_the_password() {
    let url = "mysql://backflow:Sup3r-Secret-Pw@127.0.0.1:1/warehouse";
    let c = connector(url, "contacts", None).await;
    let err = c.check().await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        matches!(err, SendError::Retryable { throttled: false, .. }),
        "{text}"
    );
    assert!(!text.contains("Sup3r-Secret-Pw"), "{text}");
}

#[tokio::test]
async fn a_refused_login_is_fatal_without_the_password() {
    let admin = support::db::mysql_admin_url();
    let url = admin.replacen("mysql://root@", "mysql://bf_no_such_user:Wr0ng-Passw0rd@", 1);
    let c = connector(&url, "contacts", None).await;
    match c.check().await.unwrap_err() {
        SendError::Fatal(reason) => {
            assert!(reason.contains("failed to log in"), "{reason}");
            assert!(!reason.contains("Wr0ng-Passw0rd"), "{reason}");
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
}

fn fields(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[tokio::test]
async fn check_match_names_a_missing_unique_index_before_any_upsert() {
    let db = TestDb::mysql("tbl_checkmatch").await;
    db.exec(
        "CREATE TABLE people (email VARCHAR(100), name TEXT, org INT, dept INT, PRIMARY KEY (org, dept))",
    )
    .await;
    let c = connector(&db.url, "people", None).await;

    let Err(SendError::Fatal(reason)) = c.check_match(&fields(&["email"])).await else {
        panic!("a missing unique index is fatal");
    };
    assert!(
        reason.contains("create a unique index on (email) of table people"),
        "{reason}"
    );
    c.check_match(&fields(&["dept", "org"])).await.unwrap();

    db.exec("CREATE UNIQUE INDEX people_email ON people (email)")
        .await;
    c.check_match(&fields(&["email"])).await.unwrap();
}
