//! Cursor mode's record in the warehouse: `backflow_cursors (sync_id PK, scope, record,
//! updated_at)`, created on the first cursor commit (a sync without a cursor never needs
//! it), one upsert per run once its last checkpoint is committed.

use super::{Conn, WarehouseStore};
use crate::state::StateError;

/// PostgreSQL's undefined_table, MySQL's ER_NO_SUCH_TABLE.
fn is_missing_table(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("42P01")
                || db
                    .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                    .is_some_and(|my| my.number() == 1146)
        }
        _ => false,
    }
}

impl WarehouseStore {
    /// The record stored for `scope`; `None` when there is none or no cursor table yet.
    pub(super) async fn read_cursor(&mut self, scope: &str) -> Result<Option<String>, StateError> {
        if !self.open().await? {
            return Ok(None);
        }
        let table = self.table("backflow_cursors");
        let sync_id = self.config.sync_id.clone();
        let found = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => {
                sqlx::query_as::<_, (String, String)>(&format!(
                    "SELECT scope, record FROM {table} WHERE sync_id = $1"
                ))
                .bind(&sync_id)
                .fetch_optional(c)
                .await
            }
            // utf8mb4_bin columns arrive flagged binary: read bytes.
            Some(Conn::My(c)) => sqlx::query_as::<_, (Vec<u8>, Vec<u8>)>(&format!(
                "SELECT scope, record FROM {table} WHERE sync_id = ?"
            ))
            .bind(&sync_id)
            .fetch_optional(c)
            .await
            .map(|row| {
                row.map(|(s, r)| {
                    (
                        String::from_utf8_lossy(&s).into_owned(),
                        String::from_utf8_lossy(&r).into_owned(),
                    )
                })
            }),
            None => Ok(None),
        };
        match found {
            Ok(row) => Ok(row.filter(|(s, _)| s == scope).map(|(_, record)| record)),
            Err(e) if is_missing_table(&e) => Ok(None),
            Err(e) => Err(self.sql_error("read the cursor's high-water mark", e)),
        }
    }

    /// Upserts the record of `scope`, creating the table on first use.
    pub(super) async fn write_cursor(&mut self, scope: &str, record: &str) -> Result<(), StateError> {
        self.ensure_open_for_write().await?;
        match self.upsert_cursor(scope, record).await {
            Err(e) if is_missing_table(&e) => {
                self.create_cursor_table().await?;
                self.upsert_cursor(scope, record)
                    .await
                    .map_err(|e| self.sql_error("write the cursor's high-water mark", e))
            }
            other => other.map_err(|e| self.sql_error("write the cursor's high-water mark", e)),
        }
    }

    async fn upsert_cursor(&mut self, scope: &str, record: &str) -> Result<(), sqlx::Error> {
        let table = self.table("backflow_cursors");
        let sync_id = self.config.sync_id.clone();
        match self.conn.as_mut() {
            Some(Conn::Pg(c)) => sqlx::query(&format!(
                "INSERT INTO {table} (sync_id, scope, record, updated_at) VALUES ($1, $2, $3, now()) \
                 ON CONFLICT (sync_id) DO UPDATE SET scope = EXCLUDED.scope, record = EXCLUDED.record, \
                 updated_at = EXCLUDED.updated_at"
            ))
            .bind(&sync_id)
            .bind(scope)
            .bind(record)
            .execute(c)
            .await
            .map(drop),
            Some(Conn::My(c)) => sqlx::query(&format!(
                "INSERT INTO {table} (sync_id, scope, record, updated_at) VALUES (?, ?, ?, UTC_TIMESTAMP(6)) \
                 ON DUPLICATE KEY UPDATE scope = VALUES(scope), record = VALUES(record), \
                 updated_at = VALUES(updated_at)"
            ))
            .bind(&sync_id)
            .bind(scope)
            .bind(record)
            .execute(c)
            .await
            .map(drop),
            None => Ok(()),
        }
    }

    async fn create_cursor_table(&mut self) -> Result<(), StateError> {
        let table = self.table("backflow_cursors");
        let result = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
  sync_id TEXT PRIMARY KEY,
  scope TEXT NOT NULL,
  record TEXT NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"
            ))
            .execute(c)
            .await
            .map(drop),
            Some(Conn::My(c)) => sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
  sync_id VARCHAR(320) NOT NULL PRIMARY KEY,
  scope TEXT NOT NULL,
  record TEXT NOT NULL,
  updated_at DATETIME(6) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
            ))
            .execute(c)
            .await
            .map(drop),
            None => Ok(()),
        };
        result.map_err(|e| self.sql_error("create the table backflow_cursors", e))
    }

    /// Deletes the sync's record (its state was deleted or moved); no table is no record.
    pub(super) async fn delete_cursor(&mut self) -> Result<(), sqlx::Error> {
        let table = self.table("backflow_cursors");
        let sync_id = self.config.sync_id.clone();
        let deleted = match self.conn.as_mut() {
            Some(Conn::Pg(c)) => sqlx::query(&format!("DELETE FROM {table} WHERE sync_id = $1"))
                .bind(&sync_id)
                .execute(c)
                .await
                .map(drop),
            Some(Conn::My(c)) => sqlx::query(&format!("DELETE FROM {table} WHERE sync_id = ?"))
                .bind(&sync_id)
                .execute(c)
                .await
                .map(drop),
            None => Ok(()),
        };
        match deleted {
            Err(e) if is_missing_table(&e) => Ok(()),
            other => other,
        }
    }
}
