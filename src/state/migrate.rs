//! Switching a sync between state stores without resending every row.
//!
//! [`Migrating`] puts the store a sync is configured with (`current`) in front of the store
//! it may have used before (`previous`). When `current` loads an empty state for the scope,
//! `previous` is consulted; if it holds fingerprints for that scope, they are what the run
//! plans against, and they are written to `current` before its first checkpoint (or at
//! `finish` when nothing changed). Once `current` has finished the run, `previous` discards
//! its copy, so switching back later starts from the right state rather than a stale one.
//!
//! A crash after the import but before the discard leaves both copies: `current` is then no
//! longer empty and wins; the stale copy in `previous` only matters if the sync is switched
//! back, and costs resends, never lost rows. Dry runs import nothing (they commit nothing).

use async_trait::async_trait;

use super::stored_pairs::StoredPairs;
use super::warehouse::{WarehouseConfig, WarehouseStore};
use super::{
    Fingerprints, RejectedRow, RemoteDiff, Removed, RunLog, StateChange, StateError, StateStore, StoreDiff,
};
use crate::api::ReverseSyncSpec;
use crate::api::reverse_sync::{DEFAULT_STATE_SCHEMA, StateStoreKind};

/// The store a run uses. `home` is the store of the environment (File for local runs,
/// ConfigMap in the cluster); `state_url` the Warehouse store's connection URL.
///
/// - `store: Warehouse`: the warehouse tables, importing from `home` when they hold nothing.
/// - otherwise `home`, importing from the warehouse tables of the default schema (read with
///   the source's URL) when `home` holds nothing and the source is PostgreSQL or MySQL: the
///   way back after `state.store: Warehouse` was removed. Failing to read them is a warning.
///
/// In the warehouse a sync is `cluster/namespace/name` when `cluster` names the operator's
/// cluster ([`sync_id`]), so that clusters sharing a warehouse keep apart. Rows written before
/// the cluster was named (`namespace/name`) move to the cluster's key when its own hold
/// nothing (imported, then deleted like any previous store's).
pub fn choose(
    spec: &ReverseSyncSpec,
    namespace: &str,
    name: &str,
    cluster: Option<&str>,
    home: Box<dyn StateStore>,
    source_url: &str,
    state_url: Option<&str>,
) -> Box<dyn StateStore> {
    let id = sync_id(cluster, namespace, name);
    let legacy = sync_id(None, namespace, name);
    let state = spec.state.clone().unwrap_or_default();
    if state.store == StateStoreKind::Warehouse {
        let config = WarehouseConfig {
            url: state_url.unwrap_or(source_url).to_owned(),
            schema: state.schema_or_default().to_owned(),
            sync_id: id.clone(),
            sync_logs: state.sync_logs,
        };
        let previous: Box<dyn StateStore> = if id == legacy {
            home
        } else {
            let unnamed = WarehouseConfig {
                sync_id: legacy,
                sync_logs: false,
                ..config.clone()
            };
            Box::new(Migrating::new(
                Box::new(WarehouseStore::probe(unnamed)),
                home,
                false,
            ))
        };
        return Box::new(Migrating::new(
            Box::new(WarehouseStore::new(config)),
            previous,
            false,
        ));
    }
    let sync_id = id;
    let scheme = source_url.split_once("://").map(|(s, _)| s).unwrap_or("");
    if matches!(scheme, "postgres" | "postgresql" | "mysql" | "mariadb") {
        let config = WarehouseConfig {
            url: source_url.to_owned(),
            schema: DEFAULT_STATE_SCHEMA.to_owned(),
            sync_id,
            sync_logs: false,
        };
        return Box::new(Migrating::new(
            home,
            Box::new(WarehouseStore::probe(config)),
            true,
        ));
    }
    home
}

/// A sync's key in the warehouse tables: `cluster/namespace/name`, or `namespace/name` without
/// a cluster name (local runs, and clusters before they were named).
pub fn sync_id(cluster: Option<&str>, namespace: &str, name: &str) -> String {
    match cluster.filter(|c| !c.is_empty()) {
        Some(cluster) => format!("{cluster}/{namespace}/{name}"),
        None => format!("{namespace}/{name}"),
    }
}

/// A store that imports the state of a previous store when it has none.
pub struct Migrating {
    current: Box<dyn StateStore>,
    previous: Box<dyn StateStore>,
    /// A previous store that fails reads as empty (with a warning) rather than failing the run:
    /// used where the previous store is only a guess (switching back from the warehouse).
    lenient: bool,
    /// The imported state, until it is written to `current`.
    pending: Option<Fingerprints>,
    /// The previous store's state, read when `current` declined to diff on its own because
    /// it holds nothing: what `load` returns.
    preloaded: Option<Fingerprints>,
    imported: bool,
}

impl Migrating {
    /// `current` backed by `previous`; with `lenient`, failures of `previous` read as empty.
    pub fn new(current: Box<dyn StateStore>, previous: Box<dyn StateStore>, lenient: bool) -> Migrating {
        Migrating {
            current,
            previous,
            lenient,
            pending: None,
            preloaded: None,
            imported: false,
        }
    }

    /// The previous store's state for `scope`; empty when it has none (or, lenient, when it
    /// cannot be read).
    async fn previous_state(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        match self.previous.load(scope).await {
            Ok(p) => Ok(p),
            Err(e) if self.lenient => {
                tracing::warn!(error = %e, "failed to read the previous state store; every row will be sent");
                Ok(Fingerprints::default())
            }
            Err(e) => Err(e),
        }
    }

    async fn write_pending(&mut self, scope: &str) -> Result<(), StateError> {
        if let Some(set) = self.pending.take() {
            if let Err(e) = self.current.import(scope, &set).await {
                self.pending = Some(set);
                return Err(e);
            }
            tracing::info!(rows = set.len(), "imported the previous store's state");
            self.imported = true;
        }
        Ok(())
    }
}

#[async_trait]
impl StateStore for Migrating {
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError> {
        if let Some(previous) = self.preloaded.take() {
            self.pending = Some(previous.clone());
            return Ok(previous);
        }
        let set = self.current.load(scope).await?;
        if !set.is_empty() {
            return Ok(set);
        }
        let previous = self.previous_state(scope).await?;
        if previous.is_empty() {
            return Ok(set);
        }
        tracing::info!(
            rows = previous.len(),
            "the state store is empty: planning against the previous store's state"
        );
        self.pending = Some(previous.clone());
        Ok(previous)
    }

    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError> {
        self.write_pending(scope).await?;
        self.current.commit(scope, changes).await
    }

    async fn finish(&mut self, scope: &str) -> Result<(), StateError> {
        self.write_pending(scope).await?;
        self.current.finish(scope).await?;
        if self.imported {
            self.imported = false;
            if let Err(e) = self.previous.discard().await {
                tracing::warn!(error = %e, "failed to delete the previous store's state after importing it");
            }
        }
        Ok(())
    }

    fn logs_rejections(&self) -> bool {
        self.current.logs_rejections()
    }

    async fn cursor(&mut self, scope: &str) -> Result<Option<String>, StateError> {
        // A mark is not imported: the first run in a new store reads the whole model.
        self.current.cursor(scope).await
    }

    async fn commit_cursor(&mut self, scope: &str, record: &str) -> Result<(), StateError> {
        self.write_pending(scope).await?;
        self.current.commit_cursor(scope, record).await
    }

    async fn record_rejections(&mut self, rejections: &[RejectedRow]) -> Result<(), StateError> {
        self.current.record_rejections(rejections).await
    }

    async fn end_run(&mut self, run: &RunLog) -> Result<(), StateError> {
        let _ = self
            .previous
            .end_run(&RunLog {
                dry_run: true,
                ..run.clone()
            })
            .await;
        self.current.end_run(run).await
    }

    async fn discard(&mut self) -> Result<(), StateError> {
        self.current.discard().await
    }

    fn store_diff(&mut self) -> Option<&mut dyn StoreDiff> {
        if self.current.store_diff().is_some() {
            Some(self)
        } else {
            None
        }
    }
}

/// The current store diffs on its own, unless it holds nothing and the previous store has a
/// state to import: that run plans in memory against the imported state.
#[async_trait]
impl StoreDiff for Migrating {
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError> {
        let Some(current) = self.current.store_diff() else {
            return Ok(false);
        };
        if !current.begin(scope).await? {
            return Ok(false);
        }
        if current.holds_state(scope) {
            return Ok(true);
        }
        let previous = self.previous_state(scope).await?;
        if previous.is_empty() {
            return Ok(true);
        }
        tracing::info!(
            rows = previous.len(),
            "the state store is empty: planning against the previous store's state"
        );
        self.preloaded = Some(previous);
        Ok(false)
    }

    fn holds_state(&mut self, scope: &str) -> bool {
        self.preloaded.is_some() || self.current.store_diff().is_some_and(|p| p.holds_state(scope))
    }

    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError> {
        match self.current.store_diff() {
            Some(p) => p.stage(rows).await,
            None => Ok(()),
        }
    }

    fn removed_keys(&mut self, removed: Removed) {
        if let Some(current) = self.current.store_diff() {
            current.removed_keys(removed);
        }
    }

    fn stored_pairs(&mut self) -> Option<StoredPairs> {
        self.current.store_diff()?.stored_pairs()
    }

    async fn diff(&mut self, scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError> {
        match self.current.store_diff() {
            Some(p) => p.diff(scope, full_resync).await,
            None => Ok(RemoteDiff {
                all_added: true,
                ..RemoteDiff::default()
            }),
        }
    }
}
