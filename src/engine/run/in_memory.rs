//! Planning in memory: every stored fingerprint is loaded and the planner decides row by
//! row, for a store without a diff of its own.

use super::deletes::Deletes;
use super::rows::{MappedRows, NextRow, report_duplicates};
use super::{Collector, Decider, PlanSample, Planned, RunError, RunOptions};
use crate::api::SyncMode;
use crate::destination::PlannedSends;
use crate::engine::mapping::Mapper;
use crate::engine::plan::{Change, Decision, Planner};
use crate::engine::progress::Phase;
use crate::engine::spill::{RowJson, SpillWriter};
use crate::model::record::Operation;
use crate::source;
use crate::state::StateStore;

/// Loads every stored fingerprint and plans in memory, spilling only what is to be sent: for
/// a store without a diff of its own, or one that declined it (the first run after a switch
/// of stores plans against the imported state).
pub(super) async fn plan(
    rows: &mut source::RowStream,
    mapper: std::sync::Arc<Mapper>,
    store: &mut dyn StateStore,
    scope: &str,
    mode: SyncMode,
    options: &RunOptions,
    c: &mut Collector,
) -> Result<Planned, RunError> {
    let state = store.load(scope).await?;
    tracing::info!(
        stored_rows = state.len(),
        state_bytes = state.memory_bytes(),
        "state loaded"
    );
    let mut planner = Planner::new(&state, mode, options.full_resync);
    let mut spill = SpillWriter::new().map_err(RunError::spill)?;
    let mut samples_per_op = std::collections::HashMap::<Operation, usize>::new();
    let mut rows = MappedRows::new(rows, mapper);
    let mut sends = PlannedSends::default();
    let mut stored_duplicates = std::collections::BTreeSet::new();
    loop {
        let mapped = match rows.next(store, options, c).await? {
            NextRow::End => break,
            NextRow::Rejected(key) => {
                // A rejected row keeps its stored record: it is neither sent nor deleted.
                if planner.reject(key.as_deref())
                    && let Some(key) = key
                {
                    stored_duplicates.insert(key);
                }
                options.progress.row_rejected();
                options.progress.row_planned();
                continue;
            }
            NextRow::Mapped(mapped) => mapped,
        };
        match planner.plan(mapped.key, mapped.fingerprint) {
            Decision::Send(operation, change) => {
                sends.add(operation, 1);
                if options.dry_run {
                    let n = samples_per_op.entry(operation).or_default();
                    if *n < options.sample_size {
                        *n += 1;
                        c.report.plan_samples.push(PlanSample {
                            operation: operation.as_str().to_owned(),
                            key: mapped.key.to_owned(),
                            record: String::from_utf8_lossy(mapped.fields).into_owned(),
                        });
                    }
                }
                spill
                    .push(
                        operation,
                        mapped.key,
                        mapped.fingerprint,
                        change == Change::Added,
                        RowJson {
                            identity: mapped.identity,
                            fields: mapped.fields,
                            json_nulls: &mapped.json_nulls,
                        },
                    )
                    .map_err(RunError::spill)?;
            }
            // Reported once per key when the plan is complete and its rows are counted.
            Decision::Duplicate => {
                stored_duplicates.insert(mapped.key.to_owned());
            }
            Decision::Skip(_) => {}
        }
        options.progress.row_planned();
    }
    options.progress.set_phase(Phase::Planning);
    let mut plan = planner.finish();
    let mut spilled = spill.into_reader().map_err(RunError::spill)?;
    if !plan.duplicates.is_empty() {
        report_duplicates(&mut spilled, &plan, stored_duplicates, c).map_err(RunError::spill)?;
        c.report.plan_samples.retain(|s| !plan.is_duplicate(&s.key));
    }
    Ok(Planned {
        stored_records: state.len() as u64,
        deletes: Deletes::Loaded {
            positions: std::mem::take(&mut plan.removed),
            state,
        },
        plan,
        spilled,
        decider: Decider::Planned,
        sends,
    })
}
