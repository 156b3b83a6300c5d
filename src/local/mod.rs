//! Local runs (`backflow run -f`): syncs from manifests, without a cluster, with state in a
//! local directory.

pub mod manifests;
pub mod output;
pub mod secrets;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::validation::{validate_destination, validate_reverse_sync};
use crate::api::{Destination, ReverseSync};
use crate::destination::delivery::rate_limit::Limiters;
use crate::destination::delivery::{Delivery, DeliveryConfig};
use crate::engine::run::{Progress, RunOptions, RunReport, SyncRun, run};
use crate::state::file::FileStore;
use manifests::Manifests;

/// What `backflow run -f` was asked to do.
#[derive(Debug, Clone)]
pub struct LocalRunConfig {
    /// Files and directories of manifests.
    pub paths: Vec<PathBuf>,
    /// Directory of the File state store.
    pub state_dir: PathBuf,
    /// Plan only.
    pub dry_run: bool,
    /// Ignore stored fingerprints for this run.
    pub full_resync: bool,
    /// Run only the syncs with these names (all when empty).
    pub only: Vec<String>,
    /// Commit a checkpoint after this many settled records.
    pub checkpoint_records: usize,
}

/// The outcome of one sync of a local run.
#[derive(Debug)]
pub struct SyncOutcome {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The engine's report, when the sync got as far as running.
    pub report: Option<RunReport>,
    /// The error that stopped the sync before or during its run.
    pub error: Option<String>,
}

impl SyncOutcome {
    /// True when the sync failed (a setup error, a run error, or rows that failed delivery).
    pub fn failed(&self) -> bool {
        self.error.is_some()
            || self
                .report
                .as_ref()
                .is_some_and(|r| r.result == crate::engine::run::RunResult::Failed)
    }
}

/// Errors that stop a local run before any sync runs.
#[derive(Debug, thiserror::Error)]
pub enum LocalRunError {
    /// The manifests could not be loaded.
    #[error(transparent)]
    Manifests(#[from] manifests::ManifestError),
    /// `--sync` named a sync that is not in the manifests.
    #[error("failed to find ReverseSync {0:?} in the manifests")]
    UnknownSync(String),
}

/// Runs every sync of the manifests once, in name order.
pub async fn run_local(
    config: &LocalRunConfig,
    cancel: CancellationToken,
    progress: impl Fn(&str) -> Arc<dyn Progress>,
) -> Result<Vec<SyncOutcome>, LocalRunError> {
    let manifests = manifests::load(&config.paths)?;
    for only in &config.only {
        if !manifests.syncs.keys().any(|(_, n)| n == only) {
            return Err(LocalRunError::UnknownSync(only.clone()));
        }
    }
    let limiters = Limiters::default();
    let mut outcomes = Vec::new();
    for ((namespace, name), sync) in &manifests.syncs {
        if !config.only.is_empty() && !config.only.contains(name) {
            continue;
        }
        if cancel.is_cancelled() {
            break;
        }
        let span =
            tracing::info_span!("sync", namespace = %namespace, sync = %name, run_id = %uuid::Uuid::new_v4());
        let _entered = span.enter();
        let options = RunOptions {
            dry_run: config.dry_run,
            full_resync: config.full_resync,
            checkpoint_records: config.checkpoint_records.max(1),
            cancel: cancel.clone(),
            progress: progress(name),
            ..RunOptions::default()
        };
        let outcome = match run_one(&manifests, namespace, sync, config, &limiters, &options).await {
            Ok(report) => SyncOutcome {
                namespace: namespace.clone(),
                name: name.clone(),
                error: report.error.as_ref().map(ToString::to_string),
                report: Some(report),
            },
            Err(error) => {
                tracing::error!(error = %error, "sync could not start");
                SyncOutcome {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    report: None,
                    error: Some(error),
                }
            }
        };
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

async fn run_one(
    manifests: &Manifests,
    namespace: &str,
    sync: &ReverseSync,
    config: &LocalRunConfig,
    limiters: &Limiters,
    options: &RunOptions,
) -> Result<RunReport, String> {
    let spec = &sync.spec;
    validate_reverse_sync(spec).map_err(|e| format!("invalid ReverseSync: {e}"))?;
    let dest_name = &spec.destination_ref.name;
    let destination: &Destination = manifests
        .destinations
        .get(&(namespace.to_owned(), dest_name.clone()))
        .ok_or_else(|| format!("failed to find Destination {dest_name:?} in namespace {namespace:?}"))?;
    validate_destination(&destination.spec).map_err(|e| format!("invalid Destination {dest_name:?}: {e}"))?;
    let source_ref = &spec.source.connection_secret_ref;
    let source_secret = secrets::resolve(manifests, namespace, &source_ref.name)?;
    let source_key = source_ref.key.as_deref().unwrap_or("url");
    let source_url = source_secret
        .get(source_key)
        .ok_or_else(|| {
            format!(
                "failed to read key {source_key:?} of Secret {:?}: no such key",
                source_ref.name
            )
        })?
        .to_owned();
    let dest_secret = match &destination.spec.credentials_secret_ref {
        Some(r) => Some(secrets::resolve(manifests, namespace, &r.name)?),
        None => None,
    };
    let connector = crate::destination::build(&destination.spec, dest_secret.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    let caps = connector.capabilities();
    let delivery_config = DeliveryConfig::resolve(&destination.spec, &caps)
        .map_err(|e| format!("invalid Destination {dest_name:?}: {e}"))?;
    let limiter = limiters.get(
        &format!("{namespace}/{dest_name}"),
        delivery_config.requests_per_second,
        delivery_config.burst,
    );
    if !options.dry_run {
        connector
            .check()
            .await
            .map_err(|e| format!("Destination {dest_name:?} is not ready: {e}"))?;
    }
    let name = sync.metadata.name.as_deref().unwrap_or_default();
    let mut store = FileStore::new(&config.state_dir, namespace, name);
    let job = SyncRun {
        namespace,
        name,
        spec,
        source_url: &source_url,
        delivery: Delivery::new(connector, limiter, delivery_config),
        scope: destination_scope(namespace, destination),
    };
    Ok(run(job, &mut store, options).await)
}

/// What a sync's fingerprints are about: the destination's name and target.
fn destination_scope(namespace: &str, destination: &Destination) -> String {
    let name = destination.metadata.name.as_deref().unwrap_or_default();
    format!("{namespace}/{name}/{}", destination.spec.target())
}
