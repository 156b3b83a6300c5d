//! Containing panics: one tenant's manifest, row or vendor answer must never take the operator
//! down for every other tenant. A panic inside a reconcile or a run task fails that object with
//! a reason (condition and Event) and leaves the process, the other objects and the run slots
//! alone.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt;

/// Condition and Event reason of an object whose reconcile or run panicked.
pub const INTERNAL_ERROR: &str = "InternalError";

/// What a caught panic said, for the operator's log only: a panic message may quote data, so
/// it never goes to a status or an Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Panicked(pub String);

impl Panicked {
    /// The message shown on the object: what happened and where to look, without the panic's
    /// own text.
    pub fn public_message(&self, what: &str) -> String {
        format!(
            "failed to {what}: the operator hit an internal error (a panic, logged by the operator); \
             other objects are unaffected and this one is retried with backoff"
        )
    }
}

/// Runs `work`, turning a panic into `Err(Panicked)`. Every state the futures share is behind
/// mutexes that tolerate poisoning (`RunRegistry`, `SyncIndex`), so carrying on is sound.
pub async fn catch<F: Future>(work: F) -> Result<F::Output, Panicked> {
    AssertUnwindSafe(work).catch_unwind().await.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_owned());
        Panicked(message)
    })
}

/// Calls `on_drop` when dropped: releases a slot however the task that holds it ends
/// (returns, panics or is cancelled).
pub struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    /// A guard calling `on_drop` once.
    pub fn new(on_drop: F) -> OnDrop<F> {
        OnDrop(Some(on_drop))
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_and_the_guard_still_runs() {
        let released = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&released);
        let result = catch(async move {
            let _guard = OnDrop::new(move || flag.store(true, std::sync::atomic::Ordering::SeqCst));
            let big: u64 = "18446744073709551615".parse().unwrap();
            if big > 1 {
                panic!("overflow at {big}");
            }
            1
        })
        .await;
        assert_eq!(result, Err(Panicked("overflow at 18446744073709551615".into())));
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(catch(async { 2 }).await, Ok(2));
        let message = Panicked("secret-ish".into()).public_message("reconcile");
        assert!(!message.contains("secret-ish"), "{message}");
    }
}
