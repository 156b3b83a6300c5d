//! Leader election through a `coordination.k8s.io` Lease ([`kube_lease_manager`]), so that of
//! several replicas only one reconciles and runs syncs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Health, OperatorConfig, OperatorError};

/// This replica's hold on the lease.
pub struct Leadership {
    holding: watch::Receiver<bool>,
    manager: JoinHandle<kube_lease_manager::Result<LeaseManager>>,
    watcher: Option<JoinHandle<()>>,
    lost: Arc<AtomicBool>,
}

impl Leadership {
    /// Waits until this replica holds the lease. `None` when `shutdown` came first. While it
    /// waits the replica is a ready standby.
    pub async fn acquire(
        client: &Client,
        config: &OperatorConfig,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<Option<Leadership>, OperatorError> {
        let manager = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
            .with_namespace(&config.lease_namespace)
            .with_identity(&config.identity)
            // The holder renews a third of the duration before expiry (the crate needs
            // 0 < grace < duration).
            .with_duration(config.lease_duration.as_secs().max(2))
            .with_grace((config.lease_duration.as_secs().max(2) / 3).max(1))
            .build()
            .await
            .map_err(|e| OperatorError::Leader(e.to_string()))?;
        let (mut holding, task) = manager.watch().await;
        health.set_standby(true);
        tracing::info!(lease = %config.lease_name, namespace = %config.lease_namespace, identity = %config.identity, "waiting for the leader lease");
        while !*holding.borrow_and_update() {
            tokio::select! {
                changed = holding.changed() => {
                    if changed.is_err() {
                        let reason = match task.await {
                            Ok(Err(e)) => e.to_string(),
                            _ => "the lease task stopped".to_owned(),
                        };
                        return Err(OperatorError::Leader(reason));
                    }
                }
                _ = shutdown.cancelled() => {
                    drop(holding);
                    if let Ok(Ok(manager)) = task.await {
                        let _ = manager.release().await;
                    }
                    return Ok(None);
                }
            }
        }
        health.set_standby(false);
        tracing::info!(lease = %config.lease_name, "holding the leader lease");
        Ok(Some(Leadership {
            holding,
            manager: task,
            watcher: None,
            lost: Arc::new(AtomicBool::new(false)),
        }))
    }

    /// Cancels `work` when the lease is lost.
    pub fn watch_loss(&mut self, work: CancellationToken) {
        let mut holding = self.holding.clone();
        let lost = Arc::clone(&self.lost);
        self.watcher = Some(tokio::spawn(async move {
            loop {
                if holding.changed().await.is_err() || !*holding.borrow_and_update() {
                    tracing::error!("lost the leader lease: stopping reconciles");
                    lost.store(true, Ordering::SeqCst);
                    work.cancel();
                    return;
                }
            }
        }));
    }

    /// True once the lease was lost.
    pub fn was_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Gives the lease up, so another replica takes over at once.
    pub async fn release(self) {
        if let Some(w) = self.watcher {
            w.abort();
        }
        drop(self.holding);
        match self.manager.await {
            Ok(Ok(manager)) => {
                if let Err(e) = manager.release().await {
                    tracing::warn!(error = %e, "failed to release the leader lease; it expires by itself");
                }
            }
            _ => tracing::warn!("the lease task ended with an error; the lease expires by itself"),
        }
    }
}
