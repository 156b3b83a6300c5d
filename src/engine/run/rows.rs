//! Reading the model's rows for both planners: decode failures, keys and mappings become
//! rejections with their reasons, and duplicated keys are reported once each.
//!
//! Mapping a row, writing its canonical JSON and hashing it depend on that row alone, so
//! they run on a pool of blocking threads, a chunk of rows (as the source hands them over)
//! per task, a few chunks ahead of the planner. The planner takes the chunks back in the
//! model's order, so the spill, the duplicates and the rejections come out as they would
//! from one thread.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{Collector, REJECTED_SAMPLES, REJECTION_BATCH, RunError, RunOptions, flush_rejections};
use crate::engine::mapping::Mapper;
use crate::engine::plan::{PlanOutcome, fingerprint, fingerprint_with_json_nulls};
use crate::engine::spill::SpillReader;
use crate::model::value::Value;
use crate::source::{self, Column, SourceError, SourceRow};
use crate::state::stored_key_hash;

/// Why every row of a repeated key is rejected: listed once per key, with its rows.
fn duplicate_key(rows: u64) -> String {
    format!("duplicate primary key: the model returned this key {rows} times, so every row of it is rejected")
}

/// A mapped row, borrowed from its chunk until the next row is asked for.
pub(super) struct Mapped<'a> {
    /// The primary key in canonical text form.
    pub key: &'a str,
    /// The state stores' hash of the key ([`stored_key_hash`]).
    pub key_hash: u128,
    /// The record's canonical JSON.
    pub fields: &'a [u8],
    /// The canonical JSON of the match fields.
    pub identity: &'a [u8],
    /// The targets holding a JSON null (empty, without allocating, for almost every row).
    pub json_nulls: Vec<&'a str>,
    /// The record's fingerprint.
    pub fingerprint: u64,
}

/// What the model's next row became.
pub(super) enum NextRow<'a> {
    /// The model has no more rows.
    End,
    /// The row was rejected with its reason (a value that could not be decoded, a NULL key,
    /// a transform that failed); the key when it could be read.
    Rejected(Option<String>),
    /// The mapped row.
    Mapped(Mapped<'a>),
}

/// A row of a mapped chunk.
enum ChunkRow {
    /// Mapped: where its key, match fields and record lie in the chunk's bytes.
    Mapped {
        key: std::ops::Range<usize>,
        identity: std::ops::Range<usize>,
        fields: std::ops::Range<usize>,
        key_hash: u128,
        fingerprint: u64,
        /// The mappings whose value is a JSON null.
        json_nulls: Vec<usize>,
    },
    /// Rejected: its key when it has one, and why.
    Rejected { key: Option<String>, reason: String },
}

/// Rows of the source mapped together on a thread of the pool.
#[derive(Default)]
struct MappedChunk {
    /// Keys, match fields and records of the mapped rows, one after the other.
    bytes: Vec<u8>,
    rows: Vec<ChunkRow>,
}

/// The model's rows, mapped a few chunks ahead on a pool of blocking threads and handed out
/// in the model's order.
pub(super) struct MappedRows<'r> {
    rows: &'r mut source::RowStream,
    mapper: Arc<Mapper>,
    columns: Arc<[Column]>,
    /// Chunks being mapped, in the model's order.
    in_flight: VecDeque<tokio::task::JoinHandle<MappedChunk>>,
    /// Chunks kept in flight.
    ahead: usize,
    /// The source has no more rows (or failed: `failed` holds why, for after the rows
    /// before the failure).
    source_done: bool,
    failed: Option<SourceError>,
    /// The chunk being handed out, and its next row.
    current: MappedChunk,
    at: usize,
}

impl<'r> MappedRows<'r> {
    /// Maps the rows of `rows` with `mapper`.
    pub(super) fn new(rows: &'r mut source::RowStream, mapper: Arc<Mapper>) -> MappedRows<'r> {
        let columns = rows.columns().clone();
        // One chunk per core being mapped, and one more waiting, so that a thread of the
        // pool never waits for the planner to take a chunk back.
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        MappedRows {
            rows,
            mapper,
            columns,
            in_flight: VecDeque::new(),
            ahead: cores + 1,
            source_done: false,
            failed: None,
            current: MappedChunk::default(),
            at: 0,
        }
    }

    /// Hands the next chunk of the source to the pool; false when the source has no more.
    async fn dispatch(&mut self) -> bool {
        if self.source_done {
            return false;
        }
        match self.rows.next_chunk().await {
            Some(Ok(chunk)) => {
                let (mapper, columns) = (self.mapper.clone(), self.columns.clone());
                self.in_flight.push_back(tokio::task::spawn_blocking(move || {
                    map_chunk(&mapper, &columns, chunk)
                }));
                true
            }
            Some(Err(e)) => {
                self.failed = Some(e);
                self.source_done = true;
                false
            }
            None => {
                self.source_done = true;
                false
            }
        }
    }

    /// Reads and maps the model's next row: stops a cancelled run, rejects with its reason a
    /// row that cannot be mapped, and hands the rejections collected so far to the store in
    /// batches.
    pub(super) async fn next(
        &mut self,
        store: &mut dyn crate::state::StateStore,
        options: &RunOptions,
        c: &mut Collector,
    ) -> Result<NextRow<'_>, RunError> {
        while self.at >= self.current.rows.len() {
            while self.in_flight.len() < self.ahead && self.dispatch().await {}
            let Some(next) = self.in_flight.pop_front() else {
                return match self.failed.take() {
                    Some(e) => Err(e.into()),
                    None => Ok(NextRow::End),
                };
            };
            self.current = next
                .await
                .map_err(|e| RunError::Invalid(format!("mapping rows stopped: {e}")))?;
            self.at = 0;
        }
        if options.cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        options.progress.row_read();
        if c.rejections.len() >= REJECTION_BATCH {
            flush_rejections(store, c, false).await;
        }
        let at = self.at;
        self.at += 1;
        let chunk = &self.current;
        match &chunk.rows[at] {
            ChunkRow::Rejected { key, reason } => {
                c.reject(key.as_deref(), "plan", reason);
                Ok(NextRow::Rejected(key.clone()))
            }
            ChunkRow::Mapped {
                key,
                identity,
                fields,
                key_hash,
                fingerprint,
                json_nulls,
            } => Ok(NextRow::Mapped(Mapped {
                // Keys are written from valid UTF-8 pieces only (see `map_row`).
                key: std::str::from_utf8(&chunk.bytes[key.clone()]).unwrap_or_default(),
                key_hash: *key_hash,
                fields: &chunk.bytes[fields.clone()],
                identity: &chunk.bytes[identity.clone()],
                json_nulls: self.mapper.json_null_targets(json_nulls),
                fingerprint: *fingerprint,
            })),
        }
    }
}

/// Maps a chunk of the source's rows (on a thread of the pool).
fn map_chunk(mapper: &Mapper, columns: &[Column], rows: Vec<SourceRow>) -> MappedChunk {
    let mut chunk = MappedChunk {
        bytes: Vec::with_capacity(rows.len() * 256),
        rows: Vec::with_capacity(rows.len()),
    };
    let mut values = Vec::new();
    for row in rows {
        let mapped = match row.decoded() {
            Ok(row) => map_row(mapper, row, &mut values, &mut chunk.bytes),
            Err(bad) => Err(reject_undecodable(mapper, columns, &bad)),
        };
        chunk.rows.push(match mapped {
            Ok(row) => row,
            Err((key, reason)) => ChunkRow::Rejected { key, reason },
        });
    }
    chunk
}

/// A row holding a value the source could not decode: the reason names the column and the
/// kind of value, never the value, with the row's key when its key decoded.
fn reject_undecodable(
    mapper: &Mapper,
    columns: &[Column],
    row: &source::UndecodableRow,
) -> (Option<String>, String) {
    let column = columns.get(row.column).map_or("?", |col| col.name.as_str());
    let reason = format!(
        "column {column:?} holds a value that cannot be read: {}",
        row.reason
    );
    (mapper.key(&row.values).ok(), reason)
}

/// Maps one extracted row: its key, canonical JSON of match fields and record (appended to
/// `bytes`) and fingerprint. A row that cannot be mapped is rejected: `Err` with its key when
/// it has one, and why.
fn map_row(
    mapper: &Mapper,
    row: Vec<Value>,
    values: &mut Vec<Value>,
    bytes: &mut Vec<u8>,
) -> Result<ChunkRow, (Option<String>, String)> {
    // Sizes and decimal exponents first, before anything is written out. The key is still
    // named (and so kept from a mirror delete) unless a key column is the value at fault.
    if let Err(fault) = mapper.check_values(&row) {
        let key = if fault.in_key { None } else { mapper.key(&row).ok() };
        return Err((key, fault.reason));
    }
    let start = bytes.len();
    if let Err(reason) = mapper.write_key(&row, bytes) {
        bytes.truncate(start);
        return Err((None, reason));
    }
    let key = start..bytes.len();
    let Ok(key_text) = std::str::from_utf8(&bytes[key.clone()]) else {
        bytes.truncate(start);
        return Err((None, "the primary key is not valid UTF-8".to_owned()));
    };
    let key_hash = stored_key_hash(key_text);
    if let Err(rejection) = mapper.map_into(key_text, row, values) {
        bytes.truncate(start);
        return Err((rejection.key, rejection.reason));
    }
    let identity_start = bytes.len();
    mapper.write_identity(values, bytes);
    let fields_start = bytes.len();
    mapper.write_fields(values, bytes);
    let fields = fields_start..bytes.len();
    if fields.len() > crate::engine::mapping::MAX_ROW_BYTES {
        let reason = format!(
            "the mapped record is {} bytes, over the limit of {}",
            fields.len(),
            crate::engine::mapping::MAX_ROW_BYTES
        );
        let key = String::from_utf8_lossy(&bytes[key]).into_owned();
        bytes.truncate(start);
        return Err((Some(key), reason));
    }
    let json_nulls = mapper.json_null_mappings(values);
    let fingerprint = fingerprint_with_json_nulls(
        fingerprint(&bytes[fields.clone()]),
        &mapper.json_null_targets(&json_nulls),
    );
    Ok(ChunkRow::Mapped {
        key,
        identity: identity_start..fields_start,
        fields,
        key_hash,
        fingerprint,
        json_nulls,
    })
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
