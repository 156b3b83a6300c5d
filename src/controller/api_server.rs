//! What an error from the API server says about the server itself: down or overloaded, or
//! starting again, and when this process last met it down.
//!
//! A kube-apiserver that has just started answers for a few seconds before it can serve:
//! 401 and 403 until its authenticator and RBAC caches are filled, and a plain-text
//! `404 page not found` for a custom resource until its CRD informer has synced. From a server
//! that stayed up those answers are final; right after an outage they only mean "not yet".
//! The outage may have been met by another request than the one now refused (a watch, an
//! earlier status write), so the last time is kept for the whole process: it talks to one API
//! server.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long after this process last met the API server down its refusals (see
/// [`starting_refusal`]) are taken for a server still starting.
const STARTING_FOR: Duration = Duration::from_secs(90);

/// When this process last met the API server down or overloaded.
static LAST_UNAVAILABLE: LastSeen = LastSeen::new();

/// True for failures a later try may not meet: no connection, 429 and 5xx.
fn unavailable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => matches!(status.code, 429 | 500 | 502 | 503 | 504),
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

/// True for the answers of a server that has just started (see the module's note): 401, 403,
/// and a 404 that is not a `NotFound` Status (an object's absence is one; a path the server
/// does not serve yet answers plain text, which kube cannot parse as a Status).
pub fn starting_refusal(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => match status.code {
            401 | 403 => true,
            404 => status.reason != "NotFound",
            _ => false,
        },
        _ => false,
    }
}

/// Notes `e` when it says the API server is down or overloaded ([`unavailable`]). Returns
/// whether it did.
pub fn note(e: &kube::Error) -> bool {
    let down = unavailable(e);
    if down {
        LAST_UNAVAILABLE.note(Instant::now());
    }
    down
}

/// Whether this process met the API server down within [`STARTING_FOR`].
pub fn recently_unavailable() -> bool {
    LAST_UNAVAILABLE.within(Instant::now(), STARTING_FOR)
}

/// The last time something was seen.
struct LastSeen(Mutex<Option<Instant>>);

impl LastSeen {
    const fn new() -> LastSeen {
        LastSeen(Mutex::new(None))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // A panic while holding this lock leaves a plain time that is still consistent.
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn note(&self, at: Instant) {
        let mut last = self.lock();
        if last.is_none_or(|t| t < at) {
            *last = Some(at);
        }
    }

    fn within(&self, now: Instant, window: Duration) -> bool {
        self.lock()
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }
}

#[cfg(test)]
mod tests {
    use kube::core::Status;

    use super::*;

    fn api(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Status::failure("refused", reason).with_code(code).boxed())
    }

    #[test]
    fn a_starting_servers_refusals_are_told_from_an_objects_absence_and_from_other_errors() {
        assert!(starting_refusal(&api(401, "Unauthorized")));
        assert!(starting_refusal(&api(403, "Forbidden")));
        // What kube makes of a plain-text `404 page not found`.
        assert!(starting_refusal(&api(404, "Failed to parse error data")));
        assert!(!starting_refusal(&api(404, "NotFound")), "the object is gone");
        assert!(!starting_refusal(&api(409, "Conflict")));
        assert!(!starting_refusal(&api(422, "Invalid")));
        assert!(!starting_refusal(&api(503, "ServiceUnavailable")));
        for code in [429, 500, 502, 503, 504] {
            assert!(unavailable(&api(code, "x")), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert!(!unavailable(&api(code, "x")), "{code}");
        }
    }

    #[test]
    fn an_outage_counts_for_the_window_after_it_was_last_met() {
        let seen = LastSeen::new();
        let start = Instant::now();
        assert!(!seen.within(start, STARTING_FOR), "never seen");
        seen.note(start);
        assert!(seen.within(start + STARTING_FOR / 2, STARTING_FOR));
        assert!(!seen.within(start + STARTING_FOR, STARTING_FOR));
        // An older sighting noted late does not move the last one back.
        seen.note(start + Duration::from_secs(10));
        seen.note(start);
        assert!(seen.within(start + STARTING_FOR + Duration::from_secs(5), STARTING_FOR));
    }

    #[test]
    fn only_an_unavailable_server_is_noted() {
        assert!(!note(&api(403, "Forbidden")));
        assert!(note(&api(503, "ServiceUnavailable")));
        assert!(recently_unavailable());
    }
}
