//! The `intercom` destination: Intercom contacts (users or leads), API version 2.11.
//!
//! Each record is one contact, found by its identifier (`external_id` or `email`) with
//! `POST /contacts/search` and then:
//! - upsert: `PUT /contacts/{id}` when found, else `POST /contacts` with the role and the
//!   identifier;
//! - update: `PUT /contacts/{id}`; a contact Intercom does not have is rejected;
//! - insert: `POST /contacts`; a contact Intercom already has is rejected;
//! - delete (mirror): `DELETE /contacts/{id}`; a contact Intercom does not have is already gone.
//!
//! Docs: <https://developers.intercom.com/docs/references/rest-api/api.intercom.io/contacts/searchcontacts>,
//! <https://developers.intercom.com/docs/references/rest-api/api.intercom.io/contacts/createcontact>,
//! <https://developers.intercom.com/docs/references/rest-api/errors/rate-limiting>,
//! <https://developers.intercom.com/docs/build-an-integration/learn-more/authentication>.
//!
//! Mapped fields named like Intercom's standard contact attributes ([`STANDARD_ATTRIBUTES`])
//! go at the top level of the body; every other field goes under `custom_attributes`, and a
//! `custom_attributes` object (mapping targets `custom_attributes.x`) is merged into it.
//! Timestamps and dates are written as Unix seconds, the form Intercom's date attributes take.
//!
//! Every answer carries `X-RateLimit-Remaining` and `X-RateLimit-Reset` (epoch seconds): when
//! the remaining count reaches 0 the next request waits for the reset, and a 429 is retried
//! after it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::header::{ACCEPT, AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value as Json, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::delivery::report;
use super::vendor;
use super::vendor::answer::{RequestLabel, excerpt, retry_after, status_error, transport_error};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::{IntercomIdentifier, IntercomRole, IntercomSpec};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value};
use crate::redact::Scrubber;

/// Intercom's US-hosted API unless `baseUrl` says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://api.intercom.io";
/// The API version every request asks for.
pub const API_VERSION: &str = "2.11";
/// The Secret key holding the access token unless `credentialsSecretRef.key` names another.
pub const DEFAULT_SECRET_KEY: &str = "token";
/// Contacts per request: Intercom's contact endpoints take one contact.
pub const MAX_BATCH_SIZE: usize = 1;
/// Records per second: Intercom allows 10,000 calls per minute per app, enforced as about
/// 1,666 per 10-second window; a record costs two calls (search, then write), so 16 records a
/// second (32 calls) leaves a wide margin for other users of the same app.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 16.0;
/// Records in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a rate-limit reset Backflow honours (Intercom's windows are 10 s long).
pub const MAX_RESET_WAIT: Duration = Duration::from_secs(60);
/// Intercom's standard contact attributes, written at the top level of a contact; every other
/// field is a custom attribute.
pub const STANDARD_ATTRIBUTES: &[&str] = &[
    "role",
    "external_id",
    "email",
    "phone",
    "name",
    "avatar",
    "signed_up_at",
    "last_seen_at",
    "owner_id",
    "unsubscribed_from_emails",
];

/// The vendor's name in messages.
const VENDOR: &str = "Intercom";
const REMAINING_HEADER: &str = "x-ratelimit-remaining";
const RESET_HEADER: &str = "x-ratelimit-reset";

/// Intercom contacts, one per request.
pub struct IntercomConnector {
    client: reqwest::Client,
    base: String,
    host: String,
    identify_by: IntercomIdentifier,
    role: IntercomRole,
    headers: HeaderMap,
    scrubber: Scrubber,
    /// When Intercom said the window is used up: no request leaves before this instant.
    paused_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for IntercomConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntercomConnector")
            .field("base", &self.base)
            .field("identify_by", &self.identify_by)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// An answer Intercom gave: its status, headers and body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl IntercomConnector {
    /// Builds the connector: checks the base URL and reads the access token from the Secret.
    pub fn new(
        spec: &IntercomSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let IntercomSpec {
            identify_by,
            role,
            base_url,
        } = spec;
        let base_text = base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let host = vendor::host(&vendor::http_url("spec.intercom.baseUrl", base_text, "")?);

        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "intercom")?;
        let key = secret_ref.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        let token = vendor::secret_value(data, &secret_ref.name, key)?;
        let auth = vendor::sensitive_header(&format!("Bearer {token}"), || {
            format!(
                "key {key:?} of Secret {:?} is not a valid token (a newline or control character?)",
                secret_ref.name
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);
        headers.insert("intercom-version", HeaderValue::from_static(API_VERSION));
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));

        let client = vendor::client(TIMEOUT)?;

        Ok(IntercomConnector {
            client,
            base: base_text.trim_end_matches('/').to_owned(),
            host,
            identify_by: identify_by.unwrap_or_default(),
            role: role.unwrap_or_default(),
            headers,
            scrubber: Scrubber::new().with_secret(secret),
            paused_until: Mutex::new(None),
        })
    }

    /// Sends one request, first waiting out a used-up rate-limit window. Every answer is
    /// returned, whatever its status; transport failures are batch errors.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Json>,
    ) -> Result<(RequestLabel, Answer), SendError> {
        let url = format!("{}{path}", self.base);
        let label = RequestLabel {
            method: method.clone(),
            url: self.scrubber.scrub(&url),
            host: self.host.clone(),
        };
        let until = *self.paused_until.lock().await;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
        let mut request = self.client.request(method, &url).headers(self.headers.clone());
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
        if remaining(&headers) == Some(0) {
            let wait = reset_wait(&headers, SystemTime::now()).unwrap_or(Duration::ZERO);
            *self.paused_until.lock().await = Instant::now().checked_add(wait);
            // The window is the workspace's: every sync sending to it waits too.
            report::hold_back(wait);
        }
        Ok((
            label,
            Answer {
                status,
                headers,
                body: bytes.to_vec(),
            },
        ))
    }

    /// The batch error a non-2xx answer means, when it is not about the record alone.
    fn failure(&self, label: &RequestLabel, answer: &Answer) -> SendError {
        let code = answer.status.as_u16();
        let error = match code {
            401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code})")),
            429 => SendError::Retryable {
                reason: format!(
                    "{VENDOR} is throttling requests (HTTP 429){}",
                    detail(&answer.body)
                ),
                retry_after: reset_wait(&answer.headers, SystemTime::now())
                    .or_else(|| retry_after(&answer.headers, SystemTime::now())),
                throttled: true,
            },
            _ => status_error(label, answer.status, &answer.headers, &answer.body),
        };
        self.scrubber.error(error)
    }

    /// Finds the contact whose identifier is `id`: its Intercom id, or `None`.
    async fn find(&self, id: &str) -> Result<Option<String>, SendError> {
        let query = json!({"query": {
            "field": self.identify_by.as_str(),
            "operator": "=",
            "value": id,
        }});
        let (label, answer) = self.call(Method::POST, "/contacts/search", Some(&query)).await?;
        if !answer.status.is_success() {
            return Err(match self.failure(&label, &answer) {
                // A refused search is a refused query, not a record Backflow can fix by splitting.
                SendError::BatchRejected(reason) => SendError::Fatal(reason),
                other => other,
            });
        }
        let json: Json = serde_json::from_slice(&answer.body).map_err(|_| {
            self.scrubber.error(SendError::Fatal(format!(
                "response of {} {} is not Intercom's JSON (check spec.intercom.baseUrl): {}",
                label.method,
                label.url,
                excerpt(&answer.body)
            )))
        })?;
        let contacts = json
            .get("data")
            .and_then(Json::as_array)
            .cloned()
            .unwrap_or_default();
        // An email may belong to a user and a lead at once: prefer the configured role.
        let role = self.role.as_str();
        let chosen = contacts
            .iter()
            .find(|c| c.get("role").and_then(Json::as_str) == Some(role))
            .or_else(|| contacts.first());
        Ok(chosen.and_then(|c| c.get("id")).and_then(|v| match v {
            Json::String(s) => Some(s.clone()),
            Json::Number(n) => Some(n.to_string()),
            _ => None,
        }))
    }

    /// Creates or updates one contact and reads what happened to it.
    async fn write(&self, method: Method, path: &str, body: &Json) -> Result<RecordOutcome, SendError> {
        let (label, answer) = self.call(method, path, Some(body)).await?;
        if answer.status.is_success() {
            return Ok(RecordOutcome::Accepted);
        }
        match answer.status.as_u16() {
            // Validation errors, duplicates, and a contact deleted since the search.
            400 | 404 | 409 | 422 => Ok(RecordOutcome::Rejected(self.scrubber.scrub(&format!(
                "{VENDOR} refused the contact (HTTP {}): {}",
                answer.status.as_u16(),
                error_message(&answer.body)
            )))),
            _ => Err(self.failure(&label, &answer)),
        }
    }

    async fn send_one(&self, operation: Operation, record: &Record) -> Result<RecordOutcome, SendError> {
        let identifier = self.identify_by.as_str();
        let Some(id) = identifier_of(record, identifier) else {
            return Ok(RecordOutcome::Rejected(format!(
                "the record has no value for {identifier}; map it and list it in the sync's match"
            )));
        };
        let found = self.find(&id).await?;
        match (operation, found) {
            (Operation::Delete, None) => Ok(RecordOutcome::Accepted),
            (Operation::Delete, Some(contact)) => {
                let path = format!("/contacts/{}", path_segment(&contact));
                let (label, answer) = self.call(Method::DELETE, &path, None).await?;
                match answer.status.as_u16() {
                    // 404: deleted in between, which is what a delete wants.
                    200..=299 | 404 => Ok(RecordOutcome::Accepted),
                    400 | 409 | 422 => Ok(RecordOutcome::Rejected(self.scrubber.scrub(&format!(
                        "{VENDOR} refused to delete the contact: {}",
                        error_message(&answer.body)
                    )))),
                    _ => Err(self.failure(&label, &answer)),
                }
            }
            (Operation::Update, None) => Ok(RecordOutcome::Rejected(
                self.scrubber
                    .scrub(&format!("no {VENDOR} contact with {identifier} {id:?}")),
            )),
            (Operation::Insert, Some(contact)) => Ok(RecordOutcome::Rejected(self.scrubber.scrub(&format!(
                "{VENDOR} already has contact {contact} with {identifier} {id:?}"
            )))),
            (Operation::Upsert | Operation::Update, Some(contact)) => {
                let body = contact_body(&record.fields);
                let path = format!("/contacts/{}", path_segment(&contact));
                self.write(Method::PUT, &path, &Json::Object(body)).await
            }
            (Operation::Upsert | Operation::Insert, None) => {
                let mut body = contact_body(&record.fields);
                body.insert("role".into(), Json::String(self.role.as_str().to_owned()));
                body.insert(identifier.to_owned(), Json::String(id));
                self.write(Method::POST, "/contacts", &Json::Object(body)).await
            }
        }
    }
}

#[async_trait]
impl Connector for IntercomConnector {
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

    /// `GET /me` (the admin owning the token): `200` means the token works.
    async fn check(&self) -> Result<(), SendError> {
        let (label, answer) = self.call(Method::GET, "/me", None).await?;
        if answer.status.is_success() {
            return Ok(());
        }
        Err(match self.failure(&label, &answer) {
            SendError::BatchRejected(reason) => SendError::Fatal(reason),
            other => other,
        })
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.len() > MAX_BATCH_SIZE {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s one contact per request (a bug in batching)",
                batch.len()
            )));
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for record in batch {
            outcomes.push(self.send_one(operation, record).await?);
        }
        Ok(outcomes)
    }
}

/// The record's identifier value: from its identity (the sync's match fields) under the
/// attribute's name or as its only match field; else from its fields.
fn identifier_of(record: &Record, identifier: &str) -> Option<String> {
    let named = |doc: &Document| doc.get(identifier).filter(|v| !v.is_null()).map(Value::to_text);
    named(&record.identity)
        .or_else(|| match record.identity.len() {
            1 => record
                .identity
                .values()
                .next()
                .filter(|v| !v.is_null())
                .map(Value::to_text),
            _ => None,
        })
        .or_else(|| named(&record.fields))
        .filter(|id| !id.trim().is_empty())
}

/// The body of a create or update: standard attributes at the top level, everything else
/// (and the members of a `custom_attributes` object) under `custom_attributes`.
fn contact_body(fields: &Document) -> Map<String, Json> {
    let mut body = Map::new();
    let mut custom = Map::new();
    for (name, value) in fields {
        match (name.as_str(), value) {
            ("custom_attributes", Value::Object(nested)) => {
                for (k, v) in nested {
                    custom.insert(k.clone(), attribute_json(v));
                }
            }
            ("custom_attributes", Value::Json(Json::Object(nested))) => {
                custom.extend(nested.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            (n, v) if STANDARD_ATTRIBUTES.contains(&n) => {
                body.insert(n.to_owned(), attribute_json(v));
            }
            (n, v) => {
                let n = n.strip_prefix("custom_attributes.").unwrap_or(n);
                custom.insert(n.to_owned(), attribute_json(v));
            }
        }
    }
    if !custom.is_empty() {
        body.insert("custom_attributes".into(), Json::Object(custom));
    }
    body
}

/// A value as Intercom takes it: timestamps and dates as Unix seconds, the rest as JSON.
fn attribute_json(value: &Value) -> Json {
    match value {
        Value::Timestamp(ts) => json!(ts.timestamp()),
        Value::Date(d) => json!(d.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp())),
        other => other.to_json(),
    }
}

/// An Intercom id as a path segment (ids are hex strings; anything else is encoded).
fn path_segment(id: &str) -> String {
    percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC).to_string()
}

fn remaining(headers: &HeaderMap) -> Option<u64> {
    headers.get(REMAINING_HEADER)?.to_str().ok()?.trim().parse().ok()
}

/// How long until `X-RateLimit-Reset` (epoch seconds), at most [`MAX_RESET_WAIT`]; a reset in
/// the past means no wait.
fn reset_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let reset: u64 = headers.get(RESET_HEADER)?.to_str().ok()?.trim().parse().ok()?;
    // The header is the vendor's number: a reset past what a clock can hold waits the longest.
    let Some(at) = UNIX_EPOCH.checked_add(Duration::from_secs(reset)) else {
        return Some(MAX_RESET_WAIT);
    };
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_RESET_WAIT),
    )
}

/// The messages of an `error.list` body (`code: message; …`), or an excerpt of the body.
fn error_message(body: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return excerpt(body);
    };
    let parts: Vec<String> = json
        .get("errors")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let code = e.get("code").and_then(Json::as_str).unwrap_or_default();
            let message = e.get("message").and_then(Json::as_str).unwrap_or_default();
            match (code.is_empty(), message.is_empty()) {
                (_, true) => code.to_owned(),
                (true, false) => message.to_owned(),
                (false, false) => format!("{code}: {message}"),
            }
        })
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        excerpt(body)
    } else {
        excerpt(parts.join("; ").as_bytes())
    }
}

fn detail(body: &[u8]) -> String {
    vendor::detail(&error_message(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_attributes_stay_on_top_and_the_rest_become_custom_attributes() {
        let fields = Document::from([
            ("email".to_owned(), Value::Text("ada@example.com".into())),
            ("plan".to_owned(), Value::Text("pro".into())),
            ("custom_attributes.seats".to_owned(), Value::Int(3)),
            (
                "custom_attributes".to_owned(),
                Value::Object(Document::from([("ltv".to_owned(), Value::Float(1.5))])),
            ),
            (
                "signed_up_at".to_owned(),
                Value::Timestamp(chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap()),
            ),
        ]);
        assert_eq!(
            Json::Object(contact_body(&fields)),
            json!({"email": "ada@example.com", "signed_up_at": 1_700_000_000,
                "custom_attributes": {"plan": "pro", "seats": 3, "ltv": 1.5}})
        );
    }

    #[test]
    fn the_reset_header_gives_the_wait_and_a_past_reset_none() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut headers = HeaderMap::new();
        headers.insert(RESET_HEADER, HeaderValue::from_static("1007"));
        assert_eq!(reset_wait(&headers, now), Some(Duration::from_secs(7)));
        headers.insert(RESET_HEADER, HeaderValue::from_static("990"));
        assert_eq!(reset_wait(&headers, now), Some(Duration::ZERO));
        headers.insert(RESET_HEADER, HeaderValue::from_static("999999"));
        assert_eq!(reset_wait(&headers, now), Some(MAX_RESET_WAIT));
        assert_eq!(reset_wait(&HeaderMap::new(), now), None);
        // A reset no clock can hold waits the longest instead of overflowing.
        headers.insert(RESET_HEADER, HeaderValue::from_static("18446744073709551615"));
        assert_eq!(reset_wait(&headers, now), Some(MAX_RESET_WAIT));
    }

    #[test]
    fn an_error_list_is_read_as_code_and_message() {
        let body = br#"{"type":"error.list","request_id":"r1","errors":[{"code":"conflict","message":"A contact matching those details already exists with id=abc"}]}"#;
        assert_eq!(
            error_message(body),
            "conflict: A contact matching those details already exists with id=abc"
        );
        assert_eq!(error_message(b"gateway down"), "gateway down");
    }
}
