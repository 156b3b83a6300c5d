//! What `backflow run` prints: a progress bar on a terminal, a summary per sync (text or
//! JSON), and a dry run's preview.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::SyncOutcome;
use crate::engine::run::{CursorRead, Progress};

/// A progress bar on standard error, shown only when it is a terminal.
pub struct TerminalProgress {
    bar: ProgressBar,
}

impl TerminalProgress {
    /// A progress receiver for one sync: a spinner on a terminal, nothing otherwise.
    pub fn for_sync(name: &str) -> Arc<dyn Progress> {
        if !std::io::stderr().is_terminal() {
            return Arc::new(crate::engine::run::NoProgress);
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix}: {msg} [{elapsed}]")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_prefix(name.to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        Arc::new(TerminalProgress { bar })
    }
}

impl Progress for TerminalProgress {
    fn planned(&self, rows: u64) {
        self.bar.set_message(format!(
            "planned {rows} rows ({:.0} rows/s)",
            rows as f64 / self.bar.elapsed().as_secs_f64().max(0.001)
        ));
    }
    fn delivering(&self, records: u64) {
        self.bar.set_length(records);
        self.bar.set_position(0);
        self.bar.set_message(format!("sending {records} records"));
    }
    fn delivered(&self, accepted: u64, rejected: u64, failed: u64) {
        let done = accepted + rejected + failed;
        self.bar.set_position(done);
        self.bar.set_message(format!(
            "sent {done}/{} (ok {accepted}, rejected {rejected}, failed {failed})",
            self.bar.length().unwrap_or(0)
        ));
    }
}

impl Drop for TerminalProgress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
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
