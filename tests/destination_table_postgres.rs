//! The PostgreSQL table destination against the real PostgreSQL server of the machine.

mod support;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use bigdecimal::BigDecimal;
use chrono::{DateTime, NaiveDate, Utc};
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
        "type": "postgres",
        "credentialsSecretRef": {"name": "warehouse"},
        "postgres": {"table": table, "schema": schema},
    }))
    .unwrap();
    destination::build(&spec, Some(&secret(db_url))).await.unwrap()
}

async fn pg(db: &TestDb) -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&db.url).await.unwrap()
}

async fn contacts(db: &TestDb) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT email, name, visits FROM contacts ORDER BY email")
        .fetch_all(&mut pg(db).await)
        .await
        .unwrap()
}

const CONTACTS: &str = "CREATE TABLE contacts (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text NOT NULL,
    visits int8 NOT NULL DEFAULT 0
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

/// PostgreSQL for the shared table suite.
struct Pg(TestDb);

impl TableFixture for Pg {
    const CONTACTS: &'static str = CONTACTS;
    const NOT_NULL: &'static str = "not-null";
    const DUPLICATE_KEY: &'static str = "duplicate key";

    async fn create(name: &str) -> Self {
        Pg(TestDb::postgres(name).await)
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

table_suite!(Pg);

/// id, amount as text, seen_at, ref, payload as text, doc as text, active, born, tags, ratio.
type FactRow = (
    i64,
    String,
    DateTime<Utc>,
    uuid::Uuid,
    String,
    String,
    bool,
    NaiveDate,
    Vec<String>,
    f64,
);

#[tokio::test]
async fn typed_columns_receive_exact_values() {
    let db = TestDb::postgres("tbl_types").await;
    db.exec(
        "CREATE TABLE facts (
            id int8 PRIMARY KEY,
            amount numeric(38,10),
            seen_at timestamptz,
            ref uuid,
            payload jsonb,
            doc json,
            active bool,
            born date,
            tags text[],
            ratio float8
        )",
    )
    .await;
    let c = connector(&db.url, "facts", Some("public")).await;
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
    let batch = vec![record(
        &["id"],
        &[
            ("id", Value::Int(9_007_199_254_740_993)),
            ("amount", Value::Decimal(BigDecimal::from_str(amount).unwrap())),
            ("seen_at", Value::Timestamp(at)),
            ("ref", Value::Uuid(id)),
            ("payload", nested.clone()),
            ("doc", Value::Json(json!({"k": [true, "v"]}))),
            ("active", Value::Bool(true)),
            (
                "born",
                Value::Date(NaiveDate::from_ymd_opt(1990, 12, 31).unwrap()),
            ),
            ("tags", Value::Array(vec![text("a"), text("b c")])),
            ("ratio", Value::Float(0.1)),
        ],
    )];
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted]
    );

    let mut conn = pg(&db).await;
    let row: FactRow =
        sqlx::query_as(
            "SELECT id, amount::text, seen_at, ref, payload::text, doc::text, active, born, tags, ratio FROM facts",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(row.0, 9_007_199_254_740_993);
    assert_eq!(row.1, amount);
    assert_eq!(row.2, at);
    assert_eq!(row.3, id);
    assert_eq!(
        row.4,
        r#"{"big": 98765432109876543210.5, "list": [1, null], "name": "x\"y"}"#
    );
    // Rows travel as jsonb, so a `json` column receives jsonb's normalised text.
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&row.5).unwrap(),
        json!({"k": [true, "v"]})
    );
    assert!(row.6);
    assert_eq!(row.7, NaiveDate::from_ymd_opt(1990, 12, 31).unwrap());
    assert_eq!(row.8, vec!["a".to_owned(), "b c".to_owned()]);
    assert_eq!(row.9, 0.1);
}

#[tokio::test]
async fn upsert_without_a_unique_index_is_fatal_with_a_hint() {
    let db = TestDb::postgres("tbl_noindex").await;
    db.exec("CREATE TABLE people (email text, name text)").await;
    let c = connector(&db.url, "people", None).await;
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
    let db = TestDb::postgres("tbl_missing").await;
    let c = connector(&db.url, "nowhere", Some("public")).await;
    match c.check().await.unwrap_err() {
        SendError::Fatal(reason) => {
            assert!(reason.contains("table public.nowhere does not exist"), "{reason}");
            assert!(!reason.contains(&db.url), "{reason}");
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    // Sending to it is just as fatal.
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
async fn a_field_without_a_column_is_fatal_naming_the_column() {
    let db = TestDb::postgres("tbl_nocol").await;
    db.exec(CONTACTS).await;
    let c = connector(&db.url, "contacts", None).await;
    let err = c
        .send(
            Operation::Upsert,
            &[record(
                &["email"],
                &[("email", text("a@x.io")), ("nickname", text("A"))],
            )],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, SendError::Fatal(ref r) if r.contains("nickname")),
        "{err:?}"
    );
}

#[tokio::test]
async fn composite_match_keys_upsert_update_and_delete() {
    let db = TestDb::postgres("tbl_composite").await;
    db.exec("CREATE TABLE seats (tenant text, seat int4, holder text, PRIMARY KEY (tenant, seat))")
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
        &[key_only(&[("tenant", text("acme")), ("seat", Value::Int(1))])],
    )
    .await
    .unwrap();

    let rows: Vec<(String, i32, String)> =
        sqlx::query_as("SELECT tenant, seat, holder FROM seats ORDER BY 1, 2")
            .fetch_all(&mut pg(&db).await)
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
    let db = TestDb::postgres("tbl_quote").await;
    db.exec(
        r#"CREATE SCHEMA "Sales Ops";
        CREATE TABLE "Sales Ops"."Order ""Lines""" ("order" int8 PRIMARY KEY, "unit price" numeric, "Select" text)"#,
    )
    .await;
    let c = connector(&db.url, "Order \"Lines\"", Some("Sales Ops")).await;
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
        sqlx::query_as(r#"SELECT "order", "unit price"::text, "Select" FROM "Sales Ops"."Order ""Lines""""#)
            .fetch_all(&mut pg(&db).await)
            .await
            .unwrap();
    assert_eq!(rows, vec![(2, "1.25".into(), "c".into())]);
}

#[tokio::test]
async fn records_with_different_field_sets_leave_unmentioned_columns_alone() {
    let db = TestDb::postgres("tbl_fieldsets").await;
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
async fn an_upsert_batch_that_repeats_a_match_value_keeps_the_last_record() {
    let db = TestDb::postgres("tbl_repeat").await;
    db.exec(CONTACTS).await;
    let c = connector(&db.url, "contacts", None).await;
    let batch = vec![
        contact("a@x.io", "First", 1),
        contact("b@x.io", "Bob", 2),
        contact("a@x.io", "Last", 3),
    ];
    assert_eq!(
        c.send(Operation::Upsert, &batch).await.unwrap(),
        vec![RecordOutcome::Accepted; 3]
    );
    assert_eq!(
        contacts(&db).await,
        vec![
            ("a@x.io".into(), "Last".into(), 3),
            ("b@x.io".into(), "Bob".into(), 2)
        ]
    );
}

#[tokio::test]
async fn an_unreachable_server_errors_without_the_password() {
    let url = "postgres://backflow:Sup3r-Secret-Pw@127.0.0.1:1/warehouse";
    let c = connector(url, "contacts", None).await;
    let err = c.check().await.unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(
        matches!(err, SendError::Retryable { throttled: false, .. }),
        "{text}"
    );
    assert!(!text.contains("Sup3r-Secret-Pw"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
}

#[tokio::test]
async fn a_refused_login_is_fatal_without_the_password() {
    // The test server trusts local logins, so an unknown role is how it refuses one.
    let admin = support::db::postgres_admin_url();
    let url = admin.replacen(
        "postgres://postgres@",
        "postgres://bf_no_such_role:Wr0ng-Passw0rd@",
        1,
    );
    let c = connector(&url, "contacts", None).await;
    match c.check().await.unwrap_err() {
        SendError::Fatal(reason) => {
            assert!(reason.contains("failed to log in"), "{reason}");
            assert!(!reason.contains("Wr0ng-Passw0rd"), "{reason}");
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
}

#[tokio::test]
async fn build_needs_credentials_and_a_postgres_url() {
    let spec: DestinationSpec = serde_json::from_value(json!({
        "type": "postgres",
        "postgres": {"table": "t"},
    }))
    .unwrap();
    let err = destination::build(&spec, None).await.err().unwrap();
    assert!(
        matches!(err, destination::DestinationError::MissingCredentials("postgres")),
        "{err:?}"
    );

    let spec: DestinationSpec = serde_json::from_value(json!({
        "type": "postgres",
        "credentialsSecretRef": {"name": "db", "key": "dsn"},
        "postgres": {"table": "t"},
    }))
    .unwrap();
    let err = destination::build(&spec, Some(&secret("postgres://x@h/d")))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, destination::DestinationError::MissingSecretKey { ref key, .. } if key == "dsn"),
        "{err:?}"
    );

    let wrong = SecretData::new(BTreeMap::from([(
        "dsn".to_owned(),
        "mysql://u:pw-1234@h/d".to_owned(),
    )]));
    let err = destination::build(&spec, Some(&wrong))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("postgres://") && !err.contains("pw-1234"), "{err}");
}

#[tokio::test]
async fn a_value_the_column_refuses_is_not_quoted_back_in_the_reason() {
    let db = TestDb::postgres("tbl_novalue").await;
    db.exec(CONTACTS).await;
    let c = connector(&db.url, "contacts", None).await;
    let mut bad = contact("someone@x.io", "Ann", 1);
    bad.fields.insert("visits".into(), text("u1@x.com"));
    let err = c.send(Operation::Upsert, &[bad]).await.unwrap_err();
    let SendError::BatchRejected(reason) = &err else {
        panic!("expected BatchRejected, got {err:?}");
    };
    assert!(reason.contains("invalid input syntax"), "{reason}");
    assert!(!reason.contains("u1@x.com"), "the row value stays out: {reason}");
}

fn fields(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[tokio::test]
async fn check_match_names_a_missing_unique_index_before_any_upsert() {
    let db = TestDb::postgres("tbl_checkmatch").await;
    db.exec("CREATE TABLE people (email text, name text, org int, dept int, PRIMARY KEY (org, dept))")
        .await;
    db.exec("CREATE UNIQUE INDEX people_name_partial ON people (name) WHERE name <> ''")
        .await;
    let c = connector(&db.url, "people", None).await;

    let Err(SendError::Fatal(reason)) = c.check_match(&fields(&["email"])).await else {
        panic!("a missing unique index is fatal");
    };
    assert!(
        reason.contains("create a unique index on (email) of table people"),
        "{reason}"
    );
    // A partial index cannot serve ON CONFLICT; the primary key can, in any column order.
    assert!(c.check_match(&fields(&["name"])).await.is_err());
    c.check_match(&fields(&["dept", "org"])).await.unwrap();

    db.exec("CREATE UNIQUE INDEX people_email ON people (email)")
        .await;
    c.check_match(&fields(&["email"])).await.unwrap();
}
