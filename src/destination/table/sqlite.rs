//! SQLite tables: a local file, created when missing so a quickstart needs no server.
//!
//! The database runs in WAL mode with a busy timeout, so readers never block the writer and
//! a second writer waits instead of failing. SQLite has one writer at a time, hence a default
//! concurrency of 1.
//!
//! Values are bound one parameter each: integers, floats and booleans natively; exact
//! decimals as their canonical text (store them in a TEXT column to keep every digit: a
//! NUMERIC or REAL column converts them to a double); dates, times and timestamps as
//! ISO 8601 text (`2024-03-01T10:00:00Z`), which SQLite's date functions read; JSON, objects
//! and arrays as JSON text.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::SecondsFormat;
use sqlx::error::DatabaseError;
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteConnectOptions, SqliteJournalMode, SqliteQueryResult};
use sqlx::{Pool, Sqlite};

use super::{Binding, ConnectionInfo, Dialect, Failure, Param, TableConnector, Target, json_text};
use crate::api::DestinationType;
use crate::destination::{Connector, DestinationError};
use crate::model::value::{Value, canonical_decimal};

/// How long a write waits for another writer to finish.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections per pool: one writes while the other answers `check()`.
const POOL_SIZE: u32 = 2;

/// The SQLite dialect.
pub(crate) struct Lite;

impl Dialect for Lite {
    type Db = Sqlite;
    const KIND: DestinationType = DestinationType::Sqlite;
    // SQLITE_MAX_VARIABLE_NUMBER's default since SQLite 3.32.
    const BINDING: Binding = Binding::Placeholders { max_params: 32_766 };
    const CONCURRENCY: usize = 1;

    fn quote(ident: &str) -> String {
        super::quote_with(ident, '"')
    }

    fn placeholder(n: usize) -> String {
        format!("?{n}")
    }

    fn upsert_clause(match_cols: &[&str], update_cols: &[&str]) -> String {
        super::on_conflict_clause::<Self>(match_cols, update_cols)
    }

    fn bind<'q>(
        query: Query<'q, Sqlite, SqliteArguments<'q>>,
        param: &Param<'_>,
    ) -> Query<'q, Sqlite, SqliteArguments<'q>> {
        let value = match param {
            Param::Json(text) => return query.bind(text.clone()),
            Param::Value(value) => *value,
        };
        match value {
            // A JSON null is a value: `null` as JSON text, not SQL NULL.
            Value::Json(serde_json::Value::Null) => query.bind("null".to_owned()),
            v if v.is_null() => query.bind(None::<String>),
            Value::Bool(b) => query.bind(*b),
            Value::Int(i) => query.bind(*i),
            Value::Decimal(d) => query.bind(canonical_decimal(d)),
            Value::Float(f) => query.bind(*f),
            Value::Text(s) => query.bind(s.clone()),
            Value::Uuid(u) => query.bind(u.hyphenated().to_string()),
            // The same ISO 8601 forms as the canonical value model.
            Value::Date(d) => query.bind(d.format("%Y-%m-%d").to_string()),
            Value::Time(t) => query.bind(t.format("%H:%M:%S%.f").to_string()),
            Value::Timestamp(ts) => query.bind(ts.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Value::Null | Value::Json(_) | Value::Array(_) | Value::Object(_) => query.bind(json_text(value)),
        }
    }

    fn rows_affected(result: &SqliteQueryResult) -> u64 {
        result.rows_affected()
    }

    fn classify(error: &dyn DatabaseError) -> Failure {
        let code = error.code().and_then(|c| c.parse::<i32>().ok()).unwrap_or(1);
        classify_error(code, error.message())
    }

    fn code_label(error: &dyn DatabaseError) -> String {
        match error.code() {
            Some(code) => format!("SQLite code {code}"),
            None => "no SQLite code".to_owned(),
        }
    }

    async fn has_unique_index(
        pool: &Pool<Sqlite>,
        target: &Target,
        cols: &[String],
    ) -> Result<Option<bool>, sqlx::Error> {
        let schema = target.schema.as_deref().unwrap_or("main");
        let columns: Vec<(String, i64)> = sqlx::query_as("SELECT name, pk FROM pragma_table_info(?1, ?2)")
            .bind(&target.table)
            .bind(schema)
            .fetch_all(pool)
            .await?;
        if columns.is_empty() {
            // A missing table is reported by the check's probe and the upsert themselves.
            return Ok(None);
        }
        // Column names are case-insensitive in SQLite.
        let wanted: BTreeSet<String> = cols.iter().map(|c| c.to_lowercase()).collect();
        // The primary key, listed here because an INTEGER PRIMARY KEY has no index of its own.
        let primary_key: BTreeSet<String> = columns
            .iter()
            .filter(|(_, pk)| *pk > 0)
            .map(|(name, _)| name.to_lowercase())
            .collect();
        if primary_key == wanted {
            return Ok(Some(true));
        }
        let rows: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT il.name, ii.name FROM pragma_index_list(?1, ?2) AS il, pragma_index_info(il.name, ?2) AS ii \
             WHERE il.\"unique\" = 1 AND il.partial = 0",
        )
        .bind(&target.table)
        .bind(schema)
        .fetch_all(pool)
        .await?;
        // An expression column (no name) keeps its index from ever matching.
        let mut indexes: BTreeMap<String, Option<BTreeSet<String>>> = BTreeMap::new();
        for (index, column) in rows {
            let entry = indexes.entry(index).or_insert_with(|| Some(BTreeSet::new()));
            match (entry.as_mut(), column) {
                (Some(set), Some(column)) => {
                    set.insert(column.to_lowercase());
                }
                _ => *entry = None,
            }
        }
        Ok(Some(indexes.values().flatten().any(|set| *set == wanted)))
    }
}

/// Sorts an extended result code (<https://www.sqlite.org/rescode.html>). Plain
/// `SQLITE_ERROR` covers schema problems too, told apart by message.
fn classify_error(code: i32, message: &str) -> Failure {
    match code & 0xff {
        // CONSTRAINT (unique, not null, check, foreign key, datatype), TOOBIG, MISMATCH
        18..=20 => Failure::Data,
        // BUSY, LOCKED, IOERR, FULL, PROTOCOL
        5 | 6 | 10 | 13 | 15 => Failure::Transient,
        // PERM, READONLY, AUTH
        3 | 8 | 23 => Failure::Denied,
        1 if message.starts_with("no such table") || message.starts_with("unknown database") => {
            Failure::MissingTable
        }
        1 if message.contains("has no column named") || message.starts_with("no such column") => {
            Failure::MissingColumn
        }
        1 if message.contains("ON CONFLICT clause does not match") => Failure::MissingUniqueIndex,
        _ => Failure::Fatal,
    }
}

/// Builds a SQLite table connector from a `sqlite://path` URL.
pub(crate) fn connector(
    url: &str,
    target: Target,
    conn: ConnectionInfo,
) -> Result<Arc<dyn Connector>, DestinationError> {
    conn.expect_scheme(url, "sqlite", &["sqlite"])?;
    let options = SqliteConnectOptions::from_str(url)
        .map_err(|_| conn.invalid_url("sqlite://"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(BUSY_TIMEOUT);
    let pool = super::pool_options::<Sqlite>(POOL_SIZE).connect_lazy_with(options);
    Ok(Arc::new(TableConnector::<Lite>::new(pool, target, conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_codes_sort_into_what_happens_next() {
        assert_eq!(
            classify_error(2067, "UNIQUE constraint failed: t.id"),
            Failure::Data
        );
        assert_eq!(
            classify_error(1299, "NOT NULL constraint failed: t.name"),
            Failure::Data
        );
        assert_eq!(classify_error(5, "database is locked"), Failure::Transient);
        assert_eq!(classify_error(1, "no such table: t"), Failure::MissingTable);
        assert_eq!(
            classify_error(1, "table t has no column named x"),
            Failure::MissingColumn
        );
        assert_eq!(
            classify_error(
                1,
                "ON CONFLICT clause does not match any PRIMARY KEY or UNIQUE constraint"
            ),
            Failure::MissingUniqueIndex
        );
        assert_eq!(classify_error(1, "near \"x\": syntax error"), Failure::Fatal);
    }
}
