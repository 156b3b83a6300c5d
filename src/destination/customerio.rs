//! The `customerio` destination: people in a Customer.io workspace, written through the Track
//! API v1, one request per record.
//!
//! - upsert (and insert, update: Customer.io's identify always creates or updates):
//!   `PUT /api/v1/customers/{identifier}` with the record's attributes as the JSON body
//!   (<https://customer.io/docs/api/track/#operation/identify>);
//! - delete (mirror): `DELETE /api/v1/customers/{identifier}`
//!   (<https://customer.io/docs/api/track/#operation/delete>); a `404` counts as deleted;
//! - check: `GET /api/v1/accounts/region`
//!   (<https://customer.io/docs/api/track/#operation/getRegion>), the cheapest call that needs
//!   the credentials.
//!
//! Authentication is HTTP Basic with the workspace's Site ID and Track API key
//! (<https://customer.io/docs/api/track/#section/Authentication>). The identifier is the
//! record's match value (an `id`, or an email when the workspace identifies people by email),
//! percent-encoded in the path. A `400` rejects that one record with Customer.io's message;
//! `401`/`403` stop the run; `429` and `5xx` are retried. Limits
//! (<https://customer.io/docs/api/track/#section/Limits>): about 100 requests per second per
//! workspace, identifiers of at most 150 bytes, request bodies of at most 32 KB — a record over
//! those limits is rejected without being sent.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use base64::Engine as _;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value as Json};

use super::vendor;
use super::vendor::answer::{RequestLabel, excerpt, retry_after, status_error, transport_error};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::{CustomerioRegion, CustomerioSpec};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value};
use crate::redact::Scrubber;

/// The Track API host of US workspaces.
pub const US_BASE_URL: &str = "https://track.customer.io";
/// The Track API host of EU workspaces.
pub const EU_BASE_URL: &str = "https://track-eu.customer.io";
/// The Secret key holding the Site ID.
pub const SITE_ID_KEY: &str = "siteId";
/// The Secret key holding the Track API key unless `credentialsSecretRef.key` names another.
pub const DEFAULT_API_KEY_KEY: &str = "apiKey";
/// Records per request: the v1 identify and delete calls take one person each.
pub const MAX_BATCH_SIZE: usize = 1;
/// Requests per second: Customer.io's documented fair-use limit of about 100 per workspace.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 100.0;
/// Requests in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 8;
/// Longest identifier Customer.io accepts, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 150;
/// Largest request body Customer.io accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 32 * 1024;
/// Request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The vendor's name in messages.
const VENDOR: &str = "Customer.io";
/// Statuses that refuse one record for its content: the record is rejected with the message.
const RECORD_REFUSED: &[u16] = &[400, 413, 422];
/// Match fields tried, in order, for the identifier.
const IDENTIFIER_FIELDS: &[&str] = &["id", "email", "cio_id"];
/// Everything but RFC 3986's unreserved characters is encoded in a path segment (`@`, `+`,
/// `/` and `%` in identifiers must reach Customer.io as written), and `.` too, so that no
/// identifier reads as a `..` segment climbing out of `/customers/`.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'~');

/// People in a Customer.io workspace, through the Track API.
pub struct CustomerioConnector {
    client: reqwest::Client,
    base: String,
    host: String,
    headers: HeaderMap,
    scrubber: Scrubber,
}

impl std::fmt::Debug for CustomerioConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomerioConnector")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl CustomerioConnector {
    /// Builds the connector: picks the base URL from the region (or `baseUrl`), and reads the
    /// Site ID (key `siteId`) and the API key (key `apiKey`, or `credentialsSecretRef.key`)
    /// from the Secret.
    pub fn new(
        spec: &CustomerioSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let CustomerioSpec { region, base_url } = spec;
        let default_base = match region.unwrap_or_default() {
            CustomerioRegion::Us => US_BASE_URL,
            CustomerioRegion::Eu => EU_BASE_URL,
        };
        let base_text = base_url.as_deref().unwrap_or(default_base);
        let host = vendor::host(&vendor::http_url("spec.customerio.baseUrl", base_text, "")?);

        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "customerio")?;
        let read = |key: &str| vendor::secret_value(data, &secret_ref.name, key);
        let site_id = read(SITE_ID_KEY)?;
        let api_key_key = secret_ref.key.as_deref().unwrap_or(DEFAULT_API_KEY_KEY);
        let api_key = read(api_key_key)?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{site_id}:{api_key}"));
        let auth = vendor::sensitive_header(&format!("Basic {encoded}"), || {
            format!(
                "Secret {:?} holds credentials that cannot form a header",
                secret_ref.name
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, auth);

        // A redirect would turn the PUT into a GET and lose the attributes.
        let client = vendor::client(TIMEOUT)?;

        // The Secret's values, and the Basic credentials built from them, never reach a message.
        let mut with_basic = data.entries().clone();
        with_basic.insert("\0basic".to_owned(), encoded);
        Ok(CustomerioConnector {
            client,
            base: base_text.trim_end_matches('/').to_owned(),
            host,
            headers,
            scrubber: Scrubber::new().with_secret(Some(&SecretData::new(with_basic))),
        })
    }

    /// The label of a request to a person: the identifier is left out of messages (it is often
    /// an email address).
    fn person_label(&self, method: Method) -> RequestLabel {
        RequestLabel {
            method,
            url: format!("{}/api/v1/customers/{{identifier}}", self.base),
            host: self.host.clone(),
        }
    }

    /// Sends one request and returns the status and body of a 2xx answer or of a status in
    /// `read` (which the caller turns into the record's outcome), else the batch error the
    /// answer means.
    async fn call(
        &self,
        method: Method,
        url: &str,
        label: &RequestLabel,
        body: Option<Vec<u8>>,
        read: &[u16],
    ) -> Result<(StatusCode, Vec<u8>), SendError> {
        let mut request = self.client.request(method, url).headers(self.headers.clone());
        if let Some(body) = body {
            request = request.header(CONTENT_TYPE, "application/json").body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.scrubber.error(transport_error(label, e, TIMEOUT)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = super::vendor::read_body(response, super::vendor::MAX_RESPONSE_BYTES, label, TIMEOUT)
            .await
            .map_err(|e| self.scrubber.error(e))?;
        if status.is_success() || read.contains(&status.as_u16()) {
            Ok((status, bytes.to_vec()))
        } else {
            Err(self.scrubber.error(failure(label, status, &headers, &bytes)))
        }
    }

    async fn identify(&self, record: &Record) -> Result<RecordOutcome, SendError> {
        let identifier = match identifier_of(record) {
            Ok(id) => id,
            Err(reason) => return Ok(RecordOutcome::Rejected(reason)),
        };
        let body = match serde_json::to_vec(&attributes_of(&record.fields)) {
            Ok(body) => body,
            Err(e) => {
                return Ok(RecordOutcome::Rejected(format!(
                    "failed to encode the attributes: {e}"
                )));
            }
        };
        if body.len() > MAX_BODY_BYTES {
            return Ok(RecordOutcome::Rejected(format!(
                "the attributes take {} bytes, over {VENDOR}'s {MAX_BODY_BYTES}-byte request limit",
                body.len()
            )));
        }
        let label = self.person_label(Method::PUT);
        let url = self.person_url(&identifier);
        let (status, answer) = self
            .call(Method::PUT, &url, &label, Some(body), RECORD_REFUSED)
            .await?;
        Ok(if status.is_success() {
            RecordOutcome::Accepted
        } else {
            self.refused(status, &answer)
        })
    }

    async fn delete(&self, record: &Record) -> Result<RecordOutcome, SendError> {
        let identifier = match identifier_of(record) {
            Ok(id) => id,
            Err(reason) => return Ok(RecordOutcome::Rejected(reason)),
        };
        let label = self.person_label(Method::DELETE);
        let url = self.person_url(&identifier);
        let (status, answer) = self
            .call(
                Method::DELETE,
                &url,
                &label,
                None,
                &[RECORD_REFUSED, &[404]].concat(),
            )
            .await?;
        Ok(match status.as_u16() {
            // A person Customer.io does not have is already gone.
            200..=299 | 404 => RecordOutcome::Accepted,
            _ => self.refused(status, &answer),
        })
    }

    fn person_url(&self, identifier: &str) -> String {
        format!(
            "{}/api/v1/customers/{}",
            self.base,
            utf8_percent_encode(identifier, PATH_SEGMENT)
        )
    }

    /// The rejection of a record Customer.io refused, with its message.
    fn refused(&self, status: StatusCode, body: &[u8]) -> RecordOutcome {
        let message = vendor_message(body);
        let reason = if message.is_empty() {
            format!("{VENDOR} refused the record (HTTP {})", status.as_u16())
        } else {
            message
        };
        RecordOutcome::Rejected(self.scrubber.scrub(&reason))
    }
}

/// What a non-2xx answer (other than a refused record) means for the batch.
fn failure(label: &RequestLabel, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SendError {
    let code = status.as_u16();
    match code {
        401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code})")),
        429 => {
            let message = vendor_message(body);
            let detail = vendor::detail(&message);
            SendError::Retryable {
                reason: format!("{VENDOR} is throttling requests (HTTP 429){detail}"),
                retry_after: retry_after(headers, SystemTime::now()),
                throttled: true,
            }
        }
        _ => status_error(label, status, headers, body),
    }
}

/// The record's identifier: its `id`, `email` or `cio_id` match field (in that order), its only
/// match field, else an `id` or `email` among its fields.
fn identifier_of(record: &Record) -> Result<String, String> {
    let pick = |doc: &Document| {
        IDENTIFIER_FIELDS.iter().find_map(|name| {
            let value = doc.get(*name).filter(|v| !v.is_null())?;
            let text = value.to_text();
            Some(if *name == "cio_id" && !text.starts_with("cio_") {
                format!("cio_{text}")
            } else {
                text
            })
        })
    };
    let identifier = pick(&record.identity)
        .or_else(|| match record.identity.len() {
            1 => record
                .identity
                .values()
                .next()
                .filter(|v| !v.is_null())
                .map(Value::to_text),
            _ => None,
        })
        .or_else(|| pick(&record.fields))
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            "the record has no identifier; map an id or email field and list it in the sync's match"
                .to_owned()
        })?;
    // URL parsers read `%2E%2E` as `..` too (WHATWG URL): a dot segment cannot be a path
    // segment however it is encoded.
    if identifier == "." || identifier == ".." {
        return Err(format!(
            "the identifier {identifier:?} cannot name a person in a URL path"
        ));
    }
    if identifier.len() > MAX_IDENTIFIER_BYTES {
        return Err(format!(
            "the identifier takes {} bytes, over {VENDOR}'s {MAX_IDENTIFIER_BYTES}-byte limit",
            identifier.len()
        ));
    }
    Ok(identifier)
}

/// The identify body: one attribute per mapped field. NULL is sent as `""`, which removes the
/// attribute in Customer.io; timestamps become Unix seconds, Customer.io's date format.
fn attributes_of(fields: &Document) -> Json {
    let attributes: Map<String, Json> = fields
        .iter()
        .map(|(name, value)| {
            let json = match value {
                v if v.is_null() => Json::String(String::new()),
                Value::Timestamp(at) => Json::from(at.timestamp()),
                other => other.to_json(),
            };
            (name.clone(), json)
        })
        .collect();
    Json::Object(attributes)
}

/// Customer.io's error text (`meta.error`, or `meta.errors` joined), or an excerpt of the body.
fn vendor_message(body: &[u8]) -> String {
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return excerpt(body);
    };
    let meta = json.get("meta").unwrap_or(&json);
    if let Some(error) = meta.get("error").and_then(Json::as_str) {
        return excerpt(error.as_bytes());
    }
    if let Some(errors) = meta.get("errors").and_then(Json::as_array) {
        let joined = errors
            .iter()
            .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join("; ");
        return excerpt(joined.as_bytes());
    }
    excerpt(body)
}

#[async_trait]
impl Connector for CustomerioConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: MAX_BATCH_SIZE,
            // Insert and update are identify too: Customer.io always creates or updates.
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

    /// GETs the workspace's region: proves the host answers and the credentials work.
    async fn check(&self) -> Result<(), SendError> {
        let url = format!("{}/api/v1/accounts/region", self.base);
        let label = RequestLabel {
            method: Method::GET,
            url: url.clone(),
            host: self.host.clone(),
        };
        match self.call(Method::GET, &url, &label, None, &[]).await {
            Ok(_) => Ok(()),
            // A refused check request says nothing about batches; nothing to split.
            Err(SendError::BatchRejected(reason)) => Err(SendError::Fatal(reason)),
            Err(other) => Err(other),
        }
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.len() > MAX_BATCH_SIZE {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s {MAX_BATCH_SIZE} person per call (a bug in \
                 batching)",
                batch.len()
            )));
        }
        let mut outcomes = Vec::with_capacity(batch.len());
        for record in batch {
            outcomes.push(match operation {
                Operation::Delete => self.delete(record).await?,
                Operation::Upsert | Operation::Update | Operation::Insert => self.identify(record).await?,
            });
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::{TimeZone, Utc};
    use serde_json::json;

    use super::*;

    fn record(identity: &[(&str, Value)], fields: &[(&str, Value)]) -> Record {
        let doc = |pairs: &[(&str, Value)]| -> Document {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
        };
        Record {
            key: "1".into(),
            identity: doc(identity).into(),
            fields: doc(fields).into(),
        }
    }

    fn connector(
        secret: &[(&str, &str)],
        key: Option<&str>,
    ) -> Result<CustomerioConnector, DestinationError> {
        let data = SecretData::new(
            secret
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        );
        CustomerioConnector::new(
            &CustomerioSpec {
                region: Some(CustomerioRegion::Eu),
                base_url: None,
            },
            Some(&SecretKeyRef {
                name: "cio".into(),
                key: key.map(str::to_owned),
                namespace: None,
            }),
            Some(&data),
        )
    }

    #[test]
    fn the_identifier_is_the_id_then_the_email_then_the_only_match_field() {
        let email = Value::Text("ada+x@example.com".into());
        let both = record(&[("email", email.clone()), ("id", Value::Int(7))], &[]);
        assert_eq!(identifier_of(&both).unwrap(), "7");
        let by_email = record(&[("email", email.clone())], &[]);
        assert_eq!(identifier_of(&by_email).unwrap(), "ada+x@example.com");
        let other = record(&[("user_key", Value::Text("u-1".into()))], &[]);
        assert_eq!(identifier_of(&other).unwrap(), "u-1");
        let cio = record(&[("cio_id", Value::Text("a1b2".into()))], &[]);
        assert_eq!(identifier_of(&cio).unwrap(), "cio_a1b2");
        let none = record(&[("id", Value::Null)], &[("name", Value::Text("x".into()))]);
        assert!(identifier_of(&none).unwrap_err().contains("no identifier"));
        let long = record(&[("id", Value::Text("x".repeat(151)))], &[]);
        assert!(identifier_of(&long).unwrap_err().contains("150-byte"));
    }

    #[test]
    fn attributes_keep_json_types_clear_nulls_and_write_timestamps_as_unix_seconds() {
        let at = Utc.with_ymd_and_hms(2026, 1, 31, 9, 0, 0).unwrap();
        let fields = Document::from([
            ("plan".to_owned(), Value::Text("pro".into())),
            ("seats".to_owned(), Value::Int(12)),
            ("vip".to_owned(), Value::Bool(true)),
            ("phone".to_owned(), Value::Null),
            ("created_at".to_owned(), Value::Timestamp(at)),
        ]);
        assert_eq!(
            attributes_of(&fields),
            json!({"plan": "pro", "seats": 12, "vip": true, "phone": "", "created_at": 1_769_850_000})
        );
    }

    #[test]
    fn identifiers_are_percent_encoded_in_the_path() {
        let c = connector(&[("siteId", "site1"), ("apiKey", "key1")], None).unwrap();
        assert_eq!(
            c.person_url("ada+x@example.com"),
            "https://track-eu.customer.io/api/v1/customers/ada%2Bx%40example%2Ecom"
        );
        assert_eq!(
            c.person_url("a.b"),
            "https://track-eu.customer.io/api/v1/customers/a%2Eb"
        );
        let dots = Record {
            key: "1".into(),
            identity: Document::from([("id".to_owned(), Value::Text("..".into()))]).into(),
            fields: Document::new().into(),
        };
        assert!(identifier_of(&dots).unwrap_err().contains("cannot name a person"));
        assert_eq!(
            c.person_url("a/b c"),
            "https://track-eu.customer.io/api/v1/customers/a%2Fb%20c"
        );
    }

    #[test]
    fn both_keys_are_required_and_the_api_key_may_live_under_another_key() {
        assert!(matches!(
            connector(&[("apiKey", "key1")], None),
            Err(DestinationError::MissingSecretKey { ref key, .. }) if key == "siteId"
        ));
        assert!(matches!(
            connector(&[("siteId", "site1"), ("apiKey", "key1")], Some("trackKey")),
            Err(DestinationError::MissingSecretKey { ref key, .. }) if key == "trackKey"
        ));
        assert!(connector(&[("siteId", "site1"), ("trackKey", "key1")], Some("trackKey")).is_ok());
    }

    #[test]
    fn messages_are_read_from_meta_error_or_meta_errors() {
        assert_eq!(vendor_message(br#"{"meta":{"error":"bad attr"}}"#), "bad attr");
        assert_eq!(
            vendor_message(br#"{"meta":{"errors":["one","two"]}}"#),
            "one; two"
        );
        assert_eq!(vendor_message(b"plain text"), "plain text");
    }
}
