//! Writing a checkpoint straight into `backflow_state`: one transaction of upserts and
//! deletes. Checkpoints go to the journal instead (`journal`) wherever it exists; this is the
//! path of installs whose state user may not create it.
//!
//! PostgreSQL: the checkpoint's rows go by binary `COPY ... FROM STDIN` into a temporary
//! table of the session (`pg_temp.backflow_checkpoint`, emptied at each commit), then one
//! `INSERT ... SELECT ... ORDER BY key_hash ON CONFLICT DO UPDATE` merges them into
//! `backflow_state`, in the same transaction. A user who may not create temporary tables
//! (the `TEMP` right on the database, which PostgreSQL grants to everyone unless revoked)
//! gets the array upsert of before (`UNNEST` of one array per column), in chunks.
//!
//! MySQL/MariaDB: multi-row `INSERT ... ON DUPLICATE KEY UPDATE` statements in key-hash order
//! (InnoDB keeps rows in primary-key order), [`MYSQL_CHUNK`] rows each.
//!
//! Either way a failure anywhere rolls the whole checkpoint back: a crash keeps a checkpoint
//! whole or not at all.

use sqlx::mysql::MySqlConnection;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor, QueryBuilder};

use super::{MYSQL_CHUNK, key_hash};
use crate::state::EntryRef;

/// Rows per statement of the array upsert (PostgreSQL binds whole arrays).
const PG_ARRAY_CHUNK: usize = 20_000;

/// Bytes of COPY data gathered before each send.
pub(super) const COPY_SEND_BYTES: usize = 1 << 20;

/// The session's staging table. `ON COMMIT DELETE ROWS`: every checkpoint starts with it empty.
const PG_CREATE_STAGING: &str = "CREATE TEMPORARY TABLE IF NOT EXISTS backflow_checkpoint (\
     key_hash BYTEA NOT NULL, key TEXT NOT NULL, fingerprint BIGINT NOT NULL, identity TEXT NOT NULL\
     ) ON COMMIT DELETE ROWS";

/// The start of PostgreSQL's binary COPY data: signature, flags, header extension length
/// (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).
pub(super) const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// Where a checkpoint goes: the sync's tables and scope.
pub(super) struct Target<'a> {
    /// `backflow_syncs`, quoted.
    pub syncs: &'a str,
    /// `backflow_state`, quoted.
    pub state: &'a str,
    /// The sync's id.
    pub sync_id: &'a str,
    /// The scope the fingerprints are about.
    pub scope: &'a str,
    /// The stored scope differs: delete the old rows and record the new scope first.
    pub new_scope: bool,
    /// `backflow_state_blocks`, quoted, when it is there: its rows go with a new scope too.
    pub blocks: Option<&'a str>,
    /// `backflow_checkpoints`, quoted, when checkpoints may be packed into it (see
    /// `checkpoints`): its rows go with a new scope too.
    pub checkpoints: Option<&'a str>,
}

/// Writes one checkpoint on PostgreSQL. `staging`: the session's staging table exists (see
/// [`PG_CREATE_STAGING`]).
pub(super) async fn pg_write(
    c: &mut PgConnection,
    target: &Target<'_>,
    staging: bool,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
    removes: &[&str],
) -> Result<(), sqlx::Error> {
    let Target { state, sync_id, .. } = *target;
    let mut tx = c.begin().await?;
    if target.new_scope {
        let tables: Vec<&str> = [Some(state), target.blocks, target.checkpoints]
            .into_iter()
            .flatten()
            .collect();
        pg_new_scope(&mut tx, target, &tables).await?;
    }
    if staging {
        if pg_copy_to_staging(&mut tx, puts).await? > 0 {
            sqlx::query(&format!(
                "INSERT INTO {state} (sync_id, key_hash, key, fingerprint, identity, updated_at) \
                 SELECT $1, key_hash, key, fingerprint, identity, now() FROM pg_temp.backflow_checkpoint \
                 ORDER BY key_hash \
                 ON CONFLICT (sync_id, key_hash) DO UPDATE SET key = EXCLUDED.key, \
                 fingerprint = EXCLUDED.fingerprint, identity = EXCLUDED.identity, \
                 updated_at = EXCLUDED.updated_at"
            ))
            .bind(sync_id)
            .execute(&mut *tx)
            .await?;
        }
    } else {
        pg_array_upsert(&mut tx, state, sync_id, puts).await?;
    }
    for chunk in removes.chunks(PG_ARRAY_CHUNK) {
        let hashes: Vec<Vec<u8>> = chunk.iter().map(|k| key_hash(k)).collect();
        sqlx::query(&format!(
            "DELETE FROM {state} WHERE sync_id = $1 AND key_hash = ANY($2::bytea[])"
        ))
        .bind(sync_id)
        .bind(&hashes)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Binary `COPY` of the puts into the (empty) staging table; returns the rows copied.
async fn pg_copy_to_staging(
    c: &mut PgConnection,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
) -> Result<u64, sqlx::Error> {
    let mut first = puts.next();
    if first.is_none() {
        return Ok(0);
    }
    copy_binary(
        c,
        "COPY pg_temp.backflow_checkpoint (key_hash, key, fingerprint, identity) FROM STDIN (FORMAT binary)",
        |data| first.take().or_else(|| puts.next()).map(|e| copy_row(data, e)),
    )
    .await
}

/// Runs `statement`, a `COPY ... FROM STDIN (FORMAT binary)`, with the rows `next_row`
/// appends to the data one at a time (`None` when there are no more), sent about
/// [`COPY_SEND_BYTES`] at a time; a row that cannot be encoded (an error of `next_row`)
/// aborts the COPY. Returns the rows copied.
pub(super) async fn copy_binary<E: From<sqlx::Error> + std::fmt::Display>(
    c: &mut PgConnection,
    statement: &str,
    mut next_row: impl FnMut(&mut Vec<u8>) -> Option<Result<(), E>> + Send,
) -> Result<u64, E> {
    let mut copy = c.copy_in_raw(statement).await?;
    let mut data = Vec::with_capacity(COPY_SEND_BYTES + 4096);
    data.extend_from_slice(COPY_HEADER);
    while let Some(encoded) = next_row(&mut data) {
        if let Err(e) = encoded {
            copy.abort(e.to_string()).await?;
            return Err(e);
        }
        if data.len() >= COPY_SEND_BYTES {
            copy.send(data.as_slice()).await?;
            data.clear();
        }
    }
    data.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(data).await?;
    Ok(copy.finish().await?)
}

/// Appends one row of (key_hash, key, fingerprint, identity) in binary COPY format.
fn copy_row(data: &mut Vec<u8>, e: EntryRef<'_>) -> Result<(), sqlx::Error> {
    data.extend_from_slice(&4i16.to_be_bytes());
    copy_field(data, &crate::state::stored_key_hash(e.key).to_be_bytes())?;
    copy_field(data, e.key.as_bytes())?;
    copy_field(data, &(e.fingerprint as i64).to_be_bytes())?;
    copy_field(data, e.identity.as_bytes())
}

/// Appends one non-NULL field in binary COPY format: its length, then its bytes.
pub(super) fn copy_field(data: &mut Vec<u8>, bytes: &[u8]) -> Result<(), sqlx::Error> {
    let len = i32::try_from(bytes.len()).map_err(|_| {
        sqlx::Error::Encode(format!("a state value of {} bytes is too long", bytes.len()).into())
    })?;
    data.extend_from_slice(&len.to_be_bytes());
    data.extend_from_slice(bytes);
    Ok(())
}

/// The first checkpoint under a new scope, in its transaction on PostgreSQL: deletes the
/// sync's rows of `tables`, then records the scope.
pub(super) async fn pg_new_scope(
    c: &mut PgConnection,
    target: &Target<'_>,
    tables: &[&str],
) -> Result<(), sqlx::Error> {
    for table in tables {
        sqlx::query(&format!("DELETE FROM {table} WHERE sync_id = $1"))
            .bind(target.sync_id)
            .execute(&mut *c)
            .await?;
    }
    sqlx::query(&format!(
        "INSERT INTO {} (sync_id, scope, updated_at) VALUES ($1, $2, now()) \
         ON CONFLICT (sync_id) DO UPDATE SET scope = EXCLUDED.scope, updated_at = now()",
        target.syncs
    ))
    .bind(target.sync_id)
    .bind(target.scope)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// [`pg_new_scope`] on MySQL/MariaDB.
pub(super) async fn my_new_scope(
    c: &mut MySqlConnection,
    target: &Target<'_>,
    tables: &[&str],
) -> Result<(), sqlx::Error> {
    for table in tables {
        sqlx::query(&format!("DELETE FROM {table} WHERE sync_id = ?"))
            .bind(target.sync_id)
            .execute(&mut *c)
            .await?;
    }
    sqlx::query(&format!(
        "INSERT INTO {} (sync_id, scope, updated_at) VALUES (?, ?, UTC_TIMESTAMP(6)) \
         ON DUPLICATE KEY UPDATE scope = VALUES(scope), updated_at = VALUES(updated_at)",
        target.syncs
    ))
    .bind(target.sync_id)
    .bind(target.scope)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// The upsert without a staging table: `UNNEST` of one array per column, in chunks.
async fn pg_array_upsert(
    c: &mut PgConnection,
    state: &str,
    sync_id: &str,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
) -> Result<(), sqlx::Error> {
    let upsert = format!(
        "INSERT INTO {state} (sync_id, key_hash, key, fingerprint, identity, updated_at) \
         SELECT $1, h, k, f, i, now() FROM UNNEST($2::bytea[], $3::text[], $4::int8[], $5::text[]) AS u(h, k, f, i) \
         ON CONFLICT (sync_id, key_hash) DO UPDATE SET key = EXCLUDED.key, \
         fingerprint = EXCLUDED.fingerprint, identity = EXCLUDED.identity, updated_at = EXCLUDED.updated_at"
    );
    let (mut hashes, mut keys, mut fps, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    loop {
        let next = puts.next();
        if let Some(e) = next {
            hashes.push(key_hash(e.key));
            keys.push(e.key.to_owned());
            fps.push(e.fingerprint as i64);
            ids.push(e.identity.to_owned());
        }
        if !hashes.is_empty() && (next.is_none() || hashes.len() >= PG_ARRAY_CHUNK) {
            sqlx::query(&upsert)
                .bind(sync_id)
                .bind(&hashes)
                .bind(&keys)
                .bind(&fps)
                .bind(&ids)
                .execute(&mut *c)
                .await?;
            hashes.clear();
            keys.clear();
            fps.clear();
            ids.clear();
        }
        if next.is_none() {
            return Ok(());
        }
    }
}

/// Writes one checkpoint on MySQL/MariaDB.
pub(super) async fn my_write(
    c: &mut MySqlConnection,
    target: &Target<'_>,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
    removes: &[&str],
) -> Result<(), sqlx::Error> {
    let Target { state, sync_id, .. } = *target;
    let mut tx = c.begin().await?;
    if target.new_scope {
        my_new_scope(&mut tx, target, &[state]).await?;
    }
    let mut chunk: Vec<(Vec<u8>, EntryRef<'_>)> = Vec::with_capacity(MYSQL_CHUNK);
    loop {
        let next = puts.next();
        if let Some(e) = next {
            chunk.push((key_hash(e.key), e));
        }
        if !chunk.is_empty() && (next.is_none() || chunk.len() >= MYSQL_CHUNK) {
            // In the clustered index's order: fewer pages touched, fewer lock waits.
            chunk.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let mut q = QueryBuilder::new(format!(
                "INSERT INTO {state} (sync_id, key_hash, `key`, fingerprint, identity, updated_at) "
            ));
            q.push_values(chunk.drain(..), |mut b, (hash, e)| {
                b.push_bind(sync_id)
                    .push_bind(hash)
                    .push_bind(e.key)
                    .push_bind(e.fingerprint as i64)
                    .push_bind(e.identity)
                    .push("UTC_TIMESTAMP(6)");
            });
            q.push(
                " ON DUPLICATE KEY UPDATE `key` = VALUES(`key`), fingerprint = VALUES(fingerprint), \
                 identity = VALUES(identity), updated_at = VALUES(updated_at)",
            );
            q.build().execute(&mut *tx).await?;
        }
        if next.is_none() {
            break;
        }
    }
    for keys in removes.chunks(MYSQL_CHUNK) {
        let mut q = QueryBuilder::new(format!("DELETE FROM {state} WHERE sync_id = "));
        q.push_bind(sync_id).push(" AND key_hash IN (");
        let mut sep = q.separated(", ");
        for k in keys {
            sep.push_bind(key_hash(k));
        }
        q.push(")");
        q.build().execute(&mut *tx).await?;
    }
    tx.commit().await
}

/// Creates the session's staging table on a new connection. `Ok(false)`: the user may not
/// create temporary tables (checkpoints then use the array upsert).
pub(super) async fn pg_create_staging(c: &mut PgConnection) -> Result<bool, sqlx::Error> {
    match c.execute(PG_CREATE_STAGING).await {
        Ok(_) => Ok(true),
        // insufficient_privilege: no TEMP right on the database.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_rows_are_four_length_prefixed_fields() {
        let mut data = Vec::new();
        copy_row(
            &mut data,
            EntryRef {
                key: "k1",
                fingerprint: u64::MAX,
                identity: "{\"id\":1}",
            },
        )
        .unwrap();
        let mut expected = 4i16.to_be_bytes().to_vec();
        expected.extend_from_slice(&16i32.to_be_bytes());
        expected.extend_from_slice(&crate::state::stored_key_hash("k1").to_be_bytes());
        expected.extend_from_slice(&2i32.to_be_bytes());
        expected.extend_from_slice(b"k1");
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(&(-1i64).to_be_bytes());
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(b"{\"id\":1}");
        assert_eq!(data, expected);
        assert_eq!(COPY_HEADER.len(), 19);
    }
}
