//! A File store that hands the planner every stored pair before the model's first row, where
//! a real store's arrive once its read ends, so that the rows it knows unchanged are left out
//! of the spill from the first row on.

use async_trait::async_trait;
use backflow::state::file::FileStore;
use backflow::state::hash_buckets::Removed;
use backflow::state::stored_pairs::{StoredPairs, StoredPairsSample};
use backflow::state::{
    Fingerprints, RemoteDiff, StateChange, StateError, StateStore, StoreDiff, stored_key_hash,
};

/// [`FileStore`] whose [`StoreDiff::stored_pairs`] are every pair of `state` (what another
/// File store of the same state loads), from `begin` on.
pub struct EagerPairs {
    store: FileStore,
    state: Fingerprints,
    pairs: Option<StoredPairs>,
}

impl EagerPairs {
    /// `store`, whose state `state` holds.
    pub fn new(store: FileStore, state: Fingerprints) -> EagerPairs {
        EagerPairs {
            store,
            state,
            pairs: None,
        }
    }
}

#[async_trait]
impl StateStore for EagerPairs {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        self.store.load(scope).await
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        self.store.commit(scope, changes).await
    }

    async fn finish(&mut self, scope: &str) -> Result<(), StateError> {
        self.store.finish(scope).await
    }

    fn store_diff(&mut self) -> Option<&mut dyn StoreDiff> {
        Some(self)
    }
}

#[async_trait]
impl StoreDiff for EagerPairs {
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError> {
        let (mut sample, mut pairs) = StoredPairsSample::new(self.state.len() as u64);
        for e in self.state.iter() {
            sample.push(stored_key_hash(e.key), e.fingerprint);
        }
        sample.finish();
        self.pairs = pairs.try_recv().ok();
        self.store
            .store_diff()
            .expect("the File store diffs")
            .begin(scope)
            .await
    }

    fn holds_state(&mut self, scope: &str) -> bool {
        self.store
            .store_diff()
            .expect("the File store diffs")
            .holds_state(scope)
    }

    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError> {
        self.store
            .store_diff()
            .expect("the File store diffs")
            .stage(rows)
            .await
    }

    fn removed_keys(&mut self, removed: Removed) {
        self.store
            .store_diff()
            .expect("the File store diffs")
            .removed_keys(removed);
    }

    fn stored_pairs(&mut self) -> Option<StoredPairs> {
        self.pairs.take()
    }

    async fn diff(&mut self, scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        self.store
            .store_diff()
            .expect("the File store diffs")
            .diff(scope, full_resync)
            .await
    }
}
