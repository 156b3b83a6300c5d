//! The `hubspot` destination: HubSpot CRM v3 objects (contacts, companies, deals, other
//! standard objects and custom objects) written through the batch endpoints.
//!
//! - upsert: `POST /crm/v3/objects/{object}/batch/upsert`, matched on `idProperty`;
//! - update: `POST …/batch/update` with `idProperty` (never creates; unknown ids are rejected);
//! - insert: `POST …/batch/create` (a duplicate is refused by HubSpot and rejected);
//! - delete: `POST …/batch/read` by `idProperty` to find the records' ids, then
//!   `POST …/batch/archive`; a record HubSpot does not know is already gone.
//!
//! Docs: <https://developers.hubspot.com/docs/api/crm/contacts> (batch endpoints, 100 inputs
//! per call), <https://developers.hubspot.com/docs/api/usage-details> (rate limits),
//! <https://developers.hubspot.com/docs/api/error-handling> (multi-status `207` bodies).
//!
//! HubSpot property values are strings: numbers, booleans, dates and timestamps are written as
//! their text, a NULL as `""` (which clears the property), nested JSON as its compact text.
//! A mapping target `properties.x` already nests under `properties`; such fields are merged
//! with the top-level ones.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value as Json, json};

use super::vendor;
use super::vendor::answer::{
    EXCERPT_CHARS, RequestLabel, excerpt, retry_after, status_error, transport_error,
};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::HubspotSpec;
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::Value;
use crate::redact::Scrubber;

/// HubSpot's API host unless `baseUrl` says otherwise.
pub const DEFAULT_BASE_URL: &str = "https://api.hubapi.com";
/// Inputs per batch call, HubSpot's documented limit.
pub const MAX_BATCH_SIZE: usize = 100;
/// The Secret key holding the private-app token unless `credentialsSecretRef.key` names another.
pub const DEFAULT_SECRET_KEY: &str = "token";
/// Requests per second: HubSpot's default per-app limit is 100 per 10 seconds (Free and
/// Starter), with a burst; staying at 9 per second keeps clear of the secondly limit.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 9.0;
/// Requests in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// The header HubSpot's 429 answers carry: the length of the rate-limit window.
pub const RATE_LIMIT_INTERVAL_HEADER: &str = "x-hubspot-ratelimit-interval-milliseconds";

/// The vendor's name in messages.
const VENDOR: &str = "HubSpot";
/// Error categories of a multi-status body that may pass on retry.
const TRANSIENT_CATEGORIES: &[&str] = &["RATE_LIMITS", "TIMEOUT", "INTERNAL_ERROR"];

/// A HubSpot CRM object type, written through the v3 batch API.
pub struct HubspotConnector {
    client: reqwest::Client,
    base: String,
    host: String,
    object: String,
    id_property: String,
    headers: HeaderMap,
    scrubber: Scrubber,
}

impl std::fmt::Debug for HubspotConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubspotConnector")
            .field("base", &self.base)
            .field("object", &self.object)
            .field("id_property", &self.id_property)
            .finish_non_exhaustive()
    }
}

impl HubspotConnector {
    /// Builds the connector: checks the object type, the id property and the base URL, and
    /// reads the token from the Secret.
    pub fn new(
        spec: &HubspotSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let HubspotSpec {
            object,
            id_property,
            base_url,
        } = spec;
        let valid_name = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        };
        if !valid_name(object) {
            return Err(DestinationError::Invalid(format!(
                "spec.hubspot.object: {object:?} is not an object type; use contacts, companies, \
                 deals or a custom object's type id like 2-12345"
            )));
        }
        if !valid_name(id_property) {
            return Err(DestinationError::Invalid(format!(
                "spec.hubspot.idProperty: {id_property:?} is not a HubSpot property name"
            )));
        }
        let base_text = base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let host = vendor::host(&vendor::http_url("spec.hubspot.baseUrl", base_text, "")?);

        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "hubspot")?;
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

        let client = vendor::client(TIMEOUT)?;

        Ok(HubspotConnector {
            client,
            base: base_text.trim_end_matches('/').to_owned(),
            host,
            object: object.clone(),
            id_property: id_property.clone(),
            headers,
            scrubber: Scrubber::new().with_secret(secret),
        })
    }

    fn batch_url(&self, action: &str) -> String {
        format!("{}/crm/v3/objects/{}/batch/{action}", self.base, self.object)
    }

    fn label(&self, method: Method, url: &str) -> RequestLabel {
        RequestLabel {
            method,
            url: self.scrubber.scrub(url),
            host: self.host.clone(),
        }
    }

    /// The record's value of `idProperty`: from its identity (the sync's match fields), as
    /// `idProperty` or `properties.idProperty`, or its only match field; else from its fields.
    fn id_of(&self, record: &Record) -> Option<String> {
        let nested = format!("properties.{}", self.id_property);
        let lookup = |doc: &crate::model::value::Document| -> Option<String> {
            let value = doc
                .get(&self.id_property)
                .or_else(|| doc.get(&nested))
                .or_else(|| match doc.get("properties") {
                    Some(Value::Object(props)) => props.get(&self.id_property),
                    _ => None,
                })?;
            (!value.is_null()).then(|| value.to_text())
        };
        lookup(&record.identity)
            .or_else(|| match record.identity.len() {
                1 => record
                    .identity
                    .values()
                    .next()
                    .filter(|v| !v.is_null())
                    .map(Value::to_text),
                _ => None,
            })
            .or_else(|| lookup(&record.fields))
    }

    /// The record's HubSpot properties, all strings. With `keep_id`, the id property stays
    /// among them (creates need it); otherwise a top-level id property is left to `id`.
    fn properties_of(&self, record: &Record, keep_id: bool, id: &str) -> Map<String, Json> {
        let mut out = Map::new();
        for (name, value) in &record.fields {
            match (name.as_str(), value) {
                ("properties", Value::Object(nested)) => {
                    for (k, v) in nested {
                        out.insert(k.clone(), Json::String(property_text(v)));
                    }
                }
                (n, _) if n == self.id_property && !keep_id => {}
                (n, v) => {
                    let n = n.strip_prefix("properties.").unwrap_or(n);
                    out.insert(n.to_owned(), Json::String(property_text(v)));
                }
            }
        }
        if keep_id && !out.contains_key(&self.id_property) {
            out.insert(self.id_property.clone(), Json::String(id.to_owned()));
        }
        out
    }

    /// POSTs a JSON body; a 2xx answer gives its status and body, anything else the batch error.
    async fn post(&self, action: &str, body: &Json) -> Result<(StatusCode, Vec<u8>), SendError> {
        let url = self.batch_url(action);
        let label = self.label(Method::POST, &url);
        let response = self
            .client
            .post(&url)
            .headers(self.headers.clone())
            .json(body)
            .send()
            .await
            .map_err(|e| self.scrubber.error(transport_error(&label, e, TIMEOUT)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = super::vendor::read_body(response, super::vendor::MAX_RESPONSE_BYTES, &label, TIMEOUT)
            .await
            .map_err(|e| self.scrubber.error(e))?;
        if status.is_success() {
            Ok((status, bytes.to_vec()))
        } else {
            Err(self
                .scrubber
                .error(self.failure(&label, status, &headers, &bytes)))
        }
    }

    /// What a non-2xx answer means for the batch, in HubSpot's terms.
    fn failure(
        &self,
        label: &RequestLabel,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> SendError {
        let code = status.as_u16();
        let message = hubspot_message(body);
        let detail = vendor::detail(&message);
        match code {
            401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code}){detail}")),
            404 => SendError::Fatal(format!(
                "{VENDOR} does not know object type {:?} (HTTP 404 from {} {}){detail}",
                self.object, label.method, label.url
            )),
            429 => SendError::Retryable {
                reason: format!("{VENDOR} is throttling requests (HTTP 429){detail}"),
                retry_after: throttle_wait(headers),
                throttled: true,
            },
            400 if !missing_properties(body).is_empty() => SendError::Fatal(format!(
                "{VENDOR} object type {:?} has no property {} (PROPERTY_DOESNT_EXIST): create it in \
                 HubSpot or map the sync's fields to existing properties",
                self.object,
                missing_properties(body).join(", ")
            )),
            400 | 409 | 422 => SendError::BatchRejected(if message.is_empty() {
                format!("{VENDOR} refused the batch (HTTP {code})")
            } else {
                message
            }),
            _ => status_error(label, status, headers, body),
        }
    }

    async fn write(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut sent: Vec<(usize, String)> = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            let Some(id) = self.id_of(record) else {
                outcomes[i] = Some(self.missing_id());
                continue;
            };
            let input = match operation {
                Operation::Insert => json!({"properties": self.properties_of(record, true, &id)}),
                _ => json!({
                    "idProperty": self.id_property,
                    "id": id,
                    "properties": self.properties_of(record, false, &id),
                }),
            };
            inputs.push(input);
            sent.push((i, id));
        }
        if !inputs.is_empty() {
            let action = match operation {
                Operation::Upsert => "upsert",
                Operation::Update => "update",
                _ => "create",
            };
            let (status, body) = self.post(action, &json!({ "inputs": inputs })).await?;
            let read = read_multi_status(status, &body, &sent, &self.id_property);
            for ((i, _), outcome) in sent.iter().zip(read) {
                outcomes[*i] = Some(self.scrub_outcome(outcome));
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    async fn delete(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut wanted: Vec<(usize, String)> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match self.id_of(record) {
                Some(id) => wanted.push((i, id)),
                None => outcomes[i] = Some(self.missing_id()),
            }
        }
        if !wanted.is_empty() {
            let inputs: Vec<Json> = wanted.iter().map(|(_, id)| json!({ "id": id })).collect();
            let request = json!({
                "idProperty": self.id_property,
                "inputs": inputs,
                "properties": [self.id_property],
            });
            let (_, body) = self.post("read", &request).await?;
            let found = read_lookup(&body, &self.id_property);
            let mut archive: Vec<(usize, String)> = Vec::new();
            for (i, id) in &wanted {
                match found.get(&fold(id)) {
                    Some(Lookup::Found(object_id)) => archive.push((*i, object_id.clone())),
                    Some(Lookup::Failed(reason)) => {
                        outcomes[*i] = Some(self.scrub_outcome(RecordOutcome::Rejected(reason.clone())));
                    }
                    // Not found: already deleted, which is what a delete wants.
                    Some(Lookup::Missing) | None => outcomes[*i] = Some(RecordOutcome::Accepted),
                }
            }
            if !archive.is_empty() {
                let inputs: Vec<Json> = archive.iter().map(|(_, id)| json!({ "id": id })).collect();
                self.post("archive", &json!({ "inputs": inputs })).await?;
                for (i, _) in archive {
                    outcomes[i] = Some(RecordOutcome::Accepted);
                }
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    fn missing_id(&self) -> RecordOutcome {
        RecordOutcome::Rejected(format!(
            "the record has no value for idProperty {:?}; map it and list it in the sync's match",
            self.id_property
        ))
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
impl Connector for HubspotConnector {
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

    /// Lists one record of the object type: proves the token works and the object exists.
    async fn check(&self) -> Result<(), SendError> {
        let url = format!("{}/crm/v3/objects/{}?limit=1", self.base, self.object);
        let label = self.label(Method::GET, &url);
        let response = self
            .client
            .get(&url)
            .headers(self.headers.clone())
            .send()
            .await
            .map_err(|e| self.scrubber.error(transport_error(&label, e, TIMEOUT)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = response.headers().clone();
        let body = super::vendor::read_body(response, super::vendor::MAX_ERROR_BODY_BYTES, &label, TIMEOUT)
            .await
            .unwrap_or_default();
        let error = match self.failure(&label, status, &headers, &body) {
            // A refused check request says nothing about batches; nothing to split.
            SendError::BatchRejected(reason) => SendError::Fatal(reason),
            other => other,
        };
        Err(self.scrubber.error(error))
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if batch.len() > MAX_BATCH_SIZE {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s {MAX_BATCH_SIZE} inputs per call (a bug in \
                 batching)",
                batch.len()
            )));
        }
        match operation {
            Operation::Delete => self.delete(batch).await,
            Operation::Upsert | Operation::Update | Operation::Insert => self.write(operation, batch).await,
        }
    }
}

/// A value as a HubSpot property string: text as is, NULL as `""` (clears the property),
/// everything else in its canonical text form.
fn property_text(value: &Value) -> String {
    match value {
        Value::Null | Value::Json(Json::Null) => String::new(),
        other => other.to_text(),
    }
}

/// Matching form of an id: HubSpot stores emails in lower case and matches them so.
fn fold(id: &str) -> String {
    id.to_lowercase()
}

/// The wait a 429 asks for: `Retry-After` when present, else the rate-limit window HubSpot
/// names in `X-HubSpot-RateLimit-Interval-Milliseconds`.
fn throttle_wait(headers: &HeaderMap) -> Option<Duration> {
    retry_after(headers, SystemTime::now()).or_else(|| {
        headers
            .get(RATE_LIMIT_INTERVAL_HEADER)?
            .to_str()
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .map(Duration::from_millis)
    })
}

/// The properties a `400` names as not existing (`PROPERTY_DOESNT_EXIST`): an error about the
/// request, which every record of the sync would meet, so the run stops rather than splitting
/// the batch. HubSpot embeds the property errors as JSON in `message` (`Property values were
/// not valid: [{"error":"PROPERTY_DOESNT_EXIST","name":"x",…}]`), and may list them under
/// `errors` with `subCategory` or `context.propertyName`.
fn missing_properties(body: &[u8]) -> Vec<String> {
    const CODE: &str = "PROPERTY_DOESNT_EXIST";
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return Vec::new();
    };
    let mut names: Vec<String> = Vec::new();
    let message = json.get("message").and_then(Json::as_str).unwrap_or_default();
    if let (Some(start), Some(end)) = (message.find('['), message.rfind(']'))
        && start < end
        && let Ok(Json::Array(items)) = serde_json::from_str::<Json>(&message[start..=end])
    {
        names.extend(
            items
                .iter()
                .filter(|i| i.get("error").and_then(Json::as_str) == Some(CODE))
                .filter_map(|i| i.get("name").and_then(Json::as_str).map(str::to_owned)),
        );
    }
    for error in json.get("errors").and_then(Json::as_array).into_iter().flatten() {
        let code = error
            .get("subCategory")
            .or_else(|| error.get("code"))
            .and_then(Json::as_str);
        if code == Some(CODE) {
            let name = error
                .get("context")
                .and_then(|c| c.get("propertyName"))
                .and_then(Json::as_array)
                .and_then(|n| n.first())
                .and_then(Json::as_str)
                .unwrap_or("?");
            names.push(name.to_owned());
        }
    }
    if names.is_empty() && message.contains(CODE) {
        names.push("?".to_owned());
    }
    names.sort();
    names.dedup();
    names
}

/// HubSpot's error text from an error body (`category: message`), or an excerpt of the body.
fn hubspot_message(body: &[u8]) -> String {
    match serde_json::from_slice::<Json>(body) {
        Ok(json) => {
            let message = json.get("message").and_then(Json::as_str).unwrap_or_default();
            let category = json.get("category").and_then(Json::as_str).unwrap_or_default();
            match (category.is_empty(), message.is_empty()) {
                (_, true) => excerpt(body),
                (true, false) => excerpt(message.as_bytes()),
                (false, false) => excerpt(format!("{category}: {message}").as_bytes()),
            }
        }
        Err(_) => excerpt(body),
    }
}

/// The ids an error of a multi-status body names, and the input positions it names.
fn error_targets(error: &Json) -> (Vec<String>, Vec<usize>) {
    let context = error.get("context");
    let list = |name: &str| -> Vec<String> {
        context
            .and_then(|c| c.get(name))
            .and_then(Json::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| match v {
                        Json::String(s) => Some(s.clone()),
                        Json::Number(n) => Some(n.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let indexes = list("index")
        .into_iter()
        .chain(list("indexes"))
        .filter_map(|s| s.parse().ok())
        .collect();
    (list("ids"), indexes)
}

fn error_outcome(error: &Json) -> RecordOutcome {
    let category = error.get("category").and_then(Json::as_str).unwrap_or_default();
    let message = error
        .get("message")
        .and_then(Json::as_str)
        .map(|m| excerpt(m.as_bytes()))
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("{VENDOR} refused the record ({category})"));
    if TRANSIENT_CATEGORIES.contains(&category) {
        RecordOutcome::Retry(message)
    } else {
        RecordOutcome::Rejected(message)
    }
}

/// Per-record outcomes of a batch write's 2xx answer, one per `sent` input in order.
///
/// Errors of a `207` body are matched to inputs by the ids in their `context.ids` (or input
/// positions in `context.index`). Inputs no error names are accepted; but when some error names
/// no input, inputs that are not among the `results` either cannot be told apart from the
/// failed ones and are rejected with that error (the next run sends them again).
fn read_multi_status(
    status: StatusCode,
    body: &[u8],
    sent: &[(usize, String)],
    id_property: &str,
) -> Vec<RecordOutcome> {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return vec![RecordOutcome::Accepted; sent.len()];
    };
    let errors = json
        .get("errors")
        .and_then(Json::as_array)
        .cloned()
        .unwrap_or_default();
    let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
    for (pos, (_, id)) in sent.iter().enumerate() {
        by_id.entry(fold(id)).or_default().push(pos);
    }
    let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; sent.len()];
    let mut unattributed: Vec<RecordOutcome> = Vec::new();
    for error in &errors {
        let outcome = error_outcome(error);
        let (ids, indexes) = error_targets(error);
        let mut hit = false;
        for id in ids {
            for pos in by_id.get(&fold(&id)).into_iter().flatten() {
                outcomes[*pos] = Some(outcome.clone());
                hit = true;
            }
        }
        for pos in indexes {
            if let Some(slot) = outcomes.get_mut(pos) {
                *slot = Some(outcome.clone());
                hit = true;
            }
        }
        if !hit {
            unattributed.push(outcome);
        }
    }
    if !unattributed.is_empty() && status == StatusCode::MULTI_STATUS {
        let landed: std::collections::HashSet<String> = json
            .get("results")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
            .filter_map(|r| r.get("properties")?.get(id_property)?.as_str().map(fold))
            .collect();
        let reason = unattributed
            .iter()
            .map(|o| match o {
                RecordOutcome::Rejected(r) | RecordOutcome::Retry(r) => r.as_str(),
                RecordOutcome::Accepted => "",
            })
            .collect::<Vec<_>>()
            .join("; ");
        let reason: String = reason.chars().take(EXCERPT_CHARS).collect();
        for (pos, (_, id)) in sent.iter().enumerate() {
            if outcomes[pos].is_none() && !landed.contains(&fold(id)) {
                outcomes[pos] = Some(RecordOutcome::Rejected(reason.clone()));
            }
        }
    }
    RecordOutcome::accepted_unless_set(outcomes)
}

/// What a batch read said about one id.
#[derive(Debug, Clone, PartialEq)]
enum Lookup {
    /// The record exists under this HubSpot object id.
    Found(String),
    /// HubSpot does not have it.
    Missing,
    /// The lookup failed for another reason.
    Failed(String),
}

/// The batch read's answer, keyed by the folded `idProperty` value.
fn read_lookup(body: &[u8], id_property: &str) -> HashMap<String, Lookup> {
    let mut found = HashMap::new();
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return found;
    };
    for error in json.get("errors").and_then(Json::as_array).into_iter().flatten() {
        let category = error.get("category").and_then(Json::as_str).unwrap_or_default();
        let lookup = if category == "OBJECT_NOT_FOUND" {
            Lookup::Missing
        } else {
            match error_outcome(error) {
                RecordOutcome::Rejected(r) | RecordOutcome::Retry(r) => Lookup::Failed(r),
                RecordOutcome::Accepted => Lookup::Missing,
            }
        };
        for id in error_targets(error).0 {
            found.insert(fold(&id), lookup.clone());
        }
    }
    for result in json.get("results").and_then(Json::as_array).into_iter().flatten() {
        let object_id = match result.get("id") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Number(n)) => n.to_string(),
            _ => continue,
        };
        if let Some(value) = result
            .get("properties")
            .and_then(|p| p.get(id_property))
            .and_then(Json::as_str)
        {
            found.insert(fold(value), Lookup::Found(object_id));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::value::Document;
    use reqwest::header::HeaderValue;

    fn connector(object: &str, id_property: &str) -> Result<HubspotConnector, DestinationError> {
        let secret = SecretData::new(BTreeMap::from([(
            "token".to_owned(),
            "pat-na1-secret".to_owned(),
        )]));
        HubspotConnector::new(
            &HubspotSpec {
                object: object.into(),
                id_property: id_property.into(),
                base_url: None,
            },
            Some(&SecretKeyRef {
                name: "hubspot".into(),
                key: None,
                namespace: None,
            }),
            Some(&secret),
        )
    }

    #[test]
    fn properties_are_strings_and_nested_properties_are_flattened() {
        let c = connector("contacts", "email").unwrap();
        let mut nested = Document::new();
        nested.insert("lifecyclestage".into(), Value::Text("customer".into()));
        let record = Record {
            key: "1".into(),
            identity: Document::from([("email".to_owned(), Value::Text("a@x.io".into()))]).into(),
            fields: Document::from([
                ("email".to_owned(), Value::Text("a@x.io".into())),
                ("ltv".to_owned(), Value::Int(12)),
                ("vip".to_owned(), Value::Bool(true)),
                ("phone".to_owned(), Value::Null),
                ("properties".to_owned(), Value::Object(nested)),
            ])
            .into(),
        };
        let id = c.id_of(&record).unwrap();
        assert_eq!(id, "a@x.io");
        assert_eq!(
            Json::Object(c.properties_of(&record, false, &id)),
            json!({"ltv": "12", "vip": "true", "phone": "", "lifecyclestage": "customer"})
        );
        assert_eq!(
            c.properties_of(&record, true, &id).get("email"),
            Some(&json!("a@x.io"))
        );
    }

    #[test]
    fn a_nested_match_field_names_the_id() {
        let c = connector("contacts", "email").unwrap();
        let record = Record {
            key: "1".into(),
            identity: Document::from([("properties.email".to_owned(), Value::Text("b@x.io".into()))]).into(),
            fields: Document::new().into(),
        };
        assert_eq!(c.id_of(&record).as_deref(), Some("b@x.io"));
    }

    #[test]
    fn bad_object_names_and_missing_tokens_fail_at_construction() {
        assert!(matches!(
            connector("contacts/../x", "email"),
            Err(DestinationError::Invalid(_))
        ));
        assert!(connector("2-12345", "external_id").is_ok());
        let missing = HubspotConnector::new(
            &HubspotSpec {
                object: "deals".into(),
                id_property: "deal_key".into(),
                base_url: None,
            },
            Some(&SecretKeyRef {
                name: "hs".into(),
                key: Some("pat".into()),
                namespace: None,
            }),
            Some(&SecretData::default()),
        );
        assert!(
            matches!(missing, Err(DestinationError::MissingSecretKey { ref secret, ref key }) if secret == "hs" && key == "pat")
        );
    }

    #[test]
    fn multi_status_errors_map_to_records_by_id_and_index() {
        let sent = vec![
            (0, "a@x.io".to_owned()),
            (1, "Bad".to_owned()),
            (2, "c@x.io".to_owned()),
        ];
        let body = br#"{"status":"COMPLETE","results":[],"numErrors":2,"errors":[
            {"status":"error","category":"VALIDATION_ERROR","message":"Email address bad is invalid","context":{"ids":["bad"]}},
            {"status":"error","category":"RATE_LIMITS","message":"slow down","context":{"index":["2"]}}]}"#;
        assert_eq!(
            read_multi_status(StatusCode::MULTI_STATUS, body, &sent, "email"),
            vec![
                RecordOutcome::Accepted,
                RecordOutcome::Rejected("Email address bad is invalid".into()),
                RecordOutcome::Retry("slow down".into()),
            ]
        );
    }

    #[test]
    fn an_error_naming_no_input_rejects_the_inputs_missing_from_the_results() {
        let sent = vec![(0, "a@x.io".to_owned()), (1, "b@x.io".to_owned())];
        let body = br#"{"status":"COMPLETE","results":[{"id":"1","properties":{"email":"a@x.io"}}],
            "numErrors":1,"errors":[{"status":"error","category":"VALIDATION_ERROR","message":"nope"}]}"#;
        assert_eq!(
            read_multi_status(StatusCode::MULTI_STATUS, body, &sent, "email"),
            vec![RecordOutcome::Accepted, RecordOutcome::Rejected("nope".into())]
        );
    }

    #[test]
    fn throttling_waits_for_retry_after_or_the_rate_limit_window() {
        let mut headers = HeaderMap::new();
        headers.insert(RATE_LIMIT_INTERVAL_HEADER, HeaderValue::from_static("10000"));
        assert_eq!(throttle_wait(&headers), Some(Duration::from_secs(10)));
        headers.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(throttle_wait(&headers), Some(Duration::from_secs(2)));
        assert_eq!(throttle_wait(&HeaderMap::new()), None);
    }

    #[test]
    fn batch_reads_tell_found_missing_and_failed_apart() {
        let body = br#"{"status":"COMPLETE","results":[{"id":"901","properties":{"email":"A@x.io","hs_object_id":"901"}}],
            "errors":[{"status":"error","category":"OBJECT_NOT_FOUND","message":"gone","context":{"ids":["b@x.io"]}},
                      {"status":"error","category":"VALIDATION_ERROR","message":"bad id","context":{"ids":["zz"]}}]}"#;
        let found = read_lookup(body, "email");
        assert_eq!(found.get("a@x.io"), Some(&Lookup::Found("901".into())));
        assert_eq!(found.get("b@x.io"), Some(&Lookup::Missing));
        assert_eq!(found.get("zz"), Some(&Lookup::Failed("bad id".into())));
    }
}
