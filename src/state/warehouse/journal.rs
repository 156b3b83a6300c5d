//! Checkpoints as an append-only journal, folded into `backflow_state` once, sorted.
//!
//! `backflow_journal (sync_id, seq, key_hash, key, fingerprint, identity, removed)` has no
//! index on `key_hash`: a checkpoint appends its changes (binary `COPY` on PostgreSQL,
//! multi-row `INSERT` on MySQL/MariaDB) in one transaction, at the cost of a plain insert,
//! whatever the size of the state. Upserting into `backflow_state`'s primary key instead
//! costs a random B-tree descent per row, which grows with the state (13 µs a row at
//! 1,000,000 rows on PostgreSQL, 41 µs at 9,000,000 once the index outgrew
//! `shared_buffers`, next to 0.8 µs for `COPY`).
//!
//! The fold applies the sync's journal to the state in one transaction: the last change of
//! each key (highest `seq`) wins, in `key_hash` order, so the primary key is walked once from
//! one end to the other; then the sync's journal rows go. On PostgreSQL a sync without rows
//! in `backflow_state` is folded into blocks instead (see `blocks`), and such a sync's
//! checkpoints are packed into `backflow_checkpoints` rather than appended here (see
//! `checkpoints`), where that table is there; the fold takes this journal's changes of the
//! sync first, then the packed ones. It runs at
//! `finish`, and before anything reads the state when a run ended without `finish` (a crash,
//! a failed checkpoint) and left journal rows: `load` and the diff always see every committed
//! checkpoint. A crash before the fold commits leaves the journal, folded again next time; a
//! fold never applies in part.
//!
//! Scopes: the first checkpoint under a new scope deletes the sync's rows of
//! `backflow_state` and of the journal in its own transaction, so the journal only ever holds
//! changes of the scope recorded in `backflow_syncs`.
//!
//! An install whose tables predate the journal, and whose state user may not create it, keeps
//! writing checkpoints straight into `backflow_state` (see `write`), with a warning.

use std::collections::HashSet;
use std::sync::Mutex;

use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor, QueryBuilder};

use super::blocks::{self, FoldError};
use super::checkpoints;
use super::write::{Target, copy_binary, copy_field, my_new_scope, pg_new_scope};
use super::{Conn, MYSQL_CHUNK, WarehouseStore, key_hash, pg_create, pg_sync_has_rows, quote};
use crate::state::{EntryRef, StateError};

/// The table's name in the state schema.
pub(super) const TABLE: &str = "backflow_journal";

/// The schemas whose missing journal was already reported by this process.
static WARNED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The journal's DDL on PostgreSQL, `schema` quoted. The identity column numbers the changes
/// in the order they were written (its sequence has no cache: values rise across sessions);
/// the index on `sync_id` lets a run find its leftover rows without reading other syncs'.
pub(super) fn pg_ddl(schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.backflow_journal (
  sync_id TEXT NOT NULL,
  seq BIGINT GENERATED ALWAYS AS IDENTITY,
  key_hash BYTEA NOT NULL,
  key TEXT NOT NULL,
  fingerprint BIGINT,
  identity TEXT,
  removed BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS backflow_journal_sync ON {schema}.backflow_journal (sync_id);"
    )
}

/// The journal's DDL on MySQL/MariaDB, `schema` quoted. InnoDB clusters rows by primary key:
/// an `AUTO_INCREMENT` one appends in write order.
pub(super) fn my_ddl(schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.`backflow_journal` (
  seq BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sync_id VARCHAR(320) NOT NULL,
  key_hash BINARY(16) NOT NULL,
  `key` TEXT NOT NULL,
  fingerprint BIGINT NULL,
  identity MEDIUMTEXT NULL,
  removed BOOLEAN NOT NULL,
  KEY backflow_journal_sync (sync_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
    )
}

/// True when `backflow_journal` exists in `schema`.
pub(super) async fn exists(conn: &mut Conn, schema: &str) -> Result<bool, sqlx::Error> {
    table_exists(conn, schema, TABLE).await
}

/// True when `table` exists in `schema`.
pub(super) async fn table_exists(conn: &mut Conn, schema: &str, table: &str) -> Result<bool, sqlx::Error> {
    let found =
        match conn {
            Conn::Pg(c) => {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = $1 AND tablename = $2",
                )
                .bind(schema)
                .bind(table)
                .fetch_one(c)
                .await?
            }
            Conn::My(c) => sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
            )
            .bind(schema)
            .bind(table)
            .fetch_one(c)
            .await?,
        };
    Ok(found > 0)
}

/// Appends one checkpoint on PostgreSQL, in one transaction (with the scope change first,
/// when there is one): packed into `backflow_checkpoints` when the target has it and the
/// sync holds no rows in `backflow_state`, else by binary `COPY` into the journal.
pub(super) async fn pg_append(
    c: &mut PgConnection,
    target: &Target<'_>,
    journal: &str,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
    removes: &[&str],
) -> Result<(), sqlx::Error> {
    let mut tx = c.begin().await?;
    if target.new_scope {
        let tables: Vec<&str> = [
            Some(target.state),
            Some(journal),
            target.blocks,
            target.checkpoints,
        ]
        .into_iter()
        .flatten()
        .collect();
        pg_new_scope(&mut tx, target, &tables).await?;
    }
    if let Some(packed) = target.checkpoints
        && !pg_sync_has_rows(&mut tx, target.state, target.sync_id).await?
    {
        checkpoints::pg_append(&mut tx, packed, target.sync_id, puts, removes).await?;
        return tx.commit().await;
    }
    let sync_id = target.sync_id.as_bytes();
    let mut removes = removes.iter();
    copy_binary(
        &mut tx,
        &format!(
            "COPY {journal} (sync_id, key_hash, key, fingerprint, identity, removed) FROM STDIN (FORMAT binary)"
        ),
        // Puts, then removes (a checkpoint's keys are distinct: their order does not matter).
        |data| match puts.next() {
            Some(e) => Some(copy_change(data, sync_id, e.key, Some((e.fingerprint, e.identity)))),
            None => removes.next().map(|key| copy_change(data, sync_id, key, None)),
        },
    )
    .await?;
    tx.commit().await
}

/// Appends one change in binary COPY format: (sync_id, key_hash, key, fingerprint, identity,
/// removed), fingerprint and identity NULL for a remove.
fn copy_change(
    data: &mut Vec<u8>,
    sync_id: &[u8],
    key: &str,
    put: Option<(u64, &str)>,
) -> Result<(), sqlx::Error> {
    data.extend_from_slice(&6i16.to_be_bytes());
    copy_field(data, sync_id)?;
    copy_field(data, &crate::state::stored_key_hash(key).to_be_bytes())?;
    copy_field(data, key.as_bytes())?;
    match put {
        Some((fingerprint, identity)) => {
            copy_field(data, &(fingerprint as i64).to_be_bytes())?;
            copy_field(data, identity.as_bytes())?;
            copy_field(data, &[0])
        }
        None => {
            // Two NULLs, then true.
            data.extend_from_slice(&(-1i32).to_be_bytes());
            data.extend_from_slice(&(-1i32).to_be_bytes());
            copy_field(data, &[1])
        }
    }
}

/// Appends one checkpoint on MySQL/MariaDB: multi-row `INSERT`s of [`MYSQL_CHUNK`] rows, in
/// one transaction (with the scope change first, when there is one).
pub(super) async fn my_append(
    c: &mut MySqlConnection,
    target: &Target<'_>,
    journal: &str,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
    removes: &[&str],
) -> Result<(), sqlx::Error> {
    let mut tx = c.begin().await?;
    if target.new_scope {
        my_new_scope(&mut tx, target, &[target.state, journal]).await?;
    }
    let mut removes = removes.iter();
    let mut chunk: Vec<(&str, Option<(i64, &str)>)> = Vec::with_capacity(MYSQL_CHUNK);
    loop {
        while chunk.len() < MYSQL_CHUNK {
            if let Some(e) = puts.next() {
                chunk.push((e.key, Some((e.fingerprint as i64, e.identity))));
            } else if let Some(key) = removes.next() {
                chunk.push((key, None));
            } else {
                break;
            }
        }
        if chunk.is_empty() {
            break;
        }
        let mut q = QueryBuilder::new(format!(
            "INSERT INTO {journal} (sync_id, key_hash, `key`, fingerprint, identity, removed) "
        ));
        q.push_values(chunk.drain(..), |mut b, (key, put)| {
            b.push_bind(target.sync_id)
                .push_bind(key_hash(key))
                .push_bind(key)
                .push_bind(put.map(|p| p.0))
                .push_bind(put.map(|p| p.1))
                .push_bind(put.is_none());
        });
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Changes deleted at once past which PostgreSQL's journal (or packed checkpoints) is
/// vacuumed right away.
const VACUUM_AFTER: i64 = 100_000;

/// PostgreSQL's answers to a lock request the fold gives up: lock_not_available (not granted
/// within `lock_timeout`) and deadlock_detected (two folds that each read the journal, then
/// each asked for its exclusive lock; the server aborts one request after `deadlock_timeout`).
const LOCK_GIVEN_UP: [&str; 2] = ["55P03", "40P01"];

/// How long the fold waits for the journal's exclusive lock before it deletes its rows
/// instead. Longer than PostgreSQL's default `deadlock_timeout` (1 s), after which the server
/// cancels an autovacuum of the journal that holds the lock up (a large first run's appends
/// set one off); short enough that another sync's checkpoint queued behind the request waits
/// at most that long.
const TRUNCATE_LOCK_WAIT: &str = "2s";

/// Folds the sync's journal into its state on PostgreSQL, in one transaction.
///
/// A sync that holds no rows in `backflow_state` is folded into its blocks of `blocks`
/// ([`blocks::pg_fold`]) when that table is there. Otherwise, keys whose journal
/// holds a remove are deleted first; then the last change of each key is upserted when it is
/// a put (a key removed then put again comes back, one put then removed stays gone), in
/// `key_hash` order. When the sync holds no rows yet (its first run), there is nothing to
/// delete or update: the last puts are inserted without `ON CONFLICT`, which saves the lookup
/// of each key (the run holds the sync's lock, so no other writer adds rows meanwhile). Then
/// the sync's journal rows go ([`pg_clear`]).
pub(super) async fn pg_fold(
    c: &mut PgConnection,
    state: &str,
    journal: &str,
    blocks: Option<&str>,
    sync_id: &str,
) -> Result<(), FoldError> {
    let mut tx = c.begin().await?;
    // The sort of the journal by key_hash: in memory rather than through temporary files.
    tx.execute("SET LOCAL work_mem = '64MB'").await?;
    let holds_rows = pg_sync_has_rows(&mut tx, state, sync_id).await?;
    match blocks {
        Some(blocks) if !holds_rows => blocks::pg_fold(&mut tx, blocks, journal, sync_id).await?,
        _ => pg_fold_rows(&mut tx, state, journal, sync_id, holds_rows).await?,
    }
    if pg_clear(tx, journal, sync_id, "1").await? {
        pg_vacuum(c, journal).await;
    }
    Ok(())
}

/// Takes the folded rows of the sync out of `table` (the journal, or the packed checkpoints),
/// inside the fold's transaction, and commits it: with `TRUNCATE` when the table holds
/// nothing else ([`truncate_if_alone`]), else with a `DELETE`. Returns whether the rows
/// deleted stood for [`VACUUM_AFTER`] changes or more (`weight`: the changes of a row, as
/// SQL), so that the table should be vacuumed.
pub(super) async fn pg_clear(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    sync_id: &str,
    weight: &str,
) -> Result<bool, sqlx::Error> {
    if truncate_if_alone(&mut tx, table, sync_id).await? {
        tx.commit().await?;
        tracing::debug!(table, "the table held only this sync's checkpoints: truncated");
        return Ok(false);
    }
    let deleted: i64 = sqlx::query_scalar(&format!(
        "WITH gone AS (DELETE FROM {table} WHERE sync_id = $1 RETURNING {weight} AS changes) \
         SELECT COALESCE(sum(changes), 0)::bigint FROM gone"
    ))
    .bind(sync_id)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::debug!(table, changes = deleted, "this sync's folded checkpoints deleted");
    Ok(deleted >= VACUUM_AFTER)
}

/// Vacuums `table` after a large delete. The rows just deleted stay in the table as dead
/// tuples until autovacuum comes by, and every scan of the table reads them: the next run's
/// lookups and fold would pay for a large fold's rows (about 0.1 s per scan after a million).
/// Only the table's owner may vacuum it; otherwise autovacuum does it later.
pub(super) async fn pg_vacuum(c: &mut PgConnection, table: &str) {
    if let Err(e) = c.execute(format!("VACUUM {table}").as_str()).await {
        tracing::debug!(error = %e, table, "could not vacuum after a large fold; autovacuum will");
    }
}

/// The fold into `backflow_state`'s rows, inside the fold's transaction `tx`: for a sync
/// that holds rows, or where the blocks table is missing.
async fn pg_fold_rows(
    tx: &mut PgConnection,
    state: &str,
    journal: &str,
    sync_id: &str,
    holds_rows: bool,
) -> Result<(), sqlx::Error> {
    if holds_rows {
        sqlx::query(&format!(
            "DELETE FROM {state} s USING {journal} j \
             WHERE j.sync_id = $1 AND j.removed AND s.sync_id = $1 AND s.key_hash = j.key_hash"
        ))
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    }
    let on_conflict = if holds_rows {
        "ON CONFLICT (sync_id, key_hash) DO UPDATE SET key = EXCLUDED.key, \
         fingerprint = EXCLUDED.fingerprint, identity = EXCLUDED.identity, \
         updated_at = EXCLUDED.updated_at"
    } else {
        ""
    };
    sqlx::query(&format!(
        "INSERT INTO {state} (sync_id, key_hash, key, fingerprint, identity, updated_at) \
         SELECT $1, key_hash, key, fingerprint, identity, now() FROM ( \
           SELECT DISTINCT ON (key_hash) key_hash, key, fingerprint, identity, removed \
           FROM {journal} WHERE sync_id = $1 ORDER BY key_hash, seq DESC \
         ) AS latest WHERE NOT removed ORDER BY key_hash {on_conflict}"
    ))
    .bind(sync_id)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Empties `table` (the journal, or the packed checkpoints) with `TRUNCATE`, inside the fold's
/// transaction, when that removes only the sync's own rows; returns false, having changed
/// nothing, otherwise.
///
/// A `DELETE` of a first run's millions of rows writes every row's deletion to the WAL and
/// leaves them for `VACUUM` to read again (about 3 µs a row here); `TRUNCATE` costs the same
/// whatever the rows. It needs the `TRUNCATE` right (the tables' owner has it; a DBA who
/// granted only `SELECT, INSERT, UPDATE, DELETE` did not give it) and an exclusive lock on the
/// table, waited for at most [`TRUNCATE_LOCK_WAIT`]: while another sync's checkpoint or
/// fold keeps using it, or when two folds ask for it at once (a deadlock the server
/// breaks), the rows are deleted instead, so no sync waits on another's fold longer than that
/// and its commit. Under the lock no other sync can add rows, and
/// the lowest and highest `sync_id` (two reads of the ends of its index, whatever the rows)
/// show whether any are there (then the savepoint is rolled back, which frees the lock).
async fn truncate_if_alone(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    table: &str,
    sync_id: &str,
) -> Result<bool, sqlx::Error> {
    let may: bool = sqlx::query_scalar("SELECT has_table_privilege($1, 'TRUNCATE')")
        .bind(table)
        .fetch_one(&mut **tx)
        .await?;
    if !may {
        return Ok(false);
    }
    let mut savepoint = tx.begin().await?;
    // Undone with the savepoint when the table is not truncated, so the delete after it
    // waits as long as it must.
    savepoint
        .execute(format!("SET LOCAL lock_timeout = '{TRUNCATE_LOCK_WAIT}'").as_str())
        .await?;
    let lock = format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE");
    match savepoint.execute(lock.as_str()).await {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) if e.code().is_some_and(|code| LOCK_GIVEN_UP.contains(&&*code)) => {
            savepoint.rollback().await?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    }
    let (lowest, highest): (Option<String>, Option<String>) =
        sqlx::query_as(&format!("SELECT min(sync_id), max(sync_id) FROM {table}"))
            .fetch_one(&mut *savepoint)
            .await?;
    let alone = [lowest, highest].iter().flatten().all(|id| id == sync_id);
    if !alone {
        savepoint.rollback().await?;
        return Ok(false);
    }
    savepoint.execute(format!("TRUNCATE {table}").as_str()).await?;
    savepoint.commit().await?;
    Ok(true)
}

/// [`pg_fold`] on MySQL/MariaDB: `ROW_NUMBER()` picks the last change of each key.
pub(super) async fn my_fold(
    c: &mut MySqlConnection,
    state: &str,
    journal: &str,
    sync_id: &str,
) -> Result<(), sqlx::Error> {
    let mut tx = c.begin().await?;
    let holds_rows = sqlx::query_scalar::<_, i64>(&format!(
        "SELECT EXISTS (SELECT 1 FROM {state} WHERE sync_id = ?)"
    ))
    .bind(sync_id)
    .fetch_one(&mut *tx)
    .await?
        > 0;
    if holds_rows {
        sqlx::query(&format!(
            "DELETE s FROM {state} s JOIN {journal} j ON s.sync_id = j.sync_id AND s.key_hash = j.key_hash \
             WHERE j.sync_id = ? AND j.removed"
        ))
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    }
    let on_duplicate = if holds_rows {
        "ON DUPLICATE KEY UPDATE `key` = VALUES(`key`), fingerprint = VALUES(fingerprint), \
         identity = VALUES(identity), updated_at = VALUES(updated_at)"
    } else {
        ""
    };
    sqlx::query(&format!(
        "INSERT INTO {state} (sync_id, key_hash, `key`, fingerprint, identity, updated_at) \
         SELECT sync_id, key_hash, `key`, fingerprint, identity, UTC_TIMESTAMP(6) FROM ( \
           SELECT sync_id, key_hash, `key`, fingerprint, identity, removed, \
           ROW_NUMBER() OVER (PARTITION BY key_hash ORDER BY seq DESC) AS nth \
           FROM {journal} WHERE sync_id = ? \
         ) AS latest WHERE nth = 1 AND NOT removed ORDER BY key_hash {on_duplicate}"
    ))
    .bind(sync_id)
    .execute(&mut *tx)
    .await?;
    // `TRUNCATE` commits on its own on MySQL/MariaDB, so it cannot be part of the fold's
    // transaction: the rows are deleted.
    sqlx::query(&format!("DELETE FROM {journal} WHERE sync_id = ?"))
        .bind(sync_id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// PostgreSQL's insufficient_privilege; MySQL's access denied to a database or a command.
pub(super) fn is_denied(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => match db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            Some(my) => matches!(my.number(), 1044 | 1142),
            None => db.code().as_deref() == Some("42501"),
        },
        _ => false,
    }
}

impl WarehouseStore {
    /// Once the tables exist and the run holds its lock: decides whether checkpoints go to the
    /// journal (creating it when missing and allowed), and folds what a run that did not reach
    /// `finish` left in it, so that whatever reads the state next sees every committed
    /// checkpoint.
    pub(super) async fn prepare_journal(&mut self) -> Result<(), StateError> {
        if self.journal.is_none() {
            let schema = self.config.schema.clone();
            let found = match self.conn.as_mut() {
                Some(conn) => exists(conn, &schema).await,
                None => Ok(false),
            };
            let found = found.map_err(|e| self.sql_error("look for the table backflow_journal", e))?;
            let usable = found || (!self.probe && self.create_journal().await?);
            self.journal = Some(usable);
        }
        // Blocks are used with the journal, packed checkpoints with blocks.
        if self.blocks.is_none() {
            let wanted = self.journal == Some(true);
            self.blocks = Some(self.pg_optional_table(&blocks::OPTIONAL, wanted).await?);
        }
        if self.checkpoints.is_none() {
            let wanted = self.blocks == Some(true);
            self.checkpoints = Some(self.pg_optional_table(&checkpoints::OPTIONAL, wanted).await?);
        }
        if self.journal == Some(true) && !self.recovered {
            if self.fold_journal().await? {
                tracing::info!(
                    schema = %self.config.schema,
                    "folded the checkpoints of an interrupted run into backflow_state"
                );
            }
            self.recovered = true;
        }
        Ok(())
    }

    /// Creates the journal; `Ok(false)` when the state user may not (then checkpoints go
    /// straight into `backflow_state`, as before the journal existed).
    async fn create_journal(&mut self) -> Result<bool, StateError> {
        let pg = self.is_pg();
        let schema = quote(pg, &self.config.schema);
        let created = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => pg_create(c, &pg_ddl(&schema)).await,
            Some(Conn::My(c)) => c.execute(my_ddl(&schema).as_str()).await.map(drop),
            None => Ok(()),
        };
        match created {
            Ok(()) => Ok(true),
            Err(e) if is_denied(&e) => {
                self.warn_no_journal();
                Ok(false)
            }
            Err(e) => Err(self.sql_error("create the table backflow_journal", e)),
        }
    }

    /// Says once per schema (and process) what a DBA should create.
    fn warn_no_journal(&self) {
        let place = format!(
            "{} schema {}",
            crate::redact::describe_url(&self.config.url),
            self.config.schema
        );
        let first = WARNED
            .lock()
            .map(|mut warned| warned.get_or_insert_with(HashSet::new).insert(place))
            .unwrap_or(true);
        if first {
            tracing::warn!(
                schema = %self.config.schema,
                "the table backflow_journal is missing and the state user may not create it: \
                 checkpoints are written straight into backflow_state, which is several times \
                 slower on large states; have an administrator create {schema}.backflow_journal \
                 (DDL in docs/state.md) and grant SELECT, INSERT, UPDATE, DELETE on it",
                schema = self.config.schema
            );
        }
    }

    /// Folds the sync's journal into `backflow_state` (see [`pg_fold`]), then its packed
    /// checkpoints into its blocks (see [`checkpoints::pg_fold`]); returns whether it held any
    /// of the sync's changes. Nothing to fold costs an indexed lookup in each.
    pub(super) async fn fold_journal(&mut self) -> Result<bool, StateError> {
        let (state, journal) = (self.table("backflow_state"), self.table(TABLE));
        let (blocks, packed) = (self.blocks_table(), self.checkpoints_table());
        let sync_id = self.config.sync_id.clone();
        let any = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => pg_sync_has_rows(c, &journal, &sync_id).await,
            Some(Conn::My(c)) => {
                let sql = format!(
                    "SELECT count(*) FROM (SELECT 1 FROM {journal} WHERE sync_id = ? LIMIT 1) AS any_row"
                );
                let found: Result<i64, _> = sqlx::query_scalar(&sql).bind(&sync_id).fetch_one(c).await;
                found.map(|n| n != 0)
            }
            None => Ok(false),
        };
        let any = any.map_err(|e| self.sql_error("look for checkpoints in backflow_journal", e))?;
        let any_packed = match (&packed, self.conn.as_mut()) {
            (Some(packed), Some(Conn::Pg(c))) => pg_sync_has_rows(c, packed, &sync_id).await,
            _ => Ok(false),
        };
        let any_packed =
            any_packed.map_err(|e| self.sql_error("look for checkpoints in backflow_checkpoints", e))?;
        // The journal's changes first: a sync's packed checkpoints come after any it holds.
        if any {
            let folded = match self.conn.as_mut() {
                Some(Conn::Pg(c)) => pg_fold(c, &state, &journal, blocks.as_deref(), &sync_id).await,
                Some(Conn::My(c)) => my_fold(c, &state, &journal, &sync_id)
                    .await
                    .map_err(FoldError::from),
                None => Ok(()),
            };
            folded.map_err(|e| self.fold_error(TABLE, e))?;
        }
        if let (true, Some(packed)) = (any_packed, packed) {
            let Some(blocks) = blocks else {
                return Err(StateError::Unusable {
                    location: self.location(),
                    reason: "the sync's checkpoints in backflow_checkpoints fold into \
                             backflow_state_blocks, and that table is missing: have an administrator \
                             create it again (DDL in docs/state.md)"
                        .to_owned(),
                });
            };
            if let Some(Conn::Pg(c)) = self.conn.as_mut() {
                let folded = checkpoints::pg_fold(c, &state, &packed, &blocks, &sync_id).await;
                folded.map_err(|e| self.fold_error(checkpoints::TABLE, e))?;
            }
        }
        Ok(any || any_packed)
    }

    /// A failed fold of `table`'s checkpoints, as the store reports it.
    fn fold_error(&self, table: &str, e: FoldError) -> StateError {
        match e {
            FoldError::Sql(e) => {
                self.sql_error(&format!("fold the checkpoints of {table} into the state"), e)
            }
            FoldError::Io(e) => StateError::Io {
                location: self.location(),
                reason: format!("failed to fold the checkpoints of {table}: a local temporary file: {e}"),
            },
            FoldError::Malformed(e) => StateError::Corrupt {
                location: self.location(),
                reason: format!("failed to fold the checkpoints of {table}: {e}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_changes_are_six_fields_with_nulls_for_a_remove() {
        let mut data = Vec::new();
        copy_change(&mut data, b"ns/s", "k1", Some((u64::MAX, "{}"))).unwrap();
        copy_change(&mut data, b"ns/s", "k2", None).unwrap();
        let mut expected = Vec::new();
        for (key, put) in [("k1", true), ("k2", false)] {
            expected.extend_from_slice(&6i16.to_be_bytes());
            expected.extend_from_slice(&4i32.to_be_bytes());
            expected.extend_from_slice(b"ns/s");
            expected.extend_from_slice(&16i32.to_be_bytes());
            expected.extend_from_slice(&crate::state::stored_key_hash(key).to_be_bytes());
            expected.extend_from_slice(&2i32.to_be_bytes());
            expected.extend_from_slice(key.as_bytes());
            if put {
                expected.extend_from_slice(&8i32.to_be_bytes());
                expected.extend_from_slice(&(-1i64).to_be_bytes());
                expected.extend_from_slice(&2i32.to_be_bytes());
                expected.extend_from_slice(b"{}");
            } else {
                expected.extend_from_slice(&(-1i32).to_be_bytes());
                expected.extend_from_slice(&(-1i32).to_be_bytes());
            }
            expected.extend_from_slice(&1i32.to_be_bytes());
            expected.push(u8::from(!put));
        }
        assert_eq!(data, expected);
    }
}
