//! The Destination reconciler: validate, read the credentials Secret (same namespace), run
//! the connector's connection check, and say so in `Ready`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::conditions::{self, READY, RECONCILING, STALLED, Status};
use super::panics;
use super::runner::{self, reasons};
use super::status::rfc3339;
use super::{Context, ReconcileError, SyncKey};
use crate::api::{Destination, DestinationStatus};
use crate::engine::setup;

/// How often a Ready destination is checked again.
const RECHECK: Duration = Duration::from_secs(300);
/// First wait before checking a failing destination again; doubles up to [`RECHECK`].
const FIRST_RETRY: Duration = Duration::from_secs(15);

/// Reconciles one Destination. A panic (in a connector's check, say) fails this Destination
/// alone: `Ready=False` with reason `InternalError`, a Warning Event, a retry with backoff.
pub async fn reconcile(destination: Arc<Destination>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let object = Arc::clone(&destination);
    match panics::catch(reconcile_unguarded(destination, Arc::clone(&ctx))).await {
        Ok(result) => result,
        Err(panicked) => {
            let key = SyncKey::of(&*object);
            tracing::error!(namespace = %key.namespace, destination = %key.name, panic = %panicked.0, "reconcile panicked");
            let message = panicked.public_message("check the Destination");
            let generation = object.metadata.generation.unwrap_or(0);
            let now = Utc::now();
            let mut next = object.status.clone().unwrap_or_default();
            let (g, c) = (Some(generation), &mut next.conditions);
            conditions::set(c, READY, Status::False, panics::INTERNAL_ERROR, &message, g, now);
            conditions::set(
                c,
                RECONCILING,
                Status::False,
                panics::INTERNAL_ERROR,
                &message,
                g,
                now,
            );
            conditions::set(
                c,
                STALLED,
                Status::False,
                panics::INTERNAL_ERROR,
                "retrying",
                g,
                now,
            );
            let mut updated = (*object).clone();
            updated.status = Some(next);
            let api: Api<Destination> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
            if let Err(e) = api
                .replace_status(&object.name_any(), &PostParams::default(), &updated)
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

async fn reconcile_unguarded(
    destination: Arc<Destination>,
    ctx: Arc<Context>,
) -> Result<Action, ReconcileError> {
    let key = SyncKey::of(&*destination);
    let generation = destination.metadata.generation.unwrap_or(0);
    let now = Utc::now();
    let poked = ctx.take_poke(&key);
    let previous = destination.status.clone().unwrap_or_default();
    let last_check = previous
        .last_check_time
        .as_deref()
        .and_then(super::schedule::parse_time);
    let ready_before = conditions::is_true(&previous.conditions, READY);
    let wait = if ready_before {
        RECHECK
    } else {
        retry_wait(&previous)
    };
    let due = poked
        || previous.observed_generation != Some(generation)
        || last_check.is_none_or(|t| t + chrono::Duration::from_std(wait).unwrap_or_default() <= now);
    if !due {
        let left = last_check
            .map(|t| t + chrono::Duration::from_std(wait).unwrap_or_default() - now)
            .and_then(|d| d.to_std().ok())
            .unwrap_or(wait);
        return Ok(Action::requeue(left + Duration::from_millis(50)));
    }

    let resolver = ctx.env.resolver();
    let checked = setup::destination(
        &resolver,
        &key.namespace,
        (*destination).clone(),
        &ctx.env.limiters,
        true,
    )
    .await;
    let mut next = previous.clone();
    next.observed_generation = Some(generation);
    next.last_check_time = Some(rfc3339(now));
    let g = Some(generation);
    let c = &mut next.conditions;
    conditions::set(
        c,
        RECONCILING,
        Status::False,
        "Checked",
        "connection check done",
        g,
        now,
    );
    let (ready, action) = match &checked {
        Ok(_) => {
            conditions::set(
                c,
                READY,
                Status::True,
                "Connected",
                "connection check passed",
                g,
                now,
            );
            conditions::set(
                c,
                STALLED,
                Status::False,
                "Connected",
                "connection check passed",
                g,
                now,
            );
            (true, Action::requeue(RECHECK))
        }
        Err(e) => {
            let message = e.to_string();
            conditions::set(c, READY, Status::False, e.category(), &message, g, now);
            if e.is_permanent() {
                conditions::set(c, STALLED, Status::True, e.category(), &message, g, now);
            } else {
                conditions::set(c, STALLED, Status::False, e.category(), "retrying", g, now);
            }
            (false, Action::requeue(retry_wait(&next)))
        }
    };
    ctx.env
        .metrics
        .destination_ready
        .with_label_values(&[key.namespace.as_str(), key.name.as_str()])
        .set(i64::from(ready));
    if let Err(e) = &checked {
        tracing::warn!(namespace = %key.namespace, destination = %key.name, reason = e.category(), error = %e, "destination not ready");
        if ready_before || previous.conditions.is_empty() || poked {
            let reason = match e {
                setup::SetupError::SecretNotGranted { .. } => reasons::SECRET_NOT_GRANTED,
                _ => reasons::DESTINATION_NOT_READY,
            };
            runner::publish(
                &ctx.env.recorder,
                &destination.object_ref(&()),
                true,
                reason,
                &e.to_string(),
            )
            .await;
        }
    } else if !ready_before {
        tracing::info!(namespace = %key.namespace, destination = %key.name, "destination ready");
        // The syncs that use it may have been waiting for it.
        for sync in ctx.syncs.using_destination(&key.namespace, &key.name) {
            ctx.poke(&sync);
        }
    }
    let api: Api<Destination> = Api::namespaced(ctx.env.client.clone(), &key.namespace);
    let mut object = (*destination).clone();
    object.status = Some(next);
    match api
        .replace_status(&destination.name_any(), &PostParams::default(), &object)
        .await
    {
        Ok(_) => Ok(action),
        // Changed meanwhile: the change wakes the reconciler again.
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => Ok(Action::await_change()),
        Err(e) => Err(ReconcileError::Kube(format!(
            "failed to update status of Destination {}/{}: {e}",
            key.namespace, key.name
        ))),
    }
}

/// The wait before checking a failing destination again: 15 s, doubling with each check that
/// failed in a row (counted from how long `Ready` has been False), up to 5 minutes.
fn retry_wait(status: &DestinationStatus) -> Duration {
    let since = conditions::get(&status.conditions, READY)
        .filter(|c| c.status != "True")
        .map(|c| c.last_transition_time.0.as_second())
        .unwrap_or_else(|| Utc::now().timestamp());
    let failing_for = Utc::now().timestamp().saturating_sub(since).max(0) as u64;
    let mut wait = FIRST_RETRY;
    while wait.as_secs() < failing_for / 2 && wait < RECHECK {
        wait *= 2;
    }
    wait.min(RECHECK)
}
