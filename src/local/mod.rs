//! Local runs (`backflow run -f`): syncs from manifests, without a cluster, with state in a
//! local directory.

pub mod manifests;
pub mod output;
pub mod secrets;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::api::{Destination, ReverseSync};
use crate::destination::delivery::rate_limit::Limiters;
use crate::engine::progress::Progress;
use crate::engine::run::{RunOptions, RunReport, SyncRun, run};
use crate::engine::setup::{self, Resolver, SecretUser, SetupError};
use crate::model::secret::SecretData;
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
    /// Syncs with a cursor: read the whole model and diff it.
    pub full_diff: bool,
    /// Run only the syncs with these names (all when empty).
    pub only: Vec<String>,
    /// Commit a checkpoint after this many settled records.
    pub checkpoint_records: usize,
    /// The plan id of deletes past a sync's delete limit to let through once.
    pub approve_deletes: Option<String>,
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
    /// True when the sync failed (a setup error, a run error, rows that failed delivery, or
    /// deletes held back by the delete limit, in a dry run too).
    pub fn failed(&self) -> bool {
        self.error.is_some()
            || self
                .report
                .as_ref()
                .is_some_and(|r| r.result == crate::engine::run::RunResult::Failed || r.deletes_held_back())
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

/// Runs every sync of the manifests once, in name order; `show` displays each sync's
/// progress while its run lives (the view is dropped when the run ends).
pub async fn run_local<V>(
    config: &LocalRunConfig,
    cancel: CancellationToken,
    show: impl Fn(&str, Arc<Progress>) -> V,
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
        let progress = Arc::new(Progress::new());
        let view = show(name, Arc::clone(&progress));
        let options = RunOptions {
            dry_run: config.dry_run,
            full_resync: config.full_resync,
            full_diff: config.full_diff,
            checkpoint_records: config.checkpoint_records.max(1),
            cancel: cancel.clone(),
            progress,
            approved_deletes: config.approve_deletes.clone(),
            ..RunOptions::default()
        };
        let ran = run_one(&manifests, namespace, sync, config, &limiters, &options).await;
        drop(view);
        let outcome = match ran {
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
                    error: Some(error.to_string()),
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
) -> Result<RunReport, SetupError> {
    let prepared = setup::prepare(manifests, namespace, sync, limiters, !options.dry_run).await?;
    let name = sync.metadata.name.as_deref().unwrap_or_default();
    let file = Box::new(FileStore::new(&config.state_dir, namespace, name));
    // Local runs are keyed `namespace/name` in a warehouse: they belong to no cluster.
    let mut store = crate::state::migrate::choose(
        &sync.spec,
        namespace,
        name,
        None,
        file,
        &prepared.source_url,
        prepared.state_url.as_deref(),
    );
    let job = SyncRun {
        namespace,
        name,
        spec: &sync.spec,
        source_url: &prepared.source_url,
        source_credentials: prepared.source_credentials,
        delivery: prepared.destination.delivery,
        scope: prepared.scope,
    };
    Ok(run(job, store.as_mut(), options).await)
}

#[async_trait::async_trait]
impl Resolver for Manifests {
    async fn destination(&self, namespace: &str, name: &str) -> Result<Destination, SetupError> {
        self.destinations
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
            .ok_or_else(|| SetupError::DestinationNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
    }

    /// Local runs do not check Secret grants: the person running them owns the manifests
    /// and the environment the Secrets come from.
    async fn secret(
        &self,
        namespace: &str,
        name: &str,
        _user: &SecretUser,
    ) -> Result<SecretData, SetupError> {
        secrets::resolve(self, namespace, name)
    }
}

#[cfg(test)]
mod tests {
    use super::manifests::{Manifests, load_text};
    use crate::destination::delivery::rate_limit::Limiters;
    use crate::engine::setup::prepare;

    #[tokio::test]
    async fn the_source_secret_s_other_keys_reach_the_source_and_its_url_key_does_not() {
        let mut manifests = Manifests::default();
        load_text(
            r#"
apiVersion: v1
kind: Secret
metadata: {name: snowflake}
stringData:
  dsn: snowflake://LOADER@acme/DB/SCHEMA?warehouse=WH
  private_key: "-----BEGIN PRIVATE KEY-----"
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {name: hook}
spec: {type: http, http: {url: "http://127.0.0.1:1/upsert"}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {name: s}
spec:
  source: {connectionSecretRef: {name: snowflake, key: dsn}, query: "SELECT 1 AS id", primaryKey: [id]}
  destinationRef: {name: hook}
  mappings: [{from: id, to: id}]
"#,
            "test",
            &mut manifests,
        )
        .unwrap();
        let sync = manifests.syncs.values().next().unwrap().clone();
        let namespace = manifests.syncs.keys().next().unwrap().0.clone();
        let prepared = prepare(&manifests, &namespace, &sync, &Limiters::default(), false)
            .await
            .unwrap();
        assert_eq!(
            prepared.source_url,
            "snowflake://LOADER@acme/DB/SCHEMA?warehouse=WH"
        );
        assert_eq!(
            prepared.source_credentials.get("private_key"),
            Some("-----BEGIN PRIVATE KEY-----")
        );
        assert_eq!(prepared.source_credentials.get("dsn"), None);
        assert!(!format!("{:?}", prepared.source_credentials).contains("BEGIN"));
    }
}
