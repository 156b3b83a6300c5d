//! An in-process HTTP server standing in for a JSON destination (the `http` connector, and
//! the base for vendor doubles), with failure injection.
//!
//! `HttpDouble::start(behaviour)` listens on `127.0.0.1:0`, answers every method and path,
//! and records each request (method, path, query, headers, raw body, parsed JSON, the status
//! it got) as it arrives. What it answers comes from a [`Behaviour`]:
//!
//! - a script of canned replies for the first requests (`throttle_first`, `fail_first`,
//!   `first`), then
//! - a steady answer: by default `200` with one result per record,
//!   `{"results":[{"index":0,"error":null},…]}`, where `reject_records` (or
//!   `reject_emails_without_at`) puts an error message on the records it refuses; or a fixed
//!   reply (`always`, `unauthorized`);
//! - or, for a vendor double, whatever its `handler` answers (routing by method and path);
//! - optionally a required header (`require_header`, answered 401 when it is absent or
//!   different) and a delay before every answer (`with_delay`), counted on tokio's clock;
//! - or an endless body (`endless_body`): the status, then 64 KiB chunks of JSON whitespace
//!   without end and without a `content-length`, counting what it streamed
//!   (`bytes_streamed`), for tests of bounded reads.
//!
//! Records are read from the JSON body at a JSON Pointer (`/records` by default, as in the
//! `http` connector's default body; `records_at` changes it). Every request is counted and
//! recorded, including those answered by the script.
//!
//! What it does not reproduce: TLS, HTTP/2, keep-alive or connection limits, connections
//! reset mid-response or truncated bodies, throttling by actual request rate (throttling is
//! scripted by request count), authentication beyond an exact header match, and any storage:
//! a record "accepted" here is only remembered in the request log. Parsed JSON uses
//! `serde_json` without arbitrary precision, so compare exact numbers on the raw body.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Decides, per record, whether the double refuses it: `Some(message)` rejects.
pub type RecordCheck = Arc<dyn Fn(&Value) -> Option<String> + Send + Sync>;

/// Answers a request once the script is used up: how a vendor double routes by path.
pub type Handler = Arc<dyn Fn(&RecordedRequest) -> Reply + Send + Sync>;

/// One canned HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Response body (sent as `application/json` unless a `content-type` header is given).
    pub body: String,
}

impl Reply {
    /// A reply with a status and a body and no extra headers.
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Reply {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// Adds a response header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }
}

/// What the double answers. Build it with the constructors and chain the modifiers.
#[derive(Clone)]
pub struct Behaviour {
    script: Vec<Reply>,
    steady: Option<Reply>,
    handler: Option<Handler>,
    reject: Option<RecordCheck>,
    required_header: Option<(String, String)>,
    delay: Duration,
    records_pointer: String,
    endless: Option<u16>,
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Behaviour")
            .field("script", &self.script)
            .field("steady", &self.steady)
            .field("handler", &self.handler.is_some())
            .field("rejects", &self.reject.is_some())
            .field("required_header", &self.required_header.as_ref().map(|(n, _)| n))
            .field("delay", &self.delay)
            .field("records_pointer", &self.records_pointer)
            .finish()
    }
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour::accept_all()
    }
}

impl Behaviour {
    /// Answers `200` with `{"results":[{"index":i,"error":null},…]}`, one entry per record.
    pub fn accept_all() -> Self {
        Behaviour {
            script: Vec::new(),
            steady: None,
            handler: None,
            reject: None,
            required_header: None,
            delay: Duration::ZERO,
            records_pointer: "/records".to_owned(),
            endless: None,
        }
    }

    /// Answers every request with `status` and a body that never ends.
    pub fn endless_body(status: u16) -> Self {
        Behaviour {
            endless: Some(status),
            ..Behaviour::accept_all()
        }
    }

    /// Answers every request (after any script) with this status and body.
    pub fn always(status: u16, body: impl Into<String>) -> Self {
        Behaviour::accept_all().steady(Reply::new(status, body))
    }

    /// Answers every request with `401 {"message":"invalid API token"}`.
    pub fn unauthorized() -> Self {
        Behaviour::always(401, r#"{"message":"invalid API token"}"#)
    }

    /// Replaces the steady answer given once the script is used up.
    pub fn steady(mut self, reply: Reply) -> Self {
        self.steady = Some(reply);
        self
    }

    /// Answers every request (after any script) with what `handler` makes of it: the vendor
    /// doubles route by method and path here. The request it gets is the recorded one.
    pub fn handler(mut self, handler: impl Fn(&RecordedRequest) -> Reply + Send + Sync + 'static) -> Self {
        self.handler = Some(Arc::new(handler));
        self
    }

    /// Answers the next `times` scripted requests with `reply`.
    pub fn first(mut self, times: usize, reply: Reply) -> Self {
        self.script.extend(std::iter::repeat_n(reply, times));
        self
    }

    /// The next `times` requests get `429` with `Retry-After: <retry_after_secs>`.
    pub fn throttle_first(self, times: usize, retry_after_secs: u64) -> Self {
        let reply = Reply::new(429, r#"{"message":"rate limit exceeded"}"#)
            .header("retry-after", &retry_after_secs.to_string());
        self.first(times, reply)
    }

    /// The next `times` requests get `status` (like 503) with a short JSON message.
    pub fn fail_first(self, times: usize, status: u16) -> Self {
        self.first(
            times,
            Reply::new(status, r#"{"message":"temporarily unavailable"}"#),
        )
    }

    /// Per-record results reject the records `check` refuses, with its message.
    pub fn reject_records(
        mut self,
        check: impl Fn(&Value) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.reject = Some(Arc::new(check));
        self
    }

    /// Rejects records whose `email` field is missing or lacks an `@`, with
    /// `invalid email: <value>`.
    pub fn reject_emails_without_at(self) -> Self {
        self.reject_records(|record| match record.get("email").and_then(Value::as_str) {
            Some(email) if email.contains('@') => None,
            Some(email) => Some(format!("invalid email: {email}")),
            None => Some("invalid email: missing".to_owned()),
        })
    }

    /// Answers `401` to any request whose header `name` is not exactly `value`.
    pub fn require_header(mut self, name: &str, value: &str) -> Self {
        self.required_header = Some((name.to_ascii_lowercase(), value.to_owned()));
        self
    }

    /// Waits this long (tokio time) before answering each request.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Where the records are in a request body (a JSON Pointer; `""` for a top-level array).
    pub fn records_at(mut self, pointer: &str) -> Self {
        self.records_pointer = pointer.to_owned();
        self
    }
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// HTTP method, like `POST`.
    pub method: String,
    /// Path, like `/upsert`.
    pub path: String,
    /// Query string without `?`, if any.
    pub query: Option<String>,
    /// Headers, names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as received.
    pub raw_body: Vec<u8>,
    /// The body parsed as JSON, when it is JSON.
    pub json: Option<Value>,
    /// The status answered; `None` while the answer is pending or when the client gave up
    /// before it (a timeout).
    pub status: Option<u16>,
    /// Per-record rejection messages of a `200` with results (`None` = accepted).
    pub rejections: Vec<Option<String>>,
    /// When it arrived (tokio clock).
    pub at: Instant,
    records_pointer: String,
}

impl RecordedRequest {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.raw_body).into_owned()
    }

    /// The records in the body, at the behaviour's pointer (empty when there are none).
    pub fn records(&self) -> Vec<Value> {
        records_in(self.json.as_ref(), &self.records_pointer)
    }
}

fn records_in(json: Option<&Value>, pointer: &str) -> Vec<Value> {
    json.and_then(|j| j.pointer(pointer))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

struct Shared {
    behaviour: Behaviour,
    log: Mutex<Vec<RecordedRequest>>,
    scripted: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    streamed: AtomicUsize,
}

impl Shared {
    fn log(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A test that panicked while holding the lock already failed; keep reading.
        self.log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Counts a request in flight until dropped, also when the client gives up mid-request.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running double; the server stops when it is dropped.
pub struct HttpDouble {
    /// Base URL without a trailing slash, like `http://127.0.0.1:41234`.
    pub url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl HttpDouble {
    /// Starts a double on a free port of 127.0.0.1 in the current tokio runtime.
    pub async fn start(behaviour: Behaviour) -> HttpDouble {
        let shared = Arc::new(Shared {
            behaviour,
            log: Mutex::new(Vec::new()),
            scripted: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            streamed: AtomicUsize::new(0),
        });
        let router = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(256 * 1024 * 1024))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the HTTP double to 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the HTTP double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        HttpDouble {
            url: format!("http://{addr}"),
            addr,
            shared,
            server,
        }
    }

    /// `url` joined with `path` (which starts with `/`).
    pub fn url_for(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log().clone()
    }

    /// Bytes of endless bodies streamed so far (sent into the socket, read or not).
    pub fn bytes_streamed(&self) -> usize {
        self.shared.streamed.load(Ordering::SeqCst)
    }

    /// How many requests arrived.
    pub fn request_count(&self) -> usize {
        self.shared.log().len()
    }

    /// Every record of every request, in arrival order (retries included).
    pub fn received_records(&self) -> Vec<Value> {
        self.shared
            .log()
            .iter()
            .flat_map(RecordedRequest::records)
            .collect()
    }

    /// The records this double accepted: those of `2xx` answers its results did not reject.
    pub fn accepted_records(&self) -> Vec<Value> {
        let log = self.shared.log();
        let mut accepted = Vec::new();
        for request in log.iter() {
            if !matches!(request.status, Some(200..=299)) {
                continue;
            }
            for (i, record) in request.records().into_iter().enumerate() {
                if request.rejections.get(i).is_none_or(Option::is_none) {
                    accepted.push(record);
                }
            }
        }
        accepted
    }

    /// The most requests that were in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for HttpDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let _in_flight = InFlight::enter(&shared);
    let behaviour = &shared.behaviour;
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let records = records_in(json.as_ref(), &behaviour.records_pointer);
    let index = {
        let mut log = shared.log();
        log.push(RecordedRequest {
            method: method.to_string(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            raw_body: body.to_vec(),
            json,
            status: None,
            rejections: Vec::new(),
            at: Instant::now(),
            records_pointer: behaviour.records_pointer.clone(),
        });
        log.len() - 1
    };
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }

    if let Some(status) = behaviour.endless {
        return endless(status, Arc::clone(&shared));
    }
    let recorded = behaviour
        .handler
        .as_ref()
        .and_then(|_| shared.log().get(index).cloned());
    let (reply, rejections) = decide(behaviour, &shared.scripted, &headers, &records, recorded.as_ref());
    {
        let mut log = shared.log();
        if let Some(request) = log.get_mut(index) {
            request.status = Some(reply.status);
            request.rejections = rejections;
        }
    }
    respond(reply)
}

/// Picks the answer: a wrong credential first, then the script, then the steady answer.
fn decide(
    behaviour: &Behaviour,
    scripted: &AtomicUsize,
    headers: &HeaderMap,
    records: &[Value],
    recorded: Option<&RecordedRequest>,
) -> (Reply, Vec<Option<String>>) {
    if let Some((name, value)) = &behaviour.required_header {
        let given = headers.get(name.as_str()).and_then(|v| v.to_str().ok());
        if given != Some(value.as_str()) {
            return (Reply::new(401, r#"{"message":"invalid API token"}"#), Vec::new());
        }
    }
    let turn = scripted.fetch_add(1, Ordering::SeqCst);
    if let Some(reply) = behaviour.script.get(turn) {
        return (reply.clone(), Vec::new());
    }
    if let Some(reply) = &behaviour.steady {
        return (reply.clone(), Vec::new());
    }
    if let (Some(handler), Some(request)) = (&behaviour.handler, recorded) {
        return (handler(request), Vec::new());
    }
    let rejections: Vec<Option<String>> = records
        .iter()
        .map(|record| behaviour.reject.as_ref().and_then(|check| check(record)))
        .collect();
    let results: Vec<Value> = rejections
        .iter()
        .enumerate()
        .map(|(i, error)| json!({"index": i, "error": error}))
        .collect();
    (
        Reply::new(200, json!({ "results": results }).to_string()),
        rejections,
    )
}

/// `status` with 64 KiB chunks of spaces until the client stops reading.
fn endless(status: u16, shared: Arc<Shared>) -> Response {
    let chunk = Bytes::from(vec![b' '; 64 * 1024]);
    let chunks = futures::stream::repeat(chunk).map(move |c| {
        shared.streamed.fetch_add(c.len(), Ordering::SeqCst);
        Ok::<_, std::convert::Infallible>(c)
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, axum::body::Body::from_stream(chunks)).into_response()
}

fn respond(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, reply.body).into_response();
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    for (name, value) in &reply.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    response
}
