//! Folding the journal into the state file without holding the state in memory.
//!
//! Every entry of the state file, then every change of the journal in order, goes to one of
//! 256 disk buckets by the top byte of its key's [`stored_key_hash`]. Each bucket is then read
//! alone: the last change of each key wins, and the live entries are written sorted by key
//! hash. Memory holds the bucket buffers (8 MiB) and one bucket (1/256 of the rows); the disk
//! holds a temporary copy of the records. The new file is therefore in key-hash order, not in
//! the model's: the store's diff does not care, and an in-memory load indexes it as it is.

use std::collections::HashMap;
use std::io::{BufWriter, Read as _, Seek as _, Write as _};
use std::path::Path;

use super::format::{JournalReader, StateFileReader, StateFileWriter, corrupt, io_error};
use crate::state::codec::{ChangeRef, decode_change_ref, encode_change_ref, put_entry};
use crate::state::hash_buckets::{DiskBuckets, bucket_of};
use crate::state::{EntryRef, StateError, stored_key_hash};

/// Bytes each of the 256 buckets buffers before writing.
const CHUNK: usize = 32 * 1024;

/// Rewrites the state file at `state` as its entries (when they are of `scope`) with the
/// journal's changes (when they are of `scope`) applied, then deletes the journal. Returns
/// the rows of the new state. A crash at any point leaves the old state file or the new one,
/// and the journal until the new one is in place.
pub(super) fn fold(state: &Path, journal: &Path, scope: &str) -> Result<u64, StateError> {
    let temp_error = |e: std::io::Error| StateError::Io {
        location: state.display().to_string(),
        reason: format!("failed to fold checkpoints through a local temporary file: {e}"),
    };
    let mut buckets = DiskBuckets::new(CHUNK).map_err(temp_error)?;
    let mut record = Vec::with_capacity(256);
    let mut push = |change: ChangeRef<'_>, record: &mut Vec<u8>| {
        let key = match change {
            ChangeRef::Put { key, .. } | ChangeRef::Remove { key } => key,
        };
        let hash = stored_key_hash(key);
        record.clear();
        record.extend_from_slice(&hash.to_le_bytes());
        encode_change_ref(change, record);
        buckets.push(bucket_of(hash), record).map_err(temp_error)
    };
    if let Some(mut reader) = StateFileReader::open(state)?
        && reader.scope() == scope
    {
        let (mut key, mut identity) = (String::new(), String::new());
        while let Some(fingerprint) = reader.next(&mut key, &mut identity)? {
            let put = ChangeRef::Put {
                key: &key,
                fingerprint,
                identity: &identity,
            };
            push(put, &mut record)?;
        }
    }
    if let Some(mut checkpoints) = JournalReader::open(journal)?
        && checkpoints.scope() == scope
    {
        let mut payload = Vec::new();
        while checkpoints.next_payload(&mut payload) {
            let mut rest = &payload[..];
            while !rest.is_empty() {
                let change =
                    decode_change_ref(&mut rest).ok_or_else(|| corrupt(journal, "undecodable checkpoint"))?;
                push(change, &mut record)?;
            }
        }
    }

    // Live entries, bucket by bucket, into a temporary file: the state file's header needs
    // their count first.
    let mut entries = BufWriter::with_capacity(1 << 20, tempfile::tempfile().map_err(temp_error)?);
    let mut rows = 0u64;
    let mut bytes = Vec::new();
    for bucket in 0..=u8::MAX {
        bytes.clear();
        buckets
            .read_bucket(usize::from(bucket), &mut bytes)
            .map_err(temp_error)?;
        let mut last: HashMap<u128, ChangeRef<'_>> = HashMap::new();
        let mut rest = &bytes[..];
        while let Some((hash, tail)) = rest.split_first_chunk::<16>() {
            rest = tail;
            let change = decode_change_ref(&mut rest)
                .ok_or_else(|| temp_error(std::io::ErrorKind::InvalidData.into()))?;
            last.insert(u128::from_le_bytes(*hash), change);
        }
        let mut live: Vec<(u128, EntryRef<'_>)> = last
            .into_iter()
            .filter_map(|(hash, change)| match change {
                ChangeRef::Put {
                    key,
                    fingerprint,
                    identity,
                } => Some((
                    hash,
                    EntryRef {
                        key,
                        fingerprint,
                        identity,
                    },
                )),
                ChangeRef::Remove { .. } => None,
            })
            .collect();
        live.sort_unstable_by_key(|(hash, _)| *hash);
        for (_, entry) in live {
            record.clear();
            put_entry(&mut record, entry);
            entries.write_all(&record).map_err(temp_error)?;
            rows += 1;
        }
    }
    drop(buckets);

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
