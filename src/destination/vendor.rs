//! Pieces every HTTP connector needs: the rules for reading an answer ([`answer`]), checking a configured URL, reading a credential from the
//! Secret, marking an `Authorization` header sensitive, building the HTTP client, and reading
//! an answer's body with a cap. Each returns the same errors, with the same messages, the
//! connectors wrote themselves before.

pub mod answer;

use std::time::Duration;

use reqwest::Url;
use reqwest::header::HeaderValue;

use super::{DestinationError, SendError};
use crate::api::SecretKeyRef;
use crate::model::secret::SecretData;
use answer::{RequestLabel, transport_error};

/// How long to wait for a connection to a vendor.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `text`, the value of the spec field `field` (like `spec.hubspot.baseUrl`), as an
/// absolute http or https URL whose host, when an IP literal, the egress policy allows (names
/// are checked when resolved). `hint` is appended to the "not an absolute URL" message (pass
/// `""` for none).
pub fn http_url(field: &str, text: &str, hint: &str) -> Result<Url, DestinationError> {
    let url = Url::parse(text).map_err(|e| {
        DestinationError::Invalid(format!("{field}: {text:?} is not an absolute URL ({e}){hint}"))
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(DestinationError::Invalid(format!(
            "{field}: {text:?} must use http or https"
        )));
    }
    crate::egress::check_host(url.host_str().unwrap_or_default())
        .map_err(|e| DestinationError::Invalid(format!("{field}: {e}")))?;
    Ok(url)
}

/// The host of `url`, or `""` when it has none.
pub fn host(url: &Url) -> String {
    url.host_str().unwrap_or_default().to_owned()
}

/// The Secret reference and the Secret's data, or `MissingCredentials(vendor)` when either is
/// absent.
pub fn credentials<'a>(
    secret_ref: Option<&'a SecretKeyRef>,
    secret: Option<&'a SecretData>,
    vendor: &'static str,
) -> Result<(&'a SecretKeyRef, &'a SecretData), DestinationError> {
    let secret_ref = secret_ref.ok_or(DestinationError::MissingCredentials(vendor))?;
    let data = secret.ok_or(DestinationError::MissingCredentials(vendor))?;
    Ok((secret_ref, data))
}

/// The value under `key` in the Secret named `secret_name`, trimmed; `MissingSecretKey` when
/// it is absent or blank.
pub fn secret_value<'a>(
    data: &'a SecretData,
    secret_name: &str,
    key: &str,
) -> Result<&'a str, DestinationError> {
    data.get(key)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| DestinationError::MissingSecretKey {
            secret: secret_name.to_owned(),
            key: key.to_owned(),
        })
}

/// `value` as a header value marked sensitive (kept out of debug output); `Invalid(invalid())`
/// when it cannot be a header (a newline or control character).
pub fn sensitive_header(
    value: &str,
    invalid: impl FnOnce() -> String,
) -> Result<HeaderValue, DestinationError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| DestinationError::Invalid(invalid()))?;
    header.set_sensitive(true);
    Ok(header)
}

/// The HTTP client for a vendor: the request `timeout`, [`CONNECT_TIMEOUT`], no redirects
/// (a redirect would turn a POST or PUT into a GET and lose the body), the user agent
/// `backflow/<version>`, and DNS through the egress policy.
pub fn client(timeout: Duration) -> Result<reqwest::Client, DestinationError> {
    crate::egress::http_client()
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("backflow/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| DestinationError::Invalid(format!("failed to build the HTTP client: {e}")))
}

/// Largest answer body read from a destination. Vendors answer a batch in kilobytes (a
/// Salesforce Bulk result of 10,000 records is about 1 MB); a bigger answer is not buffered.
pub const MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;

/// Largest body read from an answer only quoted in an error message (a refused connection
/// check): the excerpt shows a few hundred characters of it.
pub const MAX_ERROR_BODY_BYTES: usize = 64 * 1024;

/// Reads at most `limit` bytes of `response`'s body, chunk by chunk. A body announced or found
/// larger is not read further: a retryable error naming the request (the connection is
/// dropped, not drained). A transport failure reads as [`transport_error`] says. The result
/// still goes through the connector's `Scrubber`.
pub async fn read_body(
    mut response: reqwest::Response,
    limit: usize,
    label: &RequestLabel,
    timeout: Duration,
) -> Result<Vec<u8>, SendError> {
    let too_large = || SendError::Retryable {
        reason: format!(
            "failed to read the answer to {} {}: it is larger than {limit} bytes",
            label.method, label.url
        ),
        retry_after: None,
        throttled: false,
    };
    if response
        .content_length()
        .is_some_and(|n| n > u64::try_from(limit).unwrap_or(u64::MAX))
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(label, e, timeout))?
    {
        if body.len().saturating_add(chunk.len()) > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `": <message>"` to append to an error's text, or `""` when the vendor said nothing.
pub fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}
