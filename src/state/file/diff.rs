//! The File store's diff, without loading the state into memory: the same disk-bucket merge
//! as the Warehouse store's ([`crate::state::hash_buckets`]).
//!
//! While the engine extracts the model, a blocking task streams the state file's (key hash,
//! fingerprint) pairs into disk buckets; the engine's rows go into buckets of their own. The
//! diff merges the two bucket by bucket, then reads the state file once more for the key and
//! identity of the removed rows, and only when there are some (walking their ascending
//! hashes beside it, into [`RemovedRows`]). Memory holds one bucket of each side and the
//! changed keys, never a row per stored or removed key.
//!
//! A run that reads part of the model (cursor mode, past the mark) lists no removed rows, and
//! its rows are usually few next to the stored ones: the state file, written in key-hash
//! order, is then read once at the diff and merged as it is read, without bucketing or
//! sorting the stored side.
//!
//! Every read of the stored side sees the live state: the state file with the journal that
//! earlier runs left beside it merged in ([`super::live`]).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::FileStore;
use super::format::{StateFileReader, io_error};
use super::live::{Live, LiveEntries, read_journal, read_live};
use crate::state::hash_buckets::{
    Comparison, HashBuckets, Removed, RemovedHashes, compare_apart, compare_partial_in_order,
};
use crate::state::stored_pairs::{self, StoredBuckets, StoredPairs, StoredPairsSample};
use crate::state::{RemoteDiff, RemovedRows, StateError, StoreDiff};

/// The diff of one run, between `begin` and `diff`.
#[derive(Debug)]
pub(super) struct Diffing {
    /// This run's key hashes and fingerprints.
    run: HashBuckets,
    /// The stored ones.
    stored: Stored,
    /// The state file and journal, when the state file holds rows of the run's scope.
    holding: Option<StoredFiles>,
    /// What the diff does with the stored keys the run did not stage (`Ignore`: the run read
    /// only part of the model).
    removed: Removed,
    /// Where the sample of stored pairs arrives while they are bucketed.
    pairs: Option<tokio::sync::oneshot::Receiver<StoredPairs>>,
}

impl Diffing {
    /// When the whole model is read (not a cursor run past its mark) and the stored pairs
    /// are not being read yet, starts bucketing them on a blocking thread while the model is
    /// read, sampling them for the planner.
    fn start_reading(&mut self) {
        if self.removed != Removed::Ignore
            && matches!(self.stored, Stored::Unread)
            && let Some(files) = self.holding.clone()
        {
            let (sample, pairs) = StoredPairsSample::new(files.rows);
            self.pairs = Some(pairs);
            self.stored = Stored::Reading(tokio::task::spawn_blocking(move || {
                read_stored(&files, Some(sample))
            }));
        }
    }
}

/// The stored side of a diff.
#[derive(Debug)]
enum Stored {
    /// Nothing is stored for the scope.
    Nothing,
    /// Not read yet: read into buckets once the first rows are staged, unless the run reads
    /// only part of the model by then.
    Unread,
    /// Being read from the state file into buckets.
    Reading(JoinHandle<Result<HashBuckets, StateError>>),
}

fn temp_file_error(path: &Path, e: &std::io::Error) -> StateError {
    StateError::Io {
        location: path.display().to_string(),
        reason: format!("failed to use a local temporary file of fingerprints: {e}"),
    }
}

fn stopped(path: &Path, what: &str, e: &tokio::task::JoinError) -> StateError {
    StateError::Io {
        location: path.display().to_string(),
        reason: format!("{what} stopped: {e}"),
    }
}

/// The state a diff reads: the state file and the journal beside it, of one scope.
#[derive(Debug, Clone)]
struct StoredFiles {
    state: PathBuf,
    journal: PathBuf,
    scope: String,
    /// Rows of the state file (the journal may add a few).
    rows: u64,
}

/// Every live (key hash, fingerprint) of the state, into disk buckets, and into `sample`
/// when there is one.
fn read_stored(
    files: &StoredFiles,
    mut sample: Option<StoredPairsSample>,
) -> Result<HashBuckets, StateError> {
    let path = &files.state;
    if !path.exists() {
        return Err(io_error(path, &std::io::ErrorKind::NotFound.into()));
    }
    read_live(path, &files.journal, &files.scope, false, |live| {
        let mut stored = StoredBuckets::new(sample.take()).map_err(|e| temp_file_error(path, &e))?;
        loop {
            match live.next()? {
                Live::Entry(hash, entry) => stored
                    .push(hash, entry.fingerprint)
                    .map_err(|e| temp_file_error(path, &e))?,
                Live::End => return Ok(Some(stored.finish())),
                Live::OutOfOrder => {
                    // Read again after a fold: what was seen so far may not be live.
                    sample = stored.restart();
                    return Ok(None);
                }
            }
        }
    })
}

/// Key and identity of the live entries whose key hash is in `hashes`, walking both in
/// key-hash order (one bucket of `hashes` in memory at a time).
fn removed_rows(files: &StoredFiles, hashes: &RemovedHashes) -> Result<RemovedRows, StateError> {
    let temp = |e: std::io::Error| temp_file_error(&files.state, &e);
    read_live(&files.state, &files.journal, &files.scope, true, |live| {
        let mut removed = RemovedRows::new();
        let mut wanted = hashes.iter();
        let mut next = wanted.next().transpose().map_err(temp)?;
        loop {
            match live.next()? {
                Live::Entry(hash, entry) => {
                    // A listed hash is a stored one, so none is passed over; the loop is only
                    // a guard against an entry the comparison did not see.
                    while next.is_some_and(|w| w < hash) {
                        next = wanted.next().transpose().map_err(temp)?;
                    }
                    if next == Some(hash) {
                        removed
                            .push(entry.key.to_owned(), entry.identity.to_owned())
                            .map_err(temp)?;
                        next = wanted.next().transpose().map_err(temp)?;
                    }
                }
                Live::End => return removed.finish().map(Some).map_err(temp),
                Live::OutOfOrder => return Ok(None),
            }
        }
    })
}

/// [`compare_partial_in_order`] of `run` with the live state read in key-hash order, and the
/// rows of the state file; `None` when the state file is not in key-hash order.
fn compare_partial_with_file(
    files: &StoredFiles,
    run: &HashBuckets,
) -> Result<Option<(Comparison, u64)>, StateError> {
    let path = &files.state;
    let Some(changes) = read_journal(&files.journal, &files.scope)? else {
        // Too large a journal to merge: bucketed after a fold.
        return Ok(None);
    };
    let mut live = LiveEntries::open(path, &files.scope, changes, false)?;
    let rows = live.stored_rows();
    let mut out_of_order = false;
    let next = || -> Result<Option<(u128, u64)>, StateError> {
        match live.next()? {
            Live::Entry(hash, entry) => Ok(Some((hash, entry.fingerprint))),
            Live::End => Ok(None),
            Live::OutOfOrder => {
                out_of_order = true;
                Ok(None)
            }
        }
    };
    let found = compare_partial_in_order(run, next, |e| temp_file_error(path, &e))?;
    Ok(found.filter(|_| !out_of_order).map(|found| (found, rows)))
}

/// [`read_stored`] on a blocking thread.
async fn read_apart(files: &StoredFiles) -> Result<HashBuckets, StateError> {
    let read = files.clone();
    tokio::task::spawn_blocking(move || read_stored(&read, None))
        .await
        .map_err(|e| stopped(&files.state, "reading the state file", &e))?
}

/// [`compare_partial_with_file`] on a blocking thread; `Err(run)`, the run handed back, when
/// the file is not in key-hash order.
async fn compare_partial_apart(
    files: &StoredFiles,
    run: HashBuckets,
) -> Result<Result<(Comparison, u64), HashBuckets>, StateError> {
    let read = files.clone();
    let (found, run) = tokio::task::spawn_blocking(move || {
        let found = compare_partial_with_file(&read, &run);
        (found, run)
    })
    .await
    .map_err(|e| stopped(&files.state, "comparing with the state file", &e))?;
    Ok(found?.ok_or(run))
}

/// [`compare_apart`] of both sides whole, and the stored rows.
async fn compare_whole(
    run: HashBuckets,
    stored: Option<HashBuckets>,
    removed: Removed,
    path: &Path,
) -> Result<(Comparison, u64), StateError> {
    let stored_rows = stored.as_ref().map_or(0, HashBuckets::len);
    let found = compare_apart(run, stored, removed)
        .await
        .map_err(|e| temp_file_error(path, &e))?;
    Ok((found, stored_rows))
}

#[async_trait]
impl StoreDiff for FileStore {
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError> {
        self.acquire_lock()?;
        self.recover(Some(scope)).await?;
        let stored_rows = match StateFileReader::open(&self.state_path)? {
            Some(reader) if reader.scope() == scope => reader.count(),
            _ => 0,
        };
        let run = HashBuckets::new().map_err(|e| temp_file_error(&self.state_path, &e))?;
        let (stored, holding) = if stored_rows > 0 {
            let files = StoredFiles {
                state: self.state_path.clone(),
                journal: self.journal_path.clone(),
                scope: scope.to_owned(),
                rows: stored_rows,
            };
            (Stored::Unread, Some(files))
        } else {
            (Stored::Nothing, None)
        };
        self.diffing = Some(Diffing {
            run,
            stored,
            holding,
            removed: Removed::List,
            pairs: None,
        });
        Ok(true)
    }

    fn holds_state(&mut self, scope: &str) -> bool {
        self.diffing
            .as_ref()
            .and_then(|d| d.holding.as_ref())
            .is_some_and(|held| held.scope == scope)
    }

    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError> {
        let Some(diffing) = self.diffing.as_mut() else {
            return Err(StateError::diff_not_begun(self.state_path.display().to_string()));
        };
        diffing.start_reading();
        let pushed = diffing.run.push_all(rows);
        pushed.map_err(|e| temp_file_error(&self.state_path, &e))
    }

    fn removed_keys(&mut self, removed: Removed) {
        if let Some(d) = self.diffing.as_mut() {
            d.removed = removed;
            // Told before the first row: the stored pairs are read from now on.
            d.start_reading();
        }
    }

    fn stored_pairs(&mut self) -> Option<StoredPairs> {
        stored_pairs::arrived(&mut self.diffing.as_mut()?.pairs)
    }

    async fn diff(&mut self, scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        let all_added = !self.holds_state(scope);
        let Some(Diffing {
            run,
            stored,
            removed,
            holding,
            ..
        }) = self.diffing.take()
        else {
            return Err(StateError::diff_not_begun(self.state_path.display().to_string()));
        };
        let path: PathBuf = self.state_path.clone();
        let staged = run.len();
        let (mut compared, stored_rows) = match (stored, &holding) {
            (Stored::Unread, Some(files)) if removed == Removed::Ignore => {
                match compare_partial_apart(files, run).await? {
                    Ok(found) => found,
                    // Not in key-hash order (a file written otherwise): bucketed after all.
                    Err(run) => compare_whole(run, Some(read_apart(files).await?), removed, &path).await?,
                }
            }
            (Stored::Unread, Some(files)) => {
                compare_whole(run, Some(read_apart(files).await?), removed, &path).await?
            }
            (Stored::Reading(reading), _) => {
                let stored = reading
                    .await
                    .map_err(|e| stopped(&path, "reading the state file", &e))??;
                compare_whole(run, Some(stored), removed, &path).await?
            }
            (Stored::Nothing | Stored::Unread, _) => compare_whole(run, None, removed, &path).await?,
        };
        let removed = match holding {
            Some(files) if !compared.removed.is_empty() => {
                let hashes = std::mem::take(&mut compared.removed);
                tokio::task::spawn_blocking(move || removed_rows(&files, &hashes))
                    .await
                    .map_err(|e| stopped(&path, "reading the removed rows", &e))??
            }
            _ => RemovedRows::new(),
        };
        Ok(compared.into_diff(
            removed,
            all_added,
            full_resync,
            (staged, stored_rows),
            "the state file",
        ))
    }
}
