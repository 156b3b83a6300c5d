//! The `Warehouse` state store: a sync's fingerprints in tables of the source database
//! (PostgreSQL, MySQL/MariaDB), in a schema of their own (default `backflow`; a database on
//! MySQL/MariaDB).
//!
//! Layout: shared tables keyed by sync identity (`namespace/name`), not one table per sync,
//! so that granting rights, finding every sync's state and cleaning up are one-table affairs,
//! and creating a sync never runs DDL once the tables exist:
//! - `backflow_syncs (sync_id PK, scope, updated_at)`: what the fingerprints of each sync are
//!   about (the destination). A state of another scope loads empty; the first commit under
//!   the new scope deletes the old rows in the same transaction.
//! - `backflow_state (sync_id, key_hash, key, fingerprint, identity, updated_at)`, primary key
//!   `(sync_id, key_hash)`: `key_hash` is the 16-byte xxh3-128 of the canonical key, because
//!   primary keys of any length must fit (InnoDB indexes at most 3072 bytes, PostgreSQL's
//!   B-tree about 2700); `fingerprint` is the u64 fingerprint stored as a signed BIGINT (same
//!   bits); `identity` is the canonical JSON of the match fields.
//! - `backflow_journal (sync_id, seq, key_hash, key, fingerprint, identity, removed)`: the
//!   checkpoints of runs not yet folded into the state (see `journal`).
//! - PostgreSQL: `backflow_state_blocks (sync_id, first_hash, row_count, data, updated_at)`,
//!   primary key `(sync_id, first_hash)`: the state of a sync that holds no rows in
//!   `backflow_state`, packed 32 rows to a block by the journal's fold (see `blocks`). A sync's
//!   keys are rows or blocks, never both; every reader reads both.
//! - PostgreSQL: `backflow_checkpoints (sync_id, seq, changes, data)`, primary key `(sync_id,
//!   seq)`: the checkpoints of a sync kept in blocks, each packed sorted by key hash, in place
//!   of the journal's rows (see `checkpoints`).
//! - with `syncLogs`: `backflow_runs` (one row per run) and `backflow_rejections` (one row per
//!   rejected row: key, operation, reason, time).
//!
//! Tables are created on first use (`CREATE … IF NOT EXISTS`, serialised on PostgreSQL by a
//! transaction-level advisory lock); when they already exist no DDL runs on the schema, so a
//! DBA may create them and grant only `SELECT, INSERT, UPDATE, DELETE`.
//!
//! Each `commit` is one transaction that appends the checkpoint's changes to the journal
//! (binary `COPY` on PostgreSQL; packed into `backflow_checkpoints` for a sync kept in
//! blocks), durable when it returns; `finish` folds the journal into
//! the state in one transaction sorted by key hash, and the next run does so first when
//! a run ended without `finish`. Where the journal is missing and the state user may not
//! create it (tables of an older release, created by a DBA), checkpoints are upserted straight
//! into `backflow_state` as before (see `write`). Two runs of one sync never interleave: the store
//! holds a session-level lock on its own connection for the whole run
//! (`pg_try_advisory_lock`, `GET_LOCK(name, 0)`) and a second run fails at once with
//! [`StateError::Locked`]. The lock goes with the connection, so a run that dies frees it
//! when the server notices the connection is gone (on PostgreSQL the session asks for TCP
//! keepalives after 60 s idle, so a vanished pod frees it within about two minutes).
//!
//! Messages name the database (host, port, database), schema and table, never the URL's
//! credentials.

use std::collections::HashMap;
use std::str::FromStr;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlDatabaseError};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Executor, QueryBuilder, Row};
use xxhash_rust::xxh3::xxh3_64;

mod blocks;
mod changes;
mod checkpoints;
mod copy_tuples;
mod cursor;
mod diff;
mod journal;
mod write;

use super::{EntryRef, Fingerprints, RejectedRow, RunLog, StateChange, StateError, StateStore, StoreDiff};
use crate::redact::Scrubber;

/// Rows per statement on MySQL/MariaDB: 1000 rows × 5 placeholders stays far below its
/// 65,535.
const MYSQL_CHUNK: usize = 1000;

/// Key of the transaction-level advisory lock that serialises table creation on PostgreSQL.
const PG_DDL_LOCK: i64 = 0x6266_6464_6c00_0001;

/// Where a sync's state lives in the warehouse, and how to reach it.
#[derive(Clone)]
pub struct WarehouseConfig {
    /// Connection URL of the state connection (write-capable). Never logged.
    pub url: String,
    /// Schema (database on MySQL/MariaDB) of the state tables.
    pub schema: String,
    /// The sync's identity: `namespace/name`.
    pub sync_id: String,
    /// Also write `backflow_runs` and `backflow_rejections`.
    pub sync_logs: bool,
}

impl std::fmt::Debug for WarehouseConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarehouseConfig")
            .field("database", &crate::redact::describe_url(&self.url))
            .field("schema", &self.schema)
            .field("sync_id", &self.sync_id)
            .field("sync_logs", &self.sync_logs)
            .finish()
    }
}

enum Conn {
    Pg(PgConnection),
    My(MySqlConnection),
}

/// Fingerprints of one sync in the source database.
pub struct WarehouseStore {
    config: WarehouseConfig,
    conn: Option<Conn>,
    locked: bool,
    /// Only reads, never creates tables (a previous store consulted for a migration).
    probe: bool,
    /// The scope recorded in `backflow_syncs` (`None`: no row, or not read yet).
    stored_scope: Option<String>,
    run_id: String,
    scrubber: Scrubber,
    /// The diff of the run in progress (between `StoreDiff::begin` and `diff`).
    diffing: Option<diff::Diffing>,
    /// PostgreSQL: whether the connection has its checkpoint staging table (`None`: not
    /// created yet).
    staging: Option<bool>,
    /// Whether checkpoints go to `backflow_journal` (`None`: not looked for yet; false: it is
    /// missing and may not be created, so they go straight into `backflow_state`).
    journal: Option<bool>,
    /// PostgreSQL: whether `backflow_state_blocks` is there to hold states folded from the
    /// journal (`None`: not looked for yet; always false on MySQL/MariaDB).
    blocks: Option<bool>,
    /// PostgreSQL: whether `backflow_checkpoints` is there to hold the packed checkpoints of a
    /// sync kept in blocks (`None`: not looked for yet; always false on MySQL/MariaDB).
    checkpoints: Option<bool>,
    /// Leftover journal rows were folded since the lock was taken.
    recovered: bool,
    /// This run appended checkpoints to the journal that `finish` has not folded yet.
    appended: bool,
}

impl std::fmt::Debug for WarehouseStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarehouseStore")
            .field("config", &self.config)
            .field("locked", &self.locked)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

/// Quotes a schema name that validation already limited to a plain identifier.
fn quote(server_is_pg: bool, name: &str) -> String {
    if server_is_pg {
        format!("\"{}\"", name.replace('"', "\"\""))
    } else {
        format!("`{}`", name.replace('`', "``"))
    }
}

fn key_hash(key: &str) -> Vec<u8> {
    crate::state::stored_key_hash(key).to_be_bytes().to_vec()
}

impl WarehouseStore {
    /// The store of one sync. Nothing is touched until `load`.
    pub fn new(config: WarehouseConfig) -> WarehouseStore {
        let scrubber = Scrubber::new().with_url(&config.url);
        WarehouseStore {
            config,
            conn: None,
            locked: false,
            probe: false,
            stored_scope: None,
            run_id: uuid::Uuid::new_v4().to_string(),
            scrubber,
            diffing: None,
            staging: None,
            journal: None,
            blocks: None,
            checkpoints: None,
            recovered: false,
            appended: false,
        }
    }

    /// A store that only reads an existing state (for a migration to another store): it never
    /// creates the schema or tables, and a missing table reads as an empty state.
    pub fn probe(config: WarehouseConfig) -> WarehouseStore {
        WarehouseStore {
            probe: true,
            ..WarehouseStore::new(config)
        }
    }

    /// The id of this run in the sync logs.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    fn location(&self) -> String {
        format!(
            "{} schema {:?} table backflow_state (sync {})",
            crate::redact::describe_url(&self.config.url),
            self.config.schema,
            self.config.sync_id
        )
    }

    fn is_pg(&self) -> bool {
        matches!(self.conn, Some(Conn::Pg(_)))
    }

    fn table(&self, name: &str) -> String {
        format!(
            "{}.{}",
            quote(self.is_pg(), &self.config.schema),
            quote(self.is_pg(), name)
        )
    }

    /// A `StateError` for a failed statement: missing rights are [`StateError::Unusable`]
    /// (a person must grant them), anything else [`StateError::Io`].
    fn sql_error(&self, doing: &str, e: sqlx::Error) -> StateError {
        let reason = self.scrubber.scrub(&e.to_string());
        let denied = match &e {
            sqlx::Error::Database(db) => match db.try_downcast_ref::<MySqlDatabaseError>() {
                // Access denied to a database, a table, a command; a read-only server.
                Some(my) => matches!(my.number(), 1044 | 1045 | 1142 | 1227 | 1290 | 1036 | 1792),
                // insufficient_privilege; read_only_sql_transaction (a replica).
                None => matches!(db.code().as_deref(), Some("42501" | "25006")),
            },
            _ => false,
        };
        if denied {
            StateError::Unusable {
                location: self.location(),
                reason: format!(
                    "failed to {doing}: {reason}; the state connection's user needs CREATE on \
                     the database (or the schema {schema:?} and its tables created by an \
                     administrator) and SELECT, INSERT, UPDATE, DELETE on schema {schema:?}",
                    schema = self.config.schema
                ),
            }
        } else {
            StateError::Io {
                location: self.location(),
                reason: format!("failed to {doing}: {reason}"),
            }
        }
    }

    /// A refusal of the egress policy is for a person to fix; a name that did not resolve may
    /// resolve later.
    fn egress_error(&self, e: crate::egress::EgressError) -> StateError {
        if e.is_denied() {
            StateError::Unusable {
                location: self.location(),
                reason: e.to_string(),
            }
        } else {
            StateError::Io {
                location: self.location(),
                reason: e.to_string(),
            }
        }
    }

    async fn connect(&mut self) -> Result<(), StateError> {
        if self.conn.is_none() {
            self.conn = Some(self.new_connection().await?);
            self.staging = None;
        }
        Ok(())
    }

    /// A new connection to the state database (the store's own, or a second one that reads
    /// the stored fingerprints while the model is extracted).
    async fn new_connection(&self) -> Result<Conn, StateError> {
        let url = &self.config.url;
        let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
        let io = |reason: String| StateError::Io {
            location: self.location(),
            reason: format!("failed to connect: {}", self.scrubber.scrub(&reason)),
        };
        let conn = match scheme {
            "postgres" | "postgresql" => {
                let options = PgConnectOptions::from_str(url).map_err(|e| io(e.to_string()))?;
                if options.get_socket().is_none() && !options.get_host().starts_with('/') {
                    crate::egress::check_endpoint(options.get_host(), options.get_port())
                        .await
                        .map_err(|e| self.egress_error(e))?;
                }
                let mut conn = PgConnection::connect_with(&options)
                    .await
                    .map_err(|e| io(e.to_string()))?;
                // A run that vanishes without closing its connection (a killed node) holds the
                // advisory lock until the server notices: ask for keepalives so it does soon.
                // Ignored on Unix sockets.
                conn.execute(
                    "SET application_name = 'backflow-state'; SET tcp_keepalives_idle = 60; \
                     SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 6",
                )
                .await
                .map_err(|e| io(e.to_string()))?;
                Conn::Pg(conn)
            }
            "mysql" | "mariadb" => {
                let normalized = match url.strip_prefix("mariadb://") {
                    Some(rest) => format!("mysql://{rest}"),
                    None => url.clone(),
                };
                let options = MySqlConnectOptions::from_str(&normalized)
                    .map_err(|e| io(e.to_string()))?
                    .timezone(Some("+00:00".to_owned()));
                if options.get_socket().is_none() {
                    crate::egress::check_endpoint(options.get_host(), options.get_port())
                        .await
                        .map_err(|e| self.egress_error(e))?;
                }
                let conn = MySqlConnection::connect_with(&options)
                    .await
                    .map_err(|e| io(e.to_string()))?;
                Conn::My(conn)
            }
            "sqlite" => {
                return Err(StateError::Unusable {
                    location: self.location(),
                    reason: "the Warehouse state store needs a PostgreSQL or MySQL/MariaDB \
                             database; with a SQLite source use the ConfigMap or File store"
                        .to_owned(),
                });
            }
            other => {
                return Err(StateError::Unusable {
                    location: self.location(),
                    reason: format!(
                        "unsupported connection URL scheme {other:?} for the Warehouse state \
                         store (use postgres:// or mysql://)"
                    ),
                });
            }
        };
        Ok(conn)
    }

    /// Takes the sync's session-level lock, or fails at once when another run holds it.
    async fn lock(&mut self) -> Result<(), StateError> {
        if self.locked {
            return Ok(());
        }
        let hash = self.lock_hash();
        let got = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
                    .bind(hash as i64)
                    .fetch_one(c)
                    .await
            }
            Some(Conn::My(c)) => sqlx::query_scalar::<_, Option<i64>>("SELECT GET_LOCK(?, 0)")
                .bind(format!("backflow:{hash:016x}"))
                .fetch_one(c)
                .await
                .map(|v| v == Some(1)),
            None => Ok(false),
        }
        .map_err(|e| self.sql_error("take the run lock", e))?;
        if !got {
            return Err(StateError::Locked(format!(
                "{} (sync {})",
                self.location(),
                self.config.sync_id
            )));
        }
        self.locked = true;
        Ok(())
    }

    async fn unlock(&mut self) {
        if !self.locked {
            return;
        }
        let hash = self.lock_hash();
        let released = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(hash as i64)
                .execute(c)
                .await
                .map(drop),
            Some(Conn::My(c)) => sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(format!("backflow:{hash:016x}"))
                .execute(c)
                .await
                .map(drop),
            None => Ok(()),
        };
        if let Err(e) = released {
            // Closing the connection releases it anyway.
            tracing::warn!(error = %self.scrubber.scrub(&e.to_string()), "failed to release the state lock");
            self.conn = None;
        }
        self.locked = false;
        // The next run folds what this one may leave in the journal.
        self.recovered = false;
    }

    /// The run lock's key: per schema and sync (MySQL's named locks are server-wide).
    fn lock_hash(&self) -> u64 {
        xxh3_64(format!("backflow-state:{}:{}", self.config.schema, self.config.sync_id).as_bytes())
    }

    fn table_names(&self) -> Vec<&'static str> {
        let mut names = vec!["backflow_syncs", "backflow_state"];
        if self.config.sync_logs && !self.probe {
            names.extend(["backflow_runs", "backflow_rejections"]);
        }
        names
    }

    /// True when every table this store uses exists.
    async fn tables_exist(&mut self) -> Result<bool, StateError> {
        let names = self.table_names();
        let schema = self.config.schema.clone();
        let found = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = ANY($2)",
                )
                .bind(&schema)
                .bind(&names)
                .fetch_one(c)
                .await
            }
            Some(Conn::My(c)) => {
                let mut q =
                    QueryBuilder::new("SELECT count(*) FROM information_schema.tables WHERE table_schema = ");
                q.push_bind(&schema).push(" AND table_name IN (");
                let mut sep = q.separated(", ");
                for n in &names {
                    sep.push_bind(*n);
                }
                q.push(")");
                q.build_query_scalar::<i64>().fetch_one(c).await
            }
            None => Ok(0),
        }
        .map_err(|e| self.sql_error("look for the state tables", e))?;
        Ok(found as usize == names.len())
    }

    async fn create_tables(&mut self) -> Result<(), StateError> {
        let pg = self.is_pg();
        let schema = quote(pg, &self.config.schema);
        let logs = self.config.sync_logs;
        let ddl = if pg {
            let mut ddl = format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.backflow_syncs (
  sync_id TEXT PRIMARY KEY,
  scope TEXT NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.backflow_state (
  sync_id TEXT NOT NULL,
  key_hash BYTEA NOT NULL,
  key TEXT NOT NULL,
  fingerprint BIGINT NOT NULL,
  identity TEXT NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (sync_id, key_hash)
);"
            );
            if logs {
                ddl.push_str(&format!(
                    "
CREATE TABLE IF NOT EXISTS {schema}.backflow_runs (
  run_id TEXT PRIMARY KEY,
  sync_id TEXT NOT NULL,
  started_at TIMESTAMPTZ NOT NULL,
  finished_at TIMESTAMPTZ NOT NULL,
  result TEXT NOT NULL,
  rows_in_model BIGINT NOT NULL,
  rows_added BIGINT NOT NULL,
  rows_changed BIGINT NOT NULL,
  rows_removed BIGINT NOT NULL,
  rows_unchanged BIGINT NOT NULL,
  rows_rejected BIGINT NOT NULL,
  rows_failed BIGINT NOT NULL,
  requests BIGINT NOT NULL,
  error TEXT
);
CREATE INDEX IF NOT EXISTS backflow_runs_sync ON {schema}.backflow_runs (sync_id, started_at);
CREATE TABLE IF NOT EXISTS {schema}.backflow_rejections (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  sync_id TEXT NOT NULL,
  run_id TEXT NOT NULL,
  key TEXT NOT NULL,
  operation TEXT NOT NULL,
  reason TEXT NOT NULL,
  at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS backflow_rejections_run ON {schema}.backflow_rejections (sync_id, run_id);"
                ));
            }
            vec![ddl]
        } else {
            let table = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin";
            let mut ddl = vec![
                format!("CREATE DATABASE IF NOT EXISTS {schema} CHARACTER SET utf8mb4"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {schema}.`backflow_syncs` (
  sync_id VARCHAR(320) NOT NULL PRIMARY KEY,
  scope TEXT NOT NULL,
  updated_at DATETIME(6) NOT NULL
) {table}"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {schema}.`backflow_state` (
  sync_id VARCHAR(320) NOT NULL,
  key_hash BINARY(16) NOT NULL,
  `key` TEXT NOT NULL,
  fingerprint BIGINT NOT NULL,
  identity MEDIUMTEXT NOT NULL,
  updated_at DATETIME(6) NOT NULL,
  PRIMARY KEY (sync_id, key_hash)
) {table}"
                ),
            ];
            if logs {
                ddl.push(format!(
                    "CREATE TABLE IF NOT EXISTS {schema}.`backflow_runs` (
  run_id CHAR(36) NOT NULL PRIMARY KEY,
  sync_id VARCHAR(320) NOT NULL,
  started_at DATETIME(6) NOT NULL,
  finished_at DATETIME(6) NOT NULL,
  result VARCHAR(32) NOT NULL,
  rows_in_model BIGINT NOT NULL,
  rows_added BIGINT NOT NULL,
  rows_changed BIGINT NOT NULL,
  rows_removed BIGINT NOT NULL,
  rows_unchanged BIGINT NOT NULL,
  rows_rejected BIGINT NOT NULL,
  rows_failed BIGINT NOT NULL,
  requests BIGINT NOT NULL,
  error TEXT NULL,
  KEY backflow_runs_sync (sync_id, started_at)
) {table}"
                ));
                ddl.push(format!(
                    "CREATE TABLE IF NOT EXISTS {schema}.`backflow_rejections` (
  id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sync_id VARCHAR(320) NOT NULL,
  run_id CHAR(36) NOT NULL,
  `key` TEXT NOT NULL,
  operation VARCHAR(32) NOT NULL,
  reason TEXT NOT NULL,
  at DATETIME(6) NOT NULL,
  KEY backflow_rejections_run (sync_id, run_id)
) {table}"
                ));
            }
            ddl
        };
        let result = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => pg_create(c, &ddl.concat()).await,
            // MySQL commits each DDL statement on its own; IF NOT EXISTS makes them idempotent.
            Some(Conn::My(c)) => {
                async {
                    for statement in &ddl {
                        c.execute(statement.as_str()).await?;
                    }
                    Ok(())
                }
                .await
            }
            None => Ok(()),
        };
        result.map_err(|e| {
            self.sql_error(
                &format!("create the state tables in schema {:?}", self.config.schema),
                e,
            )
        })
    }

    /// Connects, locks, makes sure the tables exist and folds what an interrupted run left in
    /// the journal. Returns false when a probe finds no tables.
    async fn open(&mut self) -> Result<bool, StateError> {
        self.connect().await?;
        self.lock().await?;
        if !self.tables_exist().await? {
            if self.probe {
                return Ok(false);
            }
            self.create_tables().await?;
        }
        self.prepare_journal().await?;
        Ok(true)
    }

    async fn read_scope(&mut self) -> Result<Option<String>, StateError> {
        let sql = format!(
            "SELECT scope FROM {} WHERE sync_id = ",
            self.table("backflow_syncs")
        );
        let sync_id = self.config.sync_id.clone();
        let scope = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                sqlx::query_scalar::<_, String>(&format!("{sql}$1"))
                    .bind(&sync_id)
                    .fetch_optional(c)
                    .await
            }
            // Columns in utf8mb4_bin arrive flagged binary, which sqlx will not decode as text.
            Some(Conn::My(c)) => sqlx::query_scalar::<_, Vec<u8>>(&format!("{sql}?"))
                .bind(&sync_id)
                .fetch_optional(c)
                .await
                .map(|s| s.map(|b| String::from_utf8_lossy(&b).into_owned())),
            None => Ok(None),
        };
        scope.map_err(|e| self.sql_error("read the sync's scope", e))
    }

    /// Streams the sync's rows into a set, one row at a time.
    async fn read_rows(&mut self) -> Result<Fingerprints, StateError> {
        let sql = format!(
            "SELECT {k}, fingerprint, identity FROM {t} WHERE sync_id = ",
            k = if self.is_pg() { "key" } else { "`key`" },
            t = self.table("backflow_state")
        );
        let sync_id = self.config.sync_id.clone();
        let blocks = self.blocks_table();
        let mut set = Fingerprints::default();
        let result: Result<(), sqlx::Error> = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                let sql = format!("{sql}$1");
                async {
                    let mut rows = sqlx::query(&sql).bind(&sync_id).fetch(&mut *c);
                    while let Some(row) = rows.try_next().await? {
                        set.push_unindexed(EntryRef {
                            key: row.try_get::<&str, _>(0)?,
                            fingerprint: row.try_get::<i64, _>(1)? as u64,
                            identity: row.try_get::<&str, _>(2)?,
                        });
                    }
                    drop(rows);
                    if let Some(blocks) = &blocks {
                        fn text(bytes: &[u8]) -> Result<&str, sqlx::Error> {
                            std::str::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
                        }
                        blocks::read_rows(c, blocks, &sync_id, |row| {
                            set.push_unindexed(EntryRef {
                                key: text(row.key)?,
                                fingerprint: row.fingerprint as u64,
                                identity: text(row.identity)?,
                            });
                            Ok(())
                        })
                        .await?;
                    }
                    Ok(())
                }
                .await
            }
            Some(Conn::My(c)) => {
                let sql = format!("{sql}?");
                let mut rows = sqlx::query(&sql).bind(&sync_id).fetch(c);
                async {
                    while let Some(row) = rows.try_next().await? {
                        // utf8mb4_bin columns arrive flagged binary: decode their bytes.
                        let text = |i: usize| -> Result<&str, sqlx::Error> {
                            std::str::from_utf8(row.try_get::<&[u8], _>(i)?)
                                .map_err(|e| sqlx::Error::Decode(Box::new(e)))
                        };
                        set.push_unindexed(EntryRef {
                            key: text(0)?,
                            fingerprint: row.try_get::<i64, _>(1)? as u64,
                            identity: text(2)?,
                        });
                    }
                    Ok(())
                }
                .await
            }
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("read the stored fingerprints", e))?;
        // Keys are distinct: they are the table's primary key (through their hash).
        set.build_index();
        Ok(set)
    }

    /// Writes puts and removes (and, on a scope change, the new scope) in one transaction:
    /// appended to the journal, or straight into `backflow_state` where there is none.
    async fn write(
        &mut self,
        scope: &str,
        puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
        removes: &[&str],
    ) -> Result<(), StateError> {
        let new_scope = self.stored_scope.as_deref() != Some(scope);
        let journaled = self.journal == Some(true);
        let staging = !journaled && self.pg_staging().await?;
        if !journaled && self.holds_blocks().await? {
            return Err(StateError::Unusable {
                location: self.location(),
                reason: "the sync's state is kept in backflow_state_blocks, which is written through \
                         backflow_journal, and that table is missing: have an administrator create it \
                         again (DDL in docs/state.md)"
                    .to_owned(),
            });
        }
        let (syncs, state) = (self.table("backflow_syncs"), self.table("backflow_state"));
        let journal = self.table(journal::TABLE);
        let blocks = self.blocks_table();
        // Packed checkpoints fold into blocks only.
        let checkpoints = blocks.as_ref().and(self.checkpoints_table());
        let target = write::Target {
            syncs: &syncs,
            state: &state,
            sync_id: &self.config.sync_id,
            scope,
            new_scope,
            blocks: blocks.as_deref(),
            checkpoints: checkpoints.as_deref(),
        };
        let result = match self.conn.as_mut() {
            Some(Conn::Pg(c)) if journaled => journal::pg_append(c, &target, &journal, puts, removes).await,
            Some(Conn::My(c)) if journaled => journal::my_append(c, &target, &journal, puts, removes).await,
            Some(Conn::Pg(c)) => write::pg_write(c, &target, staging, puts, removes).await,
            Some(Conn::My(c)) => write::my_write(c, &target, puts, removes).await,
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("write a checkpoint", e))?;
        self.stored_scope = Some(scope.to_owned());
        self.appended |= journaled;
        Ok(())
    }

    /// PostgreSQL: creates the connection's checkpoint staging table once; false where the
    /// user may not create temporary tables (and on MySQL/MariaDB).
    async fn pg_staging(&mut self) -> Result<bool, StateError> {
        if let Some(ready) = self.staging {
            return Ok(ready);
        }
        let Some(Conn::Pg(c)) = self.conn.as_mut() else {
            return Ok(false);
        };
        let created = write::pg_create_staging(c).await;
        let ready = created.map_err(|e| self.sql_error("create the checkpoint staging table", e))?;
        if !ready {
            tracing::info!(
                "the state user may not create temporary tables: checkpoints are written as array upserts"
            );
        }
        self.staging = Some(ready);
        Ok(ready)
    }

    async fn ensure_open_for_write(&mut self) -> Result<(), StateError> {
        if self.conn.is_none() || !self.locked {
            // commit without load (not what the engine does, but allowed by the trait).
            if !self.open().await? {
                return Err(StateError::Unusable {
                    location: self.location(),
                    reason: "the state tables do not exist".to_owned(),
                });
            }
            self.stored_scope = self.read_scope().await?;
        }
        Ok(())
    }
}

/// Runs `ddl` (`CREATE … IF NOT EXISTS` statements) on PostgreSQL in one transaction holding
/// the DDL lock, so that runs creating the same tables at once wait for each other.
async fn pg_create(c: &mut PgConnection, ddl: &str) -> Result<(), sqlx::Error> {
    let mut tx = c.begin().await?;
    tx.execute(format!("SELECT pg_advisory_xact_lock({PG_DDL_LOCK})").as_str())
        .await?;
    tx.execute(ddl).await?;
    tx.commit().await
}

/// A table of the state schema that a store works without, on PostgreSQL only.
struct OptionalTable {
    /// Its name.
    name: &'static str,
    /// Its DDL, given the quoted schema.
    ddl: fn(&str) -> String,
    /// Logged at info when the state user may not create it: what is used instead.
    without: &'static str,
}

impl WarehouseStore {
    /// Whether `table` is there on PostgreSQL (false on MySQL/MariaDB), creating it when
    /// `wanted` and the state user may.
    async fn pg_optional_table(&mut self, table: &OptionalTable, wanted: bool) -> Result<bool, StateError> {
        let (name, schema) = (table.name, self.config.schema.clone());
        let Some(conn @ Conn::Pg(_)) = self.conn.as_mut() else {
            return Ok(false);
        };
        let found = journal::table_exists(conn, &schema, name).await;
        if found.map_err(|e| self.sql_error(&format!("look for the table {name}"), e))? {
            return Ok(true);
        }
        if self.probe || !wanted {
            return Ok(false);
        }
        let Some(Conn::Pg(c)) = self.conn.as_mut() else {
            return Ok(false);
        };
        match pg_create(c, &(table.ddl)(&quote(true, &schema))).await {
            Ok(()) => Ok(true),
            Err(e) if journal::is_denied(&e) => {
                tracing::info!(schema = %schema, "{}", table.without);
                Ok(false)
            }
            Err(e) => Err(self.sql_error(&format!("create the table {name}"), e)),
        }
    }
}

/// True when `table` (quoted) holds a row of `sync_id`, on PostgreSQL: one lookup in its
/// index on `sync_id`.
async fn pg_sync_has_rows(c: &mut PgConnection, table: &str, sync_id: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE sync_id = $1)"
    ))
    .bind(sync_id)
    .fetch_one(c)
    .await
}

/// The last change of each key in a checkpoint: puts and removes to apply.
fn collapse(changes: &[StateChange]) -> (Vec<EntryRef<'_>>, Vec<&str>) {
    let mut last: HashMap<&str, usize> = HashMap::with_capacity(changes.len());
    for (i, c) in changes.iter().enumerate() {
        let key = match c {
            StateChange::Put { key, .. } | StateChange::Remove { key } => key.as_str(),
        };
        last.insert(key, i);
    }
    let (mut puts, mut removes) = (Vec::new(), Vec::new());
    for (i, c) in changes.iter().enumerate() {
        match c {
            StateChange::Put {
                key,
                fingerprint,
                identity,
            } if last[key.as_str()] == i => puts.push(EntryRef {
                key,
                fingerprint: *fingerprint,
                identity,
            }),
            StateChange::Remove { key } if last[key.as_str()] == i => removes.push(key.as_str()),
            _ => {}
        }
    }
    (puts, removes)
}

#[async_trait]
impl StateStore for WarehouseStore {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        if !self.open().await? {
            return Ok(Fingerprints::default());
        }
        self.stored_scope = self.read_scope().await?;
        if self.stored_scope.as_deref() != Some(scope) {
            if self.stored_scope.is_some() {
                tracing::info!(
                    schema = %self.config.schema,
                    "state belongs to another destination; every row will be sent"
                );
            }
            return Ok(Fingerprints::default());
        }
        self.read_rows().await
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.ensure_open_for_write().await?;
        let (puts, removes) = collapse(changes);
        self.write(scope, &mut puts.into_iter(), &removes).await
    }

    async fn finish(&mut self, _scope: &str) -> Result<(), StateError> {
        if !self.appended {
            // Nothing was journaled (or checkpoints went straight into backflow_state).
            return Ok(());
        }
        self.fold_journal().await?;
        self.appended = false;
        tracing::debug!(schema = %self.config.schema, "checkpoints folded into backflow_state");
        Ok(())
    }

    async fn import(&mut self, scope: &str, set: &Fingerprints) -> Result<(), StateError> {
        self.ensure_open_for_write().await?;
        // One transaction: a crash leaves either no imported row or all of them.
        self.write(scope, &mut set.iter(), &[]).await
    }

    fn logs_rejections(&self) -> bool {
        self.config.sync_logs && !self.probe
    }

    fn store_diff(&mut self) -> Option<&mut dyn StoreDiff> {
        if self.probe { None } else { Some(self) }
    }

    async fn record_rejections(&mut self, rejections: &[RejectedRow]) -> Result<(), StateError> {
        if !self.logs_rejections() || rejections.is_empty() {
            return Ok(());
        }
        self.ensure_open_for_write().await?;
        let table = self.table("backflow_rejections");
        let (sync_id, run_id) = (self.config.sync_id.clone(), self.run_id.clone());
        let result = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                let mut keys = Vec::with_capacity(rejections.len());
                let mut ops = Vec::with_capacity(rejections.len());
                let mut reasons = Vec::with_capacity(rejections.len());
                for r in rejections {
                    keys.push(r.key.as_str());
                    ops.push(r.operation.as_str());
                    reasons.push(r.reason.as_str());
                }
                sqlx::query(&format!(
                    "INSERT INTO {table} (sync_id, run_id, key, operation, reason, at) \
                     SELECT $1, $2, k, o, r, now() FROM UNNEST($3::text[], $4::text[], $5::text[]) AS u(k, o, r)"
                ))
                .bind(&sync_id)
                .bind(&run_id)
                .bind(&keys)
                .bind(&ops)
                .bind(&reasons)
                .execute(c)
                .await
                .map(drop)
            }
            Some(Conn::My(c)) => {
                async {
                    for chunk in rejections.chunks(MYSQL_CHUNK) {
                        let mut q = QueryBuilder::new(format!(
                            "INSERT INTO {table} (sync_id, run_id, `key`, operation, reason, at) "
                        ));
                        q.push_values(chunk, |mut b, r| {
                            b.push_bind(&sync_id)
                                .push_bind(&run_id)
                                .push_bind(&r.key)
                                .push_bind(&r.operation)
                                .push_bind(&r.reason)
                                .push("UTC_TIMESTAMP(6)");
                        });
                        q.build().execute(&mut *c).await?;
                    }
                    Ok(())
                }
                .await
            }
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("write rejected rows to backflow_rejections", e))
    }

    async fn end_run(&mut self, run: &RunLog) -> Result<(), StateError> {
        let logged = if self.logs_rejections() && !run.dry_run && self.conn.is_some() {
            self.write_run(run).await
        } else {
            Ok(())
        };
        self.unlock().await;
        logged
    }

    async fn cursor(&mut self, scope: &str) -> Result<Option<String>, StateError> {
        if self.probe {
            return Ok(None);
        }
        self.read_cursor(scope).await
    }

    async fn commit_cursor(&mut self, scope: &str, record: &str) -> Result<(), StateError> {
        self.write_cursor(scope, record).await
    }

    async fn discard(&mut self) -> Result<(), StateError> {
        if self.conn.is_none() {
            return Ok(());
        }
        let result = self.delete_sync_rows().await;
        result
            .map(drop)
            .map_err(|e| self.sql_error("delete the migrated state", e))
    }
}

impl WarehouseStore {
    /// Deletes this sync's rows of `backflow_state`, `backflow_journal`,
    /// `backflow_state_blocks` and `backflow_checkpoints` (when they exist) and `backflow_syncs`
    /// in one transaction;
    /// returns how many stored rows went (rows and rows of blocks).
    async fn delete_sync_rows(&mut self) -> Result<u64, sqlx::Error> {
        let sync_id = self.config.sync_id.clone();
        let (state, syncs) = (self.table("backflow_state"), self.table("backflow_syncs"));
        let p = if self.is_pg() { "$1" } else { "?" };
        let journaled = match (self.journal, self.conn.as_mut()) {
            (Some(known), _) => known,
            (None, Some(conn)) => journal::exists(conn, &self.config.schema).await?,
            (None, None) => false,
        };
        let blocked = match (self.blocks, self.conn.as_mut()) {
            (Some(known), _) => known,
            (None, Some(conn @ Conn::Pg(_))) => {
                journal::table_exists(conn, &self.config.schema, blocks::TABLE).await?
            }
            (None, _) => false,
        };
        let packed = match (self.checkpoints, self.conn.as_mut()) {
            (Some(known), _) => known,
            (None, Some(conn @ Conn::Pg(_))) => {
                journal::table_exists(conn, &self.config.schema, checkpoints::TABLE).await?
            }
            (None, _) => false,
        };
        // Journal rows are changes to the state: they go with it. No journal, nothing to delete.
        let mut deletes = vec![format!("DELETE FROM {state} WHERE sync_id = {p}")];
        if journaled {
            deletes.push(format!(
                "DELETE FROM {} WHERE sync_id = {p}",
                self.table(journal::TABLE)
            ));
        }
        if packed {
            deletes.push(format!(
                "DELETE FROM {} WHERE sync_id = $1",
                self.table(checkpoints::TABLE)
            ));
        }
        // The rows the sync's blocks hold, counted before they go (only PostgreSQL has them).
        let mut in_blocks = 0u64;
        let blocks = self.table(blocks::TABLE);
        if blocked && let Some(Conn::Pg(c)) = self.conn.as_mut() {
            let held: i64 = sqlx::query_scalar(&format!(
                "SELECT COALESCE(sum(row_count), 0)::bigint FROM {blocks} WHERE sync_id = $1"
            ))
            .bind(&sync_id)
            .fetch_one(c)
            .await?;
            in_blocks = u64::try_from(held).unwrap_or(0);
            deletes.push(format!("DELETE FROM {blocks} WHERE sync_id = $1"));
        }
        deletes.push(format!("DELETE FROM {syncs} WHERE sync_id = {p}"));
        // The same statements on either connection type, whose transactions share no trait.
        macro_rules! in_one_transaction {
            ($conn:expr) => {{
                let mut tx = $conn.begin().await?;
                let mut rows = Vec::with_capacity(deletes.len());
                for delete in &deletes {
                    rows.push(
                        sqlx::query(delete)
                            .bind(&sync_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected(),
                    );
                }
                tx.commit().await?;
                Ok(rows[0] + in_blocks)
            }};
        }
        // The mark goes first: a mark outliving its fingerprints would let the next run read
        // only recent rows against an empty state, while a mark gone only makes it read all.
        self.delete_cursor().await?;
        match self.conn.as_mut() {
            Some(Conn::Pg(c)) => in_one_transaction!(c),
            Some(Conn::My(c)) => in_one_transaction!(c),
            None => Ok(0),
        }
    }

    async fn write_run(&mut self, run: &RunLog) -> Result<(), StateError> {
        let table = self.table("backflow_runs");
        let (sync_id, run_id) = (self.config.sync_id.clone(), self.run_id.clone());
        let error = run.error.as_deref().map(|e| self.scrubber.scrub(e));
        let counts = [
            run.rows_in_model,
            run.rows_added,
            run.rows_changed,
            run.rows_removed,
            run.rows_unchanged,
            run.rows_rejected,
            run.rows_failed,
            run.requests,
        ]
        .map(|n| i64::try_from(n).unwrap_or(i64::MAX));
        let columns = "run_id, sync_id, started_at, finished_at, result, rows_in_model, rows_added, \
                       rows_changed, rows_removed, rows_unchanged, rows_rejected, rows_failed, requests, error";
        let result = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                let sql = format!(
                    "INSERT INTO {table} ({columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
                );
                let mut q = sqlx::query(&sql)
                    .bind(&run_id)
                    .bind(&sync_id)
                    .bind(run.started)
                    .bind(run.finished)
                    .bind(&run.result);
                for n in counts {
                    q = q.bind(n);
                }
                q.bind(&error).execute(c).await.map(drop)
            }
            Some(Conn::My(c)) => {
                let sql = format!(
                    "INSERT INTO {table} ({columns}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                );
                let mut q = sqlx::query(&sql)
                    .bind(&run_id)
                    .bind(&sync_id)
                    .bind(run.started.naive_utc())
                    .bind(run.finished.naive_utc())
                    .bind(&run.result);
                for n in counts {
                    q = q.bind(n);
                }
                q.bind(&error).execute(c).await.map(drop)
            }
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("write the run to backflow_runs", e))
    }
}

/// How long [`delete_sync_state`] waits for a run of the sync to let go of its lock.
const DELETE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Deletes a deleted sync's fingerprints: its rows of `backflow_state`, `backflow_journal`,
/// `backflow_state_blocks`, `backflow_checkpoints` and `backflow_syncs`, in one transaction,
/// and returns how many stored rows went (rows, and the rows of blocks). The sync logs
/// (`backflow_runs`, `backflow_rejections`) stay: they are history. Creates nothing: missing
/// tables hold nothing to delete. `config.sync_logs` is ignored.
///
/// It first waits a few seconds for the sync's run lock, so that a run told to stop (a Job's
/// pod) commits its last checkpoint before the delete rather than after it; when the lock stays
/// held it deletes anyway. The caller bounds the whole call with a timeout.
pub async fn delete_sync_state(config: &WarehouseConfig) -> Result<u64, StateError> {
    let mut store = WarehouseStore::probe(WarehouseConfig {
        sync_logs: false,
        ..config.clone()
    });
    store.connect().await?;
    let deadline = tokio::time::Instant::now() + DELETE_LOCK_WAIT;
    loop {
        match store.lock().await {
            Ok(()) => break,
            Err(StateError::Locked(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(StateError::Locked(_)) => {
                tracing::warn!(
                    sync = %config.sync_id,
                    "a run of the deleted sync still holds its state lock; deleting its state anyway"
                );
                break;
            }
            Err(e) => return Err(e),
        }
    }
    if !store.tables_exist().await? {
        store.unlock().await;
        return Ok(0);
    }
    let result = store.delete_sync_rows().await;
    let deleted = result.map_err(|e| store.sql_error("delete the deleted sync's state", e))?;
    store.unlock().await;
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_change_of_a_key_wins_within_a_checkpoint() {
        let put = |k: &str, f| StateChange::Put {
            key: k.into(),
            fingerprint: f,
            identity: "{}".into(),
        };
        let changes = vec![
            put("a", 1),
            StateChange::Remove { key: "b".into() },
            put("a", 2),
            put("b", 3),
            put("c", 4),
            StateChange::Remove { key: "c".into() },
        ];
        let (puts, removes) = collapse(&changes);
        let puts: Vec<_> = puts.iter().map(|e| (e.key, e.fingerprint)).collect();
        assert_eq!(puts, vec![("a", 2), ("b", 3)]);
        assert_eq!(removes, vec!["c"]);
    }

    #[test]
    fn debug_output_never_shows_the_url_credentials() {
        let store = WarehouseStore::new(WarehouseConfig {
            url: "postgres://writer:s3cret-pw@db:5432/wh".into(),
            schema: "backflow".into(),
            sync_id: "ns/s".into(),
            sync_logs: false,
        });
        let text = format!("{store:?} {}", store.location());
        assert!(!text.contains("s3cret-pw") && !text.contains("writer:"), "{text}");
        assert!(text.contains("db:5432/wh") && text.contains("backflow"), "{text}");
    }
}
