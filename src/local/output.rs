//! What `backflow run` prints: a progress bar on a terminal, a summary per sync (text or
//! JSON), and a dry run's preview.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::SyncOutcome;
use crate::engine::progress::{Phase, Progress, Snapshot};
use crate::engine::run::CursorRead;

/// How often the terminal bar reads the run's counters.
const BAR_REFRESH: Duration = Duration::from_millis(200);

/// How often a run whose standard error is not a terminal logs its progress.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shows one sync's progress while it is alive: a bar on standard error when it is a
/// terminal, an info log line every ten seconds otherwise. Dropping it stops it and clears
/// the bar.
pub struct ProgressView {
    bar: Option<ProgressBar>,
    stop: CancellationToken,
}

impl ProgressView {
    /// Starts showing the progress of sync `name`.
    pub fn for_sync(name: &str, progress: Arc<Progress>) -> ProgressView {
        let stop = CancellationToken::new();
        let span = tracing::Span::current();
        if !std::io::stderr().is_terminal() {
            let task = log_lines(progress, stop.clone());
            tokio::spawn(tracing::Instrument::instrument(task, span));
            return ProgressView { bar: None, stop };
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(spinner_style());
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        tokio::spawn(draw(bar.clone(), progress, stop.clone()));
        ProgressView { bar: Some(bar), stop }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} [{elapsed}]")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// Redraws the bar from the run's counters until `stop`.
async fn draw(bar: ProgressBar, progress: Arc<Progress>, stop: CancellationToken) {
    let mut delivering = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(BAR_REFRESH) => {}
        }
        let s = progress.snapshot();
        if s.phase == Phase::Delivering && !delivering {
            delivering = true;
            bar.set_style(bar_style());
            bar.set_length(s.records_to_send);
        }
        if delivering {
            bar.set_position(s.records_sent());
        }
        bar.set_message(progress_line(&s, bar.elapsed()));
    }
}

/// Logs the run's counters every [`LOG_EVERY`] until `stop`.
async fn log_lines(progress: Arc<Progress>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(LOG_EVERY) => {}
        }
        let s = progress.snapshot();
        tracing::info!(
            phase = s.phase.as_str(),
            rows_read = s.rows_read,
            rows_planned = s.rows_planned,
            records_to_send = s.records_to_send,
            records_sent = s.records_sent(),
            records_accepted = s.records_accepted(),
            records_rejected = s.rejected,
            throttled_seconds = s.throttled_time.as_secs(),
            estimated_seconds_left = s.estimated_seconds_left(),
            "progress"
        );
    }
}

/// One line of progress for a terminal, `elapsed` since the run started.
pub fn progress_line(s: &Snapshot, elapsed: Duration) -> String {
    match s.phase {
        Phase::Reading => format!(
            "reading: {} rows ({:.0} rows/s)",
            s.rows_read,
            s.rows_read as f64 / elapsed.as_secs_f64().max(0.001)
        ),
        Phase::Planning => format!("planning: {} rows read, {} planned", s.rows_read, s.rows_planned),
        Phase::Delivering => {
            let mut line = format!("ok {}", s.records_accepted());
            if s.rejected > 0 {
                line.push_str(&format!(", rejected {}", s.rejected));
            }
            if s.failed > 0 {
                line.push_str(&format!(", failed {}", s.failed));
            }
            let throttled = s.throttled_time.as_secs();
            if throttled > 0 {
                line.push_str(&format!(", throttled {throttled}s"));
            }
            if let Some(left) = s.estimated_seconds_left() {
                line.push_str(&format!(
                    ", ~{} left",
                    humantime::format_duration(Duration::from_secs(left))
                ));
            }
            line
        }
        Phase::Committing => "committing the last checkpoint".to_owned(),
    }
}

/// The summary of one sync as JSON.
pub fn summary_json(o: &SyncOutcome) -> serde_json::Value {
    let mut v = json!({
        "namespace": o.namespace,
        "sync": o.name,
        "failed": o.failed(),
        "error": o.error,
    });
    if let Some(r) = &o.report {
        v["result"] = json!(r.result.as_str());
        v["rowsInModel"] = json!(r.plan.rows_in_model);
        v["added"] = json!(r.plan.added);
        v["changed"] = json!(r.plan.changed);
        v["removed"] = json!(r.plan.removed);
        v["unchanged"] = json!(r.plan.unchanged);
        v["skipped"] = json!(r.plan.skipped);
        v["rejected"] = json!(r.rows_rejected());
        v["failedRows"] = json!(r.failed);
        v["accepted"] = json!(r.accepted);
        v["deleted"] = json!(r.deleted);
        v["requests"] = json!(r.requests);
        v["throttled"] = json!(r.throttled);
        v["retries"] = json!(r.retries);
        v["seconds"] = json!(r.seconds());
        v["fingerprint"] = json!(r.result_fingerprint);
        v["rejectedSamples"] = json!(r.rejected_samples);
        if !r.plan_samples.is_empty() {
            v["planSamples"] = json!(r.plan_samples);
        }
        if let Some(held) = r.delete_check.as_ref().and_then(|c| c.status()) {
            v["deletesHeldBack"] = json!(held);
        }
        match &r.cursor {
            Some(CursorRead::FullDiff(why)) => v["cursor"] = json!({"read": "fullDiff", "reason": why}),
            Some(CursorRead::PastMark(mark)) => {
                v["cursor"] =
                    json!({"read": "pastMark", "mark": serde_json::from_str::<serde_json::Value>(mark).ok()})
            }
            None => {}
        }
    }
    v
}

/// The summary of one sync as text lines.
pub fn summary_text(o: &SyncOutcome, dry_run: bool) -> String {
    let mut out = String::new();
    let head = format!("{}/{}", o.namespace, o.name);
    match &o.report {
        Some(r) => {
            let verb = if dry_run { "plan" } else { r.result.as_str() };
            out.push_str(&format!(
                "{head}: {verb}: {} rows, added {}, changed {}, removed {}, unchanged {}, rejected {}",
                r.plan.rows_in_model,
                r.plan.added,
                r.plan.changed,
                r.plan.removed,
                r.plan.unchanged,
                r.rows_rejected(),
            ));
            if dry_run {
                out.push_str(&format!(", {:.2}s\n", r.seconds()));
            } else {
                // What arrived, next to what was planned: rejected and failed records are
                // planned but not accepted.
                out.push_str(&format!(
                    "; sent: accepted {}, deleted {}, failed {}, requests {}, {:.2}s\n",
                    r.accepted,
                    r.deleted,
                    r.failed,
                    r.requests,
                    r.seconds()
                ));
            }
            match &r.cursor {
                Some(CursorRead::FullDiff(why)) => out.push_str(&format!("  cursor: full diff ({why})\n")),
                Some(CursorRead::PastMark(mark)) => {
                    out.push_str(&format!("  cursor: read only the rows at or past {mark}\n"))
                }
                None => {}
            }
            if r.plan.skipped > 0 {
                out.push_str(&format!(
                    "  skipped {} rows the mode does not send\n",
                    r.plan.skipped
                ));
            }
            if let Some(check) = r.delete_check.as_ref().filter(|c| c.held_back()) {
                let reason = check.exceeded.as_deref().unwrap_or_default();
                let held = if dry_run {
                    "would be held back"
                } else {
                    "held back: nothing was deleted"
                };
                out.push_str(&format!(
                    "  deletes {held}: {reason}\n  if these {} deletes are intended, run again with --approve-deletes {}\n",
                    check.deletes, check.plan_id
                ));
            }
            for s in &r.plan_samples {
                out.push_str(&format!("  would {} {}: {}\n", s.operation, s.key, s.record));
            }
            for s in &r.rejected_samples {
                out.push_str(&format!("  rejected {} ({}): {}\n", s.key, s.operation, s.reason));
            }
            if let Some(e) = &r.error {
                out.push_str(&format!("  error: {e}\n"));
            }
        }
        None => out.push_str(&format!(
            "{head}: Failed: {}\n",
            o.error.as_deref().unwrap_or("unknown error")
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_terminal_line_says_the_phase_and_while_delivering_the_outcomes_and_the_time_left() {
        let p = Progress::new();
        for _ in 0..500 {
            p.row_read();
        }
        let line = progress_line(&p.snapshot(), Duration::from_secs(2));
        assert_eq!(line, "reading: 500 rows (250 rows/s)");
        p.delivering(100);
        tokio::time::advance(Duration::from_secs(10)).await;
        p.delivered(40, 0, 10, 0);
        // 50 records in 10 s: 50 more take 10 s.
        let line = progress_line(&p.snapshot(), Duration::from_secs(12));
        assert_eq!(line, "ok 40, rejected 10, ~10s left");
        p.delivered(50, 0, 0, 0);
        let line = progress_line(&p.snapshot(), Duration::from_secs(12));
        assert_eq!(line, "ok 50, ~10s left", "no rejections, no word of them");
        p.set_phase(Phase::Committing);
        assert_eq!(
            progress_line(&p.snapshot(), Duration::from_secs(20)),
            "committing the last checkpoint"
        );
    }
}
