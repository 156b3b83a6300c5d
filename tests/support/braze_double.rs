//! An in-process stand-in for Braze's user data REST API, with an in-memory profile store.
//!
//! Reproduced from the published contract:
//! - <https://www.braze.com/docs/api/endpoints/user_data/post_user_track/>: `POST /users/track`
//!   with `Authorization: Bearer <REST API key>` and `{"attributes":[…]}`, at most 75 attribute
//!   objects per request, or 50 in a workspace on "Monthly Active Users - CY 24-25" pricing
//!   ([`BrazeDouble::mau_pricing`]; "Monthly Active Users CY 24-25" on that page); more is
//!   refused with `400 {"message":"Max Input Length Exceeded"}`
//!   (<https://www.braze.com/docs/api/errors/>); each object names its profile by
//!   `external_id` and creates it or updates it (attributes merge into the profile, a nested
//!   object replaces the stored one whole, as without `_merge_objects`); with
//!   `"_update_existing_only": true` an unknown profile is skipped, not created; `201
//!   {"message":"success","attributes_processed":n}`. Same page, FAQ "How does `/users/track`
//!   handle invalid nested custom attributes?": when any object's nested custom attribute
//!   (an object, or an array of objects) holds a null at any depth, every nested custom
//!   attribute update of the request is dropped, from every object, and the answer is still
//!   `201 success` ([`BrazeDouble::dropped_nested_updates`] counts them). An object whose
//!   `external_id` [`BrazeDouble::block`] names is dropped with the minor error `provided
//!   external_id is blacklisted and disallowed` (the message the same page quotes); Braze does
//!   not document whether it carries an `index`, and the double gives none.
//! - <https://www.braze.com/docs/api/errors/>: a request with some invalid objects is still a
//!   success, `{"message":"success","errors":[{"type":…,"input_array":"attributes",
//!   "index":i}]}`, and the valid objects land; when none is valid Braze answers `400` with
//!   `"Valid data must be provided in the 'attributes', 'events', or 'purchases' fields."`
//!   and the same indexed errors (an empty body gets that message alone); `401` for a missing
//!   or wrong key.
//! - <https://www.braze.com/docs/api/endpoints/user_data/post_user_delete/>: `POST
//!   /users/delete` with `{"external_ids":[…]}`, at most 50 ids (more is refused with `400`);
//!   unknown ids are ignored; `201 {"message":"success","deleted":n}`.
//! - <https://www.braze.com/docs/api/api_limits/>: `429` with `X-RateLimit-Limit`,
//!   `X-RateLimit-Remaining` and `X-RateLimit-Reset` (epoch seconds).
//!
//! An `email` attribute must hold an `@`; an attribute object without `external_id` is
//! invalid. With [`BrazeDouble::whole_batch_400`] a request with any invalid object is refused
//! whole with a `400` that names no index.
//!
//! Not reproduced: events, purchases, user aliases and `braze_id`, API key permissions (any
//! request with the right key passes), Braze's attribute type rules and reserved attribute
//! names beyond `email`, nested attribute operations (`$add`, `$remove`, …), asynchronous
//! processing (profiles change before the answer), real request-rate throttling (429 and 5xx
//! are scripted by request count), and the exact wording of Braze's messages.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Most attribute objects per `/users/track` request.
pub const MAX_ATTRIBUTES: usize = 75;
/// Most external ids per `/users/delete` request.
pub const MAX_DELETE_IDS: usize = 50;
/// Braze's message when no object of a request is valid.
pub const NO_VALID_DATA: &str =
    "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.";

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct BrazeRequest {
    /// Path, like `/users/track`.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

impl BrazeRequest {
    /// How many attribute objects or external ids the body carried.
    pub fn items(&self) -> usize {
        self.body["attributes"]
            .as_array()
            .or_else(|| self.body["external_ids"].as_array())
            .map_or(0, Vec::len)
    }
}

#[derive(Default)]
struct Script {
    blocked: Vec<String>,
    max_attributes: Option<usize>,
    dropped_nested: usize,
    throttle: usize,
    reset_in_secs: u64,
    fail: usize,
    fail_status: u16,
}

struct Shared {
    api_key: String,
    whole_batch_400: bool,
    script: Mutex<Script>,
    users: Mutex<BTreeMap<String, Map<String, Value>>>,
    log: Mutex<Vec<BrazeRequest>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; the server stops when it is dropped.
pub struct BrazeDouble {
    /// Base URL, like `http://127.0.0.1:41234` (the Destination's `baseUrl`).
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl BrazeDouble {
    /// Starts a double accepting `Bearer <api_key>`.
    pub async fn start(api_key: &str) -> BrazeDouble {
        Self::start_with(api_key, false).await
    }

    /// Starts a double that refuses a whole `/users/track` request, naming no index, when one
    /// of its objects is invalid.
    pub async fn whole_batch_400(api_key: &str) -> BrazeDouble {
        Self::start_with(api_key, true).await
    }

    async fn start_with(api_key: &str, whole_batch_400: bool) -> BrazeDouble {
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            whole_batch_400,
            script: Mutex::new(Script::default()),
            users: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/users/track", post(track))
            .route("/users/delete", post(delete))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Braze double to 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the Braze double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        BrazeDouble {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// Takes at most 50 objects per `/users/track` request, as workspaces on Braze's "Monthly
    /// Active Users - CY 24-25" pricing do.
    pub fn mau_pricing(&self) {
        lock(&self.shared.script).max_attributes = Some(50);
    }

    /// Drops objects with this `external_id` as a blocked ("dummy") user, with an error that
    /// names no index.
    pub fn block(&self, external_id: &str) {
        lock(&self.shared.script).blocked.push(external_id.to_owned());
    }

    /// How many nested custom attribute updates were dropped because a request held a null
    /// inside a nested attribute.
    pub fn dropped_nested_updates(&self) -> usize {
        lock(&self.shared.script).dropped_nested
    }

    /// The next `times` requests get `429` with Braze's rate-limit headers, the window
    /// resetting `reset_in_secs` from now.
    pub fn throttle_next(&self, times: usize, reset_in_secs: u64) {
        let mut s = lock(&self.shared.script);
        s.throttle = times;
        s.reset_in_secs = reset_in_secs;
    }

    /// The next `times` requests (after any throttled ones) get `status` (a 5xx).
    pub fn fail_next(&self, times: usize, status: u16) {
        let mut s = lock(&self.shared.script);
        s.fail = times;
        s.fail_status = status;
    }

    /// Stores a profile directly (as if created by an SDK).
    pub fn seed(&self, external_id: &str, attributes: Value) {
        let attributes = attributes.as_object().cloned().unwrap_or_default();
        lock(&self.shared.users).insert(external_id.to_owned(), attributes);
    }

    /// The profile with this `external_id`, if any.
    pub fn user(&self, external_id: &str) -> Option<Map<String, Value>> {
        lock(&self.shared.users).get(external_id).cloned()
    }

    /// How many profiles exist.
    pub fn user_count(&self) -> usize {
        lock(&self.shared.users).len()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<BrazeRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for BrazeDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Answers before the endpoint runs: a wrong key, then the script.
fn gate(shared: &Shared, headers: &HeaderMap) -> Option<(u16, Value, HeaderMap)> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(format!("Bearer {}", shared.api_key).as_str()) {
        return Some((401, json!({"message": "Invalid API key"}), HeaderMap::new()));
    }
    let mut script = lock(&shared.script);
    if script.throttle > 0 {
        script.throttle -= 1;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs();
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit", "3000".parse().expect("header"));
        h.insert("x-ratelimit-remaining", "0".parse().expect("header"));
        h.insert(
            "x-ratelimit-reset",
            (now + script.reset_in_secs).to_string().parse().expect("header"),
        );
        return Some((429, json!({"message": "Rate limit exceeded"}), h));
    }
    if script.fail > 0 {
        script.fail -= 1;
        return Some((
            script.fail_status,
            json!({"message": "Internal Server Error"}),
            HeaderMap::new(),
        ));
    }
    None
}

fn respond(status: u16, body: Value, headers: HeaderMap) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, axum::Json(body)).into_response();
    response.headers_mut().extend(headers);
    response
}

fn handle(
    shared: &Shared,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    run: impl FnOnce(&Shared, &Value) -> (u16, Value),
) -> Response {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (status, answer, extra) = match gate(shared, headers) {
        Some(early) => early,
        None => {
            let (status, answer) = run(shared, &json);
            (status, answer, HeaderMap::new())
        }
    };
    lock(&shared.log).push(BrazeRequest {
        path: path.to_owned(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: json,
        status,
    });
    respond(status, answer, extra)
}

async fn track(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(&shared, "/users/track", &headers, &body, run_track)
}

async fn delete(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(&shared, "/users/delete", &headers, &body, run_delete)
}

/// Why an attribute object is invalid, if it is.
fn invalid(object: &Value) -> Option<String> {
    let Some(fields) = object.as_object() else {
        return Some("attributes object must be an object".into());
    };
    match fields.get("external_id") {
        Some(Value::String(s)) if !s.is_empty() => {}
        _ => return Some("'external_id', 'braze_id', or 'user_alias' is required".into()),
    }
    match fields.get("email") {
        Some(Value::String(e)) if !e.contains('@') => Some(format!("'{e}' is not a valid email address")),
        _ => None,
    }
}

fn run_track(shared: &Shared, body: &Value) -> (u16, Value) {
    let Some(attributes) = body["attributes"].as_array().filter(|a| !a.is_empty()) else {
        return (400, json!({"message": NO_VALID_DATA}));
    };
    let max = lock(&shared.script).max_attributes.unwrap_or(MAX_ATTRIBUTES);
    if attributes.len() > max {
        return (400, json!({"message": "Max Input Length Exceeded"}));
    }
    let mut errors = Vec::new();
    let mut valid = Vec::new();
    for (index, object) in attributes.iter().enumerate() {
        match invalid(object) {
            Some(kind) => errors.push(json!({"type": kind, "input_array": "attributes", "index": index})),
            None => valid.push(object),
        }
    }
    if !errors.is_empty() && shared.whole_batch_400 {
        return (400, json!({"message": "Invalid attributes in the request"}));
    }
    if valid.is_empty() {
        return (400, json!({"message": NO_VALID_DATA, "errors": errors}));
    }
    // A null inside any nested attribute drops every nested update of the request.
    let poisoned = valid.iter().any(|object| {
        object
            .as_object()
            .into_iter()
            .flat_map(|fields| fields.values())
            .any(|value| is_nested(value) && holds_null(value))
    });
    let blocked = lock(&shared.script).blocked.clone();
    let mut users = lock(&shared.users);
    for object in &valid {
        if object["external_id"]
            .as_str()
            .is_some_and(|id| blocked.iter().any(|b| b == id))
        {
            errors.push(
                json!({"type": "provided external_id is blacklisted and disallowed",
                "input_array": "attributes"}),
            );
            continue;
        }
        let mut fields = object.as_object().cloned().unwrap_or_default();
        if poisoned {
            let before = fields.len();
            fields.retain(|_, value| !is_nested(value));
            lock(&shared.script).dropped_nested += before - fields.len();
        }
        let id = fields
            .remove("external_id")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let update_only = fields.remove("_update_existing_only") == Some(Value::Bool(true));
        match users.get_mut(&id) {
            Some(profile) => profile.extend(fields),
            None if update_only => {}
            None => {
                users.insert(id, fields);
            }
        }
    }
    let mut answer = json!({"message": "success", "attributes_processed": valid.len()});
    if !errors.is_empty() {
        answer["errors"] = Value::Array(errors);
    }
    (201, answer)
}

/// Whether an attribute value is a nested custom attribute: an object or an array of objects.
fn is_nested(value: &Value) -> bool {
    match value {
        Value::Object(_) => true,
        Value::Array(items) => items.iter().any(Value::is_object),
        _ => false,
    }
}

/// Whether a null sits anywhere inside a value.
fn holds_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.values().any(holds_null),
        Value::Array(items) => items.iter().any(holds_null),
        _ => false,
    }
}

fn run_delete(shared: &Shared, body: &Value) -> (u16, Value) {
    let Some(ids) = body["external_ids"].as_array() else {
        return (
            400,
            json!({"message": "external_ids, user_aliases or braze_ids is required"}),
        );
    };
    if ids.len() > MAX_DELETE_IDS {
        return (
            400,
            json!({"message": format!(
                "Too many ids: {} sent, at most {MAX_DELETE_IDS} allowed per request",
                ids.len()
            )}),
        );
    }
    let mut users = lock(&shared.users);
    let deleted = ids
        .iter()
        .filter_map(Value::as_str)
        .filter(|id| users.remove(*id).is_some())
        .count();
    (201, json!({"message": "success", "deleted": deleted}))
}
