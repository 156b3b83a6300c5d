//! Checkpoints folded into a sync's blocks, inside the fold's transaction, from the last
//! change of each key sorted by key hash (the row journal's, sorted by the server, or the
//! packed checkpoints', merged by `checkpoints`). A first fold sends the packed blocks by
//! binary `COPY` as they fill. A later fold keeps the changes in a local temporary file,
//! reads the blocks they fall in (looked up by key for up to [`LOOKUP_MAX`] changes, else all
//! of the sync's blocks in order), merges them into new blocks kept in another file, deletes
//! the blocks it rewrote and writes the new ones. A failure anywhere rolls all of it back with
//! the checkpoints left whole.

use std::io::{BufReader, BufWriter, Read, Seek, Write};

use futures::TryStreamExt;
use sqlx::postgres::PgConnection;

use super::super::changes::{Change, Changes, SortedChanges, below};
use super::super::copy_tuples::{Malformed, copy_out, hash_of, literal};
use super::super::pg_sync_has_rows;
use super::super::write::copy_binary;
use super::{Block, Packer};

/// The binary `COPY` of blocks into the blocks table `blocks`.
fn copy_blocks(blocks: &str) -> String {
    format!("COPY {blocks} (sync_id, first_hash, row_count, data) FROM STDIN (FORMAT binary)")
}

/// Rewritten blocks deleted per statement.
const DELETE_CHUNK: usize = 10_000;

/// Changes up to which a fold looks their blocks up by key instead of reading all of the
/// sync's blocks (0.95 s at 10,000,000 rows in SQL; 10,000 lookups take about 0.1 s).
const LOOKUP_MAX: usize = 10_000;

/// Why a fold into blocks failed.
#[derive(Debug, thiserror::Error)]
pub(in crate::state::warehouse) enum FoldError {
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

/// A change from the row journal's fields (key_hash, key, fingerprint, identity, removed).
fn journal_change(fields: [Option<&[u8]>; 5]) -> Result<Change<&[u8]>, Malformed> {
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

/// Changes written to a local temporary file, counted, the key hashes of the first
/// [`LOOKUP_MAX`] kept to look their blocks up.
struct Spool {
    out: BufWriter<std::fs::File>,
    count: usize,
    hashes: Vec<Vec<u8>>,
}

impl Spool {
    fn new() -> Result<Spool, FoldError> {
        Ok(Spool {
            out: BufWriter::with_capacity(1 << 20, tempfile::tempfile()?),
            count: 0,
            hashes: Vec::new(),
        })
    }

    fn push<B: AsRef<[u8]>>(&mut self, change: &Change<B>) -> Result<(), FoldError> {
        self.count += 1;
        if self.count <= LOOKUP_MAX {
            self.hashes.push(change.hash.to_be_bytes().to_vec());
        }
        change.write(&mut self.out)
    }

    /// The changes read back from the start.
    fn read_back(self) -> Result<Changes<BufReader<std::fs::File>>, FoldError> {
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        let length = file.stream_position()?;
        file.rewind()?;
        Changes::new(BufReader::with_capacity(1 << 20, file), length)
    }
}

/// Rewrites the block holding `data` (its keys run up to `upper`) with the changes that fall
/// in it, into `packer`; does nothing, and returns false, when none do. The first block also
/// takes the changes below its own first hash: they come first in the stream.
fn rewrite<R: Read>(
    data: &[u8],
    upper: Option<u128>,
    changes: &mut Changes<R>,
    packer: &mut Packer,
    out: &mut impl Write,
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
                packer.push(out, row.hash, row.fingerprint, row.key, row.identity)?;
                rows.next();
            }
            (Some(row), Some(c)) if row.hash < c.hash => {
                packer.push(out, row.hash, row.fingerprint, row.key, row.identity)?;
                rows.next();
            }
            (row, Some(c)) => {
                if row.is_some_and(|r| r.hash == c.hash) {
                    rows.next();
                }
                if let Some((fingerprint, identity)) = &c.put {
                    packer.push(out, c.hash, *fingerprint, &c.key, identity)?;
                }
                change = changes.next_below(upper)?;
            }
        }
    }
    // The next block's keys start a block of their own.
    packer.flush(out)?;
    Ok(true)
}

/// The last change of each of the sync's keys in the journal, sorted by key hash: (key_hash,
/// key, fingerprint, identity, removed).
fn changes_query(journal: &str, sync_id: &str) -> String {
    format!(
        "SELECT key_hash, key, fingerprint, identity, removed FROM ( \
           SELECT DISTINCT ON (key_hash) key_hash, key, fingerprint, identity, removed \
           FROM {journal} WHERE sync_id = {} ORDER BY key_hash, seq DESC \
         ) AS latest ORDER BY key_hash",
        literal(sync_id)
    )
}

/// Folds the sync's rows of the row journal `journal` into its blocks, on `c`, inside the
/// fold's transaction: the last change of each key, sorted by the server, kept in a local
/// file first (the same connection then writes the blocks).
pub(in crate::state::warehouse) async fn pg_fold(
    c: &mut PgConnection,
    blocks: &str,
    journal: &str,
    sync_id: &str,
) -> Result<(), FoldError> {
    let mut spool = Spool::new()?;
    copy_out(c, &changes_query(journal, sync_id), |fields| {
        spool.push(&journal_change(fields)?)
    })
    .await?;
    if pg_sync_has_rows(c, blocks, sync_id).await? {
        later_fold(c, blocks, sync_id, spool).await
    } else {
        first_fold(c, blocks, sync_id, &mut spool.read_back()?).await
    }
}

/// Folds `changes` (one per key, in key-hash order) into the sync's blocks, on `c`, inside the
/// fold's transaction. The sync holds no rows in `backflow_state`. A first fold (no blocks
/// yet) packs the puts and sends the blocks as they fill; a later one keeps the changes in a
/// local file and rewrites the blocks they fall in.
pub(in crate::state::warehouse) async fn fold_sorted<S: SortedChanges + Send>(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    changes: &mut S,
) -> Result<(), FoldError> {
    if !pg_sync_has_rows(c, blocks, sync_id).await? {
        return first_fold(c, blocks, sync_id, changes).await;
    }
    let mut spool = Spool::new()?;
    while let Some(change) = changes.next_change()? {
        spool.push(change)?;
    }
    later_fold(c, blocks, sync_id, spool).await
}

/// A later fold: rewrites the blocks the spooled changes fall in.
async fn later_fold(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    mut spool: Spool,
) -> Result<(), FoldError> {
    let (count, hashes) = (spool.count, std::mem::take(&mut spool.hashes));
    let mut changes = spool.read_back()?;
    let mut packer = Packer::new(sync_id);
    let mut packed = BufWriter::with_capacity(1 << 20, tempfile::tempfile()?);
    let mut rewritten: Vec<u128> = Vec::new();
    let mut out = Rewrite {
        changes: &mut changes,
        packer: &mut packer,
        packed: &mut packed,
        rewritten: &mut rewritten,
    };
    if count <= LOOKUP_MAX {
        rewrite_looked_up(c, blocks, sync_id, &hashes, &mut out).await?;
    } else {
        rewrite_all(c, blocks, sync_id, &mut out).await?;
    }
    if changes.peek_hash().is_some() {
        return Err(Malformed("a change of the journal fell in none of the sync's blocks").into());
    }
    let written = packer.finish(&mut packed)?;
    for chunk in rewritten.chunks(DELETE_CHUNK) {
        let firsts: Vec<Vec<u8>> = chunk.iter().map(|h| h.to_be_bytes().to_vec()).collect();
        sqlx::query(&format!(
            "DELETE FROM {blocks} WHERE sync_id = $1 AND first_hash = ANY($2::bytea[])"
        ))
        .bind(sync_id)
        .bind(&firsts)
        .execute(&mut *c)
        .await?;
    }
    if written > 0 {
        copy_in(c, blocks, packed).await?;
    }
    tracing::debug!(
        changes = count,
        blocks_rewritten = rewritten.len(),
        blocks_written = written,
        "journal folded into the sync's blocks"
    );
    Ok(())
}

/// What a later fold's block rewrites share: the changes, the packer and the file it writes
/// the new blocks to, and the first hashes of the blocks rewritten.
struct Rewrite<'a, R: Read> {
    changes: &'a mut Changes<R>,
    packer: &'a mut Packer,
    packed: &'a mut BufWriter<std::fs::File>,
    rewritten: &'a mut Vec<u128>,
}

impl<R: Read> Rewrite<'_, R> {
    /// Rewrites the block of first hash `first` holding `data` (its keys run up to `upper`)
    /// when changes fall in it.
    fn block(&mut self, first: u128, data: &[u8], upper: Option<u128>) -> Result<(), FoldError> {
        if rewrite(data, upper, self.changes, self.packer, self.packed)? {
            self.rewritten.push(first);
        }
        Ok(())
    }
}

/// The first fold of a sync: the puts of `changes` packed and sent into the blocks table on
/// `c` as they come.
async fn first_fold<S: SortedChanges + Send>(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    changes: &mut S,
) -> Result<(), FoldError> {
    let mut packer = Packer::new(sync_id);
    let mut ended = false;
    copy_binary(
        c,
        &copy_blocks(blocks),
        // One change at a time; the packer writes a block into the data when one fills.
        |data| {
            if ended {
                return None;
            }
            Some(match changes.next_change() {
                // Nothing is stored: a remove has nothing to remove.
                Ok(Some(Change {
                    hash,
                    key,
                    put: Some((fingerprint, identity)),
                })) => packer.push(data, *hash, *fingerprint, key, identity),
                Ok(Some(_)) => Ok(()),
                Ok(None) => {
                    ended = true;
                    packer.finish(data).map(drop)
                }
                Err(e) => Err(e),
            })
        },
    )
    .await?;
    tracing::debug!(
        blocks_written = packer.blocks(),
        "journal folded into the sync's first blocks"
    );
    Ok(())
}

/// Rewrites the blocks the changes fall in, reading every block of the sync in order (a
/// block's keys end where the next one's begin).
async fn rewrite_all<R: Read>(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    out: &mut Rewrite<'_, R>,
) -> Result<(), FoldError> {
    let query = format!(
        "SELECT first_hash, data FROM {blocks} WHERE sync_id = {} ORDER BY first_hash",
        literal(sync_id)
    );
    // A block is rewritten once the next one's first hash, where its keys end, is known: it
    // waits in `held`, a buffer used again for every block.
    let (mut held_first, mut held) = (None, Vec::new());
    copy_out(c, &query, |[first, data]| -> Result<(), FoldError> {
        let first = hash_of(first)?;
        let data = data.ok_or(Malformed("a block without its data"))?;
        if let Some(held_first) = held_first {
            out.block(held_first, &held, Some(first))?;
        }
        held_first = Some(first);
        held.clear();
        held.extend_from_slice(data);
        Ok(())
    })
    .await?;
    if let Some(held_first) = held_first {
        out.block(held_first, &held, None)?;
    }
    Ok(())
}

/// Rewrites the blocks the changes (of key hashes `hashes`) fall in, looked up by key: the
/// greatest `first_hash` at or below each hash (the first block for a hash below all), each
/// with the next block's `first_hash`, where its keys end.
async fn rewrite_looked_up<R: Read>(
    c: &mut PgConnection,
    blocks: &str,
    sync_id: &str,
    hashes: &[Vec<u8>],
    out: &mut Rewrite<'_, R>,
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
        out.block(hash_of(Some(&first))?, &data, upper)?;
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
    file.rewind()?;
    copy_binary(c, &copy_blocks(blocks), |data| {
        match (&mut file).take(1 << 16).read_to_end(data) {
            Ok(0) => None,
            Ok(_) => Some(Ok(())),
            Err(e) => Some(Err(FoldError::from(e))),
        }
    })
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::super::changes::testing::{put, remove, spooled};
    use super::super::testing::*;
    use super::*;

    /// Rewrites `stored` (rows 0, 10, 20, … packed in blocks) with `changes`, the way the fold
    /// reads them: each block with the next one's first hash as its end.
    fn fold(stored: &[Row], changes: &[Change]) -> (Vec<u128>, Written) {
        let blocks = blocks_of(&pack(stored));
        let mut changes = spooled(changes);
        let (mut packer, mut out) = (Packer::new("ns/s"), Vec::new());
        let mut rewritten = Vec::new();
        for (i, (first, rows)) in blocks.iter().enumerate() {
            let upper = blocks.get(i + 1).map(|b| b.0);
            if rewrite(&pack_one(rows), upper, &mut changes, &mut packer, &mut out).unwrap() {
                rewritten.push(*first);
            }
        }
        packer.finish(&mut out).unwrap();
        (rewritten, blocks_of(&out))
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
