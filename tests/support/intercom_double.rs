//! An in-process stand-in for Intercom's contacts API (version 2.11), with an in-memory store.
//!
//! Reproduced from the published contract:
//! - <https://developers.intercom.com/docs/build-an-integration/learn-more/authentication>:
//!   `Authorization: Bearer <token>`; anything else gets `401` with an `error.list` body
//!   (`unauthorized`, "Access Token Invalid").
//! - <https://developers.intercom.com/docs/references/rest-api/api.intercom.io/contacts/searchcontacts>:
//!   `POST /contacts/search` with `{"query":{"field":…,"operator":"=","value":…}}` answers
//!   `{"type":"list","data":[contacts…],"total_count":n}`.
//! - <https://developers.intercom.com/docs/references/rest-api/api.intercom.io/contacts/createcontact>:
//!   `POST /contacts` with `role` (`user` or `lead`) and one of `external_id` or `email` (a
//!   user needs one); `PUT /contacts/{id}` updates; `DELETE /contacts/{id}` answers
//!   `{"type":"contact","id":…,"deleted":true}`; an unknown id gets `404 not_found`. One
//!   contact per request: the endpoints take no arrays, and a body that is an array is refused
//!   with `400 parameter_invalid`.
//! - Errors: `400` `{"type":"error.list","errors":[{"code":"parameter_invalid",…}]}` for an
//!   email without `@` or a top-level attribute that is not a standard one (custom ones
//!   belong under `custom_attributes`); `409 conflict` ("A contact matching those details
//!   already exists with id=…") when another contact of the role has the `external_id` or
//!   `email`.
//! - <https://developers.intercom.com/docs/references/rest-api/errors/rate-limiting>: every
//!   answer carries `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`
//!   (epoch seconds); a throttled request gets `429` (`rate_limit_exceeded`) with
//!   `X-RateLimit-Remaining: 0`.
//! - `GET /me` answers the admin owning the token.
//!
//! Every request's `Intercom-Version` header is logged for the tests to check.
//!
//! Not reproduced: OAuth, workspace regions, the full search grammar (nested `AND`/`OR`,
//! other operators, pagination), custom attribute definitions and their types, companies,
//! tags, archiving, merging leads into users, real request-rate accounting (429, exhausted
//! windows and 5xx are scripted by request count), and the exact wording of every message.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Intercom's standard contact attributes accepted at the top level of a body.
pub const STANDARD: &[&str] = &[
    "role",
    "external_id",
    "email",
    "phone",
    "name",
    "avatar",
    "signed_up_at",
    "last_seen_at",
    "owner_id",
    "unsubscribed_from_emails",
    "custom_attributes",
];
/// The limit the double announces in `X-RateLimit-Limit`.
pub const LIMIT: u64 = 1666;

/// One stored contact: its Intercom id and its attributes as Intercom shows them.
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    /// Intercom's contact id.
    pub id: String,
    /// Top-level attributes (`role`, `external_id`, `email`, …) and `custom_attributes`.
    pub attributes: Map<String, Value>,
}

impl Contact {
    /// A custom attribute's value.
    pub fn custom(&self, name: &str) -> Option<&Value> {
        self.attributes.get("custom_attributes")?.get(name)
    }
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct IntercomRequest {
    /// HTTP method.
    pub method: String,
    /// Path, like `/contacts/search`.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Intercom-Version` header, if any.
    pub version: Option<String>,
    /// The body parsed as JSON (`Null` when absent or not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

#[derive(Default)]
struct Script {
    throttle: usize,
    exhaust: usize,
    reset_in_secs: u64,
    fail: usize,
    fail_status: u16,
}

struct Shared {
    token: String,
    script: Mutex<Script>,
    store: Mutex<Vec<Contact>>,
    log: Mutex<Vec<IntercomRequest>>,
    next_id: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; the server stops when it is dropped.
pub struct IntercomDouble {
    /// Base URL, like `http://127.0.0.1:41234` (the Destination's `baseUrl`).
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl IntercomDouble {
    /// Starts a double accepting `Bearer <token>`.
    pub async fn start(token: &str) -> IntercomDouble {
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            script: Mutex::new(Script::default()),
            store: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0x6500),
        });
        let router = Router::new()
            .route("/me", get(me))
            .route("/contacts", post(create))
            .route("/contacts/search", post(search))
            .route("/contacts/{id}", put(update).delete(delete))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Intercom double to 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the Intercom double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        IntercomDouble {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// The next `times` requests get `429` with `X-RateLimit-Remaining: 0` and a reset
    /// `reset_in_secs` seconds from now.
    pub fn throttle_next(&self, times: usize, reset_in_secs: u64) {
        let mut s = lock(&self.shared.script);
        s.throttle = times;
        s.reset_in_secs = reset_in_secs;
    }

    /// The next `times` requests succeed but announce `X-RateLimit-Remaining: 0` with a reset
    /// `reset_in_secs` seconds from now.
    pub fn exhaust_next(&self, times: usize, reset_in_secs: u64) {
        let mut s = lock(&self.shared.script);
        s.exhaust = times;
        s.reset_in_secs = reset_in_secs;
    }

    /// The next `times` requests (after any throttled ones) get `status` (a 5xx).
    pub fn fail_next(&self, times: usize, status: u16) {
        let mut s = lock(&self.shared.script);
        s.fail = times;
        s.fail_status = status;
    }

    /// Stores a contact directly (as if created in Intercom); returns its id.
    pub fn seed(&self, attributes: Value) -> String {
        let id = format!("{:x}", self.shared.next_id.fetch_add(1, Ordering::SeqCst));
        let attributes = attributes.as_object().cloned().unwrap_or_default();
        lock(&self.shared.store).push(Contact {
            id: id.clone(),
            attributes,
        });
        id
    }

    /// Every stored contact, in creation order.
    pub fn contacts(&self) -> Vec<Contact> {
        lock(&self.shared.store).clone()
    }

    /// The contact whose top-level `attribute` is `value`, if any.
    pub fn find(&self, attribute: &str, value: &str) -> Option<Contact> {
        let value = normalise(attribute, value);
        self.contacts()
            .into_iter()
            .find(|c| c.attributes.get(attribute).and_then(Value::as_str) == Some(value.as_str()))
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<IntercomRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for IntercomDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Intercom matches emails without regard to case.
fn normalise(attribute: &str, value: &str) -> String {
    if attribute == "email" {
        value.to_lowercase()
    } else {
        value.to_owned()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error_list(code: &str, message: &str) -> Value {
    json!({
        "type": "error.list",
        "request_id": "000000000000000000000",
        "errors": [{"code": code, "message": message}],
    })
}

fn respond(status: u16, body: Value, remaining: u64, reset: u64) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, axum::Json(body)).into_response();
    let h = response.headers_mut();
    h.insert("x-ratelimit-limit", LIMIT.into());
    h.insert("x-ratelimit-remaining", remaining.into());
    h.insert("x-ratelimit-reset", reset.into());
    response
}

/// Authenticates, plays the script, runs `endpoint`, and logs the request.
fn handle(
    shared: &Shared,
    method: Method,
    path: String,
    headers: &HeaderMap,
    body: &Bytes,
    endpoint: impl FnOnce(&Shared, &Value) -> (u16, Value),
) -> Response {
    let json: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let authorization = header("authorization");
    let (status, answer, remaining, reset) = {
        let mut script = lock(&shared.script);
        let window_reset = now_secs() + 10;
        if authorization.as_deref() != Some(format!("Bearer {}", shared.token).as_str()) {
            (
                401,
                error_list("unauthorized", "Access Token Invalid"),
                LIMIT - 1,
                window_reset,
            )
        } else if script.throttle > 0 {
            script.throttle -= 1;
            let reset = now_secs() + script.reset_in_secs;
            (
                429,
                error_list("rate_limit_exceeded", "Exceeded rate limit of 1666 in 10 seconds"),
                0,
                reset,
            )
        } else if script.fail > 0 {
            script.fail -= 1;
            (
                script.fail_status,
                error_list("server_error", "Server Error"),
                LIMIT - 1,
                window_reset,
            )
        } else {
            let (status, answer) = endpoint(shared, &json);
            if script.exhaust > 0 {
                script.exhaust -= 1;
                (status, answer, 0, now_secs() + script.reset_in_secs)
            } else {
                (status, answer, LIMIT - 1, window_reset)
            }
        }
    };
    lock(&shared.log).push(IntercomRequest {
        method: method.to_string(),
        path,
        authorization,
        version: header("intercom-version"),
        body: json,
        status,
    });
    respond(status, answer, remaining, reset)
}

fn contact_json(c: &Contact) -> Value {
    let mut v = Map::new();
    v.insert("type".into(), json!("contact"));
    v.insert("id".into(), json!(c.id));
    v.insert("workspace_id".into(), json!("ws0001"));
    for (k, value) in &c.attributes {
        v.insert(k.clone(), value.clone());
    }
    v.entry("custom_attributes").or_insert_with(|| json!({}));
    Value::Object(v)
}

async fn me(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    handle(
        &shared,
        Method::GET,
        "/me".into(),
        &headers,
        &Bytes::new(),
        |_, _| {
            (
                200,
                json!({"type": "admin", "id": "991267", "email": "admin@example.com",
            "name": "Ada Admin", "app": {"type": "app", "id_code": "abc123"}}),
            )
        },
    )
}

async fn search(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(
        &shared,
        Method::POST,
        "/contacts/search".into(),
        &headers,
        &body,
        |shared, json| {
            let query = &json["query"];
            let (Some(field), Some("="), Some(value)) = (
                query["field"].as_str(),
                query["operator"].as_str(),
                query["value"].as_str(),
            ) else {
                return (400, error_list("parameter_invalid", "Invalid query"));
            };
            let value = normalise(field, value);
            let data: Vec<Value> = lock(&shared.store)
                .iter()
                .filter(|c| {
                    c.attributes
                        .get(field)
                        .and_then(Value::as_str)
                        .map(|v| normalise(field, v))
                        == Some(value.clone())
                })
                .map(contact_json)
                .collect();
            let total = data.len();
            (
                200,
                json!({"type": "list", "data": data, "total_count": total,
            "pages": {"type": "pages", "page": 1, "per_page": 50, "total_pages": 1}}),
            )
        },
    )
}

/// Checks a create or update body: an object of standard attributes with a valid email.
fn validate(body: &Value) -> Result<Map<String, Value>, (u16, Value)> {
    let Some(object) = body.as_object() else {
        return Err((
            400,
            error_list("parameter_invalid", "Request body must be a JSON object"),
        ));
    };
    if let Some(key) = object.keys().find(|k| !STANDARD.contains(&k.as_str())) {
        return Err((
            400,
            error_list("parameter_invalid", &format!("{key} is not a valid attribute")),
        ));
    }
    let mut object = object.clone();
    if let Some(email) = object.get("email").and_then(Value::as_str) {
        if !email.contains('@') {
            return Err((400, error_list("parameter_invalid", "Invalid email address")));
        }
        let folded = email.to_lowercase();
        object.insert("email".into(), json!(folded));
    }
    Ok(object)
}

/// Another contact of `role` holding the same `external_id` or `email`.
fn duplicate(
    store: &[Contact],
    role: &str,
    attrs: &Map<String, Value>,
    except: Option<&str>,
) -> Option<String> {
    store
        .iter()
        .filter(|c| Some(c.id.as_str()) != except)
        .filter(|c| c.attributes.get("role").and_then(Value::as_str) == Some(role))
        .find(|c| {
            ["external_id", "email"]
                .iter()
                .any(|k| attrs.get(*k).is_some_and(|v| !v.is_null()) && c.attributes.get(*k) == attrs.get(*k))
        })
        .map(|c| c.id.clone())
}

fn conflict(id: &str) -> (u16, Value) {
    (
        409,
        error_list(
            "conflict",
            &format!("A contact matching those details already exists with id={id}"),
        ),
    )
}

fn merge(into: &mut Map<String, Value>, from: Map<String, Value>) {
    for (k, v) in from {
        match (k.as_str(), v) {
            ("custom_attributes", Value::Object(custom)) => {
                let entry = into.entry("custom_attributes").or_insert_with(|| json!({}));
                if let Some(existing) = entry.as_object_mut() {
                    existing.extend(custom);
                }
            }
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

async fn create(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(
        &shared,
        Method::POST,
        "/contacts".into(),
        &headers,
        &body,
        |shared, json| {
            let attrs = match validate(json) {
                Ok(a) => a,
                Err(e) => return e,
            };
            let role = attrs
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("user")
                .to_owned();
            if role != "user" && role != "lead" {
                return (400, error_list("parameter_invalid", "role must be user or lead"));
            }
            if role == "user" && !attrs.contains_key("external_id") && !attrs.contains_key("email") {
                return (
                    400,
                    error_list("parameter_not_found", "A user requires an email or external_id"),
                );
            }
            let mut store = lock(&shared.store);
            if let Some(id) = duplicate(&store, &role, &attrs, None) {
                return conflict(&id);
            }
            let mut attributes = Map::new();
            attributes.insert("role".into(), json!(role));
            merge(&mut attributes, attrs);
            let contact = Contact {
                id: format!("{:x}", shared.next_id.fetch_add(1, Ordering::SeqCst)),
                attributes,
            };
            let answer = contact_json(&contact);
            store.push(contact);
            (200, answer)
        },
    )
}

async fn update(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/contacts/{id}");
    handle(&shared, Method::PUT, path, &headers, &body, |shared, json| {
        let attrs = match validate(json) {
            Ok(a) => a,
            Err(e) => return e,
        };
        let mut store = lock(&shared.store);
        let Some(pos) = store.iter().position(|c| c.id == id) else {
            return (404, error_list("not_found", "User Not Found"));
        };
        let role = store[pos]
            .attributes
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user")
            .to_owned();
        if let Some(other) = duplicate(&store, &role, &attrs, Some(&id)) {
            return conflict(&other);
        }
        merge(&mut store[pos].attributes, attrs);
        (200, contact_json(&store[pos]))
    })
}

async fn delete(State(shared): State<Arc<Shared>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let path = format!("/contacts/{id}");
    handle(
        &shared,
        Method::DELETE,
        path,
        &headers,
        &Bytes::new(),
        |shared, _| {
            let mut store = lock(&shared.store);
            let Some(pos) = store.iter().position(|c| c.id == id) else {
                return (404, error_list("not_found", "User Not Found"));
            };
            let gone = store.remove(pos);
            (
                200,
                json!({"type": "contact", "id": gone.id,
            "external_id": gone.attributes.get("external_id").cloned().unwrap_or(Value::Null),
            "deleted": true}),
            )
        },
    )
}
