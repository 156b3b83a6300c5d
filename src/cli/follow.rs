//! Following what the operator does with a request: the run a `requested-at` value started
//! (its summary echoes the value, so an older or scheduled run is never taken for it), or the
//! preview a `preview-requested-at` value asked for. The status is polled once a second: a
//! request is answered within seconds of a run's end, and a poll needs only `get`.

use std::time::{Duration, Instant};

use super::CliError;
use super::progress::ProgressView;
use super::target::Connected;
use crate::api::reverse_sync::{PlanPreview, RunSummary};

/// How often the status is read.
const POLL: Duration = Duration::from_secs(1);

/// Waits for the end of the run that answers `requested`, showing its progress; the run's
/// summary.
pub async fn run_answering(
    connected: &Connected,
    name: &str,
    requested: &str,
    timeout: Duration,
    view: &mut ProgressView,
) -> Result<RunSummary, CliError> {
    let started = Instant::now();
    loop {
        let sync = read(connected, name, "waiting for its run").await?;
        let status = sync.status.unwrap_or_default();
        if let Some(run) = status
            .last_run
            .filter(|r| r.requested_at.as_deref() == Some(requested) && r.end.is_some())
        {
            view.finish();
            return Ok(run);
        }
        let handled = status.last_handled_requested_at.as_deref() == Some(requested);
        if !handled && sync.spec.suspend {
            view.finish();
            return Err(CliError::Suspended {
                namespace: connected.namespace.clone(),
                name: name.to_owned(),
            });
        }
        match (&status.progress, handled) {
            (Some(p), true) => view.progress(p),
            (None, true) => view.state(&match &status.active_job {
                Some(job) => format!("running in Job {job}"),
                None => "running".to_owned(),
            }),
            (_, false) => {
                view.state("waiting for the operator to start the run (a run in flight ends first)")
            }
        }
        if started.elapsed() >= timeout {
            view.finish();
            return Err(CliError::Timeout {
                what: format!("the run of ReverseSync {}/{name}", connected.namespace),
                name: name.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for the preview that answers `requested`.
pub async fn preview_answering(
    connected: &Connected,
    name: &str,
    requested: &str,
    timeout: Duration,
    view: &mut ProgressView,
) -> Result<PlanPreview, CliError> {
    let started = Instant::now();
    view.state("waiting for the operator's preview (a run in flight ends first)");
    loop {
        let sync = read(connected, name, "waiting for its preview").await?;
        if let Some(plan) = sync
            .status
            .and_then(|s| s.plan)
            .filter(|p| p.requested_at.as_deref() == Some(requested))
        {
            view.finish();
            return Ok(plan);
        }
        if started.elapsed() >= timeout {
            view.finish();
            return Err(CliError::Timeout {
                what: format!("the preview of ReverseSync {}/{name}", connected.namespace),
                name: name.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn read(
    connected: &Connected,
    name: &str,
    what: &'static str,
) -> Result<crate::api::ReverseSync, CliError> {
    match connected.sync(name).await {
        Err(CliError::NotFound { namespace, name, .. }) => Err(CliError::Deleted {
            namespace,
            name,
            what,
        }),
        other => other,
    }
}

/// A request value: the current time with nanoseconds, unique enough per sync.
pub fn request_value() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
}
