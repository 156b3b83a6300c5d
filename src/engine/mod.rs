//! The sync engine: extract → plan → deliver → commit. Knows nothing of Kubernetes.

pub mod cursor;
pub mod delete_guard;
pub mod mapping;
pub mod plan;
pub mod run;
pub mod setup;
pub mod spill;
pub mod transform;
pub mod value;
