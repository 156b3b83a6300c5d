//! The ReverseSync reconciler: decides when a sync runs, starts runs (in the operator or as
//! Jobs), keeps the status honest between runs, and cleans up on deletion.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PostParams, PropagationPolicy};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Resource, ResourceExt};

use super::job::{self, JobState};
use super::panics::{self, OnDrop};
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

/// Reconciles one ReverseSync. A panic fails this sync alone: `Ready=False` with reason
/// `InternalError`, a Warning Event, and a retry with backoff.
pub async fn reconcile(sync: Arc<ReverseSync>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let object = Arc::clone(&sync);
    match panics::catch(reconcile_unguarded(sync, Arc::clone(&ctx))).await {
        Ok(result) => result,
        Err(panicked) => {
            let key = SyncKey::of(&*object);
            tracing::error!(namespace = %key.namespace, sync = %key.name, panic = %panicked.0, "reconcile panicked");
            let message = panicked.public_message("reconcile the ReverseSync");
            let api: Api<ReverseSync> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
            let generation = object.metadata.generation.unwrap_or(0);
            let now = Utc::now();
            if let Err(e) = write(&api, &key, |s, _| {
                status::internal_error(s, generation, &message, now)
            })
            .await
            {
                tracing::warn!(error = %e, "failed to record the internal error");
            }
            runner::publish(
                &ctx.env.recorder,
                &object.object_ref(&()),
                true,
                panics::INTERNAL_ERROR,
                &message,
            )
            .await;
            Err(ReconcileError::Panicked(message))
        }
    }
}

async fn reconcile_unguarded(sync: Arc<ReverseSync>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
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
    if schedule::preview_requested(&sync).is_some() {
        // Read fresh: the cache can still miss the plan of the preview that just ended.
        let fresh = api
            .get(&key.name)
            .await
            .map_err(|e| ReconcileError::Kube(format!("failed to read ReverseSync {}: {e}", key.name)))?;
        if let Some(requested) = schedule::preview_requested(&fresh) {
            start_in_process(Arc::new(fresh), Work::Preview(requested), ctx);
            return Ok(Action::requeue(RESYNC));
        }
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
    let decide = |sync: &ReverseSync| {
        let mut decision = schedule::decide(sync, &upstream, now);
        if decision.run.is_none() && poked && sync.status.as_ref().is_some_and(|s| s.consecutive_failures > 0)
        {
            // A Destination or Secret it uses changed: the failure may be fixed.
            decision.run = Some(Trigger::Retry);
        }
        decision
    };
    let decision = decide(&sync);
    let next = decision.next_scheduled.map(status::rfc3339);
    let waiting = decision.waiting_for.clone();
    write(&api, &key, |s, _| {
        s.next_sync_time = next.clone();
        if !waiting.is_empty() {
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

    if decision.run.is_none() {
        return Ok(requeue_for(&decision, now));
    }
    // The cache can lag behind this operator's own status writes (the end of the run that
    // woke this, or its start): decide again on a fresh read, so no run starts twice.
    let sync = Arc::new(
        api.get(&key.name)
            .await
            .map_err(|e| ReconcileError::Kube(format!("failed to read ReverseSync {}: {e}", key.name)))?,
    );
    let again = decide(&sync);
    let Some(trigger) = again.run.clone() else {
        return Ok(requeue_for(&again, now));
    };
    if let Some(action) = start(sync, trigger, ctx).await? {
        return Ok(action);
    }
    Ok(Action::requeue(RESYNC))
}

/// Look again when the schedule or a retry is due, at the latest after [`RESYNC`].
fn requeue_for(decision: &schedule::Decision, now: chrono::DateTime<Utc>) -> Action {
    let wait = decision
        .wake_at
        .and_then(|t| (t - now).to_std().ok())
        .map_or(RESYNC, |d| d.min(RESYNC) + Duration::from_millis(50));
    Action::requeue(wait)
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

/// Starts a run. `Some(action)` when it cannot start yet (the cause is on the status).
async fn start(
    sync: Arc<ReverseSync>,
    trigger: Trigger,
    ctx: &Context,
) -> Result<Option<Action>, ReconcileError> {
    let mode = sync.spec.execution.as_ref().map(|e| e.mode).unwrap_or_default();
    match mode {
        ExecutionMode::InProcess => {
            start_in_process(sync, Work::Run(trigger), ctx);
            Ok(None)
        }
        ExecutionMode::Job => start_job(&sync, &trigger, ctx).await,
    }
}

/// How often a Job-mode sync blocked by its environment (a missing ServiceAccount, a Job
/// without a pod) looks again: nothing the operator watches says when that is fixed.
const JOB_BLOCKED_RECHECK: Duration = Duration::from_secs(15);

/// Says on the sync, once per new cause, why its Job-mode run cannot go on: a condition
/// (`Ready=False`, with `Stalled=True` when the run did not start) and a Warning Event.
async fn report_job_blocked(
    sync: &ReverseSync,
    blocked: &job::Blocked,
    started: bool,
    ctx: &Context,
) -> Result<(), ReconcileError> {
    let key = SyncKey::of(sync);
    let api: Api<ReverseSync> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    let generation = sync.metadata.generation.unwrap_or(0);
    let now = Utc::now();
    let message = blocked.message();
    let already = sync
        .status
        .as_ref()
        .and_then(|s| super::conditions::get(&s.conditions, super::conditions::READY))
        .is_some_and(|c| c.reason == blocked.reason && c.message == message);
    if already {
        return Ok(());
    }
    tracing::warn!(reason = blocked.reason, error = %message, "the Job-mode run is blocked");
    write(&api, &key, |s, _| {
        if started {
            super::conditions::set(
                &mut s.conditions,
                super::conditions::READY,
                super::conditions::Status::False,
                blocked.reason,
                &message,
                Some(generation),
                now,
            );
        } else {
            status::stalled(s, generation, blocked.reason, &message, now);
        }
    })
    .await?;
    runner::publish(
        &ctx.env.recorder,
        &sync.object_ref(&()),
        true,
        blocked.reason,
        &message,
    )
    .await;
    Ok(())
}

/// What a task on the operator's pool does for a sync.
enum Work {
    /// A run, recorded on the status.
    Run(Trigger),
    /// A requested preview (the annotation's value), written to `status.plan` only. Previews
    /// run in the operator whatever the execution mode: they send nothing and keep no state.
    Preview(String),
}

fn start_in_process(sync: Arc<ReverseSync>, work: Work, ctx: &Context) {
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
            // However the task ends (a panic included), the sync's slot is released. An end
            // that is not on the status would read as "never ran": then the next decision is
            // left to the resync rather than starting the same run again at once.
            let recorded = Arc::new(AtomicBool::new(true));
            let _slot = OnDrop::new({
                let key = key.clone();
                let recorded = Arc::clone(&recorded);
                move || runs.finish(&key, recorded.load(Ordering::SeqCst))
            });
            let RunHandle { cancel, .. } = handle;
            let permit = tokio::select! {
                p = pool.acquire_owned() => p.ok(),
                _ = cancel.cancelled() => None,
            };
            let Some(_permit) = permit else { return };
            match work {
                Work::Run(trigger) => {
                    env.metrics.runs_in_flight.inc();
                    let _in_flight = OnDrop::new(|| env.metrics.runs_in_flight.dec());
                    let started = Utc::now();
                    let run = runner::execute(&env, &sync, &trigger, "running in the operator", cancel);
                    match panics::catch(run).await {
                        Ok(executed) => recorded.store(executed.recorded, Ordering::SeqCst),
                        Err(panicked) => {
                            runner::record_panic(&env, &sync, &trigger, &panicked, started).await;
                        }
                    }
                }
                Work::Preview(requested) => {
                    let preview = runner::preview(&env, &sync, &requested, cancel);
                    match panics::catch(preview).await {
                        Ok(written) => recorded.store(written, Ordering::SeqCst),
                        Err(panicked) => {
                            let written =
                                runner::record_preview_panic(&env, &sync, &requested, &panicked).await;
                            recorded.store(written, Ordering::SeqCst);
                        }
                    }
                }
            }
        },
        span,
    ));
}

async fn start_job(
    sync: &ReverseSync,
    trigger: &Trigger,
    ctx: &Context,
) -> Result<Option<Action>, ReconcileError> {
    let key = SyncKey::of(sync);
    let job = job::build(sync, trigger, &ctx.job_defaults, &ctx.env.policy);
    let job_name = job.metadata.name.clone().unwrap_or_default();
    if let Some(blocked) = job::check_service_account(&ctx.env.client, &job).await {
        report_job_blocked(sync, &blocked, false, ctx).await?;
        return Ok(Some(Action::requeue(JOB_BLOCKED_RECHECK)));
    }
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
        status::request_handled(s, trigger);
        s.active_job = Some(job_name.clone());
        // The ServiceAccount that was missing exists now.
        let was_blocked = super::conditions::get(&s.conditions, super::conditions::STALLED)
            .is_some_and(|c| c.status == "True" && c.reason == job::RUN_SERVICE_ACCOUNT_MISSING);
        if was_blocked {
            super::conditions::set(
                &mut s.conditions,
                super::conditions::STALLED,
                super::conditions::Status::False,
                "Running",
                &how,
                Some(generation),
                now,
            );
        }
    })
    .await?;
    Ok(None)
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
        // A Job whose pod cannot be created (a ServiceAccount deleted since, a quota, an
        // admission policy) stays "running" without a pod until its deadline; its status
        // does not change, so look again soon.
        if let Some(j) = found.as_ref().filter(|j| job::has_no_pod(j)) {
            if let Some(blocked) = job::pod_creation_failure(&ctx.env.client, j).await {
                report_job_blocked(sync, &blocked, true, ctx).await?;
            }
            return Ok(Some(Action::requeue(JOB_BLOCKED_RECHECK)));
        }
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
            // A requested run that failed this way still answers its request, so the client
            // that asked for it sees its end.
            let trigger = match found.as_ref().and_then(job::trigger_arg) {
                Some("Requested") => {
                    super::cluster_run::requested_value(Trigger::Requested(String::new()), sync)
                }
                _ => Trigger::Retry,
            };
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
        crate::state::configmap::gc::delete_all(ctx.env.client.clone(), &key.namespace, &key.name).await
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

/// Deletes a deleted `Warehouse`-store sync's rows from `backflow_state`, `backflow_journal`,
/// `backflow_state_blocks`, `backflow_checkpoints` and `backflow_syncs` (its sync logs stay:
/// they are history), through the state connection (`spec.state.connectionSecretRef`, else
/// the source's Secret). Bounded by a timeout; a
/// failure is logged and never holds the finalizer, leaving the rows for a person to delete.
async fn delete_warehouse_state(sync: &ReverseSync, key: &SyncKey, ctx: &Context) {
    let state = sync.spec.state.clone().unwrap_or_default();
    let sync_id =
        crate::state::migrate::sync_id(ctx.env.policy.cluster_name.as_deref(), &key.namespace, &key.name);
    let left = format!(
        "its rows stay in schema {:?}: DELETE FROM backflow_state, backflow_journal, backflow_state_blocks, backflow_checkpoints (PostgreSQL) and backflow_syncs WHERE sync_id = '{sync_id}'",
        state.schema_or_default()
    );
    let resolver = ctx.env.resolver();
    let work = async {
        let url = crate::engine::setup::warehouse_state_url(&resolver, &key.namespace, &key.name, &sync.spec)
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
