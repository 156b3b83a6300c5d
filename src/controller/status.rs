//! What a ReverseSync's status says before, during and after a run, and how it is written.
//!
//! Conditions follow kstatus: `Reconciling` while a run is in flight, `Ready` when the last run
//! did not fail, `Stalled` when a person must act (invalid spec, missing Secret, bad SQL,
//! credentials rejected), `Degraded` when the last run rejected rows.

use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use kube::api::{Api, PostParams};

use super::api_server;
use super::conditions::{self, DEGRADED, READY, RECONCILING, SOURCE_PRIVILEGED, STALLED, Status};
use super::schedule::Trigger;
use crate::api::ReverseSync;
use crate::api::reverse_sync::{PlanPreview, PlanSampleKey, ReverseSyncStatus, RunProgress, RunSummary};
use crate::engine::progress::Snapshot;
use crate::engine::run::{RunReport, RunResult};
use crate::engine::setup::SetupError;
use crate::source::Privileges;

/// Reason of `SourcePrivileged=True` and of its Warning Event.
pub const PRIVILEGED_SOURCE_USER: &str = "PrivilegedSourceUser";

/// The condition reason (and Event reason) of a run whose deletes the delete limit held back.
pub const DELETES_HELD_BACK: &str = "DeletesHeldBack";

/// The annotation approving one plan's deletes past the delete limit, by its plan id.
pub const APPROVE_DELETES: &str = "backflow.dev/approve-deletes";

/// Formats a time as the status writes it: RFC 3339 in UTC with milliseconds, so that runs
/// within one second still order (`schedule.after` compares them).
pub fn rfc3339(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Marks a run as started.
pub fn run_started(
    status: &mut ReverseSyncStatus,
    generation: i64,
    trigger: &Trigger,
    how: &str,
    now: DateTime<Utc>,
) {
    let g = Some(generation);
    conditions::set(
        &mut status.conditions,
        RECONCILING,
        Status::True,
        "Running",
        &format!("{how} ({})", trigger.as_str()),
        g,
        now,
    );
    if conditions::get(&status.conditions, READY).is_none() {
        conditions::set(
            &mut status.conditions,
            READY,
            Status::Unknown,
            "Progressing",
            "the first run is in progress",
            g,
            now,
        );
    }
    // A run that ended without saying so (a crashed pod) may have left its progress behind.
    status.progress = None;
    status.observed_generation = g;
}

/// Marks the `backflow.dev/requested-at` value that `trigger` acts on as handled. An
/// in-operator run does so when it ends, so a run cut short (the operator killed, its lease
/// taken over) is started again by the next leader; a Job-mode run when its Job is created,
/// since the Job itself survives the operator.
pub fn request_handled(status: &mut ReverseSyncStatus, trigger: &Trigger) {
    if let Trigger::Requested(value) = trigger
        && !value.is_empty()
    {
        status.last_handled_requested_at = Some(value.clone());
    }
}

/// Records how far the run in flight has got. Only while `Reconciling` says a run is in
/// flight: a late write after the run recorded its end changes nothing.
pub fn progress(status: &mut ReverseSyncStatus, snapshot: &Snapshot, now: DateTime<Utc>) {
    if !conditions::is_true(&status.conditions, RECONCILING) {
        return;
    }
    status.progress = Some(RunProgress {
        started_at: rfc3339(snapshot.started),
        updated_at: rfc3339(now),
        phase: snapshot.phase.as_str().to_owned(),
        rows_read: snapshot.rows_read,
        rows_planned: snapshot.rows_planned,
        records_to_send: snapshot.records_to_send,
        records_sent: snapshot.records_sent(),
        records_accepted: snapshot.records_accepted(),
        records_rejected: snapshot.rejected,
        // Tenths of a second: finer says nothing to a reader.
        throttled_seconds: (snapshot.throttled_time.as_secs_f64() * 10.0).round() / 10.0,
        estimated_seconds_left: snapshot.estimated_seconds_left(),
    });
}

/// Records a reconcile that failed internally (a contained panic): not Ready, not Stalled (it
/// is retried with backoff), the last run untouched.
pub fn internal_error(status: &mut ReverseSyncStatus, generation: i64, message: &str, now: DateTime<Utc>) {
    let g = Some(generation);
    let c = &mut status.conditions;
    conditions::set(
        c,
        READY,
        Status::False,
        super::panics::INTERNAL_ERROR,
        message,
        g,
        now,
    );
    conditions::set(
        c,
        RECONCILING,
        Status::False,
        super::panics::INTERNAL_ERROR,
        message,
        g,
        now,
    );
    conditions::set(
        c,
        STALLED,
        Status::False,
        super::panics::INTERNAL_ERROR,
        "retrying",
        g,
        now,
    );
}

/// How a finished run reads on the resource.
#[derive(Debug)]
pub struct Outcome {
    /// The condition reason (`Succeeded`, `RowsRejected`, or the error's category).
    pub reason: String,
    /// A one-line message for conditions and events (never a secret or a row value).
    pub message: String,
    /// True when the run failed.
    pub failed: bool,
    /// True when a person must act before a run can succeed.
    pub stalled: bool,
}

impl Outcome {
    /// How a finished run reads.
    pub fn of_run(report: &RunReport, dry_run: bool) -> Outcome {
        let p = &report.plan;
        match (&report.error, report.result) {
            (Some(e), _) => Outcome {
                reason: e.category().to_owned(),
                message: e.to_string(),
                failed: true,
                stalled: e.is_permanent(),
            },
            (None, _) if report.deletes_held_back() => {
                let check = report.delete_check.as_ref();
                let reason = check.and_then(|c| c.exceeded.clone()).unwrap_or_default();
                let plan_id = check.map(|c| c.plan_id.as_str()).unwrap_or_default();
                let head = if dry_run {
                    format!(
                        "dry run: would add {}, change {}; the {} deletes would be held back",
                        p.added, p.changed, p.removed
                    )
                } else {
                    format!(
                        "deletes held back, nothing was deleted ({} added, {} changed went out)",
                        p.added, p.changed
                    )
                };
                Outcome {
                    reason: DELETES_HELD_BACK.to_owned(),
                    message: format!(
                        "{head}: {reason}. If these deletes are intended, approve this plan once by annotating this ReverseSync with {APPROVE_DELETES}={plan_id}"
                    ),
                    failed: !dry_run,
                    stalled: false,
                }
            }
            (None, RunResult::Failed) => Outcome {
                reason: "DeliveryFailed".to_owned(),
                message: format!(
                    "{} records could not be delivered after every retry; they are sent again next run",
                    report.failed
                ),
                failed: true,
                stalled: false,
            },
            (None, _) if dry_run => Outcome {
                reason: "Previewed".to_owned(),
                message: format!(
                    "dry run: would add {}, change {}, remove {}; {} unchanged, {} rejected (see status.plan)",
                    p.added, p.changed, p.removed, p.unchanged, p.rejected
                ),
                failed: false,
                stalled: false,
            },
            (None, result) => Outcome {
                reason: if result == RunResult::Succeeded {
                    "Succeeded".to_owned()
                } else {
                    "RowsRejected".to_owned()
                },
                message: format!(
                    "synced {} rows: {} added, {} changed, {} removed, {} unchanged, {} rejected; the destination accepted {} and deleted {}",
                    p.rows_in_model,
                    p.added,
                    p.changed,
                    p.removed,
                    p.unchanged,
                    report.rows_rejected(),
                    report.accepted,
                    report.deleted
                ),
                failed: false,
                stalled: false,
            },
        }
    }

    /// How a run that could not start reads.
    pub fn of_setup(error: &SetupError) -> Outcome {
        Outcome {
            reason: error.category().to_owned(),
            message: error.to_string(),
            failed: true,
            stalled: error.is_permanent(),
        }
    }
}

/// Records a finished run: `lastRun`, conditions, failure count, rejected samples, preview.
pub fn run_finished(
    status: &mut ReverseSyncStatus,
    generation: i64,
    trigger: &Trigger,
    report: &RunReport,
    flags: RunFlags,
    now: DateTime<Utc>,
) {
    let dry_run = flags.dry_run;
    let outcome = Outcome::of_run(report, dry_run);
    let p = &report.plan;
    let g = Some(generation);
    request_handled(status, trigger);
    status.last_run = Some(RunSummary {
        start: rfc3339(report.started),
        end: Some(rfc3339(report.finished)),
        result: report.result.as_str().to_owned(),
        rows_in_model: p.rows_in_model,
        rows_added: p.added,
        rows_changed: p.changed,
        rows_removed: p.removed,
        rows_unchanged: p.unchanged,
        rows_rejected: report.rows_rejected(),
        rows_failed: report.failed,
        requests: report.requests,
        fingerprint: report.result_fingerprint.clone(),
        generation: g,
        trigger: Some(trigger.as_str().to_owned()),
        requested_at: requested_value(trigger),
        full_resync: flags.full_resync,
        error: report.error.as_ref().map(ToString::to_string),
        deletes_held_back: report.delete_check.as_ref().and_then(|c| c.status()),
    });
    status.rejected_samples = report.rejected_samples.clone();
    status.observed_generation = g;
    if dry_run && report.error.is_none() {
        status.plan = Some(plan_preview(report, generation, now));
    } else if !dry_run {
        status.plan = None;
    }
    if outcome.failed {
        status.consecutive_failures = status.consecutive_failures.saturating_add(1);
    } else {
        status.consecutive_failures = 0;
        if !dry_run {
            status.last_successful_sync_time = Some(rfc3339(report.finished));
        }
    }
    apply_outcome(status, &outcome, report.rows_rejected(), generation, now);
    if let Some(privileges) = &report.source_privileges {
        source_privileges(status, privileges, generation, now);
    }
}

/// How a run goes besides its trigger.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunFlags {
    /// Plan only (`spec.dryRun`): send nothing, keep state.
    pub dry_run: bool,
    /// Ignore the stored fingerprints and send every row (`backflow.dev/full-resync`).
    pub full_resync: bool,
    /// Cursor mode: read and diff the whole model, not only the rows past the mark (a run a
    /// person asked for with `backflow.dev/requested-at`).
    pub full_diff: bool,
}

/// The request value a run answers, for `lastRun.requestedAt`.
fn requested_value(trigger: &Trigger) -> Option<String> {
    match trigger {
        Trigger::Requested(v) if !v.is_empty() => Some(v.clone()),
        _ => None,
    }
}

/// What a dry run's report would send, as `status.plan` says it.
fn plan_preview(report: &RunReport, generation: i64, now: DateTime<Utc>) -> PlanPreview {
    let p = &report.plan;
    PlanPreview {
        computed_at: rfc3339(now),
        generation,
        add: p.added,
        change: p.changed,
        remove: p.removed,
        unchanged: p.unchanged,
        rejected: p.rejected,
        samples: report
            .plan_samples
            .iter()
            .map(|s| PlanSampleKey {
                operation: s.operation.clone(),
                key: s.key.clone(),
            })
            .collect(),
        deletes_held_back: report.delete_check.as_ref().and_then(|c| c.status()),
        requested_at: None,
        error: None,
    }
}

/// Answers a requested preview (`backflow.dev/preview-requested-at`): `status.plan` only; the
/// last run, conditions and failure count are left as they are.
pub fn preview_finished(
    status: &mut ReverseSyncStatus,
    generation: i64,
    requested: &str,
    report: &RunReport,
    now: DateTime<Utc>,
) {
    let mut plan = plan_preview(report, generation, now);
    plan.requested_at = Some(requested.to_owned());
    plan.error = report.error.as_ref().map(ToString::to_string);
    status.plan = Some(plan);
}

/// Answers a requested preview that could not be computed, with the reason.
pub fn preview_failed(
    status: &mut ReverseSyncStatus,
    generation: i64,
    requested: &str,
    message: &str,
    now: DateTime<Utc>,
) {
    status.plan = Some(PlanPreview {
        computed_at: rfc3339(now),
        generation,
        requested_at: Some(requested.to_owned()),
        error: Some(message.to_owned()),
        ..PlanPreview::default()
    });
}

/// What a privileged source user means, for the condition and the Event.
pub fn privileged_message(found: &[String]) -> String {
    format!(
        "the source user holds {}: a model query can write despite the read-only transaction; \
         connect as a least-privilege role (operations guide, \"Security model\")",
        found.join(", ")
    )
}

/// Sets `SourcePrivileged` from what the run found about the source's login.
pub fn source_privileges(
    status: &mut ReverseSyncStatus,
    privileges: &Privileges,
    generation: i64,
    now: DateTime<Utc>,
) {
    let (value, reason, message) = match privileges {
        Privileges::Elevated(found) => (Status::True, PRIVILEGED_SOURCE_USER, privileged_message(found)),
        Privileges::Least => (
            Status::False,
            "LeastPrivilege",
            "the source user holds no privilege that escapes the read-only transaction".to_owned(),
        ),
        Privileges::Unknown(_) => (
            Status::Unknown,
            "CheckFailed",
            "failed to read the source user's privileges".to_owned(),
        ),
    };
    conditions::set(
        &mut status.conditions,
        SOURCE_PRIVILEGED,
        value,
        reason,
        &message,
        Some(generation),
        now,
    );
}

/// Records a failure that produced no engine report (setup errors, a failed Job).
pub fn run_failed_before_report(
    status: &mut ReverseSyncStatus,
    generation: i64,
    trigger: &Trigger,
    outcome: &Outcome,
    started: DateTime<Utc>,
    now: DateTime<Utc>,
) {
    request_handled(status, trigger);
    status.last_run = Some(RunSummary {
        start: rfc3339(started),
        end: Some(rfc3339(now)),
        result: RunResult::Failed.as_str().to_owned(),
        generation: Some(generation),
        trigger: Some(trigger.as_str().to_owned()),
        requested_at: requested_value(trigger),
        error: Some(outcome.message.clone()),
        ..RunSummary::default()
    });
    status.observed_generation = Some(generation);
    status.consecutive_failures = status.consecutive_failures.saturating_add(1);
    apply_outcome(status, outcome, 0, generation, now);
}

fn apply_outcome(
    status: &mut ReverseSyncStatus,
    outcome: &Outcome,
    rejected: u64,
    generation: i64,
    now: DateTime<Utc>,
) {
    let g = Some(generation);
    // The run summary takes over from the progress of the run.
    status.progress = None;
    let c = &mut status.conditions;
    conditions::set(c, RECONCILING, Status::False, "Idle", "no run in flight", g, now);
    if outcome.failed {
        conditions::set(c, READY, Status::False, &outcome.reason, &outcome.message, g, now);
    } else {
        conditions::set(c, READY, Status::True, &outcome.reason, &outcome.message, g, now);
    }
    if outcome.stalled {
        conditions::set(
            c,
            STALLED,
            Status::True,
            &outcome.reason,
            &outcome.message,
            g,
            now,
        );
    } else {
        conditions::set(
            c,
            STALLED,
            Status::False,
            "Progressing",
            "no error needs a person",
            g,
            now,
        );
    }
    if rejected > 0 {
        let first = status
            .rejected_samples
            .first()
            .map(|r| format!("; first: key {} ({}): {}", r.key, r.operation, r.reason))
            .unwrap_or_default();
        conditions::set(
            c,
            DEGRADED,
            Status::True,
            "RowsRejected",
            &format!("{rejected} rows rejected; they are retried next run{first}"),
            g,
            now,
        );
    } else if !outcome.failed {
        conditions::set(
            c,
            DEGRADED,
            Status::False,
            "NoRejections",
            "no rows rejected",
            g,
            now,
        );
    }
}

/// Sets the conditions of a sync that cannot run as specified (invalid spec, unsupported
/// store): `Stalled` until the spec changes.
pub fn stalled(
    status: &mut ReverseSyncStatus,
    generation: i64,
    reason: &str,
    message: &str,
    now: DateTime<Utc>,
) {
    let g = Some(generation);
    let c = &mut status.conditions;
    conditions::set(c, READY, Status::False, reason, message, g, now);
    conditions::set(c, STALLED, Status::True, reason, message, g, now);
    conditions::set(
        c,
        RECONCILING,
        Status::False,
        reason,
        "waiting for the spec to be fixed",
        g,
        now,
    );
    status.observed_generation = g;
    status.next_sync_time = None;
}

/// Sets the conditions of a suspended sync.
pub fn suspended(status: &mut ReverseSyncStatus, generation: i64, now: DateTime<Utc>) {
    let g = Some(generation);
    let message = "spec.suspend is true: no run starts until it is set to false";
    let c = &mut status.conditions;
    conditions::set(c, READY, Status::False, "Suspended", message, g, now);
    conditions::set(c, RECONCILING, Status::False, "Suspended", message, g, now);
    conditions::set(c, STALLED, Status::False, "Suspended", message, g, now);
    status.observed_generation = g;
    status.next_sync_time = None;
}

/// Errors writing a status.
#[derive(Debug, thiserror::Error)]
#[error("failed to update status of {url}/{name}: {source}")]
pub struct StatusError {
    url: String,
    name: String,
    #[source]
    source: kube::Error,
}

/// Conflicts in a row a status write retries before it gives up: another client that keeps
/// writing the status wins a few rounds, not every one.
const CONFLICT_ATTEMPTS: u32 = 20;

/// How long a status write keeps retrying an API server that does not answer or answers
/// 429/5xx: a restart or an upgrade of the control plane. A run's outcome written after that
/// is lost to the status (the next decision runs it again).
const UNAVAILABLE_FOR: Duration = Duration::from_secs(90);

/// Longest pause between two tries at an unavailable API server.
const UNAVAILABLE_PAUSE: Duration = Duration::from_secs(5);

/// A pause of 10–60 ms growing with `attempt`, spread so that two writers that met once do
/// not meet again at the same moment.
fn conflict_pause(attempt: u32) -> Duration {
    let spread = u64::from(uuid::Uuid::new_v4().as_fields().0 % 20);
    Duration::from_millis(10 + u64::from(attempt.min(4)) * 10 + spread)
}

/// Reads the latest object, applies `change` to its status and writes it back, retrying on
/// conflicts (another writer changed the object between the read and the write) and, for
/// [`UNAVAILABLE_FOR`], on an API server that is unreachable or overloaded, and on the
/// refusals of one starting again after this process met it down (see
/// [`api_server::starting_refusal`]). Writes nothing
/// when `change` leaves the status as it was. Returns the new status.
pub async fn update(
    api: &Api<ReverseSync>,
    name: &str,
    change: impl Fn(&mut ReverseSyncStatus, &ReverseSync),
) -> Result<Option<ReverseSyncStatus>, StatusError> {
    let err = |source| StatusError {
        url: api.resource_url().to_owned(),
        name: name.to_owned(),
        source,
    };
    let first_try = Instant::now();
    let mut conflicts = 0;
    let mut pause = Duration::from_millis(250);
    loop {
        let result = match api.get_opt(name).await {
            Ok(None) => return Ok(None),
            Ok(Some(mut current)) => {
                let before = current.status.clone().unwrap_or_default();
                let mut next = before.clone();
                change(&mut next, &current);
                if next == before {
                    return Ok(Some(next));
                }
                current.status = Some(next.clone());
                api.replace_status(name, &PostParams::default(), &current)
                    .await
                    .map(|_| next)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(next) => return Ok(Some(next)),
            Err(kube::Error::Api(e)) if e.code == 409 && conflicts < CONFLICT_ATTEMPTS => {
                conflicts += 1;
                tokio::time::sleep(conflict_pause(conflicts)).await;
            }
            Err(e) => {
                let down = api_server::note(&e);
                let starting = api_server::starting_refusal(&e) && api_server::recently_unavailable();
                if !(down || starting) || first_try.elapsed() >= UNAVAILABLE_FOR {
                    return Err(err(e));
                }
                tracing::debug!(error = %e, retry_in = ?pause, "the API server is unavailable; retrying the status write");
                tokio::time::sleep(pause).await;
                pause = pause.saturating_mul(2).min(UNAVAILABLE_PAUSE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::progress::{Phase, Progress};

    #[test]
    fn a_requested_run_is_handled_when_it_ends_so_a_run_cut_short_starts_again() {
        let mut status = ReverseSyncStatus::default();
        let trigger = Trigger::Requested("now-1".to_owned());
        let now = Utc::now();
        run_started(&mut status, 1, &trigger, "running in the operator", now);
        assert_eq!(status.last_handled_requested_at, None);
        let outcome = Outcome {
            reason: "SourceUnavailable".to_owned(),
            message: "failed to connect".to_owned(),
            failed: true,
            stalled: false,
        };
        run_failed_before_report(&mut status, 1, &trigger, &outcome, now, now);
        assert_eq!(status.last_handled_requested_at.as_deref(), Some("now-1"));
        // The run pod of Job mode knows no value: the operator marked it at the Job's creation.
        request_handled(&mut status, &Trigger::Requested(String::new()));
        assert_eq!(status.last_handled_requested_at.as_deref(), Some("now-1"));
    }

    fn delivering() -> Snapshot {
        let p = Progress::new();
        for _ in 0..3 {
            p.row_read();
        }
        p.delivering(3);
        p.delivered(1, 0, 1, 0);
        p.snapshot()
    }

    #[test]
    fn progress_is_written_only_while_a_run_is_in_flight_and_goes_when_it_ends() {
        let mut status = ReverseSyncStatus::default();
        let now = Utc::now();
        progress(&mut status, &delivering(), now);
        assert_eq!(status.progress, None, "no run in flight");

        run_started(&mut status, 1, &Trigger::Schedule, "running in the operator", now);
        progress(&mut status, &delivering(), now);
        let written = status.progress.clone().unwrap();
        assert_eq!(written.phase, Phase::Delivering.as_str());
        assert_eq!(
            (
                written.rows_read,
                written.records_to_send,
                written.records_sent,
                written.records_accepted,
                written.records_rejected
            ),
            (3, 3, 2, 1, 1)
        );
        assert_eq!(written.updated_at, rfc3339(now));
        assert_eq!(written.estimated_seconds_left, None, "too early to tell");

        let outcome = Outcome {
            reason: "Succeeded".to_owned(),
            message: "done".to_owned(),
            failed: false,
            stalled: false,
        };
        run_failed_before_report(&mut status, 1, &Trigger::Schedule, &outcome, now, now);
        assert_eq!(status.progress, None, "the run's end takes over");
        progress(&mut status, &delivering(), now);
        assert_eq!(
            status.progress, None,
            "a late write after the end changes nothing"
        );
    }

    #[test]
    fn a_new_run_clears_the_progress_a_crashed_one_left() {
        let mut status = ReverseSyncStatus::default();
        let now = Utc::now();
        run_started(&mut status, 1, &Trigger::Schedule, "running in Job a", now);
        progress(&mut status, &delivering(), now);
        assert!(status.progress.is_some());
        run_started(&mut status, 1, &Trigger::Retry, "running in Job b", now);
        assert_eq!(status.progress, None);
    }
}
