//! What the cloud warehouses' REST sources share: one HTTP client with bounded reads, the
//! retry of throttled and unavailable answers, cached bearer tokens refreshed once on a `401`,
//! the polling of a running statement or job ([`poll`]), the test-only endpoint override, and
//! the scrubbing of credentials from every message.
//!
//! Retries follow the engine's delivery policy in shape (exponential with jitter through
//! `backon`), honour a `Retry-After` of seconds, and cover `429`, `500`, `502`, `503`, `504`,
//! Google's `403 rateLimitExceeded` and transport failures; anything else is the caller's to interpret.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::{Connection, SourceError};
use crate::redact::Scrubber;

/// How long to wait for a connection to the service.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest single HTTP exchange; a result partition of tens of megabytes fits well within it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Attempts per request before a throttled or unavailable answer becomes an error.
const MAX_ATTEMPTS: usize = 6;
/// First and longest wait between attempts.
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// Largest response body read; a larger one is an error rather than an unbounded allocation.
pub(super) const MAX_BODY: usize = 512 * 1024 * 1024;
/// Largest error body kept for a message.
const MAX_ERROR_BODY: usize = 2048;
/// First and longest wait between two polls of a running statement or job.
const FIRST_POLL: Duration = Duration::from_millis(100);
const MAX_POLL: Duration = Duration::from_secs(2);
/// A token is renewed this long before it expires, so no request carries one that expires
/// in flight.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// A failed HTTP exchange, already scrubbed of credentials and URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HttpError {
    /// No answer: connection refused, reset, timed out.
    Transport(String),
    /// An answer with a non-success status; `body` is a short, scrubbed excerpt.
    Status {
        /// The status code.
        status: u16,
        /// The start of the body.
        body: String,
        /// The `Retry-After` in seconds, when given.
        retry_after: Option<Duration>,
    },
    /// A body that was not the JSON expected, or larger than [`MAX_BODY`].
    Body(String),
    /// The operator's egress policy refused the host's address.
    Egress(crate::egress::EgressError),
}

impl HttpError {
    fn is_retryable(&self) -> bool {
        match self {
            HttpError::Transport(_) => true,
            HttpError::Status { status, body, .. } => {
                matches!(status, 429 | 500 | 502 | 503 | 504)
                    // Google answers a rate limit with 403 and this reason.
                    || (*status == 403 && body.contains("rateLimitExceeded"))
            }
            HttpError::Body(_) | HttpError::Egress(_) => false,
        }
    }

    /// The status code, when there was an answer.
    pub(super) fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpError::Transport(reason) => write!(f, "{reason}"),
            HttpError::Status { status, body, .. } if body.is_empty() => write!(f, "HTTP {status}"),
            HttpError::Status { status, body, .. } => write!(f, "HTTP {status}: {body}"),
            HttpError::Body(reason) => write!(f, "{reason}"),
            HttpError::Egress(e) => write!(f, "{e}"),
        }
    }
}

/// The HTTP side of one extraction: a client, the scrubber for its credentials, and where
/// requests go.
#[derive(Clone)]
pub(super) struct Http {
    client: reqwest::Client,
    scrubber: Arc<Scrubber>,
    endpoint_override: Option<String>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("endpoint_override", &self.endpoint_override)
            .finish_non_exhaustive()
    }
}

impl Http {
    /// A client for the source of `connection`, masking its URL's and credentials' secrets.
    pub(super) fn new(connection: Connection<'_>) -> Result<Http, SourceError> {
        let url = connection.url;
        // DNS through the egress policy, as every connector's client.
        let client = crate::egress::http_client()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            // A redirect could carry the Authorization header to another host.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("backflow/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SourceError::Config {
                target: crate::redact::describe_url(url),
                reason: format!("failed to build the HTTP client: {e}"),
            })?;
        Ok(Http {
            client,
            scrubber: Arc::new(
                Scrubber::new()
                    .with_url(url)
                    .with_values(connection.credentials.values()),
            ),
            endpoint_override: connection.endpoint_override.map(str::to_owned),
        })
    }

    /// `text` with every known secret masked.
    pub(super) fn scrub(&self, text: &str) -> String {
        self.scrubber.scrub(text)
    }

    /// `real` (like `https://acme.snowflakecomputing.com`), or the test override.
    pub(super) fn base(&self, real: &str) -> String {
        self.endpoint_override.clone().unwrap_or_else(|| real.to_owned())
    }

    /// Sends the request `build` makes, retrying throttled and unavailable answers, and
    /// returns the first success (any `2xx`).
    pub(super) async fn send(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, HttpError> {
        let attempt = || async {
            let request = build(&self.client)
                .build()
                .map_err(|e| HttpError::Transport(self.transport_reason(e)))?;
            // A host written as an address never reaches the policy's resolver.
            if let Some(host) = request.url().host_str() {
                crate::egress::check_host(host).map_err(HttpError::Egress)?;
            }
            let response =
                self.client
                    .execute(request)
                    .await
                    .map_err(|e| match crate::egress::find_in(&e) {
                        Some(refused) => HttpError::Egress(refused.clone()),
                        None => HttpError::Transport(self.transport_reason(e)),
                    })?;
            if response.status().is_success() {
                Ok(response)
            } else {
                Err(self.status_error(response).await)
            }
        };
        attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(MIN_BACKOFF)
                    .with_max_delay(MAX_BACKOFF)
                    .with_max_times(MAX_ATTEMPTS - 1)
                    .with_jitter(),
            )
            .sleep(tokio::time::sleep)
            .when(HttpError::is_retryable)
            .adjust(|e, delay| match e {
                HttpError::Status {
                    retry_after: Some(wait),
                    ..
                } => delay.map(|_| (*wait).min(MAX_BACKOFF)),
                _ => delay,
            })
            .notify(|e, wait| {
                tracing::debug!(error = %e, wait_ms = wait.as_millis() as u64, "retrying a warehouse request");
            })
            .await
    }

    /// Sends like [`Http::send`] and reads the JSON answer, at most [`MAX_BODY`] bytes.
    pub(super) async fn json<T: DeserializeOwned>(
        &self,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<(StatusCode, T), HttpError> {
        let response = self.send(build).await?;
        let status = response.status();
        let body = self.read_body(response, MAX_BODY).await?;
        let value = serde_json::from_slice(&body)
            .map_err(|e| HttpError::Body(format!("failed to parse the answer: {e}")))?;
        Ok((status, value))
    }

    /// The body of `response`, refusing one longer than `limit`.
    pub(super) async fn read_body(&self, mut response: Response, limit: usize) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::with_capacity(
            response
                .content_length()
                .and_then(|l| usize::try_from(l).ok())
                .unwrap_or(0)
                .min(limit),
        );
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| HttpError::Transport(self.transport_reason(e)))?
        {
            if body.len().saturating_add(chunk.len()) > limit {
                return Err(HttpError::Body(format!(
                    "failed to read the answer: it is larger than {limit} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    async fn status_error(&self, response: Response) -> HttpError {
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = match self.read_body(response, 64 * 1024).await {
            Ok(bytes) => excerpt(&String::from_utf8_lossy(&bytes)),
            Err(_) => String::new(),
        };
        HttpError::Status {
            status,
            body: self.scrub(&body),
            retry_after,
        }
    }

    fn transport_reason(&self, e: reqwest::Error) -> String {
        // reqwest puts the URL in its messages; a pre-signed URL is a credential.
        let e = e.without_url();
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            reason.push_str(": ");
            reason.push_str(&cause.to_string());
            source = cause.source();
        }
        self.scrub(&reason)
    }
}

/// The start of an error body, on one line.
fn excerpt(text: &str) -> String {
    let one_line: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(MAX_ERROR_BODY) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

/// A bearer token and when it stops working.
#[derive(Clone)]
pub(super) struct Token {
    /// The token itself.
    pub(super) value: String,
    /// When it expires.
    pub(super) expires_at: Instant,
}

/// Makes new tokens: signs a JWT, or exchanges a credential at a token endpoint.
#[async_trait]
pub(super) trait Mint: Send + Sync {
    /// A fresh token.
    async fn mint(&self, http: &Http) -> Result<Token, SourceError>;
}

/// A cached token, renewed before it expires and after the service refused it.
pub(super) struct Tokens {
    mint: Box<dyn Mint>,
    cached: Mutex<Option<Token>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").finish_non_exhaustive()
    }
}

impl Tokens {
    /// Tokens made by `mint`.
    pub(super) fn new(mint: impl Mint + 'static) -> Self {
        Tokens {
            mint: Box::new(mint),
            cached: Mutex::new(None),
        }
    }

    /// A token valid for at least [`TOKEN_MARGIN`] more.
    pub(super) async fn get(&self, http: &Http) -> Result<String, SourceError> {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref()
            && token.expires_at > Instant::now() + TOKEN_MARGIN
        {
            return Ok(token.value.clone());
        }
        let token = self.mint.mint(http).await?;
        let value = token.value.clone();
        *cached = Some(token);
        Ok(value)
    }

    /// Forgets `refused` (a token the service answered `401` to), unless another request
    /// already replaced it.
    pub(super) async fn refused(&self, refused: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|t| t.value == refused) {
            *cached = None;
        }
    }
}

/// Why a request that carries a token failed.
#[derive(Debug)]
pub(super) enum CallError {
    /// The exchange failed.
    Http(HttpError),
    /// No token could be made (a bad key, a refused client secret).
    Token(SourceError),
}

/// Sends a request carrying a token from `tokens`; on a `401`, renews the token once and
/// sends again (a token may expire or be revoked mid-run).
pub(super) async fn send_authorized(
    http: &Http,
    tokens: &Tokens,
    build: impl Fn(&reqwest::Client, &str) -> RequestBuilder,
) -> Result<Response, CallError> {
    let mut renewed = false;
    loop {
        let token = tokens.get(http).await.map_err(CallError::Token)?;
        match http.send(|client| build(client, &token)).await {
            Err(e) if e.status() == Some(401) && !renewed => {
                tracing::debug!("the warehouse refused its token; renewing it once");
                tokens.refused(&token).await;
                renewed = true;
            }
            other => return other.map_err(CallError::Http),
        }
    }
}

/// Like [`send_authorized`], reading a JSON answer of at most [`MAX_BODY`] bytes.
pub(super) async fn json_authorized<T: DeserializeOwned>(
    http: &Http,
    tokens: &Tokens,
    build: impl Fn(&reqwest::Client, &str) -> RequestBuilder,
) -> Result<(StatusCode, T), CallError> {
    let response = send_authorized(http, tokens, build).await?;
    let status = response.status();
    let body = http
        .read_body(response, MAX_BODY)
        .await
        .map_err(CallError::Http)?;
    let value = serde_json::from_slice(&body)
        .map_err(|e| CallError::Http(HttpError::Body(format!("failed to parse the answer: {e}"))))?;
    Ok((status, value))
}

/// Where a polled statement or job stands, as one answer tells.
pub(super) enum Progress<T> {
    /// It ended, with this result.
    Done(T),
    /// It is still running.
    Running,
}

/// Polls a statement or job from its first `answer` until it ends: `progress` reads each
/// answer (its error ends the polling), `next` asks again after a pause that grows by half
/// from 100 ms to 2 s. Past `deadline`, the statement timeout `timeout` is reported.
pub(super) async fn poll<A, T, F>(
    mut answer: A,
    deadline: Instant,
    timeout: Duration,
    mut progress: impl FnMut(A) -> Result<Progress<T>, SourceError>,
    mut next: impl FnMut() -> F,
) -> Result<T, SourceError>
where
    F: std::future::Future<Output = Result<A, SourceError>>,
{
    let mut pause = FIRST_POLL;
    loop {
        if let Progress::Done(done) = progress(answer)? {
            return Ok(done);
        }
        if Instant::now() >= deadline {
            return Err(SourceError::Timeout(timeout));
        }
        tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 3 / 2).min(MAX_POLL);
        answer = next().await?;
    }
}

/// Seconds from now as an [`Instant`], saturating on absurd values from a response.
pub(super) fn expires_in(seconds: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(seconds.min(86_400 * 365)))
        .unwrap_or(now)
}

/// The value of query parameter `name` in a connection URL, percent-decoded.
pub(super) fn query_param(url: &reqwest::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_cut_to_one_short_line() {
        let long = "x\n".repeat(5000);
        let cut = excerpt(&long);
        assert!(!cut.contains('\n'));
        assert!(cut.chars().count() <= MAX_ERROR_BODY + 1);
    }

    #[test]
    fn only_throttling_unavailability_and_transport_failures_are_retried() {
        let status = |status| HttpError::Status {
            status,
            body: String::new(),
            retry_after: None,
        };
        assert!(status(429).is_retryable());
        assert!(status(503).is_retryable());
        assert!(!status(401).is_retryable());
        assert!(!status(422).is_retryable());
        assert!(HttpError::Transport("reset".into()).is_retryable());
    }
}
