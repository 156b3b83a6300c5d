//! The `braze` destination: one Braze user profile per record, matched on `external_id`.
//!
//! - upsert and insert: `POST /users/track` with `{"attributes":[{"external_id":…, …}]}`.
//!   Braze has no create-only call: `/users/track` creates the profile or updates the one with
//!   that `external_id`, so insert behaves as upsert;
//! - update: the same call with Braze's `"_update_existing_only": true` on every attribute
//!   object, so a profile Braze does not have is not created (Braze skips it silently);
//! - delete (mirror): `POST /users/delete` with `{"external_ids":[…]}`; an id Braze does not
//!   know is already gone, which is what a delete wants.
//!
//! Docs: <https://www.braze.com/docs/api/endpoints/user_data/post_user_track/> (75 attribute
//! objects per request), <https://www.braze.com/docs/api/endpoints/user_data/post_user_delete/>
//! (50 external ids per request), <https://www.braze.com/docs/api/errors/> ("success" with
//! non-fatal `errors`, fatal 4xx), <https://www.braze.com/docs/api/api_limits/> (rate limits
//! and the `X-RateLimit-*` headers of a 429).
//!
//! Mapped fields are sent as they are: Braze custom attributes may be strings, numbers,
//! booleans, dates (ISO 8601 text), arrays and nested objects. The record's `external_id`
//! always comes from its identity (the sync's match field).
//!
//! What Braze accepts and then drops is kept out of requests
//! (<https://www.braze.com/docs/api/endpoints/user_data/post_user_track/>, "How does
//! `/users/track` handle invalid nested custom attributes?"; and
//! <https://www.braze.com/docs/user_guide/data/activation/attributes/nested_custom_attribute_support/>):
//! a null inside a nested custom attribute makes Braze drop *every* nested attribute update of
//! the request while still answering `201`, so a NULL under a nested object is left out of it
//! (the object is sent whole, without `_merge_objects`, and replaces the stored one, so the
//! key is gone from the profile as a null would have removed it), and an object left empty is
//! sent as a top-level `null`, Braze's documented way to remove an attribute. A nested object
//! Braze documents as invalid (a key with a space, `.` or `$`, a key or text over 255
//! characters, an object over 100 KB) is not sent: that record is rejected with the reason,
//! and the other records' nested updates land.
//!
//! Batch size: `/users/track` takes 75 objects a request, but workspaces on Braze's "Monthly
//! Active Users - CY 24-25" pricing take 50, and Braze refuses more with `400 Max Input Length
//! Exceeded` (<https://www.braze.com/docs/api/errors/>). That refusal answers
//! [`SendError::TooLarge`] with [`MAU_BATCH_SIZE`]: the delivery sends those records again in
//! batches of 50 and keeps 50 for the rest of the run.
//!
//! A `201` whose `errors` name no record by `index` (like *provided external_id is blacklisted
//! and disallowed*, same page) dropped some record while the rest landed: the batch is refused
//! so the delivery splits it until that record stands alone and is rejected, instead of every
//! record counting as delivered and the dropped one never being sent again.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value as Json, json};

use super::vendor;
use super::vendor::answer::{RequestLabel, excerpt, retry_after, status_error, transport_error};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::BrazeSpec;
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value};
use crate::redact::Scrubber;

/// Attribute objects per `/users/track` request, Braze's documented limit; also the batch size
/// of deletes, which are sent in chunks of [`MAX_DELETE_IDS`] within one batch.
pub const MAX_BATCH_SIZE: usize = 75;
/// Objects per `/users/track` request in workspaces on Braze's "Monthly Active Users - CY
/// 24-25" pricing (same page, "Monthly Active Users CY 24-25").
pub const MAU_BATCH_SIZE: usize = 50;
/// Braze's message refusing a request with too many objects.
pub const TOO_MANY_OBJECTS: &str = "Max Input Length Exceeded";
/// Longest key or text value inside a nested custom attribute.
pub const MAX_NESTED_CHARS: usize = 255;
/// Largest nested custom attribute, as JSON.
pub const MAX_NESTED_BYTES: usize = 100 * 1024;
/// External ids per `/users/delete` request, Braze's documented limit.
pub const MAX_DELETE_IDS: usize = 50;
/// The Secret key holding the REST API key unless `credentialsSecretRef.key` names another.
pub const DEFAULT_SECRET_KEY: &str = "apiKey";
/// Requests per second. Braze allows `/users/track` 3,000 requests per 3 seconds and
/// `/users/delete` 20,000 per minute (about 333 per second), per workspace and shared with
/// every other client of it; 100 per second leaves most of both to the rest of the workspace
/// and still moves 7,500 profiles a second.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 100.0;
/// Requests in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The header of a 429 naming when the rate-limit window resets, in epoch seconds.
pub const RATE_LIMIT_RESET_HEADER: &str = "x-ratelimit-reset";
/// The attribute that makes `/users/track` update existing profiles only.
pub const UPDATE_EXISTING_ONLY: &str = "_update_existing_only";

/// The vendor's name in messages.
const VENDOR: &str = "Braze";
/// The identifier every attribute object carries.
const EXTERNAL_ID: &str = "external_id";

/// Braze user profiles through the REST API.
pub struct BrazeConnector {
    client: reqwest::Client,
    base: String,
    host: String,
    headers: HeaderMap,
    scrubber: Scrubber,
}

impl std::fmt::Debug for BrazeConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrazeConnector")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl BrazeConnector {
    /// Builds the connector: checks the REST endpoint and reads the API key from the Secret.
    pub fn new(
        spec: &BrazeSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let BrazeSpec { base_url } = spec;
        let base_text = base_url.trim();
        let host = vendor::host(&vendor::http_url(
            "spec.braze.baseUrl",
            base_text,
            "; use your instance's REST endpoint, like https://rest.iad-01.braze.com",
        )?);

        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "braze")?;
        let key = secret_ref.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        let api_key = vendor::secret_value(data, &secret_ref.name, key)?;
        let auth = vendor::sensitive_header(&format!("Bearer {api_key}"), || {
            format!(
                "key {key:?} of Secret {:?} is not a valid API key (a newline or control character?)",
                secret_ref.name
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);

        let client = vendor::client(TIMEOUT)?;

        Ok(BrazeConnector {
            client,
            base: base_text.trim_end_matches('/').to_owned(),
            host,
            headers,
            scrubber: Scrubber::new().with_secret(secret),
        })
    }

    /// POSTs a JSON body; a 2xx answer gives its body, anything else the batch error. A 400
    /// body is handed back too, as `Err(Refused)`, because Braze names records in it.
    async fn post(&self, path: &str, body: &Json) -> Result<Vec<u8>, Failure> {
        let url = format!("{}{path}", self.base);
        let label = RequestLabel {
            method: Method::POST,
            url: self.scrubber.scrub(&url),
            host: self.host.clone(),
        };
        let response = self
            .client
            .post(&url)
            .headers(self.headers.clone())
            .json(body)
            .send()
            .await
            .map_err(|e| Failure::Error(self.scrubber.error(transport_error(&label, e, TIMEOUT))))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = super::vendor::read_body(response, super::vendor::MAX_RESPONSE_BYTES, &label, TIMEOUT)
            .await
            .map_err(|e| Failure::Error(self.scrubber.error(e)))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        if status == StatusCode::BAD_REQUEST {
            return Err(Failure::Refused(bytes.to_vec()));
        }
        Err(Failure::Error(self.scrubber.error(failure(
            &label,
            status,
            &headers,
            &bytes,
            SystemTime::now(),
        ))))
    }

    /// Upsert, update and insert: one `/users/track` call for the records that have an id.
    async fn track(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut sent: Vec<usize> = Vec::with_capacity(batch.len());
        let mut attributes = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match external_id_of(record) {
                Some(id) => match attributes_of(record, id, operation == Operation::Update) {
                    Ok(object) => {
                        attributes.push(object);
                        sent.push(i);
                    }
                    Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
                },
                None => outcomes[i] = Some(missing_id()),
            }
        }
        if !attributes.is_empty() {
            let read = match self
                .post("/users/track", &json!({ "attributes": attributes }))
                .await
            {
                Ok(body) => {
                    // An error that names no record was about one of them all the same: Braze
                    // dropped it while processing the rest. Refusing the batch lets the
                    // delivery split it until that record stands alone (resending attributes
                    // Braze already took sets them to the same values).
                    let unattributed = unattributed_errors(&body);
                    if !unattributed.is_empty() {
                        return Err(self.scrubber.error(SendError::BatchRejected(format!(
                            "{VENDOR} reported an error it did not tie to a record: {}",
                            unattributed.join("; ")
                        ))));
                    }
                    read_track_errors(&body, sent.len())
                }
                Err(Failure::Refused(body)) if braze_message(&body).contains(TOO_MANY_OBJECTS) => {
                    let reason = format!(
                        "{VENDOR} refused {} objects in one request (HTTP 400): {}",
                        sent.len(),
                        braze_message(&body)
                    );
                    return Err(self.scrubber.error(if sent.len() > MAU_BATCH_SIZE {
                        SendError::TooLarge {
                            limit: MAU_BATCH_SIZE,
                            reason,
                        }
                    } else {
                        SendError::BatchRejected(reason)
                    }));
                }
                Err(Failure::Refused(body)) => {
                    // A 400 naming every record by index refused them one by one; anything
                    // else refused the request as a whole, and splitting finds the culprits.
                    match read_refusal(&body, sent.len()) {
                        Some(outcomes) => outcomes,
                        None => {
                            return Err(self.scrubber.error(SendError::BatchRejected(format!(
                                "{VENDOR} refused the batch (HTTP 400): {}",
                                braze_message(&body)
                            ))));
                        }
                    }
                }
                Err(Failure::Error(e)) => return Err(e),
            };
            for (i, outcome) in sent.iter().zip(read) {
                outcomes[*i] = Some(self.scrub_outcome(outcome));
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    /// Mirror deletes: `/users/delete` in chunks of [`MAX_DELETE_IDS`].
    async fn delete(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes = vec![RecordOutcome::Accepted; batch.len()];
        let mut ids: Vec<String> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match external_id_of(record) {
                Some(id) => ids.push(id),
                None => outcomes[i] = missing_id(),
            }
        }
        // A failed chunk fails the whole batch; deleting again what an earlier chunk deleted
        // is harmless, so a retry of the batch is safe.
        for chunk in ids.chunks(MAX_DELETE_IDS) {
            match self
                .post("/users/delete", &json!({ "external_ids": chunk }))
                .await
            {
                Ok(_) => {}
                Err(Failure::Refused(body)) => {
                    return Err(self.scrubber.error(SendError::BatchRejected(format!(
                        "{VENDOR} refused the deletes (HTTP 400): {}",
                        braze_message(&body)
                    ))));
                }
                Err(Failure::Error(e)) => return Err(e),
            }
        }
        Ok(outcomes)
    }

    fn scrub_outcome(&self, outcome: RecordOutcome) -> RecordOutcome {
        match outcome {
            RecordOutcome::Rejected(r) => RecordOutcome::Rejected(self.scrubber.scrub(&r)),
            RecordOutcome::Retry(r) => RecordOutcome::Retry(self.scrubber.scrub(&r)),
            RecordOutcome::Accepted => RecordOutcome::Accepted,
        }
    }
}

/// How a request failed.
enum Failure {
    /// HTTP 400: Braze refused the request; the body may name records.
    Refused(Vec<u8>),
    /// Anything else, already classified and scrubbed.
    Error(SendError),
}

#[async_trait]
impl Connector for BrazeConnector {
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

    /// POSTs an empty body to `/users/track`. Braze has no auth-only endpoint; this is the one
    /// the connector needs (the key's `users.track` permission), it checks the key before the
    /// payload, and an empty payload writes nothing: Braze answers `400 Valid data must be
    /// provided…` to a key it accepts and `401` to one it does not. A read endpoint like
    /// `/email/hard_bounces` would demand a permission a least-privilege key lacks.
    async fn check(&self) -> Result<(), SendError> {
        match self.post("/users/track", &json!({})).await {
            Ok(_) | Err(Failure::Refused(_)) => Ok(()),
            Err(Failure::Error(SendError::BatchRejected(reason))) => Err(SendError::Fatal(reason)),
            Err(Failure::Error(e)) => Err(e),
        }
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if batch.len() > MAX_BATCH_SIZE {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s {MAX_BATCH_SIZE} attribute objects per \
                 request (a bug in batching)",
                batch.len()
            )));
        }
        match operation {
            Operation::Delete => self.delete(batch).await,
            Operation::Upsert | Operation::Update | Operation::Insert => self.track(operation, batch).await,
        }
    }
}

fn missing_id() -> RecordOutcome {
    RecordOutcome::Rejected(format!(
        "the record has no {EXTERNAL_ID}; map it and list it in the sync's match"
    ))
}

/// The record's `external_id`: its identity's `external_id`, or its only match field, else its
/// mapped `external_id`. Numbers and other values are sent as their text.
fn external_id_of(record: &Record) -> Option<String> {
    let text = |v: &Value| (!v.is_null()).then(|| v.to_text()).filter(|t| !t.is_empty());
    record
        .identity
        .get(EXTERNAL_ID)
        .and_then(text)
        .or_else(|| match record.identity.len() {
            1 => record.identity.values().next().and_then(text),
            _ => None,
        })
        .or_else(|| record.fields.get(EXTERNAL_ID).and_then(text))
}

/// One attribute object: the mapped fields, `external_id` set to the identity; nested
/// objects without their nulls. `Err` says why a nested attribute cannot be sent.
fn attributes_of(record: &Record, id: String, update_only: bool) -> Result<Json, String> {
    let mut out: Map<String, Json> = fields_json(&record.fields)?;
    out.insert(EXTERNAL_ID.to_owned(), Json::String(id));
    if update_only {
        out.insert(UPDATE_EXISTING_ONLY.to_owned(), Json::Bool(true));
    }
    Ok(Json::Object(out))
}

fn fields_json(fields: &Document) -> Result<Map<String, Json>, String> {
    let mut out = Map::new();
    for (name, value) in fields {
        let json = match value.to_json() {
            Json::Object(map) => {
                let nested = Json::Object(without_nulls(map));
                check_nested(name, &nested)?;
                // Nothing left: remove the attribute, as a NULL does.
                if nested.as_object().is_some_and(Map::is_empty) {
                    Json::Null
                } else {
                    nested
                }
            }
            Json::Array(items) if items.iter().any(Json::is_object) => {
                let nested = Json::Array(nested_array(items));
                check_nested(name, &nested)?;
                nested
            }
            other => other,
        };
        out.insert(name.clone(), json);
    }
    Ok(out)
}

/// A nested object without its null values (at any depth) and without the objects left empty
/// by removing them.
fn without_nulls(map: Map<String, Json>) -> Map<String, Json> {
    map.into_iter()
        .filter_map(|(key, value)| match value {
            Json::Null => None,
            Json::Object(inner) => {
                let inner = without_nulls(inner);
                (!inner.is_empty()).then_some((key, Json::Object(inner)))
            }
            Json::Array(items) => Some((key, Json::Array(nested_array(items)))),
            other => Some((key, other)),
        })
        .collect()
}

/// An array inside a nested attribute (or an array of objects) without null items, its
/// objects without their nulls.
fn nested_array(items: Vec<Json>) -> Vec<Json> {
    items
        .into_iter()
        .filter_map(|item| match item {
            Json::Null => None,
            Json::Object(inner) => Some(Json::Object(without_nulls(inner))),
            Json::Array(inner) => Some(Json::Array(nested_array(inner))),
            other => Some(other),
        })
        .collect()
}

/// Why Braze would refuse the nested attribute `name` (and with it every nested update of the
/// request), if it would.
fn check_nested(name: &str, nested: &Json) -> Result<(), String> {
    let size = serde_json::to_vec(nested).map_or(0, |b| b.len());
    if size > MAX_NESTED_BYTES {
        return Err(format!(
            "nested attribute {name:?} is {size} bytes as JSON; {VENDOR} takes at most {MAX_NESTED_BYTES}"
        ));
    }
    fn walk(name: &str, json: &Json) -> Result<(), String> {
        match json {
            Json::Object(map) => {
                for (key, value) in map {
                    if key.contains([' ', '.', '$']) && key != "$time" {
                        return Err(format!(
                            "nested attribute {name:?} has a key with a space, '.' or '$', which {VENDOR} does not take"
                        ));
                    }
                    if key.chars().count() > MAX_NESTED_CHARS {
                        return Err(format!(
                            "nested attribute {name:?} has a key over {MAX_NESTED_CHARS} characters"
                        ));
                    }
                    walk(name, value)?;
                }
                Ok(())
            }
            Json::Array(items) => items.iter().try_for_each(|item| walk(name, item)),
            Json::String(text) if text.chars().count() > MAX_NESTED_CHARS => Err(format!(
                "nested attribute {name:?} holds a text over {MAX_NESTED_CHARS} characters"
            )),
            _ => Ok(()),
        }
    }
    walk(name, nested)
}

/// The indexed errors of a Braze body about `attributes`, as (index, type).
fn attribute_errors(json: &Json) -> Vec<(usize, String)> {
    json.get("errors")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|e| {
            e.get("input_array")
                .and_then(Json::as_str)
                .is_none_or(|a| a == "attributes")
        })
        .filter_map(|e| {
            let index = e.get("index").and_then(Json::as_u64)?;
            let kind = match e.get("type") {
                Some(Json::String(s)) => excerpt(s.as_bytes()),
                Some(other) => excerpt(other.to_string().as_bytes()),
                None => format!("{VENDOR} refused the attributes"),
            };
            Some((usize::try_from(index).ok()?, kind))
        })
        .collect()
}

/// The `type`s of a 2xx answer's attribute errors that name no record (no `index`).
fn unattributed_errors(body: &[u8]) -> Vec<String> {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return Vec::new();
    };
    json.get("errors")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter(|e| {
            e.get("input_array")
                .and_then(Json::as_str)
                .is_none_or(|a| a == "attributes")
                && e.get("index").and_then(Json::as_u64).is_none()
        })
        .map(|e| match e.get("type") {
            Some(Json::String(s)) => excerpt(s.as_bytes()),
            Some(other) => excerpt(other.to_string().as_bytes()),
            None => excerpt(e.to_string().as_bytes()),
        })
        .collect()
}

/// Per-record outcomes of a 2xx `/users/track` answer: records its `errors` name by index are
/// rejected with the error's `type`, the rest accepted.
fn read_track_errors(body: &[u8], sent: usize) -> Vec<RecordOutcome> {
    let mut outcomes = vec![RecordOutcome::Accepted; sent];
    if let Ok(json) = serde_json::from_slice::<Json>(body) {
        for (index, kind) in attribute_errors(&json) {
            if let Some(slot) = outcomes.get_mut(index) {
                *slot = RecordOutcome::Rejected(kind);
            }
        }
    }
    outcomes
}

/// Per-record outcomes of a 400 that names every sent record by index (Braze answers so when
/// no attribute object was valid); `None` when the refusal is about the request as a whole.
fn read_refusal(body: &[u8], sent: usize) -> Option<Vec<RecordOutcome>> {
    let json = serde_json::from_slice::<Json>(body).ok()?;
    let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; sent];
    for (index, kind) in attribute_errors(&json) {
        if let Some(slot) = outcomes.get_mut(index) {
            *slot = Some(RecordOutcome::Rejected(kind));
        }
    }
    outcomes.into_iter().collect()
}

/// Braze's `message` from an error body, or an excerpt of the body.
fn braze_message(body: &[u8]) -> String {
    serde_json::from_slice::<Json>(body)
        .ok()
        .and_then(|j| {
            j.get("message")
                .and_then(Json::as_str)
                .map(|m| excerpt(m.as_bytes()))
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| excerpt(body))
}

/// What a non-2xx, non-400 answer means for the batch, in Braze's terms.
fn failure(
    label: &RequestLabel,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> SendError {
    let code = status.as_u16();
    let message = braze_message(body);
    let detail = vendor::detail(&message);
    match code {
        401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code}){detail}")),
        404 => SendError::Fatal(format!(
            "{} {} answered HTTP 404: check spec.braze.baseUrl is your instance's REST endpoint{detail}",
            label.method, label.url
        )),
        429 => SendError::Retryable {
            reason: format!("{VENDOR} is throttling requests (HTTP 429){detail}"),
            retry_after: throttle_wait(headers, now),
            throttled: true,
        },
        _ => status_error(label, status, headers, body),
    }
}

/// The wait a 429 asks for: until `X-RateLimit-Reset` (epoch seconds; a past instant means no
/// wait), else `Retry-After`.
fn throttle_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let reset = headers
        .get(RATE_LIMIT_RESET_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match reset {
        Some(at) => {
            let now = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            Some(Duration::from_secs(at).saturating_sub(now))
        }
        None => retry_after(headers, now),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use reqwest::header::HeaderValue;

    fn connector(base_url: &str) -> Result<BrazeConnector, DestinationError> {
        let secret = SecretData::new(BTreeMap::from([(
            "apiKey".to_owned(),
            "b1a2c3d4-secret".to_owned(),
        )]));
        BrazeConnector::new(
            &BrazeSpec {
                base_url: base_url.into(),
            },
            Some(&SecretKeyRef {
                name: "braze".into(),
                key: None,
                namespace: None,
            }),
            Some(&secret),
        )
    }

    #[test]
    fn fields_are_sent_as_they_are_with_the_identity_as_external_id() {
        let nested = Document::from([("tier".to_owned(), Value::Text("gold".into()))]);
        let record = Record {
            key: "7".into(),
            identity: Document::from([("user_id".to_owned(), Value::Int(7))]).into(),
            fields: Document::from([
                ("user_id".to_owned(), Value::Int(7)),
                ("ltv".to_owned(), Value::Float(12.5)),
                ("vip".to_owned(), Value::Bool(true)),
                ("phone".to_owned(), Value::Null),
                ("loyalty".to_owned(), Value::Object(nested)),
            ])
            .into(),
        };
        let id = external_id_of(&record).unwrap();
        assert_eq!(id, "7");
        assert_eq!(
            attributes_of(&record, id.clone(), false).unwrap(),
            json!({"external_id": "7", "user_id": 7, "ltv": 12.5, "vip": true, "phone": null,
                "loyalty": {"tier": "gold"}})
        );
        assert_eq!(
            attributes_of(&record, id, true).unwrap()[UPDATE_EXISTING_ONLY],
            json!(true)
        );
    }

    #[test]
    fn nulls_never_go_inside_a_nested_attribute_and_invalid_nested_values_reject_the_record() {
        let inner = Document::from([
            ("tier".to_owned(), Value::Text("gold".into())),
            ("lifetime_value".to_owned(), Value::Null),
        ]);
        let empty = Document::from([("lifetime_value".to_owned(), Value::Null)]);
        let record = Record {
            key: "7".into(),
            identity: Document::from([(EXTERNAL_ID.to_owned(), Value::Int(7))]).into(),
            fields: Document::from([
                ("loyalty".to_owned(), Value::Object(inner)),
                ("rewards".to_owned(), Value::Object(empty)),
                (
                    "orders".to_owned(),
                    Value::Json(json!([{"id": 1, "coupon": null}, null])),
                ),
            ])
            .into(),
        };
        assert_eq!(
            attributes_of(&record, "7".into(), false).unwrap(),
            json!({"external_id": "7", "loyalty": {"tier": "gold"}, "rewards": null,
                "orders": [{"id": 1}]})
        );
        let dotted = Record {
            key: "8".into(),
            identity: Document::new().into(),
            fields: Document::from([("meta".to_owned(), Value::Json(json!({"a.b": 1})))]).into(),
        };
        let error = attributes_of(&dotted, "8".into(), false).unwrap_err();
        assert!(error.contains("nested attribute \"meta\""), "{error}");
        let long = Record {
            key: "9".into(),
            identity: Document::new().into(),
            fields: Document::from([("meta".to_owned(), Value::Json(json!({"note": "x".repeat(256)})))])
                .into(),
        };
        assert!(attributes_of(&long, "9".into(), false).is_err());
    }

    #[test]
    fn a_record_without_an_external_id_has_none() {
        let record = Record {
            key: "1".into(),
            identity: Document::from([("a".to_owned(), Value::Int(1)), ("b".to_owned(), Value::Null)]).into(),
            fields: Document::new().into(),
        };
        assert_eq!(external_id_of(&record), None);
        let record = Record {
            key: "1".into(),
            identity: Document::from([(EXTERNAL_ID.to_owned(), Value::Null)]).into(),
            fields: Document::new().into(),
        };
        assert_eq!(external_id_of(&record), None);
    }

    #[test]
    fn minor_errors_reject_the_records_they_index() {
        let body = br#"{"message":"success","attributes_processed":2,"errors":[
            {"type":"'email' is not a valid email address","input_array":"attributes","index":1},
            {"type":"'price' is not valid","input_array":"purchases","index":0}]}"#;
        assert_eq!(
            read_track_errors(body, 3),
            vec![
                RecordOutcome::Accepted,
                RecordOutcome::Rejected("'email' is not a valid email address".into()),
                RecordOutcome::Accepted,
            ]
        );
        assert_eq!(read_track_errors(b"", 1), vec![RecordOutcome::Accepted]);
    }

    #[test]
    fn a_refusal_naming_every_record_rejects_them_and_any_other_refuses_the_batch() {
        let body = br#"{"message":"Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.",
            "errors":[{"type":"bad","input_array":"attributes","index":0},{"type":"worse","input_array":"attributes","index":1}]}"#;
        assert_eq!(
            read_refusal(body, 2),
            Some(vec![
                RecordOutcome::Rejected("bad".into()),
                RecordOutcome::Rejected("worse".into()),
            ])
        );
        assert_eq!(read_refusal(body, 3), None);
        assert_eq!(read_refusal(br#"{"message":"Bad request"}"#, 1), None);
    }

    #[test]
    fn throttling_waits_until_the_rate_limit_resets() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("9"));
        assert_eq!(throttle_wait(&headers, now), Some(Duration::from_secs(9)));
        headers.insert(RATE_LIMIT_RESET_HEADER, HeaderValue::from_static("1700000003"));
        assert_eq!(throttle_wait(&headers, now), Some(Duration::from_secs(3)));
        headers.insert(RATE_LIMIT_RESET_HEADER, HeaderValue::from_static("1699999990"));
        assert_eq!(throttle_wait(&headers, now), Some(Duration::ZERO));
        assert_eq!(throttle_wait(&HeaderMap::new(), now), None);
    }

    #[test]
    fn a_bad_base_url_or_a_missing_key_fails_at_construction() {
        assert!(matches!(
            connector("rest.iad-01.braze.com"),
            Err(DestinationError::Invalid(_))
        ));
        assert!(matches!(
            connector("ftp://rest.iad-01.braze.com"),
            Err(DestinationError::Invalid(_))
        ));
        let c = connector("https://rest.iad-01.braze.com/").unwrap();
        assert_eq!(c.base, "https://rest.iad-01.braze.com");
        assert!(!format!("{c:?}").contains("secret"));
        let missing = BrazeConnector::new(
            &BrazeSpec {
                base_url: "https://rest.iad-01.braze.com".into(),
            },
            Some(&SecretKeyRef {
                name: "braze".into(),
                key: Some("rest".into()),
                namespace: None,
            }),
            Some(&SecretData::default()),
        );
        assert!(
            matches!(missing, Err(DestinationError::MissingSecretKey { ref secret, ref key }) if secret == "braze" && key == "rest")
        );
    }
}
