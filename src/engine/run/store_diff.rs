//! Planning with the diff left to the store (every store offers one): every mapped row's key
//! hash and fingerprint are handed to the store, which returns only the added, changed,
//! removed and duplicated keys, and the row is spilled to local disk until the diff says
//! whether to send it. Memory holds those keys, never the whole state. Once the store offers
//! some of its stored pairs (`StoreDiff::stored_pairs`, read while the model is), a row among
//! them is known unchanged and is not spilled.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use super::deletes::Deletes;
use super::rows::{MappedRows, NextRow, report_duplicates};
use super::{Collector, Decider, Planned, REJECTED_SAMPLES, RunError};
use crate::api::SyncMode;
use crate::destination::PlannedSends;
use crate::engine::mapping::Mapper;
use crate::engine::plan::{Change, Decision, PlanCounts, PlanOutcome, decide, row_digest};
use crate::engine::progress::Phase;
use crate::engine::run::{PlanSample, RunOptions};
use crate::engine::spill::{RowJson, SpillWriter};
use crate::model::record::Operation;
use crate::source::RowStream;
use crate::state::hash_buckets::ChangedKeys;
use crate::state::stored_pairs::StoredPairs;
use crate::state::{StateStore, stored_key_hash};

/// The fingerprint staged for a rejected row's key: whatever the store compares it with, the
/// key is dropped from the diff's changes afterwards.
const REJECTED_FINGERPRINT: u64 = 0;

/// Key hashes and fingerprints handed to the store per call.
const STAGE_CHUNK: usize = 10_000;

/// Streams the model, hands key hashes and fingerprints to the store, and asks it for the diff.
pub(super) async fn plan(
    rows: &mut RowStream,
    mapper: Arc<Mapper>,
    store: &mut dyn StateStore,
    scope: &str,
    mode: SyncMode,
    options: &RunOptions,
    c: &mut Collector,
) -> Result<Planned, RunError> {
    let mut spill = SpillWriter::new().map_err(RunError::spill)?;
    let mut index = RowIndex::new().map_err(RunError::spill)?;
    let mut rows = MappedRows::new(rows, mapper);
    let mut staged: Vec<(u128, u64)> = Vec::with_capacity(STAGE_CHUNK);
    let (mut mapped_rows, mut rejected_rows) = (0u64, 0u64);
    let mut digest = 0u64;
    let mut rejected_keys = HashMap::new();
    // Stored pairs, once the store has read them: a row among them is unchanged, so it is
    // not spilled. A full resync sends every row, so it spills them all.
    let mut stored_pairs = take_stored_pairs(store, options, &rejected_keys);
    let mut unspilled_rows = 0u64;
    // Keys with a rejected row after a row left unspilled: no spilled row names them among
    // the duplicated keys, so they are named from here.
    let mut unspilled_duplicates = BTreeSet::new();
    loop {
        let mapped = match rows.next(store, options, c).await? {
            NextRow::End => break,
            NextRow::Rejected(key) => {
                rejected_rows += 1;
                options.progress.row_rejected();
                // Staged so the store does not call its record removed (mirror would delete
                // it); taken out of the diff's changes below, so it is never sent either.
                if let Some(key) = key {
                    let hash = stored_key_hash(&key);
                    if stored_pairs.as_mut().is_some_and(|p| p.claim(hash))
                        && (c.log_rejections || unspilled_duplicates.len() < REJECTED_SAMPLES)
                    {
                        unspilled_duplicates.insert(key.clone());
                    }
                    *rejected_keys.entry(hash).or_insert(0u64) += 1;
                    staged.push((hash, REJECTED_FINGERPRINT));
                }
                continue;
            }
            NextRow::Mapped(mapped) => mapped,
        };
        let fp = mapped.fingerprint;
        let hash = mapped.key_hash;
        digest = digest.wrapping_add(row_digest(mapped.key, fp));
        if stored_pairs.as_mut().is_some_and(|p| p.take_unchanged(hash, fp)) {
            unspilled_rows += 1;
        } else {
            // The operation is decided after the diff; the spill keeps the row until then.
            let offset = spill
                .push(
                    Operation::Upsert,
                    mapped.key,
                    fp,
                    false,
                    RowJson {
                        identity: mapped.identity,
                        fields: mapped.fields,
                        json_nulls: &mapped.json_nulls,
                    },
                )
                .map_err(RunError::spill)?;
            index.push(hash, offset).map_err(RunError::spill)?;
        }
        staged.push((hash, fp));
        mapped_rows += 1;
        if staged.len() >= STAGE_CHUNK {
            stage(store, &staged).await?;
            staged.clear();
            if stored_pairs.is_none() {
                stored_pairs = take_stored_pairs(store, options, &rejected_keys);
                if let Some(pairs) = &stored_pairs {
                    tracing::debug!(
                        pairs = pairs.len(),
                        rows = mapped_rows + rejected_rows,
                        "stored pairs arrived: the rows among them are not spilled"
                    );
                }
            }
        }
    }
    drop(stored_pairs);
    options.progress.set_phase(Phase::Planning);
    stage(store, &staged).await?;
    drop(staged);
    tracing::info!(
        rows = mapped_rows + rejected_rows,
        unspilled_rows,
        "model read; comparing with the stored fingerprints"
    );
    let mut diff = match store.store_diff() {
        Some(p) => p.diff(scope, options.full_resync).await?,
        None => {
            return Err(RunError::Invalid(
                "the state store stopped offering its diff".to_owned(),
            ));
        }
    };

    if !rejected_keys.is_empty() {
        Arc::make_mut(&mut diff.changed).remove_where(|hash| rejected_keys.contains_key(&hash));
    }
    // Counts, from the diff alone. A duplicated key's staged rows include its rejected
    // ones, which are counted as rejected already.
    let duplicate_rows: u64 = diff
        .duplicates
        .iter()
        .map(|(hash, n)| n.saturating_sub(rejected_keys.get(hash).copied().unwrap_or(0)))
        .sum();
    let unique_rows = mapped_rows - duplicate_rows;
    let added_rows = diff.changed.added_len() as u64;
    let (new_rows, changed_rows) = if diff.all_added {
        (unique_rows, 0)
    } else if diff.full_resync {
        (added_rows, unique_rows - added_rows)
    } else {
        (added_rows, diff.changed.len() as u64 - added_rows)
    };
    let mut counts = PlanCounts {
        rows_in_model: mapped_rows + rejected_rows,
        unchanged: mapped_rows - duplicate_rows - new_rows - changed_rows,
        removed: diff.removed_rows,
        rejected: rejected_rows + duplicate_rows,
        ..PlanCounts::default()
    };
    let mut sends = PlannedSends::default();
    for (change, rows) in [(Change::Added, new_rows), (Change::Changed, changed_rows)] {
        match decide(change, mode) {
            Decision::Send(operation, change) => {
                sends.add(operation, rows);
                if change == Change::Added {
                    counts.added += rows;
                } else {
                    counts.changed += rows;
                }
            }
            _ => counts.skipped += rows,
        }
    }
    let plan = PlanOutcome {
        counts,
        removed: Vec::new(),
        duplicates: diff
            .duplicates
            .iter()
            .map(|(h, rows)| (crate::engine::plan::key_hash_from_stored(*h), *rows))
            .collect(),
        result_fingerprint: format!("{digest:016x}"),
    };
    // The diff lists removed rows in key order; nothing asks the diff for them again.
    let deletes = Deletes::Listed(std::mem::take(&mut diff.removed));
    let decider = Decider::Diff { diff, mode };
    let mut spilled = spill.into_reader().map_err(RunError::spill)?;
    if !plan.duplicates.is_empty() {
        report_duplicates(&mut spilled, &plan, unspilled_duplicates, c).map_err(RunError::spill)?;
    }
    if let Decider::Diff { diff, .. } = &decider
        && !diff.all_added
        && !diff.full_resync
    {
        // Only the rows the diff named are sent, or sampled by a dry run: read those, not the
        // whole spill (the rows a model changed often come late in it: the database writes an
        // updated row's new version where the table has room, often at its end).
        let positions = index
            .positions_of(Arc::clone(&diff.changed))
            .map_err(RunError::spill)?;
        spilled.only_rows_at(Box::new(positions));
    }
    if options.dry_run {
        preview(&mut spilled, &plan, &decider, options, c).map_err(RunError::spill)?;
    }
    Ok(Planned {
        // Stored keys the model returned, plus those it did not; a rejected row's stored key
        // is not counted, which errs towards holding deletes back.
        stored_records: unique_rows
            .saturating_sub(new_rows)
            .saturating_add(counts.removed),
        deletes,
        plan,
        spilled,
        decider,
        sends,
    })
}

/// Where each spilled row is, by key hash: 12 bytes a row in a temporary file (the top 32
/// bits of the key hash and the row's spill position), read once after the diff to find the
/// rows to send without reading every row of the spill back. A row whose 32 bits match a
/// changed key by chance is read and then dropped: the delivery asks the diff about each
/// row's whole key.
struct RowIndex {
    out: std::io::BufWriter<std::fs::File>,
}

/// Bytes per entry of the row index.
const INDEX_ENTRY: usize = 12;

/// Bits of the row index's 32-bit prefixes that address a [`PrefixFilter`]: 2^24 bits, 2 MiB.
const FILTER_BITS: u32 = 24;

/// A bitmap of the top [`FILTER_BITS`] bits of some 32-bit prefixes: a prefix whose bit is
/// clear is none of them.
struct PrefixFilter(Vec<u64>);

impl PrefixFilter {
    fn of(keys: impl Iterator<Item = u128>) -> PrefixFilter {
        let mut filter = PrefixFilter(vec![0; 1 << (FILTER_BITS - 6)]);
        for hash in keys {
            let (word, bit) = PrefixFilter::at(prefix_of(hash));
            filter.0[word] |= bit;
        }
        filter
    }

    fn may_hold(&self, prefix: u32) -> bool {
        let (word, bit) = PrefixFilter::at(prefix);
        self.0[word] & bit != 0
    }

    /// The word and bit of `prefix`.
    fn at(prefix: u32) -> (usize, u64) {
        let n = prefix >> (32 - FILTER_BITS);
        ((n >> 6) as usize, 1 << (n & 63))
    }
}

impl RowIndex {
    fn new() -> std::io::Result<RowIndex> {
        Ok(RowIndex {
            out: std::io::BufWriter::with_capacity(1 << 16, tempfile::tempfile()?),
        })
    }

    fn push(&mut self, hash: u128, position: u64) -> std::io::Result<()> {
        use std::io::Write as _;
        let mut entry = [0u8; INDEX_ENTRY];
        entry[..4].copy_from_slice(&prefix_of(hash).to_le_bytes());
        entry[4..].copy_from_slice(&position.to_le_bytes());
        self.out.write_all(&entry)
    }

    /// The positions of the rows whose key hash may be in `wanted`, in spill order, read from
    /// the index as they are asked for.
    fn positions_of(self, wanted: Arc<ChangedKeys>) -> std::io::Result<RowPositions> {
        use std::io::Seek as _;
        let filter = PrefixFilter::of(wanted.keys());
        let mut file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        Ok(RowPositions {
            input: std::io::BufReader::with_capacity(1 << 20, file),
            filter,
            wanted,
        })
    }
}

/// The positions of the rows whose key hash may be among the changed keys, read from the row
/// index as the rows are: a bitmap of the changed keys' top 24 bits turns most rows away; a
/// row that passes it is looked up among them by its 32-bit prefix. Memory: the bitmap
/// (2 MiB) and the read buffer, whatever the number of rows or changes.
struct RowPositions {
    input: std::io::BufReader<std::fs::File>,
    filter: PrefixFilter,
    wanted: Arc<ChangedKeys>,
}

impl Iterator for RowPositions {
    type Item = std::io::Result<u64>;

    fn next(&mut self) -> Option<std::io::Result<u64>> {
        use std::io::Read as _;
        let mut entry = [0u8; INDEX_ENTRY];
        loop {
            match self.input.read_exact(&mut entry) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
                Err(e) => return Some(Err(e)),
            }
            let prefix = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
            if self.filter.may_hold(prefix) && self.wanted.has_prefix(prefix) {
                let mut position = [0u8; 8];
                position.copy_from_slice(&entry[4..]);
                return Some(Ok(u64::from_le_bytes(position)));
            }
        }
    }
}

/// The top 32 bits of a key hash: what the row index keeps of it.
fn prefix_of(hash: u128) -> u32 {
    (hash >> 96) as u32
}

/// The store's stored pairs if they arrived and hold any, unless the run resends every row.
/// The keys with a rejected row so far are claimed: another row of them is a duplicate, so it
/// is spilled, to be named.
fn take_stored_pairs(
    store: &mut dyn StateStore,
    options: &RunOptions,
    rejected_keys: &HashMap<u128, u64>,
) -> Option<StoredPairs> {
    if options.full_resync {
        return None;
    }
    let mut pairs = store
        .store_diff()
        .and_then(|d| d.stored_pairs())
        .filter(|p| !p.is_empty())?;
    for &hash in rejected_keys.keys() {
        pairs.claim(hash);
    }
    Some(pairs)
}

async fn stage(store: &mut dyn StateStore, rows: &[(u128, u64)]) -> Result<(), RunError> {
    match store.store_diff() {
        Some(p) => Ok(p.stage(rows).await?),
        None => Err(RunError::Invalid(
            "the state store stopped offering its diff".to_owned(),
        )),
    }
}

/// A dry run's samples: the first rows of each operation, read from the spill until each
/// operation has its share. A dry run ends after its plan: the spill is not read again.
fn preview(
    spilled: &mut crate::engine::spill::SpillReader,
    plan: &PlanOutcome,
    decider: &Decider,
    options: &RunOptions,
    c: &mut Collector,
) -> std::io::Result<()> {
    // A sync's mode sends rows with one operation, so the samples are complete once
    // `sample_size` rows were found.
    let mut found = 0;
    while found < options.sample_size {
        let Some(row) = decider.next_row(plan, spilled)? else {
            break;
        };
        found += 1;
        let mut record = Vec::new();
        crate::model::value::write_document(&row.fields, &mut record);
        c.report.plan_samples.push(PlanSample {
            operation: row.operation.as_str().to_owned(),
            key: row.key,
            record: String::from_utf8_lossy(&record).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_row_index_finds_the_changed_rows_in_spill_order() {
        let spread = |n: u128| n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        let mut index = RowIndex::new().unwrap();
        for n in 0..20_000u128 {
            index.push(spread(n), n as u64 * 10).unwrap();
        }
        // Same top 32 bits as row 7's hash, another key: its row is read too and dropped later.
        let twin = spread(7) ^ 1;
        index.push(twin, 999_999).unwrap();
        let wanted = ChangedKeys::from_iter(
            (0..20_000u128)
                .filter(|n| n % 1_000 == 7)
                .map(|n| (spread(n), n % 2_000 == 7))
                .chain([(spread(50_000), true)]),
        );
        let mut expected: Vec<u64> = (0..20_000u64)
            .filter(|n| n % 1_000 == 7)
            .map(|n| n * 10)
            .collect();
        expected.push(999_999);
        let found: Vec<u64> = index
            .positions_of(Arc::new(wanted))
            .unwrap()
            .collect::<std::io::Result<_>>()
            .unwrap();
        assert_eq!(found, expected);
    }

    #[test]
    fn no_changed_key_finds_no_row() {
        let mut index = RowIndex::new().unwrap();
        for n in 0..1_000u128 {
            index.push(n << 100, n as u64).unwrap();
        }
        assert_eq!(index.positions_of(Default::default()).unwrap().count(), 0);
    }
}
