//! The `mailchimp` destination: members of one Mailchimp audience (list), written through the
//! Marketing API 3.0 batch subscribe endpoint and matched on their email address.
//!
//! - upsert: `POST /lists/{list_id}` with `update_existing: true` (adds new members with
//!   `status_if_new`, updates existing ones);
//! - insert: the same call with `update_existing: false`: Mailchimp refuses an existing member
//!   with `ERROR_CONTACT_EXISTS`, and that record is rejected;
//! - update: Mailchimp has no update-only batch call, so each member is first looked up with
//!   `GET /lists/{list_id}/members/{subscriber_hash}`; members the audience does not have are
//!   rejected, the others are sent with `update_existing: true`;
//! - delete: `DELETE /lists/{list_id}/members/{subscriber_hash}` per member (archives it); a
//!   `404` means it is already gone.
//!
//! Docs: <https://mailchimp.com/developer/marketing/api/lists/batch-subscribe-or-unsubscribe/>
//! (500 members per call, per-member `errors`),
//! <https://mailchimp.com/developer/marketing/docs/fundamentals/> (API key, data centre,
//! Basic auth, 10 simultaneous connections), <https://mailchimp.com/developer/marketing/docs/errors/>
//! (error bodies), <https://mailchimp.com/developer/marketing/api/list-members/> (subscriber
//! hash, archive).
//!
//! Field convention: `email_address` (or the sync's single match field) is the member's email;
//! a `merge_fields` object (or dotted `merge_fields.X` targets) and fields named like a merge
//! tag (`FNAME`, `PHONE`: upper-case letters, digits, `_`) become `merge_fields`; `tags` (an
//! array, or comma-separated text) becomes the member's tags; `language`, `vip`, `email_type`,
//! `status`, `interests` and `location` are member fields passed as they are. Any other field is
//! a mapping mistake and rejects the record with a message that says so.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use md5::{Digest, Md5};
use reqwest::header::{AUTHORIZATION, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value as Json, json};

use super::vendor;
use super::vendor::answer::{RequestLabel, excerpt, retry_after, status_error, transport_error};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::{MailchimpSpec, MailchimpStatus};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::Value;
use crate::redact::Scrubber;

/// Members per batch subscribe call, Mailchimp's documented limit.
pub const MAX_BATCH_SIZE: usize = 500;
/// The Secret key holding the API key unless `credentialsSecretRef.key` names another.
pub const DEFAULT_SECRET_KEY: &str = "apiKey";
/// Requests per second. Mailchimp documents no per-second rate, only 10 simultaneous
/// connections per user; 10 per second keeps a sync well inside that.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 10.0;
/// Requests in flight at once (Mailchimp allows 10 simultaneous connections per user, shared
/// with the user's other integrations).
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Request timeout (Mailchimp times requests out after 120 s; a 500-member batch is slow).
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// Member lookups and archives in flight at once within one batch.
const PER_MEMBER_CONCURRENCY: usize = 2;
/// The vendor's name in messages.
const VENDOR: &str = "Mailchimp";
/// Member fields written as they are.
const MEMBER_FIELDS: &[&str] = &["language", "vip", "email_type", "status", "interests", "location"];

/// One Mailchimp audience, written through the Marketing API 3.0.
pub struct MailchimpConnector {
    client: reqwest::Client,
    base: String,
    host: String,
    list_id: String,
    status_if_new: MailchimpStatus,
    headers: HeaderMap,
    scrubber: Scrubber,
}

impl std::fmt::Debug for MailchimpConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailchimpConnector")
            .field("base", &self.base)
            .field("list_id", &self.list_id)
            .field("status_if_new", &self.status_if_new)
            .finish_non_exhaustive()
    }
}

/// The data centre an API key names after its last `-` (`…-us21` → `us21`).
pub fn data_centre(api_key: &str) -> Option<&str> {
    let (_, dc) = api_key.rsplit_once('-')?;
    (!dc.is_empty() && dc.chars().all(|c| c.is_ascii_alphanumeric())).then_some(dc)
}

/// Mailchimp's subscriber hash: the MD5 of the lower-cased email address, in hex.
pub fn subscriber_hash(email: &str) -> String {
    let digest = Md5::digest(email.trim().to_lowercase().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl MailchimpConnector {
    /// Builds the connector: reads the API key from the Secret, and takes the base URL from
    /// `baseUrl` or the key's data centre.
    pub fn new(
        spec: &MailchimpSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let MailchimpSpec {
            list_id,
            status,
            base_url,
        } = spec;
        if list_id.is_empty() || !list_id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(DestinationError::Invalid(format!(
                "spec.mailchimp.listId: {list_id:?} is not an audience id (letters and digits, like \
                 a1b2c3d4e5)"
            )));
        }
        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "mailchimp")?;
        let key = secret_ref.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY);
        let api_key = vendor::secret_value(data, &secret_ref.name, key)?;
        let base_text = match base_url {
            Some(url) => url.clone(),
            None => {
                let dc = data_centre(api_key).ok_or_else(|| {
                    DestinationError::Invalid(format!(
                        "key {key:?} of Secret {:?} is not a Mailchimp API key: it must end in its \
                         data centre, like -us21",
                        secret_ref.name
                    ))
                })?;
                format!("https://{dc}.api.mailchimp.com/3.0")
            }
        };
        let host = vendor::host(&vendor::http_url("spec.mailchimp.baseUrl", &base_text, "")?);

        let basic = base64::engine::general_purpose::STANDARD.encode(format!("backflow:{api_key}"));
        let auth = vendor::sensitive_header(&format!("Basic {basic}"), || {
            format!(
                "key {key:?} of Secret {:?} is not a valid API key",
                secret_ref.name
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);

        let client = vendor::client(TIMEOUT)?;

        Ok(MailchimpConnector {
            client,
            base: base_text.trim_end_matches('/').to_owned(),
            host,
            list_id: list_id.clone(),
            status_if_new: status.unwrap_or(MailchimpStatus::Subscribed),
            headers,
            // The Basic credential is never put in a message, but mask its encoding anyway.
            scrubber: Scrubber::new().with_secret(Some(&SecretData::new(
                data.entries()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .chain([("basic".to_owned(), basic)])
                    .collect(),
            ))),
        })
    }

    fn list_url(&self) -> String {
        format!("{}/lists/{}", self.base, self.list_id)
    }

    fn member_url(&self, email: &str) -> String {
        format!("{}/members/{}", self.list_url(), subscriber_hash(email))
    }

    fn label(&self, method: Method, url: &str) -> RequestLabel {
        RequestLabel {
            method,
            url: self.scrubber.scrub(url),
            host: self.host.clone(),
        }
    }

    /// Sends one request; answers the status, headers and body, or the transport error.
    async fn call(
        &self,
        method: Method,
        url: &str,
        body: Option<&Json>,
    ) -> Result<(StatusCode, HeaderMap, Vec<u8>, RequestLabel), SendError> {
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
        Ok((status, headers, bytes.to_vec(), label))
    }

    /// What a non-2xx answer means for the batch, in Mailchimp's terms.
    fn failure(
        &self,
        label: &RequestLabel,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> SendError {
        let code = status.as_u16();
        let message = mailchimp_message(body);
        let detail = vendor::detail(&message);
        let error = match code {
            401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code}){detail}")),
            404 => SendError::Fatal(format!(
                "{VENDOR} does not know audience {:?} (HTTP 404 from {} {}){detail}",
                self.list_id, label.method, label.url
            )),
            429 => SendError::Retryable {
                reason: format!("{VENDOR} is throttling requests (HTTP 429){detail}"),
                retry_after: retry_after(headers, SystemTime::now()),
                throttled: true,
            },
            400 | 422 => SendError::BatchRejected(if message.is_empty() {
                format!("{VENDOR} refused the batch (HTTP {code})")
            } else {
                message
            }),
            _ => status_error(label, status, headers, body),
        };
        self.scrubber.error(error)
    }

    /// The record's email address: from its identity (`email_address`, `email`, or its only
    /// match field), else from its fields.
    fn email_of(record: &Record) -> Option<String> {
        let lookup = |doc: &crate::model::value::Document| -> Option<String> {
            let value = doc.get("email_address").or_else(|| doc.get("email"))?;
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
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
    }

    /// The member object of the batch subscribe call, or why the record cannot be one.
    fn member_of(&self, record: &Record, email: &str) -> Result<Json, String> {
        let mut member = Map::new();
        let mut merge = Map::new();
        member.insert("email_address".into(), Json::String(email.to_owned()));
        member.insert(
            "status_if_new".into(),
            Json::String(self.status_if_new.as_str().to_owned()),
        );
        let identity_names: Vec<&String> = record.identity.keys().collect();
        for (name, value) in &record.fields {
            match (name.as_str(), value) {
                ("email_address" | "email", _) => {}
                ("merge_fields", Value::Object(nested)) => {
                    for (k, v) in nested {
                        merge.insert(k.clone(), merge_value(v));
                    }
                }
                ("merge_fields", Value::Json(Json::Object(nested))) => {
                    for (k, v) in nested {
                        merge.insert(k.clone(), v.clone());
                    }
                }
                ("tags", v) => {
                    member.insert("tags".into(), Json::Array(tags_of(v)));
                }
                (n, v) if MEMBER_FIELDS.contains(&n) => {
                    member.insert(n.to_owned(), v.to_json());
                }
                (n, v) if n.starts_with("merge_fields.") => {
                    merge.insert(n["merge_fields.".len()..].to_owned(), merge_value(v));
                }
                (n, v) if is_merge_tag(n) => {
                    merge.insert(n.to_owned(), merge_value(v));
                }
                // The match field itself need not be written.
                (n, _) if identity_names.iter().any(|i| i.as_str() == n) => {}
                (n, _) => {
                    return Err(format!(
                        "field {n:?} is not a Mailchimp member field: map it to merge_fields.{} \
                         (a merge tag), tags, or one of {}",
                        n.to_uppercase(),
                        MEMBER_FIELDS.join(", ")
                    ));
                }
            }
        }
        if !merge.is_empty() {
            member.insert("merge_fields".into(), Json::Object(merge));
        }
        Ok(Json::Object(member))
    }

    /// Whether the audience has a member with this email (any status, archived included).
    async fn exists(&self, email: &str) -> Result<bool, SendError> {
        let url = format!("{}?fields=email_address,status", self.member_url(email));
        let (status, headers, body, label) = self.call(Method::GET, &url, None).await?;
        match status.as_u16() {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(self.failure(&label, status, &headers, &body)),
        }
    }

    async fn write(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut candidates: Vec<(usize, String, Json)> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            let Some(email) = Self::email_of(record) else {
                outcomes[i] = Some(missing_email());
                continue;
            };
            match self.member_of(record, &email) {
                Ok(member) => candidates.push((i, email, member)),
                Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
            }
        }
        if operation == Operation::Update && !candidates.is_empty() {
            let found = self
                .per_member(
                    candidates.iter().map(|(_, e, _)| e.clone()).collect(),
                    |email| async move { self.exists(&email).await },
                )
                .await?;
            let mut kept = Vec::with_capacity(candidates.len());
            for (candidate, exists) in candidates.into_iter().zip(found) {
                if exists {
                    kept.push(candidate);
                } else {
                    outcomes[candidate.0] = Some(RecordOutcome::Rejected(format!(
                        "{} is not a member of audience {:?}; update mode never adds members",
                        candidate.1, self.list_id
                    )));
                }
            }
            candidates = kept;
        }
        if !candidates.is_empty() {
            let members: Vec<Json> = candidates.iter().map(|(_, _, m)| m.clone()).collect();
            let body = json!({
                "members": members,
                "update_existing": operation != Operation::Insert,
            });
            let url = self.list_url();
            let (status, headers, bytes, label) = self.call(Method::POST, &url, Some(&body)).await?;
            if !status.is_success() {
                return Err(self.failure(&label, status, &headers, &bytes));
            }
            let errors = member_errors(&bytes);
            for (i, email, _) in &candidates {
                let outcome = match errors.iter().find(|(e, _)| e.eq_ignore_ascii_case(email)) {
                    Some((_, reason)) => RecordOutcome::Rejected(self.scrubber.scrub(reason)),
                    None => RecordOutcome::Accepted,
                };
                outcomes[*i] = Some(outcome);
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    async fn delete(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut wanted: Vec<(usize, String)> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match Self::email_of(record) {
                Some(email) => wanted.push((i, email)),
                None => outcomes[i] = Some(missing_email()),
            }
        }
        let read = self
            .per_member(
                wanted.iter().map(|(_, e)| e.clone()).collect(),
                |email| async move { self.archive(&email).await },
            )
            .await?;
        for ((i, _), outcome) in wanted.iter().zip(read) {
            outcomes[*i] = Some(outcome);
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    /// Archives one member; a member the audience does not have is already gone.
    async fn archive(&self, email: &str) -> Result<RecordOutcome, SendError> {
        let url = self.member_url(email);
        let (status, headers, body, label) = self.call(Method::DELETE, &url, None).await?;
        match status.as_u16() {
            200..=299 | 404 => Ok(RecordOutcome::Accepted),
            400 | 405 | 422 => Ok(RecordOutcome::Rejected(
                self.scrubber.scrub(&mailchimp_message(&body)),
            )),
            _ => Err(self.failure(&label, status, &headers, &body)),
        }
    }

    /// Runs one request per member, a few at a time, in order; the first batch error wins.
    async fn per_member<T, F, Fut>(&self, emails: Vec<String>, each: F) -> Result<Vec<T>, SendError>
    where
        F: Fn(String) -> Fut,
        Fut: std::future::Future<Output = Result<T, SendError>>,
    {
        use futures::StreamExt as _;
        futures::stream::iter(emails.into_iter().map(each))
            .buffered(PER_MEMBER_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }
}

#[async_trait]
impl Connector for MailchimpConnector {
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

    /// `GET /ping` proves the key and data centre work; `GET /lists/{list_id}` that the
    /// audience exists.
    async fn check(&self) -> Result<(), SendError> {
        for url in [
            format!("{}/ping", self.base),
            format!("{}?fields=id,name", self.list_url()),
        ] {
            let (status, headers, body, label) = self.call(Method::GET, &url, None).await?;
            if status.is_success() {
                continue;
            }
            return Err(match self.failure(&label, status, &headers, &body) {
                // A refused check request says nothing about batches; nothing to split.
                SendError::BatchRejected(reason) => SendError::Fatal(reason),
                other => other,
            });
        }
        Ok(())
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        if batch.len() > MAX_BATCH_SIZE {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s {MAX_BATCH_SIZE} members per call (a bug \
                 in batching)",
                batch.len()
            )));
        }
        match operation {
            Operation::Delete => self.delete(batch).await,
            Operation::Upsert | Operation::Update | Operation::Insert => self.write(operation, batch).await,
        }
    }
}

fn missing_email() -> RecordOutcome {
    RecordOutcome::Rejected(
        "the record has no email address; map it to email_address and list it in the sync's match".to_owned(),
    )
}

/// A merge tag's name: upper-case letters, digits and `_`, starting with a letter.
fn is_merge_tag(name: &str) -> bool {
    name.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// A merge field value: text and numbers as they are, NULL as `""` (clears it), dates as
/// `YYYY-MM-DD`, objects (addresses) as JSON objects.
fn merge_value(value: &Value) -> Json {
    match value {
        Value::Null | Value::Json(Json::Null) => Json::String(String::new()),
        Value::Bool(_) | Value::Uuid(_) | Value::Time(_) | Value::Timestamp(_) | Value::Date(_) => {
            Json::String(value.to_text())
        }
        other => other.to_json(),
    }
}

/// Tag names: an array's items, or comma-separated text; blanks dropped.
fn tags_of(value: &Value) -> Vec<Json> {
    let names: Vec<String> = match value {
        Value::Array(items) => items
            .iter()
            .filter(|v| !v.is_null())
            .map(Value::to_text)
            .collect(),
        Value::Json(Json::Array(items)) => items
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| match v {
                Json::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect(),
        Value::Null | Value::Json(Json::Null) => Vec::new(),
        other => other.to_text().split(',').map(str::to_owned).collect(),
    };
    names
        .into_iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .map(Json::String)
        .collect()
}

/// Mailchimp's error text (`title: detail`), or an excerpt of the body.
fn mailchimp_message(body: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return excerpt(body);
    };
    let title = json.get("title").and_then(Json::as_str).unwrap_or_default();
    let detail = json.get("detail").and_then(Json::as_str).unwrap_or_default();
    let mut text = match (title.is_empty(), detail.is_empty()) {
        (true, true) => return excerpt(body),
        (false, true) => title.to_owned(),
        (true, false) => detail.to_owned(),
        (false, false) => format!("{title}: {detail}"),
    };
    // Field-level problems of a 400 (`errors: [{field, message}]`) say which value is wrong.
    for e in json.get("errors").and_then(Json::as_array).into_iter().flatten() {
        let field = e.get("field").and_then(Json::as_str).unwrap_or_default();
        let message = e.get("message").and_then(Json::as_str).unwrap_or_default();
        if !message.is_empty() {
            text.push_str(&format!("; {field}: {message}"));
        }
    }
    excerpt(text.as_bytes())
}

/// The per-member errors of a batch subscribe answer: email address and reason.
fn member_errors(body: &[u8]) -> Vec<(String, String)> {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return Vec::new();
    };
    json.get("errors")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let email = e.get("email_address").and_then(Json::as_str)?.trim().to_owned();
            let message = e.get("error").and_then(Json::as_str).unwrap_or_default();
            let code = e.get("error_code").and_then(Json::as_str).unwrap_or_default();
            let reason = match (message.is_empty(), code.is_empty()) {
                (true, true) => format!("{VENDOR} refused the member"),
                (false, true) => message.to_owned(),
                (true, false) => code.to_owned(),
                (false, false) => format!("{code}: {message}"),
            };
            Some((email, excerpt(reason.as_bytes())))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::value::Document;

    fn connector(key: &str, base_url: Option<&str>) -> Result<MailchimpConnector, DestinationError> {
        let secret = SecretData::new(BTreeMap::from([("apiKey".to_owned(), key.to_owned())]));
        MailchimpConnector::new(
            &MailchimpSpec {
                list_id: "a1b2c3d4e5".into(),
                status: None,
                base_url: base_url.map(str::to_owned),
            },
            Some(&SecretKeyRef {
                name: "mailchimp".into(),
                key: None,
                namespace: None,
            }),
            Some(&secret),
        )
    }

    #[test]
    fn the_data_centre_comes_from_the_api_key_suffix() {
        assert_eq!(data_centre("0123456789abcdef-us21"), Some("us21"));
        assert_eq!(data_centre("0123456789abcdef"), None);
        assert_eq!(data_centre("abc-us21/evil"), None);
        let c = connector("0123456789abcdef-us21", None).unwrap();
        assert_eq!(c.base, "https://us21.api.mailchimp.com/3.0");
        assert_eq!(
            c.list_url(),
            "https://us21.api.mailchimp.com/3.0/lists/a1b2c3d4e5"
        );
        assert!(matches!(
            connector("no-dc-here!", None),
            Err(DestinationError::Invalid(_))
        ));
        let c = connector("nodatacentre", Some("http://127.0.0.1:9/3.0/")).unwrap();
        assert_eq!(c.base, "http://127.0.0.1:9/3.0");
    }

    #[test]
    fn the_subscriber_hash_is_the_md5_of_the_lower_cased_email() {
        // The example of Mailchimp's "Methods for working with list members" guide.
        assert_eq!(
            subscriber_hash("Urist.McVankab@freddiesjokes.com"),
            "62eeb292278cc15f5817cb78f7790b08"
        );
    }

    #[test]
    fn merge_tags_tags_and_member_fields_are_placed_by_name() {
        let c = connector("k-us1", None).unwrap();
        let mut nested = Document::new();
        nested.insert("LNAME".into(), Value::Text("Lovelace".into()));
        let record = Record {
            key: "1".into(),
            identity: Document::from([("email_address".to_owned(), Value::Text("Ada@X.io".into()))]).into(),
            fields: Document::from([
                ("email_address".to_owned(), Value::Text("Ada@X.io".into())),
                ("FNAME".to_owned(), Value::Text("Ada".into())),
                ("merge_fields".to_owned(), Value::Object(nested)),
                ("merge_fields.SCORE".to_owned(), Value::Int(7)),
                ("PHONE".to_owned(), Value::Null),
                ("tags".to_owned(), Value::Text("vip, beta,".into())),
                ("vip".to_owned(), Value::Bool(true)),
            ])
            .into(),
        };
        let email = MailchimpConnector::email_of(&record).unwrap();
        assert_eq!(
            c.member_of(&record, &email).unwrap(),
            json!({"email_address": "Ada@X.io", "status_if_new": "subscribed", "vip": true,
                "tags": ["vip", "beta"],
                "merge_fields": {"FNAME": "Ada", "LNAME": "Lovelace", "SCORE": 7, "PHONE": ""}})
        );
        let mut bad = record.clone();
        bad.fields.insert("first_name".into(), Value::Text("A".into()));
        let error = c.member_of(&bad, &email).unwrap_err();
        assert!(error.contains("merge_fields.FIRST_NAME"), "{error}");
    }

    #[test]
    fn per_member_errors_and_error_bodies_are_read() {
        let body = br#"{"new_members":[],"updated_members":[],"error_count":1,
            "errors":[{"email_address":"x@y.io","error":"x@y.io is already a list member.","error_code":"ERROR_CONTACT_EXISTS","field":"","field_message":""}]}"#;
        assert_eq!(
            member_errors(body),
            vec![(
                "x@y.io".to_owned(),
                "ERROR_CONTACT_EXISTS: x@y.io is already a list member.".to_owned()
            )]
        );
        let body = br#"{"type":"https://mailchimp.com/developer/marketing/docs/errors/","title":"Invalid Resource","status":400,"detail":"The resource submitted could not be validated.","errors":[{"field":"members","message":"Schema describes array, too many items"}]}"#;
        assert_eq!(
            mailchimp_message(body),
            "Invalid Resource: The resource submitted could not be validated.; members: Schema describes array, too many items"
        );
    }
}
