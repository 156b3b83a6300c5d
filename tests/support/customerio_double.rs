//! An in-process stand-in for Customer.io's Track API v1, with an in-memory store of people.
//!
//! Reproduced from the published contract:
//! - <https://customer.io/docs/api/track/#section/Authentication>: HTTP Basic with the Site ID
//!   as user name and the Track API key as password; anything else gets `401`
//!   `{"meta":{"error":"Unauthorized request"}}`.
//! - <https://customer.io/docs/api/track/#operation/identify>: `PUT /api/v1/customers/
//!   {identifier}` with a JSON object of attributes creates the person or updates its
//!   attributes (`200 {}`); an attribute set to `""` is removed. The identifier is an `id`, or an
//!   email when it holds an `@` (the workspace setting "identify by email"), or `cio_…`.
//! - <https://customer.io/docs/api/track/#operation/delete>: `DELETE /api/v1/customers/
//!   {identifier}` answers `200 {}`; the double answers `404` for a person it does not have, the
//!   harsher of the two answers a client must accept.
//! - <https://customer.io/docs/api/track/#operation/getRegion>: `GET /api/v1/accounts/region`
//!   answers `{"url", "data_center", "environment_id", "region"}`.
//! - <https://customer.io/docs/api/track/#section/Limits>: identifiers of at most 150 bytes,
//!   attribute names of at most 150 bytes, values of at most 1000 bytes, at most 300
//!   attributes per request, bodies of at most 32 KB: a request over one is refused with `400`
//!   `{"meta":{"error":…}}` (`413` for the body size) and changes nothing. `429` (the fair-use
//!   limit of about 100 requests per second) is answered on a scripted count, with
//!   `Retry-After` when the script gives one; `5xx` likewise.
//!
//! Not reproduced: the v2 `/api/v2/batch` and `/api/v2/entity` endpoints, events, devices,
//! segments, suppression, merges, the real request rate (throttling is scripted by count),
//! regions (any host answers, and the region reported is the one the double was given), the
//! workspace's identifier settings (email-looking identifiers are always taken as emails), and
//! the exact wording of Customer.io's error messages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Longest identifier, attribute name, in bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 150;
/// Longest attribute value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1000;
/// Most attributes per request.
pub const MAX_ATTRIBUTES: usize = 300;
/// Largest body, in bytes.
pub const MAX_BODY_BYTES: usize = 32 * 1024;

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct CustomerioRequest {
    /// HTTP method.
    pub method: String,
    /// Path as sent (percent-encoded).
    pub path: String,
    /// The identifier, decoded (empty for other paths).
    pub identifier: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

#[derive(Default)]
struct Script {
    throttle: usize,
    retry_after: Option<u64>,
    fail: usize,
    fail_status: u16,
}

struct Shared {
    authorization: String,
    region: String,
    script: Mutex<Script>,
    people: Mutex<BTreeMap<String, Map<String, Value>>>,
    log: Mutex<Vec<CustomerioRequest>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; the server stops when it is dropped.
pub struct CustomerioDouble {
    /// Base URL, like `http://127.0.0.1:41234` (the Destination's `baseUrl`).
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl CustomerioDouble {
    /// Starts a double of a US workspace accepting these credentials.
    pub async fn start(site_id: &str, api_key: &str) -> CustomerioDouble {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("{site_id}:{api_key}"));
        let shared = Arc::new(Shared {
            authorization: format!("Basic {basic}"),
            region: "us".to_owned(),
            script: Mutex::new(Script::default()),
            people: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/api/v1/accounts/region", get(region))
            .route("/api/v1/customers/{identifier}", put(person).delete(person))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Customer.io double to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("read the Customer.io double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        CustomerioDouble {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// The next `times` requests get `429`, with `Retry-After: <seconds>` when given.
    pub fn throttle_next(&self, times: usize, retry_after: Option<u64>) {
        let mut s = lock(&self.shared.script);
        s.throttle = times;
        s.retry_after = retry_after;
    }

    /// The next `times` requests (after any throttled ones) get `status` (a 5xx).
    pub fn fail_next(&self, times: usize, status: u16) {
        let mut s = lock(&self.shared.script);
        s.fail = times;
        s.fail_status = status;
    }

    /// Stores a person directly (as if created in Customer.io's UI).
    pub fn seed(&self, identifier: &str, attributes: Value) {
        let attributes = attributes.as_object().cloned().unwrap_or_default();
        lock(&self.shared.people).insert(identifier.to_owned(), attributes);
    }

    /// The attributes of the person under `identifier`, if any.
    pub fn person(&self, identifier: &str) -> Option<Map<String, Value>> {
        lock(&self.shared.people).get(identifier).cloned()
    }

    /// Every person's identifier.
    pub fn identifiers(&self) -> Vec<String> {
        lock(&self.shared.people).keys().cloned().collect()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<CustomerioRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for CustomerioDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn error(status: u16, message: &str) -> (u16, Value) {
    (status, json!({"meta": {"error": message}}))
}

fn respond((status, body): (u16, Value), retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, axum::Json(body)).into_response();
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", seconds.to_string().parse().expect("header"));
    }
    response
}

/// Answers before the endpoint runs: wrong credentials, then the script.
fn gate(shared: &Shared, headers: &HeaderMap) -> Option<((u16, Value), Option<u64>)> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(shared.authorization.as_str()) {
        return Some((error(401, "Unauthorized request"), None));
    }
    let mut script = lock(&shared.script);
    if script.throttle > 0 {
        script.throttle -= 1;
        return Some((
            error(429, "Too many requests, please slow down"),
            script.retry_after,
        ));
    }
    if script.fail > 0 {
        script.fail -= 1;
        return Some((error(script.fail_status, "internal server error"), None));
    }
    None
}

fn log(
    shared: &Shared,
    method: &Method,
    path: String,
    identifier: String,
    headers: &HeaderMap,
    body: Value,
    status: u16,
) {
    lock(&shared.log).push(CustomerioRequest {
        method: method.to_string(),
        path,
        identifier,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        status,
    });
}

async fn region(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let (answer, retry_after) = gate(&shared, &headers).unwrap_or_else(|| {
        (
            (
                200,
                json!({"url": "https://track.customer.io", "data_center": shared.region,
                    "environment_id": 1, "region": shared.region}),
            ),
            None,
        )
    });
    log(
        &shared,
        &Method::GET,
        "/api/v1/accounts/region".into(),
        String::new(),
        &headers,
        Value::Null,
        answer.0,
    );
    respond(answer, retry_after)
}

async fn person(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Path(identifier): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (answer, retry_after) = match gate(&shared, &headers) {
        Some(early) => early,
        None if method == Method::DELETE => (delete(&shared, &identifier), None),
        None => (identify(&shared, &identifier, body.len(), &json), None),
    };
    log(&shared, &method, path, identifier, &headers, json, answer.0);
    respond(answer, retry_after)
}

fn identify(shared: &Shared, identifier: &str, size: usize, body: &Value) -> (u16, Value) {
    if size > MAX_BODY_BYTES {
        return error(413, "request body too large");
    }
    if identifier.is_empty() || identifier.len() > MAX_IDENTIFIER_BYTES {
        return error(400, "identifier must be between 1 and 150 bytes");
    }
    let Some(attributes) = body.as_object() else {
        return error(400, "request body must be a JSON object");
    };
    if attributes.len() > MAX_ATTRIBUTES {
        return error(400, "too many attributes: at most 300 per request");
    }
    for (name, value) in attributes {
        if name.len() > MAX_IDENTIFIER_BYTES {
            return error(400, &format!("attribute name {name:?} is longer than 150 bytes"));
        }
        let size = match value {
            Value::String(s) => s.len(),
            other => other.to_string().len(),
        };
        if size > MAX_VALUE_BYTES {
            return error(
                400,
                &format!("attribute {name:?} value is longer than 1000 bytes"),
            );
        }
    }
    let mut people = lock(&shared.people);
    let person = people.entry(identifier.to_owned()).or_default();
    if identifier.contains('@') && !attributes.contains_key("email") {
        person.insert("email".into(), Value::String(identifier.to_owned()));
    }
    for (name, value) in attributes {
        if value.as_str() == Some("") {
            person.remove(name);
        } else {
            person.insert(name.clone(), value.clone());
        }
    }
    (200, json!({}))
}

fn delete(shared: &Shared, identifier: &str) -> (u16, Value) {
    match lock(&shared.people).remove(identifier) {
        Some(_) => (200, json!({})),
        None => error(404, "customer not found"),
    }
}
