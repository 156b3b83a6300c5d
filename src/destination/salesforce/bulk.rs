//! Bulk API 2.0 ingest jobs: how a large run's batches reach Salesforce.
//!
//! One batch (at most [`BULK_JOB_RECORDS`] records) is one job, or several when its CSV would
//! pass [`MAX_UPLOAD_BYTES`]:
//! 1. create: `POST /services/data/{v}/jobs/ingest` with `{"object", "externalIdFieldName",
//!    "contentType": "CSV", "operation": "upsert" | "delete", "lineEnding": "LF"}`; the answer
//!    is the job, `state: Open`;
//! 2. upload: `PUT …/jobs/ingest/{id}/batches`, `Content-Type: text/csv`, the whole CSV;
//! 3. close: `PATCH …/jobs/ingest/{id}` with `{"state": "UploadComplete"}`;
//! 4. poll: `GET …/jobs/ingest/{id}` with a growing pause until `JobComplete`, `Failed` or
//!    `Aborted`;
//! 5. results: `GET …/failedResults/` (`sf__Id`, `sf__Error`, then the uploaded columns) and
//!    `GET …/successfulResults/` (`sf__Id`, `sf__Created`, then the uploaded columns). Their
//!    order is not the upload's, so rows are matched back to records by the External ID value
//!    (delete jobs: by `Id`). A record in neither is retried.
//!
//! A failure before the job is closed aborts it (`PATCH {"state": "Aborted"}`, best effort)
//! and fails the batch as the call's answer says. After the close, the job runs on in
//! Salesforce whatever happens here, so a throttled or failed poll is polled again rather than
//! the batch sent anew, until [`BulkPolling::timeout`]. A job that ends `Failed` fails the
//! batch: for good when its `errorMessage` says the data cannot be read (`InvalidBatch : Field
//! name not found : X`), else to be retried; one that ends `Aborted` was stopped by a person
//! and stops the run.
//!
//! Deletes need Salesforce Ids: they are looked up with the same SOQL query as the collections
//! path, 200 External ID values a query, and the job's CSV has the one column `Id`.
//!
//! To the shared delivery machinery a job is one request: it takes one token of the rate
//! limiter, though it makes five or more HTTP calls, which are spread over the job's run time
//! by the pauses between polls. What the job meets on the way still counts in the run: a poll
//! or download repeated counts as a retry, a throttled one (`REQUEST_LIMIT_EXCEEDED`, the
//! org-wide allowance) as a throttle that pauses every sender of the Destination, and every
//! call of a job first waits out such a pause, whichever job or batch met the throttle
//! ([`report`]).
//!
//! Docs: <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/bulk_api_2_0.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/create_job.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/upload_job_data.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/close_job.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/get_job_info.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/bulk_api_2_job_states.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/get_job_successful_results.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/get_job_failed_results.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/abort_job.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/bulk_api_2_limits.htm>
//! (150 MB per job upload), <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/datafiles_prepare_csv.htm>
//! (uploads are base64-encoded on receipt, growing by about half: upload at most 100 MB).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value as Json, json};
use tokio::time::Instant;

use super::csv::{self, Table};
use super::{
    GONE_CODES, MAX_BATCH_SIZE, Payload, REQUEST_LIMIT_WAIT, Record, RecordOutcome, SalesforceConnector,
    SendError, TRANSIENT_CODES, VENDOR, is_api_name,
};
use crate::destination::delivery::report;
use crate::destination::vendor::answer::excerpt;

/// Records a run must send, with `bulk: auto`, for it to use Bulk API 2.0 unless
/// `bulkThreshold` says otherwise. Below it, sObject Collections cost at most 50 calls and
/// answer at once; above it, a job saves API calls (about 6 for 10,000 records instead of 50)
/// at the price of seconds to minutes of queueing.
pub const DEFAULT_BULK_THRESHOLD: u64 = 10_000;
/// Records per bulk job (the run's batch size when it uses Bulk API 2.0): Salesforce
/// processes job data in internal batches of 10,000 records, each counted against the org's
/// daily batch allocation, and it bounds the records a run holds in memory.
pub const BULK_JOB_RECORDS: usize = 10_000;
/// Most CSV bytes uploaded to one job: Salesforce takes at most 150 MB after base64 encoding,
/// and recommends at most 100 MB of data before it. A larger batch is split over several jobs.
pub const MAX_UPLOAD_BYTES: usize = 100 * 1024 * 1024;
/// The first pause before polling a job; each later pause doubles, up to [`MAX_POLL_PAUSE`].
pub const FIRST_POLL_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause between two polls of a job.
pub const MAX_POLL_PAUSE: Duration = Duration::from_secs(30);
/// How long a job may take, from its close to its results, before the batch is retried.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// How the connector follows a bulk job: first pause, longest pause, and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkPolling {
    /// Pause before the first poll; doubled after each poll.
    pub first_pause: Duration,
    /// Longest pause between polls.
    pub max_pause: Duration,
    /// Time after which an unfinished job is aborted and the batch made retryable.
    pub timeout: Duration,
}

impl Default for BulkPolling {
    fn default() -> Self {
        BulkPolling {
            first_pause: FIRST_POLL_PAUSE,
            max_pause: MAX_POLL_PAUSE,
            timeout: JOB_TIMEOUT,
        }
    }
}

/// A bulk operation and the CSV column its results are matched back on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Upsert,
    Delete,
}

impl JobKind {
    fn operation(self) -> &'static str {
        match self {
            JobKind::Upsert => "upsert",
            JobKind::Delete => "delete",
        }
    }
}

/// One record of a job: its position in the batch, the value its results are matched on, and
/// its CSV line.
struct Line {
    index: usize,
    key: String,
    csv: String,
}

/// One row of a job's results: the matched value and, for a failed record, `sf__Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResultRow {
    key: String,
    error: Option<String>,
}

/// What a poll or a result download met that was not an answer.
enum Hitch {
    /// Try again after at least this long; `throttled` when Salesforce said the org's
    /// allowance is spent.
    Wait { wait: Option<Duration>, throttled: bool },
    /// Give up with this error.
    Stop(SendError),
}

impl SalesforceConnector {
    /// Upserts a batch as one or more ingest jobs matched on the External ID field.
    pub(super) async fn bulk_upsert(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut rows = Vec::with_capacity(batch.len());
        let mut columns = BTreeSet::from([self.field.clone()]);
        for (i, record) in batch.iter().enumerate() {
            match self.external_id_of(record) {
                Ok(id) => {
                    let mut cells = csv::cells(&record.fields);
                    cells.insert(self.field.clone(), id.clone());
                    columns.extend(cells.keys().cloned());
                    rows.push((i, id, cells));
                }
                Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
            }
        }
        let header: Vec<String> = columns.into_iter().collect();
        let lines = rows
            .into_iter()
            .map(|(index, key, cells)| {
                let mut line = String::new();
                // A column the record lacks is left empty: Salesforce leaves that field as is.
                csv::push_row(
                    &mut line,
                    header.iter().map(|c| cells.get(c).map_or("", String::as_str)),
                );
                Line {
                    index,
                    key,
                    csv: line,
                }
            })
            .collect();
        for (index, outcome) in self.ingest(JobKind::Upsert, &header, lines).await? {
            outcomes[index] = Some(outcome);
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    /// Deletes a batch: looks the Ids up by External ID, then deletes them in ingest jobs.
    pub(super) async fn bulk_delete(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut wanted: Vec<(usize, String)> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match self.external_id_of(record) {
                Ok(value) => wanted.push((i, value)),
                Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
            }
        }
        let mut lines = Vec::new();
        for chunk in wanted.chunks(MAX_BATCH_SIZE) {
            let ids = self.lookup_ids(chunk.iter().map(|(_, v)| v.as_str())).await?;
            for (i, value) in chunk {
                match ids.get(value) {
                    Some(id) => {
                        let mut line = String::new();
                        csv::push_row(&mut line, [id.as_str()]);
                        lines.push(Line {
                            index: *i,
                            key: id.clone(),
                            csv: line,
                        });
                    }
                    // Records Salesforce does not have are already deleted.
                    None => outcomes[*i] = Some(RecordOutcome::Accepted),
                }
            }
        }
        for (index, outcome) in self.ingest(JobKind::Delete, &["Id".to_owned()], lines).await? {
            outcomes[index] = Some(outcome);
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    /// Runs the lines through as few jobs as the upload size allows; one outcome per line.
    async fn ingest(
        &self,
        kind: JobKind,
        header: &[String],
        lines: Vec<Line>,
    ) -> Result<Vec<(usize, RecordOutcome)>, SendError> {
        let mut head = String::new();
        csv::push_row(&mut head, header.iter().map(String::as_str));
        let key_column = match kind {
            JobKind::Upsert => self.field.as_str(),
            JobKind::Delete => "Id",
        };
        let mut outcomes = Vec::with_capacity(lines.len());
        let mut lines = lines.into_iter().peekable();
        while lines.peek().is_some() {
            let mut data = head.clone();
            let mut chunk: Vec<Line> = Vec::new();
            while let Some(line) =
                lines.next_if(|l| chunk.is_empty() || data.len() + l.csv.len() <= MAX_UPLOAD_BYTES)
            {
                data.push_str(&line.csv);
                chunk.push(line);
            }
            let (id, results) = self.run_job(kind, data.into_bytes(), key_column).await?;
            outcomes.extend(self.match_results(&id, kind, chunk, results));
        }
        Ok(outcomes)
    }

    /// Gives each line the outcome of the result row with its value, in upload order when
    /// a value repeats; a line with no result row is retried.
    fn match_results(
        &self,
        id: &str,
        kind: JobKind,
        chunk: Vec<Line>,
        results: Vec<ResultRow>,
    ) -> Vec<(usize, RecordOutcome)> {
        let mut by_key: HashMap<&str, VecDeque<usize>> = HashMap::new();
        for line in &chunk {
            by_key.entry(line.key.as_str()).or_default().push_back(line.index);
        }
        let mut settled: HashMap<usize, RecordOutcome> = HashMap::with_capacity(chunk.len());
        let mut strays = 0usize;
        for row in results {
            let Some(index) = by_key.get_mut(row.key.as_str()).and_then(VecDeque::pop_front) else {
                strays += 1;
                continue;
            };
            let outcome = match row.error {
                None => RecordOutcome::Accepted,
                Some(error) => self.scrub_outcome(error_outcome(&error, kind == JobKind::Delete)),
            };
            settled.insert(index, outcome);
        }
        if strays > 0 {
            tracing::warn!(job = %id, rows = strays, "bulk job results name records that were not uploaded");
        }
        chunk
            .into_iter()
            .map(|line| {
                let outcome = settled.remove(&line.index).unwrap_or_else(|| {
                    RecordOutcome::Retry(format!(
                        "{VENDOR} reported no result for the record in bulk job {id}"
                    ))
                });
                (line.index, outcome)
            })
            .collect()
    }

    /// Creates, fills, closes and follows one job; answers its id and its result rows.
    async fn run_job(
        &self,
        kind: JobKind,
        data: Vec<u8>,
        key_column: &str,
    ) -> Result<(String, Vec<ResultRow>), SendError> {
        let mut spec = json!({
            "object": self.object,
            "contentType": "CSV",
            "operation": kind.operation(),
            "lineEnding": "LF",
        });
        if kind == JobKind::Upsert {
            spec["externalIdFieldName"] = Json::String(self.field.clone());
        }
        let created = self
            .call(
                Method::POST,
                &self.data_path("/jobs/ingest"),
                Payload::Json(&spec),
            )
            .await
            .map_err(|e| refused_step(e, "create a bulk job"))?;
        let id = serde_json::from_slice::<Json>(&created)
            .ok()
            .and_then(|j| j.get("id").and_then(Json::as_str).map(str::to_owned))
            // The id goes into paths: only plain Ids are kept.
            .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
            .ok_or_else(|| SendError::Retryable {
                reason: format!(
                    "{VENDOR} answered a bulk job creation without a job id: {}",
                    excerpt(&created)
                ),
                retry_after: None,
                throttled: false,
            })?;
        let job_path = self.data_path(&format!("/jobs/ingest/{id}"));
        tracing::debug!(job = %id, operation = kind.operation(), bytes = data.len(), "bulk job created");

        let filled = async {
            self.call(Method::PUT, &format!("{job_path}/batches"), Payload::Csv(&data))
                .await
                .map_err(|e| refused_step(e, &format!("take the data of bulk job {id}")))?;
            let close = json!({"state": "UploadComplete"});
            self.call(Method::PATCH, &job_path, Payload::Json(&close))
                .await
                .map_err(|e| refused_step(e, &format!("close bulk job {id}")))
        }
        .await;
        drop(data);
        if let Err(error) = filled {
            self.abort(&id, &job_path).await;
            return Err(error);
        }

        let started = Instant::now();
        let job = self.follow(&id, &job_path, started).await?;
        let state = job.get("state").and_then(Json::as_str).unwrap_or_default();
        if state != "JobComplete" {
            let message = job.get("errorMessage").and_then(Json::as_str).unwrap_or_default();
            return Err(self.scrub_error(job_failure(&id, state, message), None));
        }
        let failed = self
            .get_patiently(&id, &format!("{job_path}/failedResults/"), started)
            .await?;
        let successful = self
            .get_patiently(&id, &format!("{job_path}/successfulResults/"), started)
            .await?;
        let mut rows = read_result_rows(&id, &successful, key_column, None)?;
        rows.extend(read_result_rows(&id, &failed, key_column, Some("sf__Error"))?);
        tracing::info!(
            job = %id,
            operation = kind.operation(),
            processed = job.get("numberRecordsProcessed").and_then(Json::as_u64).unwrap_or_default(),
            failed = job.get("numberRecordsFailed").and_then(Json::as_u64).unwrap_or_default(),
            "bulk job finished"
        );
        Ok((id, rows))
    }

    /// Polls a closed job until it ends; answers its last job info.
    async fn follow(&self, id: &str, job_path: &str, started: Instant) -> Result<Json, SendError> {
        let mut pause = self.polling.first_pause;
        loop {
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2).min(self.polling.max_pause);
            let body = self.get_patiently(id, job_path, started).await?;
            let job: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
            match job.get("state").and_then(Json::as_str) {
                Some("JobComplete" | "Failed" | "Aborted") => return Ok(job),
                Some("Open" | "UploadComplete" | "InProgress") => {}
                _ => {
                    return Err(SendError::Retryable {
                        reason: format!(
                            "{VENDOR} answered a poll of bulk job {id} without a known state: {}",
                            excerpt(&body)
                        ),
                        retry_after: None,
                        throttled: false,
                    });
                }
            }
            if started.elapsed() + pause > self.polling.timeout {
                self.abort(id, job_path).await;
                return Err(SendError::Retryable {
                    reason: format!(
                        "{VENDOR} bulk job {id} did not finish within {}s; it was aborted",
                        self.polling.timeout.as_secs_f64()
                    ),
                    retry_after: None,
                    throttled: false,
                });
            }
        }
    }

    /// A GET about a running or finished job, tried again on transient failures until the
    /// job's time is up: the job goes on in Salesforce, so sending the batch again would only
    /// repeat it.
    async fn get_patiently(&self, id: &str, path: &str, started: Instant) -> Result<Vec<u8>, SendError> {
        let mut pause = self.polling.first_pause;
        loop {
            let (wait, throttled) = match self.call(Method::GET, path, Payload::Empty).await {
                Ok(body) => return Ok(body),
                Err(error) => match hitch(error) {
                    Hitch::Wait { wait, throttled } => (wait, throttled),
                    Hitch::Stop(error) => return Err(error),
                },
            };
            let wait = wait.map_or(pause, |w| w.max(pause));
            pause = pause.saturating_mul(2).min(self.polling.max_pause);
            // `wait` may be a vendor's `Retry-After`: added without overflowing.
            if started.elapsed().saturating_add(wait) > self.polling.timeout {
                return Err(SendError::Retryable {
                    reason: format!(
                        "{VENDOR} did not answer about bulk job {id} within {}s",
                        self.polling.timeout.as_secs_f64()
                    ),
                    retry_after: None,
                    throttled: false,
                });
            }
            tracing::debug!(job = %id, wait_ms = wait.as_millis() as u64, throttled, "bulk job call failed; trying again");
            if throttled {
                report::throttled(wait);
            }
            report::retried();
            tokio::time::sleep(wait).await;
        }
    }

    /// Aborts a job this connector gave up on, so Salesforce does not process it; best effort.
    async fn abort(&self, id: &str, job_path: &str) {
        let body = json!({"state": "Aborted"});
        if let Err(error) = self.call(Method::PATCH, job_path, Payload::Json(&body)).await {
            tracing::debug!(job = %id, error = %error, "failed to abort bulk job");
        }
    }
}

/// A failed call before a job runs: a refusal of the request (400-like) is not about any one
/// record, so splitting the batch would only repeat it; it stops the run.
fn refused_step(error: SendError, step: &str) -> SendError {
    match error {
        SendError::BatchRejected(reason) => SendError::Fatal(format!("{VENDOR} refused to {step}: {reason}")),
        other => other,
    }
}

/// Whether a failed poll or download is worth repeating.
fn hitch(error: SendError) -> Hitch {
    match error {
        SendError::Retryable {
            retry_after,
            throttled,
            ..
        } => Hitch::Wait {
            wait: retry_after,
            throttled,
        },
        // Credentials rejected mid-job stop the run, as they do anywhere.
        SendError::Fatal(reason) if reason.starts_with("credentials rejected") => {
            Hitch::Stop(SendError::Fatal(reason))
        }
        // A job Salesforce no longer knows (deleted, expired): the batch is safe to send again.
        SendError::Fatal(reason) | SendError::BatchRejected(reason) | SendError::TooLarge { reason, .. } => {
            Hitch::Stop(SendError::Retryable {
                reason,
                retry_after: None,
                throttled: false,
            })
        }
    }
}

/// Markers of an `errorMessage` that no retry fixes: the data or the job cannot be read.
const FATAL_JOB_ERRORS: &[&str] = &[
    "InvalidBatch",
    "InvalidJob",
    "ClientInputError",
    "Field name not found",
    "INVALID_FIELD",
];
/// Markers of an `errorMessage` that says the org's allowance is spent.
const QUOTA_JOB_ERRORS: &[&str] = &["ExceededQuota", "REQUEST_LIMIT_EXCEEDED"];

/// Why a job that ended `Failed` or `Aborted` fails its batch.
fn job_failure(id: &str, state: &str, message: &str) -> SendError {
    let message = if message.is_empty() {
        "no errorMessage".to_owned()
    } else {
        excerpt(message.as_bytes())
    };
    let reason = format!("{VENDOR} bulk job {id} ended {state}: {message}");
    if state == "Aborted" {
        return SendError::Fatal(format!("{reason} (aborted in Salesforce)"));
    }
    if FATAL_JOB_ERRORS.iter().any(|m| message.contains(m)) {
        return SendError::Fatal(reason);
    }
    let throttled = QUOTA_JOB_ERRORS.iter().any(|m| message.contains(m));
    SendError::Retryable {
        reason,
        retry_after: throttled.then_some(REQUEST_LIMIT_WAIT),
        throttled,
    }
}

/// The rows of a results CSV: the value of `key_column` and, when `error_column` is given,
/// that column's text.
fn read_result_rows(
    id: &str,
    body: &[u8],
    key_column: &str,
    error_column: Option<&str>,
) -> Result<Vec<ResultRow>, SendError> {
    let unreadable = |why: String| SendError::Retryable {
        reason: format!("{VENDOR} answered unreadable results for bulk job {id}: {why}"),
        retry_after: None,
        throttled: false,
    };
    let text = std::str::from_utf8(body).map_err(|_| unreadable("not UTF-8".to_owned()))?;
    let table: Table = csv::parse(text).map_err(unreadable)?;
    if table.rows.is_empty() {
        return Ok(Vec::new());
    }
    let key = table
        .column(key_column)
        .ok_or_else(|| unreadable(format!("no column {key_column}")))?;
    let error = match error_column {
        Some(name) => Some(
            table
                .column(name)
                .ok_or_else(|| unreadable(format!("no column {name}")))?,
        ),
        None => None,
    };
    Ok(table
        .rows
        .into_iter()
        .map(|row| ResultRow {
            key: row.get(key).cloned().unwrap_or_default(),
            error: error.map(|e| row.get(e).cloned().unwrap_or_default()),
        })
        .collect())
}

/// The outcome of a failed record from its `sf__Error`, written `CODE:message:fields --`
/// (like `REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --`), in
/// the form the collections path gives: `CODE: message (fields)`.
fn error_outcome(error: &str, deleting: bool) -> RecordOutcome {
    let text = error.trim();
    let text = text.strip_suffix("--").unwrap_or(text).trim_end();
    let (code, rest) = match text.split_once(':') {
        Some((code, rest))
            if !code.is_empty() && code.chars().all(|c| c.is_ascii_uppercase() || c == '_') =>
        {
            (code, rest)
        }
        _ => ("", text),
    };
    let (message, fields) = match rest.rsplit_once(':') {
        Some((message, fields)) if fields.is_empty() || fields.split(',').all(is_api_name) => {
            (message, fields)
        }
        _ => (rest, ""),
    };
    let message = message.trim();
    let mut reason = match (code.is_empty(), message.is_empty()) {
        (true, true) => format!("{VENDOR} refused the record"),
        (true, false) => message.to_owned(),
        (false, true) => code.to_owned(),
        (false, false) => format!("{code}: {message}"),
    };
    if !fields.is_empty() {
        reason.push_str(&format!(" ({})", fields.replace(',', ", ")));
    }
    let reason = excerpt(reason.as_bytes());
    if deleting && GONE_CODES.contains(&code) {
        RecordOutcome::Accepted
    } else if TRANSIENT_CODES.contains(&code) {
        RecordOutcome::Retry(reason)
    } else {
        RecordOutcome::Rejected(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sf_errors_read_like_collections_errors_and_gone_or_locked_records_are_special() {
        assert_eq!(
            error_outcome(
                "REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --",
                false
            ),
            RecordOutcome::Rejected(
                "REQUIRED_FIELD_MISSING: Required fields are missing: [LastName] (LastName)".into()
            )
        );
        assert_eq!(
            error_outcome(
                "UNABLE_TO_LOCK_ROW:unable to obtain exclusive access to this record:--",
                false
            ),
            RecordOutcome::Retry(
                "UNABLE_TO_LOCK_ROW: unable to obtain exclusive access to this record".into()
            )
        );
        assert_eq!(
            error_outcome("ENTITY_IS_DELETED:entity is deleted:--", true),
            RecordOutcome::Accepted
        );
        assert_eq!(
            error_outcome("something odd happened", false),
            RecordOutcome::Rejected("something odd happened".into())
        );
    }

    #[test]
    fn a_failed_job_is_fatal_when_its_data_is_unreadable_and_retried_otherwise() {
        assert!(matches!(
            job_failure("750x", "Failed", "InvalidBatch : Field name not found : Phne"),
            SendError::Fatal(m) if m == "Salesforce bulk job 750x ended Failed: InvalidBatch : Field name not found : Phne"
        ));
        assert!(matches!(
            job_failure("750x", "Failed", "InternalServerError : retry later"),
            SendError::Retryable { throttled: false, .. }
        ));
        assert!(matches!(
            job_failure("750x", "Failed", "ExceededQuota : too many records"),
            SendError::Retryable {
                throttled: true,
                retry_after: Some(_),
                ..
            }
        ));
        assert!(matches!(job_failure("750x", "Aborted", ""), SendError::Fatal(_)));
    }

    #[test]
    fn result_rows_are_read_by_column_name_and_an_empty_answer_has_none() {
        let failed =
            b"\"sf__Id\",\"sf__Error\",\"Email__c\",\"LastName\"\n\"\",\"X:bad:--\",\"a@x.com\",\"#N/A\"\n";
        assert_eq!(
            read_result_rows("750x", failed, "Email__c", Some("sf__Error")).unwrap(),
            [ResultRow {
                key: "a@x.com".into(),
                error: Some("X:bad:--".into())
            }]
        );
        assert!(
            read_result_rows("750x", b"", "Email__c", None)
                .unwrap()
                .is_empty()
        );
        assert!(read_result_rows("750x", b"sf__Id\n003\n", "Email__c", None).is_err());
    }
}
