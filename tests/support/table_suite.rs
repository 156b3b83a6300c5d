//! One suite of table destination scenarios, run against each dialect (PostgreSQL, MySQL,
//! SQLite): a dialect's test file implements [`TableFixture`] (its DDL, a fresh database per
//! test, a way to read the rows back) and calls [`table_suite!`] once, which declares one test
//! per scenario under the scenario's name.

use std::sync::Arc;

use backflow::destination::{Connector, RecordOutcome, SendError};
use backflow::model::record::{Operation, Record};
use backflow::model::value::{Document, Value};

/// A dialect under test: a fresh database and what differs between dialects.
#[allow(async_fn_in_trait)] // The suite's own generic functions are its only callers.
pub trait TableFixture: Sized {
    /// `CREATE TABLE contacts`: `email` unique and not null, `name` not null, `visits` an
    /// integer defaulting to 0.
    const CONTACTS: &'static str;
    /// Words of the dialect's duplicate key error (`duplicate key`, `error 1062`, `UNIQUE`).
    const DUPLICATE_KEY: &'static str;
    /// Words of the dialect's not-null error (`not-null`, `error 1048`, `NOT NULL`).
    const NOT_NULL: &'static str;
    /// A fresh, empty database; `name` tells the tests' databases apart.
    async fn create(name: &str) -> Self;
    /// Runs SQL statements on it.
    async fn exec(&self, sql: &str);
    /// The table connector for `table` of its default schema.
    async fn connector(&self, table: &str) -> Arc<dyn Connector>;
    /// The rows of `contacts` as (email, name, visits), by email.
    async fn contacts(&self) -> Vec<(String, String, i64)>;
}

fn text(s: &str) -> Value {
    Value::Text(s.to_owned())
}

fn key_only(pairs: &[(&str, Value)]) -> Record {
    Record {
        key: format!("{pairs:?}"),
        identity: pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect(),
        fields: Document::new().into(),
    }
}

/// A contact matched on its email.
fn contact(email: &str, name: &str, visits: i64) -> Record {
    let fields: Document = [
        ("email".to_owned(), text(email)),
        ("name".to_owned(), text(name)),
        ("visits".to_owned(), Value::Int(visits)),
    ]
    .into_iter()
    .collect();
    let identity = [("email".to_owned(), text(email))].into_iter().collect();
    Record {
        key: format!("{identity:?}"),
        identity,
        fields: fields.into(),
    }
}

/// Run against every dialect by [`table_suite!`].
pub async fn upsert_creates_rows_then_updates_exactly_the_changed_ones<F: TableFixture>() {
    let db = F::create("tbl_upsert").await;
    db.exec(F::CONTACTS).await;
    let c = db.connector("contacts").await;
    c.check().await.unwrap();

    let first = vec![
        contact("a@x.io", "Ann", 1),
        contact("b@x.io", "Bob", 2),
        contact("c@x.io", "Cy", 3),
    ];
    let outcomes = c.send(Operation::Upsert, &first).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 3]);

    let second = vec![contact("b@x.io", "Bobby", 20), contact("d@x.io", "Di", 4)];
    let outcomes = c.send(Operation::Upsert, &second).await.unwrap();
    assert_eq!(outcomes, vec![RecordOutcome::Accepted; 2]);

    assert_eq!(
        db.contacts().await,
        vec![
            ("a@x.io".into(), "Ann".into(), 1),
            ("b@x.io".into(), "Bobby".into(), 20),
            ("c@x.io".into(), "Cy".into(), 3),
            ("d@x.io".into(), "Di".into(), 4),
        ]
    );
}

/// Run against every dialect by [`table_suite!`].
pub async fn inserting_a_duplicate_rejects_the_batch<F: TableFixture>() {
    let db = F::create("tbl_dup").await;
    db.exec(F::CONTACTS).await;
    let c = db.connector("contacts").await;
    c.send(Operation::Insert, &[contact("a@x.io", "Ann", 1)])
        .await
        .unwrap();

    let err = c
        .send(
            Operation::Insert,
            &[contact("b@x.io", "Bob", 2), contact("a@x.io", "Ann again", 1)],
        )
        .await
        .unwrap_err();
    match err {
        SendError::BatchRejected(reason) => assert!(reason.contains(F::DUPLICATE_KEY), "{reason}"),
        other => panic!("expected BatchRejected, got {other:?}"),
    }
    // The transaction rolled back: Bob was not written either.
    assert_eq!(db.contacts().await, vec![("a@x.io".into(), "Ann".into(), 1)]);
}

/// Run against every dialect by [`table_suite!`].
pub async fn updating_a_missing_record_rejects_only_that_record<F: TableFixture>() {
    let db = F::create("tbl_update").await;
    db.exec(F::CONTACTS).await;
    let c = db.connector("contacts").await;
    c.send(
        Operation::Upsert,
        &[contact("a@x.io", "Ann", 1), contact("b@x.io", "Bob", 2)],
    )
    .await
    .unwrap();

    let outcomes = c
        .send(
            Operation::Update,
            &[
                contact("a@x.io", "Ann", 1),
                contact("ghost@x.io", "Nobody", 9),
                contact("b@x.io", "Rob", 5),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        vec![
            RecordOutcome::Accepted,
            RecordOutcome::Rejected("no existing record matches the match fields".into()),
            RecordOutcome::Accepted,
        ]
    );
    assert_eq!(
        db.contacts().await,
        vec![
            ("a@x.io".into(), "Ann".into(), 1),
            ("b@x.io".into(), "Rob".into(), 5)
        ]
    );
}

/// Run against every dialect by [`table_suite!`].
pub async fn delete_removes_rows_and_is_idempotent<F: TableFixture>() {
    let db = F::create("tbl_delete").await;
    db.exec(F::CONTACTS).await;
    let c = db.connector("contacts").await;
    c.send(
        Operation::Upsert,
        &[
            contact("a@x.io", "Ann", 1),
            contact("b@x.io", "Bob", 2),
            contact("c@x.io", "Cy", 3),
        ],
    )
    .await
    .unwrap();

    let gone = vec![
        key_only(&[("email", text("a@x.io"))]),
        key_only(&[("email", text("c@x.io"))]),
    ];
    assert_eq!(
        c.send(Operation::Delete, &gone).await.unwrap(),
        vec![RecordOutcome::Accepted; 2]
    );
    assert_eq!(db.contacts().await, vec![("b@x.io".into(), "Bob".into(), 2)]);

    assert_eq!(
        c.send(Operation::Delete, &gone).await.unwrap(),
        vec![RecordOutcome::Accepted; 2]
    );
    assert_eq!(db.contacts().await, vec![("b@x.io".into(), "Bob".into(), 2)]);
}

/// Declares the suite's tests for a [`TableFixture`]: `table_suite!(Pg);`.
/// Run against every dialect by [`table_suite!`].
pub async fn a_not_null_violation_rejects_the_batch_and_writes_nothing<F: TableFixture>() {
    let db = F::create("tbl_notnull").await;
    db.exec(F::CONTACTS).await;
    let c = db.connector("contacts").await;
    let mut batch: Vec<Record> = (0..10)
        .map(|i| contact(&format!("{i}@x.io"), "Someone", i))
        .collect();
    batch[6].fields.insert("name".into(), Value::Null);

    let err = c.send(Operation::Upsert, &batch).await.unwrap_err();
    assert!(
        matches!(err, SendError::BatchRejected(ref r) if r.contains(F::NOT_NULL)),
        "{err:?}"
    );
    assert!(db.contacts().await.is_empty());

    // The machinery splits down to the record at fault; alone, it is rejected the same way.
    let err = c.send(Operation::Upsert, &batch[6..7]).await.unwrap_err();
    assert!(matches!(err, SendError::BatchRejected(_)), "{err:?}");
}

// Each test binary compiles `support`; only the table destination tests expand this.
#[allow(unused_macros)]
macro_rules! table_suite {
    ($fixture:ty) => {
        #[tokio::test]
        async fn upsert_creates_rows_then_updates_exactly_the_changed_ones() {
            support::table_suite::upsert_creates_rows_then_updates_exactly_the_changed_ones::<$fixture>()
                .await;
        }
        #[tokio::test]
        async fn inserting_a_duplicate_rejects_the_batch() {
            support::table_suite::inserting_a_duplicate_rejects_the_batch::<$fixture>().await;
        }
        #[tokio::test]
        async fn updating_a_missing_record_rejects_only_that_record() {
            support::table_suite::updating_a_missing_record_rejects_only_that_record::<$fixture>().await;
        }
        #[tokio::test]
        async fn delete_removes_rows_and_is_idempotent() {
            support::table_suite::delete_removes_rows_and_is_idempotent::<$fixture>().await;
        }
        #[tokio::test]
        async fn a_not_null_violation_rejects_the_batch_and_writes_nothing() {
            support::table_suite::a_not_null_violation_rejects_the_batch_and_writes_nothing::<$fixture>()
                .await;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use table_suite;
