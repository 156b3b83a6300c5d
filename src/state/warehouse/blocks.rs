//! A sync's state on PostgreSQL as blocks of rows: `backflow_state_blocks (sync_id,
//! first_hash, row_count, data, updated_at)`, primary key `(sync_id, first_hash)`.
//!
//! Rows sorted by key hash are packed [`BLOCK_ROWS`] to a `bytea` value. A block holds the keys
//! from its `first_hash` (its lowest key hash) up to the next block's `first_hash`; a key below
//! every block's belongs to the first block. Written a row per key, a state costs a random
//! insert into `backflow_state`'s primary key per row (96 s for a first fold of 10,000,000
//! rows on PostgreSQL 15 at default settings, with another sync's rows beside them); packed,
//! the first fold writes one index entry per 32 rows, in order (5 s), and the diff reads the
//! pairs out of 440 MB of blocks instead of 2 GB of rows. A later fold rewrites only the blocks
//! its changed keys fall in: with blocks this small, a 1% change touches about as many blocks
//! as keys and costs about what upserting the rows did. See docs/performance.md.
//!
//! A sync's keys are either rows of `backflow_state` or blocks, never both. The fold packs
//! only a sync that holds no rows (a first run, a new scope, a state this release wrote); a
//! sync with rows (written by an earlier release, or without the journal) keeps them. The
//! operator packs and unpacks the blocks; the server only stores them.
//!
//! A block's `data`: the row count `n` (u32), then `n` key hashes (16 bytes each, as
//! `key_hash`), `n` fingerprints (i64), `n` key lengths and `n` identity lengths (u32), then
//! the keys and the identities, each run of them back to back; every number big-endian.
//!
//! The fold into blocks is in `fold`.

use std::io::Write;

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;

use super::changes::length;
use super::copy_tuples::Malformed;
use super::write::copy_field;
use super::{Conn, OptionalTable, WarehouseStore, pg_sync_has_rows};
use crate::state::StateError;

mod fold;

pub(super) use fold::{FoldError, fold_sorted, pg_fold};

/// The table's name in the state schema.
pub(super) const TABLE: &str = "backflow_state_blocks";

/// Rows a block holds at most: about 1 KB of the scale benchmark's rows, below the 2 KB past
/// which PostgreSQL moves a value out of its row (and tries to compress it).
pub(super) const BLOCK_ROWS: usize = 32;

/// The table, created on PostgreSQL when the journal is in use and the state user may
/// (without it, states are folded into `backflow_state`'s rows).
pub(super) const OPTIONAL: OptionalTable = OptionalTable {
    name: TABLE,
    ddl: pg_ddl,
    without: "the state user may not create backflow_state_blocks: states are folded into \
              backflow_state's rows, which is slower for large states (DDL in docs/state.md)",
};

/// The table's DDL on PostgreSQL, `schema` quoted.
fn pg_ddl(schema: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {schema}.backflow_state_blocks (
  sync_id TEXT NOT NULL,
  first_hash BYTEA NOT NULL,
  row_count INTEGER NOT NULL,
  data BYTEA NOT NULL,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
  PRIMARY KEY (sync_id, first_hash)
);"
    )
}

/// One row of a block, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StoredRow<'a> {
    /// The key's hash (`key_hash` as a big-endian number).
    pub hash: u128,
    /// The fingerprint, as stored (the u64's bits).
    pub fingerprint: i64,
    /// The canonical key.
    pub key: &'a [u8],
    /// The canonical JSON of the match fields.
    pub identity: &'a [u8],
}

/// A block's columns, checked whole when parsed.
#[derive(Debug)]
pub(super) struct Block<'a> {
    rows: usize,
    /// Bytes of the keys, which `text` holds before the identities.
    keys_length: usize,
    hashes: &'a [u8],
    fingerprints: &'a [u8],
    key_lengths: &'a [u8],
    identity_lengths: &'a [u8],
    text: &'a [u8],
}

/// The big-endian u32 at `at` of a slice already checked long enough.
fn u32_at(bytes: &[u8], at: usize) -> usize {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
}

impl<'a> Block<'a> {
    /// Checks a block's lengths against its size.
    pub fn parse(data: &'a [u8]) -> Result<Block<'a>, Malformed> {
        const SHORT: Malformed = Malformed("a state block is shorter than its row count says");
        let Some(count) = data.get(..4) else {
            return Err(SHORT);
        };
        let rows = u32_at(count, 0);
        // 32 bytes of fixed columns a row; a row count no block can hold fails the checks.
        let fixed = rows.checked_mul(32).ok_or(SHORT)?;
        let rest = data.get(4..).ok_or(SHORT)?;
        if rest.len() < fixed {
            return Err(SHORT);
        }
        let (hashes, rest) = rest.split_at(rows * 16);
        let (fingerprints, rest) = rest.split_at(rows * 8);
        let (key_lengths, rest) = rest.split_at(rows * 4);
        let (identity_lengths, text) = rest.split_at(rows * 4);
        let sum =
            |lengths: &[u8]| (0..rows).try_fold(0usize, |total, i| total.checked_add(u32_at(lengths, i * 4)));
        let keys_length = sum(key_lengths).ok_or(SHORT)?;
        let total = sum(identity_lengths)
            .and_then(|i| i.checked_add(keys_length))
            .ok_or(SHORT)?;
        if total != text.len() {
            return Err(Malformed(
                "a state block's text is not as long as its lengths add up to",
            ));
        }
        Ok(Block {
            rows,
            keys_length,
            hashes,
            fingerprints,
            key_lengths,
            identity_lengths,
            text,
        })
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows
    }

    /// The key hash and stored fingerprint of row `i` (below [`Self::len`]).
    pub fn pair(&self, i: usize) -> (u128, i64) {
        let mut hash = [0u8; 16];
        hash.copy_from_slice(&self.hashes[i * 16..i * 16 + 16]);
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&self.fingerprints[i * 8..i * 8 + 8]);
        (u128::from_be_bytes(hash), i64::from_be_bytes(fingerprint))
    }

    /// Every row, in key-hash order.
    pub fn rows(&self) -> impl Iterator<Item = StoredRow<'a>> + '_ {
        let (keys, identities) = self.text.split_at(self.keys_length);
        let (mut key_at, mut identity_at) = (0usize, 0usize);
        (0..self.rows).map(move |i| {
            let (hash, fingerprint) = self.pair(i);
            let key_end = key_at + u32_at(self.key_lengths, i * 4);
            let identity_end = identity_at + u32_at(self.identity_lengths, i * 4);
            let row = StoredRow {
                hash,
                fingerprint,
                key: &keys[key_at..key_end],
                identity: &identities[identity_at..identity_end],
            };
            (key_at, identity_at) = (key_end, identity_end);
            row
        })
    }
}

/// Packs rows, pushed in key-hash order, into blocks written as binary `COPY` tuples of
/// `(sync_id, first_hash, row_count, data)` to the output each call is given.
pub(super) struct Packer {
    sync_id: Vec<u8>,
    rows: usize,
    first: u128,
    /// A tuple's fields before its block's columns, used again for every block.
    head: Vec<u8>,
    hashes: Vec<u8>,
    fingerprints: Vec<u8>,
    key_lengths: Vec<u8>,
    identity_lengths: Vec<u8>,
    keys: Vec<u8>,
    identities: Vec<u8>,
    /// Blocks written.
    blocks: u64,
}

impl Packer {
    /// A packer of `sync_id`'s blocks.
    pub fn new(sync_id: &str) -> Packer {
        Packer {
            sync_id: sync_id.as_bytes().to_vec(),
            rows: 0,
            first: 0,
            head: Vec::new(),
            hashes: Vec::new(),
            fingerprints: Vec::new(),
            key_lengths: Vec::new(),
            identity_lengths: Vec::new(),
            keys: Vec::new(),
            identities: Vec::new(),
            blocks: 0,
        }
    }

    /// Adds a row (after every row pushed before it in key-hash order); a full block is
    /// written to `out`.
    pub fn push(
        &mut self,
        out: &mut impl Write,
        hash: u128,
        fingerprint: i64,
        key: &[u8],
        identity: &[u8],
    ) -> Result<(), FoldError> {
        if self.rows == BLOCK_ROWS {
            self.flush(out)?;
        }
        if self.rows == 0 {
            self.first = hash;
        }
        self.hashes.extend_from_slice(&hash.to_be_bytes());
        self.fingerprints.extend_from_slice(&fingerprint.to_be_bytes());
        self.key_lengths.extend_from_slice(&length(key)?);
        self.identity_lengths.extend_from_slice(&length(identity)?);
        self.keys.extend_from_slice(key);
        self.identities.extend_from_slice(identity);
        self.rows += 1;
        Ok(())
    }

    /// Writes the rows pushed since the last block to `out` as a block of their own (nothing
    /// when there are none): the end of a range of keys that the next rows must not share a
    /// block with.
    pub fn flush(&mut self, out: &mut impl Write) -> Result<(), FoldError> {
        if self.rows == 0 {
            return Ok(());
        }
        let columns = [
            &self.hashes,
            &self.fingerprints,
            &self.key_lengths,
            &self.identity_lengths,
            &self.keys,
            &self.identities,
        ];
        // The tuple's fields before `data`, then `data` written in place after its length:
        // the row count (at most BLOCK_ROWS) and the columns.
        let head = &mut self.head;
        head.clear();
        head.extend_from_slice(&4i16.to_be_bytes());
        copy_field(head, &self.sync_id)?;
        copy_field(head, &self.first.to_be_bytes())?;
        copy_field(head, &(self.rows as i32).to_be_bytes())?;
        let data_length = 4 + columns.iter().map(|c| c.len()).sum::<usize>();
        let data_length = i32::try_from(data_length).map_err(|_| {
            sqlx::Error::Encode(format!("a state block of {data_length} bytes is too long").into())
        })?;
        head.extend_from_slice(&data_length.to_be_bytes());
        head.extend_from_slice(&(self.rows as u32).to_be_bytes());
        out.write_all(head)?;
        for column in columns {
            out.write_all(column)?;
        }
        self.blocks += 1;
        self.rows = 0;
        for column in [
            &mut self.hashes,
            &mut self.fingerprints,
            &mut self.key_lengths,
            &mut self.identity_lengths,
            &mut self.keys,
            &mut self.identities,
        ] {
            column.clear();
        }
        Ok(())
    }

    /// Blocks written so far.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Writes the last block to `out` and returns the number of blocks written.
    pub fn finish(&mut self, out: &mut impl Write) -> Result<u64, FoldError> {
        self.flush(out)?;
        out.flush()?;
        Ok(self.blocks)
    }
}

impl WarehouseStore {
    /// `backflow_state_blocks`, quoted, when it is there (PostgreSQL only).
    pub(super) fn blocks_table(&self) -> Option<String> {
        (self.blocks == Some(true)).then(|| self.table(TABLE))
    }

    /// True when the sync holds blocks (false without the table).
    pub(super) async fn holds_blocks(&mut self) -> Result<bool, StateError> {
        let Some(blocks) = self.blocks_table() else {
            return Ok(false);
        };
        let sync_id = self.config.sync_id.clone();
        let Some(Conn::Pg(c)) = self.conn.as_mut() else {
            return Ok(false);
        };
        let held = pg_sync_has_rows(c, &blocks, &sync_id).await;
        held.map_err(|e| self.sql_error("look for the sync's state blocks", e))
    }
}

/// Reads every block of `sync_id` in `blocks` and calls `row` with each of its rows.
pub(super) async fn read_rows(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    mut row: impl FnMut(StoredRow<'_>) -> Result<(), sqlx::Error>,
) -> Result<(), sqlx::Error> {
    let sql = format!("SELECT data FROM {blocks} WHERE sync_id = $1");
    let mut stored = sqlx::query_scalar::<_, Vec<u8>>(&sql).bind(sync_id).fetch(c);
    while let Some(data) = stored.try_next().await? {
        let block = Block::parse(&data).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        for r in block.rows() {
            row(r)?;
        }
    }
    Ok(())
}

/// The rows of `sync_id` in `blocks` whose key hash is in `hashes`: the blocks that would
/// hold them are looked up (the greatest `first_hash` at or below each) and read whole.
pub(super) async fn rows_of(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    hashes: &[u128],
) -> Result<Vec<(String, String)>, sqlx::Error> {
    let wanted: std::collections::HashSet<u128> = hashes.iter().copied().collect();
    let keys: Vec<Vec<u8>> = hashes.iter().map(|h| h.to_be_bytes().to_vec()).collect();
    let sql = format!(
        "SELECT data FROM {blocks} WHERE sync_id = $1 AND first_hash IN ( \
           SELECT (SELECT first_hash FROM {blocks} WHERE sync_id = $1 AND first_hash <= h \
                   ORDER BY first_hash DESC LIMIT 1) \
           FROM unnest($2::bytea[]) AS wanted(h))"
    );
    let mut stored = sqlx::query_scalar::<_, Vec<u8>>(&sql)
        .bind(sync_id)
        .bind(&keys)
        .fetch(c);
    let mut found = Vec::new();
    let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).map_err(|e| sqlx::Error::Decode(Box::new(e)));
    while let Some(data) = stored.try_next().await? {
        let block = Block::parse(&data).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
        for r in block.rows().filter(|r| wanted.contains(&r.hash)) {
            found.push((text(r.key)?, text(r.identity)?));
        }
    }
    Ok(found)
}

/// Rows and blocks the tests of this module and of `fold` build.
#[cfg(test)]
mod testing {
    use super::*;
    use crate::state::warehouse::copy_tuples::{CopyTuples, hash_of};
    use crate::state::warehouse::write::COPY_HEADER;

    /// A row as the tests write it: hash, fingerprint, key, identity.
    pub(super) type Row = (u128, i64, Vec<u8>, Vec<u8>);

    /// Blocks written, each as its first hash and rows.
    pub(super) type Written = Vec<(u128, Vec<Row>)>;

    pub(super) fn row(n: u128) -> Row {
        (
            n << 64,
            n as i64,
            format!("k{n}").into_bytes(),
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    }

    /// The blocks a packer wrote, each as its first hash and rows.
    pub(super) fn blocks_of(copy: &[u8]) -> Written {
        let mut data = COPY_HEADER.to_vec();
        data.extend_from_slice(copy);
        data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut out = Vec::new();
        let mut tuples = CopyTuples::<4>::default();
        tuples
            .feed(&data, |[sync, first, count, block]| -> Result<(), Malformed> {
                assert_eq!(sync, Some(&b"ns/s"[..]));
                let block = Block::parse(block.unwrap()).unwrap();
                assert_eq!(count, Some(&(block.len() as i32).to_be_bytes()[..]));
                let rows: Vec<_> = block
                    .rows()
                    .map(|r| (r.hash, r.fingerprint, r.key.to_vec(), r.identity.to_vec()))
                    .collect();
                assert_eq!(hash_of(first).unwrap(), rows[0].0);
                out.push((rows[0].0, rows));
                Ok(())
            })
            .unwrap();
        assert!(tuples.ended());
        out
    }

    pub(super) fn pack(rows: &[Row]) -> Vec<u8> {
        let (mut packer, mut out) = (Packer::new("ns/s"), Vec::new());
        for (h, f, k, i) in rows {
            packer.push(&mut out, *h, *f, k, i).unwrap();
        }
        packer.finish(&mut out).unwrap();
        out
    }

    /// One block's data.
    pub(super) fn pack_one(rows: &[Row]) -> Vec<u8> {
        let mut data = COPY_HEADER.to_vec();
        data.extend_from_slice(&pack(rows));
        let mut block = Vec::new();
        CopyTuples::<4>::default()
            .feed(&data, |[_, _, _, b]| -> Result<(), Malformed> {
                block = b.unwrap().to_vec();
                Ok(())
            })
            .unwrap();
        block
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::state::warehouse::copy_tuples::CopyTuples;
    use crate::state::warehouse::write::COPY_HEADER;

    #[test]
    fn rows_pack_into_blocks_of_32_and_read_back_whole() {
        let rows: Vec<_> = (0..70).map(row).collect();
        let blocks = blocks_of(&pack(&rows));
        assert_eq!(blocks.iter().map(|b| b.1.len()).collect::<Vec<_>>(), [32, 32, 6]);
        let back: Vec<_> = blocks.into_iter().flat_map(|b| b.1).collect();
        assert_eq!(back, rows);
        // An empty identity and an empty key are rows like any other.
        let odd = vec![
            (1, -1, Vec::new(), Vec::new()),
            (2, i64::MIN, b"k".to_vec(), Vec::new()),
        ];
        assert_eq!(blocks_of(&pack(&odd))[0].1, odd);
    }

    #[test]
    fn malformed_blocks_are_refused_not_read_past_their_end() {
        let rows: Vec<_> = (0..3).map(row).collect();
        let copy = pack(&rows);
        let mut tuples = CopyTuples::<4>::default();
        let mut data = COPY_HEADER.to_vec();
        data.extend_from_slice(&copy);
        let mut block = Vec::new();
        tuples
            .feed(&data, |[_, _, _, b]| -> Result<(), Malformed> {
                block = b.unwrap().to_vec();
                Ok(())
            })
            .unwrap();
        assert!(Block::parse(&block).is_ok());
        for cut in [0, 3, 4, 20, block.len() - 1] {
            assert!(Block::parse(&block[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = block.clone();
        longer.push(b'x');
        assert!(Block::parse(&longer).is_err());
        let mut huge = block.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Block::parse(&huge).is_err());
    }

    #[test]
    fn copy_tuples_are_found_whatever_the_pieces() {
        let rows: Vec<_> = (0..40).map(row).collect();
        let mut data = COPY_HEADER.to_vec();
        data.extend_from_slice(&pack(&rows));
        data.extend_from_slice(&(-1i16).to_be_bytes());
        for step in [1, 5, 19, 1000] {
            let mut tuples = CopyTuples::<4>::default();
            let mut count = 0;
            for piece in data.chunks(step) {
                tuples
                    .feed(piece, |_| -> Result<(), Malformed> {
                        count += 1;
                        Ok(())
                    })
                    .unwrap();
            }
            assert!(tuples.ended(), "step {step}");
            assert_eq!(count, 2, "step {step}");
        }
        let mut tuples = CopyTuples::<5>::default();
        assert!(
            tuples
                .feed(&data, |_| -> Result<(), Malformed> { Ok(()) })
                .is_err()
        );
    }
}
