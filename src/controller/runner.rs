//! One run of a sync inside the cluster: in the operator (InProcess) or in a Job's pod
//! (`backflow run --namespace NS --sync NAME`). Both record the outcome the same way: status,
//! Events and metrics.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use tokio_util::sync::CancellationToken;

use super::resolve::{ApiResolver, SecretAccess};
use super::schedule::Trigger;
use super::status::{self, Outcome, RunFlags};
use crate::api::ReverseSync;
use crate::api::reverse_sync::StateStoreKind;
use crate::destination::delivery::rate_limit::Limiters;
use crate::engine::progress::Progress;
use crate::engine::run::{RunOptions, SyncRun, run};
use crate::engine::setup::{self, CustomConnectors, SetupError};
use crate::metrics::{Metrics, Published};
use crate::state::configmap::{self, ConfigMapStore};

/// What a run in the cluster needs besides the sync.
#[derive(Clone)]
pub struct RunEnv {
    /// The API client.
    pub client: Client,
    /// Publishes Kubernetes Events.
    pub recorder: Recorder,
    /// Where run metrics go.
    pub metrics: Metrics,
    /// Rate limiters shared by every sync of a Destination in this process.
    pub limiters: std::sync::Arc<Limiters>,
    /// What the operator's flags allow runs.
    pub policy: RunPolicy,
    /// Connectors supplied instead of the Destinations' own (tests); empty otherwise.
    pub custom_connectors: CustomConnectors,
}

/// How often a run in flight writes its progress to the status unless a flag says otherwise
/// (`--progress-interval-seconds`): often enough to follow, rare enough for the API server.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// How often the live metrics of a run in flight move (at most; a shorter progress interval
/// moves them as often).
const METRICS_INTERVAL: Duration = Duration::from_secs(1);

/// What the operator's flags allow every run, in the operator and in Job pods alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPolicy {
    /// Which Secrets runs may read (`--secret-access`).
    pub secret_access: SecretAccess,
    /// Allow `sqlite://` sources and destinations (`--allow-sqlite`).
    pub allow_sqlite: bool,
    /// The cluster's name in shared warehouse state (`--cluster-name`); `None` keeps the
    /// `namespace/name` keys of unnamed clusters.
    pub cluster_name: Option<String>,
    /// How often a run in flight writes `status.progress` (`--progress-interval-seconds`).
    pub progress_interval: Duration,
}

impl Default for RunPolicy {
    fn default() -> Self {
        RunPolicy {
            secret_access: SecretAccess::default(),
            allow_sqlite: false,
            cluster_name: None,
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
        }
    }
}

impl RunEnv {
    /// The resolver runs and checks in this environment read objects through.
    pub fn resolver(&self) -> ApiResolver {
        ApiResolver::new(self.client.clone(), self.policy.secret_access)
            .with_custom_connectors(self.custom_connectors.clone())
            .allowing_sqlite(self.policy.allow_sqlite)
    }
}

/// Reasons of the Events a run publishes.
pub mod reasons {
    /// A run finished without failing.
    pub const SYNC_SUCCEEDED: &str = "SyncSucceeded";
    /// A run failed or could not start.
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// A run rejected rows.
    pub const ROWS_REJECTED: &str = "RowsRejected";
    /// The Destination failed its check or is missing.
    pub const DESTINATION_NOT_READY: &str = "DestinationNotReady";
    /// The delete limit held a run's deletes back.
    pub const DELETES_HELD_BACK: &str = super::super::status::DELETES_HELD_BACK;
    /// A Secret named in a spec does not grant its use to the object naming it.
    pub const SECRET_NOT_GRANTED: &str = "SecretNotGranted";
    /// The source's login holds privileges that escape the read-only transaction.
    pub const PRIVILEGED_SOURCE_USER: &str = super::super::status::PRIVILEGED_SOURCE_USER;
}

/// Publishes an Event about `reference`; a failure to publish is logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    warning: bool,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        // Events carry at most 1 kB of note.
        note: Some(note.chars().take(1000).collect()),
        action: "Sync".to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason, "failed to publish event");
    }
}

/// The store refused for this sync in a cluster, with the reason.
pub fn unsupported_store(sync: &ReverseSync) -> Option<&'static str> {
    match sync.spec.state.as_ref().map(|s| s.store).unwrap_or_default() {
        StateStoreKind::ConfigMap => None,
        StateStoreKind::File => {
            Some("spec.state.store File keeps state on local disk, which a cluster run loses; use ConfigMap")
        }
        StateStoreKind::Warehouse => None,
    }
}

/// A run that ended: how it went, and whether that is on the resource.
pub struct Executed {
    /// How the run went.
    pub outcome: Outcome,
    /// False when writing the outcome to the status failed (logged): deciding the next run
    /// from that status would start this one again.
    pub recorded: bool,
}

/// Runs `sync` once now and records the outcome on it. `how` says where it runs, for the
/// `Reconciling` message ("running in the operator", "running in Job x").
pub async fn execute(
    env: &RunEnv,
    sync: &ReverseSync,
    trigger: &Trigger,
    how: &str,
    cancel: CancellationToken,
) -> Executed {
    let mut recorded = true;
    let namespace = sync.namespace().unwrap_or_default();
    let name = sync.name_any();
    let generation = sync.metadata.generation.unwrap_or(0);
    let api: Api<ReverseSync> = Api::namespaced(env.client.clone(), &namespace);
    let reference = sync.object_ref(&());
    let privileged_before = sync
        .status
        .as_ref()
        .is_some_and(|s| super::conditions::is_true(&s.conditions, super::conditions::SOURCE_PRIVILEGED));
    let started = Utc::now();
    if let Err(e) = status::update(&api, &name, |s, _| {
        status::run_started(s, generation, trigger, how, started)
    })
    .await
    {
        tracing::warn!(error = %e, "failed to mark the run as started");
    }
    let flags = RunFlags {
        dry_run: sync.spec.dry_run,
        full_resync: super::schedule::full_resync(sync, trigger),
        full_diff: matches!(trigger, Trigger::Requested(_)),
    };
    tracing::info!(
        trigger = trigger.as_str(),
        full_resync = flags.full_resync,
        "run started"
    );
    let destination = &sync.spec.destination_ref.name;
    let progress = Arc::new(Progress::new());
    let stop_reporting = CancellationToken::new();
    let running = async {
        let result = run_once(env, sync, &namespace, &name, flags, cancel, Arc::clone(&progress)).await;
        stop_reporting.cancel();
        result
    };
    let reporting = report_progress(
        env,
        &api,
        RunKey {
            namespace: &namespace,
            name: &name,
            destination,
        },
        &progress,
        stop_reporting.clone(),
    );
    // The reporter has stopped before the run's end is written: no progress comes after it.
    let (result, mut published) = tokio::join!(running, reporting);
    let outcome = match result {
        Ok(report) => {
            let dry_run = flags.dry_run;
            let now = Utc::now();
            let written = status::update(&api, &name, |s, _| {
                status::run_finished(s, generation, trigger, &report, flags, now);
            });
            if let Err(e) = written.await {
                tracing::error!(error = %e, "failed to record the run");
                recorded = false;
            }
            if let Some(crate::source::Privileges::Elevated(found)) = &report.source_privileges
                && !privileged_before
            {
                // On the transition only; the condition stays while it holds.
                let note = status::privileged_message(found);
                publish(
                    &env.recorder,
                    &reference,
                    true,
                    reasons::PRIVILEGED_SOURCE_USER,
                    &note,
                )
                .await;
            }
            env.metrics
                .record_run(&namespace, &name, destination, &report, &mut published);
            if report.rows_rejected() > 0 {
                let first = report
                    .rejected_samples
                    .first()
                    .map(|r| format!("; first: key {} ({}): {}", r.key, r.operation, r.reason))
                    .unwrap_or_default();
                let note = format!("{} rows rejected{first}", report.rows_rejected());
                publish(&env.recorder, &reference, true, reasons::ROWS_REJECTED, &note).await;
            }
            let outcome = Outcome::of_run(&report, dry_run);
            if report.deletes_held_back() {
                publish(
                    &env.recorder,
                    &reference,
                    true,
                    reasons::DELETES_HELD_BACK,
                    &outcome.message,
                )
                .await;
            }
            outcome
        }
        Err(error) => {
            let outcome = Outcome::of_setup(&error);
            let now = Utc::now();
            let written = status::update(&api, &name, |s, _| {
                status::run_failed_before_report(s, generation, trigger, &outcome, started, now);
            });
            if let Err(e) = written.await {
                tracing::error!(error = %e, "failed to record the run");
                recorded = false;
            }
            env.metrics.record_failure(&namespace, &name);
            let reason = match error {
                SetupError::DestinationNotReady { .. } | SetupError::DestinationNotFound { .. } => {
                    Some(reasons::DESTINATION_NOT_READY)
                }
                SetupError::SecretNotGranted { .. } => Some(reasons::SECRET_NOT_GRANTED),
                _ => None,
            };
            if let Some(reason) = reason {
                publish(&env.recorder, &reference, true, reason, &error.to_string()).await;
            }
            outcome
        }
    };
    if outcome.failed {
        tracing::error!(reason = %outcome.reason, error = %outcome.message, "run failed");
        publish(
            &env.recorder,
            &reference,
            true,
            reasons::SYNC_FAILED,
            &outcome.message,
        )
        .await;
    } else {
        tracing::info!(reason = %outcome.reason, summary = %outcome.message, "run finished");
        publish(
            &env.recorder,
            &reference,
            false,
            reasons::SYNC_SUCCEEDED,
            &outcome.message,
        )
        .await;
    }
    Executed { outcome, recorded }
}

/// Records a run whose task panicked (the panic was caught): a failed run with reason
/// `InternalError` and a Warning Event; the panic's text goes to the log only.
pub async fn record_panic(
    env: &RunEnv,
    sync: &ReverseSync,
    trigger: &Trigger,
    panicked: &super::panics::Panicked,
    started: chrono::DateTime<Utc>,
) {
    let namespace = sync.namespace().unwrap_or_default();
    let name = sync.name_any();
    tracing::error!(panic = %panicked.0, "run panicked");
    let outcome = Outcome {
        reason: super::panics::INTERNAL_ERROR.to_owned(),
        message: panicked.public_message("run the sync"),
        failed: true,
        stalled: false,
    };
    let generation = sync.metadata.generation.unwrap_or(0);
    let api: Api<ReverseSync> = Api::namespaced(env.client.clone(), &namespace);
    let now = Utc::now();
    let written = status::update(&api, &name, |s, _| {
        status::run_failed_before_report(s, generation, trigger, &outcome, started, now);
    });
    if let Err(e) = written.await {
        tracing::error!(error = %e, "failed to record the run");
    }
    env.metrics.record_failure(&namespace, &name);
    publish(
        &env.recorder,
        &sync.object_ref(&()),
        true,
        reasons::SYNC_FAILED,
        &outcome.message,
    )
    .await;
}

/// Answers a requested preview (`backflow.dev/preview-requested-at`): plans the sync as it
/// stands without sending anything or changing state, and writes the plan, with `requested`
/// echoed, to `status.plan`. Returns false when that write failed (logged).
pub async fn preview(env: &RunEnv, sync: &ReverseSync, requested: &str, cancel: CancellationToken) -> bool {
    let namespace = sync.namespace().unwrap_or_default();
    let name = sync.name_any();
    let generation = sync.metadata.generation.unwrap_or(0);
    let api: Api<ReverseSync> = Api::namespaced(env.client.clone(), &namespace);
    tracing::info!(requested, "preview started");
    let flags = RunFlags {
        dry_run: true,
        full_resync: false,
        // As the next scheduled run would read the model (cursor mode: past the mark).
        full_diff: false,
    };
    // `setup::prepare` validates the spec first: an invalid one is answered with the reason.
    // A preview's progress is not reported: it writes no run.
    let result = run_once(
        env,
        sync,
        &namespace,
        &name,
        flags,
        cancel,
        Arc::new(Progress::new()),
    )
    .await;
    let now = Utc::now();
    let written = match &result {
        Ok(report) => {
            tracing::info!(
                add = report.plan.added,
                change = report.plan.changed,
                remove = report.plan.removed,
                "preview computed"
            );
            status::update(&api, &name, |s, _| {
                status::preview_finished(s, generation, requested, report, now);
            })
            .await
        }
        Err(error) => {
            tracing::warn!(error = %error, "preview failed");
            let message = error.to_string();
            status::update(&api, &name, |s, _| {
                status::preview_failed(s, generation, requested, &message, now);
            })
            .await
        }
    };
    match written {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "failed to record the preview");
            false
        }
    }
}

/// Answers a requested preview whose task panicked (the panic was caught) with a failed
/// preview, so the client waiting for it gets an answer; the panic's text goes to the log.
/// False when that write failed.
pub async fn record_preview_panic(
    env: &RunEnv,
    sync: &ReverseSync,
    requested: &str,
    panicked: &super::panics::Panicked,
) -> bool {
    tracing::error!(panic = %panicked.0, "preview panicked");
    let api: Api<ReverseSync> = Api::namespaced(env.client.clone(), &sync.namespace().unwrap_or_default());
    let generation = sync.metadata.generation.unwrap_or(0);
    let message = panicked.public_message("preview the sync");
    let now = Utc::now();
    let name = sync.name_any();
    let written = status::update(&api, &name, |s, _| {
        status::preview_failed(s, generation, requested, &message, now);
    });
    match written.await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "failed to record the preview");
            false
        }
    }
}

/// Which run a progress report is about (metric labels, the object written).
struct RunKey<'a> {
    namespace: &'a str,
    name: &'a str,
    destination: &'a str,
}

/// Publishes the progress of the run in flight until `stop`: live metrics every second (or
/// the progress interval when shorter), `status.progress` every progress interval. A failed
/// write is logged and the run goes on. Returns what the metrics got, for the run's end.
async fn report_progress(
    env: &RunEnv,
    api: &Api<ReverseSync>,
    key: RunKey<'_>,
    progress: &Progress,
    stop: CancellationToken,
) -> Published {
    let interval = env.policy.progress_interval.max(Duration::from_millis(10));
    let tick = interval.min(METRICS_INTERVAL);
    let mut published = Published::default();
    let mut last_write = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return published,
            () = tokio::time::sleep(tick) => {}
        }
        let snapshot = progress.snapshot();
        env.metrics.record_progress(
            key.namespace,
            key.name,
            key.destination,
            &snapshot,
            &mut published,
        );
        if last_write.elapsed() + tick / 2 < interval {
            continue;
        }
        last_write = tokio::time::Instant::now();
        let now = Utc::now();
        let written = status::update(api, key.name, |s, _| status::progress(s, &snapshot, now));
        // A slow API server never holds the run's end back: the write is dropped then. If it
        // still lands, it lands before the end's write reads the object (which then removes
        // the progress) or carries an older resourceVersion and is refused.
        tokio::select! {
            result = written => if let Err(e) = result {
                tracing::warn!(error = %e, "failed to write the run's progress; the run goes on");
            },
            () = stop.cancelled() => return published,
        }
    }
}

async fn run_once(
    env: &RunEnv,
    sync: &ReverseSync,
    namespace: &str,
    name: &str,
    flags: RunFlags,
    cancel: CancellationToken,
    progress: Arc<Progress>,
) -> Result<crate::engine::run::RunReport, SetupError> {
    if let Some(reason) = unsupported_store(sync) {
        return Err(SetupError::InvalidSync(reason.to_owned()));
    }
    let resolver = env.resolver();
    let dry_run = flags.dry_run;
    let prepared = setup::prepare(&resolver, namespace, sync, &env.limiters, !dry_run).await?;
    let owner = configmap::names::owner_reference(sync)
        .ok_or_else(|| SetupError::InvalidSync("the ReverseSync has no uid yet".to_owned()))?;
    let configmaps = Box::new(ConfigMapStore::new(env.client.clone(), namespace, name, owner));
    let mut store = crate::state::migrate::choose(
        &sync.spec,
        namespace,
        name,
        env.policy.cluster_name.as_deref(),
        configmaps,
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
    let options = RunOptions {
        dry_run,
        full_resync: flags.full_resync,
        cancel,
        progress,
        approved_deletes: sync.annotations().get(status::APPROVE_DELETES).cloned(),
        // A run a person asked for (`backflow.dev/requested-at`) reads the whole model.
        full_diff: flags.full_diff,
        ..RunOptions::default()
    };
    Ok(run(job, store.as_mut(), &options).await)
}
