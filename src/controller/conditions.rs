//! kstatus conditions: `Ready`, `Reconciling`, `Stalled` and `Degraded`, so Flux, Argo CD and
//! `kubectl wait --for=condition=Ready` read Backflow objects like any other. One more,
//! `SourcePrivileged`, warns without touching those four: a risk is not a failure.

use chrono::{DateTime, Utc};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The object works as asked.
pub const READY: &str = "Ready";
/// Work is in flight (a run, a connection check).
pub const RECONCILING: &str = "Reconciling";
/// Progress stopped on an error a retry cannot fix: a person must act.
pub const STALLED: &str = "Stalled";
/// It works, but not fully: the last run rejected rows.
pub const DEGRADED: &str = "Degraded";
/// The source's login holds privileges that escape the read-only transaction (superuser,
/// a server-files role, `FILE`): true until the sync connects as a least-privilege role.
pub const SOURCE_PRIVILEGED: &str = "SourcePrivileged";

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// Converts a chrono time to the API's time.
pub fn api_time(at: DateTime<Utc>) -> Time {
    // Every chrono UTC time within jiff's range (years -9999..=9999) converts; the fallback
    // is never reached for times the operator makes.
    Time(k8s_openapi::jiff::Timestamp::from_millisecond(at.timestamp_millis()).unwrap_or_default())
}

/// Sets condition `type_` in `conditions`, keeping its `lastTransitionTime` when the status does
/// not change. Messages are cut to the API's 32 KiB limit.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: Status,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: DateTime<Utc>,
) {
    let message = truncate(message, 32 * 1024 - 16);
    let reason = if reason.is_empty() { type_ } else { reason };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != status.as_str() {
                c.last_transition_time = api_time(now);
            }
            c.status = status.as_str().to_owned();
            c.reason = reason.to_owned();
            c.message = message;
            c.observed_generation = generation;
        }
        None => conditions.push(Condition {
            type_: type_.to_owned(),
            status: status.as_str().to_owned(),
            reason: reason.to_owned(),
            message,
            observed_generation: generation,
            last_transition_time: api_time(now),
        }),
    }
}

/// The condition of type `type_`, if set.
pub fn get<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True when condition `type_` is set to `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    get(conditions, type_).is_some_and(|c| c.status == "True")
}

fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let t0 = DateTime::from_timestamp(1_000, 0).unwrap();
        let t1 = DateTime::from_timestamp(2_000, 0).unwrap();
        let mut c = Vec::new();
        set(&mut c, READY, Status::True, "Succeeded", "ok", Some(1), t0);
        set(&mut c, READY, Status::True, "Succeeded", "still ok", Some(2), t1);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].last_transition_time, api_time(t0));
        assert_eq!(
            (c[0].message.as_str(), c[0].observed_generation),
            ("still ok", Some(2))
        );
        set(&mut c, READY, Status::False, "Failed", "no", Some(2), t1);
        assert_eq!(c[0].last_transition_time, api_time(t1));
        assert!(!is_true(&c, READY));
        set(&mut c, STALLED, Status::True, "", "x", None, t1);
        assert_eq!(
            get(&c, STALLED).unwrap().reason,
            STALLED,
            "an empty reason is not allowed"
        );
    }

    #[test]
    fn long_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(40_000);
        let mut c = Vec::new();
        set(&mut c, READY, Status::False, "R", &long, None, Utc::now());
        assert!(c[0].message.len() <= 32 * 1024);
        assert!(c[0].message.ends_with('…'));
    }
}
