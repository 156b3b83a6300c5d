//! The generic `http` destination: each batch is one JSON request to a templated REST
//! endpoint or webhook.
//!
//! Everything templated is compiled, checked and (for URLs and headers) rendered once, when
//! the connector is built, so a typo or a missing Secret key fails before any request is sent.
//! Per request only the body is rendered ([`payload`]).
//!
//! The response helpers ([`classify_status`], [`status_error`], [`transport_error`],
//! [`retry_after`], [`excerpt`], [`Scrubber`]) are public because every HTTP-based vendor
//! connector answers the same question: what does this status mean for the batch?
//!
//! Redirects are not followed: following a 301/302 turns a POST into a GET and drops the
//! body, which would count a batch as delivered that never was. A 3xx is reported as a wrong
//! URL instead.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};

use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::destination::{HttpResultsSpec, HttpSpec};
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::redact::Scrubber;
use crate::template::{Jinja, Limits};

mod payload;

use payload::{CHECK_URL_VARIABLES, Payload, SECRET, URL_VARIABLES, compile, render_fixed};

/// The body sent when the spec has none.
pub const DEFAULT_BODY: &str = r#"{"operation":"{{operation}}","records":{{records}}}"#;
/// The request timeout when the spec has none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most characters of a response body quoted in an error or a rejection reason.
pub const EXCERPT_CHARS: usize = 300;

/// `url::ParseError`, named through `reqwest`'s re-exported `Url` (no direct `url` dependency).
type UrlParseError = <Url as std::str::FromStr>::Err;

/// Records per request unless `spec.batchSize` lowers it.
const MAX_BATCH_SIZE: usize = 100;
/// Longest wait to open a connection, within the request timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The generic HTTP destination.
pub struct HttpConnector {
    client: reqwest::Client,
    timeout: Duration,
    upsert: Endpoint,
    update: Endpoint,
    insert: Endpoint,
    delete: Endpoint,
    check: Option<CheckTarget>,
    results: Option<HttpResultsSpec>,
    scrubber: Scrubber,
}

/// One operation's request, rendered except for the body.
struct Endpoint {
    url: Url,
    label: RequestLabel,
    headers: HeaderMap,
    payload: Payload,
}

/// The connection check request.
struct CheckTarget {
    url: Url,
    label: RequestLabel,
}

fn parse_method(field: &str, method: Option<&str>) -> Result<Method, DestinationError> {
    match method {
        None => Ok(Method::POST),
        Some(text) => Method::from_bytes(text.trim().to_ascii_uppercase().as_bytes())
            .map_err(|_| DestinationError::Invalid(format!("{field}: {text:?} is not an HTTP method"))),
    }
}

fn parse_url(field: &str, rendered: &str, shown: &str) -> Result<Url, DestinationError> {
    let url = Url::parse(rendered)
        .map_err(|e| DestinationError::Invalid(format!("{field}: {shown:?} is not an absolute URL ({e})")))?;
    match url.scheme() {
        "http" | "https" => {}
        other => {
            return Err(DestinationError::Invalid(format!(
                "{field}: {shown:?} uses scheme {other:?}; use http or https"
            )));
        }
    }
    // A name is checked when resolved; an IP literal never reaches the resolver.
    crate::egress::check_host(url.host_str().unwrap_or_default())
        .map_err(|e| DestinationError::Invalid(format!("{field}: {e}")))?;
    Ok(url)
}

/// The unparsed templates of one operation's request.
struct EndpointSpec<'a> {
    field: &'static str,
    url: &'a str,
    method: Option<&'a str>,
    body: Option<&'a str>,
    /// The per-record template and its field.
    record: Option<(&'static str, &'a str)>,
}

struct Builder<'a> {
    secret: Option<&'a SecretData>,
    scrubber: &'a Scrubber,
    headers: Vec<(HeaderName, Jinja, bool)>,
}

impl Builder<'_> {
    fn endpoint(&self, spec: &EndpointSpec<'_>, operation: Operation) -> Result<Endpoint, DestinationError> {
        let url_field = format!("{}.url", spec.field);
        let url_template = compile(&url_field, spec.url, URL_VARIABLES, Limits::RECORD, self.secret)?;
        let shown = render_fixed(&url_field, &url_template, operation, self.secret, true)?;
        let rendered = render_fixed(&url_field, &url_template, operation, self.secret, false)?;
        let url = parse_url(&url_field, &rendered, &shown)?;
        let method = parse_method(&format!("{}.method", spec.field), spec.method)?;
        let payload = Payload::new(
            format!("{}.body", spec.field),
            spec.body.unwrap_or(DEFAULT_BODY),
            spec.record.map(|(field, text)| (field.to_owned(), text)),
            self.secret,
        )?;

        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        for (name, template, has_secret) in &self.headers {
            let field = format!("spec.http.headers.{name}");
            let text = render_fixed(&field, template, operation, self.secret, false)?;
            let mut value = HeaderValue::from_str(&text).map_err(|_| {
                DestinationError::Invalid(format!(
                    "{field}: the rendered value is not a valid header value (a control character or \
                     newline, perhaps in a Secret value?)"
                ))
            })?;
            value.set_sensitive(*has_secret);
            headers.insert(name.clone(), value);
        }
        let label = RequestLabel {
            method,
            url: self.scrubber.scrub(&shown),
            host: self.scrubber.scrub(url.host_str().unwrap_or("")),
        };
        Ok(Endpoint {
            url,
            label,
            headers,
            payload,
        })
    }
}

impl HttpConnector {
    /// Builds the connector: parses every template, checks its variables and Secret keys,
    /// renders URLs and headers for each operation and checks they are valid.
    pub fn new(spec: &HttpSpec, secret: Option<&SecretData>) -> Result<Self, DestinationError> {
        let HttpSpec {
            url,
            method,
            headers,
            body,
            record,
            delete,
            results,
            timeout,
            check_url,
        } = spec;
        let scrubber = Scrubber::new().with_secret(secret);

        let timeout = match timeout {
            None => DEFAULT_TIMEOUT,
            Some(text) => crate::api::duration::parse(text)
                .map_err(|e| DestinationError::Invalid(format!("spec.http.timeout: {e}")))?,
        };
        if timeout.is_zero() {
            return Err(DestinationError::Invalid(
                "spec.http.timeout: must be longer than zero".to_owned(),
            ));
        }

        let mut header_templates = Vec::with_capacity(headers.len());
        for (name, text) in headers {
            let field = format!("spec.http.headers.{name}");
            let header = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| DestinationError::Invalid(format!("{field}: {name:?} is not a header name")))?;
            let template = compile(&field, text, URL_VARIABLES, Limits::RECORD, secret)?;
            let has_secret = template.variables().iter().any(|v| v == SECRET);
            header_templates.push((header, template, has_secret));
        }

        if let Some(results) = results
            && !(results.path.is_empty() || results.path.starts_with('/'))
        {
            return Err(DestinationError::Invalid(format!(
                "spec.http.results.path: {:?} is not a JSON Pointer; write it like /results (or \"\" \
                 for a top-level array)",
                results.path
            )));
        }

        let builder = Builder {
            secret,
            scrubber: &scrubber,
            headers: header_templates,
        };
        let writes = EndpointSpec {
            field: "spec.http",
            url,
            method: method.as_deref(),
            body: body.as_deref(),
            record: record.as_deref().map(|r| ("spec.http.record", r)),
        };
        // Deletes carry only the match fields, so the record template of writes does not
        // apply to them: `delete.record` shapes them.
        let deletes = match delete {
            Some(d) => EndpointSpec {
                field: "spec.http.delete",
                url: &d.url,
                method: d.method.as_deref(),
                body: d.body.as_deref().or(body.as_deref()),
                record: d.record.as_deref().map(|r| ("spec.http.delete.record", r)),
            },
            None => EndpointSpec {
                field: "spec.http",
                url,
                method: method.as_deref(),
                body: body.as_deref(),
                record: None,
            },
        };
        let upsert = builder.endpoint(&writes, Operation::Upsert)?;
        let update = builder.endpoint(&writes, Operation::Update)?;
        let insert = builder.endpoint(&writes, Operation::Insert)?;
        let delete = builder.endpoint(&deletes, Operation::Delete)?;

        let check = match check_url {
            None => None,
            Some(text) => Some(check_target(text, &upsert, secret, &scrubber)?),
        };

        let client = crate::egress::http_client()
            .timeout(timeout)
            .connect_timeout(timeout.min(CONNECT_TIMEOUT))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("backflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| DestinationError::Invalid(format!("failed to build the HTTP client: {e}")))?;

        Ok(HttpConnector {
            client,
            timeout,
            upsert,
            update,
            insert,
            delete,
            check,
            results: results.clone(),
            scrubber,
        })
    }

    fn endpoint(&self, operation: Operation) -> &Endpoint {
        match operation {
            Operation::Upsert => &self.upsert,
            Operation::Update => &self.update,
            Operation::Insert => &self.insert,
            Operation::Delete => &self.delete,
        }
    }

    /// Reads per-record outcomes from a 2xx body.
    fn outcomes(
        &self,
        label: &RequestLabel,
        body: &[u8],
        count: usize,
    ) -> Result<Vec<RecordOutcome>, SendError> {
        let Some(results) = &self.results else {
            return Ok(vec![RecordOutcome::Accepted; count]);
        };
        read_results(body, &results.path, &results.error_field, count)
            .map(|outcomes| {
                outcomes
                    .into_iter()
                    .map(|outcome| match outcome {
                        RecordOutcome::Rejected(reason) => {
                            RecordOutcome::Rejected(self.scrubber.scrub(&reason))
                        }
                        other => other,
                    })
                    .collect()
            })
            .map_err(|problem| {
                SendError::Fatal(
                    self.scrubber
                        .scrub(&format!("response of {} {} {problem}", label.method, label.url)),
                )
            })
    }
}

/// Resolves `checkUrl`: absolute, or relative to the origin of the upsert URL.
fn check_target(
    text: &str,
    upsert: &Endpoint,
    secret: Option<&SecretData>,
    scrubber: &Scrubber,
) -> Result<CheckTarget, DestinationError> {
    const FIELD: &str = "spec.http.checkUrl";
    let template = compile(FIELD, text, CHECK_URL_VARIABLES, Limits::RECORD, secret)?;
    let rendered = render_fixed(FIELD, &template, Operation::Upsert, secret, false)?;
    let shown = render_fixed(FIELD, &template, Operation::Upsert, secret, true)?;
    let (url, shown) = match Url::parse(&rendered) {
        Ok(_) => (parse_url(FIELD, &rendered, &shown)?, shown),
        Err(UrlParseError::RelativeUrlWithoutBase) => {
            let origin = upsert.url.origin().ascii_serialization();
            let base = Url::parse(&origin).map_err(|e| {
                DestinationError::Invalid(format!("{FIELD}: no origin to resolve against ({e})"))
            })?;
            let url = base.join(&rendered).map_err(|e| {
                DestinationError::Invalid(format!("{FIELD}: {shown:?} is not a URL path ({e})"))
            })?;
            crate::egress::check_host(url.host_str().unwrap_or_default())
                .map_err(|e| DestinationError::Invalid(format!("{FIELD}: {e}")))?;
            let joined = if shown.starts_with('/') {
                format!("{origin}{shown}")
            } else {
                format!("{origin}/{shown}")
            };
            (url, joined)
        }
        Err(e) => {
            return Err(DestinationError::Invalid(format!(
                "{FIELD}: {shown:?} is not a URL ({e})"
            )));
        }
    };
    let label = RequestLabel {
        method: Method::GET,
        url: scrubber.scrub(&shown),
        host: scrubber.scrub(url.host_str().unwrap_or("")),
    };
    Ok(CheckTarget { url, label })
}

#[async_trait]
impl Connector for HttpConnector {
    fn capabilities(&self) -> Capabilities {
        // A body naming `{{ record }}` is one request per record, each its own rate-limit slot.
        let per_record = [&self.upsert, &self.update, &self.insert, &self.delete]
            .iter()
            .any(|e| e.payload.per_record());
        Capabilities {
            max_batch_size: if per_record { 1 } else { MAX_BATCH_SIZE },
            operations: vec![
                Operation::Upsert,
                Operation::Update,
                Operation::Insert,
                Operation::Delete,
            ],
            default_requests_per_second: 10.0,
            default_concurrency: 4,
        }
    }

    /// GETs `checkUrl` with the configured headers when it is set; otherwise succeeds, since
    /// templates, Secret keys and URLs were all resolved when the connector was built.
    async fn check(&self) -> Result<(), SendError> {
        let Some(check) = &self.check else {
            return Ok(());
        };
        let mut headers = self.upsert.headers.clone();
        headers.remove(CONTENT_TYPE);
        let response = match self.client.get(check.url.clone()).headers(headers).send().await {
            Ok(response) => response,
            Err(e) => {
                return Err(self
                    .scrubber
                    .error(transport_error(&check.label, e, self.timeout)));
            }
        };
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let response_headers = response.headers().clone();
        let body = super::vendor::read_body(
            response,
            super::vendor::MAX_ERROR_BODY_BYTES,
            &check.label,
            self.timeout,
        )
        .await
        .unwrap_or_default();
        let error = match status_error(&check.label, status, &response_headers, &body) {
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
        let endpoint = self.endpoint(operation);
        let rendered = endpoint.payload.render(operation, batch)?;
        if rendered.sent.is_empty() {
            return Ok(outcomes_around(batch.len(), rendered.refused, &[], Vec::new()));
        }
        let body = rendered.body;
        let request = self
            .client
            .request(endpoint.label.method.clone(), endpoint.url.clone())
            .headers(endpoint.headers.clone())
            .body(body);
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                return Err(self
                    .scrubber
                    .error(transport_error(&endpoint.label, e, self.timeout)));
            }
        };
        let status = response.status();
        let headers = response.headers().clone();
        // Without a results block a 2xx is all we need: the body is not read at all. Other
        // bodies are read up to a cap, an error's only for its excerpt.
        let body = if status.is_success() && self.results.is_none() {
            Vec::new()
        } else {
            let limit = if status.is_success() {
                super::vendor::MAX_RESPONSE_BYTES
            } else {
                super::vendor::MAX_ERROR_BODY_BYTES
            };
            match super::vendor::read_body(response, limit, &endpoint.label, self.timeout).await {
                Ok(body) => body,
                // A failure's answer is only quoted: a cut or lost body still reports the status.
                Err(_) if !status.is_success() => Vec::new(),
                Err(e) => return Err(self.scrubber.error(e)),
            }
        };
        if classify_status(status) == StatusClass::Success {
            let sent = self.outcomes(&endpoint.label, &body, rendered.sent.len())?;
            Ok(outcomes_around(
                batch.len(),
                rendered.refused,
                &rendered.sent,
                sent,
            ))
        } else {
            Err(self
                .scrubber
                .error(status_error(&endpoint.label, status, &headers, &body)))
        }
    }
}

/// The batch's outcomes: those of the records sent, at their places, and the refusals of
/// the records whose template did not render.
fn outcomes_around(
    count: usize,
    refused: Vec<(usize, String)>,
    sent: &[usize],
    outcomes: Vec<RecordOutcome>,
) -> Vec<RecordOutcome> {
    let mut all = vec![None; count];
    for (at, reason) in refused {
        all[at] = Some(RecordOutcome::Rejected(reason));
    }
    for (at, outcome) in sent.iter().zip(outcomes) {
        all[*at] = Some(outcome);
    }
    RecordOutcome::accepted_unless_set(all)
}

/// Reads the results array at `path` (a JSON Pointer) of a 2xx body: one entry per record, in
/// order. An entry whose `error_field` holds a non-empty string, object, array or number, or
/// `true`, rejects its record (objects and arrays are quoted as compact JSON); `null`,
/// `false`, `""`, `{}`, `[]` or no such field accepts it. Errors describe the contract
/// violation, to follow "response of METHOD URL".
fn read_results(
    body: &[u8],
    path: &str,
    error_field: &str,
    count: usize,
) -> Result<Vec<RecordOutcome>, String> {
    let document: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("is not JSON ({e}); results.path needs a JSON body"))?;
    let entries = document
        .pointer(path)
        .ok_or_else(|| format!("has no {path:?}; results.path names no value in it"))?
        .as_array()
        .ok_or_else(|| format!("has no array at {path:?}"))?;
    if entries.len() != count {
        return Err(format!("has {} results for {count} records", entries.len()));
    }
    Ok(entries
        .iter()
        .map(|entry| match entry.get(error_field) {
            None | Some(serde_json::Value::Null | serde_json::Value::Bool(false)) => RecordOutcome::Accepted,
            Some(serde_json::Value::String(s)) if s.trim().is_empty() => RecordOutcome::Accepted,
            Some(serde_json::Value::Object(o)) if o.is_empty() => RecordOutcome::Accepted,
            Some(serde_json::Value::Array(a)) if a.is_empty() => RecordOutcome::Accepted,
            Some(serde_json::Value::String(s)) => RecordOutcome::Rejected(truncate(s.trim(), EXCERPT_CHARS)),
            Some(serde_json::Value::Bool(true)) => RecordOutcome::Rejected(format!("{error_field} is true")),
            Some(other) => RecordOutcome::Rejected(truncate(&other.to_string(), EXCERPT_CHARS)),
        })
        .collect())
}

/// What an HTTP status says about the batch that got it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StatusClass {
    /// 2xx: processed (per-record outcomes may still be in the body).
    Success,
    /// 429: the destination is throttling; retry after `Retry-After`.
    Throttled,
    /// 408, 425, and 5xx other than 501 and 505: transient; retry with backoff.
    Transient,
    /// 401, 403, 407: credentials missing or refused; a person must act.
    CredentialsRejected,
    /// 404, 405, 410, 414, 501, 505: wrong URL or method; a person must act.
    WrongEndpoint,
    /// 3xx: redirects are not followed (they would turn a POST into a GET).
    Redirected,
    /// Any other 4xx (400, 409, 413, 422…): the content was refused; splitting the batch
    /// finds the records at fault.
    ContentRejected,
    /// 1xx and codes outside 100–599.
    Unexpected,
}

impl StatusClass {
    /// A stable short label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StatusClass::Success => "success",
            StatusClass::Throttled => "throttled",
            StatusClass::Transient => "transient",
            StatusClass::CredentialsRejected => "credentials_rejected",
            StatusClass::WrongEndpoint => "wrong_endpoint",
            StatusClass::Redirected => "redirected",
            StatusClass::ContentRejected => "content_rejected",
            StatusClass::Unexpected => "unexpected",
        }
    }
}

/// Sorts a status code into what it means for a batch.
pub fn classify_status(status: StatusCode) -> StatusClass {
    match status.as_u16() {
        200..=299 => StatusClass::Success,
        429 => StatusClass::Throttled,
        408 | 425 => StatusClass::Transient,
        401 | 403 | 407 => StatusClass::CredentialsRejected,
        404 | 405 | 410 | 414 | 501 | 505 => StatusClass::WrongEndpoint,
        300..=399 => StatusClass::Redirected,
        400..=499 => StatusClass::ContentRejected,
        500..=599 => StatusClass::Transient,
        _ => StatusClass::Unexpected,
    }
}

/// Names a request in messages: its method, its URL with Secret values masked, and its host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLabel {
    /// The HTTP method.
    pub method: Method,
    /// The URL, with every Secret value masked.
    pub url: String,
    /// The host the URL points at.
    pub host: String,
}

/// The batch error a non-2xx answer means (see [`StatusClass`]). Messages quote at most
/// [`EXCERPT_CHARS`] of the body; pass the result through [`Scrubber::error`] before it
/// leaves the connector.
pub fn status_error(label: &RequestLabel, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SendError {
    let RequestLabel { method, url, host } = label;
    let code = status.as_u16();
    let quoted = excerpt(body);
    let detail = if quoted.is_empty() {
        String::new()
    } else {
        format!(": {quoted}")
    };
    match classify_status(status) {
        StatusClass::Success => SendError::Fatal(format!(
            "{method} {url} succeeded with HTTP {code}, but was handled as a failure (a bug)"
        )),
        StatusClass::Throttled => SendError::Retryable {
            reason: format!("{host} is throttling requests (HTTP {code}){detail}"),
            retry_after: retry_after(headers, SystemTime::now()),
            throttled: true,
        },
        StatusClass::Transient => SendError::Retryable {
            reason: format!("{method} {url} failed with HTTP {code}{detail}"),
            retry_after: retry_after(headers, SystemTime::now()),
            throttled: false,
        },
        StatusClass::CredentialsRejected => {
            SendError::Fatal(format!("credentials rejected by {host} (HTTP {code}){detail}"))
        }
        StatusClass::WrongEndpoint => SendError::Fatal(format!(
            "{method} {url} answered HTTP {code}: check the destination's URL and method{detail}"
        )),
        StatusClass::Redirected => {
            let location = headers
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .map(|l| format!(" to {}", truncate(l, EXCERPT_CHARS)))
                .unwrap_or_default();
            SendError::Fatal(format!(
                "{method} {url} redirected{location} (HTTP {code}); redirects are not followed, set \
                 the final URL in the destination"
            ))
        }
        StatusClass::ContentRejected => SendError::BatchRejected(format!(
            "{method} {url} refused the batch with HTTP {code}{detail}"
        )),
        StatusClass::Unexpected => SendError::Fatal(format!("{method} {url} answered HTTP {code}{detail}")),
    }
}

/// The batch error a failed request means: timeouts, refused or lost connections and broken
/// bodies are retryable; a request that could not even be built, or that the egress policy
/// refused (no retry changes where a name resolves to), is fatal. The URL is dropped
/// from `reqwest`'s text, which may hold Secret values; pass the result through
/// [`Scrubber::error`] all the same.
pub fn transport_error(label: &RequestLabel, error: reqwest::Error, timeout: Duration) -> SendError {
    let RequestLabel { method, url, host } = label;
    let error = error.without_url();
    let retryable = |reason: String| SendError::Retryable {
        reason,
        retry_after: None,
        throttled: false,
    };
    if let Some(denied) = crate::egress::find_in(&error).filter(|e| e.is_denied()) {
        SendError::Fatal(denied.to_string())
    } else if error.is_timeout() {
        retryable(format!(
            "{method} {url} timed out after {}",
            humantime::format_duration(timeout)
        ))
    } else if error.is_connect() {
        retryable(format!("failed to connect to {host}: {}", error_chain(&error)))
    } else if error.is_builder() {
        SendError::Fatal(format!("failed to build {method} {url}: {}", error_chain(&error)))
    } else {
        retryable(format!("{method} {url} failed: {}", error_chain(&error)))
    }
}

/// An error and its sources, joined with `: `, without repeats.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// The wait a `Retry-After` header asks for: delta-seconds, or an HTTP-date (IMF-fixdate,
/// RFC 850 or asctime form) counted from `now`; a date in the past means no wait. `None`
/// without a header or when it cannot be read.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = parse_http_date(text)?;
    let now: DateTime<Utc> = now.into();
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

fn parse_http_date(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(at) = DateTime::parse_from_rfc2822(text) {
        return Some(at.with_timezone(&Utc));
    }
    ["%A, %d-%b-%y %H:%M:%S GMT", "%a %b %e %H:%M:%S %Y"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

/// At most [`EXCERPT_CHARS`] characters of a response body, whitespace runs folded to one
/// space, `…` marking a cut.
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    truncate(&folded, EXCERPT_CHARS)
}

fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::api::destination::HttpDeleteSpec;

    fn spec(url: &str) -> HttpSpec {
        HttpSpec {
            url: url.to_owned(),
            method: None,
            headers: BTreeMap::new(),
            body: None,
            record: None,
            delete: None,
            results: None,
            timeout: None,
            check_url: None,
        }
    }

    fn secret(pairs: &[(&str, &str)]) -> SecretData {
        SecretData::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn invalid(result: Result<HttpConnector, DestinationError>) -> String {
        match result {
            Err(e) => e.to_string(),
            Ok(_) => panic!("expected a configuration error"),
        }
    }

    #[test]
    fn status_codes_are_sorted_by_what_they_mean_for_the_batch() {
        let class = |code| classify_status(StatusCode::from_u16(code).unwrap());
        assert_eq!(class(200), StatusClass::Success);
        assert_eq!(class(207), StatusClass::Success);
        assert_eq!(class(429), StatusClass::Throttled);
        for code in [408, 500, 502, 503, 504] {
            assert_eq!(class(code), StatusClass::Transient, "{code}");
        }
        for code in [401, 403] {
            assert_eq!(class(code), StatusClass::CredentialsRejected, "{code}");
        }
        for code in [404, 405, 501] {
            assert_eq!(class(code), StatusClass::WrongEndpoint, "{code}");
        }
        for code in [400, 409, 413, 422] {
            assert_eq!(class(code), StatusClass::ContentRejected, "{code}");
        }
        assert_eq!(class(302), StatusClass::Redirected);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_470); // 07:27:50 GMT
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(retry_after(&header("1"), now), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(&header(" 120 "), now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after(&header("Wed, 21 Oct 2015 07:28:00 GMT"), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&header("Wednesday, 21-Oct-15 07:28:00 GMT"), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&header("Wed Oct 21 07:28:00 2015"), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            retry_after(&header("Wed, 21 Oct 2015 07:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&header("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn excerpts_fold_whitespace_and_stop_at_the_limit() {
        assert_eq!(excerpt(b"  bad\n\n  request "), "bad request");
        let long = "é".repeat(EXCERPT_CHARS + 10);
        let cut = excerpt(long.as_bytes());
        assert_eq!(cut.chars().count(), EXCERPT_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_scrubber_masks_values_and_their_percent_encoded_form() {
        let data = secret(&[("token", "s3cr3t/value"), ("short", "s3cr3t")]);
        let scrubber = Scrubber::new().with_secret(Some(&data));
        assert_eq!(
            scrubber.scrub("a s3cr3t/value b s3cr3t%2Fvalue c s3cr3t"),
            "a *** b *** c ***"
        );
        assert!(!format!("{scrubber:?}").contains("s3cr3t"));
        assert_eq!(Scrubber::new().with_secret(None).scrub("plain"), "plain");
    }

    #[test]
    fn results_map_error_fields_to_outcomes() {
        let body = br#"{"data":{"results":[
            {"error":null},{"error":"bad email"},{"error":""},{"error":{"code":1}},
            {},{"error":[]},{"error":false},{"error":true}
        ]}}"#;
        let outcomes = read_results(body, "/data/results", "error", 8).unwrap();
        assert_eq!(
            outcomes,
            vec![
                RecordOutcome::Accepted,
                RecordOutcome::Rejected("bad email".into()),
                RecordOutcome::Accepted,
                RecordOutcome::Rejected(r#"{"code":1}"#.into()),
                RecordOutcome::Accepted,
                RecordOutcome::Accepted,
                RecordOutcome::Accepted,
                RecordOutcome::Rejected("error is true".into()),
            ]
        );
        assert_eq!(
            read_results(b"[{},{}]", "", "error", 2).unwrap(),
            vec![RecordOutcome::Accepted; 2]
        );
    }

    #[test]
    fn results_that_do_not_match_the_batch_are_contract_violations() {
        assert_eq!(
            read_results(br#"{"results":[{}]}"#, "/results", "error", 2).unwrap_err(),
            "has 1 results for 2 records"
        );
        assert!(read_results(br#"{}"#, "/results", "error", 1).is_err());
        assert!(read_results(br#"{"results":{}}"#, "/results", "error", 1).is_err());
        assert!(read_results(b"<html>", "/results", "error", 1).is_err());
    }

    #[test]
    fn a_missing_secret_key_is_named_without_any_value() {
        let mut s = spec("https://api.example.com/{{operation}}");
        s.headers
            .insert("Authorization".into(), "Bearer {{secret.token}}".into());
        let data = secret(&[("other", "hunter2")]);
        let message = invalid(HttpConnector::new(&s, Some(&data)));
        assert!(message.contains("\"token\""), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        assert!(matches!(
            HttpConnector::new(&s, None),
            Err(DestinationError::MissingCredentials("http"))
        ));
    }

    #[test]
    fn variables_are_checked_where_they_are_used() {
        let mut s = spec("https://api.example.com/{{records}}");
        assert!(
            invalid(HttpConnector::new(&s, None)).contains("spec.http.url: {{ records }} is not available")
        );
        s.url = "https://api.example.com/{{nope}}".into();
        assert!(invalid(HttpConnector::new(&s, None)).contains("{{ nope }}"));
        s.url = "https://api.example.com/".into();
        s.body = Some(r#"{"token":"{{secret.token}}"}"#.into());
        let data = secret(&[("token", "t")]);
        assert!(
            invalid(HttpConnector::new(&s, Some(&data)))
                .contains("spec.http.body: {{ secret.KEY }} is available only in the URL and headers")
        );
        s.body = Some("{{records".into());
        assert!(invalid(HttpConnector::new(&s, None)).contains("spec.http.body: failed to compile template"));
    }

    #[test]
    fn bad_urls_methods_timeouts_and_result_paths_fail_at_construction() {
        assert!(invalid(HttpConnector::new(&spec("api.example.com"), None)).contains("not an absolute URL"));
        assert!(invalid(HttpConnector::new(&spec("ftp://example.com"), None)).contains("scheme"));
        let mut s = spec("https://api.example.com");
        s.method = Some("PO ST".into());
        assert!(invalid(HttpConnector::new(&s, None)).contains("spec.http.method"));
        s.method = Some("put".into());
        s.timeout = Some("soon".into());
        assert!(invalid(HttpConnector::new(&s, None)).contains("spec.http.timeout"));
        s.timeout = Some("5s".into());
        s.results = Some(HttpResultsSpec {
            path: "results".into(),
            error_field: "error".into(),
        });
        assert!(invalid(HttpConnector::new(&s, None)).contains("JSON Pointer"));
        s.results = None;
        let connector = HttpConnector::new(&s, None).unwrap();
        assert_eq!(connector.upsert.label.method, Method::PUT);
        assert_eq!(connector.timeout, Duration::from_secs(5));
    }

    #[test]
    fn urls_show_secret_placeholders_and_deletes_fall_back_to_the_main_url() {
        let mut s = spec("https://api.example.com/{{operation}}?key={{secret.key}}");
        s.headers.insert("X-Key".into(), "{{secret.key}}".into());
        let data = secret(&[("key", "abc123")]);
        let connector = HttpConnector::new(&s, Some(&data)).unwrap();
        assert_eq!(
            connector.insert.url.as_str(),
            "https://api.example.com/insert?key=abc123"
        );
        assert_eq!(
            connector.delete.label.url,
            "https://api.example.com/delete?key={{secret.key}}"
        );
        let header = connector.delete.headers.get("x-key").unwrap();
        assert!(header.is_sensitive());
        assert_eq!(
            connector.delete.headers.get(CONTENT_TYPE).unwrap(),
            "application/json"
        );

        s.delete = Some(HttpDeleteSpec {
            url: "https://api.example.com/remove".into(),
            method: Some("DELETE".into()),
            body: None,
            record: None,
        });
        s.check_url = Some("/health?key={{secret.key}}".into());
        let connector = HttpConnector::new(&s, Some(&data)).unwrap();
        assert_eq!(connector.delete.url.as_str(), "https://api.example.com/remove");
        assert_eq!(connector.delete.label.method, Method::DELETE);
        let check = connector.check.as_ref().unwrap();
        assert_eq!(check.url.as_str(), "https://api.example.com/health?key=abc123");
        assert_eq!(
            check.label.url,
            "https://api.example.com/health?key={{secret.key}}"
        );
    }

    #[test]
    fn status_errors_carry_the_host_the_status_and_an_excerpt() {
        let label = RequestLabel {
            method: Method::POST,
            url: "https://api.example.com/x".into(),
            host: "api.example.com".into(),
        };
        let error = status_error(&label, StatusCode::UNAUTHORIZED, &HeaderMap::new(), b"");
        assert_eq!(
            error,
            SendError::Fatal("credentials rejected by api.example.com (HTTP 401)".into())
        );
        let error = status_error(
            &label,
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            b"{\"message\": \"bad\"}",
        );
        assert_eq!(
            error,
            SendError::BatchRejected(
                "POST https://api.example.com/x refused the batch with HTTP 422: {\"message\": \"bad\"}"
                    .into()
            )
        );
        let mut headers = HeaderMap::new();
        headers.insert(LOCATION, HeaderValue::from_static("https://other.example.com/x"));
        let SendError::Fatal(message) = status_error(&label, StatusCode::FOUND, &headers, b"") else {
            panic!("a redirect is fatal");
        };
        assert!(message.contains("to https://other.example.com/x"), "{message}");
    }
}
