//! Reading the model's rows for both planners: decode failures, keys and mappings become
//! rejections with their reasons, and duplicated keys are reported once each.

use super::{Collector, REJECTED_SAMPLES, REJECTION_BATCH, RunError, RunOptions, flush_rejections};
use crate::engine::mapping::Mapper;
use crate::engine::plan::{PlanOutcome, fingerprint, fingerprint_with_json_nulls};
use crate::engine::spill::SpillReader;
use crate::source;
use crate::state::StateStore;

/// Why every row of a repeated key is rejected: listed once per key, with its rows.
fn duplicate_key(rows: u64) -> String {
    format!("duplicate primary key: the model returned this key {rows} times, so every row of it is rejected")
}

/// What the model's next row became.
pub(super) enum NextRow {
    /// The model has no more rows.
    End,
    /// The row was rejected with its reason (a value that could not be decoded, a NULL key,
    /// a transform that failed); the key when it could be read.
    Rejected(Option<String>),
    /// The mapped row and its fingerprint; its canonical JSON is in the caller's buffer.
    Mapped(crate::engine::mapping::MappedRow, u64),
}

/// Reads and maps the model's next row, for both planners: stops a cancelled run, and hands
/// the rejections collected so far to the store in batches.
pub(super) async fn next_row(
    rows: &mut source::RowStream,
    mapper: &Mapper,
    store: &mut dyn StateStore,
    options: &RunOptions,
    canonical: &mut Vec<u8>,
    c: &mut Collector,
) -> Result<NextRow, RunError> {
    let Some(row) = rows.next().await else {
        return Ok(NextRow::End);
    };
    if options.cancel.is_cancelled() {
        return Err(RunError::Cancelled);
    }
    let row = row?;
    options.progress.row_read();
    if c.rejections.len() >= REJECTION_BATCH {
        flush_rejections(store, c, false).await;
    }
    let row = match row.decoded() {
        Ok(values) => values,
        Err(bad) => {
            return Ok(NextRow::Rejected(reject_undecodable(
                mapper,
                rows.columns(),
                &bad,
                c,
            )));
        }
    };
    Ok(match map_row(mapper, row, canonical, c) {
        Ok((mapped, fp)) => NextRow::Mapped(mapped, fp),
        Err(key) => NextRow::Rejected(key),
    })
}

/// Rejects a row holding a value the source could not decode: the reason names the column
/// and the kind of value, never the value. Returns the row's key when its key decoded.
fn reject_undecodable(
    mapper: &Mapper,
    columns: &[source::Column],
    row: &source::UndecodableRow,
    c: &mut Collector,
) -> Option<String> {
    let column = columns.get(row.column).map_or("?", |col| col.name.as_str());
    let reason = format!(
        "column {column:?} holds a value that cannot be read: {}",
        row.reason
    );
    let key = mapper.key(&row.values).ok();
    c.reject(key.as_deref(), "plan", &reason);
    key
}

/// Maps one extracted row: its key, mapped values, canonical JSON (in `canonical`) and
/// fingerprint. A row that cannot be mapped is rejected with its reason: `Err` with its key
/// when it has one.
fn map_row(
    mapper: &Mapper,
    row: Vec<crate::model::value::Value>,
    canonical: &mut Vec<u8>,
    c: &mut Collector,
) -> Result<(crate::engine::mapping::MappedRow, u64), Option<String>> {
    // Sizes and decimal exponents first, before anything is written out. The key is still
    // named (and so kept from a mirror delete) unless a key column is the value at fault.
    if let Err(fault) = mapper.check_values(&row) {
        let key = if fault.in_key { None } else { mapper.key(&row).ok() };
        c.reject(key.as_deref(), "plan", &fault.reason);
        return Err(key);
    }
    let key = match mapper.key(&row) {
        Ok(k) => k,
        Err(reason) => {
            c.reject(None, "plan", &reason);
            return Err(None);
        }
    };
    let mapped = match mapper.map(key, row) {
        Ok(m) => m,
        Err(rejection) => {
            c.reject(rejection.key.as_deref(), "plan", &rejection.reason);
            return Err(rejection.key);
        }
    };
    canonical.clear();
    mapper.write_fields(&mapped.values, canonical);
    if canonical.len() > crate::engine::mapping::MAX_ROW_BYTES {
        let reason = format!(
            "the mapped record is {} bytes, over the limit of {}",
            canonical.len(),
            crate::engine::mapping::MAX_ROW_BYTES
        );
        c.reject(Some(&mapped.key), "plan", &reason);
        return Err(Some(mapped.key));
    }
    let fp = fingerprint_with_json_nulls(fingerprint(canonical), &mapper.json_nulls(&mapped.values));
    Ok((mapped, fp))
}

/// Rejects each key the model returned more than once, once with its number of rows (found
/// when the plan finished): the stored keys seen repeated while planning, then the new keys
/// found in the spill (a few as samples, or all of them when the store logs rejections),
/// then rewinds the spill for delivery.
pub(super) fn report_duplicates(
    spilled: &mut SpillReader,
    plan: &PlanOutcome,
    known: std::collections::BTreeSet<String>,
    c: &mut Collector,
) -> std::io::Result<()> {
    let mut reported = std::collections::HashSet::new();
    for key in known {
        c.reject(Some(&key), "plan", &duplicate_key(plan.duplicate_rows(&key)));
        reported.insert(key);
    }
    while c.log_rejections || c.report.rejected_samples.len() < REJECTED_SAMPLES {
        let Some(row) = spilled.next_row()? else { break };
        let rows = plan.duplicate_rows(&row.key);
        if rows > 0 && !reported.contains(&row.key) {
            c.reject(Some(&row.key), "plan", &duplicate_key(rows));
            reported.insert(row.key);
        }
    }
    spilled.rewind()
}
