//! The ConfigMap store's diff, without loading the state into memory.
//!
//! At `begin` the store reads its shards and checkpoints (one ConfigMap at a time, as `load`
//! does) into [`ChangeBuckets`] on local disk and takes the live (key hash, fingerprint)
//! pairs from them; the engine's rows go into buckets of their own, and the diff merges the
//! two bucket by bucket ([`crate::state::hash_buckets`]). The key and identity of removed rows
//! are read back from the buckets they fall in. Memory holds one bucket of each side and the
//! changed keys, never a row per stored key.

use async_trait::async_trait;

use super::ConfigMapStore;
use crate::state::change_buckets::ChangeBuckets;
use crate::state::hash_buckets::{HashBuckets, compare};
use crate::state::{RemoteDiff, StateError, StoreDiff};

/// The diff of one run, between `begin` and `diff`.
#[derive(Debug)]
pub(super) struct Diffing {
    /// This run's key hashes and fingerprints.
    run: HashBuckets,
    /// The stored state and its live pairs; none when nothing is stored for the scope.
    stored: Option<(ChangeBuckets, HashBuckets)>,
}

impl ConfigMapStore {
    fn not_begun(&self) -> StateError {
        self.io(
            &self.index_name,
            "the diff was used before it began (a bug: please report it)",
        )
    }
}

#[async_trait]
impl StoreDiff for ConfigMapStore {
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError> {
        self.refresh().await?;
        let view = self.view()?.clone();
        let changes = self.read_changes(&view, scope).await?;
        let pairs = changes.live_pairs().map_err(|e| self.temp_file_error(&e))?;
        let run = HashBuckets::new().map_err(|e| self.temp_file_error(&e))?;
        tracing::debug!(
            configmap = %self.location(&self.index_name),
            generation = view.index.generation,
            shards = view.index.shards.len(),
            checkpoints = view.journals.len(),
            rows = pairs.len(),
            "state read into local buckets"
        );
        let stored = (!pairs.is_empty()).then_some((changes, pairs));
        self.diffing = Some(Diffing { run, stored });
        Ok(true)
    }

    fn holds_state(&mut self, _scope: &str) -> bool {
        // `begin` read the state of its scope only.
        self.diffing.as_ref().is_some_and(|d| d.stored.is_some())
    }

    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError> {
        let Some(diffing) = self.diffing.as_mut() else {
            return Err(self.not_begun());
        };
        for &(hash, fingerprint) in rows {
            if let Err(e) = diffing.run.push(hash, fingerprint) {
                return Err(self.temp_file_error(&e));
            }
        }
        Ok(())
    }

    async fn diff(&mut self, _scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        let Some(Diffing { run, stored }) = self.diffing.take() else {
            return Err(self.not_begun());
        };
        let all_added = stored.is_none();
        let (changes, pairs) = match stored {
            Some((changes, pairs)) => (Some(changes), Some(pairs)),
            None => (None, None),
        };
        let (staged, stored_rows) = (run.len(), pairs.as_ref().map_or(0, HashBuckets::len));
        let compared = tokio::task::spawn_blocking(move || compare(&run, pairs.as_ref()))
            .await
            .map_err(|e| self.io(&self.index_name, format!("comparing fingerprints stopped: {e}")))?
            .map_err(|e| self.temp_file_error(&e))?;
        let removed = match changes {
            Some(changes) if !compared.removed.is_empty() => changes
                .entries_of(&compared.removed)
                .map_err(|e| self.temp_file_error(&e))?,
            _ => Vec::new(),
        };
        let diff = RemoteDiff {
            all_added,
            full_resync,
            changed: compared.changed,
            duplicates: compared.duplicates,
            removed,
        };
        tracing::info!(
            staged,
            stored = stored_rows,
            changed = diff.changed.len(),
            removed = diff.removed.len(),
            duplicates = diff.duplicates.len(),
            all_added,
            "diff computed against the state ConfigMaps"
        );
        Ok(diff)
    }
}
