//! Checkpoints packed, on PostgreSQL: `backflow_checkpoints (sync_id, seq, changes, data)`,
//! primary key `(sync_id, seq)`, for a sync whose state is kept in blocks.
//!
//! A checkpoint sorts its changes by key hash and writes them as change records (see
//! `changes`) into one row, or several of at most [`ROW_BYTES`] each, in its one transaction.
//! Appended a row per change to `backflow_journal`, a checkpoint costs the server a tuple, a
//! sequence number and an index entry per change (about 2.7 µs a change at 10,000,000 rows,
//! on the run's critical CPU); packed, it costs one value stored out of line. The server never
//! reads the records: `data` is stored without compression (key hashes do not compress).
//!
//! The fold reads the sync's rows in `seq` order into a local temporary file (about 52 bytes
//! a change for the benchmark's rows), merges them by key hash, the latest checkpoint's change
//! of a key winning, and folds the result into the sync's blocks (see `blocks`), in one
//! transaction that then deletes the rows. Each row is a sorted run, so the merge needs no
//! sort, on the server or here.
//!
//! Only a sync without rows in `backflow_state` has its checkpoints packed: one whose state an
//! earlier release wrote in rows keeps appending rows to `backflow_journal`.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

use super::blocks::{FoldError, fold_sorted};
use super::changes::{Change, Changes, SortedChanges};
use super::copy_tuples::{Malformed, copy_out, literal};
use super::journal::{pg_clear, pg_vacuum};
use super::write::{copy_binary, copy_field};
use super::{OptionalTable, WarehouseStore, pg_sync_has_rows};
use crate::state::EntryRef;

/// The table's name in the state schema.
pub(super) const TABLE: &str = "backflow_checkpoints";

/// Bytes of records a row holds at most: a larger checkpoint is cut into several rows, each
/// sorted (its keys are distinct, so the rows' order does not matter).
const ROW_BYTES: u64 = 8 << 20;

/// Read buffers of the merge, shared out between its runs (each gets 4–256 KiB).
const MERGE_BUFFERS: usize = 16 << 20;

/// The table, created on PostgreSQL next to the blocks table when the state user may
/// (without it, checkpoints go to the journal's rows).
pub(super) const OPTIONAL: OptionalTable = OptionalTable {
    name: TABLE,
    ddl: pg_ddl,
    without: "the state user may not create backflow_checkpoints: checkpoints are appended to \
              backflow_journal's rows, which is slower for large runs (DDL in docs/state.md)",
};

/// The table's DDL on PostgreSQL, `schema` quoted.
fn pg_ddl(schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.backflow_checkpoints (
  sync_id TEXT NOT NULL,
  seq BIGINT GENERATED ALWAYS AS IDENTITY,
  changes INTEGER NOT NULL,
  data BYTEA NOT NULL,
  PRIMARY KEY (sync_id, seq)
);
ALTER TABLE {schema}.backflow_checkpoints ALTER COLUMN data SET STORAGE EXTERNAL;"
    )
}

impl WarehouseStore {
    /// `backflow_checkpoints`, quoted, when it is there (PostgreSQL only).
    pub(super) fn checkpoints_table(&self) -> Option<String> {
        (self.checkpoints == Some(true)).then(|| self.table(TABLE))
    }
}

/// Appends one checkpoint's puts and removes (distinct keys) to `table`, inside the
/// checkpoint's transaction `tx`.
pub(super) async fn pg_append(
    tx: &mut PgConnection,
    table: &str,
    sync_id: &str,
    puts: &mut (dyn Iterator<Item = EntryRef<'_>> + Send),
    removes: &[&str],
) -> Result<(), sqlx::Error> {
    let hash = crate::state::stored_key_hash;
    let mut changes: Vec<Change<&[u8]>> = puts
        .map(|e| Change {
            hash: hash(e.key),
            key: e.key.as_bytes(),
            put: Some((e.fingerprint as i64, e.identity.as_bytes())),
        })
        .chain(removes.iter().map(|key| Change {
            hash: hash(key),
            key: key.as_bytes(),
            put: None,
        }))
        .collect();
    changes.sort_unstable_by_key(|c| c.hash);
    let sync_id = sync_id.as_bytes();
    let mut rest = &changes[..];
    copy_binary(
        tx,
        &format!("COPY {table} (sync_id, changes, data) FROM STDIN (FORMAT binary)"),
        |data| {
            if rest.is_empty() {
                return None;
            }
            let (count, bytes) = next_row(rest, ROW_BYTES);
            let (row, after) = rest.split_at(count);
            rest = after;
            Some(copy_row(data, sync_id, row, bytes))
        },
    )
    .await?;
    Ok(())
}

/// How many of `changes` (not empty) the next row holds, and their bytes: at least one, then
/// as many as fit in `limit` bytes.
fn next_row<B: AsRef<[u8]>>(changes: &[Change<B>], limit: u64) -> (usize, u64) {
    let (mut count, mut bytes) = (1, changes[0].record_length());
    while let Some(next) = changes.get(count) {
        let length = next.record_length();
        if bytes + length > limit {
            break;
        }
        bytes += length;
        count += 1;
    }
    (count, bytes)
}

/// Appends one row of (sync_id, changes, data) in binary COPY format.
fn copy_row<B: AsRef<[u8]>>(
    data: &mut Vec<u8>,
    sync_id: &[u8],
    row: &[Change<B>],
    bytes: u64,
) -> Result<(), sqlx::Error> {
    let too_long = || sqlx::Error::Encode(format!("a packed checkpoint of {bytes} bytes is too long").into());
    data.extend_from_slice(&3i16.to_be_bytes());
    copy_field(data, sync_id)?;
    let count = i32::try_from(row.len()).map_err(|_| too_long())?;
    copy_field(data, &count.to_be_bytes())?;
    data.extend_from_slice(&i32::try_from(bytes).map_err(|_| too_long())?.to_be_bytes());
    for change in row {
        change
            .write(data)
            .map_err(|e| sqlx::Error::Encode(e.to_string().into()))?;
    }
    Ok(())
}

/// Folds the sync's packed checkpoints of `table` into its blocks of `blocks`, in one
/// transaction on `c` that then deletes them. The sync holds no rows in `backflow_state`.
pub(super) async fn pg_fold(
    c: &mut PgConnection,
    state: &str,
    table: &str,
    blocks: &str,
    sync_id: &str,
) -> Result<(), FoldError> {
    let mut tx = c.begin().await?;
    if pg_sync_has_rows(&mut tx, state, sync_id).await? {
        return Err(Malformed("the sync holds rows of backflow_state as well as packed checkpoints").into());
    }
    let (mut merge, changes, bytes) = read_runs(&mut tx, table, sync_id).await?;
    fold_sorted(&mut tx, blocks, sync_id, &mut merge).await?;
    if pg_clear(tx, table, sync_id, "changes").await? {
        pg_vacuum(c, table).await;
    }
    tracing::debug!(changes, bytes, "packed checkpoints folded into the sync's blocks");
    Ok(())
}

/// Reads the sync's rows of `table`, in the order they were written, into a local temporary
/// file, and returns their merge with the number of changes they hold and the file's bytes.
async fn read_runs(c: &mut PgConnection, table: &str, sync_id: &str) -> Result<(Merge, u64, u64), FoldError> {
    let mut file = BufWriter::with_capacity(1 << 20, tempfile::tempfile()?);
    let (mut runs, mut at, mut changes) = (Vec::new(), 0u64, 0u64);
    let query = format!(
        "SELECT changes, data FROM {table} WHERE sync_id = {} ORDER BY seq",
        literal(sync_id)
    );
    copy_out(c, &query, |[count, data]| -> Result<(), FoldError> {
        let count: [u8; 4] = count
            .and_then(|c| c.try_into().ok())
            .ok_or(Malformed("a packed checkpoint without its count of changes"))?;
        let data = data.ok_or(Malformed("a packed checkpoint without its data"))?;
        file.write_all(data)?;
        runs.push((at, data.len() as u64));
        at += data.len() as u64;
        changes += u64::from(u32::from_be_bytes(count));
        Ok(())
    })
    .await?;
    let file = file.into_inner().map_err(|e| e.into_error())?;
    Ok((Merge::new(file, &runs)?, changes, at))
}

/// A reader of one run of the spool file, at its own position.
struct RunReader {
    file: Arc<std::fs::File>,
    at: u64,
}

impl Read for RunReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let read = self.file.read_at(buf, self.at)?;
        self.at += read as u64;
        Ok(read)
    }
}

/// Sorted runs of changes merged into one sorted stream, one change per key: of a key's
/// changes in several runs, the last run's wins.
pub(super) struct Merge {
    runs: Vec<Changes<BufReader<RunReader>>>,
    /// The next key hash of each run not yet at its end, lowest first, later runs first.
    heads: BinaryHeap<Reverse<(u128, Reverse<usize>)>>,
}

impl Merge {
    /// The merge of the runs at `(offset, length)` of `file`.
    fn new(file: std::fs::File, runs: &[(u64, u64)]) -> Result<Merge, FoldError> {
        let file = Arc::new(file);
        let capacity = (MERGE_BUFFERS / runs.len().max(1)).clamp(4 << 10, 256 << 10);
        let mut merge = Merge {
            runs: Vec::with_capacity(runs.len()),
            heads: BinaryHeap::with_capacity(runs.len()),
        };
        for (i, &(at, length)) in runs.iter().enumerate() {
            let reader = RunReader {
                file: Arc::clone(&file),
                at,
            };
            let run = Changes::new(BufReader::with_capacity(capacity, reader), length)?;
            if let Some(hash) = run.peek_hash() {
                merge.heads.push(Reverse((hash, Reverse(i))));
            }
            merge.runs.push(run);
        }
        Ok(merge)
    }

    /// Takes the change of `hash` at the head of run `i` and queues the run's next one.
    fn advance(&mut self, i: usize, hash: u128) -> Result<(), FoldError> {
        let run = &mut self.runs[i];
        if run.next_change()?.is_none() {
            return Err(Malformed("a packed checkpoint ended before its queued change").into());
        }
        if let Some(next) = run.peek_hash() {
            if next <= hash {
                return Err(Malformed("a packed checkpoint is not sorted by key hash").into());
            }
            self.heads.push(Reverse((next, Reverse(i))));
        }
        Ok(())
    }
}

impl SortedChanges for Merge {
    fn next_change(&mut self) -> Result<Option<&Change>, FoldError> {
        let Some(Reverse((hash, Reverse(latest)))) = self.heads.pop() else {
            return Ok(None);
        };
        // Earlier checkpoints' changes of the same key, which the latest supersedes.
        while let Some(&Reverse((next, Reverse(earlier)))) = self.heads.peek()
            && next == hash
        {
            self.heads.pop();
            self.advance(earlier, hash)?;
        }
        self.advance(latest, hash)?;
        Ok(Some(self.runs[latest].taken()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::changes::testing::{put, records, remove};
    use super::*;

    fn merge_of(runs: &[Vec<Change>]) -> Result<Vec<Change>, FoldError> {
        let mut file = tempfile::tempfile().unwrap();
        let (mut offsets, mut at) = (Vec::new(), 0u64);
        for run in runs {
            let bytes = records(run);
            file.write_all(&bytes).unwrap();
            offsets.push((at, bytes.len() as u64));
            at += bytes.len() as u64;
        }
        let mut merge = Merge::new(file, &offsets)?;
        let mut out = Vec::new();
        while let Some(change) = merge.next_change()? {
            out.push(change.clone());
        }
        Ok(out)
    }

    #[test]
    fn runs_merge_in_key_hash_order_and_the_last_change_of_a_key_wins() {
        let merged = merge_of(&[
            vec![put(1, 1), put(4, 1), put(7, 1)],
            vec![],
            vec![put(2, 2), remove(4), put(9, 2)],
            vec![put(4, 3), put(7, 3)],
            vec![remove(9)],
        ])
        .unwrap();
        assert_eq!(
            merged,
            vec![put(1, 1), put(2, 2), put(4, 3), put(7, 3), remove(9)]
        );
    }

    #[test]
    fn many_small_runs_share_out_the_buffers() {
        let runs: Vec<Vec<Change>> = (0..3000u128)
            .map(|i| vec![put(i * 2, 1), put(i * 2 + 1, 2)])
            .collect();
        let merged = merge_of(&runs).unwrap();
        assert_eq!(merged.len(), 6000);
        assert!(merged.windows(2).all(|w| w[0].hash < w[1].hash));
    }

    #[test]
    fn a_run_out_of_order_or_repeating_a_key_is_refused() {
        for run in [vec![put(2, 1), put(1, 1)], vec![put(1, 1), put(1, 2)]] {
            let refused = merge_of(&[vec![put(0, 0)], run]);
            assert!(matches!(refused, Err(FoldError::Malformed(_))), "{refused:?}");
        }
    }

    #[test]
    fn a_checkpoint_is_cut_into_rows_of_at_most_the_limit() {
        let changes: Vec<Change> = (0..5).map(|n| put(n, 1)).collect();
        let one = changes[0].record_length();
        assert_eq!(next_row(&changes, 2 * one), (2, 2 * one));
        assert_eq!(next_row(&changes, 2 * one - 1), (1, one));
        // A record longer than the limit still makes a row of its own.
        assert_eq!(next_row(&changes, 1), (1, one));
        assert_eq!(next_row(&changes, ROW_BYTES), (5, 5 * one));
    }

    #[test]
    fn a_row_is_its_sync_count_and_records() {
        let sync_id = b"ns/s";
        let changes: Vec<Change> = (0..3).map(|n| put(n, 1)).collect();
        let mut data = Vec::new();
        copy_row(&mut data, sync_id, &changes, records(&changes).len() as u64).unwrap();
        // The field count, the sync id, the change count, then the records after their length.
        assert_eq!(&data[..2], &3i16.to_be_bytes());
        let records_at = 2 + 4 + sync_id.len() + 4 + 4 + 4;
        assert_eq!(&data[records_at..], &records(&changes)[..]);
    }
}
