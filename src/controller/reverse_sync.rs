//! The ReverseSync reconciler: decides when a sync runs, starts runs (in the operator or as
//! Jobs), keeps the status honest between runs, and cleans up on deletion.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Resource, ResourceExt};

use super::job::{self, JobState};
use super::runner::{self, reasons};
use super::schedule::{self, Trigger};
use super::status::{self, Outcome};
use super::{Context, ReconcileError, RunHandle, SyncKey};
use crate::api::ReverseSync;
use crate::api::reverse_sync::{ExecutionMode, StateStoreKind};
use crate::api::validation::validate_reverse_sync;
use crate::state::warehouse::{self, WarehouseConfig};

/// The finalizer that lets deletion cancel a run and remove the sync's state.
pub const FINALIZER: &str = "backflow.dev/cleanup";

/// Longest wait between two looks at a sync when nothing else wakes the controller.
const RESYNC: Duration = Duration::from_secs(600);

/// Reconciles one ReverseSync.
pub async fn reconcile(sync: Arc<ReverseSync>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let namespace = sync.namespace().unwrap_or_default();
    let api: Api<ReverseSync> = Api::namespaced(ctx.env.client.clone(), &namespace);
    let span = tracing::info_span!("reconcile", namespace = %namespace, sync = %sync.name_any());
    let work = finalizer(&api, FINALIZER, sync, |event| async {
        match event {
            FinalizerEvent::Apply(sync) => apply(sync, &ctx).await,
            FinalizerEvent::Cleanup(sync) => Ok(cleanup(sync, &ctx).await),
        }
    });
    tracing::Instrument::instrument(work, span)
        .await
        .map_err(|e| ReconcileError::Finalizer(e.to_string()))
}

async fn apply(sync: Arc<ReverseSync>, ctx: &Context) -> Result<Action, ReconcileError> {
    let key = SyncKey::of(&*sync);
    let api: Api<ReverseSync> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    let generation = sync.metadata.generation.unwrap_or(0);
    let now = Utc::now();
    let poked = ctx.take_poke(&key);
    let metrics = &ctx.env.metrics;
    let labels = [key.namespace.as_str(), key.name.as_str()];
    // A suspended sync has no period, so the staleness alert leaves it alone.
    match schedule::period(&sync, now).filter(|_| !sync.spec.suspend) {
        Some(p) => metrics
            .sync_schedule_period
            .with_label_values(&labels)
            .set(p.as_secs_f64()),
        None => {
            let _ = metrics.sync_schedule_period.remove_label_values(&labels);
        }
    }
    let ready = sync
        .status
        .as_ref()
        .is_some_and(|s| super::conditions::is_true(&s.conditions, super::conditions::READY));
    if sync.spec.suspend {
        let _ = metrics.sync_ready.remove_label_values(&labels);
    } else {
        metrics
            .sync_ready
            .with_label_values(&labels)
            .set(i64::from(ready));
    }

    if ctx.runs.is_running(&key) {
        // The run task records its end, which changes the status and wakes this again.
        return Ok(Action::requeue(RESYNC));
    }
    if let Some(job_name) = sync.status.as_ref().and_then(|s| s.active_job.clone())
        && let Some(action) = follow_job(&sync, &job_name, ctx).await?
    {
        return Ok(action);
    }
    if let Err(e) = validate_reverse_sync(&sync.spec) {
        let message = e.to_string();
        write(&api, &key, |s, _| {
            status::stalled(s, generation, "InvalidSpec", &message, now)
        })
        .await?;
        return Ok(Action::await_change());
    }
    if let Some(reason) = runner::unsupported_store(&sync) {
        write(&api, &key, |s, _| {
            status::stalled(s, generation, "UnsupportedStateStore", reason, now)
        })
        .await?;
        return Ok(Action::await_change());
    }
    if sync.spec.execution.as_ref().map(|e| e.mode) == Some(ExecutionMode::Job)
        && let Err(e) = job::check_overrides(&sync, &ctx.job_defaults)
    {
        let message = e.to_string();
        write(&api, &key, |s, _| {
            status::stalled(s, generation, e.category(), &message, now)
        })
        .await?;
        return Ok(Action::await_change());
    }
    if sync.spec.suspend {
        write(&api, &key, |s, _| status::suspended(s, generation, now)).await?;
        return Ok(Action::await_change());
    }

    // Read fresh: the watch that wakes this sync for an upstream's success can come before
    // the cache holds that success.
    let mut upstream: Vec<schedule::Upstream> = Vec::new();
    for name in sync.spec.schedule.iter().flat_map(|s| s.after.iter()) {
        let found = api
            .get_opt(name)
            .await
            .map_err(|e| ReconcileError::Kube(format!("failed to read ReverseSync {name}: {e}")))?;
        let succeeded = found
            .and_then(|s| s.status)
            .and_then(|s| s.last_successful_sync_time)
            .and_then(|t| schedule::parse_time(&t));
        upstream.push((name.clone(), succeeded));
    }
    let mut decision = schedule::decide(&sync, &upstream, now);
    if decision.run.is_none() && poked && sync.status.as_ref().is_some_and(|s| s.consecutive_failures > 0) {
        // A Destination or Secret it uses changed: the failure may be fixed.
        decision.run = Some(Trigger::Retry);
    }
    let next = decision.next_scheduled.map(status::rfc3339);
    let waiting = decision.waiting_for.clone();
    write(&api, &key, |s, _| {
        s.next_sync_time = next.clone();
        if !waiting.is_empty() && s.last_run.is_some() {
            super::conditions::set(
                &mut s.conditions,
                super::conditions::RECONCILING,
                super::conditions::Status::False,
                "WaitingForUpstream",
                &format!("waiting for {} to succeed (schedule.after)", waiting.join(", ")),
                Some(generation),
                now,
            );
        }
    })
    .await?;

    let Some(trigger) = decision.run else {
        let wait = decision
            .wake_at
            .and_then(|t| (t - now).to_std().ok())
            .map_or(RESYNC, |d| d.min(RESYNC) + Duration::from_millis(50));
        return Ok(Action::requeue(wait));
    };
    start(sync, trigger, ctx).await?;
    Ok(Action::requeue(RESYNC))
}

/// Writes a status change; a sync deleted meanwhile is not an error.
async fn write(
    api: &Api<ReverseSync>,
    key: &SyncKey,
    change: impl Fn(&mut crate::api::ReverseSyncStatus, &ReverseSync),
) -> Result<(), ReconcileError> {
    status::update(api, &key.name, change)
        .await
        .map(|_| ())
        .map_err(|e| ReconcileError::Kube(e.to_string()))
}

async fn start(sync: Arc<ReverseSync>, trigger: Trigger, ctx: &Context) -> Result<(), ReconcileError> {
    let mode = sync.spec.execution.as_ref().map(|e| e.mode).unwrap_or_default();
    match mode {
        ExecutionMode::InProcess => {
            start_in_process(sync, trigger, ctx);
            Ok(())
        }
        ExecutionMode::Job => start_job(&sync, &trigger, ctx).await,
    }
}

fn start_in_process(sync: Arc<ReverseSync>, trigger: Trigger, ctx: &Context) {
    let key = SyncKey::of(&*sync);
    let Some(handle) = ctx.runs.register(&key, &ctx.shutdown) else {
        return;
    };
    let env = ctx.env.clone();
    let pool = Arc::clone(&ctx.pool);
    let runs = ctx.runs.clone();
    let span = tracing::info_span!(
        "run",
        namespace = %key.namespace,
        sync = %key.name,
        run_id = %uuid::Uuid::new_v4()
    );
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let RunHandle { cancel, .. } = handle;
            let permit = tokio::select! {
                p = pool.acquire_owned() => p.ok(),
                _ = cancel.cancelled() => None,
            };
            if let Some(_permit) = permit {
                env.metrics.runs_in_flight.inc();
                runner::execute(&env, &sync, &trigger, "running in the operator", cancel).await;
                env.metrics.runs_in_flight.dec();
            }
            runs.finish(&key);
        },
        span,
    ));
}

async fn start_job(sync: &ReverseSync, trigger: &Trigger, ctx: &Context) -> Result<(), ReconcileError> {
    let key = SyncKey::of(sync);
    let job = job::build(sync, trigger, &ctx.job_defaults);
    let job_name = job.metadata.name.clone().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    match jobs.create(&PostParams::default(), &job).await {
        Ok(_) => tracing::info!(job = %job_name, trigger = trigger.as_str(), "run Job created"),
        Err(kube::Error::Api(e)) if e.code == 409 => {
            tracing::debug!(job = %job_name, "run Job exists already");
        }
        Err(e) => {
            return Err(ReconcileError::Kube(format!(
                "failed to create Job {job_name}: {e}"
            )));
        }
    }
    let api: Api<ReverseSync> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    let generation = sync.metadata.generation.unwrap_or(0);
    let now = Utc::now();
    let how = format!("running in Job {job_name}");
    write(&api, &key, |s, _| {
        status::run_started(s, generation, trigger, &how, now);
        s.active_job = Some(job_name.clone());
    })
    .await
}

/// Follows the Job of the run in flight. `Some(action)` while it runs; `None` once it is
/// finished and reflected (the caller goes on deciding the next run).
async fn follow_job(
    sync: &ReverseSync,
    job_name: &str,
    ctx: &Context,
) -> Result<Option<Action>, ReconcileError> {
    let key = SyncKey::of(sync);
    let jobs: Api<Job> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    let found = jobs
        .get_opt(job_name)
        .await
        .map_err(|e| ReconcileError::Kube(format!("failed to read Job {job_name}: {e}")))?;
    let (state, created) = match &found {
        Some(j) => (job::state(j), j.metadata.creation_timestamp.clone()),
        None => (
            JobState::Failed("the Job was deleted before it finished".to_owned()),
            None,
        ),
    };
    if state == JobState::Running {
        return Ok(Some(Action::requeue(RESYNC)));
    }
    let api: Api<ReverseSync> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    let generation = sync.metadata.generation.unwrap_or(0);
    let now = Utc::now();
    let created = created.map(|t| t.0.as_millisecond());
    if let JobState::Failed(reason) = &state {
        // The pod records its own run; a Job that failed without recording one (it could not
        // start, ran out of memory, hit its deadline) is recorded here.
        let recorded = sync
            .status
            .as_ref()
            .and_then(|s| s.last_run.as_ref())
            .and_then(|r| schedule::parse_time(&r.start))
            .is_some_and(|start| created.is_some_and(|c| start.timestamp_millis() >= c - 1000));
        if !recorded {
            let outcome = Outcome {
                reason: "JobFailed".to_owned(),
                message: format!("run Job {job_name} failed: {reason}"),
                failed: true,
                stalled: false,
            };
            let trigger = Trigger::Retry;
            let started = created
                .and_then(chrono::DateTime::from_timestamp_millis)
                .unwrap_or(now);
            write(&api, &key, |s, _| {
                status::run_failed_before_report(s, generation, &trigger, &outcome, started, now);
            })
            .await?;
            ctx.env.metrics.record_failure(&key.namespace, &key.name);
            runner::publish(
                &ctx.env.recorder,
                &sync.object_ref(&()),
                true,
                reasons::SYNC_FAILED,
                &outcome.message,
            )
            .await;
        }
    }
    write(&api, &key, |s, _| {
        if s.active_job.as_deref() == Some(job_name) {
            s.active_job = None;
        }
    })
    .await?;
    Ok(None)
}

/// Deletion: cancel the run in flight, delete its Job and the sync's state. Errors are logged
/// and never block the deletion.
async fn cleanup(sync: Arc<ReverseSync>, ctx: &Context) -> Action {
    let key = SyncKey::of(&*sync);
    tracing::info!("sync deleted: cancelling its run and removing its state");
    ctx.runs.cancel_and_wait(&key, Duration::from_secs(20)).await;
    if let Some(job_name) = sync.status.as_ref().and_then(|s| s.active_job.clone()) {
        let jobs: Api<Job> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
        let params = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        if let Err(e) = jobs.delete(&job_name, &params).await {
            tracing::warn!(job = %job_name, error = %e, "failed to delete the run Job");
        }
    }
    if let Err(e) =
        crate::state::configmap::delete_all(ctx.env.client.clone(), &key.namespace, &key.name).await
    {
        tracing::warn!(error = %e, "failed to delete the sync's state; its ConfigMaps are owned by the sync and garbage-collected");
    }
    if sync.spec.state.as_ref().map(|s| s.store) == Some(StateStoreKind::Warehouse) {
        delete_warehouse_state(&sync, &key, ctx).await;
    }
    ctx.env.metrics.forget_sync(&key.namespace, &key.name);
    Action::await_change()
}

/// Longest time the finalizer spends deleting a sync's rows from the warehouse.
const WAREHOUSE_CLEANUP_TIMEOUT: Duration = Duration::from_secs(15);

/// Deletes a deleted `Warehouse`-store sync's rows from `backflow_state` and `backflow_syncs`
/// (its sync logs stay: they are history), through the state connection
/// (`spec.state.connectionSecretRef`, else the source's Secret). Bounded by a timeout; a
/// failure is logged and never holds the finalizer, leaving the rows for a person to delete.
async fn delete_warehouse_state(sync: &ReverseSync, key: &SyncKey, ctx: &Context) {
    let state = sync.spec.state.clone().unwrap_or_default();
    let sync_id = format!("{}/{}", key.namespace, key.name);
    let left = format!(
        "its rows stay in schema {:?}: DELETE FROM backflow_state and backflow_syncs WHERE sync_id = '{sync_id}'",
        state.schema_or_default()
    );
    let resolver = super::resolve::ApiResolver::new(ctx.env.client.clone());
    let work = async {
        let url = crate::engine::setup::warehouse_state_url(&resolver, &key.namespace, &sync.spec)
            .await
            .map_err(|e| e.to_string())?;
        let config = WarehouseConfig {
            url,
            schema: state.schema_or_default().to_owned(),
            sync_id: sync_id.clone(),
            sync_logs: false,
        };
        warehouse::delete_sync_state(&config)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(WAREHOUSE_CLEANUP_TIMEOUT, work).await {
        Ok(Ok(rows)) => tracing::info!(rows, "deleted the sync's state from the warehouse"),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "failed to delete the sync's state from the warehouse; {left}");
        }
        Err(_) => tracing::warn!(
            timeout_seconds = WAREHOUSE_CLEANUP_TIMEOUT.as_secs(),
            "timed out deleting the sync's state from the warehouse; {left}"
        ),
    }
}
