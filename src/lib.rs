//! Backflow: reverse ETL as a Kubernetes operator.
//!
//! One run of a sync is four steps, in [`engine`]:
//!
//! ```text
//!  source (SQL, read-only)     state store (fingerprints)
//!        │ stream rows               │ load          ▲ commit in checkpoints
//!        ▼                           ▼               │
//!   extract ──────────────────▶ plan ──▶ deliver ──▶ commit
//!                    map, hash, diff   batch, rate-limit, retry,
//!                    added/changed/    split, concurrency
//!                    removed           (destination::delivery)
//! ```
//!
//! [`api`] holds the custom resources, [`source`] the warehouses, [`destination`] the
//! connectors and the shared delivery machinery, [`state`] the fingerprint stores,
//! [`controller`] the operator around the engine, [`local`] the `backflow run -f` runner that
//! drives the engine without a cluster, and [`egress`] the address ranges no connection may
//! reach. [`model`] is the vocabulary they all share (values, records, Secrets, labels).
//!
//! The layers stack, each importing only those below it (`tests/architecture.rs` checks it):
//!
//! ```text
//!  controller, local  →  engine  →  source, state, destination  →  api  →  model
//! ```

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod destination;
pub mod egress;
pub mod engine;
pub mod local;
pub mod metrics;
pub mod model;
pub mod redact;
pub mod source;
pub mod state;
pub mod template;
pub mod validate;
