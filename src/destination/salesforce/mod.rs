//! The `salesforce` destination: records of one sObject, upserted on an External ID field
//! through the sObject Collections resource, or through Bulk API 2.0 ingest jobs for large
//! runs ([`bulk`]), with an OAuth 2.0 token the connector obtains and caches itself.
//!
//! - token: `POST {loginUrl}/services/oauth2/token` with the form
//!   `grant_type=client_credentials&client_id=…&client_secret=…` (client credentials flow), or
//!   `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=…` with an RS256 JWT
//!   `{iss: clientId, sub: username, aud: loginUrl, exp}` (JWT bearer flow); the answer's `access_token`
//!   and `instance_url` serve every data call until Salesforce answers 401
//!   `INVALID_SESSION_ID`, when the token is obtained again once and the call repeated;
//! - upsert (also update and insert, sent as upserts: updating by Id would need the Id):
//!   `PATCH {instance}/services/data/{v}/composite/sobjects/{object}/{externalIdField}` with
//!   `{"allOrNone":false,"records":[…]}`, at most 200 records; the answer holds one result per
//!   record, in order;
//! - delete (mirror): the Ids are looked up with a SOQL query on the external id
//!   (`GET …/query?q=SELECT Id, {field} FROM {object} WHERE {field} IN (…)`), then
//!   `DELETE …/composite/sobjects?ids=…&allOrNone=false`; a record Salesforce does not have
//!   counts as deleted;
//! - large runs: when the engine says a run will send at least `bulkThreshold` records
//!   ([`Connector::for_run`]), the run gets a view of this connector that sends each batch of
//!   up to [`bulk::BULK_JOB_RECORDS`] records as a Bulk API 2.0 ingest job (see [`bulk`]).
//!
//! Docs: <https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_client_credentials_flow.htm>,
//! <https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_jwt_flow.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_upsert.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_delete.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_query.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.salesforce_app_limits_cheatsheet.meta/salesforce_app_limits_cheatsheet/salesforce_app_limits_platform_api.htm>.
//!
//! Mapped fields become the record's fields as JSON; the sync's match field gives the value of
//! the External ID field. Timestamps are written `yyyy-MM-ddTHH:mm:ss.SSSZ` and times
//! `HH:mm:ss.SSSZ`, the formats Salesforce documents, with the sub-millisecond part dropped
//! (truncated, so an instant never moves into the next second or day):
//! <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/intro_valid_date_formats.htm>,
//! <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/valid_date_format_in_records__2_0.htm>.

mod answers;
pub mod bulk;
pub mod csv;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Map, Value as Json, json};
use tokio::sync::Mutex;

use super::delivery::report;
use super::vendor;
use super::vendor::answer::{RequestLabel, excerpt, retry_after, status_error, transport_error};
use super::vendor::{MAX_RESPONSE_BYTES, read_body};
use super::{Capabilities, Connector, DestinationError, PlannedSends, RecordOutcome, SendError};
use crate::api::SecretKeyRef;
use crate::api::destination::{SalesforceAuth, SalesforceBulk, SalesforceSpec};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::redact::{MASK, Scrubber};
use answers::{GONE_CODES, REQUEST_CODES, TRANSIENT_CODES, error_codes, read_results, salesforce_message};
use bulk::{BULK_JOB_RECORDS, BulkPolling, DEFAULT_BULK_THRESHOLD};

/// Records per sObject Collections call, Salesforce's documented limit.
pub const MAX_BATCH_SIZE: usize = 200;
/// The Secret key holding the connected app's consumer key.
pub const CLIENT_ID_SECRET_KEY: &str = "clientId";
/// The Secret key holding the consumer secret unless `credentialsSecretRef.key` names another
/// (client credentials flow).
pub const DEFAULT_SECRET_KEY: &str = "clientSecret";
/// The Secret key holding the username the JWT bearer flow acts as.
pub const USERNAME_SECRET_KEY: &str = "username";
/// The Secret key holding the PEM private key that signs JWT assertions unless
/// `credentialsSecretRef.key` names another (JWT bearer flow).
pub const PRIVATE_KEY_SECRET_KEY: &str = "privateKey";
/// How long a JWT assertion is valid; Salesforce accepts at most 3 minutes.
pub const ASSERTION_LIFETIME: Duration = Duration::from_secs(180);
/// The REST API version used unless the spec names another.
pub const DEFAULT_API_VERSION: &str = "v61.0";
/// Requests per second: an org's daily API allowance is shared with every other integration.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 5.0;
/// Requests in flight at once.
pub const DEFAULT_CONCURRENCY: usize = 2;
/// Request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// The wait after `REQUEST_LIMIT_EXCEEDED`: the org's rolling 24-hour allowance is spent, and
/// frees up only slowly.
pub const REQUEST_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// The vendor's name in messages.
const VENDOR: &str = "Salesforce";

/// An access token and the instance it is valid for.
#[derive(Clone)]
struct Token {
    access: String,
    instance: String,
}

/// How the connector proves who it is to the token endpoint.
enum Grant {
    ClientCredentials {
        client_secret: String,
    },
    JwtBearer {
        username: String,
        key: Box<jsonwebtoken::EncodingKey>,
    },
}

/// The claims of a JWT bearer assertion.
#[derive(serde::Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    exp: u64,
}

/// Salesforce sObjects, upserted on an External ID field through sObject Collections, or
/// through Bulk API 2.0 in the view [`Connector::for_run`] gives a large run. Clones share
/// the token cache.
#[derive(Clone)]
pub struct SalesforceConnector {
    client: reqwest::Client,
    login_url: String,
    login_host: String,
    base_override: Option<String>,
    version: String,
    object: String,
    field: String,
    client_id: String,
    grant: Arc<Grant>,
    token: Arc<Mutex<Option<Token>>>,
    scrubber: Scrubber,
    bulk: SalesforceBulk,
    bulk_threshold: u64,
    polling: BulkPolling,
    /// The wait after `REQUEST_LIMIT_EXCEEDED` when Salesforce names none.
    request_limit_wait: Duration,
    /// True in the view of a run that sends through Bulk API 2.0.
    use_bulk: bool,
}

impl std::fmt::Debug for SalesforceConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SalesforceConnector")
            .field("login_url", &self.login_url)
            .field("object", &self.object)
            .field("field", &self.field)
            .field("bulk", &self.bulk)
            .field("use_bulk", &self.use_bulk)
            .finish_non_exhaustive()
    }
}

/// The body of a data call.
#[derive(Debug, Clone, Copy)]
enum Payload<'a> {
    /// No body.
    Empty,
    /// A JSON body.
    Json(&'a Json),
    /// CSV data for a bulk job.
    Csv(&'a [u8]),
}

/// Whether an API name (object or field) is safe to put in a path and in SOQL.
fn is_api_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
}

fn http_url(field: &str, text: &str) -> Result<Url, DestinationError> {
    vendor::http_url(&format!("spec.salesforce.{field}"), text, "")
}

impl SalesforceConnector {
    /// Builds the connector: checks the names and URLs, and reads the client id and secret
    /// from the Secret. No request is made until the first call.
    pub fn new(
        spec: &SalesforceSpec,
        secret_ref: Option<&SecretKeyRef>,
        secret: Option<&SecretData>,
    ) -> Result<Self, DestinationError> {
        let SalesforceSpec {
            object,
            external_id_field,
            login_url,
            api_version,
            auth,
            base_url,
            bulk,
            bulk_threshold,
        } = spec;
        for (name, value) in [("object", object), ("externalIdField", external_id_field)] {
            if !is_api_name(value) {
                return Err(DestinationError::Invalid(format!(
                    "spec.salesforce.{name}: {value:?} is not a Salesforce API name (letters, digits \
                     and underscores, like Contact or Email__c)"
                )));
            }
        }
        let version = api_version.as_deref().unwrap_or(DEFAULT_API_VERSION);
        let valid_version = version
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit() || c == '.'));
        if !valid_version {
            return Err(DestinationError::Invalid(format!(
                "spec.salesforce.apiVersion: {version:?} is not an API version like v61.0"
            )));
        }
        let login = http_url("loginUrl", login_url)?;
        let login_host = vendor::host(&login);
        if let Some(base) = base_url {
            http_url("baseUrl", base)?;
        }

        let (secret_ref, data) = vendor::credentials(secret_ref, secret, "salesforce")?;
        let value_of = |key: &str| vendor::secret_value(data, &secret_ref.name, key).map(str::to_owned);
        let client_id = value_of(CLIENT_ID_SECRET_KEY)?;
        let grant = match auth.unwrap_or_default() {
            SalesforceAuth::ClientCredentials => Grant::ClientCredentials {
                client_secret: value_of(secret_ref.key.as_deref().unwrap_or(DEFAULT_SECRET_KEY))?,
            },
            SalesforceAuth::JwtBearer => {
                let pem_key = secret_ref.key.as_deref().unwrap_or(PRIVATE_KEY_SECRET_KEY);
                let pem = value_of(pem_key)?;
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
                    DestinationError::Invalid(format!(
                        "key {pem_key:?} of Secret {:?} is not a PEM RSA private key",
                        secret_ref.name
                    ))
                })?;
                Grant::JwtBearer {
                    username: value_of(USERNAME_SECRET_KEY)?,
                    key: Box::new(key),
                }
            }
        };

        let client = vendor::client(TIMEOUT)?;

        Ok(SalesforceConnector {
            client,
            login_url: login_url.trim_end_matches('/').to_owned(),
            login_host,
            base_override: base_url.as_ref().map(|b| b.trim_end_matches('/').to_owned()),
            version: version.to_owned(),
            object: object.clone(),
            field: external_id_field.clone(),
            client_id,
            grant: Arc::new(grant),
            token: Arc::new(Mutex::new(None)),
            scrubber: Scrubber::new().with_secret(secret),
            bulk: bulk.unwrap_or_default(),
            bulk_threshold: match bulk_threshold {
                Some(0) | None => DEFAULT_BULK_THRESHOLD,
                Some(n) => *n,
            },
            polling: BulkPolling::default(),
            request_limit_wait: REQUEST_LIMIT_WAIT,
            use_bulk: false,
        })
    }

    /// The same connector with other pauses between polls of a bulk job (tests use short
    /// ones).
    pub fn with_bulk_polling(mut self, polling: BulkPolling) -> Self {
        self.polling = polling;
        self
    }

    /// The same connector with another wait after `REQUEST_LIMIT_EXCEEDED` (tests use a short
    /// one).
    pub fn with_request_limit_wait(mut self, wait: Duration) -> Self {
        self.request_limit_wait = wait;
        self
    }

    /// Whether a run that sends these records uses Bulk API 2.0.
    fn bulk_for(&self, planned: &PlannedSends) -> bool {
        match self.bulk {
            SalesforceBulk::Never => false,
            SalesforceBulk::Always => true,
            SalesforceBulk::Auto => planned.total() >= self.bulk_threshold,
        }
    }

    /// Masks the Secret's values and the given access token.
    fn scrub(&self, text: &str, token: Option<&Token>) -> String {
        let out = self.scrubber.scrub(text);
        match token {
            Some(t) if t.access.len() >= 4 => out.replace(&t.access, MASK),
            _ => out,
        }
    }

    fn scrub_error(&self, error: SendError, token: Option<&Token>) -> SendError {
        match self.scrubber.error(error) {
            SendError::Retryable {
                reason,
                retry_after,
                throttled,
            } => SendError::Retryable {
                reason: self.scrub(&reason, token),
                retry_after,
                throttled,
            },
            SendError::BatchRejected(r) => SendError::BatchRejected(self.scrub(&r, token)),
            SendError::Fatal(r) => SendError::Fatal(self.scrub(&r, token)),
            SendError::TooLarge { limit, reason } => SendError::TooLarge {
                limit,
                reason: self.scrub(&reason, token),
            },
        }
    }

    /// The cached token, or a new one when there is none or when `stale` is the cached one.
    async fn token(&self, stale: Option<&str>) -> Result<Token, SendError> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && stale != Some(token.access.as_str())
        {
            return Ok(token.clone());
        }
        let token = self.obtain_token().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// The token request's form fields for the configured flow.
    fn grant_fields(&self) -> Result<Vec<(&'static str, String)>, SendError> {
        match self.grant.as_ref() {
            Grant::ClientCredentials { client_secret } => Ok(vec![
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", self.client_id.clone()),
                ("client_secret", client_secret.clone()),
            ]),
            Grant::JwtBearer { username, key } => {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default();
                let claims = Claims {
                    iss: &self.client_id,
                    sub: username,
                    aud: &self.login_url,
                    exp: (now + ASSERTION_LIFETIME).as_secs(),
                };
                let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
                let assertion = jsonwebtoken::encode(&header, &claims, key)
                    .map_err(|e| SendError::Fatal(format!("failed to sign the JWT assertion: {e}")))?;
                Ok(vec![
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned(),
                    ),
                    ("assertion", assertion),
                ])
            }
        }
    }

    /// Runs the configured OAuth 2.0 flow.
    async fn obtain_token(&self) -> Result<Token, SendError> {
        let url = format!("{}/services/oauth2/token", self.login_url);
        let label = RequestLabel {
            method: Method::POST,
            url: url.clone(),
            host: self.login_host.clone(),
        };
        let mut form = Url::parse("http://form.invalid/")
            .map_err(|e| SendError::Fatal(format!("failed to build the token request: {e}")))?;
        for (name, value) in self.grant_fields()? {
            form.query_pairs_mut().append_pair(name, &value);
        }
        let body = form.query().unwrap_or_default().to_owned();
        let response = self
            .client
            .post(&url)
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| self.scrub_error(transport_error(&label, e, TIMEOUT), None))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = read_body(response, MAX_RESPONSE_BYTES, &label, TIMEOUT)
            .await
            .map_err(|e| self.scrub_error(e, None))?;
        if status.is_success() {
            let json: Json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
            let access = json.get("access_token").and_then(Json::as_str);
            let instance = json.get("instance_url").and_then(Json::as_str);
            if let Some(instance) = instance {
                // The answer names the host of every later call: an IP literal there never
                // reaches the resolver that applies the egress policy.
                let host = Url::parse(instance)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .unwrap_or_default();
                crate::egress::check_host(&host).map_err(|e| SendError::Fatal(e.to_string()))?;
            }
            return match (access, instance) {
                (Some(access), Some(instance)) if !access.is_empty() => Ok(Token {
                    access: access.to_owned(),
                    instance: instance.trim_end_matches('/').to_owned(),
                }),
                _ => Err(SendError::Retryable {
                    reason: format!(
                        "{VENDOR}'s token endpoint answered without access_token and instance_url"
                    ),
                    retry_after: None,
                    throttled: false,
                }),
            };
        }
        let json: Json = serde_json::from_slice(&bytes).unwrap_or(Json::Null);
        let code = json.get("error").and_then(Json::as_str).unwrap_or_default();
        let description = json
            .get("error_description")
            .and_then(Json::as_str)
            .map(|d| format!(": {}", excerpt(d.as_bytes())))
            .unwrap_or_default();
        let error = match (status.as_u16(), code) {
            (_, "invalid_client" | "invalid_grant" | "unauthorized_client" | "invalid_client_id") => {
                SendError::Fatal(format!("credentials rejected by {VENDOR} ({code}){description}"))
            }
            (400 | 401 | 403, _) => SendError::Fatal(format!(
                "credentials rejected by {VENDOR} (HTTP {}){description}",
                status.as_u16()
            )),
            _ => status_error(&label, status, &headers, &bytes),
        };
        Err(self.scrub_error(error, None))
    }

    /// Sends one data call with the cached token, obtaining a new token once should Salesforce
    /// answer 401 `INVALID_SESSION_ID`; returns the body of a 2xx answer.
    async fn call(&self, method: Method, path: &str, body: Payload<'_>) -> Result<Vec<u8>, SendError> {
        let mut stale: Option<String> = None;
        loop {
            // A throttle another batch or job met holds this call back too: the org's
            // allowance is shared by all of them.
            report::pause_over().await;
            let token = self.token(stale.as_deref()).await?;
            let base = self.base_override.as_deref().unwrap_or(&token.instance);
            let url = format!("{base}{path}");
            let label = RequestLabel {
                method: method.clone(),
                url: self.scrub(&url, Some(&token)),
                host: Url::parse(base)
                    .ok()
                    .and_then(|u| u.host_str().map(str::to_owned))
                    .unwrap_or_default(),
            };
            let mut auth = HeaderValue::from_str(&format!("Bearer {}", token.access)).map_err(|_| {
                SendError::Fatal(format!(
                    "{VENDOR} answered an access token that is not a valid header"
                ))
            })?;
            auth.set_sensitive(true);
            let mut request = self
                .client
                .request(method.clone(), &url)
                .header(AUTHORIZATION, auth);
            match body {
                Payload::Empty => {}
                Payload::Json(json) => request = request.json(json),
                // Copied per attempt: a repeat after a new token needs the body again.
                Payload::Csv(csv) => request = request.header(CONTENT_TYPE, "text/csv").body(csv.to_vec()),
            }
            let response = request
                .send()
                .await
                .map_err(|e| self.scrub_error(transport_error(&label, e, TIMEOUT), Some(&token)))?;
            let status = response.status();
            let headers = response.headers().clone();
            let bytes = read_body(response, MAX_RESPONSE_BYTES, &label, TIMEOUT)
                .await
                .map_err(|e| self.scrub_error(e, Some(&token)))?;
            if status.is_success() {
                return Ok(bytes.to_vec());
            }
            let codes = error_codes(&bytes);
            if status == StatusCode::UNAUTHORIZED
                && stale.is_none()
                && codes.iter().any(|c| c == "INVALID_SESSION_ID")
            {
                stale = Some(token.access.clone());
                report::retried();
                continue;
            }
            let error = self.failure(&label, status, &headers, &bytes);
            return Err(self.scrub_error(error, Some(&token)));
        }
    }

    /// What a non-2xx answer to a data call means, in Salesforce's terms.
    fn failure(
        &self,
        label: &RequestLabel,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
    ) -> SendError {
        let code = status.as_u16();
        let message = salesforce_message(body);
        let detail = vendor::detail(&message);
        let codes = error_codes(body);
        if codes.iter().any(|c| c == "REQUEST_LIMIT_EXCEEDED") {
            return SendError::Retryable {
                reason: format!("{VENDOR} org API request limit exceeded (HTTP {code}){detail}"),
                retry_after: Some(retry_after(headers, SystemTime::now()).unwrap_or(self.request_limit_wait)),
                throttled: true,
            };
        }
        if code == 400 && codes.iter().any(|c| REQUEST_CODES.contains(&c.as_str())) {
            return SendError::Fatal(format!(
                "{VENDOR} refused the request, not a record (HTTP 400){detail}: check \
                 spec.salesforce.object, spec.salesforce.externalIdField and the sync's mappings"
            ));
        }
        match code {
            401 | 403 => SendError::Fatal(format!("credentials rejected by {VENDOR} (HTTP {code}){detail}")),
            404 => SendError::Fatal(format!(
                "{VENDOR} has no such resource (HTTP 404 from {} {}){detail}",
                label.method, label.url
            )),
            400 | 409 | 413 | 414 | 415 | 422 => SendError::BatchRejected(if message.is_empty() {
                format!("{VENDOR} refused the batch (HTTP {code})")
            } else {
                message
            }),
            _ => status_error(label, status, headers, body),
        }
    }

    /// Records per request: a collections call, or a bulk job in a bulk run's view.
    fn max_batch_size(&self) -> usize {
        if self.use_bulk {
            BULK_JOB_RECORDS
        } else {
            MAX_BATCH_SIZE
        }
    }

    fn data_path(&self, rest: &str) -> String {
        format!("/services/data/{}{rest}", self.version)
    }

    /// The External ID value of a record, from its identity: the field of that name, or the
    /// sync's only match field.
    fn external_id_of(&self, record: &Record) -> Result<String, String> {
        let value = record.identity.get(&self.field).or_else(|| {
            (record.identity.len() == 1)
                .then(|| record.identity.values().next())
                .flatten()
        });
        match value {
            Some(v) if v.is_null() => Err(format!("the match field for {} is NULL", self.field)),
            Some(v) => Ok(v.to_text()),
            None => {
                let names: Vec<&str> = record.identity.keys().map(String::as_str).collect();
                Err(format!(
                    "{VENDOR} {} records are matched on {}; the sync matches on {names:?}",
                    self.object, self.field
                ))
            }
        }
    }

    /// The record sent to Salesforce: its type, its mapped fields and its External ID.
    fn record_of(&self, record: &Record, external_id: &str) -> Json {
        let mut out = Map::new();
        out.insert("attributes".to_owned(), json!({"type": self.object}));
        for (name, value) in &record.fields {
            if name != "attributes" {
                out.insert(name.clone(), field_json(value));
            }
        }
        out.insert(self.field.clone(), Json::String(external_id.to_owned()));
        Json::Object(out)
    }

    async fn upsert(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut sent: Vec<usize> = Vec::with_capacity(batch.len());
        let mut records: Vec<Json> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match self.external_id_of(record) {
                Ok(id) => {
                    sent.push(i);
                    records.push(self.record_of(record, &id));
                }
                Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
            }
        }
        if !sent.is_empty() {
            let path = self.data_path(&format!("/composite/sobjects/{}/{}", self.object, self.field));
            let body = json!({"allOrNone": false, "records": records});
            let answer = self.call(Method::PATCH, &path, Payload::Json(&body)).await?;
            let read = read_results(&answer, sent.len(), false);
            for (i, outcome) in sent.iter().zip(read) {
                outcomes[*i] = Some(self.scrub_outcome(outcome));
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    async fn delete(&self, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes: Vec<Option<RecordOutcome>> = vec![None; batch.len()];
        let mut wanted: Vec<(usize, String)> = Vec::with_capacity(batch.len());
        for (i, record) in batch.iter().enumerate() {
            match self.external_id_of(record) {
                Ok(id) => wanted.push((i, id)),
                Err(reason) => outcomes[i] = Some(RecordOutcome::Rejected(reason)),
            }
        }
        if !wanted.is_empty() {
            let ids = self.lookup_ids(wanted.iter().map(|(_, v)| v.as_str())).await?;
            // Records Salesforce does not have are already deleted.
            let mut to_delete: Vec<(usize, String)> = Vec::new();
            for (i, value) in &wanted {
                match ids.get(value) {
                    Some(id) => to_delete.push((*i, id.clone())),
                    None => outcomes[*i] = Some(RecordOutcome::Accepted),
                }
            }
            if !to_delete.is_empty() {
                let joined: Vec<&str> = to_delete.iter().map(|(_, id)| id.as_str()).collect();
                let path = self.data_path(&format!(
                    "/composite/sobjects?ids={}&allOrNone=false",
                    joined.join(",")
                ));
                let answer = self.call(Method::DELETE, &path, Payload::Empty).await?;
                let read = read_results(&answer, to_delete.len(), true);
                for ((i, _), outcome) in to_delete.iter().zip(read) {
                    outcomes[*i] = Some(self.scrub_outcome(outcome));
                }
            }
        }
        Ok(RecordOutcome::accepted_unless_set(outcomes))
    }

    /// The Ids of the records whose External ID is one of `values`, by value.
    async fn lookup_ids<'a>(
        &self,
        values: impl Iterator<Item = &'a str>,
    ) -> Result<BTreeMap<String, String>, SendError> {
        let quoted: Vec<String> = values.map(soql_quote).collect();
        let soql = format!(
            "SELECT Id, {field} FROM {object} WHERE {field} IN ({list})",
            field = self.field,
            object = self.object,
            list = quoted.join(", ")
        );
        let mut query = Url::parse("http://query.invalid/")
            .map_err(|e| SendError::Fatal(format!("failed to build the query: {e}")))?;
        query.query_pairs_mut().append_pair("q", &soql);
        let mut path = self.data_path(&format!("/query?{}", query.query().unwrap_or_default()));
        let mut ids = BTreeMap::new();
        loop {
            let answer = self.call(Method::GET, &path, Payload::Empty).await?;
            let json: Json = serde_json::from_slice(&answer).map_err(|_| SendError::Retryable {
                reason: format!(
                    "{VENDOR} answered a query with something other than JSON: {}",
                    excerpt(&answer)
                ),
                retry_after: None,
                throttled: false,
            })?;
            for record in json.get("records").and_then(Json::as_array).into_iter().flatten() {
                let id = record.get("Id").and_then(Json::as_str);
                let value = record.get(&self.field).map(|v| match v {
                    Json::String(s) => s.clone(),
                    other => other.to_string(),
                });
                // An Id goes into a query string: only plain Ids are kept.
                let id = id.filter(|i| !i.is_empty() && i.chars().all(|c| c.is_ascii_alphanumeric()));
                if let (Some(id), Some(value)) = (id, value) {
                    ids.insert(value, id.to_owned());
                }
            }
            // A further page is followed only on the same path prefix, never another host.
            match json.get("nextRecordsUrl").and_then(Json::as_str) {
                Some(next)
                    if json.get("done") == Some(&Json::Bool(false))
                        && next.starts_with("/services/data/") =>
                {
                    path = next.to_owned();
                }
                _ => return Ok(ids),
            }
        }
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
impl Connector for SalesforceConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: self.max_batch_size(),
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

    /// Obtains a token and describes the object: proves the credentials work and the object
    /// exists.
    async fn check(&self) -> Result<(), SendError> {
        let path = self.data_path(&format!("/sobjects/{}/describe", self.object));
        match self.call(Method::GET, &path, Payload::Empty).await {
            Ok(_) => Ok(()),
            Err(SendError::Fatal(reason)) if reason.contains("HTTP 404") => Err(SendError::Fatal(format!(
                "{VENDOR} has no object {:?} (HTTP 404 from describe)",
                self.object
            ))),
            // A refused check request says nothing about batches; nothing to split.
            Err(SendError::BatchRejected(reason)) => Err(SendError::Fatal(reason)),
            Err(other) => Err(other),
        }
    }

    /// A run that sends at least `bulkThreshold` records (or any run with `bulk: always`)
    /// gets a view of this connector that sends through Bulk API 2.0, in batches of up to
    /// [`BULK_JOB_RECORDS`]; the view shares the token cache.
    fn for_run(&self, planned: &PlannedSends) -> Option<Arc<dyn Connector>> {
        if self.use_bulk || planned.total() == 0 || !self.bulk_for(planned) {
            return None;
        }
        tracing::info!(
            object = %self.object,
            records = planned.total(),
            threshold = self.bulk_threshold,
            "this run sends through Salesforce Bulk API 2.0"
        );
        Some(Arc::new(SalesforceConnector {
            use_bulk: true,
            ..self.clone()
        }))
    }

    /// Update and insert are sent as upserts on the External ID field.
    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let max = self.max_batch_size();
        if batch.len() > max {
            return Err(SendError::Fatal(format!(
                "a batch of {} records exceeds {VENDOR}'s {max} records per {} (a bug in batching)",
                batch.len(),
                if self.use_bulk { "bulk job" } else { "call" }
            )));
        }
        match (operation, self.use_bulk) {
            (Operation::Delete, false) => self.delete(batch).await,
            (Operation::Upsert | Operation::Update | Operation::Insert, false) => self.upsert(batch).await,
            (Operation::Delete, true) => self.bulk_delete(batch).await,
            (Operation::Upsert | Operation::Update | Operation::Insert, true) => {
                self.bulk_upsert(batch).await
            }
        }
    }
}

/// A timestamp as Salesforce documents a dateTime: `yyyy-MM-ddTHH:mm:ss.SSSZ`, in UTC,
/// milliseconds truncated.
pub fn date_time_text(ts: &chrono::DateTime<chrono::Utc>) -> String {
    ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// A time of day as Salesforce documents a time: `HH:mm:ss.SSSZ`, milliseconds truncated.
pub fn time_text(t: &chrono::NaiveTime) -> String {
    t.format("%H:%M:%S%.3fZ").to_string()
}

/// A field value as JSON for a collections call: timestamps and times in Salesforce's
/// formats (also inside a relationship object or an array), everything else as it is.
fn field_json(value: &crate::model::value::Value) -> Json {
    use crate::model::value::Value;
    match value {
        Value::Timestamp(ts) => Json::String(date_time_text(ts)),
        Value::Time(t) => Json::String(time_text(t)),
        Value::Object(doc) => Json::Object(doc.iter().map(|(k, v)| (k.clone(), field_json(v))).collect()),
        Value::Array(items) => Json::Array(items.iter().map(field_json).collect()),
        other => other.to_json(),
    }
}

/// A SOQL string literal: quoted, with backslashes and quotes escaped.
fn soql_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            other => out.push(other),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soql_literals_escape_quotes_and_backslashes() {
        assert_eq!(soql_quote(r"o'brien\x"), r"'o\'brien\\x'");
    }

    #[test]
    fn object_and_field_names_must_be_api_names() {
        assert!(is_api_name("Email__c"));
        assert!(!is_api_name("Contact WHERE"));
        assert!(!is_api_name("_x"));
    }
}
