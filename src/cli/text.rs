//! How the cluster commands word what the status says: ages, run summaries, previews and
//! progress lines. Pure functions of the status and the clock.

use chrono::{DateTime, Utc};

use crate::api::reverse_sync::{PlanPreview, RunProgress, RunSummary};
use crate::controller::schedule::parse_time;
use crate::controller::status::APPROVE_DELETES;

/// A span as kubectl shows ages: `45s`, `12m`, `3h`, `5d` (the largest unit only).
pub fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// How long ago an RFC 3339 time was, or `-` when absent or unreadable.
pub fn age(time: Option<&str>, now: DateTime<Utc>) -> String {
    time.and_then(parse_time)
        .map_or_else(|| "-".to_owned(), |t| span((now - t).num_seconds()))
}

/// When an RFC 3339 time comes: `in 5m`, `due` once past, `-` when absent.
pub fn until(time: Option<&str>, now: DateTime<Utc>) -> String {
    match time.and_then(parse_time) {
        Some(t) if t > now => format!("in {}", span((t - now).num_seconds().max(1))),
        Some(_) => "due".to_owned(),
        None => "-".to_owned(),
    }
}

/// One line per run, like `backflow run` prints it, then its details.
pub fn run_summary(head: &str, run: &RunSummary) -> String {
    let seconds = match (parse_time(&run.start), run.end.as_deref().and_then(parse_time)) {
        (Some(s), Some(e)) => format!(", {:.1}s", (e - s).num_milliseconds() as f64 / 1000.0),
        _ => String::new(),
    };
    let mut out = format!(
        "{head}: {}: {} rows, added {}, changed {}, removed {}, unchanged {}, rejected {}; failed {}, requests {}{seconds}\n",
        run.result,
        run.rows_in_model,
        run.rows_added,
        run.rows_changed,
        run.rows_removed,
        run.rows_unchanged,
        run.rows_rejected,
        run.rows_failed,
        run.requests,
    );
    let trigger = run.trigger.as_deref().unwrap_or("unknown");
    let resync = if run.full_resync { ", full resync" } else { "" };
    out.push_str(&format!("  trigger {trigger}{resync}, started {}\n", run.start));
    if let Some(held) = &run.deletes_held_back {
        out.push_str(&format!(
            "  deletes held back, nothing was deleted: {}\n  if these {} deletes are intended, approve them once: kubectl annotate reversesync NAME {APPROVE_DELETES}={}\n",
            held.reason, held.deletes, held.plan_id
        ));
    }
    if let Some(e) = &run.error {
        out.push_str(&format!("  error: {e}\n"));
    }
    out
}

/// A preview, as `backflow run --dry-run` prints a plan (keys only: the status never holds
/// payload values).
pub fn plan(head: &str, plan: &PlanPreview) -> String {
    if let Some(e) = plan
        .error
        .as_deref()
        .filter(|_| plan.samples.is_empty() && plan.add + plan.change + plan.remove + plan.unchanged == 0)
    {
        return format!("{head}: preview failed: {e}\n");
    }
    let mut out = format!(
        "{head}: plan: added {}, changed {}, removed {}, unchanged {}, rejected {} (generation {})\n",
        plan.add, plan.change, plan.remove, plan.unchanged, plan.rejected, plan.generation
    );
    if let Some(held) = &plan.deletes_held_back {
        out.push_str(&format!(
            "  deletes would be held back: {}\n  if these {} deletes are intended, approve them once: kubectl annotate reversesync NAME {APPROVE_DELETES}={}\n",
            held.reason, held.deletes, held.plan_id
        ));
    }
    for s in &plan.samples {
        out.push_str(&format!("  would {} {}\n", s.operation, s.key));
    }
    if let Some(e) = &plan.error {
        out.push_str(&format!("  error: {e}\n"));
    }
    out
}

/// One line of a run in flight: phase, counts, time throttled and what is left.
pub fn progress_line(p: &RunProgress) -> String {
    let mut out = format!(
        "{}: read {} rows, planned {}, sent {}/{} (accepted {}, rejected {})",
        p.phase,
        p.rows_read,
        p.rows_planned,
        p.records_sent,
        p.records_to_send,
        p.records_accepted,
        p.records_rejected
    );
    if p.throttled_seconds > 0.0 {
        out.push_str(&format!(", throttled {:.1}s", p.throttled_seconds));
    }
    if let Some(left) = p.estimated_seconds_left {
        out.push_str(&format!(
            ", about {} left",
            span(i64::try_from(left).unwrap_or(i64::MAX))
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::reverse_sync::{DeletesHeldBack, PlanSampleKey};

    fn now() -> DateTime<Utc> {
        parse_time("2026-01-02T03:04:05Z").unwrap()
    }

    #[test]
    fn ages_use_the_largest_unit_like_kubectl() {
        assert_eq!(span(42), "42s");
        assert_eq!(span(600), "10m");
        assert_eq!(span(7300), "2h");
        assert_eq!(span(3 * 86_400 + 5), "3d");
        assert_eq!(span(-5), "0s", "a clock ahead of ours is not a negative age");
        assert_eq!(age(Some("2026-01-02T03:00:05Z"), now()), "4m");
        assert_eq!(age(None, now()), "-");
        assert_eq!(age(Some("yesterday"), now()), "-");
        assert_eq!(until(Some("2026-01-02T03:14:05Z"), now()), "in 10m");
        assert_eq!(until(Some("2026-01-02T03:00:00Z"), now()), "due");
    }

    #[test]
    fn a_run_summary_says_counts_duration_trigger_and_error() {
        let run = RunSummary {
            start: "2026-01-02T03:04:05.000Z".into(),
            end: Some("2026-01-02T03:04:07.500Z".into()),
            result: "Failed".into(),
            rows_in_model: 10,
            rows_added: 2,
            rows_unchanged: 8,
            trigger: Some("Requested".into()),
            full_resync: true,
            error: Some("failed to connect".into()),
            ..RunSummary::default()
        };
        assert_eq!(
            run_summary("ns/s", &run),
            "ns/s: Failed: 10 rows, added 2, changed 0, removed 0, unchanged 8, rejected 0; failed 0, requests 0, 2.5s\n  \
             trigger Requested, full resync, started 2026-01-02T03:04:05.000Z\n  error: failed to connect\n"
        );
    }

    #[test]
    fn a_plan_lists_sample_keys_and_the_delete_guard() {
        let plan = PlanPreview {
            generation: 4,
            add: 1,
            remove: 30,
            unchanged: 2,
            samples: vec![PlanSampleKey {
                operation: "delete".into(),
                key: "42".into(),
            }],
            deletes_held_back: Some(DeletesHeldBack {
                deletes: 30,
                stored_records: 32,
                reason: "30 of 32 stored records (94%) is above 50%".into(),
                plan_id: "30-abc".into(),
            }),
            ..PlanPreview::default()
        };
        let text = super::plan("ns/s", &plan);
        assert!(
            text.starts_with(
                "ns/s: plan: added 1, changed 0, removed 30, unchanged 2, rejected 0 (generation 4)\n"
            ),
            "{text}"
        );
        assert!(text.contains("deletes would be held back: 30 of 32"), "{text}");
        assert!(text.contains("backflow.dev/approve-deletes=30-abc"), "{text}");
        assert!(text.ends_with("  would delete 42\n"), "{text}");
        let failed = PlanPreview {
            error: Some("failed to read Secret w".into()),
            ..PlanPreview::default()
        };
        assert_eq!(
            super::plan("ns/s", &failed),
            "ns/s: preview failed: failed to read Secret w\n"
        );
    }

    #[test]
    fn a_progress_line_shows_what_is_known() {
        let mut p = RunProgress {
            phase: "Delivering".into(),
            rows_read: 1000,
            rows_planned: 1000,
            records_to_send: 200,
            records_sent: 50,
            records_accepted: 49,
            records_rejected: 1,
            ..RunProgress::default()
        };
        assert_eq!(
            progress_line(&p),
            "Delivering: read 1000 rows, planned 1000, sent 50/200 (accepted 49, rejected 1)"
        );
        p.throttled_seconds = 2.4;
        p.estimated_seconds_left = Some(125);
        assert!(
            progress_line(&p).ends_with(", throttled 2.4s, about 2m left"),
            "{}",
            progress_line(&p)
        );
    }
}
