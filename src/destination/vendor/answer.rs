//! The shared rules for reading an HTTP answer: what a status means for the batch
//! ([`classify_status`], [`status_error`]), what a failed request means
//! ([`transport_error`]), how long `Retry-After` asks to wait ([`retry_after`]), and how much
//! of a body an error may quote ([`excerpt`]). Every HTTP connector, the generic `http` one
//! included, reads its answers with them.
//!
//! Redirects are not followed: following a 301/302 turns a POST into a GET and drops the
//! body, which would count a batch as delivered that never was. A 3xx is reported as a wrong
//! URL instead.

use std::time::{Duration, SystemTime};

use chrono::{DateTime, NaiveDateTime, Utc};
use reqwest::header::{HeaderMap, LOCATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use crate::destination::SendError;
#[cfg(doc)]
use crate::redact::Scrubber;

/// Most characters of a response body quoted in an error or a rejection reason.
pub const EXCERPT_CHARS: usize = 300;

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

/// `text` cut to at most `max_chars` characters, `…` marking a cut.
pub fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        None => text.to_owned(),
        Some((cut, _)) => format!("{}…", &text[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;

    use super::*;

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
