//! One run of a sync: extract → plan → deliver → commit.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::cursor::{CursorRun, Read};
use super::delete_guard::{self, DeleteCheck, KeySetHash};
use super::mapping::{Mapper, MappingError};
use super::plan::{Change, Decision, PlanCounts, PlanOutcome};
use super::progress::{Phase, Progress};

mod checkpoints;
mod deletes;
mod in_memory;
mod rows;
mod store_diff;
use super::spill::SpillReader;
use crate::api::ReverseSyncSpec;
use crate::api::reverse_sync::RejectedRow;
use crate::api::{SyncMode, duration};
use crate::destination::PlannedSends;
use crate::destination::delivery::{AnswerClass, Delivered, Delivery, FatalDeliveryError};
use crate::model::record::{Operation, Record};
use crate::model::value::Document;
use crate::source::{self, SourceError, SourceOptions};
use crate::state::{RemoteDiff, Removed, RunLog, StateChange, StateError, StateStore};
use checkpoints::Checkpoints;
use deletes::Deletes;

/// Rejected rows kept as samples in a report.
const REJECTED_SAMPLES: usize = 10;

/// Rejections handed to a store that logs them, at most this many at a time.
const REJECTION_BATCH: usize = 1000;

/// Everything a run needs, resolved by the caller (the local runner or the controller).
pub struct SyncRun<'a> {
    /// Namespace of the sync (for logs).
    pub namespace: &'a str,
    /// Name of the sync (for logs).
    pub name: &'a str,
    /// The sync's spec.
    pub spec: &'a ReverseSyncSpec,
    /// The source connection URL (from its Secret; never logged).
    pub source_url: &'a str,
    /// The other keys of the source's Secret (private keys, client secrets; never logged).
    pub source_credentials: source::Credentials,
    /// The destination behind the shared delivery layers.
    pub delivery: Delivery,
    /// What the fingerprints are about (the destination's identity); a new scope resends all.
    pub scope: String,
}

/// How to run.
#[derive(Clone)]
pub struct RunOptions {
    /// Plan only: send nothing, change no state.
    pub dry_run: bool,
    /// Ignore stored fingerprints for this run: send every row.
    pub full_resync: bool,
    /// Cursor mode: read the whole model and diff it (deletes too) instead of reading past
    /// the high-water mark (`backflow run --full-diff`, a requested run in the cluster).
    pub full_diff: bool,
    /// Rows shown per operation in a dry run.
    pub sample_size: usize,
    /// Commit a checkpoint after this many settled records...
    pub checkpoint_records: usize,
    /// ...or after this long, whichever comes first.
    pub checkpoint_interval: Duration,
    /// Stops taking new batches; in-flight batches finish and are committed.
    pub cancel: CancellationToken,
    /// The run's live counters, for whoever shows its progress.
    pub progress: Arc<Progress>,
    /// The plan id of deletes past the delete limit that a person approved (the
    /// `backflow.dev/approve-deletes` annotation, `--approve-deletes`); it lets through only
    /// the plan it names.
    pub approved_deletes: Option<String>,
    /// Sends the cloud warehouses' requests to this base URL (a local double); set by tests
    /// only, see [`source::Connection::endpoint_override`].
    pub source_endpoint_override: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            dry_run: false,
            full_resync: false,
            full_diff: false,
            sample_size: 5,
            checkpoint_records: 10_000,
            checkpoint_interval: Duration::from_secs(5),
            cancel: CancellationToken::new(),
            progress: Arc::new(Progress::new()),
            approved_deletes: None,
            source_endpoint_override: None,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunResult {
    /// Every planned row was delivered.
    Succeeded,
    /// The run completed, but some rows were rejected (they are retried next run).
    PartiallySucceeded,
    /// The run stopped on an error, or rows failed after all retries.
    Failed,
}

impl RunResult {
    /// The name used in status and summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "Succeeded",
            RunResult::PartiallySucceeded => "PartiallySucceeded",
            RunResult::Failed => "Failed",
        }
    }
}

/// A row of a dry run's preview.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlanSample {
    /// The operation that would be sent.
    pub operation: String,
    /// The row's key.
    pub key: String,
    /// The record as it would be sent (canonical JSON).
    pub record: String,
}

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The spec is invalid for this model.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The state store failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The destination refused in a way no retry fixes.
    #[error(transparent)]
    Delivery(#[from] FatalDeliveryError),
    /// The temporary spill file failed.
    #[error("failed to buffer planned rows on local disk: {0}")]
    Spill(String),
    /// An invalid setting.
    #[error("invalid sync spec: {0}")]
    Invalid(String),
    /// The run was cancelled before it finished; committed rows are kept.
    #[error("run cancelled before it finished; the next run continues from the last checkpoint")]
    Cancelled,
}

impl RunError {
    /// A failure of the local spill or of the files beside it.
    pub(crate) fn spill(e: std::io::Error) -> RunError {
        RunError::Spill(e.to_string())
    }

    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            RunError::Mapping(_) | RunError::Invalid(_) => "InvalidSpec",
            RunError::Source(e) => e.category(),
            RunError::State(e) => e.category(),
            RunError::Delivery(_) => "DestinationRefused",
            RunError::Spill(_) => "LocalDisk",
            RunError::Cancelled => "Cancelled",
        }
    }

    /// True when running again unchanged cannot help: a person must fix something.
    pub fn is_permanent(&self) -> bool {
        match self {
            RunError::Mapping(_) | RunError::Invalid(_) | RunError::Delivery(_) => true,
            RunError::Source(e) => e.is_permanent(),
            RunError::State(StateError::Corrupt { .. } | StateError::Unusable { .. }) => true,
            RunError::State(_) | RunError::Spill(_) | RunError::Cancelled => false,
        }
    }
}

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    /// When the run started.
    pub started: DateTime<Utc>,
    /// When it ended.
    pub finished: DateTime<Utc>,
    /// How it ended.
    pub result: RunResult,
    /// The plan's counts.
    pub plan: PlanCounts,
    /// Records the destination accepted (upserts, updates, inserts).
    pub accepted: u64,
    /// Records the destination deleted (mirror).
    pub deleted: u64,
    /// Records the destination rejected.
    pub rejected: u64,
    /// Records that failed after every retry.
    pub failed: u64,
    /// Requests sent.
    pub requests: u64,
    /// Throttling answers received.
    pub throttled: u64,
    /// Time the delivery was held back by the rate limit or throttling answers.
    pub throttled_time: Duration,
    /// Requests sent again.
    pub retries: u64,
    /// The destination's answers by class.
    pub answers: Vec<(AnswerClass, u64)>,
    /// Order-independent fingerprint of the whole result set.
    pub result_fingerprint: String,
    /// A few rejected rows with reasons (keys only).
    pub rejected_samples: Vec<RejectedRow>,
    /// In a dry run, a few rows per operation.
    pub plan_samples: Vec<PlanSample>,
    /// What the source's login may do beyond reading; `None` when the run stopped before
    /// the source answered.
    pub source_privileges: Option<source::Privileges>,
    /// The error that stopped the run, if any.
    pub error: Option<RunError>,
    /// The mass-delete guard's finding, when the plan deleted anything (mirror mode).
    pub delete_check: Option<DeleteCheck>,
    /// Bytes the planned rows took on local disk (the spill, compressed).
    pub spill_bytes: u64,
    /// Cursor mode: how the run read the model.
    pub cursor: Option<CursorRead>,
}

/// How a run of a sync with a cursor read the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CursorRead {
    /// The whole model, with deletes, and why.
    FullDiff(&'static str),
    /// Only the rows whose cursor column is at or past this mark (its JSON).
    PastMark(String),
}

impl RunReport {
    /// True when the delete limit held this run's deletes back (or would, in a dry run).
    pub fn deletes_held_back(&self) -> bool {
        self.delete_check.as_ref().is_some_and(DeleteCheck::held_back)
    }

    /// Seconds the run took.
    pub fn seconds(&self) -> f64 {
        (self.finished - self.started).num_milliseconds() as f64 / 1000.0
    }

    /// Rows rejected by the planner or the destination.
    pub fn rows_rejected(&self) -> u64 {
        self.plan.rejected + self.rejected
    }
}

struct Collector {
    report: RunReport,
    pending: Vec<StateChange>,
    /// Cursor mode: the record to store once the run's last checkpoint is committed.
    cursor_record: Option<String>,
    last_commit: Instant,
    /// Whether the store logs every rejection (sync logs).
    log_rejections: bool,
    /// Rejections not yet handed to the store.
    rejections: Vec<RejectedRow>,
}

impl Collector {
    fn reject(&mut self, key: Option<&str>, operation: &str, reason: &str) {
        // The first rejections are warnings; the rest would flood the log, so they are debug.
        if self.report.rejected_samples.len() < REJECTED_SAMPLES {
            tracing::warn!(key = key.unwrap_or("(none)"), operation, reason, "row rejected");
        } else {
            tracing::debug!(key = key.unwrap_or("(none)"), operation, reason, "row rejected");
        }
        let row = || RejectedRow {
            key: key.unwrap_or("(none)").to_owned(),
            operation: operation.to_owned(),
            reason: reason.to_owned(),
        };
        if self.report.rejected_samples.len() < REJECTED_SAMPLES {
            self.report.rejected_samples.push(row());
        }
        if self.log_rejections {
            self.rejections.push(row());
        }
    }
}

/// Hands the buffered rejections to the store (sync logs); with `all` false, only once a
/// batch is full. A failure is logged: losing log rows must not fail a sync.
async fn flush_rejections(store: &mut dyn StateStore, c: &mut Collector, all: bool) {
    if c.rejections.is_empty() || (!all && c.rejections.len() < REJECTION_BATCH) {
        return;
    }
    if let Err(e) = store.record_rejections(&c.rejections).await {
        tracing::warn!(error = %e, rows = c.rejections.len(), "failed to write rejected rows to the sync log");
    }
    c.rejections.clear();
}

/// Runs a sync once against a state store. Always returns a report; `report.error` says why
/// a run stopped early. State advances only for records the destination accepted.
pub async fn run(mut job: SyncRun<'_>, store: &mut dyn StateStore, options: &RunOptions) -> RunReport {
    let started = Utc::now();
    let mut c = Collector {
        report: RunReport {
            started,
            finished: started,
            result: RunResult::Succeeded,
            plan: PlanCounts::default(),
            accepted: 0,
            deleted: 0,
            rejected: 0,
            failed: 0,
            requests: 0,
            throttled: 0,
            throttled_time: Duration::ZERO,
            retries: 0,
            answers: Vec::new(),
            result_fingerprint: String::new(),
            rejected_samples: Vec::new(),
            plan_samples: Vec::new(),
            source_privileges: None,
            error: None,
            delete_check: None,
            spill_bytes: 0,
            cursor: None,
        },
        pending: Vec::new(),
        cursor_record: None,
        last_commit: Instant::now(),
        log_rejections: !options.dry_run && store.logs_rejections(),
        rejections: Vec::new(),
    };
    options.progress.attach_delivery(job.delivery.shared_stats());
    let outcome = run_steps(&mut job, store, options, &mut c).await;
    let stats = job.delivery.stats();
    c.report.requests = stats.requests.load(Ordering::Relaxed);
    c.report.throttled = stats.throttled.load(Ordering::Relaxed);
    c.report.throttled_time = stats.throttled_time.total();
    c.report.retries = stats.retries.load(Ordering::Relaxed);
    c.report.answers = stats.answer_counts();
    // Whatever happened, what the destination accepted is committed.
    if !options.dry_run {
        options.progress.set_phase(Phase::Committing);
        let committed = commit(store, &job.scope, &mut c).await;
        let finished = match committed {
            Ok(()) => store.finish(&job.scope).await,
            Err(e) => Err(e),
        };
        if let Err(e) = finished {
            if outcome.is_ok() {
                c.report.error = Some(e.into());
            } else {
                tracing::error!(error = %e, "failed to commit state after an earlier error");
            }
        }
    }
    if let Err(e) = outcome {
        c.report.error = Some(e);
    }
    let r = &mut c.report;
    // Held-back deletes fail a real run: the plan was not carried out and a person must look.
    r.result = if r.error.is_some() || r.failed > 0 || (!options.dry_run && r.deletes_held_back()) {
        RunResult::Failed
    } else if r.rows_rejected() > 0 {
        RunResult::PartiallySucceeded
    } else {
        RunResult::Succeeded
    };
    r.finished = Utc::now();
    if !options.dry_run
        && r.result != RunResult::Failed
        && let Some(record) = c.cursor_record.take()
    {
        // After the last checkpoint and `finish`: the mark never gets ahead of the state.
        match store.commit_cursor(&job.scope, &record).await {
            Ok(()) => tracing::debug!("cursor high-water mark committed"),
            Err(e) => {
                tracing::warn!(error = %e, "failed to store the cursor's high-water mark; the next run reads from the previous one")
            }
        }
    }
    flush_rejections(store, &mut c, true).await;
    let r = &c.report;
    let log = RunLog {
        started: r.started,
        finished: r.finished,
        result: r.result.as_str().to_owned(),
        dry_run: options.dry_run,
        rows_in_model: r.plan.rows_in_model,
        rows_added: r.plan.added,
        rows_changed: r.plan.changed,
        rows_removed: r.plan.removed,
        rows_unchanged: r.plan.unchanged,
        rows_rejected: r.rows_rejected(),
        rows_failed: r.failed,
        requests: r.requests,
        error: r.error.as_ref().map(ToString::to_string),
    };
    if let Err(e) = store.end_run(&log).await {
        tracing::warn!(error = %e, "failed to record the run in the sync log");
    }
    c.report
}

async fn run_steps(
    job: &mut SyncRun<'_>,
    store: &mut dyn StateStore,
    options: &RunOptions,
    c: &mut Collector,
) -> Result<(), RunError> {
    let spec = job.spec;
    let source_options = SourceOptions {
        statement_timeout: match &spec.source.statement_timeout {
            Some(t) => duration::parse(t)
                .map_err(|e| RunError::Invalid(format!("spec.source.statementTimeout: {e}")))?,
            None => SourceOptions::default().statement_timeout,
        },
        ..SourceOptions::default()
    };
    let cursor = match &spec.cursor {
        Some(cursor) => {
            let stored = store.cursor(&job.scope).await?;
            let run = CursorRun::decide(
                spec,
                cursor,
                stored.as_deref(),
                options.full_diff,
                c.report.started,
            )?;
            c.report.cursor = Some(match &run.read {
                Read::FullDiff(why) => CursorRead::FullDiff(why),
                Read::PastMark { mark, .. } => {
                    CursorRead::PastMark(serde_json::to_string(mark).unwrap_or_default())
                }
            });
            Some(run)
        }
        None => None,
    };
    let query = match cursor.as_ref().map(|c| &c.read) {
        Some(Read::PastMark { column, mark }) => {
            tracing::info!(column = %column, mark = ?mark, "cursor: reading only the rows at or past the high-water mark");
            std::borrow::Cow::Owned(source::cursor::wrap_query(
                job.source_url,
                &spec.source.query,
                column,
                mark,
            )?)
        }
        Some(Read::FullDiff(why)) => {
            tracing::info!(reason = why, "cursor: full diff of the whole model");
            std::borrow::Cow::Borrowed(spec.source.query.as_str())
        }
        None => std::borrow::Cow::Borrowed(spec.source.query.as_str()),
    };
    // The query starts first so the database works while the state loads. A cancelled run
    // drops the extraction, which cancels a warehouse statement still running.
    let mut rows = tokio::select! {
        rows = source::extract_from(
            source::Connection {
                url: job.source_url,
                credentials: &job.source_credentials,
                endpoint_override: options.source_endpoint_override.as_deref(),
            },
            &query,
            &source_options,
        ) => rows?,
        () = options.cancel.cancelled() => return Err(RunError::Cancelled),
    };
    match rows.privileges() {
        source::Privileges::Elevated(found) => tracing::warn!(
            privileges = %found.join(", "),
            "the source user holds privileges that let a model query write despite the read-only \
             transaction; connect as a least-privilege role"
        ),
        source::Privileges::Unknown(reason) => {
            tracing::debug!(reason = %reason, "failed to check the source user's privileges");
        }
        source::Privileges::Least => {}
    }
    c.report.source_privileges = Some(rows.privileges().clone());
    let cursor_column = match &spec.cursor {
        Some(cursor) => {
            let i = super::cursor::column_index(rows.columns(), &cursor.column)?;
            rows.watch_cursor(i);
            rows.columns()[i].name.clone()
        }
        None => String::new(),
    };
    let mapper = Arc::new(Mapper::new(
        &spec.mappings,
        &spec.source.primary_key,
        &spec.match_fields,
        rows.columns(),
    )?);
    let pushed = match store.store_diff() {
        Some(diff) => {
            let pushed = diff.begin(&job.scope).await?;
            if pushed {
                diff.removed_keys(if cursor.as_ref().is_some_and(CursorRun::past_mark) {
                    Removed::Ignore
                } else if spec.mode == SyncMode::Mirror {
                    Removed::List
                } else {
                    // Every other mode keeps removed keys in the state: they are only counted.
                    Removed::Count
                });
            }
            pushed
        }
        None => false,
    };
    let Planned {
        mut deletes,
        stored_records,
        mut plan,
        spilled,
        decider,
        mut sends,
    } = if pushed {
        store_diff::plan(&mut rows, mapper, store, &job.scope, spec.mode, options, c).await?
    } else {
        in_memory::plan(&mut rows, mapper, store, &job.scope, spec.mode, options, c).await?
    };
    if let Some(cursor) = &cursor {
        let read_max = rows.cursor_max().map_err(|kind| {
            RunError::Invalid(format!(
                "spec.cursor.column: column {cursor_column:?} holds {kind} values; a cursor needs \
                 an integer, decimal, date or timestamp column"
            ))
        })?;
        let record = cursor.next_record(&cursor_column, read_max, c.report.started);
        c.cursor_record = Some(serde_json::to_string(&record).map_err(|e| RunError::Invalid(e.to_string()))?);
        if cursor.past_mark() {
            // Rows not read were not removed: only a full diff deletes.
            plan.counts.removed = 0;
            deletes = Deletes::None;
        }
    }
    c.report.plan = plan.counts;
    c.report.spill_bytes = spilled.bytes();
    c.report.result_fingerprint = plan.result_fingerprint.clone();
    options.progress.planned(&plan.counts);
    if spec.mode != SyncMode::Mirror {
        deletes = Deletes::None;
    }
    if !deletes.is_empty() {
        let mut keys = KeySetHash::default();
        for row in deletes.rows() {
            keys.add(&row?.0);
        }
        let check = delete_guard::check(
            &delete_guard::Limits::of(spec.delete_limit.as_ref()),
            stored_records,
            deletes.len(),
            keys,
            options.approved_deletes.as_deref(),
        );
        if let Some(reason) = &check.exceeded {
            if check.approved {
                tracing::warn!(plan_id = %check.plan_id, reason, "deletes past the delete limit go out: this plan was approved");
            } else {
                tracing::warn!(plan_id = %check.plan_id, reason, "deletes held back by the delete limit; adds and updates still go out");
                // The deleted rows stay in the state, so the next run plans them again.
                deletes = Deletes::None;
            }
        }
        c.report.delete_check = Some(check);
    }
    tracing::info!(
        rows = plan.counts.rows_in_model,
        added = plan.counts.added,
        changed = plan.counts.changed,
        removed = plan.counts.removed,
        unchanged = plan.counts.unchanged,
        rejected = plan.counts.rejected,
        store_diff = pushed,
        "plan ready"
    );
    if options.dry_run {
        for row in deletes.rows().take(options.sample_size) {
            let (key, record) = row?;
            c.report.plan_samples.push(PlanSample {
                operation: "delete".to_owned(),
                key,
                record,
            });
        }
        return Ok(());
    }

    // Deliver and commit: upserts first, then deletes.
    let to_send = plan.counts.added + plan.counts.changed + deletes.len();
    options.progress.delivering(to_send);
    sends.add(Operation::Delete, deletes.len());
    job.delivery.prepare(&sends);
    let job = &*job;
    let batches = SpillBatches::start(spilled, plan, decider, &job.delivery)?;
    deliver(job, store, options, c, batches.into_iter_batches()).await?;
    if !deletes.is_empty() {
        deliver(job, store, options, c, deletes.batches(job.delivery.batch_size())).await?;
    }
    Ok(())
}

/// A finished plan: the stored rows it refers to (all of them in memory, only the removed
/// ones when the store diffed), how many rows were stored, the outcome, the spilled rows and
/// how to read them.
struct Planned {
    /// The rows a `mirror` run deletes.
    deletes: Deletes,
    stored_records: u64,
    plan: PlanOutcome,
    spilled: SpillReader,
    decider: Decider,
    sends: PlannedSends,
}

/// How spilled rows become sends.
enum Decider {
    /// The planner decided each spilled row already; only duplicated keys are dropped.
    Planned,
    /// Every mapped row was spilled; the store's diff and the mode decide.
    Diff {
        /// The store's diff.
        diff: RemoteDiff,
        /// The sync's mode.
        mode: SyncMode,
    },
}

impl Decider {
    /// Whether a spilled row of `key` is sent, and with which operation and added flag.
    fn choose(
        &self,
        plan: &PlanOutcome,
        key: &str,
        operation: Operation,
        added: bool,
    ) -> Option<(Operation, bool)> {
        match self {
            Decider::Planned => (!plan.is_duplicate(key)).then_some((operation, added)),
            Decider::Diff { diff, mode } => {
                // One hash of the key serves both questions.
                let hash = crate::state::stored_key_hash(key);
                if plan.is_duplicate_stored(hash) {
                    return None;
                }
                let change = match diff.change(hash)? {
                    true => Change::Added,
                    false => Change::Changed,
                };
                match super::plan::decide(change, *mode) {
                    Decision::Send(operation, change) => Some((operation, change == Change::Added)),
                    _ => None,
                }
            }
        }
    }

    /// The next spilled row to send.
    fn next_row(
        &self,
        plan: &PlanOutcome,
        reader: &mut SpillReader,
    ) -> std::io::Result<Option<super::spill::SpilledRow>> {
        reader.next_row_where(|key, operation, added| self.choose(plan, key, operation, added))
    }
}

/// A batch ready to send: the operation and the records. What the state keeps of an accepted
/// record (its fingerprint and match fields) is taken from the record itself when it comes
/// back, so nothing per record waits beside the batch.
struct Batch {
    operation: Operation,
    records: Vec<Record>,
}

async fn deliver(
    job: &SyncRun<'_>,
    store: &mut dyn StateStore,
    options: &RunOptions,
    c: &mut Collector,
    batches: impl Iterator<Item = Result<Batch, RunError>>,
) -> Result<(), RunError> {
    let delivery = &job.delivery;
    // Requests in flight are bounded by the delivery's own semaphore (`max_concurrency`);
    // twice as many batches are kept going so that batches waiting out a retry backoff do not
    // leave the destination's rate unused.
    let concurrency = delivery.config().max_concurrency;
    let batches_in_progress = concurrency.saturating_mul(2).max(concurrency + 4);
    let mut read_error = None;
    let mut checkpoints = Checkpoints::new(store);
    let outcome = {
        let batches = futures::stream::iter(batches)
            .take_until(options.cancel.cancelled())
            .filter_map(|b| {
                let b = match b {
                    Ok(b) => Some(b),
                    Err(e) => {
                        read_error.get_or_insert(e);
                        None
                    }
                };
                async move { b }
            })
            .map(|batch| async move {
                let Batch { operation, records } = batch;
                delivery
                    .send_batch(operation, records)
                    .await
                    .map(|outcomes| (operation, outcomes))
            })
            .buffer_unordered(batches_in_progress);
        futures::pin_mut!(batches);
        loop {
            // While a checkpoint commits, the batches go on until the next checkpoint is full;
            // then they wait for the commit, so the changes held stay within two checkpoints.
            let may_send = !checkpoints.is_committing() || c.pending.len() < options.checkpoint_records;
            tokio::select! {
                biased;
                settled = checkpoints.settle(), if checkpoints.is_committing() => {
                    if let Err(failed) = settled {
                        c.pending.splice(0..0, failed.changes);
                        break Err(RunError::from(failed.error));
                    }
                }
                next = batches.next(), if may_send => {
                    let Some(result) = next else {
                        break Ok(());
                    };
                    let (operation, outcomes) = match result {
                        Ok(sent) => sent,
                        Err(e) => break Err(RunError::from(e)),
                    };
                    settle_outcomes(c, operation, outcomes);
                    let r = &c.report;
                    options
                        .progress
                        .delivered(r.accepted, r.deleted, r.rejected, r.failed);
                    let due = c.pending.len() >= options.checkpoint_records
                        || c.last_commit.elapsed() >= options.checkpoint_interval;
                    if due && !checkpoints.is_committing() {
                        start_checkpoint(&mut checkpoints, &job.scope, c);
                    }
                }
            }
        }
    };
    // Whatever happened, the checkpoint under way ends before the run goes on: its changes
    // are accepted rows, committed once more at the end of the run if this commit failed.
    let settled = checkpoints.settle().await;
    if let Err(failed) = settled {
        c.pending.splice(0..0, failed.changes);
        outcome?;
        return Err(failed.error.into());
    }
    outcome?;
    if let Some(e) = read_error {
        return Err(e);
    }
    if options.cancel.is_cancelled() {
        return Err(RunError::Cancelled);
    }
    Ok(())
}

/// Counts a sent batch's outcomes and queues the accepted records' state changes.
fn settle_outcomes(c: &mut Collector, operation: Operation, outcomes: Vec<(Record, Delivered)>) {
    for (record, delivered) in outcomes {
        match delivered {
            Delivered::Accepted => {
                if operation == Operation::Delete {
                    c.report.deleted += 1;
                    c.pending.push(StateChange::Remove { key: record.key });
                } else {
                    c.report.accepted += 1;
                    match super::spill::record_fingerprint(&record.fields) {
                        Some(fingerprint) => c.pending.push(StateChange::Put {
                            key: record.key,
                            fingerprint,
                            identity: record.identity.into_canonical_json(),
                        }),
                        // Records come back with the fields read from the spill, unchanged;
                        // were they not, the row is not stored and goes out again next run.
                        None => {
                            tracing::warn!(key = %record.key, "an accepted record came back without its spilled fields; it will be sent again")
                        }
                    }
                }
            }
            Delivered::Rejected(reason) => {
                c.report.rejected += 1;
                c.reject(Some(&record.key), operation.as_str(), &reason);
            }
            Delivered::Failed(reason) => {
                c.report.failed += 1;
                if c.report.failed <= REJECTED_SAMPLES as u64 {
                    tracing::warn!(key = %record.key, operation = operation.as_str(), reason, "record failed after retries");
                } else {
                    tracing::debug!(key = %record.key, operation = operation.as_str(), reason, "record failed after retries");
                }
            }
        }
    }
}

/// Hands the pending changes (and a full batch of rejections for the sync log) to a commit
/// that runs beside the requests.
fn start_checkpoint(checkpoints: &mut Checkpoints<'_>, scope: &str, c: &mut Collector) {
    let rejections = match c.rejections.len() >= REJECTION_BATCH {
        true => std::mem::take(&mut c.rejections),
        false => Vec::new(),
    };
    if c.pending.is_empty() && rejections.is_empty() {
        c.last_commit = Instant::now();
        return;
    }
    let changes = std::mem::take(&mut c.pending);
    if let Err((changes, rejections)) = checkpoints.start(scope.to_owned(), changes, rejections) {
        // Only called with no commit under way; kept for the next checkpoint all the same.
        c.pending = changes;
        c.rejections.extend(rejections);
    }
    c.last_commit = Instant::now();
}

async fn commit(store: &mut dyn StateStore, scope: &str, c: &mut Collector) -> Result<(), StateError> {
    flush_rejections(store, c, false).await;
    if !c.pending.is_empty() {
        store.commit(scope, &c.pending).await?;
        tracing::debug!(changes = c.pending.len(), "checkpoint committed");
        c.pending.clear();
    }
    c.last_commit = Instant::now();
    Ok(())
}

/// Spilled rows decoded ahead per message from the reading thread.
const ROWS_AHEAD_CHUNK: usize = 256;
/// Chunks the reading thread may have decoded ahead.
const CHUNKS_AHEAD: usize = 8;

/// Reads the spill back as batches of one operation, skipping duplicated keys. A thread of
/// its own reads, decompresses and decodes the rows ahead of the batches, so that work runs
/// beside the requests and the checkpoints.
struct SpillBatches<'p> {
    rows: std::sync::mpsc::Receiver<std::io::Result<Vec<super::spill::SpilledRow>>>,
    /// Rows received and not yet batched, in spill order.
    ready: std::vec::IntoIter<super::spill::SpilledRow>,
    /// Asked for the batch size at each batch: a destination may lower it during the run.
    delivery: &'p Delivery,
    carry: Option<super::spill::SpilledRow>,
}

impl<'p> SpillBatches<'p> {
    /// Starts the reading thread over `reader`; `plan` and `decider` choose the rows sent.
    /// When the connector reads the records' fields, the thread also builds their documents
    /// (mapped fields and match fields).
    fn start(
        mut reader: SpillReader,
        plan: PlanOutcome,
        decider: Decider,
        delivery: &'p Delivery,
    ) -> Result<SpillBatches<'p>, RunError> {
        let documents = delivery.reads_fields();
        let (send, rows) = std::sync::mpsc::sync_channel(CHUNKS_AHEAD);
        std::thread::Builder::new()
            .name("spill-reader".to_owned())
            .spawn(move || {
                loop {
                    let mut chunk = Vec::with_capacity(ROWS_AHEAD_CHUNK);
                    let mut end = false;
                    while chunk.len() < ROWS_AHEAD_CHUNK {
                        let row = decider.next_row(&plan, &mut reader).and_then(|row| match row {
                            Some(row) if documents => row
                                .fields
                                .parse_now()
                                .and_then(|()| row.identity.parse_now())
                                .map(|()| Some(row))
                                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
                            other => Ok(other),
                        });
                        match row {
                            Ok(Some(row)) => chunk.push(row),
                            Ok(None) => {
                                end = true;
                                break;
                            }
                            Err(e) => {
                                // The batches end at the error; a closed channel means the
                                // run stopped reading.
                                let _ = send.send(Err(e));
                                return;
                            }
                        }
                    }
                    if (!chunk.is_empty() && send.send(Ok(chunk)).is_err()) || end {
                        return;
                    }
                }
            })
            .map_err(RunError::spill)?;
        Ok(SpillBatches {
            rows,
            ready: Vec::new().into_iter(),
            delivery,
            carry: None,
        })
    }

    fn into_iter_batches(mut self) -> impl Iterator<Item = Result<Batch, RunError>> {
        std::iter::from_fn(move || self.next_batch().transpose())
    }

    /// The next row to send, `None` after the last.
    fn next_row(&mut self) -> Result<Option<super::spill::SpilledRow>, RunError> {
        loop {
            if let Some(row) = self.ready.next() {
                return Ok(Some(row));
            }
            match self.rows.recv() {
                Ok(chunk) => self.ready = chunk.map_err(RunError::spill)?.into_iter(),
                // The thread ended after sending its last rows.
                Err(_) => return Ok(None),
            }
        }
    }

    fn next_batch(&mut self) -> Result<Option<Batch>, RunError> {
        let batch_size = self.delivery.batch_size();
        let max_batch_bytes = self.delivery.config().max_batch_bytes;
        let mut batch: Option<Batch> = None;
        let mut bytes = 0usize;
        loop {
            let row = match self.carry.take() {
                Some(r) => r,
                None => match self.next_row()? {
                    Some(r) => r,
                    None => return Ok(batch),
                },
            };
            let b = batch.get_or_insert_with(|| Batch {
                operation: row.operation,
                records: Vec::with_capacity(batch_size),
            });
            // A batch ends at its record count or its byte size, whichever comes first; a row
            // alone over the byte size still goes, alone.
            let full = !b.records.is_empty() && bytes.saturating_add(row.bytes) > max_batch_bytes;
            if b.operation != row.operation || full {
                self.carry = Some(row);
                return Ok(batch);
            }
            bytes = bytes.saturating_add(row.bytes);
            b.records.push(Record {
                key: row.key,
                identity: row.identity,
                fields: row.fields,
            });
            if b.records.len() >= batch_size {
                return Ok(batch);
            }
        }
    }
}

fn identity_document(json: &str) -> Document {
    // The state only holds identities this engine wrote as canonical JSON.
    crate::model::record::parse_document(json).unwrap_or_default()
}
