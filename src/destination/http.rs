//! The generic `http` destination: each batch is one JSON request to a templated REST
//! endpoint or webhook.
//!
//! Everything templated is compiled, checked and (for URLs and headers) rendered once, when
//! the connector is built, so a typo or a missing Secret key fails before any request is sent.
//! Per request only the body is rendered (`payload`).
//!
//! Its answers are read by the rules every HTTP connector shares
//! ([`answer`](super::vendor::answer)); redirects are
//! not followed (a 3xx is reported as a wrong URL).

use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, Url};

use super::vendor::answer::{
    EXCERPT_CHARS, RequestLabel, StatusClass, classify_status, status_error, transport_error, truncate,
};
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

    /// Without a record template, the records' fields are written into the body as their
    /// canonical JSON (deletes carry their match fields, not their fields).
    fn reads_fields(&self) -> bool {
        [&self.upsert, &self.update, &self.insert]
            .iter()
            .any(|e| e.payload.has_record_template())
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
}
