//! Folding the journal into the state file without holding the state in memory.
//!
//! The state file is written in key-hash order, so a journal that is small next to it (a run
//! that changed a few rows) is folded by one merge ([`LiveEntries`]): its changes, the last of
//! each key, are sorted in memory and merged into the entries as the state file is read in
//! order. A large
//! journal, a state file not in key-hash order or one of another scope go through
//! [`ChangeBuckets`] (256 disk buckets by key hash) instead: every entry of the state file,
//! then every change of the journal in order, is bucketed, and each bucket is read alone: the
//! last change of each key wins, and the live entries are written sorted by key hash. Memory
//! holds the bucket buffers (8 MiB) and one bucket (1/256 of the rows); the disk holds a
//! temporary copy of the records. Either way the new file is in key-hash order, not in the
//! model's: the store's diff reads it in that order, and an in-memory load indexes it as it is.

use std::fs::File;
use std::io::{BufWriter, Read as _, Seek as _, Write as _};
use std::path::Path;

use super::format::{JournalReader, StateFileReader, StateFileWriter, corrupt, io_error};
use super::live::{Live, LiveEntries, read_journal};
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
    let (entries, rows) = match merge_in_order(state, journal, scope, &temp_error)? {
        Some(merged) => merged,
        None => fold_through_buckets(state, journal, scope, &temp_error)?,
    };
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

/// The live entries, in key-hash order, written to a temporary file, and how many there are
/// (the state file's header needs the count before them).
type Entries = (BufWriter<File>, u64);

/// Entries being written to a temporary file.
struct EntriesOut {
    file: BufWriter<File>,
    rows: u64,
    record: Vec<u8>,
}

impl EntriesOut {
    fn new() -> std::io::Result<EntriesOut> {
        Ok(EntriesOut {
            file: BufWriter::with_capacity(1 << 20, tempfile::tempfile()?),
            rows: 0,
            record: Vec::with_capacity(256),
        })
    }

    fn write(&mut self, e: EntryRef<'_>) -> std::io::Result<()> {
        self.record.clear();
        put_entry(&mut self.record, e);
        self.rows += 1;
        self.file.write_all(&self.record)
    }

    fn done(self) -> Entries {
        (self.file, self.rows)
    }
}

/// Folds by one merge of the journal's last changes into the state file read in order.
/// `None` (nothing written) when the journal is large, the state file is missing or of
/// another scope, or its entries are not in key-hash order.
fn merge_in_order(
    state: &Path,
    journal: &Path,
    scope: &str,
    temp_error: &impl Fn(std::io::Error) -> StateError,
) -> Result<Option<Entries>, StateError> {
    match StateFileReader::open(state)? {
        Some(reader) if reader.scope() == scope => {}
        _ => return Ok(None),
    }
    let Some(changes) = read_journal(journal, scope)? else {
        return Ok(None);
    };
    let mut live = LiveEntries::open(state, scope, changes, true)?;
    let mut out = EntriesOut::new().map_err(temp_error)?;
    loop {
        match live.next()? {
            Live::Entry(_, entry) => out.write(entry).map_err(temp_error)?,
            Live::End => return Ok(Some(out.done())),
            Live::OutOfOrder => return Ok(None),
        }
    }
}

/// Folds through [`ChangeBuckets`]: any journal, any state file.
fn fold_through_buckets(
    state: &Path,
    journal: &Path,
    scope: &str,
    temp_error: &impl Fn(std::io::Error) -> StateError,
) -> Result<Entries, StateError> {
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
    let mut out = EntriesOut::new().map_err(temp_error)?;
    for n in 0..=u8::MAX {
        for entry in changes.bucket(n).map_err(temp_error)?.entries() {
            let (_, entry) = entry.map_err(temp_error)?;
            out.write(entry).map_err(temp_error)?;
        }
    }
    Ok(out.done())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::file::FileStore;
    use crate::state::file::tests::put;
    use crate::state::{StateChange, StateStore, stored_key_hash};

    fn remove(key: &str) -> StateChange {
        StateChange::Remove { key: key.into() }
    }

    fn temp_error(e: std::io::Error) -> StateError {
        StateError::Io {
            location: "test".into(),
            reason: e.to_string(),
        }
    }

    fn bytes_of((file, rows): Entries) -> (Vec<u8>, u64) {
        let mut file = file.into_inner().unwrap();
        file.rewind().unwrap();
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).unwrap();
        (bytes, rows)
    }

    /// Key → fingerprint of the state file.
    fn state_of(path: &Path) -> BTreeMap<String, u64> {
        let mut reader = StateFileReader::open(path).unwrap().unwrap();
        let (mut key, mut identity) = (String::new(), String::new());
        let mut out = BTreeMap::new();
        while let Some(fp) = reader.next(&mut key, &mut identity).unwrap() {
            out.insert(key.clone(), fp);
        }
        out
    }

    #[tokio::test]
    async fn a_small_journal_merged_in_order_folds_exactly_as_the_buckets_do() {
        let dir = tempfile::tempdir().unwrap();
        let (state, journal) = (dir.path().join("ns/s.state"), dir.path().join("ns/s.journal"));
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        let first: Vec<StateChange> = (0..3_000).map(|n| put(&format!("k{n}"), n)).collect();
        store.commit("d", &first).await.unwrap();
        store.finish("d").await.unwrap();

        // Changed, removed, new, changed twice, removed then put back, put then removed, an
        // absent key removed; then a second checkpoint changing one key again.
        store
            .commit(
                "d",
                &[
                    put("k1", 100),
                    remove("k2"),
                    put("new", 7),
                    put("k3", 1),
                    put("k3", 2),
                    remove("k5"),
                    put("k5", 55),
                    put("brief", 1),
                    remove("brief"),
                    remove("absent"),
                ],
            )
            .await
            .unwrap();
        store.commit("d", &[put("k1", 101)]).await.unwrap();
        let merged = merge_in_order(&state, &journal, "d", &temp_error)
            .unwrap()
            .expect("the state file is in key-hash order");
        let bucketed = fold_through_buckets(&state, &journal, "d", &temp_error).unwrap();
        let (merged, bucketed) = (bytes_of(merged), bytes_of(bucketed));
        assert_eq!(merged.1, 3_000);
        assert_eq!(merged, bucketed);

        fold(&state, &journal, "d").unwrap();
        let after = state_of(&state);
        assert_eq!(after.len(), 3_000);
        assert_eq!(after["k1"], 101);
        assert_eq!(after["k3"], 2);
        assert_eq!(after["k5"], 55);
        assert_eq!(after["new"], 7);
        assert!(!after.contains_key("k2") && !after.contains_key("brief"));
        assert!(!journal.exists());
    }

    #[tokio::test]
    async fn a_state_file_out_of_key_hash_order_is_folded_through_the_buckets() {
        let dir = tempfile::tempdir().unwrap();
        let (state, journal) = (dir.path().join("ns/s.state"), dir.path().join("ns/s.journal"));
        // Entries in descending key-hash order, as no fold writes them.
        let mut keys: Vec<String> = (0..50).map(|n| format!("k{n}")).collect();
        keys.sort_by_key(|k| std::cmp::Reverse(stored_key_hash(k)));
        let mut out = StateFileWriter::create(&state, "d", keys.len() as u64).unwrap();
        let mut record = Vec::new();
        for (n, key) in keys.iter().enumerate() {
            put_entry(
                &mut record,
                EntryRef {
                    key,
                    fingerprint: n as u64,
                    identity: "{}",
                },
            );
        }
        out.write_entries(&record).unwrap();
        out.persist().unwrap();

        let mut store = FileStore::new(dir.path(), "ns", "s");
        store
            .commit("d", &[put("k0", 1_000), remove("k1")])
            .await
            .unwrap();
        assert!(
            merge_in_order(&state, &journal, "d", &temp_error)
                .unwrap()
                .is_none()
        );
        fold(&state, &journal, "d").unwrap();
        let after = state_of(&state);
        assert_eq!(after.len(), 49);
        assert_eq!(after["k0"], 1_000);
        assert!(!after.contains_key("k1"));
        // Now written in key-hash order: the next fold merges.
        drop(store);
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.commit("d", &[put("k2", 2_000)]).await.unwrap();
        assert!(
            merge_in_order(&state, &journal, "d", &temp_error)
                .unwrap()
                .is_some()
        );
    }
}
