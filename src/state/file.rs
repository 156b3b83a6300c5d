//! The `File` state store: a directory on local disk, for `backflow run -f`.
//!
//! Per sync, under `DIR/NAMESPACE/`:
//! - `NAME.state`: the compact state, replaced atomically (write a temporary file, fsync,
//!   rename, fsync the directory), so a crash never leaves a torn file; a checksum trailer
//!   catches any other damage.
//! - `NAME.journal`: checkpoints appended during a run, each record length-prefixed and
//!   checksummed and fsynced before the run goes on. A torn last record (a crash mid-write) is
//!   ignored: that checkpoint is sent again. `finish` folds the journal into the state file,
//!   unless it is small next to it (at most 1/8 of its bytes and 8 MiB, a run that changed few rows):
//!   then it stays, and the next runs merge it into the state file as they read it, until
//!   their checkpoints make it large enough to fold. The next run folds it first when it
//!   cannot stay (a torn checkpoint, another destination, too large).
//! - `NAME.lock`: an exclusive lock held while a run uses the state.
//! - `NAME.cursor`: cursor mode's record (scope and high-water mark), replaced atomically
//!   like the state file once a run's last checkpoint is in the journal.
//!
//! A run never loads the state: the store diffs it through disk buckets (`diff`) and folds
//! checkpoints the same way (`fold`), so memory does not grow with the rows stored. `load`
//! (a migration to another store) still reads the whole state into memory.

mod diff;
mod fold;
mod format;
mod live;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::codec::encode_change;
use super::{EntryRef, Fingerprints, StateChange, StateError, StateStore, StoreDiff};
use format::{JournalReader, StateFileReader, io_error, journal_header, journal_record};

/// Fingerprints of one sync in a local directory.
#[derive(Debug)]
pub struct FileStore {
    state_path: PathBuf,
    journal_path: PathBuf,
    lock_path: PathBuf,
    cursor_path: PathBuf,
    lock: Option<File>,
    journal: Option<File>,
    diffing: Option<diff::Diffing>,
}

impl FileStore {
    /// The store of sync `name` in `namespace` under `dir`. Nothing is touched until `load`.
    pub fn new(dir: &Path, namespace: &str, name: &str) -> FileStore {
        let base = dir.join(namespace);
        FileStore {
            state_path: base.join(format!("{name}.state")),
            journal_path: base.join(format!("{name}.journal")),
            lock_path: base.join(format!("{name}.lock")),
            cursor_path: base.join(format!("{name}.cursor")),
            lock: None,
            journal: None,
            diffing: None,
        }
    }

    /// Path of the compact state file.
    pub fn state_path(&self) -> &Path {
        &self.state_path
    }

    fn io(&self, e: std::io::Error) -> StateError {
        io_error(&self.state_path, &e)
    }

    fn acquire_lock(&mut self) -> Result<(), StateError> {
        if self.lock.is_some() {
            return Ok(());
        }
        if let Some(parent) = self.lock_path.parent() {
            fs::create_dir_all(parent).map_err(|e| self.io(e))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_path)
            .map_err(|e| self.io(e))?;
        match file.try_lock() {
            Ok(()) => {
                self.lock = Some(file);
                Ok(())
            }
            Err(fs::TryLockError::WouldBlock) => {
                Err(StateError::Locked(self.state_path.display().to_string()))
            }
            Err(fs::TryLockError::Error(e)) => Err(self.io(e)),
        }
    }

    /// Folds a journal left by earlier runs into the state file, under its own scope, unless
    /// it may stay beside the state file for `keep_for` (a run of that scope is starting).
    async fn recover(&mut self, keep_for: Option<&str>) -> Result<(), StateError> {
        self.journal = None;
        let Some(scope) = JournalReader::open(&self.journal_path)?.map(|j| j.scope().to_owned()) else {
            // No journal, or one torn before its first checkpoint.
            return match fs::remove_file(&self.journal_path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&self.journal_path, &e)),
                _ => Ok(()),
            };
        };
        if let Some(keep_for) = keep_for
            && self.journal_may_stay(keep_for).await?
        {
            return Ok(());
        }
        tracing::info!(state = %self.state_path.display(), "folding the journal of earlier runs into the state file");
        self.fold(scope).await
    }

    /// [`live::journal_may_stay`] on a blocking thread.
    async fn journal_may_stay(&self, scope: &str) -> Result<bool, StateError> {
        let (state, journal, scope) = (
            self.state_path.clone(),
            self.journal_path.clone(),
            scope.to_owned(),
        );
        tokio::task::spawn_blocking(move || live::journal_may_stay(&state, &journal, &scope))
            .await
            .map_err(|e| StateError::Io {
                location: self.journal_path.display().to_string(),
                reason: format!("reading the journal stopped: {e}"),
            })?
    }

    /// [`fold::fold`] on a blocking thread.
    async fn fold(&self, scope: String) -> Result<(), StateError> {
        let (state, journal) = (self.state_path.clone(), self.journal_path.clone());
        let rows = tokio::task::spawn_blocking(move || fold::fold(&state, &journal, &scope))
            .await
            .map_err(|e| StateError::Io {
                location: self.state_path.display().to_string(),
                reason: format!("folding checkpoints stopped: {e}"),
            })??;
        tracing::debug!(state = %self.state_path.display(), rows, "checkpoints folded into the state file");
        Ok(())
    }

    /// Reads the state file into memory; empty when it belongs to another scope.
    fn read_state_file(&self, scope: &str) -> Result<Fingerprints, StateError> {
        let Some(mut reader) = StateFileReader::open(&self.state_path)? else {
            return Ok(Fingerprints::default());
        };
        if reader.scope() != scope {
            tracing::info!(state = %self.state_path.display(), "state belongs to another destination; every row will be sent");
            return Ok(Fingerprints::default());
        }
        // Each entry is 16 bytes of numbers around its key and identity: what is left of the
        // file is, to a few bytes, the arena the set needs.
        let rows = usize::try_from(reader.count()).unwrap_or(0).min(1 << 28);
        let arena = usize::try_from(reader.len())
            .unwrap_or(0)
            .saturating_sub(rows * 16);
        let mut set = Fingerprints::with_capacity(rows, arena);
        let (mut key, mut identity) = (String::new(), String::new());
        while let Some(fingerprint) = reader.next(&mut key, &mut identity)? {
            set.push_unindexed(EntryRef {
                key: &key,
                fingerprint,
                identity: &identity,
            });
        }
        set.build_index();
        Ok(set)
    }

    fn open_journal(&mut self, scope: &str) -> Result<&mut File, StateError> {
        if self.journal.is_none() {
            let fresh = !self.journal_path.exists();
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.journal_path)
                .map_err(|e| io_error(&self.journal_path, &e))?;
            if fresh {
                file.write_all(&journal_header(scope))
                    .map_err(|e| io_error(&self.journal_path, &e))?;
            }
            self.journal = Some(file);
        }
        // Just set above when it was None.
        self.journal.as_mut().ok_or_else(|| StateError::Io {
            location: String::new(),
            reason: "journal not open".into(),
        })
    }
}

/// What `NAME.cursor` holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct CursorFile {
    scope: String,
    record: String,
}

#[async_trait]
impl StateStore for FileStore {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        self.acquire_lock()?;
        self.recover(None).await?;
        self.read_state_file(scope)
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.acquire_lock()?;
        let mut payload = Vec::with_capacity(changes.len() * 64);
        for c in changes {
            encode_change(c, &mut payload);
        }
        let record = journal_record(&payload);
        let path = self.journal_path.clone();
        self.open_journal(scope)?;
        let Some(mut journal) = self.journal.take() else {
            return Err(io_error(&path, &std::io::Error::other("the journal is not open")));
        };
        // The write and its fsync run off the async threads, so that requests go on meanwhile.
        let (journal, written) = tokio::task::spawn_blocking(move || {
            let written = journal.write_all(&record).and_then(|()| journal.sync_data());
            (journal, written)
        })
        .await
        .map_err(|e| io_error(&path, &std::io::Error::other(e.to_string())))?;
        self.journal = Some(journal);
        written.map_err(|e| io_error(&path, &e))
    }

    async fn finish(&mut self, scope: &str) -> Result<(), StateError> {
        self.acquire_lock()?;
        self.journal = None;
        if !self.journal_path.exists() {
            return Ok(());
        }
        if self.journal_may_stay(scope).await? {
            tracing::debug!(state = %self.state_path.display(), "the journal stays beside the state file until it grows");
            return Ok(());
        }
        self.fold(scope.to_owned()).await
    }

    async fn cursor(&mut self, scope: &str) -> Result<Option<String>, StateError> {
        self.acquire_lock()?;
        let text = match fs::read(&self.cursor_path) {
            Ok(bytes) if bytes.len() <= 2 * super::MAX_CURSOR_RECORD => bytes,
            Ok(_) => return Err(format::corrupt(&self.cursor_path, "the cursor file is too large")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error(&self.cursor_path, &e)),
        };
        let file: CursorFile = serde_json::from_slice(&text).map_err(|e| {
            format::corrupt(&self.cursor_path, format!("the cursor file does not parse: {e}"))
        })?;
        Ok((file.scope == scope).then_some(file.record))
    }

    async fn commit_cursor(&mut self, scope: &str, record: &str) -> Result<(), StateError> {
        self.acquire_lock()?;
        let file = CursorFile {
            scope: scope.to_owned(),
            record: record.to_owned(),
        };
        let bytes =
            serde_json::to_vec(&file).map_err(|e| io_error(&self.cursor_path, &std::io::Error::other(e)))?;
        format::replace_file(&self.cursor_path, &bytes)
    }

    async fn discard(&mut self) -> Result<(), StateError> {
        self.journal = None;
        // The mark first: it must never outlive the fingerprints it is the mark of.
        for path in [&self.cursor_path, &self.journal_path, &self.state_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(e)),
            }
        }
        Ok(())
    }

    fn store_diff(&mut self) -> Option<&mut dyn StoreDiff> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Removed;

    /// Flips a byte of the state file's last entry: its checksum no longer matches.
    fn damage_last_entry(dir: &Path) {
        let path = dir.join("ns/s.state");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 9;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
    }

    pub(super) fn put(key: &str, fp: u64) -> StateChange {
        StateChange::Put {
            key: key.into(),
            fingerprint: fp,
            identity: format!("{{\"id\":\"{key}\"}}"),
        }
    }

    #[tokio::test]
    async fn checkpoints_survive_without_finish_and_fold_into_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        assert!(store.load("dest").await.unwrap().is_empty());
        store.commit("dest", &[put("a", 1), put("b", 2)]).await.unwrap();
        store
            .commit("dest", &[StateChange::Remove { key: "a".into() }, put("c", 3)])
            .await
            .unwrap();
        drop(store); // a crash: no finish

        let mut again = FileStore::new(dir.path(), "ns", "s");
        let set = again.load("dest").await.unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.position("a").is_none());
        again.finish("dest").await.unwrap();
        assert!(!dir.path().join("ns/s.journal").exists());
        drop(again);

        let mut third = FileStore::new(dir.path(), "ns", "s");
        let set = third.load("dest").await.unwrap();
        assert_eq!(set.get(set.position("c").unwrap()).unwrap().fingerprint, 3);
        assert_eq!(
            set.get(set.position("b").unwrap()).unwrap().identity,
            "{\"id\":\"b\"}"
        );
    }

    #[tokio::test]
    async fn a_torn_last_checkpoint_is_ignored_and_earlier_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store.commit("d", &[put("a", 1)]).await.unwrap();
        store.commit("d", &[put("b", 2)]).await.unwrap();
        drop(store);
        let journal = dir.path().join("ns/s.journal");
        let len = fs::metadata(&journal).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap()
            .set_len(len - 3)
            .unwrap();

        let set = FileStore::new(dir.path(), "ns", "s").load("d").await.unwrap();
        assert_eq!(set.len(), 1);
        assert!(set.position("a").is_some());
    }

    #[tokio::test]
    async fn a_damaged_state_file_is_an_error_not_an_empty_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store.commit("d", &[put("a", 1)]).await.unwrap();
        store.finish("d").await.unwrap();
        drop(store);
        let path = dir.path().join("ns/s.state");
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let err = FileStore::new(dir.path(), "ns", "s").load("d").await.unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("resync"));
    }

    #[tokio::test]
    async fn state_of_another_destination_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("old").await.unwrap();
        store.commit("old", &[put("a", 1)]).await.unwrap();
        store.finish("old").await.unwrap();
        assert!(store.load("new").await.unwrap().is_empty());
    }

    /// Every entry of the state file, in file order, read without loading it into a set.
    fn entries_on_disk(dir: &Path) -> (String, Vec<(String, u64, String)>) {
        let mut reader = StateFileReader::open(&dir.join("ns/s.state")).unwrap().unwrap();
        let (mut key, mut identity) = (String::new(), String::new());
        let mut out = Vec::new();
        while let Some(fp) = reader.next(&mut key, &mut identity).unwrap() {
            out.push((key.clone(), fp, identity.clone()));
        }
        (reader.scope().to_owned(), out)
    }

    #[tokio::test]
    async fn finish_applies_checkpoints_in_order_and_writes_entries_in_key_hash_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store
            .commit("d", &[put("a", 1), put("b", 2), put("c", 3)])
            .await
            .unwrap();
        store.finish("d").await.unwrap();
        let remove = |k: &str| StateChange::Remove { key: k.into() };
        store.commit("d", &[remove("a"), put("d", 4)]).await.unwrap();
        store
            .commit(
                "d",
                &[
                    put("a", 5),
                    remove("b"),
                    remove("never-stored"),
                    put("c", 6),
                    put("c", 7),
                ],
            )
            .await
            .unwrap();
        store.finish("d").await.unwrap();
        assert!(!dir.path().join("ns/s.journal").exists());

        let (scope, entries) = entries_on_disk(dir.path());
        assert_eq!(scope, "d");
        let mut expected = vec![
            ("a".to_owned(), 5, "{\"id\":\"a\"}".to_owned()),
            ("c".to_owned(), 7, "{\"id\":\"c\"}".to_owned()),
            ("d".to_owned(), 4, "{\"id\":\"d\"}".to_owned()),
        ];
        expected.sort_by_key(|(k, _, _)| crate::state::stored_key_hash(k));
        assert_eq!(entries, expected);
    }

    #[tokio::test]
    async fn a_large_state_folds_through_many_chunks_and_loads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        // 1,200 entries of ~40 bytes per bucket: two 32 KiB chunks each and a tail.
        let rows = 300_000u64;
        let first: Vec<StateChange> = (0..rows).map(|i| put(&format!("key-{i}"), i)).collect();
        store.commit("d", &first).await.unwrap();
        store.finish("d").await.unwrap();
        let second: Vec<StateChange> = (0..rows)
            .step_by(100)
            .map(|i| match i % 200 {
                0 => StateChange::Remove {
                    key: format!("key-{i}"),
                },
                _ => put(&format!("key-{i}"), i + 1),
            })
            .collect();
        store.commit("d", &second).await.unwrap();
        store.finish("d").await.unwrap();

        let set = store.load("d").await.unwrap();
        assert_eq!(set.len() as u64, rows - rows / 200);
        for i in [0, 100, 150, 200, 299_900, 299_999] {
            let found = set
                .position(&format!("key-{i}"))
                .map(|p| set.get(p).unwrap().fingerprint);
            let expected = match (i % 100, i % 200) {
                (_, 0) => None,
                (0, _) => Some(i + 1),
                _ => Some(i),
            };
            assert_eq!(found, expected, "key-{i}");
        }
    }

    fn pairs(rows: &[(&str, u64)]) -> Vec<(u128, u64)> {
        rows.iter()
            .map(|(k, fp)| (crate::state::stored_key_hash(k), *fp))
            .collect()
    }

    #[tokio::test]
    async fn the_diff_finds_added_changed_removed_and_duplicated_keys_with_removed_identities() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store
            .commit(
                "d",
                &[put("same", 1), put("edited", 2), put("gone", 3), put("twice", 4)],
            )
            .await
            .unwrap();
        store.finish("d").await.unwrap();
        drop(store);

        let mut store = FileStore::new(dir.path(), "ns", "s");
        let diff = store.store_diff().unwrap();
        assert!(diff.begin("d").await.unwrap());
        assert!(diff.holds_state("d"));
        let run = pairs(&[
            ("same", 1),
            ("edited", 20),
            ("new", 5),
            ("twice", 4),
            ("twice", 4),
        ]);
        diff.stage(&run[..2]).await.unwrap();
        diff.stage(&run[2..]).await.unwrap();
        let found = diff.diff("d", false).await.unwrap();
        let hash = crate::state::stored_key_hash;
        assert!(!found.all_added);
        assert_eq!(found.change(hash("same")), None);
        assert_eq!(found.change(hash("edited")), Some(false));
        assert_eq!(found.change(hash("new")), Some(true));
        assert_eq!(found.duplicates.get(&hash("twice")), Some(&2));
        let removed: Vec<(String, String)> = found.removed.iter().map(Result::unwrap).collect();
        assert_eq!(removed, vec![("gone".to_owned(), "{\"id\":\"gone\"}".to_owned())]);
        assert_eq!(found.removed_rows, 1);
        drop(store);

        // A run that will not delete gets the same diff with the removed rows counted only.
        let mut store = FileStore::new(dir.path(), "ns", "s");
        let diff = store.store_diff().unwrap();
        assert!(diff.begin("d").await.unwrap());
        diff.removed_keys(Removed::Count);
        diff.stage(&run).await.unwrap();
        let counted = diff.diff("d", false).await.unwrap();
        assert_eq!(counted.changed, found.changed);
        assert_eq!(counted.duplicates, found.duplicates);
        assert!(counted.removed.is_empty());
        assert_eq!(counted.removed_rows, 1);
    }

    #[tokio::test]
    async fn a_partial_diff_reads_the_state_file_in_order_and_finds_what_a_full_one_finds() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        let stored: Vec<StateChange> = (0..2_000).map(|n| put(&format!("k{n}"), n)).collect();
        store.commit("d", &stored).await.unwrap();
        store.finish("d").await.unwrap();
        drop(store);

        let run = pairs(&[("k1", 1), ("k2", 20), ("new", 5), ("k3", 3), ("k3", 3)]);
        let mut found = Vec::new();
        for partial in [false, true] {
            let mut store = FileStore::new(dir.path(), "ns", "s");
            let diff = store.store_diff().unwrap();
            assert!(diff.begin("d").await.unwrap());
            if partial {
                diff.removed_keys(Removed::Ignore);
            }
            diff.stage(&run).await.unwrap();
            found.push(diff.diff("d", false).await.unwrap());
        }
        let (full, partial) = (&found[0], &found[1]);
        let hash = crate::state::stored_key_hash;
        assert_eq!(partial.changed, full.changed);
        assert_eq!(partial.duplicates, full.duplicates);
        assert_eq!(partial.change(hash("k2")), Some(false));
        assert_eq!(partial.change(hash("new")), Some(true));
        assert_eq!(partial.change(hash("k1")), None);
        assert_eq!(partial.duplicates.get(&hash("k3")), Some(&2));
        assert_eq!(full.removed.len(), 1_997);
        assert_eq!(full.removed_rows, 1_997);
        assert!(partial.removed.is_empty());
        assert_eq!(partial.removed_rows, 0);

        // A damaged file fails the partial diff too.
        damage_last_entry(dir.path());
        let mut store = FileStore::new(dir.path(), "ns", "s");
        let diff = store.store_diff().unwrap();
        diff.begin("d").await.unwrap();
        diff.removed_keys(Removed::Ignore);
        diff.stage(&run).await.unwrap();
        let err = diff.diff("d", false).await.unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }

    /// A state of `rows` keys `k0..` (fingerprint = n), folded.
    async fn stored(dir: &Path, rows: u64) {
        let mut store = FileStore::new(dir, "ns", "s");
        store.load("d").await.unwrap();
        let puts: Vec<StateChange> = (0..rows).map(|n| put(&format!("k{n}"), n)).collect();
        store.commit("d", &puts).await.unwrap();
        store.finish("d").await.unwrap();
        assert!(!dir.join("ns/s.journal").exists());
    }

    #[tokio::test]
    async fn a_small_journal_stays_beside_the_state_file_and_every_read_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("ns/s.journal");
        stored(dir.path(), 2_000).await;
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store
            .commit(
                "d",
                &[
                    put("k1", 100),
                    StateChange::Remove { key: "k2".into() },
                    put("new", 7),
                ],
            )
            .await
            .unwrap();
        store.finish("d").await.unwrap();
        assert!(
            journal.exists(),
            "a run that changed 3 rows of 2,000 keeps its journal"
        );
        drop(store);

        let hash = crate::state::stored_key_hash;
        for partial in [false, true] {
            let mut store = FileStore::new(dir.path(), "ns", "s");
            let diff = store.store_diff().unwrap();
            assert!(diff.begin("d").await.unwrap());
            assert!(journal.exists());
            if partial {
                diff.removed_keys(Removed::Ignore);
            }
            diff.stage(&pairs(&[("k1", 100), ("k2", 2), ("new", 7), ("k3", 3)]))
                .await
                .unwrap();
            // The stored pairs the planner gets are the live ones, the journal's included.
            let mut offered = None;
            for _ in 0..1_000 {
                offered = diff.stored_pairs();
                if offered.is_some() || partial {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            if partial {
                assert!(
                    offered.is_none(),
                    "a partial run reads no stored pairs while staging"
                );
            } else {
                let mut offered = offered.expect("the stored pairs arrive once the state file is read");
                assert_eq!(offered.len(), 2_000);
                assert!(offered.take_unchanged(hash("k1"), 100));
                assert!(!offered.take_unchanged(hash("k2"), 2), "removed in the journal");
                assert!(offered.take_unchanged(hash("new"), 7));
                assert!(offered.take_unchanged(hash("k3"), 3));
                assert!(diff.stored_pairs().is_none(), "offered once");
            }
            let found = diff.diff("d", false).await.unwrap();
            assert_eq!(found.change(hash("k1")), None, "partial: {partial}");
            assert_eq!(found.change(hash("k2")), Some(true), "partial: {partial}");
            assert_eq!(found.change(hash("new")), None, "partial: {partial}");
            assert_eq!(found.change(hash("k3")), None, "partial: {partial}");
            if partial {
                assert!(found.removed.is_empty());
            } else {
                assert_eq!(found.removed.len(), 1_997);
                let k4 = ("k4".to_owned(), "{\"id\":\"k4\"}".to_owned());
                assert!(found.removed.iter().any(|row| row.unwrap() == k4));
            }
        }

        // A load (a migration) folds it.
        let mut store = FileStore::new(dir.path(), "ns", "s");
        let set = store.load("d").await.unwrap();
        assert!(!journal.exists());
        assert_eq!(set.len(), 2_000);
        assert_eq!(set.get(set.position("k1").unwrap()).unwrap().fingerprint, 100);
        assert!(set.position("k2").is_none() && set.position("new").is_some());
    }

    #[tokio::test]
    async fn a_journal_that_cannot_stay_is_folded_when_the_next_run_begins() {
        let dir = tempfile::tempdir().unwrap();
        let journal = dir.path().join("ns/s.journal");
        stored(dir.path(), 2_000).await;
        let hash = crate::state::stored_key_hash;

        // A torn checkpoint after a whole one (a crash mid-write).
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.commit("d", &[put("k1", 100)]).await.unwrap();
        drop(store);
        let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
        file.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(file);
        let mut store = FileStore::new(dir.path(), "ns", "s");
        let diff = store.store_diff().unwrap();
        diff.begin("d").await.unwrap();
        assert!(!journal.exists(), "a torn journal is folded, not appended to");
        diff.stage(&pairs(&[("k1", 100)])).await.unwrap();
        assert_eq!(diff.diff("d", false).await.unwrap().change(hash("k1")), None);
        drop(store);

        // A journal of another destination.
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.commit("d", &[put("k1", 200)]).await.unwrap();
        store.finish("d").await.unwrap();
        assert!(journal.exists());
        let diff = store.store_diff().unwrap();
        diff.begin("other").await.unwrap();
        assert!(!journal.exists());
        assert!(!diff.holds_state("other"));
        drop(store);
        let mut store = FileStore::new(dir.path(), "ns", "s");
        let set = store.load("d").await.unwrap();
        assert_eq!(set.get(set.position("k1").unwrap()).unwrap().fingerprint, 200);
    }

    #[tokio::test]
    async fn the_journal_is_folded_once_it_would_pass_an_eighth_of_the_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let (state, journal) = (dir.path().join("ns/s.state"), dir.path().join("ns/s.journal"));
        stored(dir.path(), 2_000).await;
        let mut kept_runs = 0;
        for run in 1..=100u64 {
            let mut store = FileStore::new(dir.path(), "ns", "s");
            let diff = store.store_diff().unwrap();
            diff.begin("d").await.unwrap();
            diff.stage(&[]).await.unwrap();
            diff.diff("d", false).await.unwrap();
            let changes: Vec<StateChange> = (0..20)
                .map(|n| put(&format!("k{}", run * 20 + n), 10_000 + run))
                .collect();
            store.commit("d", &changes).await.unwrap();
            store.finish("d").await.unwrap();
            if !journal.exists() {
                break;
            }
            kept_runs += 1;
            let (journal_len, state_len) = (
                fs::metadata(&journal).unwrap().len(),
                fs::metadata(&state).unwrap().len(),
            );
            assert!(journal_len <= state_len / 8, "{journal_len} of {state_len}");
        }
        assert!(kept_runs >= 2 && !journal.exists(), "kept {kept_runs} runs");
        let (_, entries) = entries_on_disk(dir.path());
        assert_eq!(entries.len(), 2_000);
        let k = |key: &str| entries.iter().find(|(k, _, _)| k == key).map(|(_, fp, _)| *fp);
        assert_eq!(k("k20"), Some(10_001));
        assert_eq!(k(&format!("k{}", (kept_runs + 1) * 20)), Some(10_001 + kept_runs));
    }

    #[tokio::test]
    async fn the_next_diff_folds_a_crashed_runs_checkpoints_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("d").await.unwrap();
        store.commit("d", &[put("a", 1), put("b", 2)]).await.unwrap();
        drop(store); // a crash before finish

        let mut store = FileStore::new(dir.path(), "ns", "s");
        let diff = store.store_diff().unwrap();
        diff.begin("d").await.unwrap();
        assert!(!dir.path().join("ns/s.journal").exists());
        diff.stage(&pairs(&[("a", 1), ("b", 2)])).await.unwrap();
        let found = diff.diff("d", false).await.unwrap();
        assert!(found.changed.is_empty() && found.removed.is_empty());
    }

    #[tokio::test]
    async fn the_diff_sees_no_state_of_another_scope_and_fails_on_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = FileStore::new(dir.path(), "ns", "s");
        store.load("old").await.unwrap();
        store.commit("old", &[put("a", 1)]).await.unwrap();
        store.finish("old").await.unwrap();
        let diff = store.store_diff().unwrap();
        diff.begin("new").await.unwrap();
        assert!(!diff.holds_state("new"));
        diff.stage(&pairs(&[("a", 1)])).await.unwrap();
        assert!(diff.diff("new", false).await.unwrap().all_added);
        drop(store);

        damage_last_entry(dir.path());
        let mut store = FileStore::new(dir.path(), "ns", "s");
        let diff = store.store_diff().unwrap();
        diff.begin("old").await.unwrap();
        let err = diff.diff("old", false).await.unwrap_err();
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_second_run_of_the_same_sync_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = FileStore::new(dir.path(), "ns", "s");
        first.load("d").await.unwrap();
        let err = FileStore::new(dir.path(), "ns", "s").load("d").await.unwrap_err();
        assert!(matches!(err, StateError::Locked(_)));
    }
}
