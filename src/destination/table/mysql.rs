//! MySQL and MariaDB tables.
//!
//! Values are bound one parameter each, by variant: integers as `BIGINT`, exact decimals as
//! their canonical text (the server converts text to `DECIMAL` without rounding), dates and
//! times as typed `DATE`/`TIME`/`DATETIME` (the session runs in UTC, which sqlx sets), JSON,
//! objects and arrays as JSON text, UUIDs as hyphenated text.
//!
//! `INSERT … ON DUPLICATE KEY UPDATE` does not fail without a unique index: it silently
//! inserts duplicates. So before the first upsert on a set of match columns the connector
//! looks the index up in `information_schema` and refuses to run without one.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;

use sqlx::MySql;
use sqlx::error::DatabaseError;
use sqlx::mysql::{MySqlArguments, MySqlConnectOptions, MySqlDatabaseError, MySqlQueryResult};
use sqlx::pool::Pool;
use sqlx::query::Query;

use super::{Binding, ConnectionInfo, Dialect, Failure, Param, TableConnector, Target, json_text};
use crate::api::DestinationType;
use crate::destination::{Connector, DestinationError};
use crate::model::value::{Value, canonical_decimal};

/// The MySQL/MariaDB dialect.
pub(crate) struct My;

impl Dialect for My {
    type Db = MySql;
    const KIND: DestinationType = DestinationType::Mysql;
    const BINDING: Binding = Binding::Placeholders { max_params: 65_535 };
    const CONCURRENCY: usize = 4;

    fn quote(ident: &str) -> String {
        super::quote_with(ident, '`')
    }

    fn placeholder(_n: usize) -> String {
        "?".to_owned()
    }

    fn upsert_clause(match_cols: &[&str], update_cols: &[&str]) -> String {
        // `VALUES(col)` works on MariaDB and on MySQL 8 (deprecated there since 8.0.20 in
        // favour of a row alias that MariaDB does not understand).
        let sets = if update_cols.is_empty() {
            // Nothing to change: a no-op assignment keeps an existing row as it is.
            match_cols
                .first()
                .map(|c| {
                    let q = Self::quote(c);
                    format!("{q} = {q}")
                })
                .unwrap_or_default()
        } else {
            update_cols
                .iter()
                .map(|c| {
                    let q = Self::quote(c);
                    format!("{q} = VALUES({q})")
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(" ON DUPLICATE KEY UPDATE {sets}")
    }

    fn bind<'q>(
        query: Query<'q, MySql, MySqlArguments>,
        param: &Param<'_>,
    ) -> Query<'q, MySql, MySqlArguments> {
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
            Value::Date(d) => query.bind(*d),
            Value::Time(t) => query.bind(*t),
            Value::Timestamp(ts) => query.bind(ts.naive_utc()),
            Value::Uuid(u) => query.bind(u.hyphenated().to_string()),
            Value::Null | Value::Json(_) | Value::Array(_) | Value::Object(_) => query.bind(json_text(value)),
        }
    }

    fn rows_affected(result: &MySqlQueryResult) -> u64 {
        // sqlx connects with CLIENT_FOUND_ROWS, so an UPDATE counts the rows it matched, even
        // those it left unchanged.
        result.rows_affected()
    }

    fn classify(error: &dyn DatabaseError) -> Failure {
        let number = error
            .try_downcast_ref::<MySqlDatabaseError>()
            .map(MySqlDatabaseError::number);
        let sqlstate = error.code().map(|c| c.into_owned()).unwrap_or_default();
        classify_error(number.unwrap_or(0), &sqlstate)
    }

    fn code_label(error: &dyn DatabaseError) -> String {
        match error.try_downcast_ref::<MySqlDatabaseError>() {
            Some(e) => format!("error {}", e.number()),
            None => "no error number".to_owned(),
        }
    }

    async fn has_unique_index(
        pool: &Pool<MySql>,
        target: &Target,
        cols: &[String],
    ) -> Result<Option<bool>, sqlx::Error> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT CAST(INDEX_NAME AS CHAR), CAST(COLUMN_NAME AS CHAR) FROM information_schema.STATISTICS \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0",
        )
        .bind(target.schema.as_deref())
        .bind(&target.table)
        .fetch_all(pool)
        .await?;
        // Column names are case-insensitive in MySQL.
        let wanted: BTreeSet<String> = cols.iter().map(|c| c.to_lowercase()).collect();
        let mut indexes: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (index, column) in rows {
            indexes.entry(index).or_default().insert(column.to_lowercase());
        }
        if indexes.values().any(|set| *set == wanted) {
            return Ok(Some(true));
        }
        let tables: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.TABLES \
             WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
        )
        .bind(target.schema.as_deref())
        .bind(&target.table)
        .fetch_one(pool)
        .await?;
        // A missing table is reported by the upsert itself, with its own message.
        Ok((tables > 0).then_some(false))
    }
}

/// Sorts a MySQL/MariaDB error by number, then by SQLSTATE class
/// (<https://dev.mysql.com/doc/mysql-errors/8.0/en/server-error-reference.html>,
/// <https://mariadb.com/kb/en/mariadb-error-code-reference/>).
fn classify_error(number: u16, sqlstate: &str) -> Failure {
    match number {
        // no such table, unknown database
        1146 | 1049 => Failure::MissingTable,
        // unknown column
        1054 => Failure::MissingColumn,
        // access denied (login)
        1045 | 1044 | 1698 => Failure::Auth,
        // command / column denied, needs SUPER, read-only server or transaction
        1142 | 1143 | 1227 | 1370 | 1290 | 1792 | 1836 => Failure::Denied,
        // deadlock, lock wait timeout, too many connections, shutdown, connection killed,
        // query interrupted, lost connection (client codes)
        1213 | 1205 | 1040 | 1053 | 1927 | 1317 | 2006 | 2013 => Failure::Transient,
        // NOT NULL, duplicate, too long, out of range, truncated, incorrect value, bad date,
        // no default, foreign keys, CHECK (MySQL and MariaDB), invalid JSON
        1048 | 1062 | 1406 | 1264 | 1265 | 1366 | 1292 | 1364 | 1451 | 1452 | 1216 | 1217 | 3819 | 4025
        | 3140 | 1690 | 1411 | 1263 => Failure::Data,
        // A batch larger than max_allowed_packet: halves of it may fit.
        1153 => Failure::Data,
        _ => match sqlstate.get(..2) {
            Some("22" | "23") => Failure::Data,
            Some("08" | "40") => Failure::Transient,
            Some("28") => Failure::Auth,
            _ => Failure::Fatal,
        },
    }
}

/// Builds a MySQL/MariaDB table connector from a `mysql://` URL.
pub(crate) fn connector(
    url: &str,
    target: Target,
    mut conn: ConnectionInfo,
) -> Result<Arc<dyn Connector>, DestinationError> {
    conn.expect_scheme(url, "mysql", &["mysql", "mariadb"])?;
    let options = MySqlConnectOptions::from_str(url).map_err(|_| conn.invalid_url("mysql://"))?;
    if options.get_socket().is_none() {
        conn.endpoint = Some((options.get_host().to_owned(), options.get_port()));
    }
    let pool = super::pool_options::<MySql>(super::POOL_SIZE).connect_lazy_with(options);
    Ok(Arc::new(TableConnector::<My>::new(pool, target, conn)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::table::plan;
    use crate::model::record::{Operation, Record};
    use crate::model::value::Document;

    fn record(identity: &[(&str, Value)], fields: &[(&str, Value)]) -> Record {
        let doc = |pairs: &[(&str, Value)]| -> Document {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
        };
        Record {
            key: "k".into(),
            identity: doc(identity).into(),
            fields: doc(fields).into(),
        }
    }

    #[test]
    fn records_with_different_fields_are_written_by_separate_statements_in_order() {
        let target = Target {
            schema: None,
            table: "t`x".into(),
        };
        let batch = vec![
            record(
                &[("id", Value::Int(1))],
                &[("id", Value::Int(1)), ("a", Value::Int(1))],
            ),
            record(
                &[("id", Value::Int(2))],
                &[("id", Value::Int(2)), ("b", Value::Int(2))],
            ),
            record(
                &[("id", Value::Int(3))],
                &[("id", Value::Int(3)), ("b", Value::Int(3))],
            ),
        ];
        let plan = plan::<My>(&target, Operation::Upsert, &batch);
        let sql: Vec<&str> = plan.statements.iter().map(|s| s.sql.as_str()).collect();
        assert_eq!(
            sql,
            vec![
                "INSERT INTO `t``x` (`a`, `id`) VALUES (?, ?) ON DUPLICATE KEY UPDATE `a` = VALUES(`a`)",
                "INSERT INTO `t``x` (`b`, `id`) VALUES (?, ?), (?, ?) ON DUPLICATE KEY UPDATE `b` = VALUES(`b`)",
            ]
        );
        assert_eq!(plan.statements[1].params.len(), 4);
    }

    #[test]
    fn composite_deletes_use_one_condition_per_record() {
        let target = Target {
            schema: Some("db".into()),
            table: "t".into(),
        };
        let key = |a: i64, b: &str| record(&[("a", Value::Int(a)), ("b", Value::Text(b.into()))], &[]);
        let batch = vec![key(1, "x"), key(2, "y")];
        let plan = plan::<My>(&target, Operation::Delete, &batch);
        assert_eq!(
            plan.statements[0].sql,
            "DELETE FROM `db`.`t` WHERE (`a` = ? AND `b` = ?) OR (`a` = ? AND `b` = ?)"
        );
    }

    #[test]
    fn error_numbers_sort_into_what_happens_next() {
        assert_eq!(classify_error(1062, "23000"), Failure::Data);
        assert_eq!(classify_error(1213, "40001"), Failure::Transient);
        assert_eq!(classify_error(1205, "HY000"), Failure::Transient);
        assert_eq!(classify_error(1146, "42S02"), Failure::MissingTable);
        assert_eq!(classify_error(1045, "28000"), Failure::Auth);
        assert_eq!(classify_error(1064, "42000"), Failure::Fatal);
    }
}
