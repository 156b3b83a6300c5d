//! Checkpoints committed beside the requests: while one checkpoint's transaction (or the
//! File store's fsync) is under way, the next batches still go out. At most one commit is in
//! flight, so checkpoints reach the store in the order they were taken.

use std::future::Future;
use std::pin::Pin;

use crate::api::reverse_sync::RejectedRow;
use crate::state::{StateChange, StateError, StateStore};

/// What a commit in flight hands back: the store, and the changes it was given, so that a
/// failed checkpoint is committed once more at the end of the run.
struct Committed<'s> {
    store: &'s mut dyn StateStore,
    changes: Vec<StateChange>,
    result: Result<(), StateError>,
}

type InFlight<'s> = Pin<Box<dyn Future<Output = Committed<'s>> + Send + 's>>;

/// The state store during delivery: idle, or committing one checkpoint.
pub(super) struct Checkpoints<'s> {
    idle: Option<&'s mut dyn StateStore>,
    in_flight: Option<InFlight<'s>>,
}

/// A checkpoint that failed: why, and its changes, which were not committed.
pub(super) struct Failed {
    pub(super) error: StateError,
    pub(super) changes: Vec<StateChange>,
}

impl<'s> Checkpoints<'s> {
    pub(super) fn new(store: &'s mut dyn StateStore) -> Checkpoints<'s> {
        Checkpoints {
            idle: Some(store),
            in_flight: None,
        }
    }

    /// Whether a commit is under way.
    pub(super) fn is_committing(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Starts committing `changes` under `scope`, after handing `rejections` to the store's
    /// sync log (a failure there is logged: losing log rows must not fail a sync). Does
    /// nothing but give the work back when a commit is already under way.
    pub(super) fn start(
        &mut self,
        scope: String,
        changes: Vec<StateChange>,
        rejections: Vec<RejectedRow>,
    ) -> Result<(), (Vec<StateChange>, Vec<RejectedRow>)> {
        let Some(store) = self.idle.take() else {
            return Err((changes, rejections));
        };
        self.in_flight = Some(Box::pin(async move {
            if !rejections.is_empty()
                && let Err(e) = store.record_rejections(&rejections).await
            {
                tracing::warn!(error = %e, rows = rejections.len(), "failed to write rejected rows to the sync log");
            }
            let result = match changes.is_empty() {
                true => Ok(()),
                false => store.commit(&scope, &changes).await,
            };
            if result.is_ok() && !changes.is_empty() {
                tracing::debug!(changes = changes.len(), "checkpoint committed");
            }
            Committed {
                store,
                changes,
                result,
            }
        }));
        Ok(())
    }

    /// Waits for the commit under way, if any. Cancel-safe: dropped before the end, the
    /// commit stays in flight and the next call waits for it.
    pub(super) async fn settle(&mut self) -> Result<(), Failed> {
        let Some(in_flight) = self.in_flight.as_mut() else {
            return Ok(());
        };
        let Committed {
            store,
            changes,
            result,
        } = in_flight.await;
        self.in_flight = None;
        self.idle = Some(store);
        result.map_err(|error| Failed { error, changes })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;

    use super::*;
    use crate::state::Fingerprints;

    /// A store whose commits wait until released, recording what they were given.
    struct Gate {
        committed: Arc<Mutex<Vec<usize>>>,
        release: Arc<tokio::sync::Notify>,
        fail: bool,
    }

    #[async_trait]
    impl StateStore for Gate {
        async fn load(&mut self, _scope: &str) -> Result<Fingerprints, StateError> {
            Ok(Fingerprints::default())
        }
        async fn commit(&mut self, _scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
            self.release.notified().await;
            if self.fail {
                return Err(StateError::Io {
                    location: "gate".into(),
                    reason: "refused".into(),
                });
            }
            self.committed.lock().unwrap().push(changes.len());
            Ok(())
        }
        async fn finish(&mut self, _scope: &str) -> Result<(), StateError> {
            Ok(())
        }
    }

    fn put(key: &str) -> StateChange {
        StateChange::Put {
            key: key.to_owned(),
            fingerprint: 1,
            identity: String::new(),
        }
    }

    #[tokio::test]
    async fn one_commit_at_a_time_and_the_caller_goes_on_meanwhile() {
        let committed = Arc::new(Mutex::new(Vec::new()));
        let release = Arc::new(tokio::sync::Notify::new());
        let mut store = Gate {
            committed: committed.clone(),
            release: release.clone(),
            fail: false,
        };
        let mut checkpoints = Checkpoints::new(&mut store);
        assert!(
            checkpoints
                .start("s".into(), vec![put("a"), put("b")], Vec::new())
                .is_ok()
        );
        assert!(checkpoints.is_committing());
        // A second checkpoint waits for the first.
        let (back, _) = checkpoints
            .start("s".into(), vec![put("c")], Vec::new())
            .unwrap_err();
        assert_eq!(back.len(), 1);
        // Not released: settling does not finish, and dropping the wait keeps the commit.
        let waited = tokio::time::timeout(std::time::Duration::from_millis(20), checkpoints.settle()).await;
        assert!(waited.is_err());
        assert!(checkpoints.is_committing());
        assert!(committed.lock().unwrap().is_empty());
        release.notify_one();
        assert!(checkpoints.settle().await.is_ok());
        assert!(!checkpoints.is_committing());
        assert_eq!(*committed.lock().unwrap(), vec![2]);
        assert!(checkpoints.start("s".into(), back, Vec::new()).is_ok());
        release.notify_one();
        assert!(checkpoints.settle().await.is_ok());
        assert_eq!(*committed.lock().unwrap(), vec![2, 1]);
    }

    #[tokio::test]
    async fn a_failed_commit_gives_its_changes_back() {
        let release = Arc::new(tokio::sync::Notify::new());
        let mut store = Gate {
            committed: Arc::default(),
            release: release.clone(),
            fail: true,
        };
        let mut checkpoints = Checkpoints::new(&mut store);
        assert!(checkpoints.start("s".into(), vec![put("a")], Vec::new()).is_ok());
        release.notify_one();
        let failed = checkpoints.settle().await.expect_err("the commit fails");
        assert_eq!(failed.changes.len(), 1);
        assert!(failed.error.to_string().contains("refused"));
        assert!(!checkpoints.is_committing());
    }
}
