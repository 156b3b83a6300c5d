//! The sync engine: extract → plan → deliver → commit. Knows nothing of Kubernetes: it
//! drives a [`source`](crate::source), a [`state`](crate::state) store and a
//! [`destination`](crate::destination), speaking the shared [`model`](crate::model).

pub mod cursor;
pub mod delete_guard;
pub mod mapping;
pub mod plan;
pub mod progress;
pub mod run;
pub mod setup;
pub mod spill;
