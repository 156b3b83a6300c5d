//! An in-process stand-in for the Slack Web API methods the `slack` destination calls.
//!
//! Reproduced from the docs:
//! - `POST /chat.postMessage` (<https://api.slack.com/methods/chat.postMessage>): a JSON body
//!   `{"channel", "text"}`; answers HTTP 200 `{"ok": true, "channel", "ts", "message"}`, or
//!   HTTP 200 `{"ok": false, "error": "channel_not_found"}` for a channel not in the double's
//!   list, `{"ok": false, "error": "no_text"}` for an empty text.
//! - `POST /auth.test` (<https://api.slack.com/methods/auth.test>): HTTP 200
//!   `{"ok": true, "team", "user", …}`.
//! - Authentication (<https://api.slack.com/web#authentication>): a missing `Authorization:
//!   Bearer` header answers `{"ok": false, "error": "not_authed"}`, a wrong token
//!   `{"ok": false, "error": "invalid_auth"}`, both with HTTP 200 as Slack does.
//! - Rate limits (<https://api.slack.com/docs/rate-limits>): HTTP 429 with `Retry-After:
//!   <seconds>` for a scripted number of requests (`throttle_first`); and scripted 5xx
//!   (`fail_first`).
//!
//! What it does not reproduce: the real per-channel rate (throttling is scripted by request
//! count), form-encoded bodies, `blocks`/attachments, threads, `mrkdwn` rendering, message
//! storage beyond the request log, channel IDs vs names (a channel is known by its exact
//! string), scopes (`missing_scope`), `not_in_channel`, `is_archived`, `msg_too_long`, and
//! the `warning`/`response_metadata` fields.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One request the double received.
#[derive(Debug, Clone)]
pub struct SlackRequest {
    /// The Web API method, like `chat.postMessage`.
    pub method: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The JSON body, when it is JSON.
    pub json: Option<Value>,
    /// The HTTP status answered.
    pub status: u16,
    /// The Slack error code answered with `ok: false`, if any.
    pub error: Option<String>,
    /// When it arrived (tokio clock).
    pub at: Instant,
}

struct Shared {
    token: String,
    channels: Vec<String>,
    throttle: usize,
    retry_after_secs: u64,
    failures: usize,
    failure_status: u16,
    scripted: AtomicUsize,
    log: Mutex<Vec<SlackRequest>>,
}

/// Builds a [`SlackDouble`].
pub struct SlackDoubleBuilder {
    token: String,
    channels: Vec<String>,
    throttle: usize,
    retry_after_secs: u64,
    failures: usize,
    failure_status: u16,
}

impl SlackDoubleBuilder {
    /// Channels that exist (exact strings, like `#alerts` or `C0123`); others are
    /// `channel_not_found`.
    pub fn channels(mut self, channels: &[&str]) -> Self {
        self.channels = channels.iter().map(|c| (*c).to_owned()).collect();
        self
    }

    /// The first `times` requests get HTTP 429 with `Retry-After: <secs>`.
    pub fn throttle_first(mut self, times: usize, retry_after_secs: u64) -> Self {
        self.throttle = times;
        self.retry_after_secs = retry_after_secs;
        self
    }

    /// After any throttling, the next `times` requests get HTTP `status` (like 503).
    pub fn fail_first(mut self, times: usize, status: u16) -> Self {
        self.failures = times;
        self.failure_status = status;
        self
    }

    /// Starts the double on a free port of 127.0.0.1.
    pub async fn start(self) -> SlackDouble {
        let shared = Arc::new(Shared {
            token: self.token,
            channels: self.channels,
            throttle: self.throttle,
            retry_after_secs: self.retry_after_secs,
            failures: self.failures,
            failure_status: self.failure_status,
            scripted: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/api/{method}", post(handle))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Slack double to 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the Slack double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        SlackDouble {
            base_url: format!("http://{addr}/api"),
            shared,
            server,
        }
    }
}

/// A running Slack double; the server stops when it is dropped.
pub struct SlackDouble {
    /// The value for `spec.slack.baseUrl`, like `http://127.0.0.1:41234/api`.
    pub base_url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl SlackDouble {
    /// A double accepting bot token `token`, with channel `#alerts` only.
    pub fn builder(token: &str) -> SlackDoubleBuilder {
        SlackDoubleBuilder {
            token: token.to_owned(),
            channels: vec!["#alerts".to_owned()],
            throttle: 0,
            retry_after_secs: 1,
            failures: 0,
            failure_status: 503,
        }
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<SlackRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// `(channel, text)` of every message Slack posted (`ok: true`), in order.
    pub fn posted(&self) -> Vec<(String, String)> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "chat.postMessage" && r.status == 200 && r.error.is_none())
            .filter_map(|r| {
                let json = r.json?;
                Some((
                    json.get("channel")?.as_str()?.to_owned(),
                    json.get("text")?.as_str()?.to_owned(),
                ))
            })
            .collect()
    }
}

impl Drop for SlackDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let authorization = header("authorization");
    let scripted = shared.scripted.fetch_add(1, Ordering::SeqCst);

    let (status, error, response) = if scripted < shared.throttle {
        let response = (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", shared.retry_after_secs.to_string())],
            axum::Json(json!({"ok": false, "error": "ratelimited"})),
        )
            .into_response();
        (429, None, response)
    } else if scripted < shared.throttle + shared.failures {
        let status = StatusCode::from_u16(shared.failure_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        (
            status.as_u16(),
            None,
            (status, "upstream unavailable").into_response(),
        )
    } else {
        let (error, answer) = answer(&shared, &method, authorization.as_deref(), json.as_ref());
        (200, error, axum::Json(answer).into_response())
    };

    shared
        .log
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push(SlackRequest {
            method,
            authorization,
            content_type: header("content-type"),
            json,
            status,
            error,
            at: Instant::now(),
        });
    response
}

/// Slack's HTTP 200 answer: the error code, if any, and the body.
fn answer(
    shared: &Shared,
    method: &str,
    authorization: Option<&str>,
    json: Option<&Value>,
) -> (Option<String>, Value) {
    let fail = |code: &str| (Some(code.to_owned()), json!({"ok": false, "error": code}));
    let Some(token) = authorization.and_then(|a| a.strip_prefix("Bearer ")) else {
        return fail("not_authed");
    };
    if token != shared.token {
        return fail("invalid_auth");
    }
    match method {
        "auth.test" => (
            None,
            json!({"ok": true, "url": "https://example.slack.com/", "team": "Example",
                   "user": "backflow", "team_id": "T0001", "user_id": "U0001", "bot_id": "B0001"}),
        ),
        "chat.postMessage" => {
            let Some(body) = json else {
                return fail("invalid_json");
            };
            let channel = body.get("channel").and_then(Value::as_str).unwrap_or("");
            let text = body.get("text").and_then(Value::as_str).unwrap_or("");
            if channel.is_empty() || !shared.channels.iter().any(|c| c == channel) {
                return fail("channel_not_found");
            }
            if text.is_empty() {
                return fail("no_text");
            }
            (
                None,
                json!({"ok": true, "channel": "C0001", "ts": "1503435956.000247",
                       "message": {"text": text, "type": "message", "bot_id": "B0001"}}),
            )
        }
        _ => fail("unknown_method"),
    }
}
