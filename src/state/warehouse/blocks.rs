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
//! The fold runs inside the journal's fold transaction ([`super::journal::pg_fold`]) and reads
//! the sync's journal: the last change of each key, sorted by key hash. A first fold reads it
//! on a second connection and sends the packed blocks by binary `COPY` as they fill. A later
//! fold keeps the changes in a local temporary file, reads the blocks they fall in (looked up
//! by key for up to [`LOOKUP_MAX`] changes, else all of the sync's blocks in order), merges
//! them into new blocks kept in another file, deletes the blocks it rewrote and writes the new
//! ones. A failure anywhere rolls all of it back with the journal left whole.

use std::io::{BufReader, BufWriter, Read, Write};

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::journal::{is_denied, table_exists};
use super::write::{COPY_HEADER, COPY_SEND_BYTES};
use super::{Conn, PG_DDL_LOCK, WarehouseStore, quote};
use crate::state::StateError;

/// The table's name in the state schema.
pub(super) const TABLE: &str = "backflow_state_blocks";

/// Rows a block holds at most: about 1 KB of the scale benchmark's rows, below the 2 KB past
/// which PostgreSQL moves a value out of its row (and tries to compress it).
pub(super) const BLOCK_ROWS: usize = 32;

/// Rewritten blocks deleted per statement.
const DELETE_CHUNK: usize = 10_000;

/// Changes up to which a fold looks their blocks up by key instead of reading all of the
/// sync's blocks (0.95 s at 10,000,000 rows in SQL; 10,000 lookups take about 0.1 s).
const LOOKUP_MAX: usize = 10_000;

/// The table's DDL on PostgreSQL, `schema` quoted.
pub(super) fn pg_ddl(schema: &str) -> String {
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

/// Data that does not have the shape this module writes: a block, or the server's `COPY`
/// data.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Malformed(pub &'static str);

/// Why a fold into blocks failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum FoldError {
    /// The database refused or failed a statement.
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    /// The local temporary file of the new blocks or of the journal's changes.
    #[error("a local temporary file of the fold failed: {0}")]
    Io(#[from] std::io::Error),
    /// A stored block or the server's data does not decode.
    #[error("the stored state does not decode: {0}")]
    Malformed(#[from] Malformed),
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
        let mut total = 0usize;
        for lengths in [key_lengths, identity_lengths] {
            for i in 0..rows {
                total = total.checked_add(u32_at(lengths, i * 4)).ok_or(SHORT)?;
            }
        }
        if total != text.len() {
            return Err(Malformed(
                "a state block's text is not as long as its lengths add up to",
            ));
        }
        Ok(Block {
            rows,
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
        let keys_length: usize = (0..self.rows).map(|i| u32_at(self.key_lengths, i * 4)).sum();
        let (keys, identities) = self.text.split_at(keys_length);
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
/// `(sync_id, first_hash, row_count, data)` to `out`.
pub(super) struct Packer<W: Write> {
    out: W,
    sync_id: Vec<u8>,
    rows: usize,
    first: u128,
    hashes: Vec<u8>,
    fingerprints: Vec<u8>,
    key_lengths: Vec<u8>,
    identity_lengths: Vec<u8>,
    keys: Vec<u8>,
    identities: Vec<u8>,
    /// Blocks written.
    blocks: u64,
}

/// A length as the u32 a block stores.
fn length(bytes: &[u8]) -> Result<[u8; 4], Malformed> {
    u32::try_from(bytes.len())
        .map(u32::to_be_bytes)
        .map_err(|_| Malformed("a key or identity over 4 GiB"))
}

/// Appends one binary `COPY` field.
fn field(out: &mut Vec<u8>, bytes: &[u8]) -> Result<(), Malformed> {
    let len = i32::try_from(bytes.len()).map_err(|_| Malformed("a state block over 2 GiB"))?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

impl<W: Write> Packer<W> {
    /// A packer of `sync_id`'s blocks.
    pub fn new(out: W, sync_id: &str) -> Packer<W> {
        Packer {
            out,
            sync_id: sync_id.as_bytes().to_vec(),
            rows: 0,
            first: 0,
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
    /// written.
    pub fn push(
        &mut self,
        hash: u128,
        fingerprint: i64,
        key: &[u8],
        identity: &[u8],
    ) -> Result<(), FoldError> {
        if self.rows == BLOCK_ROWS {
            self.flush()?;
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

    /// Writes the rows pushed since the last block as a block of their own (nothing when there
    /// are none): the end of a range of keys that the next rows must not share a block with.
    pub fn flush(&mut self) -> Result<(), FoldError> {
        if self.rows == 0 {
            return Ok(());
        }
        let mut data = Vec::with_capacity(
            4 + self.hashes.len()
                + self.fingerprints.len()
                + 8 * self.rows
                + self.keys.len()
                + self.identities.len(),
        );
        // At most BLOCK_ROWS rows.
        data.extend_from_slice(&(self.rows as u32).to_be_bytes());
        for column in [
            &self.hashes,
            &self.fingerprints,
            &self.key_lengths,
            &self.identity_lengths,
            &self.keys,
            &self.identities,
        ] {
            data.extend_from_slice(column);
        }
        let mut tuple = Vec::with_capacity(data.len() + 64 + self.sync_id.len());
        tuple.extend_from_slice(&4i16.to_be_bytes());
        field(&mut tuple, &self.sync_id)?;
        field(&mut tuple, &self.first.to_be_bytes())?;
        field(&mut tuple, &(self.rows as i32).to_be_bytes())?;
        field(&mut tuple, &data)?;
        self.out.write_all(&tuple)?;
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

    /// Where the blocks are written.
    pub fn output(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes the last block and returns the output with the number of blocks written.
    pub fn finish(mut self) -> Result<(W, u64), FoldError> {
        self.flush()?;
        self.out.flush()?;
        Ok((self.out, self.blocks))
    }
}

/// Splits PostgreSQL's binary `COPY` data into tuples of `N` fields, whatever the message
/// boundaries (<https://www.postgresql.org/docs/current/sql-copy.html#id-1.9.3.55.9.4>).
#[derive(Debug)]
pub(super) struct CopyTuples<const N: usize> {
    pending: Vec<u8>,
    header_read: bool,
    ended: bool,
}

impl<const N: usize> Default for CopyTuples<N> {
    fn default() -> Self {
        CopyTuples {
            pending: Vec::new(),
            header_read: false,
            ended: false,
        }
    }
}

impl<const N: usize> CopyTuples<N> {
    /// Takes the next piece of data and calls `tuple` with the fields (`None`: NULL) of each
    /// tuple completed by it.
    pub fn feed<E: From<Malformed>>(
        &mut self,
        bytes: &[u8],
        mut tuple: impl FnMut([Option<&[u8]>; N]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.pending.extend_from_slice(bytes);
        let data = &self.pending[..];
        let mut at = 0;
        if !self.header_read {
            // Signature, flags, header extension length and extension.
            let Some(extension) = data.get(15..19) else {
                return Ok(());
            };
            if data[..11] != COPY_HEADER[..11] {
                return Err(Malformed("COPY data without the binary signature").into());
            }
            let end = 19 + u32_at(extension, 0);
            if data.len() < end {
                return Ok(());
            }
            at = end;
            self.header_read = true;
        }
        while !self.ended {
            let Some(count) = data.get(at..at + 2) else {
                break;
            };
            let count = i16::from_be_bytes([count[0], count[1]]);
            if count == -1 {
                self.ended = true;
                at += 2;
                break;
            }
            if usize::try_from(count).ok() != Some(N) {
                return Err(Malformed("COPY data with another number of columns").into());
            }
            let mut fields = [None; N];
            let mut end = at + 2;
            let mut whole = true;
            for slot in &mut fields {
                let Some(length) = data.get(end..end + 4) else {
                    whole = false;
                    break;
                };
                end += 4;
                let length = i32::from_be_bytes([length[0], length[1], length[2], length[3]]);
                if length < 0 {
                    continue;
                }
                let Some(value) = data.get(end..end + length as usize) else {
                    whole = false;
                    break;
                };
                *slot = Some(value);
                end += length as usize;
            }
            if !whole {
                break;
            }
            tuple(fields)?;
            at = end;
        }
        self.pending.drain(..at);
        Ok(())
    }

    /// True once the trailer was read.
    pub fn ended(&self) -> bool {
        self.ended && self.pending.is_empty()
    }
}

/// A 16-byte key hash as a number.
pub(super) fn hash_of(bytes: Option<&[u8]>) -> Result<u128, Malformed> {
    let bytes: [u8; 16] = bytes
        .and_then(|b| b.try_into().ok())
        .ok_or(Malformed("a key hash is not 16 bytes"))?;
    Ok(u128::from_be_bytes(bytes))
}

/// The last change of a key in the journal, its bytes borrowed from the server's data or
/// owned once read back from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Change<B = Vec<u8>> {
    hash: u128,
    key: B,
    /// The fingerprint and identity put; `None` for a remove.
    put: Option<(i64, B)>,
}

impl<'a> Change<&'a [u8]> {
    /// A change from the journal's fields (key_hash, key, fingerprint, identity, removed).
    fn of(fields: [Option<&'a [u8]>; 5]) -> Result<Change<&'a [u8]>, Malformed> {
        let [hash, key, fingerprint, identity, removed] = fields;
        let hash = hash_of(hash)?;
        let key = key.ok_or(Malformed("a journal row without its key"))?;
        let removed = removed.ok_or(Malformed("a journal row without its removed flag"))? != [0];
        let put = match (removed, fingerprint, identity) {
            (true, _, _) => None,
            (false, Some(fingerprint), Some(identity)) => {
                let fingerprint: [u8; 8] = fingerprint
                    .try_into()
                    .map_err(|_| Malformed("a journal fingerprint is not 8 bytes"))?;
                Some((i64::from_be_bytes(fingerprint), identity))
            }
            (false, _, _) => return Err(Malformed("a journal put without its fingerprint")),
        };
        Ok(Change { hash, key, put })
    }
}

impl<B: AsRef<[u8]>> Change<B> {
    /// Appends the change to a spool file: hash, fingerprint, a flag, then key and identity
    /// each after its length.
    fn spool(&self, out: &mut impl Write) -> Result<(), FoldError> {
        out.write_all(&self.hash.to_be_bytes())?;
        let (fingerprint, identity) = match &self.put {
            Some((fingerprint, identity)) => (*fingerprint, Some(identity.as_ref())),
            None => (0, None),
        };
        out.write_all(&fingerprint.to_be_bytes())?;
        out.write_all(&[u8::from(identity.is_some())])?;
        for text in [Some(self.key.as_ref()), identity].into_iter().flatten() {
            out.write_all(&length(text)?)?;
            out.write_all(text)?;
        }
        Ok(())
    }
}

/// True when `hash` lies below `upper` (`None`: no bound).
fn below(hash: u128, upper: Option<u128>) -> bool {
    upper.is_none_or(|u| hash < u)
}

/// The journal's changes spooled to a local file, read back in order with one looked ahead.
struct Changes<R: Read> {
    input: R,
    next: Option<Change>,
}

impl<R: Read> Changes<R> {
    fn new(input: R) -> Result<Changes<R>, FoldError> {
        let mut changes = Changes { input, next: None };
        changes.next = changes.read()?;
        Ok(changes)
    }

    fn read(&mut self) -> Result<Option<Change>, FoldError> {
        let mut hash = [0u8; 16];
        match self.input.read_exact(&mut hash) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut fixed = [0u8; 9];
        self.input.read_exact(&mut fixed)?;
        let mut text = || -> Result<Vec<u8>, FoldError> {
            let mut len = [0u8; 4];
            self.input.read_exact(&mut len)?;
            let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
            self.input.read_exact(&mut bytes)?;
            Ok(bytes)
        };
        let key = text()?;
        let put = if fixed[8] == 1 {
            let mut fingerprint = [0u8; 8];
            fingerprint.copy_from_slice(&fixed[..8]);
            Some((i64::from_be_bytes(fingerprint), text()?))
        } else {
            None
        };
        Ok(Some(Change {
            hash: u128::from_be_bytes(hash),
            key,
            put,
        }))
    }

    /// The next change, if its key hash is below `upper` (`None`: no bound).
    fn next_below(&mut self, upper: Option<u128>) -> Result<Option<Change>, FoldError> {
        if self.next.as_ref().is_none_or(|c| !below(c.hash, upper)) {
            return Ok(None);
        }
        let read = self.read()?;
        Ok(std::mem::replace(&mut self.next, read))
    }

    /// The key hash of the next change, if any.
    fn peek_hash(&self) -> Option<u128> {
        self.next.as_ref().map(|c| c.hash)
    }
}

/// Rewrites the block starting at `first` (holding `data`, covering keys up to `upper`) with
/// the changes that fall in it, into `packer`; does nothing, and returns false, when none do.
fn rewrite<R: Read, W: Write>(
    data: &[u8],
    upper: Option<u128>,
    changes: &mut Changes<R>,
    packer: &mut Packer<W>,
) -> Result<bool, FoldError> {
    if changes.peek_hash().is_none_or(|h| !below(h, upper)) {
        return Ok(false);
    }
    let block = Block::parse(data)?;
    let mut rows = block.rows().peekable();
    let mut change = changes.next_below(upper)?;
    loop {
        match (rows.peek(), &change) {
            (None, None) => break,
            (Some(row), None) => {
                packer.push(row.hash, row.fingerprint, row.key, row.identity)?;
                rows.next();
            }
            (Some(row), Some(c)) if row.hash < c.hash => {
                packer.push(row.hash, row.fingerprint, row.key, row.identity)?;
                rows.next();
            }
            (row, Some(c)) => {
                if row.is_some_and(|r| r.hash == c.hash) {
                    rows.next();
                }
                if let Some((fingerprint, identity)) = &c.put {
                    packer.push(c.hash, *fingerprint, &c.key, identity)?;
                }
                change = changes.next_below(upper)?;
            }
        }
    }
    // The next block's keys start a block of their own.
    packer.flush()?;
    Ok(true)
}

/// The last change of each of the sync's keys in the journal, sorted by key hash, as binary
/// `COPY` of (key_hash, key, fingerprint, identity, removed).
fn changes_statement(journal: &str, sync_id: &str) -> String {
    // COPY takes no parameters: the sync id is quoted as a literal.
    format!(
        "COPY (SELECT key_hash, key, fingerprint, identity, removed FROM ( \
           SELECT DISTINCT ON (key_hash) key_hash, key, fingerprint, identity, removed \
           FROM {journal} WHERE sync_id = '{}' ORDER BY key_hash, seq DESC \
         ) AS latest ORDER BY key_hash) TO STDOUT (FORMAT binary)",
        sync_id.replace('\'', "''")
    )
}

/// Folds the sync's journal into its blocks, on `c`, inside the fold's transaction. The
/// sync holds no rows in `backflow_state`. A first fold (no blocks yet) reads the journal on
/// `reader`, outside the transaction (its rows are committed, and the run's lock keeps them
/// as they are), and sends the blocks as they fill, so nothing waits on local disk.
pub(super) async fn pg_fold(
    c: &mut PgConnection,
    reader: &mut PgConnection,
    blocks: &str,
    journal: &str,
    sync_id: &str,
) -> Result<(), FoldError> {
    let held: bool = sqlx::query_scalar(&format!(
        "SELECT EXISTS (SELECT 1 FROM {blocks} WHERE sync_id = $1)"
    ))
    .bind(sync_id)
    .fetch_one(&mut *c)
    .await?;
    if !held {
        return first_fold(c, reader, blocks, journal, sync_id).await;
    }
    let mut packer = Packer::new(BufWriter::with_capacity(1 << 20, tempfile::tempfile()?), sync_id);
    let mut rewritten: Vec<Vec<u8>> = Vec::new();
    let mut changes = c.copy_out_raw(&changes_statement(journal, sync_id)).await?;
    let mut tuples = CopyTuples::<5>::default();
    // The blocks are read after the changes, on the same connection: the changes wait in
    // a file, and the hashes of a few of them in memory, to look their blocks up.
    let mut spool = BufWriter::with_capacity(1 << 20, tempfile::tempfile()?);
    let (mut count, mut hashes) = (0usize, Vec::new());
    while let Some(bytes) = changes.try_next().await? {
        tuples.feed(&bytes, |fields| {
            let change = Change::of(fields)?;
            count += 1;
            if count <= LOOKUP_MAX {
                hashes.push(change.hash.to_be_bytes().to_vec());
            }
            change.spool(&mut spool)
        })?;
    }
    drop(changes);
    if !tuples.ended() {
        return Err(Malformed("the journal's COPY data ended without its trailer").into());
    }
    let mut spooled = spool.into_inner().map_err(|e| e.into_error())?;
    std::io::Seek::rewind(&mut spooled)?;
    let mut changes = Changes::new(BufReader::with_capacity(1 << 20, spooled))?;
    if count <= LOOKUP_MAX {
        rewrite_looked_up(
            c,
            blocks,
            sync_id,
            &hashes,
            &mut changes,
            &mut packer,
            &mut rewritten,
        )
        .await?;
    } else {
        rewrite_all(c, blocks, sync_id, &mut changes, &mut packer, &mut rewritten).await?;
    }
    if changes.peek_hash().is_some() {
        return Err(Malformed("a change of the journal fell in none of the sync's blocks").into());
    }
    let (packed, written) = packer.finish()?;
    for chunk in rewritten.chunks(DELETE_CHUNK) {
        sqlx::query(&format!(
            "DELETE FROM {blocks} WHERE sync_id = $1 AND first_hash = ANY($2::bytea[])"
        ))
        .bind(sync_id)
        .bind(chunk)
        .execute(&mut *c)
        .await?;
    }
    if written > 0 {
        copy_in(c, blocks, packed).await?;
    }
    tracing::debug!(
        blocks_rewritten = rewritten.len(),
        blocks_written = written,
        "journal folded into the sync's blocks"
    );
    Ok(())
}

/// The first fold of a sync: the journal's puts, read on `reader`, packed and sent into the
/// blocks table on `c` as they come.
async fn first_fold(
    c: &mut PgConnection,
    reader: &mut PgConnection,
    blocks: &str,
    journal: &str,
    sync_id: &str,
) -> Result<(), FoldError> {
    let mut copy = c
        .copy_in_raw(&format!(
            "COPY {blocks} (sync_id, first_hash, row_count, data) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let mut packer = Packer::new(Vec::with_capacity(COPY_SEND_BYTES + (1 << 16)), sync_id);
    packer.output().extend_from_slice(COPY_HEADER);
    let sent = async {
        let mut changes = reader.copy_out_raw(&changes_statement(journal, sync_id)).await?;
        let mut tuples = CopyTuples::<5>::default();
        while let Some(bytes) = changes.try_next().await? {
            tuples.feed(&bytes, |fields| -> Result<(), FoldError> {
                let change = Change::of(fields)?;
                // Nothing is stored: a remove has nothing to remove.
                if let Some((fingerprint, identity)) = change.put {
                    packer.push(change.hash, fingerprint, change.key, identity)?;
                }
                Ok(())
            })?;
            if packer.output().len() >= COPY_SEND_BYTES {
                copy.send(packer.output().as_slice()).await?;
                packer.output().clear();
            }
        }
        if !tuples.ended() {
            return Err(Malformed("the journal's COPY data ended without its trailer").into());
        }
        let (mut rest, written) = packer.finish()?;
        rest.extend_from_slice(&(-1i16).to_be_bytes());
        copy.send(rest).await?;
        Ok::<_, FoldError>(written)
    }
    .await;
    match sent {
        Ok(written) => {
            copy.finish().await?;
            tracing::debug!(
                blocks_written = written,
                "journal folded into the sync's first blocks"
            );
            Ok(())
        }
        Err(e) => {
            // Ends the COPY so that the transaction can roll back; the error to report is the
            // one that stopped the fold.
            let _ = copy.abort(e.to_string()).await;
            Err(e)
        }
    }
}

/// Rewrites the blocks the changes fall in, reading every block of the sync in order (a
/// block's keys end where the next one's begin).
async fn rewrite_all<R: Read, W: Write>(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    changes: &mut Changes<R>,
    packer: &mut Packer<W>,
    rewritten: &mut Vec<Vec<u8>>,
) -> Result<(), FoldError> {
    let statement = format!(
        "COPY (SELECT first_hash, data FROM {blocks} WHERE sync_id = '{}' ORDER BY first_hash) \
         TO STDOUT (FORMAT binary)",
        sync_id.replace('\'', "''")
    );
    let mut stored = c.copy_out_raw(&statement).await?;
    let mut tuples = CopyTuples::<2>::default();
    // A block is rewritten once the next one's first hash, where its keys end, is known.
    let mut previous: Option<(Vec<u8>, Vec<u8>)> = None;
    while let Some(bytes) = stored.try_next().await? {
        tuples.feed(&bytes, |[first, data]| -> Result<(), FoldError> {
            let first = first.ok_or(Malformed("a block without its first hash"))?;
            let data = data.ok_or(Malformed("a block without its data"))?;
            if let Some((held_first, held_data)) = previous.take()
                && rewrite(&held_data, Some(hash_of(Some(first))?), changes, packer)?
            {
                rewritten.push(held_first);
            }
            previous = Some((first.to_vec(), data.to_vec()));
            Ok(())
        })?;
    }
    drop(stored);
    if !tuples.ended() {
        return Err(Malformed("the blocks' COPY data ended without its trailer").into());
    }
    if let Some((held_first, held_data)) = previous.take()
        && rewrite(&held_data, None, changes, packer)?
    {
        rewritten.push(held_first);
    }
    Ok(())
}

/// Rewrites the blocks the changes (of key hashes `hashes`) fall in, looked up by key: the
/// greatest `first_hash` at or below each hash (the first block for a hash below all), each
/// with the next block's `first_hash`, where its keys end.
async fn rewrite_looked_up<R: Read, W: Write>(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    hashes: &[Vec<u8>],
    changes: &mut Changes<R>,
    packer: &mut Packer<W>,
    rewritten: &mut Vec<Vec<u8>>,
) -> Result<(), FoldError> {
    let sql = format!(
        "SELECT b.first_hash, b.data, \
           (SELECT n.first_hash FROM {blocks} n WHERE n.sync_id = $1 AND n.first_hash > b.first_hash \
            ORDER BY n.first_hash LIMIT 1) \
         FROM {blocks} b WHERE b.sync_id = $1 AND b.first_hash IN ( \
           SELECT COALESCE( \
             (SELECT first_hash FROM {blocks} WHERE sync_id = $1 AND first_hash <= h \
              ORDER BY first_hash DESC LIMIT 1), \
             (SELECT first_hash FROM {blocks} WHERE sync_id = $1 ORDER BY first_hash LIMIT 1)) \
           FROM unnest($2::bytea[]) AS wanted(h)) \
         ORDER BY b.first_hash"
    );
    let mut touched = sqlx::query_as::<_, (Vec<u8>, Vec<u8>, Option<Vec<u8>>)>(&sql)
        .bind(sync_id)
        .bind(hashes)
        .fetch(&mut *c);
    while let Some((first, data, next)) = touched.try_next().await? {
        let upper = next.map(|n| hash_of(Some(&n))).transpose()?;
        if rewrite(&data, upper, changes, packer)? {
            rewritten.push(first);
        }
    }
    Ok(())
}

/// Sends the packed blocks of `packed` (binary `COPY` tuples) into the blocks table.
async fn copy_in(
    c: &mut PgConnection,
    blocks: &str,
    packed: BufWriter<std::fs::File>,
) -> Result<(), FoldError> {
    let mut file = packed.into_inner().map_err(|e| e.into_error())?;
    std::io::Seek::rewind(&mut file)?;
    let mut copy = c
        .copy_in_raw(&format!(
            "COPY {blocks} (sync_id, first_hash, row_count, data) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    let mut buffer = Vec::with_capacity(COPY_SEND_BYTES);
    buffer.extend_from_slice(COPY_HEADER);
    loop {
        let start = buffer.len();
        buffer.resize(COPY_SEND_BYTES, 0);
        let read = match file.read(&mut buffer[start..]) {
            Ok(read) => read,
            Err(e) => {
                copy.abort(e.to_string()).await?;
                return Err(e.into());
            }
        };
        buffer.truncate(start + read);
        if read == 0 {
            break;
        }
        copy.send(buffer.as_slice()).await?;
        buffer.clear();
    }
    buffer.extend_from_slice(&(-1i16).to_be_bytes());
    copy.send(buffer).await?;
    copy.finish().await?;
    Ok(())
}

impl WarehouseStore {
    /// `backflow_state_blocks`, quoted, when it is there (PostgreSQL only).
    pub(super) fn blocks_table(&self) -> Option<String> {
        (self.blocks == Some(true)).then(|| self.table(TABLE))
    }

    /// Whether the blocks table is there, creating it on PostgreSQL when the journal is in
    /// use and the state user may (without it, states are folded into rows as before).
    pub(super) async fn prepare_blocks(&mut self) -> Result<bool, StateError> {
        let schema = self.config.schema.clone();
        let Some(conn @ Conn::Pg(_)) = self.conn.as_mut() else {
            return Ok(false);
        };
        let found = table_exists(conn, &schema, TABLE).await;
        if found.map_err(|e| self.sql_error("look for the table backflow_state_blocks", e))? {
            return Ok(true);
        }
        if self.probe || self.journal != Some(true) {
            return Ok(false);
        }
        let ddl = pg_ddl(&quote(true, &schema));
        let Some(Conn::Pg(c)) = self.conn.as_mut() else {
            return Ok(false);
        };
        let created = async {
            let mut tx = c.begin().await?;
            tx.execute(format!("SELECT pg_advisory_xact_lock({PG_DDL_LOCK})").as_str())
                .await?;
            tx.execute(ddl.as_str()).await?;
            tx.commit().await
        }
        .await;
        match created {
            Ok(()) => Ok(true),
            Err(e) if is_denied(&e) => {
                tracing::info!(
                    schema = %schema,
                    "the state user may not create backflow_state_blocks: states are folded into \
                     backflow_state's rows, which is slower for large states (DDL in docs/state.md)"
                );
                Ok(false)
            }
            Err(e) => Err(self.sql_error("create the table backflow_state_blocks", e)),
        }
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
        let held = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {blocks} WHERE sync_id = $1)"
        ))
        .bind(&sync_id)
        .fetch_one(c)
        .await;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A row as the tests write it: hash, fingerprint, key, identity.
    type Row = (u128, i64, Vec<u8>, Vec<u8>);
    /// Blocks written, each as its first hash and rows.
    type Written = Vec<(u128, Vec<Row>)>;

    fn row(n: u128) -> Row {
        (
            n << 64,
            n as i64,
            format!("k{n}").into_bytes(),
            format!("{{\"n\":{n}}}").into_bytes(),
        )
    }

    /// The blocks a packer wrote, each as its first hash and rows.
    fn blocks_of(copy: &[u8]) -> Written {
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

    fn pack(rows: &[Row]) -> Vec<u8> {
        let mut packer = Packer::new(Vec::new(), "ns/s");
        for (h, f, k, i) in rows {
            packer.push(*h, *f, k, i).unwrap();
        }
        packer.finish().unwrap().0
    }

    fn spooled(changes: &[Change]) -> Changes<std::io::Cursor<Vec<u8>>> {
        let mut out = Vec::new();
        for c in changes {
            c.spool(&mut out).unwrap();
        }
        Changes::new(std::io::Cursor::new(out)).unwrap()
    }

    fn put(n: u128, fingerprint: i64) -> Change {
        let (hash, _, key, identity) = row(n);
        Change {
            hash,
            key,
            put: Some((fingerprint, identity)),
        }
    }

    fn remove(n: u128) -> Change {
        Change {
            hash: n << 64,
            key: format!("k{n}").into_bytes(),
            put: None,
        }
    }

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

    #[test]
    fn changes_spool_and_read_back_in_order() {
        let list = vec![put(1, 5), remove(2), put(3, -7)];
        let mut changes = spooled(&list);
        assert_eq!(changes.next_below(Some(2 << 64)).unwrap(), Some(list[0].clone()));
        assert_eq!(changes.next_below(Some(2 << 64)).unwrap(), None);
        assert_eq!(changes.next_below(None).unwrap(), Some(list[1].clone()));
        assert_eq!(changes.next_below(None).unwrap(), Some(list[2].clone()));
        assert_eq!(changes.next_below(None).unwrap(), None);
    }

    /// Rewrites `stored` (rows 0, 10, 20, … packed in blocks) with `changes`, the way the fold
    /// reads them: each block with the next one's first hash as its end.
    fn fold(stored: &[Row], changes: &[Change]) -> (Vec<u128>, Written) {
        let blocks = blocks_of(&pack(stored));
        let mut changes = spooled(changes);
        let mut packer = Packer::new(Vec::new(), "ns/s");
        let mut rewritten = Vec::new();
        for (i, (first, rows)) in blocks.iter().enumerate() {
            let upper = blocks.get(i + 1).map(|b| b.0);
            if rewrite(&pack_one(rows), upper, &mut changes, &mut packer).unwrap() {
                rewritten.push(*first);
            }
        }
        (rewritten, blocks_of(&packer.finish().unwrap().0))
    }

    /// One block's data.
    fn pack_one(rows: &[Row]) -> Vec<u8> {
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

    #[test]
    fn a_fold_rewrites_only_the_blocks_its_changes_fall_in() {
        // Blocks start at 0, 320 and 640 (rows every 10).
        let stored: Vec<_> = (0..96).map(|n| row(n * 10)).collect();
        // Nothing in the middle block changes.
        let (rewritten, written) = fold(&stored, &[put(5, 1), remove(10), put(20, 99), put(955, 2)]);
        assert_eq!(rewritten, [0, 640 << 64]);
        let firsts: Vec<u128> = written.iter().map(|b| b.0).collect();
        // The first block keeps 32 rows (one removed, one added) and ends where the second
        // begins; the last gains a row and splits.
        assert_eq!(written.iter().map(|b| b.1.len()).collect::<Vec<_>>(), [32, 32, 1]);
        assert_eq!(firsts, [0, 640 << 64, 955 << 64]);
        let first: Vec<_> = written[0].1.iter().map(|r| (r.0 >> 64, r.1)).collect();
        assert_eq!(&first[..4], [(0, 0), (5, 1), (20, 99), (30, 30)]);
        assert!(written[0].1.iter().all(|r| r.0 < 320 << 64));
    }

    #[test]
    fn keys_below_every_block_join_the_first_and_an_emptied_block_goes() {
        let stored: Vec<_> = (1..=40).map(|n| row(n * 10)).collect();
        let mut changes = vec![put(1, 1)];
        // Remove the whole second block (rows 330..=400).
        changes.extend((33..=40).map(|n| remove(n * 10)));
        let (rewritten, written) = fold(&stored, &changes);
        assert_eq!(rewritten, [10 << 64, 330 << 64]);
        assert_eq!(written.len(), 2);
        assert_eq!(written[0].0, 1 << 64);
        assert_eq!(written[0].1.len() + written[1].1.len(), 33);
        assert!(written.iter().flat_map(|b| &b.1).all(|r| r.0 < 330 << 64));
    }

    #[test]
    fn many_new_keys_in_one_block_split_it_in_order() {
        let stored: Vec<_> = vec![row(0), row(1000)];
        let changes: Vec<_> = (1..100).map(|n| put(n, n as i64)).collect();
        let (rewritten, written) = fold(&stored, &changes);
        assert_eq!(rewritten, [0]);
        assert_eq!(
            written.iter().map(|b| b.1.len()).collect::<Vec<_>>(),
            [32, 32, 32, 5]
        );
        let hashes: Vec<u128> = written.iter().flat_map(|b| &b.1).map(|r| r.0 >> 64).collect();
        let mut expected: Vec<u128> = (0..100).collect();
        expected.push(1000);
        assert_eq!(hashes, expected);
    }
}
