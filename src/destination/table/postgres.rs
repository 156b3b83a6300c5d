//! PostgreSQL tables (also CockroachDB, AlloyDB and other wire-compatible servers).
//!
//! Rows travel as one `jsonb` array per statement and are turned into the table's row type
//! by `jsonb_populate_recordset(NULL::table, $1)`: the server converts each JSON value with
//! its column's own input function, so `int8`, exact `numeric`, `timestamptz`, `uuid`,
//! `jsonb`, `date` and array columns all receive correctly typed values without the
//! connector knowing the column types, and a batch needs one bind parameter whatever its size.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::error::DatabaseError;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgConnection, PgQueryResult};
use sqlx::query::Query;
use sqlx::{Pool, Postgres};

use super::{Binding, ConnectionInfo, Dialect, Failure, Param, TableConnector, Target, json_text};
use crate::api::DestinationType;
use crate::destination::{Connector, DestinationError};
use crate::model::value::Value;

/// The PostgreSQL dialect.
pub(crate) struct Pg;

impl Dialect for Pg {
    type Db = Postgres;
    const KIND: DestinationType = DestinationType::Postgres;
    const BINDING: Binding = Binding::JsonRecordset;
    const CONCURRENCY: usize = 4;

    fn quote(ident: &str) -> String {
        super::quote_with(ident, '"')
    }

    fn placeholder(n: usize) -> String {
        format!("${n}")
    }

    fn upsert_clause(match_cols: &[&str], update_cols: &[&str]) -> String {
        super::on_conflict_clause::<Self>(match_cols, update_cols)
    }

    fn bind<'q>(
        query: Query<'q, Postgres, PgArguments>,
        param: &Param<'_>,
    ) -> Query<'q, Postgres, PgArguments> {
        match param {
            Param::Json(text) => query.bind(text.clone()),
            // The planner sends PostgreSQL only JSON; text is the input every type accepts.
            // A JSON null is a value: `null` as JSON text, not SQL NULL.
            Param::Value(Value::Json(serde_json::Value::Null)) => query.bind("null".to_owned()),
            Param::Value(v) if v.is_null() => query.bind(None::<String>),
            Param::Value(Value::Text(s)) => query.bind(s.clone()),
            Param::Value(v) => query.bind(json_text(v)),
        }
    }

    fn rows_affected(result: &PgQueryResult) -> u64 {
        result.rows_affected()
    }

    fn classify(error: &dyn DatabaseError) -> Failure {
        let code = error.code().map(|c| c.into_owned()).unwrap_or_default();
        classify_sqlstate(&code)
    }

    fn code_label(error: &dyn DatabaseError) -> String {
        match error.code() {
            Some(code) => format!("SQLSTATE {code}"),
            None => "no SQLSTATE".to_owned(),
        }
    }

    async fn has_unique_index(
        pool: &Pool<Postgres>,
        target: &Target,
        cols: &[String],
    ) -> Result<Option<bool>, sqlx::Error> {
        // The key columns of each unique index without a predicate or an expression (the
        // primary key is one): what `ON CONFLICT (cols)` can use.
        let indexes: Vec<Vec<String>> = sqlx::query_scalar(
            "SELECT array_agg(a.attname::text) FROM pg_index i \
             JOIN pg_attribute a ON a.attrelid = i.indrelid \
              AND a.attnum = ANY ((i.indkey::int2[])[0:i.indnkeyatts - 1]) \
             WHERE i.indrelid = to_regclass($1) AND i.indisunique \
              AND i.indpred IS NULL AND i.indexprs IS NULL \
             GROUP BY i.indexrelid",
        )
        .bind(target.sql::<Self>())
        .fetch_all(pool)
        .await?;
        let wanted: BTreeSet<&str> = cols.iter().map(String::as_str).collect();
        if indexes
            .iter()
            .any(|index| index.iter().map(String::as_str).collect::<BTreeSet<_>>() == wanted)
        {
            return Ok(Some(true));
        }
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(target.sql::<Self>())
            .fetch_one(pool)
            .await?;
        // A missing table is reported by the check's probe and the upsert, with their own message.
        Ok(exists.then_some(false))
    }

    async fn check_writable(conn: &mut PgConnection, target: &Target) -> Result<Option<String>, sqlx::Error> {
        // Any one of the three is enough for some sync mode; none means nothing can work.
        let writable: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'INSERT, UPDATE, DELETE')")
            .bind(target.sql::<Self>())
            .fetch_one(conn)
            .await?;
        Ok((!writable).then(|| {
            format!(
                "the database user may not write to table {}: grant it INSERT, UPDATE and DELETE",
                target.display()
            )
        }))
    }
}

/// Sorts a SQLSTATE (<https://www.postgresql.org/docs/current/errcodes-appendix.html>).
fn classify_sqlstate(code: &str) -> Failure {
    match code {
        "42P01" | "3F000" => Failure::MissingTable,
        "42703" => Failure::MissingColumn,
        // "there is no unique or exclusion constraint matching the ON CONFLICT specification"
        "42P10" => Failure::MissingUniqueIndex,
        "42501" => Failure::Denied,
        // serialization_failure, deadlock_detected, lock_not_available, query_canceled
        // (statement timeout), read-only transaction (a failover in progress).
        "40001" | "40P01" | "55P03" | "57014" | "25006" => Failure::Transient,
        // admin_shutdown, crash_shutdown, cannot_connect_now: the server is restarting.
        "57P01" | "57P02" | "57P03" => Failure::Transient,
        // "ON CONFLICT DO UPDATE command cannot affect row a second time": two records of
        // the batch share match values; splitting sends them apart.
        "21000" => Failure::Data,
        _ => match code.get(..2) {
            // Data exceptions, integrity constraints, limits hit by one value (index row
            // too large), and errors raised by the user's triggers.
            Some("22" | "23" | "54" | "P0") => Failure::Data,
            Some("08" | "53" | "40" | "58") => Failure::Transient,
            Some("28") => Failure::Auth,
            _ => Failure::Fatal,
        },
    }
}

/// Builds a PostgreSQL table connector from a `postgres://` URL.
pub(crate) fn connector(
    url: &str,
    target: Target,
    mut conn: ConnectionInfo,
) -> Result<Arc<dyn Connector>, DestinationError> {
    conn.expect_scheme(url, "postgres", &["postgres", "postgresql"])?;
    let mut options = PgConnectOptions::from_str(url).map_err(|_| conn.invalid_url("postgres://"))?;
    if options.get_socket().is_none() && !options.get_host().starts_with('/') {
        conn.endpoint = Some((options.get_host().to_owned(), options.get_port()));
    }
    if options.get_application_name().is_none() {
        options = options.application_name("backflow");
    }
    let pool = super::pool_options::<Postgres>(super::POOL_SIZE).connect_lazy_with(options);
    Ok(Arc::new(TableConnector::<Pg>::new(pool, target, conn)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::destination::table::{Plan, plan};
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
    fn an_upsert_batch_is_one_statement_with_one_json_parameter() {
        let target = Target {
            schema: Some("crm".into()),
            table: "contacts".into(),
        };
        let batch = vec![
            record(
                &[("email", Value::Text("a@x".into()))],
                &[("email", Value::Text("a@x".into())), ("order", Value::Int(1))],
            ),
            record(
                &[("email", Value::Text("b@x".into()))],
                &[("email", Value::Text("b@x".into())), ("order", Value::Int(2))],
            ),
        ];
        let Plan {
            statements,
            upsert_keys,
            ..
        } = plan::<Pg>(&target, Operation::Upsert, &batch);
        assert_eq!(statements.len(), 1);
        assert_eq!(
            statements[0].sql,
            "INSERT INTO \"crm\".\"contacts\" (\"email\", \"order\") SELECT \"email\", \"order\" FROM \
             jsonb_populate_recordset(NULL::\"crm\".\"contacts\", $1::jsonb) ON CONFLICT (\"email\") \
             DO UPDATE SET \"order\" = excluded.\"order\""
        );
        match &statements[0].params[..] {
            [Param::Json(json)] => {
                assert_eq!(json, r#"[{"email":"a@x","order":1},{"email":"b@x","order":2}]"#)
            }
            other => panic!("unexpected params {other:?}"),
        }
        assert_eq!(upsert_keys, vec![vec!["email".to_owned()]]);
    }

    #[test]
    fn sqlstates_sort_into_what_happens_next() {
        assert_eq!(classify_sqlstate("23505"), Failure::Data);
        assert_eq!(classify_sqlstate("22P02"), Failure::Data);
        assert_eq!(classify_sqlstate("40P01"), Failure::Transient);
        assert_eq!(classify_sqlstate("08006"), Failure::Transient);
        assert_eq!(classify_sqlstate("42P01"), Failure::MissingTable);
        assert_eq!(classify_sqlstate("42P10"), Failure::MissingUniqueIndex);
        assert_eq!(classify_sqlstate("28P01"), Failure::Auth);
        assert_eq!(classify_sqlstate("42601"), Failure::Fatal);
    }
}
