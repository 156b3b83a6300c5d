//! Folding the journal into the state file without holding the state in memory.
//!
//! Every entry of the state file, then every change of the journal in order, goes into
//! [`ChangeBuckets`] (256 disk buckets by key hash). Each bucket is then read alone: the last
//! change of each key wins, and the live entries are written sorted by key hash. Memory holds
//! the bucket buffers (8 MiB) and one bucket (1/256 of the rows); the disk holds a temporary
//! copy of the records. The new file is therefore in key-hash order, not in the model's: the
//! store's diff does not care, and an in-memory load indexes it as it is.

use std::io::{BufWriter, Read as _, Seek as _, Write as _};
use std::path::Path;

use super::format::{JournalReader, StateFileReader, StateFileWriter, corrupt, io_error};
use crate::state::change_buckets::ChangeBuckets;
use crate::state::codec::put_entry;
use crate::state::{EntryRef, StateError};

/// Rewrites the state file at `state` as its entries (when they are of `scope`) with the
/// journal's changes (when they are of `scope`) applied, then deletes the journal. Returns
/// the rows of the new state. A crash at any point leaves the old state file or the new one,
/// and the journal until the new one is in place.
pub(super) fn fold(state: &Path, journal: &Path, scope: &str) -> Result<u64, StateError> {
    let temp_error = |e: std::io::Error| StateError::Io {
        location: state.display().to_string(),
        reason: format!("failed to fold checkpoints through a local temporary file: {e}"),
    };
    let mut changes = ChangeBuckets::new().map_err(temp_error)?;
    if let Some(mut reader) = StateFileReader::open(state)?
        && reader.scope() == scope
    {
        let (mut key, mut identity) = (String::new(), String::new());
        while let Some(fingerprint) = reader.next(&mut key, &mut identity)? {
            let entry = EntryRef {
                key: &key,
                fingerprint,
                identity: &identity,
            };
            changes.push_entry(entry).map_err(temp_error)?;
        }
    }
    if let Some(mut checkpoints) = JournalReader::open(journal)?
        && checkpoints.scope() == scope
    {
        let mut payload = Vec::new();
        while checkpoints.next_payload(&mut payload) {
            if !changes.push_payload(&payload).map_err(temp_error)? {
                return Err(corrupt(journal, "undecodable checkpoint"));
            }
        }
    }

    // Live entries, bucket by bucket, into a temporary file: the state file's header needs
    // their count first.
    let mut entries = BufWriter::with_capacity(1 << 20, tempfile::tempfile().map_err(temp_error)?);
    let mut rows = 0u64;
    let mut record = Vec::with_capacity(256);
    for n in 0..=u8::MAX {
        for (_, entry) in changes.bucket(n).map_err(temp_error)?.entries() {
            record.clear();
            put_entry(&mut record, entry);
            entries.write_all(&record).map_err(temp_error)?;
            rows += 1;
        }
    }
    drop(changes);

    let mut entries = entries.into_inner().map_err(|e| temp_error(e.into_error()))?;
    entries.rewind().map_err(temp_error)?;
    let mut out = StateFileWriter::create(state, scope, rows)?;
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = entries.read(&mut block).map_err(temp_error)?;
        if n == 0 {
            break;
        }
        out.write_entries(&block[..n])?;
    }
    out.persist()?;
    // A crash before this removal only folds the journal again, which changes nothing.
    match std::fs::remove_file(journal) {
        Ok(()) => Ok(rows),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(rows),
        Err(e) => Err(io_error(journal, &e)),
    }
}
