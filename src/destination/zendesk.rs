//! The `zendesk` destination: Zendesk Support users or organizations, written through the
//! bulk endpoints, which answer with a background job the connector follows to its end.
//!
//! - upsert (also update and insert, which Zendesk's bulk API cannot tell apart):
//!   `POST /api/v2/{users,organizations}/create_or_update_many` with at most 100 objects; the
//!   answer is a queued `job_status`, polled at `GET /api/v2/job_statuses/{id}.json` with a
//!   growing pause until it is `completed` or `failed`; its `results` give each object's
//!   outcome by `index`;
//! - delete (mirror): `DELETE /api/v2/{users,organizations}/destroy_many?external_ids=a,b`,
//!   also a job; only records matched on `external_id` can be deleted this way.
//!
//! Docs: <https://developer.zendesk.com/api-reference/ticketing/users/users/#create-or-update-many-users>,
//! <https://developer.zendesk.com/api-reference/ticketing/users/users/#bulk-delete-users>,
//! <https://developer.zendesk.com/api-reference/ticketing/organizations/organizations/#create-or-update-many-organizations>,
//! <https://developer.zendesk.com/api-reference/ticketing/ticket-management/job_statuses/>,
//! <https://developer.zendesk.com/api-reference/introduction/security-and-auth/> (API token:
//! HTTP Basic `{email}/token:{api_token}`),
//! <https://developer.zendesk.com/api-reference/introduction/rate-limits/>.
//!
//! The record's match field (`external_id` or `email` for users, `external_id` or `name` for
//! organizations) is written into the object. Mapped fields become the object's attributes as
//! JSON; a `user_fields`/`organization_fields` object passes through, and a target written
//! `user_fields.x` (or `organization_fields.x`) is nested under it.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value as Json, json};

use super::delivery::report;
use super::vendor;
use super::vendor::answer::{RequestLabel, excerpt, retry_after, status_error, transport_error};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::{ZendeskObject, ZendeskSpec};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::Value;
use crate::redact::Scrubber;

/// Objects per `create_or_update_many` or `destroy_many` call, Zendesk's documented limit.
pub const MAX_BATCH_SIZE: usize = 100;
/// The Secret key holding the API token unless `credentialsSecretRef.key` names another.
pub const DEFAULT_SECRET_KEY: &str = "token";
/// The Secret key holding the email of the agent the token belongs to.
pub const EMAIL_SECRET_KEY: &str = "email";
/// Requests per second: Zendesk allows 200 (Team) to 700 (Enterprise) requests a minute;
/// 3 a second (180 a minute) stays under the smallest plan, job polls included.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 3.0;
/// Requests in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 2;
/// Request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The first pause before polling a job; each later pause doubles, up to [`MAX_POLL_PAUSE`].
pub const FIRST_POLL_PAUSE: Duration = Duration::from_millis(100);
/// The longest pause between two polls of a job.
pub const MAX_POLL_PAUSE: Duration = Duration::from_secs(2);
/// How long a job may take before the batch is retried.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// The vendor's name in messages.
const VENDOR: &str = "Zendesk";

/// How the connector follows a job: first pause, longest pause, and how long it waits at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobPolling {
    /// Pause before the first poll; doubled after each poll.
    pub first_pause: Duration,
    /// Longest pause between polls.
    pub max_pause: Duration,
    /// Time after which an unfinished job makes the batch retryable.
    pub timeout: Duration,
}

impl Default for JobPolling {
    fn default() -> Self {
        JobPolling {
            first_pause: FIRST_POLL_PAUSE,
            max_pause: MAX_POLL_PAUSE,
            timeout: JOB_TIMEOUT,
        }
    }
}

/// Zendesk Support users or organizations, written through the bulk job endpoints.
pub struct ZendeskConnector {
    client: reqwest::Client,
    base: String,
    host: String,
    object: ZendeskObject,
    headers: HeaderMap,
    polling: JobPolling,
    scrubber: Scrubber,
}

impl std::fmt::Debug for ZendeskConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZendeskConnector")
            .field("base", &self.base)
            .field("object", &self.object)
            .field("polling", &self.polling)
            .finish_non_exhaustive()
    }
}

/// A finished job: its status and its results.
#[derive(Debug, Clone, PartialEq)]
struct Job {
    status: String,
    message: String,
    results: Vec<Json>,
}

impl ZendeskConnector {
    /// Builds the connector: checks the subdomain and the base URL, and reads the email and
    /// API token from the Secret.
    pub fn new(
        spec: &ZendeskSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let ZendeskSpec {
            subdomain,
            object,
            base_url,
        } = spec;
        let valid_subdomain = !subdomain.is_empty()
            && subdomain.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !subdomain.starts_with('-');
        if !valid_subdomain {
            return Err(DestinationError::Invalid(format!(
                "spec.zendesk.subdomain: {subdomain:?} is not a subdomain; write `acme` for \
                 https://acme.zendesk.com"
            )));
        }
        let default_base = format!("https://{subdomain}.zendesk.com");
        let base_text = base_url.as_deref().unwrap_or(&default_base);
        let host = vendor::host(&vendor::http_url("spec.zendesk.baseUrl", base_text, "")?);

        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "zendesk")?;
        let value_of = |key: &str| vendor::secret_value(data, &secret_ref.name, key);
        let token_key = secret_ref.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        let token = value_of(token_key)?;
        let email = value_of(EMAIL_SECRET_KEY)?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{email}/token:{token}"));
        let auth = vendor::sensitive_header(&format!("Basic {encoded}"), || {
            format!(
                "keys {EMAIL_SECRET_KEY:?} and {token_key:?} of Secret {:?} do not make a valid \
                 credential",
                secret_ref.name
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);

        let client = vendor::client(TIMEOUT)?;

        // The encoded credential is masked too, should a message ever echo the header.
        let encoded_secret = SecretData::new(std::iter::once(("basic".to_owned(), encoded)).collect());
        Ok(ZendeskConnector {
            client,
            base: base_text.trim_end_matches('/').to_owned(),
            host,
            object: *object,
            headers,
            polling: JobPolling::default(),
            scrubber: Scrubber::new()
                .with_secret(secret)
                .with_secret(Some(&encoded_secret)),
        })
    }

    /// The same connector following jobs with other pauses and timeout.
    pub fn with_polling(mut self, polling: JobPolling) -> Self {
        self.polling = polling;
        self
    }

    fn label(&self, method: Method, url: &str) -> RequestLabel {
        RequestLabel {
            method,
            url: self.scrubber.scrub(url),
            host: self.host.clone(),
        }
    }

    /// The singular of the object, as Zendesk names its custom fields (`user_fields`).
    fn fields_key(&self) -> &'static str {
        match self.object {
            ZendeskObject::Users => "user_fields",
            ZendeskObject::Organizations => "organization_fields",
        }
    }

    /// The attributes that identify a record, in order of preference.
    fn identifiers(&self) -> &'static [&'static str] {
        match self.object {
            ZendeskObject::Users => &["external_id", "email"],
            ZendeskObject::Organizations => &["external_id", "name"],
        }
    }

    /// The record's identifying attribute and value, from its identity (the sync's match
    /// fields); a missing or unsupported match field is the reason the record is rejected.
    fn identity_of(&self, record: &Record) -> Result<(&'static str, Json), String> {
        for name in self.identifiers() {
            if let Some(value) = record.identity.get(*name) {
                if value.is_null() {
                    return Err(format!("the match field {name} is NULL"));
                }
                return Ok((name, Json::String(value.to_text())));
            }
        }
        let names: Vec<&str> = record.identity.keys().map(String::as_str).collect();
        Err(format!(
            "{VENDOR} {} are matched on {}; the sync matches on {names:?}",
            self.object.as_str(),
            self.identifiers().join(" or ")
        ))
    }

    /// The object sent for a record: its mapped fields as JSON, custom fields nested under
    /// `user_fields`/`organization_fields`, and the identifying attribute.
    fn object_of(&self, record: &Record, id_name: &str, id_value: Json) -> Json {
        let fields_key = self.fields_key();
        let prefix = format!("{fields_key}.");
        let mut out = Map::new();
        let mut custom = Map::new();
        for (name, value) in &record.fields {
            if name == fields_key
                && let Value::Object(nested) = value
            {
                for (k, v) in nested {
                    custom.insert(k.clone(), v.to_json());
                }
                continue;
            }
            match name.strip_prefix(&prefix) {
                Some(field) => {
                    custom.insert(field.to_owned(), value.to_json());
                }
                None => {
                    out.insert(name.clone(), value.to_json());
                }
            }
        }
        if !custom.is_empty() {
            out.insert(fields_key.to_owned(), Json::Object(custom));
        }
        out.insert(id_name.to_owned(), id_value);
        Json::Object(out)
    }

    /// Sends one request and returns the body of a 2xx answer, or what the failure means.
    async fn request(&self, method: Method, url: &str, body: Option<&Json>) -> Result<Vec<u8>, SendError> {
        let label = self.label(method.clone(), url);
        let mut request = self.client.request(method, url).headers(self.headers.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.scrubber.error(transport_error(&label, e, TIMEOUT)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = super::vendor::read_body(response, super::vendor::MAX_RESPONSE_BYTES, &label, TIMEOUT)
            .await
            .map_err(|e| self.scrubber.error(e))?;
        if status.is_success() {
            Ok(bytes.to_vec())
        } else {
            Err(self
                .scrubber
                .error(self.failure(&label, status, &headers, &bytes)))
        }
    }

    /// What a non-2xx answer means for the batch, in Zendesk's terms.
    fn failure(
        &self,
        label: &RequestLabel,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> SendError {
        let code = status.as_u16();
        let message = zendesk_message(body);
        let detail = vendor::detail(&message);
        match code {
            401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code}){detail}")),
            404 => SendError::Fatal(format!(
                "{VENDOR} has no such endpoint or account (HTTP 404 from {} {}){detail}",
                label.method, label.url
            )),
            429 => SendError::Retryable {
                reason: format!("{VENDOR} is throttling requests (HTTP 429){detail}"),
                retry_after: retry_after(headers, SystemTime::now()),
                throttled: true,
            },
            400 | 409 | 413 | 422 => SendError::BatchRejected(if message.is_empty() {
                format!("{VENDOR} refused the batch (HTTP {code})")
            } else {
                message
            }),
            _ => status_error(label, status, headers, body),
        }
    }

    /// Follows the job a bulk call queued until it finishes, pausing longer between polls.
    async fn follow(&self, answer: &[u8]) -> Result<Job, SendError> {
        let queued = job_of(answer).ok_or_else(|| SendError::Retryable {
            reason: format!(
                "{VENDOR} answered a bulk call without a job_status: {}",
                excerpt(answer)
            ),
            retry_after: None,
            throttled: false,
        })?;
        if is_finished(&queued.status) {
            return Ok(queued);
        }
        let id = job_id(answer).ok_or_else(|| SendError::Retryable {
            reason: format!("{VENDOR} answered a bulk call with a job without an id"),
            retry_after: None,
            throttled: false,
        })?;
        // The job's own `url` is ignored: polling the base URL keeps the credentials on the
        // host the Destination names.
        let url = format!("{}/api/v2/job_statuses/{id}.json", self.base);
        let started = tokio::time::Instant::now();
        let mut pause = self.polling.first_pause;
        loop {
            if started.elapsed() + pause > self.polling.timeout {
                return Err(SendError::Retryable {
                    reason: format!(
                        "{VENDOR} job {id} did not finish within {}s",
                        self.polling.timeout.as_secs_f64()
                    ),
                    retry_after: None,
                    throttled: false,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(self.polling.max_pause);
            // A throttle another batch met holds the polls back too: the limit is the account's.
            report::pause_over().await;
            let body = match self.request(Method::GET, &url, None).await {
                Ok(body) => body,
                // A job status expires after a while; the batch is safe to send again.
                Err(SendError::Fatal(reason)) if !reason.starts_with("credentials rejected") => {
                    return Err(SendError::Retryable {
                        reason,
                        retry_after: None,
                        throttled: false,
                    });
                }
                Err(SendError::BatchRejected(reason)) => {
                    return Err(SendError::Retryable {
                        reason,
                        retry_after: None,
                        throttled: false,
                    });
                }
                // The job runs on whatever a poll meets: a throttled or failed poll is tried
                // again (after `Retry-After` when Zendesk names one) rather than resending
                // the batch as a new job.
                // It counts in the run's retries, and a throttle also in `throttled`, pausing
                // every sender of the Destination.
                Err(SendError::Retryable {
                    retry_after,
                    throttled,
                    ..
                }) => {
                    if let Some(wait) = retry_after {
                        pause = pause.max(wait);
                    }
                    if throttled {
                        report::throttled(pause);
                    }
                    report::retried();
                    continue;
                }
                Err(fatal) => return Err(fatal),
            };
            match job_of(&body) {
                Some(job) if is_finished(&job.status) => return Ok(job),
                Some(_) => {}
                None => {
                    return Err(SendError::Retryable {
                        reason: format!("{VENDOR} answered a job poll without a job_status"),
                        retry_after: None,
                        throttled: false,
                    });
                }
            }
        }
    }

    async fn upsert(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut sent: Vec<usize> = Vec::with_capacity(batch.len());
        let mut objects = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match self.identity_of(record) {
                Ok((name, value)) => {
                    objects.push(self.object_of(record, name, value));
                    sent.push(i);
                }
                Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
            }
        }
        if !objects.is_empty() {
            let url = format!(
                "{}/api/v2/{}/create_or_update_many",
                self.base,
                self.object.as_str()
            );
            let body = json!({ self.object.as_str(): objects });
            let answer = self.request(Method::POST, &url, Some(&body)).await?;
            let job = self.follow(&answer).await?;
            let read = self.read_results(&job, sent.len(), false)?;
            for (i, outcome) in sent.iter().zip(read) {
                outcomes[*i] = Some(self.scrub_outcome(outcome));
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    async fn delete(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut sent: Vec<(usize, String)> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match record.identity.get("external_id") {
                Some(value) if !value.is_null() && !value.to_text().contains(',') => {
                    sent.push((i, value.to_text()));
                }
                Some(value) if !value.is_null() => {
                    outcomes[i] = Some(RecordOutcome::Rejected(format!(
                        "external_id {:?} holds a comma, which {VENDOR}'s destroy_many cannot take",
                        value.to_text()
                    )));
                }
                _ => {
                    outcomes[i] = Some(RecordOutcome::Rejected(format!(
                        "{VENDOR} deletes {} in bulk only by external_id; match the sync on \
                         external_id to mirror deletes",
                        self.object.as_str()
                    )));
                }
            }
        }
        if !sent.is_empty() {
            let mut url = Url::parse(&format!(
                "{}/api/v2/{}/destroy_many",
                self.base,
                self.object.as_str()
            ))
            .map_err(|e| SendError::Fatal(format!("failed to build the destroy_many URL: {e}")))?;
            let ids: Vec<&str> = sent.iter().map(|(_, id)| id.as_str()).collect();
            url.query_pairs_mut().append_pair("external_ids", &ids.join(","));
            let answer = self.request(Method::DELETE, url.as_str(), None).await?;
            let job = self.follow(&answer).await?;
            let read = self.read_results(&job, sent.len(), true)?;
            for ((i, _), outcome) in sent.iter().zip(read) {
                outcomes[*i] = Some(self.scrub_outcome(outcome));
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    /// One outcome per sent object from a finished job. A failed job without results refuses
    /// the batch (the machinery splits it); an object the results do not mention is retried.
    fn read_results(&self, job: &Job, sent: usize, deleting: bool) -> Result<Vec<RecordOutcome>, SendError> {
        if job.status != "completed" && job.results.is_empty() {
            let reason = if job.message.is_empty() {
                format!("{VENDOR} job {}", job.status)
            } else {
                format!("{VENDOR} job {}: {}", job.status, job.message)
            };
            return Err(self.scrubber.error(SendError::BatchRejected(reason)));
        }
        Ok(read_job_results(&job.results, sent, deleting))
    }

    fn scrub_outcome(&self, outcome: RecordOutcome) -> RecordOutcome {
        match outcome {
            RecordOutcome::Rejected(r) => RecordOutcome::Rejected(self.scrubber.scrub(&r)),
            RecordOutcome::Retry(r) => RecordOutcome::Retry(self.scrubber.scrub(&r)),
            RecordOutcome::Accepted => RecordOutcome::Accepted,
        }
    }
}

#[async_trait]
impl Connector for ZendeskConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: MAX_BATCH_SIZE,
            operations: vec![
                Operation::Upsert,
                Operation::Update,
                Operation::Insert,
                Operation::Delete,
            ],
            default_requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            default_concurrency: DEFAULT_CONCURRENCY,
        }
    }

    /// Reads the token's own user: proves the account answers and the credentials work.
    async fn check(&self) -> Result<(), SendError> {
        let url = format!("{}/api/v2/users/me.json", self.base);
        match self.request(Method::GET, &url, None).await {
            Ok(_) => Ok(()),
            // A refused check request says nothing about batches; nothing to split.
            Err(SendError::BatchRejected(reason)) => Err(SendError::Fatal(reason)),
            Err(other) => Err(other),
        }
    }

    /// Update and insert are sent as upserts: `create_or_update_many` is the only bulk write.
    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if batch.len() > MAX_BATCH_SIZE {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s {MAX_BATCH_SIZE} objects per call (a bug \
                 in batching)",
                batch.len()
            )));
        }
        match operation {
            Operation::Delete => self.delete(batch).await,
            Operation::Upsert | Operation::Update | Operation::Insert => self.upsert(batch).await,
        }
    }
}

fn is_finished(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "killed")
}

/// The `job_status` of a bulk answer or a poll.
fn job_of(body: &[u8]) -> Option<Job> {
    let json: Json = serde_json::from_slice(body).ok()?;
    let job = json.get("job_status")?;
    Some(Job {
        status: job.get("status")?.as_str()?.to_owned(),
        message: job
            .get("message")
            .and_then(Json::as_str)
            .map(|m| excerpt(m.as_bytes()))
            .unwrap_or_default(),
        results: job
            .get("results")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default(),
    })
}

/// The id of the job a bulk answer queued.
fn job_id(body: &[u8]) -> Option<String> {
    let json: Json = serde_json::from_slice(body).ok()?;
    let id = json.get("job_status")?.get("id")?.as_str()?;
    // The id goes into a path: anything but a plain token is refused.
    (!id.is_empty()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    .then(|| id.to_owned())
}

/// Per-object outcomes from a job's `results`, matched by `index` (or by position when a
/// result has none). `Failed` (or an `error`) rejects the object with Zendesk's error and
/// details; when deleting, a record Zendesk does not have counts as deleted.
fn read_job_results(results: &[Json], sent: usize, deleting: bool) -> Vec<RecordOutcome> {
    let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; sent];
    for (position, result) in results.iter().enumerate() {
        let index = result
            .get("index")
            .and_then(Json::as_u64)
            .and_then(|i| usize::try_from(i).ok())
            .unwrap_or(position);
        let Some(slot) = outcomes.get_mut(index) else {
            continue;
        };
        let status = result.get("status").and_then(Json::as_str).unwrap_or_default();
        let error = result.get("error").and_then(Json::as_str).unwrap_or_default();
        let details = result.get("details").and_then(Json::as_str).unwrap_or_default();
        let failed = status.eq_ignore_ascii_case("failed")
            || !error.is_empty()
            || result.get("success") == Some(&Json::Bool(false));
        // A record Zendesk does not have is what a delete wants.
        let gone = deleting && (error.contains("NotFound") || details.contains("not found"));
        *slot = Some(if !failed || gone {
            RecordOutcome::Accepted
        } else {
            let reason = match (error.is_empty(), details.is_empty()) {
                (false, false) => format!("{error}: {details}"),
                (false, true) => error.to_owned(),
                (true, false) => details.to_owned(),
                (true, true) => format!("{VENDOR} refused the record ({status})"),
            };
            RecordOutcome::Rejected(excerpt(reason.as_bytes()))
        });
    }
    outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                RecordOutcome::Retry(format!("{VENDOR}'s job reported no result for the record"))
            })
        })
        .collect()
}

/// Zendesk's error text from an error body: `error` (a code or `{title, message}`),
/// `description` and the first `details` entry; else an excerpt of the body.
fn zendesk_message(body: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return excerpt(body);
    };
    let mut parts: Vec<String> = Vec::new();
    match json.get("error") {
        Some(Json::String(code)) => parts.push(code.clone()),
        Some(Json::Object(e)) => {
            for key in ["title", "message"] {
                if let Some(text) = e.get(key).and_then(Json::as_str) {
                    parts.push(text.to_owned());
                }
            }
        }
        _ => {}
    }
    if let Some(description) = json.get("description").and_then(Json::as_str) {
        parts.push(description.to_owned());
    }
    if let Some(details) = json.get("details").and_then(Json::as_object) {
        let first = details
            .values()
            .filter_map(Json::as_array)
            .flatten()
            .filter_map(|d| d.get("description").and_then(Json::as_str))
            .next();
        if let Some(first) = first {
            parts.push(first.to_owned());
        }
    }
    if parts.is_empty() {
        excerpt(body)
    } else {
        excerpt(parts.join(": ").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::value::Document;

    fn connector(object: ZendeskObject) -> Result<ZendeskConnector, DestinationError> {
        let secret = SecretData::new(BTreeMap::from([
            ("token".to_owned(), "zd-secret-token".to_owned()),
            ("email".to_owned(), "agent@acme.com".to_owned()),
        ]));
        ZendeskConnector::new(
            &ZendeskSpec {
                subdomain: "acme".into(),
                object,
                base_url: None,
            },
            Some(&SecretKeyRef {
                name: "zendesk".into(),
                key: None,
                namespace: None,
            }),
            Some(&secret),
        )
    }

    #[test]
    fn the_match_field_and_custom_fields_shape_the_user_object() {
        let c = connector(ZendeskObject::Users).unwrap();
        let mut nested = Document::new();
        nested.insert("plan".into(), Value::Text("pro".into()));
        let record = Record {
            key: "1".into(),
            identity: Document::from([("external_id".to_owned(), Value::Int(42))]).into(),
            fields: Document::from([
                ("name".to_owned(), Value::Text("Ada".into())),
                ("user_fields".to_owned(), Value::Object(nested)),
                ("user_fields.ltv".to_owned(), Value::Int(12)),
                ("phone".to_owned(), Value::Null),
            ])
            .into(),
        };
        let (name, value) = c.identity_of(&record).unwrap();
        assert_eq!(name, "external_id");
        assert_eq!(
            c.object_of(&record, name, value),
            json!({"name": "Ada", "phone": null, "external_id": "42",
                   "user_fields": {"plan": "pro", "ltv": 12}})
        );
    }

    #[test]
    fn organizations_match_on_name_and_users_cannot() {
        let org = connector(ZendeskObject::Organizations).unwrap();
        let record = Record {
            key: "1".into(),
            identity: Document::from([("name".to_owned(), Value::Text("Acme".into()))]).into(),
            fields: Document::new().into(),
        };
        assert_eq!(org.identity_of(&record).unwrap().0, "name");
        let users = connector(ZendeskObject::Users).unwrap();
        let reason = users.identity_of(&record).unwrap_err();
        assert!(reason.contains("external_id or email"), "{reason}");
    }

    #[test]
    fn job_results_map_by_index_and_deleting_a_missing_record_is_fine() {
        let results = vec![
            json!({"index": 1, "status": "Failed", "error": "EmailNotValid", "details": "Email bad is invalid"}),
            json!({"index": 0, "id": 9, "status": "Created"}),
        ];
        assert_eq!(
            read_job_results(&results, 3, false),
            vec![
                RecordOutcome::Accepted,
                RecordOutcome::Rejected("EmailNotValid: Email bad is invalid".into()),
                RecordOutcome::Retry("Zendesk's job reported no result for the record".into()),
            ]
        );
        let gone = vec![json!({"index": 0, "status": "Failed", "error": "RecordNotFound"})];
        assert_eq!(read_job_results(&gone, 1, true), vec![RecordOutcome::Accepted]);
    }

    #[test]
    fn error_bodies_give_code_description_and_first_detail() {
        let body = br#"{"error":"RecordInvalid","description":"Record validation errors",
            "details":{"email":[{"description":"Email: x is not properly formatted","error":"InvalidFormat"}]}}"#;
        assert_eq!(
            zendesk_message(body),
            "RecordInvalid: Record validation errors: Email: x is not properly formatted"
        );
        assert_eq!(
            zendesk_message(br#"{"error":{"title":"Forbidden","message":"no"}}"#),
            "Forbidden: no"
        );
    }

    #[test]
    fn a_bad_subdomain_and_a_missing_email_fail_at_construction() {
        let bad = ZendeskConnector::new(
            &ZendeskSpec {
                subdomain: "acme.evil.com/".into(),
                object: ZendeskObject::Users,
                base_url: None,
            },
            None,
            None,
        );
        assert!(matches!(bad, Err(DestinationError::Invalid(_))));
        let missing = ZendeskConnector::new(
            &ZendeskSpec {
                subdomain: "acme".into(),
                object: ZendeskObject::Users,
                base_url: None,
            },
            Some(&SecretKeyRef {
                name: "zd".into(),
                key: None,
                namespace: None,
            }),
            Some(&SecretData::new(BTreeMap::from([(
                "token".to_owned(),
                "abc123".to_owned(),
            )]))),
        );
        assert!(matches!(missing, Err(DestinationError::MissingSecretKey { ref key, .. }) if key == "email"));
    }
}
