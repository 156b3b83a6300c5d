//! Upper bounds of list sizes and numbers in specs, shared by the CRD schema (`maxItems`,
//! `maximum`) and the validation that runs where no API server checks the schema (local runs,
//! a stale CRD). One tenant's manifest must not cost the operator unbounded time or memory.

/// Mappings of a sync (HubSpot objects have a few hundred properties at most).
pub const MAX_MAPPINGS: usize = 1000;
/// Transforms of one mapping.
pub const MAX_TRANSFORMS: usize = 16;
/// Primary key columns, and `match` fields.
pub const MAX_KEY_COLUMNS: usize = 16;
/// Syncs in `schedule.after`.
pub const MAX_AFTER: usize = 32;
/// `spec.maxConcurrency` of a Destination: requests in flight per run.
pub const MAX_CONCURRENCY: u32 = 64;
