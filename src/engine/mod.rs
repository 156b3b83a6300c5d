//! The sync engine: extract → plan → deliver → commit. Knows nothing of Kubernetes.

pub mod value;
