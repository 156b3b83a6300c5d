//! The File store's diff, without loading the state into memory: the same disk-bucket merge
//! as the Warehouse store's ([`crate::state::hash_buckets`]).
//!
//! While the engine extracts the model, a blocking task streams the state file's (key hash,
//! fingerprint) pairs into disk buckets; the engine's rows go into buckets of their own. The
//! diff merges the two bucket by bucket, then reads the state file once more for the key and
//! identity of the removed rows, and only when there are some. Memory holds one bucket of
//! each side and the changed keys, never a row per stored key.
//!
//! A run that reads part of the model (cursor mode, past the mark) lists no removed rows, and
//! its rows are usually few next to the stored ones: the state file, written in key-hash
//! order, is then read once at the diff and merged as it is read, without bucketing or
//! sorting the stored side.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::task::JoinHandle;

use super::FileStore;
use super::format::{StateFileReader, io_error};
use crate::state::hash_buckets::{Comparison, HashBuckets, compare_apart, compare_partial_in_order};
use crate::state::{RemoteDiff, StateError, StoreDiff, stored_key_hash};

/// The diff of one run, between `begin` and `diff`.
#[derive(Debug)]
pub(super) struct Diffing {
    /// This run's key hashes and fingerprints.
    run: HashBuckets,
    /// The stored ones.
    stored: Stored,
    /// The scope the state file holds rows of, if any.
    holding: Option<String>,
    /// The run read only part of the model: no removed rows.
    partial: bool,
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

/// Every (key hash, fingerprint) of the state file at `path`, into disk buckets.
fn read_stored(path: &Path) -> Result<HashBuckets, StateError> {
    let mut stored = HashBuckets::new().map_err(|e| temp_file_error(path, &e))?;
    let Some(mut reader) = StateFileReader::open(path)? else {
        return Err(io_error(path, &std::io::ErrorKind::NotFound.into()));
    };
    let mut key = String::new();
    while let Some(fingerprint) = reader.next_key(&mut key)? {
        stored
            .push(stored_key_hash(&key), fingerprint)
            .map_err(|e| temp_file_error(path, &e))?;
    }
    Ok(stored)
}

/// Key and identity of the state file's entries whose key hash is in `hashes`.
fn removed_rows(path: &Path, hashes: &HashSet<u128>) -> Result<Vec<(String, String)>, StateError> {
    let mut removed = Vec::with_capacity(hashes.len());
    let Some(mut reader) = StateFileReader::open(path)? else {
        return Err(io_error(path, &std::io::ErrorKind::NotFound.into()));
    };
    let (mut key, mut identity) = (String::new(), String::new());
    while reader.next(&mut key, &mut identity)?.is_some() {
        if hashes.contains(&stored_key_hash(&key)) {
            removed.push((key.clone(), identity.clone()));
        }
    }
    Ok(removed)
}

/// [`compare_partial_in_order`] of `run` with the state file at `path` read as it is, and the
/// rows the file holds; `None` when the file is not in key-hash order.
fn compare_partial_with_file(
    path: &Path,
    run: &HashBuckets,
) -> Result<Option<(Comparison, u64)>, StateError> {
    let Some(mut reader) = StateFileReader::open(path)? else {
        return Err(io_error(path, &std::io::ErrorKind::NotFound.into()));
    };
    let rows = reader.count();
    let mut key = String::new();
    let next = || -> Result<Option<(u128, u64)>, StateError> {
        Ok(reader
            .next_key(&mut key)?
            .map(|fingerprint| (stored_key_hash(&key), fingerprint)))
    };
    let found = compare_partial_in_order(run, next, |e| temp_file_error(path, &e))?;
    Ok(found.map(|found| (found, rows)))
}

/// [`read_stored`] on a blocking thread.
async fn read_apart(path: &Path) -> Result<HashBuckets, StateError> {
    let read_path = path.to_owned();
    tokio::task::spawn_blocking(move || read_stored(&read_path))
        .await
        .map_err(|e| stopped(path, "reading the state file", &e))?
}

/// [`compare_partial_with_file`] on a blocking thread; `Err(run)`, the run handed back, when
/// the file is not in key-hash order.
async fn compare_partial_apart(
    path: &Path,
    run: HashBuckets,
) -> Result<Result<(Comparison, u64), HashBuckets>, StateError> {
    let read_path = path.to_owned();
    let (found, run) = tokio::task::spawn_blocking(move || {
        let found = compare_partial_with_file(&read_path, &run);
        (found, run)
    })
    .await
    .map_err(|e| stopped(path, "comparing with the state file", &e))?;
    Ok(found?.ok_or(run))
}

/// [`compare_apart`] of both sides whole, and the stored rows.
async fn compare_whole(
    run: HashBuckets,
    stored: Option<HashBuckets>,
    partial: bool,
    path: &Path,
) -> Result<(Comparison, u64), StateError> {
    let stored_rows = stored.as_ref().map_or(0, HashBuckets::len);
    let found = compare_apart(run, stored, partial)
        .await
        .map_err(|e| temp_file_error(path, &e))?;
    Ok((found, stored_rows))
}

#[async_trait]
impl StoreDiff for FileStore {
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError> {
        self.acquire_lock()?;
        self.recover().await?;
        let stored_rows = match StateFileReader::open(&self.state_path)? {
            Some(reader) if reader.scope() == scope => reader.count(),
            _ => 0,
        };
        let run = HashBuckets::new().map_err(|e| temp_file_error(&self.state_path, &e))?;
        let (stored, holding) = if stored_rows > 0 {
            (Stored::Unread, Some(scope.to_owned()))
        } else {
            (Stored::Nothing, None)
        };
        self.diffing = Some(Diffing {
            run,
            stored,
            holding,
            partial: false,
        });
        Ok(true)
    }

    fn holds_state(&mut self, scope: &str) -> bool {
        self.diffing
            .as_ref()
            .and_then(|d| d.holding.as_deref())
            .is_some_and(|held| held == scope)
    }

    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError> {
        let Some(diffing) = self.diffing.as_mut() else {
            return Err(StateError::diff_not_begun(self.state_path.display().to_string()));
        };
        if !diffing.partial && matches!(diffing.stored, Stored::Unread) {
            // The whole model is read: the stored pairs are bucketed while it is.
            let path = self.state_path.clone();
            diffing.stored = Stored::Reading(tokio::task::spawn_blocking(move || read_stored(&path)));
        }
        let pushed = diffing.run.push_all(rows);
        pushed.map_err(|e| temp_file_error(&self.state_path, &e))
    }

    fn read_partially(&mut self) {
        if let Some(d) = self.diffing.as_mut() {
            d.partial = true;
        }
    }

    async fn diff(&mut self, scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        let all_added = !self.holds_state(scope);
        let Some(Diffing {
            run, stored, partial, ..
        }) = self.diffing.take()
        else {
            return Err(StateError::diff_not_begun(self.state_path.display().to_string()));
        };
        let path: PathBuf = self.state_path.clone();
        let staged = run.len();
        let (compared, stored_rows) = match stored {
            Stored::Unread if partial => match compare_partial_apart(&path, run).await? {
                Ok(found) => found,
                // Not in key-hash order (a file written otherwise): bucketed after all.
                Err(run) => compare_whole(run, Some(read_apart(&path).await?), partial, &path).await?,
            },
            Stored::Unread => compare_whole(run, Some(read_apart(&path).await?), partial, &path).await?,
            Stored::Reading(reading) => {
                let stored = reading
                    .await
                    .map_err(|e| stopped(&path, "reading the state file", &e))??;
                compare_whole(run, Some(stored), partial, &path).await?
            }
            Stored::Nothing => compare_whole(run, None, partial, &path).await?,
        };
        let removed = if partial || compared.removed.is_empty() {
            Vec::new()
        } else {
            let hashes: HashSet<u128> = compared.removed.iter().copied().collect();
            let read_path = path.clone();
            tokio::task::spawn_blocking(move || removed_rows(&read_path, &hashes))
                .await
                .map_err(|e| stopped(&path, "reading the removed rows", &e))??
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
