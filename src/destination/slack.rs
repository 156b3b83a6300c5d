//! The `slack` destination: one message per added or changed row, posted with
//! [`chat.postMessage`](https://api.slack.com/methods/chat.postMessage).
//!
//! Slack answers most failures with HTTP 200 and `{"ok": false, "error": "<code>"}`. The code
//! decides what the failure means: credential codes stop the run, `ratelimited` and Slack's
//! own outages are retried, anything else (`channel_not_found`, `not_in_channel`,
//! `msg_too_long`, …) rejects that one record with the code as its reason. HTTP 429 with
//! `Retry-After` (chat.postMessage allows about one message per second per channel,
//! <https://api.slack.com/docs/rate-limits>) and 5xx go through the shared HTTP helpers.
//!
//! Messages cannot be taken back by Backflow: the connector does not list deletes among its
//! operations, so a mirror sync to Slack is refused before it runs.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap};
use reqwest::{Method, Url};

use super::vendor;
use super::vendor::answer::{
    RequestLabel, StatusClass, classify_status, excerpt, retry_after, status_error, transport_error,
};
use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::destination::SlackSpec;
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value};
use crate::redact::Scrubber;
use crate::template::Template;

/// The Slack Web API base URL when the spec has none.
pub const DEFAULT_BASE_URL: &str = "https://slack.com/api";
/// The Secret key holding the bot token when `credentialsSecretRef.key` is not set.
pub const DEFAULT_TOKEN_KEY: &str = "token";
/// Longest wait for one API call.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Slack error codes that mean the token is wrong, gone or lacks a scope: nothing passes
/// until a person fixes the Secret or the app.
const CREDENTIAL_ERRORS: &[&str] = &[
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "missing_scope",
    "not_allowed_token_type",
];
/// Slack error codes that mean "slow down".
const THROTTLE_ERRORS: &[&str] = &["ratelimited", "rate_limited"];
/// Slack error codes for its own transient failures.
const TRANSIENT_ERRORS: &[&str] = &[
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
];

/// Posts one Slack message per record.
pub struct SlackConnector {
    client: reqwest::Client,
    headers: HeaderMap,
    post_message: Url,
    post_label: RequestLabel,
    auth_test: Url,
    auth_label: RequestLabel,
    channel: Template,
    text: Template,
    scrubber: Scrubber,
}

impl SlackConnector {
    /// Builds the connector: parses both templates and the base URL, and reads the bot token
    /// from `secret` under `token_key` (default [`DEFAULT_TOKEN_KEY`]). `secret_name` only
    /// names the Secret in errors.
    pub fn new(
        spec: &SlackSpec,
        secret: Option<&SecretData>,
        secret_name: &str,
        token_key: Option<&str>,
    ) -> Result<Self, DestinationError> {
        let SlackSpec {
            channel,
            text,
            base_url,
        } = spec;
        let secret = secret.ok_or(DestinationError::MissingCredentials("slack"))?;
        let key = token_key.unwrap_or(DEFAULT_TOKEN_KEY);
        let token = vendor::secret_value(secret, secret_name, key)?;
        let scrubber = Scrubber::new().with_secret(Some(secret));

        let parse = |field: &str, text: &str| {
            Template::parse(text).map_err(|e| DestinationError::Invalid(format!("{field}: {e}")))
        };
        let channel = parse("spec.slack.channel", channel)?;
        let text = parse("spec.slack.text", text)?;

        let base = base_url
            .as_deref()
            .unwrap_or(DEFAULT_BASE_URL)
            .trim_end_matches('/');
        let endpoint = |method: &str| -> Result<(Url, RequestLabel), DestinationError> {
            let shown = format!("{base}/{method}");
            let url = Url::parse(&shown).map_err(|e| {
                DestinationError::Invalid(format!(
                    "spec.slack.baseUrl: {base:?} is not an absolute URL ({e})"
                ))
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(DestinationError::Invalid(format!(
                    "spec.slack.baseUrl: {base:?} uses scheme {:?}; use https",
                    url.scheme()
                )));
            }
            let label = RequestLabel {
                method: Method::POST,
                url: scrubber.scrub(&shown),
                host: scrubber.scrub(url.host_str().unwrap_or("")),
            };
            Ok((url, label))
        };
        let (post_message, post_label) = endpoint("chat.postMessage")?;
        let (auth_test, auth_label) = endpoint("auth.test")?;

        let authorization = vendor::sensitive_header(&format!("Bearer {token}"), || {
            format!(
                "key {key:?} of Secret {secret_name:?} is not a valid token (a control character or \
                 newline?)"
            )
        })?;
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, authorization);

        // A redirect would turn the POST into a GET and lose the message.
        let client = vendor::client(TIMEOUT)?;

        Ok(SlackConnector {
            client,
            headers,
            post_message,
            post_label,
            auth_test,
            auth_label,
            channel,
            text,
            scrubber,
        })
    }

    /// The JSON body of one message, or the reason the record cannot become one.
    fn message(&self, record: &Record) -> Result<Vec<u8>, String> {
        let channel = render("spec.slack.channel", &self.channel, &record.fields)?;
        let channel = channel.trim();
        if channel.is_empty() {
            return Err("spec.slack.channel rendered empty for this record".to_owned());
        }
        // Values from rows are escaped: a row holding `<!channel>` must not ping a channel.
        let text = render_escaped("spec.slack.text", &self.text, &record.fields)?;
        let body = serde_json::json!({ "channel": channel, "text": text });
        serde_json::to_vec(&body).map_err(|e| format!("failed to encode the message: {e}"))
    }

    /// POSTs to a Web API method and returns the parsed JSON of a 2xx answer.
    async fn call(
        &self,
        url: &Url,
        label: &RequestLabel,
        body: Option<Vec<u8>>,
    ) -> Result<(HeaderMap, serde_json::Value), SendError> {
        let mut request = self.client.post(url.clone()).headers(self.headers.clone());
        if let Some(body) = body {
            request = request
                .header(CONTENT_TYPE, "application/json; charset=utf-8")
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.scrubber.error(transport_error(label, e, TIMEOUT)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = super::vendor::read_body(response, super::vendor::MAX_RESPONSE_BYTES, label, TIMEOUT)
            .await
            .map_err(|e| self.scrubber.error(e))?;
        match classify_status(status) {
            StatusClass::Success => {}
            StatusClass::CredentialsRejected => {
                return Err(SendError::Fatal(format!(
                    "credentials rejected by Slack (HTTP {})",
                    status.as_u16()
                )));
            }
            _ => return Err(self.scrubber.error(status_error(label, status, &headers, &body))),
        }
        let json = serde_json::from_slice(&body).map_err(|_| {
            self.scrubber.error(SendError::Fatal(format!(
                "response of {} {} is not Slack's JSON (check spec.slack.baseUrl): {}",
                label.method,
                label.url,
                excerpt(&body)
            )))
        })?;
        Ok((headers, json))
    }
}

/// What an `ok: false` answer means.
enum SlackFailure {
    /// The whole run must stop.
    Batch(SendError),
    /// Only this record is refused.
    Record(String),
}

/// Sorts an `ok: false` error code (see the module docs).
fn classify_error(code: &str, headers: &HeaderMap) -> SlackFailure {
    if CREDENTIAL_ERRORS.contains(&code) {
        SlackFailure::Batch(SendError::Fatal(format!(
            "credentials rejected by Slack ({code})"
        )))
    } else if THROTTLE_ERRORS.contains(&code) {
        SlackFailure::Batch(SendError::Retryable {
            reason: format!("Slack is throttling requests ({code})"),
            retry_after: retry_after(headers, SystemTime::now()),
            throttled: true,
        })
    } else if TRANSIENT_ERRORS.contains(&code) {
        SlackFailure::Batch(SendError::Retryable {
            reason: format!("Slack failed temporarily ({code})"),
            retry_after: retry_after(headers, SystemTime::now()),
            throttled: false,
        })
    } else {
        SlackFailure::Record(format!("Slack refused the message: {code}"))
    }
}

/// `Ok(None)` for `ok: true`, else the error code (or a description of a malformed answer).
fn read_ok(json: &serde_json::Value) -> Option<String> {
    match json.get("ok").and_then(serde_json::Value::as_bool) {
        Some(true) => None,
        _ => Some(
            json.get("error")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| "unknown_error".to_owned()),
        ),
    }
}

/// Renders a template over a record's fields. A field the record lacks is an error naming it;
/// NULL renders empty.
fn render(field: &str, template: &Template, fields: &Document) -> Result<String, String> {
    check_variables(field, template, fields)?;
    template
        .render(|name| lookup(fields, name))
        .map_err(|e| format!("{field}: {e}"))
}

/// Like [`render`], with every value escaped as Slack asks of text from elsewhere
/// (<https://api.slack.com/reference/surfaces/formatting#escaping>): `&`, `<` and `>` become
/// `&amp;`, `&lt;` and `&gt;`, so a value cannot mention `<!channel>`, a user or a link. The
/// template's own text is sent as written.
fn render_escaped(field: &str, template: &Template, fields: &Document) -> Result<String, String> {
    check_variables(field, template, fields)?;
    template
        .render(|name| lookup(fields, name).map(|text| escape(&text)))
        .map_err(|e| format!("{field}: {e}"))
}

/// A variable of `template` the record lacks is an error naming it.
fn check_variables(field: &str, template: &Template, fields: &Document) -> Result<(), String> {
    match template.variables().find(|name| lookup(fields, name).is_none()) {
        Some(missing) => Err(format!(
            "{field} uses {{{{{missing}}}}}, which this record does not have (check the mappings)"
        )),
        None => Ok(()),
    }
}

/// Slack's three control characters, escaped.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A field's text: the exact name first, then a dotted path through nested objects and JSON.
fn lookup<'a>(fields: &'a Document, name: &str) -> Option<Cow<'a, str>> {
    if let Some(value) = fields.get(name) {
        return Some(text_of(value));
    }
    let mut parts = name.split('.');
    let mut value = fields.get(parts.next()?)?;
    loop {
        let Some(part) = parts.next() else {
            return Some(text_of(value));
        };
        match value {
            Value::Object(doc) => value = doc.get(part)?,
            Value::Json(json) => {
                let mut json = json.get(part)?;
                for part in parts.by_ref() {
                    json = json.get(part)?;
                }
                return Some(match json {
                    serde_json::Value::Null => Cow::Borrowed(""),
                    serde_json::Value::String(s) => Cow::Borrowed(s.as_str()),
                    other => Cow::Owned(other.to_string()),
                });
            }
            _ => return None,
        }
    }
}

fn text_of(value: &Value) -> Cow<'_, str> {
    match value {
        v if v.is_null() => Cow::Borrowed(""),
        Value::Text(s) => Cow::Borrowed(s.as_str()),
        other => Cow::Owned(other.to_text()),
    }
}

#[async_trait]
impl Connector for SlackConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // chat.postMessage posts one message per call.
            max_batch_size: 1,
            // Messages cannot be taken back, so no deletes.
            operations: vec![Operation::Upsert, Operation::Update, Operation::Insert],
            // chat.postMessage: about one message per second per channel.
            default_requests_per_second: 1.0,
            default_concurrency: 1,
        }
    }

    /// POSTs `auth.test` with the token: `ok: true` means the token works.
    async fn check(&self) -> Result<(), SendError> {
        let (headers, json) = self.call(&self.auth_test, &self.auth_label, None).await?;
        match read_ok(&json) {
            None => Ok(()),
            Some(code) => Err(match classify_error(&code, &headers) {
                SlackFailure::Batch(error) => error,
                SlackFailure::Record(_) => SendError::Fatal(format!("Slack auth.test failed ({code})")),
            }),
        }
    }

    async fn send(&self, _operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for record in batch {
            let body = match self.message(record) {
                Ok(body) => body,
                Err(reason) => {
                    outcomes.push(RecordOutcome::Rejected(self.scrubber.scrub(&reason)));
                    continue;
                }
            };
            let (headers, json) = self
                .call(&self.post_message, &self.post_label, Some(body))
                .await?;
            outcomes.push(match read_ok(&json) {
                None => RecordOutcome::Accepted,
                Some(code) => match classify_error(&code, &headers) {
                    SlackFailure::Batch(error) => return Err(self.scrubber.error(error)),
                    SlackFailure::Record(reason) => RecordOutcome::Rejected(self.scrubber.scrub(&reason)),
                },
            });
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> Document {
        Document::from([
            ("score".to_owned(), Value::Int(92)),
            ("owner".to_owned(), Value::Null),
            (
                "properties".to_owned(),
                Value::Object(Document::from([(
                    "name".to_owned(),
                    Value::Text("Acme".to_owned()),
                )])),
            ),
            (
                "extra".to_owned(),
                Value::Json(serde_json::json!({"plan": {"tier": "gold"}, "seats": 12})),
            ),
        ])
    }

    #[test]
    fn values_from_rows_are_escaped_so_they_cannot_mention_or_link() {
        let template = Template::parse("<!here> score of {{name}}").unwrap();
        let fields = Document::from([("name".to_owned(), Value::Text("<!channel> & <@U123|x> >".into()))]);
        assert_eq!(
            render_escaped("spec.slack.text", &template, &fields).unwrap(),
            "<!here> score of &lt;!channel&gt; &amp; &lt;@U123|x&gt; &gt;"
        );
    }

    #[test]
    fn templates_reach_nested_objects_and_json_and_null_renders_empty() {
        let template =
            Template::parse("{{properties.name}} {{score}} [{{owner}}] {{extra.plan.tier}} {{extra.seats}}")
                .unwrap();
        assert_eq!(
            render("spec.slack.text", &template, &fields()).unwrap(),
            "Acme 92 [] gold 12"
        );
    }

    #[test]
    fn a_field_the_record_lacks_is_named_in_the_reason() {
        let template = Template::parse("{{properties.nope}}").unwrap();
        let reason = render("spec.slack.text", &template, &fields()).unwrap_err();
        assert!(reason.contains("{{properties.nope}}"), "{reason}");
        assert!(reason.starts_with("spec.slack.text"), "{reason}");
    }

    #[test]
    fn error_codes_are_sorted_into_fatal_throttled_transient_and_per_record() {
        let headers = HeaderMap::new();
        assert!(matches!(
            classify_error("invalid_auth", &headers),
            SlackFailure::Batch(SendError::Fatal(m)) if m == "credentials rejected by Slack (invalid_auth)"
        ));
        assert!(matches!(
            classify_error("ratelimited", &headers),
            SlackFailure::Batch(SendError::Retryable { throttled: true, .. })
        ));
        assert!(matches!(
            classify_error("internal_error", &headers),
            SlackFailure::Batch(SendError::Retryable { throttled: false, .. })
        ));
        assert!(matches!(
            classify_error("channel_not_found", &headers),
            SlackFailure::Record(r) if r == "Slack refused the message: channel_not_found"
        ));
    }
}
