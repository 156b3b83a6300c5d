//! When a sync runs next: spec changes, `backflow.dev/requested-at`, `interval` or `cron`,
//! `after` other syncs (a new sync with `after` first runs once they all succeeded), and
//! retries of failed runs with backoff. Pure functions of the
//! object and the clock, so every rule is unit-tested.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::ReverseSync;
use crate::api::duration;

/// The annotation that asks for a run now: any new value starts one (the Flux
/// `reconcile.fluxcd.io/requestedAt` habit).
pub const REQUESTED_AT: &str = "backflow.dev/requested-at";

/// The annotation that makes the requested run a full resync (stored fingerprints ignored,
/// every row sent). It applies only while its value equals [`REQUESTED_AT`]'s, so it is
/// one-shot: the next request with another value is an ordinary run.
pub const FULL_RESYNC: &str = "backflow.dev/full-resync";

/// The annotation that asks for a preview (a dry run of the sync as it stands, written to
/// `status.plan` with this value echoed): any new value computes one. It leaves the spec
/// alone, so GitOps tools see no drift.
pub const PREVIEW_REQUESTED_AT: &str = "backflow.dev/preview-requested-at";

/// First wait before retrying a failed run; it doubles per failure in a row.
const FIRST_RETRY: Duration = Duration::from_secs(10);
/// Longest wait before retrying a failed run.
const MAX_RETRY: Duration = Duration::from_secs(600);

/// Why a run starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The spec changed since the last run (or the sync never ran).
    SpecChanged,
    /// The `backflow.dev/requested-at` annotation has a new value.
    Requested(String),
    /// The schedule says so.
    Schedule,
    /// Every sync named in `schedule.after` succeeded since this sync's last run.
    After,
    /// The last run failed for a reason that may pass; this is its retry.
    Retry,
}

impl Trigger {
    /// The name written to `status.lastRun.trigger` and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::SpecChanged => "SpecChanged",
            Trigger::Requested(_) => "Requested",
            Trigger::Schedule => "Schedule",
            Trigger::After => "After",
            Trigger::Retry => "Retry",
        }
    }
}

/// True when `trigger` answers a request whose value [`FULL_RESYNC`] names too.
pub fn full_resync(sync: &ReverseSync, trigger: &Trigger) -> bool {
    let Trigger::Requested(value) = trigger else {
        return false;
    };
    !value.is_empty() && annotation(sync, FULL_RESYNC) == Some(value.as_str())
}

/// The [`PREVIEW_REQUESTED_AT`] value not answered yet in `status.plan`, if any.
pub fn preview_requested(sync: &ReverseSync) -> Option<String> {
    let value = annotation(sync, PREVIEW_REQUESTED_AT).filter(|v| !v.is_empty())?;
    let answered = sync
        .status
        .as_ref()
        .and_then(|s| s.plan.as_ref())
        .and_then(|p| p.requested_at.as_deref());
    (answered != Some(value)).then(|| value.to_owned())
}

fn annotation<'a>(sync: &'a ReverseSync, key: &str) -> Option<&'a str> {
    sync.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// What to do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Start a run now, for this reason.
    pub run: Option<Trigger>,
    /// When the schedule next fires (for `status.nextSyncTime`).
    pub next_scheduled: Option<DateTime<Utc>>,
    /// When to look again if nothing else wakes the controller.
    pub wake_at: Option<DateTime<Utc>>,
    /// Upstream syncs of `schedule.after` that are still awaited (for the condition message).
    pub waiting_for: Vec<String>,
}

/// The last successful sync time of a sync named in `schedule.after`, or `None` when it does
/// not exist or never succeeded.
pub type Upstream = (String, Option<DateTime<Utc>>);

/// Parses an RFC 3339 time written by the operator.
pub fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The schedule's period: the interval, or the gap between the next two cron times.
pub fn period(sync: &ReverseSync, now: DateTime<Utc>) -> Option<Duration> {
    let schedule = sync.spec.schedule.as_ref()?;
    if let Some(interval) = &schedule.interval {
        return duration::parse(interval).ok();
    }
    let cron = duration::cron(schedule.cron.as_ref()?).ok()?;
    let first = cron.find_next_occurrence(&now, false).ok()?;
    let second = cron.find_next_occurrence(&first, false).ok()?;
    (second - first).to_std().ok()
}

/// Decides whether `sync` runs now. `upstream` holds the syncs of `schedule.after`.
pub fn decide(sync: &ReverseSync, upstream: &[Upstream], now: DateTime<Utc>) -> Decision {
    let status = sync.status.clone().unwrap_or_default();
    let generation = sync.metadata.generation.unwrap_or(0);
    let last = status.last_run.as_ref();
    let last_start = last.and_then(|r| parse_time(&r.start));
    let last_end = last
        .and_then(|r| r.end.as_deref())
        .and_then(parse_time)
        .or(last_start);
    let schedule = sync.spec.schedule.as_ref();

    let next_scheduled = schedule.and_then(|s| {
        if let Some(interval) = &s.interval {
            let every = chrono::Duration::from_std(duration::parse(interval).ok()?).ok()?;
            // Checked: the interval is the spec's number (validation bounds it to a year).
            Some(last_start.map_or(Some(now), |t| t.checked_add_signed(every))?)
        } else if let Some(cron) = &s.cron {
            let cron = duration::cron(cron).ok()?;
            cron.find_next_occurrence(&last_start.unwrap_or(now), false).ok()
        } else {
            None
        }
    });

    let mut waiting_for = Vec::new();
    let after_due = match schedule.map(|s| &s.after) {
        Some(after) if !after.is_empty() => {
            for name in after {
                let succeeded = upstream.iter().find(|(n, _)| n == name).and_then(|(_, t)| *t);
                match (succeeded, last_start) {
                    (Some(t), Some(since)) if t > since => {}
                    (Some(_), None) => {}
                    _ => waiting_for.push(name.clone()),
                }
            }
            waiting_for.is_empty()
        }
        _ => false,
    };

    let retry_at = match last {
        Some(r) if r.result == "Failed" && status.consecutive_failures > 0 => {
            let exp = status.consecutive_failures.saturating_sub(1).min(16);
            let wait = FIRST_RETRY.saturating_mul(1 << exp).min(MAX_RETRY);
            last_end.and_then(|t| t.checked_add_signed(chrono::Duration::from_std(wait).ok()?))
        }
        _ => None,
    };

    let requested = sync
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REQUESTED_AT))
        .filter(|v| status.last_handled_requested_at.as_deref() != Some(v.as_str()));

    // A sync that follows others (`schedule.after`) first runs once they have all succeeded,
    // not on creation: its data would be older than its upstreams' next output. Later spec
    // changes run at once, like any sync's.
    let follows_others = schedule.is_some_and(|s| !s.after.is_empty());
    let run = if last.is_none() && follows_others {
        if after_due {
            Some(Trigger::After)
        } else {
            requested.map(|value| Trigger::Requested(value.clone()))
        }
    } else if last.is_none() || last.and_then(|r| r.generation) != Some(generation) {
        Some(Trigger::SpecChanged)
    } else if let Some(value) = requested {
        Some(Trigger::Requested(value.clone()))
    } else if next_scheduled.is_some_and(|t| t <= now) {
        Some(Trigger::Schedule)
    } else if after_due {
        Some(Trigger::After)
    } else if retry_at.is_some_and(|t| t <= now) {
        Some(Trigger::Retry)
    } else {
        None
    };
    let wake_at = [next_scheduled, retry_at]
        .into_iter()
        .flatten()
        .filter(|t| *t > now)
        .min();
    Decision {
        run,
        next_scheduled,
        wake_at,
        waiting_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::reverse_sync::{ReverseSyncStatus, RunSummary};

    fn sync(schedule: &str) -> ReverseSync {
        let yaml = format!(
            "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {{name: s, namespace: ns, generation: 3}}\n\
             spec:\n  source: {{connectionSecretRef: {{name: w}}, query: q, primaryKey: [id]}}\n  \
             destinationRef: {{name: d}}\n  mappings: [{{from: id, to: id}}]\n{schedule}"
        );
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    fn ran(mut s: ReverseSync, start: i64, result: &str, failures: u32) -> ReverseSync {
        s.status = Some(ReverseSyncStatus {
            last_run: Some(RunSummary {
                start: at(start).to_rfc3339(),
                end: Some(at(start + 5).to_rfc3339()),
                result: result.into(),
                generation: Some(3),
                ..RunSummary::default()
            }),
            consecutive_failures: failures,
            ..ReverseSyncStatus::default()
        });
        s
    }

    #[test]
    fn a_new_or_changed_sync_runs_at_once() {
        assert_eq!(decide(&sync(""), &[], at(0)).run, Some(Trigger::SpecChanged));
        let mut s = ran(sync(""), 0, "Succeeded", 0);
        assert_eq!(
            decide(&s, &[], at(100)).run,
            None,
            "no schedule: runs only on change"
        );
        s.metadata.generation = Some(4);
        assert_eq!(decide(&s, &[], at(100)).run, Some(Trigger::SpecChanged));
    }

    #[test]
    fn an_interval_runs_after_the_last_start_and_says_when() {
        let s = ran(sync("  schedule: {interval: 15m}\n"), 0, "Succeeded", 0);
        let d = decide(&s, &[], at(60));
        assert_eq!(
            (d.run, d.next_scheduled, d.wake_at),
            (None, Some(at(900)), Some(at(900)))
        );
        assert_eq!(decide(&s, &[], at(900)).run, Some(Trigger::Schedule));
        assert_eq!(period(&s, at(0)), Some(Duration::from_secs(900)));
    }

    #[test]
    fn an_interval_no_clock_can_hold_schedules_nothing_instead_of_overflowing() {
        for interval in ["300000y", "9y 11months", "99999999999999s"] {
            let s = ran(
                sync(&format!("  schedule: {{interval: {interval}}}\n")),
                0,
                "Succeeded",
                0,
            );
            let d = decide(&s, &[], at(60));
            assert_eq!(d.run, None, "{interval}");
            let _ = period(&s, at(0));
        }
        let s = ran(sync("  schedule: {cron: \"*/5 * * * * *\"}\n"), 0, "Succeeded", 0);
        assert_eq!(
            decide(&s, &[], at(60)).next_scheduled,
            None,
            "a seconds field is refused"
        );
    }

    #[test]
    fn cron_runs_at_its_next_time() {
        let s = ran(sync("  schedule: {cron: \"0 * * * *\"}\n"), 0, "Succeeded", 0);
        let d = decide(&s, &[], at(60));
        let next = d.next_scheduled.unwrap();
        assert_eq!(next.timestamp() % 3600, 0);
        assert!(next > at(0) && next <= at(3600));
        assert_eq!(decide(&s, &[], next).run, Some(Trigger::Schedule));
        assert_eq!(period(&s, at(0)), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn a_new_annotation_value_runs_once() {
        let mut s = ran(sync(""), 0, "Succeeded", 0);
        s.metadata.annotations = Some([(REQUESTED_AT.to_owned(), "now-1".to_owned())].into());
        assert_eq!(
            decide(&s, &[], at(10)).run,
            Some(Trigger::Requested("now-1".into()))
        );
        s.status.as_mut().unwrap().last_handled_requested_at = Some("now-1".into());
        assert_eq!(decide(&s, &[], at(10)).run, None);
    }

    #[test]
    fn a_full_resync_applies_only_to_the_request_it_names() {
        let mut s = ran(sync(""), 0, "Succeeded", 0);
        s.metadata.annotations = Some(
            [
                (REQUESTED_AT.to_owned(), "now-2".to_owned()),
                (FULL_RESYNC.to_owned(), "now-1".to_owned()),
            ]
            .into(),
        );
        assert!(
            !full_resync(&s, &Trigger::Requested("now-2".into())),
            "an older request's"
        );
        s.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(FULL_RESYNC.to_owned(), "now-2".to_owned());
        assert!(full_resync(&s, &Trigger::Requested("now-2".into())));
        assert!(!full_resync(&s, &Trigger::Schedule), "only a requested run");
        assert!(!full_resync(&s, &Trigger::Requested(String::new())));
    }

    #[test]
    fn a_preview_is_requested_until_the_plan_echoes_its_value() {
        let mut s = ran(sync(""), 0, "Succeeded", 0);
        assert_eq!(preview_requested(&s), None);
        s.metadata.annotations = Some([(PREVIEW_REQUESTED_AT.to_owned(), "p-1".to_owned())].into());
        assert_eq!(preview_requested(&s), Some("p-1".to_owned()));
        s.status.as_mut().unwrap().plan = Some(crate::api::reverse_sync::PlanPreview {
            requested_at: Some("p-1".into()),
            ..Default::default()
        });
        assert_eq!(preview_requested(&s), None);
    }

    #[test]
    fn after_waits_for_every_upstream_to_succeed_since_the_last_run() {
        let s = ran(sync("  schedule: {after: [model, other]}\n"), 100, "Succeeded", 0);
        let one = [
            ("model".to_owned(), Some(at(200))),
            ("other".to_owned(), Some(at(50))),
        ];
        let d = decide(&s, &one, at(300));
        assert_eq!((d.run, d.waiting_for), (None, vec!["other".to_owned()]));
        let both = [
            ("model".to_owned(), Some(at(200))),
            ("other".to_owned(), Some(at(250))),
        ];
        assert_eq!(decide(&s, &both, at(300)).run, Some(Trigger::After));
        let missing = [("model".to_owned(), Some(at(200)))];
        assert_eq!(
            decide(&s, &missing, at(300)).waiting_for,
            vec!["other".to_owned()]
        );
    }

    #[test]
    fn a_new_sync_that_follows_others_waits_for_their_first_success() {
        let s = sync("  schedule: {after: [model]}\n");
        let d = decide(&s, &[("model".to_owned(), None)], at(0));
        assert_eq!((d.run, d.waiting_for), (None, vec!["model".to_owned()]));
        let done = [("model".to_owned(), Some(at(-60)))];
        assert_eq!(
            decide(&s, &done, at(0)).run,
            Some(Trigger::After),
            "an upstream that already succeeded lets it run at once"
        );
        let mut s = ran(s, 100, "Succeeded", 0);
        s.metadata.generation = Some(4);
        assert_eq!(
            decide(&s, &[("model".to_owned(), Some(at(50)))], at(200)).run,
            Some(Trigger::SpecChanged),
            "a spec change of a sync that ran before runs at once"
        );
    }

    #[test]
    fn failed_runs_are_retried_with_growing_waits() {
        let s = ran(sync(""), 0, "Failed", 1);
        let d = decide(&s, &[], at(6));
        assert_eq!((d.run.clone(), d.wake_at), (None, Some(at(15))));
        assert_eq!(decide(&s, &[], at(15)).run, Some(Trigger::Retry));
        let s = ran(sync(""), 0, "Failed", 4);
        assert_eq!(decide(&s, &[], at(6)).wake_at, Some(at(85)));
        let s = ran(sync(""), 0, "Failed", 30);
        assert_eq!(
            decide(&s, &[], at(6)).wake_at,
            Some(at(605)),
            "capped at 10 minutes"
        );
    }
}
