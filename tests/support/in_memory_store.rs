//! A state store that plans in memory: the File store with its own diff hidden, so the
//! engine loads every fingerprint and runs the in-memory planner. The reference the stores'
//! own diffs are checked against.

use async_trait::async_trait;
use backflow::state::file::FileStore;
use backflow::state::{Fingerprints, StateChange, StateError, StateStore};

/// [`FileStore`] without [`StateStore::store_diff`].
pub struct InMemory(pub FileStore);

#[async_trait]
impl StateStore for InMemory {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        self.0.load(scope).await
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        self.0.commit(scope, changes).await
    }

    async fn finish(&mut self, scope: &str) -> Result<(), StateError> {
        self.0.finish(scope).await
    }
}
