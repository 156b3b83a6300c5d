//! The pushed-down diff of the Warehouse store: the engine uploads every row's key and
//! fingerprint into a temporary table on the state connection (COPY on PostgreSQL, multi-row
//! INSERT on MySQL/MariaDB), and the database joins it with `backflow_state` to return only the
//! added, changed and removed keys. The engine never loads the whole state.
//!
//! Fingerprints are computed by the engine, not in SQL: the canonical form (sorted keys,
//! normalised numbers, UTC timestamps, transforms) would have to be rebuilt in each SQL dialect
//! and kept identical to the engine's, and the model query is arbitrary SQL. Uploading 16-byte
//! key hashes and 8-byte fingerprints costs one COPY; see README's Performance section.

use std::collections::HashMap;
use std::io::Write as _;

use xxhash_rust::xxh3::xxh3_128;

use async_trait::async_trait;
use futures::TryStreamExt;
use sqlx::{Executor, QueryBuilder, Row};

use super::{Conn, MYSQL_CHUNK, WarehouseStore, key_hash};
use crate::state::{PushdownDiff, RemoteDiff, StateError};

/// Lower-case hex digits, for bytea values in COPY text.
const HEX: &[u8; 16] = b"0123456789abcdef";

/// Appends `text` escaped for PostgreSQL's COPY text format.
fn copy_text(text: &str, out: &mut Vec<u8>) {
    for b in text.bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

/// A text column that MySQL may flag binary (`utf8mb4_bin`): decoded from its bytes.
fn my_text(row: &sqlx::mysql::MySqlRow, i: usize) -> Result<String, sqlx::Error> {
    let bytes: &[u8] = row.try_get(i)?;
    String::from_utf8(bytes.to_vec()).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

#[async_trait]
impl PushdownDiff for WarehouseStore {
    async fn begin(&mut self, _scope: &str) -> Result<bool, StateError> {
        if !self.open().await? {
            return Ok(false);
        }
        self.stored_scope = self.read_scope().await?;
        let result: Result<(), sqlx::Error> = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => async {
                c.execute(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS backflow_stage \
                     (key_hash bytea NOT NULL, key text NOT NULL, fingerprint int8 NOT NULL)",
                )
                .await?;
                c.execute("TRUNCATE backflow_stage").await.map(|_| ())
            }
            .await,
            Some(Conn::My(c)) => async {
                c.execute(
                    "CREATE TEMPORARY TABLE IF NOT EXISTS backflow_stage \
                     (key_hash BINARY(16) NOT NULL, `key` MEDIUMTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL, \
                      fingerprint BIGINT NOT NULL, INDEX (key_hash))",
                )
                .await?;
                c.execute("DELETE FROM backflow_stage").await.map(|_| ())
            }
            .await,
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("create the temporary table of this run's keys", e))?;
        Ok(true)
    }

    fn holds_state(&mut self, scope: &str) -> bool {
        self.stored_scope.as_deref() == Some(scope)
    }

    async fn stage(&mut self, rows: &[(String, u64)]) -> Result<(), StateError> {
        if rows.is_empty() {
            return Ok(());
        }
        let result: Result<(), sqlx::Error> = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                let mut data = Vec::with_capacity(rows.len() * 64);
                for (key, fingerprint) in rows {
                    data.extend_from_slice(b"\\\\x");
                    for b in xxh3_128(key.as_bytes()).to_be_bytes() {
                        data.push(HEX[usize::from(b >> 4)]);
                        data.push(HEX[usize::from(b & 0xf)]);
                    }
                    data.push(b'\t');
                    copy_text(key, &mut data);
                    data.push(b'\t');
                    // Writing to a Vec cannot fail.
                    let _ = write!(data, "{}", *fingerprint as i64);
                    data.push(b'\n');
                }
                async {
                    let mut copy = c
                        .copy_in_raw("COPY backflow_stage (key_hash, key, fingerprint) FROM STDIN")
                        .await?;
                    copy.send(data).await?;
                    copy.finish().await.map(|_| ())
                }
                .await
            }
            Some(Conn::My(c)) => {
                async {
                    for chunk in rows.chunks(MYSQL_CHUNK) {
                        let mut q =
                            QueryBuilder::new("INSERT INTO backflow_stage (key_hash, `key`, fingerprint) ");
                        q.push_values(chunk, |mut b, (key, fingerprint)| {
                            b.push_bind(key_hash(key))
                                .push_bind(key.as_str())
                                .push_bind(*fingerprint as i64);
                        });
                        q.build().execute(&mut *c).await?;
                    }
                    Ok(())
                }
                .await
            }
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("upload this run's keys and fingerprints", e))
    }

    async fn diff(&mut self, scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        let all_added = self.stored_scope.as_deref() != Some(scope);
        let state = self.table("backflow_state");
        let sync_id = self.config.sync_id.clone();
        let mut diff = RemoteDiff {
            all_added,
            ..RemoteDiff::default()
        };
        let result: Result<(), sqlx::Error> = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                async {
                    c.execute("ANALYZE backflow_stage").await?;
                    diff.duplicates = sqlx::query_as::<_, (String, i64)>(
                        "SELECT key, count(*) FROM backflow_stage GROUP BY key_hash, key HAVING count(*) > 1",
                    )
                    .fetch_all(&mut *c)
                    .await?
                    .into_iter()
                    .map(|(k, n)| (k, n as u64))
                    .collect();
                    if all_added {
                        return Ok(());
                    }
                    let changed = format!(
                        "SELECT s.key, t.key_hash IS NULL FROM backflow_stage s \
                         LEFT JOIN {state} t ON t.sync_id = $1 AND t.key_hash = s.key_hash \
                         WHERE t.key_hash IS NULL OR t.fingerprint <> s.fingerprint OR $2"
                    );
                    let mut rows = sqlx::query(&changed)
                        .bind(&sync_id)
                        .bind(full_resync)
                        .fetch(&mut *c);
                    while let Some(row) = rows.try_next().await? {
                        diff.changed.insert(row.try_get(0)?, row.try_get(1)?);
                    }
                    drop(rows);
                    let removed = format!(
                        "SELECT t.key, t.identity FROM {state} t WHERE t.sync_id = $1 \
                         AND NOT EXISTS (SELECT 1 FROM backflow_stage s WHERE s.key_hash = t.key_hash)"
                    );
                    let mut rows = sqlx::query(&removed).bind(&sync_id).fetch(&mut *c);
                    while let Some(row) = rows.try_next().await? {
                        diff.removed.push((row.try_get(0)?, row.try_get(1)?));
                    }
                    Ok(())
                }
                .await
            }
            Some(Conn::My(c)) => {
                async {
                    let mut rows = sqlx::query(
                        "SELECT `key`, COUNT(*) FROM backflow_stage GROUP BY key_hash, `key` HAVING COUNT(*) > 1",
                    )
                    .fetch(&mut *c);
                    let mut duplicates = HashMap::new();
                    while let Some(row) = rows.try_next().await? {
                        duplicates.insert(my_text(&row, 0)?, row.try_get::<i64, _>(1)? as u64);
                    }
                    drop(rows);
                    diff.duplicates = duplicates;
                    if all_added {
                        return Ok(());
                    }
                    let changed = format!(
                        "SELECT s.`key`, t.key_hash IS NULL FROM backflow_stage s \
                         LEFT JOIN {state} t ON t.sync_id = ? AND t.key_hash = s.key_hash \
                         WHERE t.key_hash IS NULL OR t.fingerprint <> s.fingerprint OR ?"
                    );
                    let mut found = HashMap::new();
                    let mut rows = sqlx::query(&changed).bind(&sync_id).bind(full_resync).fetch(&mut *c);
                    while let Some(row) = rows.try_next().await? {
                        found.insert(my_text(&row, 0)?, row.try_get::<i64, _>(1)? != 0);
                    }
                    drop(rows);
                    diff.changed = found;
                    // MySQL may not reopen a TEMPORARY table twice in one query, so the
                    // anti-join reads it once.
                    let removed = format!(
                        "SELECT t.`key`, t.identity FROM {state} t \
                         LEFT JOIN backflow_stage s ON s.key_hash = t.key_hash \
                         WHERE t.sync_id = ? AND s.key_hash IS NULL"
                    );
                    let mut rows = sqlx::query(&removed).bind(&sync_id).fetch(&mut *c);
                    while let Some(row) = rows.try_next().await? {
                        diff.removed.push((my_text(&row, 0)?, my_text(&row, 1)?));
                    }
                    Ok(())
                }
                .await
            }
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("compare this run's fingerprints with the stored ones", e))?;
        tracing::info!(
            changed = diff.changed.len(),
            removed = diff.removed.len(),
            duplicates = diff.duplicates.len(),
            all_added,
            "diff computed in the warehouse"
        );
        Ok(diff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_what_the_format_reserves() {
        let mut out = Vec::new();
        copy_text("a\\b\tc\nd\re", &mut out);
        assert_eq!(out, b"a\\\\b\\tc\\nd\\re");
    }
}
