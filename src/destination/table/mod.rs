//! Database table destinations (`type: postgres`, `mysql`, `sqlite`): write mapped records
//! into a table.
//!
//! The columns written are the top-level keys of each record's `fields`; nested objects,
//! arrays and JSON values go in as JSON. The match columns (the upsert conflict target and
//! the `WHERE` of updates and deletes) are the keys of the record's `identity`.
//!
//! Everything that is the same across databases lives here, once: reading the connection URL,
//! planning a batch into statements, running them in one transaction, turning per-statement
//! row counts into per-record outcomes, and turning driver errors into [`SendError`]s. Each
//! database's file is a `Dialect`: identifier quoting, the upsert clause, value binding and
//! error classification.
//!
//! Records of a batch that carry different field sets are not padded with NULLs (that would
//! blank columns a record never mentioned): consecutive records with the same columns form a
//! group, and each group is written by its own statements, in batch order, in the same
//! transaction.

mod mysql;
mod postgres;
mod sqlite;

use crate::redact::Scrubber;
use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::error::DatabaseError;
use sqlx::pool::Pool;
use sqlx::query::Query;
use sqlx::{ConnectOptions, Connection, Database, Executor, IntoArguments};

use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::{DestinationSpec, DestinationType};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value, canonical_bytes, write_document};

/// Most records in one batch. Far below every database's bind-parameter limit for tables
/// of ordinary width; wider rows are split into several statements by parameter count.
pub const MAX_BATCH_SIZE: usize = 500;

/// Connections per destination pool (per sync run that shares the connector).
pub(crate) const POOL_SIZE: u32 = 4;

/// How long a send waits for a pooled connection before calling the failure transient.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long `check()` waits for a connection.
const CHECK_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The reason given for an update that matched no row. Never holds a payload value.
pub const NO_MATCH_REASON: &str = "no existing record matches the match fields";

/// Builds the table connector for a `postgres`, `mysql` or `sqlite` Destination.
///
/// The connection URL is read from the credentials Secret (key `url` unless
/// `credentialsSecretRef.key` names another). The pool connects lazily: [`Connector::check`]
/// is what proves the database answers.
pub async fn build(
    spec: &DestinationSpec,
    secret: Option<&SecretData>,
) -> Result<Arc<dyn Connector>, DestinationError> {
    let kind = spec.destination_type;
    let (block, connector): (_, ConnectorFn) = match kind {
        DestinationType::Postgres => (spec.postgres.as_ref(), postgres::connector),
        DestinationType::Mysql => (spec.mysql.as_ref(), mysql::connector),
        DestinationType::Sqlite => (spec.sqlite.as_ref(), sqlite::connector),
        // Every other type has its own connector; `destination::build` never sends it here.
        _ => {
            return Err(DestinationError::Invalid(format!(
                "type {} is not a database table destination",
                kind.as_str()
            )));
        }
    };
    let block = block.ok_or(DestinationError::MissingBlock(kind.as_str()))?;

    if block.table.is_empty() {
        return Err(DestinationError::Invalid(format!(
            "spec.{}.table must not be empty",
            kind.as_str()
        )));
    }
    let target = Target {
        schema: block.schema.clone().filter(|s| !s.is_empty()),
        table: block.table.clone(),
    };

    let secret_ref = spec
        .credentials_secret_ref
        .as_ref()
        .ok_or(DestinationError::MissingCredentials(kind.as_str()))?;
    let key = secret_ref.key.as_deref().unwrap_or("url");
    let url = secret
        .and_then(|s| s.get(key))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| DestinationError::MissingSecretKey {
            secret: secret_ref.name.clone(),
            key: key.to_owned(),
        })?;
    let conn = ConnectionInfo {
        scrubber: Scrubber::new().with_url(url).with_secret(secret),
        location: crate::redact::describe_url(url),
        secret_name: secret_ref.name.clone(),
        secret_key: key.to_owned(),
        endpoint: None,
    };

    connector(url, target, conn)
}

/// A dialect's constructor: URL, table and connection details to a connector.
type ConnectorFn = fn(&str, Target, ConnectionInfo) -> Result<Arc<dyn Connector>, DestinationError>;

/// Where the connection came from and how to keep its secrets out of messages.
pub(crate) struct ConnectionInfo {
    /// Removes the URL, its password and every Secret value from messages.
    pub(crate) scrubber: Scrubber,
    /// Scheme, host, port and database, without credentials.
    pub(crate) location: String,
    /// The Secret the URL came from (for configuration errors).
    pub(crate) secret_name: String,
    /// The key inside that Secret.
    pub(crate) secret_key: String,
    /// Host and port the pool connects to (none for a file or a Unix socket), checked
    /// against the egress policy before the first connection.
    pub(crate) endpoint: Option<(String, u16)>,
}

impl ConnectionInfo {
    /// The error for a URL the driver cannot parse; never repeats the URL.
    pub(crate) fn invalid_url(&self, expected: &str) -> DestinationError {
        DestinationError::Invalid(format!(
            "key {:?} of Secret {:?} is not a valid {expected} connection URL",
            self.secret_key, self.secret_name
        ))
    }

    /// Checks the URL's scheme against the destination type (the scheme is not secret).
    pub(crate) fn expect_scheme(
        &self,
        url: &str,
        kind: &str,
        schemes: &[&str],
    ) -> Result<(), DestinationError> {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
        if schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
            Ok(())
        } else {
            Err(DestinationError::Invalid(format!(
                "type {kind} needs a {}:// URL in key {:?} of Secret {:?}, not a {scheme:?} one",
                schemes.first().copied().unwrap_or(kind),
                self.secret_key,
                self.secret_name
            )))
        }
    }
}

/// The table a connector writes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// Schema (PostgreSQL), database (MySQL) or attached database (SQLite); `None` = the
    /// connection's default.
    pub(crate) schema: Option<String>,
    /// Table name, as written in the spec.
    pub(crate) table: String,
}

impl Target {
    /// The name for messages: `schema.table` as the user wrote it.
    pub(crate) fn display(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.table),
            None => self.table.clone(),
        }
    }

    /// The quoted, qualified name for SQL.
    pub(crate) fn sql<D: Dialect>(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{}.{}", D::quote(schema), D::quote(&self.table)),
            None => D::quote(&self.table),
        }
    }
}

/// Quotes an identifier with `quote`, doubling any embedded quote character.
pub(crate) fn quote_with(ident: &str, quote: char) -> String {
    let mut out = String::with_capacity(ident.len() + 2);
    out.push(quote);
    for c in ident.chars() {
        if c == quote {
            out.push(quote);
        }
        out.push(c);
    }
    out.push(quote);
    out
}

/// What went wrong, as far as what happens next is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The batch's content (a constraint, a value the column refuses): split to find the
    /// record at fault.
    Data,
    /// May pass on retry (connection lost, deadlock, server busy or restarting).
    Transient,
    /// The table (or its schema) does not exist.
    MissingTable,
    /// A written field has no column.
    MissingColumn,
    /// An upsert has no unique index on its match columns to conflict on.
    MissingUniqueIndex,
    /// The login was refused.
    Auth,
    /// The user lacks a privilege, or the database is read-only to it.
    Denied,
    /// Anything else a person must look at.
    Fatal,
}

/// How a dialect passes row values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    /// One bind parameter per value (`VALUES (?, ?), (?, ?)`), at most `max_params` per
    /// statement.
    Placeholders {
        /// The database's bind-parameter limit.
        max_params: usize,
    },
    /// The rows as one JSON array, converted by the database to the table's row type
    /// (`jsonb_populate_recordset(NULL::table, $1)`), so each value is cast to its column's
    /// real type by the server.
    JsonRecordset,
}

/// One bind parameter.
#[derive(Debug)]
pub(crate) enum Param<'a> {
    /// A value of a record, bound by its variant.
    Value(&'a Value),
    /// JSON text (a row or an array of rows).
    Json(String),
}

/// The text bound for a JSON-like value (objects, arrays, JSON): canonical JSON.
pub(crate) fn json_text(value: &Value) -> String {
    let mut out = Vec::new();
    value.write_canonical(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// What one database does differently. Implemented by zero-sized types in the sibling files.
pub(crate) trait Dialect: Send + Sync + 'static {
    /// The sqlx driver.
    type Db: Database;

    /// The destination type (for messages naming `spec.<type>.table`).
    const KIND: DestinationType;

    /// How values are bound.
    const BINDING: Binding;

    /// Default requests in flight at once.
    const CONCURRENCY: usize;

    /// Quotes an identifier.
    fn quote(ident: &str) -> String;

    /// The `n`th (1-based) bind placeholder.
    fn placeholder(n: usize) -> String;

    /// The clause after `INSERT … VALUES …` that turns it into an upsert.
    fn upsert_clause(match_cols: &[&str], update_cols: &[&str]) -> String;

    /// Binds one parameter.
    fn bind<'q>(
        query: Query<'q, Self::Db, <Self::Db as Database>::Arguments<'q>>,
        param: &Param<'_>,
    ) -> Query<'q, Self::Db, <Self::Db as Database>::Arguments<'q>>;

    /// Rows a statement touched (for updates: rows it matched).
    fn rows_affected(result: &<Self::Db as Database>::QueryResult) -> u64;

    /// Sorts a database error.
    fn classify(error: &dyn DatabaseError) -> Failure;

    /// The error's code as users search for it (`SQLSTATE 23505`, `error 1062`).
    fn code_label(error: &dyn DatabaseError) -> String;

    /// Whether the table has a unique index (or primary key) on exactly these columns:
    /// `None` when the database reports a missing one itself when the upsert runs.
    fn has_unique_index(
        _pool: &Pool<Self::Db>,
        _target: &Target,
        _cols: &[String],
    ) -> impl Future<Output = Result<Option<bool>, sqlx::Error>> + Send {
        async { Ok(None) }
    }

    /// A reason the table does not look writable to this user, if the dialect can tell.
    fn check_writable(
        _conn: &mut <Self::Db as Database>::Connection,
        _target: &Target,
    ) -> impl Future<Output = Result<Option<String>, sqlx::Error>> + Send {
        async { Ok(None) }
    }
}

/// One statement of a batch and its parameters.
#[derive(Debug)]
pub(crate) struct Statement<'a> {
    /// SQL text.
    pub(crate) sql: String,
    /// Bind parameters, in placeholder order.
    pub(crate) params: Vec<Param<'a>>,
    /// The record whose outcome is "matched a row or not" (updates).
    pub(crate) must_match: Option<usize>,
}

/// A batch as statements, with the outcomes of records refused before any SQL ran.
#[derive(Debug)]
pub(crate) struct Plan<'a> {
    /// Statements to run, in order, in one transaction.
    pub(crate) statements: Vec<Statement<'a>>,
    /// One outcome per record; `Accepted` until something says otherwise.
    pub(crate) outcomes: Vec<RecordOutcome>,
    /// Distinct match-column sets of the upserts (their unique indexes are needed).
    pub(crate) upsert_keys: Vec<Vec<String>>,
}

/// A record as written: its fields, plus any identity value its fields lack.
fn row_of(record: &Record) -> Cow<'_, Document> {
    if record.identity.keys().all(|k| record.fields.contains_key(k)) {
        Cow::Borrowed(&*record.fields)
    } else {
        let mut doc = (*record.fields).clone();
        for (k, v) in &record.identity {
            doc.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Cow::Owned(doc)
    }
}

/// Records' indexes grouped into consecutive runs with equal `key(record)`.
fn consecutive_groups<K: PartialEq>(items: impl Iterator<Item = (usize, K)>) -> Vec<(K, Vec<usize>)> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (i, key) in items {
        match groups.last_mut() {
            Some((k, members)) if *k == key => members.push(i),
            _ => groups.push((key, vec![i])),
        }
    }
    groups
}

/// The members of an upsert group without the records a later one with the same match
/// values supersedes. Within a group every record writes the same columns, so keeping the
/// last is exactly what upserting them one after the other would leave; and PostgreSQL
/// refuses a statement that would update one row twice.
fn last_per_identity(
    batch: &[Record],
    rows: &[(usize, Cow<'_, Document>)],
    members: Vec<usize>,
) -> Vec<usize> {
    let mut seen = HashSet::new();
    let mut kept: Vec<usize> = members
        .into_iter()
        .rev()
        .filter(|pos| seen.insert(canonical_bytes(&batch[rows[*pos].0].identity)))
        .collect();
    kept.reverse();
    kept
}

fn join_quoted<D: Dialect>(cols: &[&str]) -> String {
    cols.iter().map(|c| D::quote(c)).collect::<Vec<_>>().join(", ")
}

/// `ON CONFLICT (…) DO UPDATE SET c = excluded.c …`, shared by PostgreSQL and SQLite.
pub(crate) fn on_conflict_clause<D: Dialect>(match_cols: &[&str], update_cols: &[&str]) -> String {
    let target = join_quoted::<D>(match_cols);
    if update_cols.is_empty() {
        return format!(" ON CONFLICT ({target}) DO NOTHING");
    }
    let sets = update_cols
        .iter()
        .map(|c| {
            let q = D::quote(c);
            format!("{q} = excluded.{q}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(" ON CONFLICT ({target}) DO UPDATE SET {sets}")
}

/// Plans a batch into statements for dialect `D`.
pub(crate) fn plan<'a, D: Dialect>(target: &Target, operation: Operation, batch: &'a [Record]) -> Plan<'a> {
    let table = target.sql::<D>();
    let mut outcomes = vec![RecordOutcome::Accepted; batch.len()];
    let mut statements = Vec::new();
    let mut upsert_keys: Vec<Vec<String>> = Vec::new();

    match operation {
        Operation::Upsert | Operation::Insert => {
            let rows: Vec<(usize, Cow<'a, Document>)> = batch
                .iter()
                .enumerate()
                .filter_map(|(i, r)| {
                    if operation == Operation::Upsert && r.identity.is_empty() {
                        outcomes[i] = RecordOutcome::Rejected("the record has no match fields".to_owned());
                        None
                    } else if r.fields.is_empty() && r.identity.is_empty() {
                        outcomes[i] = RecordOutcome::Rejected("the record has no fields to write".to_owned());
                        None
                    } else {
                        Some((i, row_of(r)))
                    }
                })
                .collect();
            let groups = consecutive_groups(rows.iter().enumerate().map(|(pos, (i, doc))| {
                let cols: Vec<&str> = doc.keys().map(String::as_str).collect();
                let keys: Vec<&str> = if operation == Operation::Upsert {
                    batch[*i].identity.keys().map(String::as_str).collect()
                } else {
                    Vec::new()
                };
                (pos, (cols, keys))
            }));
            for ((cols, keys), members) in groups {
                let members = if operation == Operation::Upsert {
                    last_per_identity(batch, &rows, members)
                } else {
                    members
                };
                let update_cols: Vec<&str> = cols.iter().copied().filter(|c| !keys.contains(c)).collect();
                let conflict = if operation == Operation::Upsert {
                    let owned: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
                    if !upsert_keys.contains(&owned) {
                        upsert_keys.push(owned);
                    }
                    D::upsert_clause(&keys, &update_cols)
                } else {
                    String::new()
                };
                statements.extend(insert_statements::<D>(
                    &table, batch, &rows, &cols, &members, &conflict,
                ));
            }
        }
        Operation::Update => {
            for (i, record) in batch.iter().enumerate() {
                if record.identity.is_empty() {
                    outcomes[i] = RecordOutcome::Rejected("the record has no match fields".to_owned());
                    continue;
                }
                if record.fields.is_empty() {
                    outcomes[i] = RecordOutcome::Rejected("the record has no fields to write".to_owned());
                    continue;
                }
                let keys: Vec<&str> = record.identity.keys().map(String::as_str).collect();
                let mut set_cols: Vec<&str> = record
                    .fields
                    .keys()
                    .map(String::as_str)
                    .filter(|c| !keys.contains(c))
                    .collect();
                if set_cols.is_empty() {
                    // Only match fields: setting them to themselves still tells whether a row
                    // matched.
                    set_cols = record.fields.keys().map(String::as_str).collect();
                }
                statements.push(update_statement::<D>(&table, i, record, &set_cols, &keys));
            }
        }
        Operation::Delete => {
            let groups = consecutive_groups(batch.iter().enumerate().filter_map(|(i, r)| {
                if r.identity.is_empty() {
                    outcomes[i] = RecordOutcome::Rejected("the record has no match fields".to_owned());
                    None
                } else {
                    Some((i, r.identity.keys().map(String::as_str).collect::<Vec<_>>()))
                }
            }));
            for (keys, members) in groups {
                statements.extend(delete_statements::<D>(&table, batch, &keys, &members));
            }
        }
    }

    if operation != Operation::Delete && matches!(D::BINDING, Binding::JsonRecordset) {
        statements.extend(json_null_statements::<D>(&table, batch, &outcomes));
    }
    Plan {
        statements,
        outcomes,
        upsert_keys,
    }
}

/// PostgreSQL reads rows through `jsonb_populate_recordset`, which turns a JSON `null` into
/// SQL NULL: records holding a JSON null (a `jsonb` `'null'` of the model) get it written
/// afterwards, as the literal `'null'` the column's type reads (JSON null in a json/jsonb
/// column), by their match fields. Rare, so one statement per such record.
fn json_null_statements<'a, D: Dialect>(
    table: &str,
    batch: &'a [Record],
    outcomes: &[RecordOutcome],
) -> Vec<Statement<'a>> {
    let mut statements = Vec::new();
    for (record, outcome) in batch.iter().zip(outcomes) {
        let nulls: Vec<&str> = record
            .fields
            .iter()
            .filter(|(_, v)| matches!(v, Value::Json(serde_json::Value::Null)))
            .map(|(k, _)| k.as_str())
            .collect();
        if nulls.is_empty() || record.identity.is_empty() || *outcome != RecordOutcome::Accepted {
            continue;
        }
        let sets = nulls
            .iter()
            .map(|c| format!("{} = 'null'", D::quote(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let keys: Vec<&str> = record.identity.keys().map(String::as_str).collect();
        let mut identity = Vec::new();
        write_document(&record.identity, &mut identity);
        statements.push(Statement {
            sql: format!(
                "UPDATE {table} AS _bf_target SET {sets} \
                 FROM jsonb_populate_record(NULL::{table}, {}::jsonb) AS _bf_key WHERE {}",
                D::placeholder(1),
                target_matches_key::<D>(&keys)
            ),
            params: vec![Param::Json(String::from_utf8_lossy(&identity).into_owned())],
            must_match: None,
        });
    }
    statements
}

/// `INSERT` statements (with `conflict` appended: the upsert clause or nothing) for one group
/// of rows writing the same columns.
fn insert_statements<'a, D: Dialect>(
    table: &str,
    batch: &'a [Record],
    rows: &[(usize, Cow<'a, Document>)],
    cols: &[&str],
    members: &[usize],
    conflict: &str,
) -> Vec<Statement<'a>> {
    let col_list = join_quoted::<D>(cols);
    match D::BINDING {
        Binding::JsonRecordset => {
            let mut json = vec![b'['];
            for (n, pos) in members.iter().enumerate() {
                if n > 0 {
                    json.push(b',');
                }
                write_document(&rows[*pos].1, &mut json);
            }
            json.push(b']');
            vec![Statement {
                sql: format!(
                    "INSERT INTO {table} ({col_list}) SELECT {col_list} FROM \
                     jsonb_populate_recordset(NULL::{table}, {}::jsonb){conflict}",
                    D::placeholder(1)
                ),
                params: vec![Param::Json(String::from_utf8_lossy(&json).into_owned())],
                must_match: None,
            }]
        }
        Binding::Placeholders { max_params } => {
            let per_statement = (max_params / cols.len().max(1)).max(1);
            members
                .chunks(per_statement)
                .map(|chunk| {
                    let mut params = Vec::with_capacity(chunk.len() * cols.len());
                    let mut tuples = Vec::with_capacity(chunk.len());
                    for pos in chunk {
                        let record = &batch[rows[*pos].0];
                        let mut holders = Vec::with_capacity(cols.len());
                        for col in cols {
                            // Same lookup order as `row_of`: fields, then identity.
                            let value = record
                                .fields
                                .get(*col)
                                .or_else(|| record.identity.get(*col))
                                .unwrap_or(&Value::Null);
                            params.push(Param::Value(value));
                            holders.push(D::placeholder(params.len()));
                        }
                        tuples.push(format!("({})", holders.join(", ")));
                    }
                    Statement {
                        sql: format!(
                            "INSERT INTO {table} ({col_list}) VALUES {}{conflict}",
                            tuples.join(", ")
                        ),
                        params,
                        must_match: None,
                    }
                })
                .collect()
        }
    }
}

/// `_bf_target.k1 = _bf_key.k1 AND …`: the target row whose match columns equal the key's.
fn target_matches_key<D: Dialect>(keys: &[&str]) -> String {
    keys.iter()
        .map(|c| {
            let q = D::quote(c);
            format!("_bf_target.{q} = _bf_key.{q}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn update_statement<'a, D: Dialect>(
    table: &str,
    index: usize,
    record: &'a Record,
    set_cols: &[&str],
    keys: &[&str],
) -> Statement<'a> {
    match D::BINDING {
        Binding::JsonRecordset => {
            let sets = set_cols
                .iter()
                .map(|c| {
                    let q = D::quote(c);
                    format!("{q} = _bf_new.{q}")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let cond = target_matches_key::<D>(keys);
            let mut fields = Vec::new();
            record.fields.write_json(&mut fields);
            let mut identity = Vec::new();
            write_document(&record.identity, &mut identity);
            Statement {
                sql: format!(
                    "UPDATE {table} AS _bf_target SET {sets} \
                     FROM jsonb_populate_record(NULL::{table}, {}::jsonb) AS _bf_new, \
                     jsonb_populate_record(NULL::{table}, {}::jsonb) AS _bf_key WHERE {cond}",
                    D::placeholder(1),
                    D::placeholder(2)
                ),
                params: vec![
                    Param::Json(String::from_utf8_lossy(&fields).into_owned()),
                    Param::Json(String::from_utf8_lossy(&identity).into_owned()),
                ],
                must_match: Some(index),
            }
        }
        Binding::Placeholders { .. } => {
            let mut params = Vec::with_capacity(set_cols.len() + keys.len());
            let mut sets = Vec::with_capacity(set_cols.len());
            for col in set_cols {
                params.push(Param::Value(record.fields.get(*col).unwrap_or(&Value::Null)));
                sets.push(format!("{} = {}", D::quote(col), D::placeholder(params.len())));
            }
            let mut conds = Vec::with_capacity(keys.len());
            for col in keys {
                params.push(Param::Value(record.identity.get(*col).unwrap_or(&Value::Null)));
                conds.push(format!("{} = {}", D::quote(col), D::placeholder(params.len())));
            }
            Statement {
                sql: format!(
                    "UPDATE {table} SET {} WHERE {}",
                    sets.join(", "),
                    conds.join(" AND ")
                ),
                params,
                must_match: Some(index),
            }
        }
    }
}

fn delete_statements<'a, D: Dialect>(
    table: &str,
    batch: &'a [Record],
    keys: &[&str],
    members: &[usize],
) -> Vec<Statement<'a>> {
    match D::BINDING {
        Binding::JsonRecordset => {
            let cond = target_matches_key::<D>(keys);
            let mut json = vec![b'['];
            for (n, i) in members.iter().enumerate() {
                if n > 0 {
                    json.push(b',');
                }
                write_document(&batch[*i].identity, &mut json);
            }
            json.push(b']');
            vec![Statement {
                sql: format!(
                    "DELETE FROM {table} AS _bf_target USING \
                     jsonb_populate_recordset(NULL::{table}, {}::jsonb) AS _bf_key WHERE {cond}",
                    D::placeholder(1)
                ),
                params: vec![Param::Json(String::from_utf8_lossy(&json).into_owned())],
                must_match: None,
            }]
        }
        Binding::Placeholders { max_params } => {
            let per_statement = (max_params / keys.len().max(1)).max(1);
            members
                .chunks(per_statement)
                .map(|chunk| {
                    let mut params = Vec::with_capacity(chunk.len() * keys.len());
                    let mut alternatives = Vec::with_capacity(chunk.len());
                    for i in chunk {
                        let mut conds = Vec::with_capacity(keys.len());
                        for col in keys {
                            params.push(Param::Value(batch[*i].identity.get(*col).unwrap_or(&Value::Null)));
                            conds.push(format!("{} = {}", D::quote(col), D::placeholder(params.len())));
                        }
                        alternatives.push(conds.join(" AND "));
                    }
                    let predicate = if keys.len() == 1 {
                        // `col IN (…)` for the common single-column key: one index range scan.
                        let holders: Vec<String> = (1..=params.len()).map(D::placeholder).collect();
                        format!("{} IN ({})", D::quote(keys[0]), holders.join(", "))
                    } else {
                        alternatives
                            .iter()
                            .map(|a| format!("({a})"))
                            .collect::<Vec<_>>()
                            .join(" OR ")
                    };
                    Statement {
                        sql: format!("DELETE FROM {table} WHERE {predicate}"),
                        params,
                        must_match: None,
                    }
                })
                .collect()
        }
    }
}

/// A table connector over a pool of dialect `D`.
pub(crate) struct TableConnector<D: Dialect> {
    pool: Pool<D::Db>,
    target: Target,
    conn: ConnectionInfo,
    /// Match-column sets whose unique index was already confirmed.
    verified_keys: Mutex<HashSet<Vec<String>>>,
}

impl<D: Dialect> TableConnector<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
{
    /// Wraps a pool.
    pub(crate) fn new(pool: Pool<D::Db>, target: Target, conn: ConnectionInfo) -> Self {
        TableConnector {
            pool,
            target,
            conn,
            verified_keys: Mutex::new(HashSet::new()),
        }
    }

    /// Sorts a driver error and words its reason (still to be scrubbed). Row values the
    /// database quotes in its message are dropped ([`drop_quoted_values`]).
    fn describe(error: &sqlx::Error) -> (Failure, String) {
        match error {
            sqlx::Error::Database(db) => (
                D::classify(db.as_ref()),
                format!(
                    "{} ({})",
                    drop_quoted_values(db.message()),
                    D::code_label(db.as_ref())
                ),
            ),
            sqlx::Error::PoolTimedOut => (
                Failure::Transient,
                format!(
                    "no connection within {}s (is the database reachable?)",
                    ACQUIRE_TIMEOUT.as_secs()
                ),
            ),
            sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => (Failure::Transient, error.to_string()),
            other => (Failure::Fatal, other.to_string()),
        }
    }

    /// Turns a driver error into a [`SendError`] with an actionable, secret-free message.
    fn send_error(&self, error: &sqlx::Error, upsert_keys: &[Vec<String>], context: Context) -> SendError {
        let (failure, reason) = Self::describe(error);
        let reason = self.conn.scrubber.scrub(&reason);
        let table = self.target.display();
        let location = &self.conn.location;
        let kind = D::KIND.as_str();
        match failure {
            Failure::Data => SendError::BatchRejected(reason),
            Failure::Transient => SendError::Retryable {
                reason: match context {
                    Context::Connect => format!("failed to connect to {location}: {reason}"),
                    Context::Write => format!("failed to write to table {table} at {location}: {reason}"),
                },
                retry_after: None,
                throttled: false,
            },
            Failure::MissingTable => SendError::Fatal(format!(
                "table {table} does not exist at {location}: {reason}; create it, or fix spec.{kind}.table \
                 and spec.{kind}.schema"
            )),
            Failure::MissingColumn => SendError::Fatal(format!(
                "table {table} lacks a column the sync writes: {reason}; add the column or fix the sync's \
                 mappings"
            )),
            Failure::MissingUniqueIndex => {
                let cols = upsert_keys.first().map(|k| k.join(", ")).unwrap_or_default();
                SendError::Fatal(missing_index_message(&table, &cols))
            }
            Failure::Auth => SendError::Fatal(format!(
                "failed to log in to {location}: {reason}; check the connection URL in key {:?} of Secret {:?}",
                self.conn.secret_key, self.conn.secret_name
            )),
            Failure::Denied => SendError::Fatal(format!(
                "the database refused access to table {table}: {reason}; grant the user SELECT, INSERT, \
                 UPDATE and DELETE on it"
            )),
            Failure::Fatal => SendError::Fatal(match context {
                Context::Connect => format!("failed to connect to {location}: {reason}"),
                Context::Write => format!("failed to write to table {table} at {location}: {reason}"),
            }),
        }
    }

    /// Confirms (once per set) that upserts have a unique index to conflict on.
    async fn verify_upsert_keys(&self, keys: &[Vec<String>]) -> Result<(), SendError> {
        for cols in keys {
            let known = self
                .verified_keys
                .lock()
                .map(|set| set.contains(cols))
                .unwrap_or(false);
            if known {
                continue;
            }
            match D::has_unique_index(&self.pool, &self.target, cols).await {
                Ok(Some(false)) => {
                    return Err(SendError::Fatal(missing_index_message(
                        &self.target.display(),
                        &cols.join(", "),
                    )));
                }
                Ok(_) => {
                    if let Ok(mut set) = self.verified_keys.lock() {
                        set.insert(cols.clone());
                    }
                }
                Err(e) => return Err(self.send_error(&e, keys, Context::Write)),
            }
        }
        Ok(())
    }

    /// Runs the statements in one transaction; returns each statement's row count.
    async fn execute(&self, statements: &[Statement<'_>]) -> Result<Vec<u64>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut counts = Vec::with_capacity(statements.len());
        for statement in statements {
            let mut query = sqlx::query::<D::Db>(&statement.sql);
            for param in &statement.params {
                query = D::bind(query, param);
            }
            match query.execute(&mut *tx).await {
                Ok(result) => counts.push(D::rows_affected(&result)),
                Err(e) => {
                    // The error is what matters; a failed rollback only means the connection
                    // is gone, and the server rolls back on its own then.
                    let _ = tx.rollback().await;
                    return Err(e);
                }
            }
        }
        tx.commit().await?;
        Ok(counts)
    }
}

fn missing_index_message(table: &str, cols: &str) -> String {
    format!(
        "table {table} has no unique index on ({cols}), which upserts need to find existing rows: \
         create a unique index on ({cols}) of table {table}"
    )
}

#[async_trait]
impl<D: Dialect> Connector for TableConnector<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
{
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: MAX_BATCH_SIZE,
            operations: vec![
                Operation::Upsert,
                Operation::Update,
                Operation::Insert,
                Operation::Delete,
            ],
            // Databases have no vendor rate limit; the pool and concurrency bound the load.
            default_requests_per_second: 1000.0,
            default_concurrency: D::CONCURRENCY,
        }
    }

    async fn check(&self) -> Result<(), SendError> {
        // Every run that sends checks first, so this guards the pool's later connections too.
        if let Some((host, port)) = &self.conn.endpoint {
            crate::egress::check_endpoint(host, *port)
                .await
                .map_err(SendError::from)?;
        }
        let options = self.pool.connect_options();
        let mut conn = match tokio::time::timeout(CHECK_CONNECT_TIMEOUT, options.connect()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(self.send_error(&e, &[], Context::Connect)),
            Err(_) => {
                return Err(SendError::Retryable {
                    reason: format!(
                        "failed to connect to {}: no answer within {}s",
                        self.conn.location,
                        CHECK_CONNECT_TIMEOUT.as_secs()
                    ),
                    retry_after: None,
                    throttled: false,
                });
            }
        };
        let probe = format!("SELECT * FROM {} WHERE 1 = 0", self.target.sql::<D>());
        let result = match sqlx::query::<D::Db>(&probe).execute(&mut conn).await {
            Ok(_) => D::check_writable(&mut conn, &self.target)
                .await
                .map_err(|e| self.send_error(&e, &[], Context::Write))
                .and_then(|problem| match problem {
                    Some(problem) => Err(SendError::Fatal(self.conn.scrubber.scrub(&problem))),
                    None => Ok(()),
                }),
            Err(e) => Err(self.send_error(&e, &[], Context::Write)),
        };
        // Closing politely is a courtesy; the check's answer does not depend on it.
        let _ = conn.close().await;
        result
    }

    /// Upserts conflict on the match columns, so the table needs a unique index on them.
    async fn check_match(&self, match_fields: &[String]) -> Result<(), SendError> {
        self.verify_upsert_keys(&[match_fields.to_vec()]).await
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let Plan {
            statements,
            mut outcomes,
            upsert_keys,
        } = plan::<D>(&self.target, operation, batch);
        if statements.is_empty() {
            return Ok(outcomes);
        }
        self.verify_upsert_keys(&upsert_keys).await?;
        let counts = self
            .execute(&statements)
            .await
            .map_err(|e| self.send_error(&e, &upsert_keys, Context::Write))?;
        for (statement, count) in statements.iter().zip(counts) {
            if let Some(i) = statement.must_match
                && count == 0
            {
                outcomes[i] = RecordOutcome::Rejected(NO_MATCH_REASON.to_owned());
            }
        }
        Ok(outcomes)
    }
}

/// What the connector was doing when an error came (it words transient failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    /// Connecting and probing the table (`check()`).
    Connect,
    /// Writing a batch.
    Write,
}

/// Builds a lazily connecting pool's options shared by every dialect.
pub(crate) fn pool_options<DB: Database>(max_connections: u32) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(max_connections)
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(Some(Duration::from_secs(300)))
}

/// A database message without the row values it quotes: a quoted text after `: `, `entry ` or
/// `value ` (`invalid input syntax for type integer: "u1@x.com"`, MySQL's `Duplicate entry
/// 'a@b' for key 'email'`) becomes `"…"`; quoted names elsewhere (`column "age"`) stay. The
/// error code beside it says what went wrong.
pub fn drop_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(['"', '\'']) {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let quote = from.chars().next().unwrap_or('"');
        let after_open = &from[1..];
        let is_value = [": ", "entry ", "value ", "Entry ", "Value "]
            .iter()
            .any(|p| out.ends_with(p));
        let Some(close) = after_open.find(quote) else {
            // An unterminated quote: a value runs to the end.
            if is_value {
                out.push(quote);
                out.push('…');
            } else {
                out.push_str(from);
            }
            return out;
        };
        out.push(quote);
        out.push_str(if is_value { "…" } else { &after_open[..close] });
        out.push(quote);
        rest = &after_open[close + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_values_quoted_by_the_database_are_dropped_and_names_kept() {
        assert_eq!(
            drop_quoted_values(r#"invalid input syntax for type integer: "u1@x.com""#),
            r#"invalid input syntax for type integer: "…""#
        );
        assert_eq!(
            drop_quoted_values("Incorrect integer value: 'u1@x.com' for column 'age' at row 1"),
            "Incorrect integer value: '…' for column 'age' at row 1"
        );
        assert_eq!(
            drop_quoted_values("Duplicate entry 'a@b.c' for key 'email'"),
            "Duplicate entry '…' for key 'email'"
        );
        assert_eq!(
            drop_quoted_values(r#"null value in column "age" of relation "t" violates not-null constraint"#),
            r#"null value in column "age" of relation "t" violates not-null constraint"#
        );
        assert_eq!(drop_quoted_values("unterminated: \"abc"), "unterminated: \"…");
    }

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(quote_with("order", '"'), "\"order\"");
        assert_eq!(quote_with("a\"b", '"'), "\"a\"\"b\"");
        assert_eq!(quote_with("a`b c", '`'), "`a``b c`");
    }

    #[test]
    fn consecutive_groups_keep_batch_order() {
        let groups = consecutive_groups([(0, 'a'), (1, 'a'), (2, 'b'), (3, 'a')].into_iter());
        assert_eq!(groups, vec![('a', vec![0, 1]), ('b', vec![2]), ('a', vec![3])]);
    }
}
