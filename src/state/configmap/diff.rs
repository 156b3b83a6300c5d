//! The ConfigMap store's diff, without loading the state into memory.
//!
//! At `begin` a task reads the shards and checkpoints (one ConfigMap at a time, as `load`
//! does) into [`ChangeBuckets`] on local disk, while the engine extracts the model, and takes
//! the live (key hash, fingerprint) pairs from them; the engine's rows go into buckets of
//! their own, and the diff merges the two bucket by bucket ([`crate::state::hash_buckets`]).
//! The key and identity of removed rows are read back from the buckets they fall in. Memory
//! holds one bucket of each side and the changed keys, never a row per stored key.
//!
//! The buckets then stay with the store: each checkpoint's changes are added to them, and
//! `finish` packs the new shards from them instead of reading every shard again.

use async_trait::async_trait;
use tokio_util::task::AbortOnDropHandle;

use super::{ConfigMapStore, View};
use crate::state::change_buckets::ChangeBuckets;
use crate::state::hash_buckets::{HashBuckets, Removed, compare_apart};
use crate::state::stored_pairs::{self, StoredPairs, StoredPairsSample};
use crate::state::{RemoteDiff, RemovedRows, StateError, StoreDiff};

/// The stored state in buckets, and its live pairs.
type Stored = (ChangeBuckets, HashBuckets);

/// The diff of one run, between `begin` and `diff`.
#[derive(Debug)]
pub(super) struct Diffing {
    /// This run's key hashes and fingerprints.
    run: HashBuckets,
    /// The stored state, being read. Dropping it stops the read.
    stored: AbortOnDropHandle<Result<Stored, StateError>>,
    /// Whether the index says something is stored for the scope.
    holding: bool,
    /// What the diff does with the stored keys the run did not stage (`Ignore`: the run read
    /// only part of the model).
    removed: Removed,
    /// Where the sample of stored pairs arrives once they are read.
    pairs: Option<tokio::sync::oneshot::Receiver<StoredPairs>>,
}

impl ConfigMapStore {
    /// Reads the state of `view` for `scope` into buckets and takes its live pairs, also into
    /// `sample`.
    async fn read_stored(
        self,
        view: View,
        scope: String,
        sample: StoredPairsSample,
    ) -> Result<Stored, StateError> {
        let changes = self.read_changes(&view, &scope).await?;
        let pairs =
            tokio::task::spawn_blocking(move || changes.live_pairs(sample).map(|pairs| (changes, pairs)))
                .await
                .map_err(|e| self.io(&self.index_name, format!("reading the state stopped: {e}")))?
                .map_err(|e| self.temp_file_error(&e))?;
        tracing::debug!(
            configmap = %self.location(&self.index_name),
            generation = view.index.generation,
            shards = view.index.shards.len(),
            checkpoints = view.journals.len(),
            rows = pairs.1.len(),
            "state read into local buckets"
        );
        Ok(pairs)
    }
}

#[async_trait]
impl StoreDiff for ConfigMapStore {
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError> {
        self.refresh().await?;
        self.folding = None;
        let view = self.view()?.clone();
        // Known before the read ends: a base of this scope with rows, or checkpoints (of a run
        // that crashed before `finish`; taken to be of this scope).
        let holding = (view.resource_version.is_some() && view.index.scope == scope && view.index.rows > 0)
            || !view.journals.is_empty();
        let (sample, pairs) = StoredPairsSample::new(view.index.rows);
        let read = self.detached().read_stored(view, scope.to_owned(), sample);
        let run = HashBuckets::new().map_err(|e| self.temp_file_error(&e))?;
        self.diffing = Some(Diffing {
            run,
            stored: AbortOnDropHandle::new(tokio::spawn(read)),
            holding,
            removed: Removed::List,
            pairs: Some(pairs),
        });
        Ok(true)
    }

    fn holds_state(&mut self, _scope: &str) -> bool {
        // `begin` looked at the state of its scope only.
        self.diffing.as_ref().is_some_and(|d| d.holding)
    }

    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError> {
        let Some(diffing) = self.diffing.as_mut() else {
            return Err(StateError::diff_not_begun(self.location(&self.index_name)));
        };
        let pushed = diffing.run.push_all(rows);
        pushed.map_err(|e| self.temp_file_error(&e))
    }

    fn removed_keys(&mut self, removed: Removed) {
        if let Some(d) = self.diffing.as_mut() {
            d.removed = removed;
        }
    }

    fn stored_pairs(&mut self) -> Option<StoredPairs> {
        stored_pairs::arrived(&mut self.diffing.as_mut()?.pairs)
    }

    async fn diff(&mut self, _scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        let Some(Diffing {
            run, stored, removed, ..
        }) = self.diffing.take()
        else {
            return Err(StateError::diff_not_begun(self.location(&self.index_name)));
        };
        let (changes, pairs) = stored
            .await
            .map_err(|e| self.io(&self.index_name, format!("reading the state stopped: {e}")))??;
        let all_added = pairs.is_empty();
        let (staged, stored_rows) = (run.len(), pairs.len());
        let compared = compare_apart(run, (!all_added).then_some(pairs), removed)
            .await
            .map_err(|e| self.temp_file_error(&e))?;
        let removed = if compared.removed.is_empty() {
            RemovedRows::new()
        } else {
            changes
                .entries_of(&compared.removed)
                .map_err(|e| self.temp_file_error(&e))?
        };
        self.folding = Some(changes);
        Ok(compared.into_diff(
            removed,
            all_added,
            full_resync,
            (staged, stored_rows),
            "the state ConfigMaps",
        ))
    }
}
