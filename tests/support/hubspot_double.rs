//! An in-process stand-in for HubSpot's CRM v3 objects API, with an in-memory store.
//!
//! Reproduced from the published contract:
//! - <https://developers.hubspot.com/docs/api/crm/contacts> ("Batch upsert", "Batch update",
//!   "Batch create", "Batch read", "Batch archive"): `POST /crm/v3/objects/{object}/batch/
//!   {upsert,update,create,read,archive}` with `{"inputs":[…]}`, at most 100 inputs per call
//!   (more is refused with `400 VALIDATION_ERROR`); `idProperty` names a unique property
//!   (upsert creates a record when no record has that value and updates it otherwise; update
//!   and read answer `OBJECT_NOT_FOUND` for unknown values); archive answers `204`; listing is
//!   `GET /crm/v3/objects/{object}?limit=N`.
//! - <https://developers.hubspot.com/docs/api/error-handling>: `207` multi-status bodies
//!   `{"status":"COMPLETE","results":[…],"numErrors":n,"errors":[{"status":"error",
//!   "category":…,"message":…,"context":{"ids":[…]}}]}`, `401 INVALID_AUTHENTICATION`,
//!   `409 CONFLICT` for a create whose unique value exists.
//! - <https://developers.hubspot.com/docs/api/usage-details>: `429` with
//!   `X-HubSpot-RateLimit-Interval-Milliseconds`, `-Max` and `-Remaining` headers.
//!
//! With [`HubspotDouble::define_properties`], an object type has only the properties named: a
//! batch write naming another is refused whole with `400 VALIDATION_ERROR` and the message
//! HubSpot gives, `Property values were not valid: [{"isValid":false,"message":"Property
//! \"x\" does not exist","error":"PROPERTY_DOESNT_EXIST","name":"x",…}]`
//! (<https://developers.hubspot.com/docs/api/error-handling>; a property must be created
//! before it is written, <https://developers.hubspot.com/docs/api/crm/properties>).
//!
//! Contacts' `email` must hold an `@`: an upsert or update with a bad one gets a per-record
//! `VALIDATION_ERROR` in a `207` (or, with [`HubspotDouble::whole_batch_400`], the whole batch
//! is refused with `400 INVALID_EMAIL`); a create with one is refused whole with `400`.
//! Emails are stored and matched in lower case, as HubSpot does.
//!
//! Not reproduced: OAuth and scopes (any request without `Bearer <token>` gets 401), property
//! definitions and types (every property is accepted as a string), associations, search,
//! merges and secondary emails, `hs_object_id` as an `idProperty`, real request-rate
//! throttling (429 and 5xx are scripted by request count), daily limits, pagination beyond the
//! first page, and the exact wording of HubSpot's messages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Most inputs HubSpot accepts per batch call.
pub const MAX_INPUTS: usize = 100;

/// One stored CRM record.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredObject {
    /// HubSpot's object id (`hs_object_id`).
    pub id: String,
    /// Property values, all strings.
    pub properties: BTreeMap<String, String>,
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct HubspotRequest {
    /// HTTP method.
    pub method: String,
    /// Path, like `/crm/v3/objects/contacts/batch/upsert`.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

impl HubspotRequest {
    /// How many inputs the body carried.
    pub fn inputs(&self) -> usize {
        self.body["inputs"].as_array().map_or(0, Vec::len)
    }

    /// The batch action (`upsert`, `read`, …), or `""` for other paths.
    pub fn action(&self) -> &str {
        self.path.rsplit_once("/batch/").map_or("", |(_, a)| a)
    }
}

#[derive(Default)]
struct Script {
    throttle: usize,
    throttle_interval_ms: u64,
    fail: usize,
    fail_status: u16,
}

struct Shared {
    token: String,
    whole_batch_400: bool,
    properties: Mutex<BTreeMap<String, Vec<String>>>,
    script: Mutex<Script>,
    store: Mutex<BTreeMap<String, Vec<StoredObject>>>,
    log: Mutex<Vec<HubspotRequest>>,
    next_id: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; the server stops when it is dropped.
pub struct HubspotDouble {
    /// Base URL, like `http://127.0.0.1:41234` (the Destination's `baseUrl`).
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl HubspotDouble {
    /// Starts a double accepting `Bearer <token>`.
    pub async fn start(token: &str) -> HubspotDouble {
        Self::start_with(token, false).await
    }

    /// Starts a double that refuses a whole upsert or update batch with `400 INVALID_EMAIL`
    /// when one of its contacts has a bad email, instead of a per-record error.
    pub async fn whole_batch_400(token: &str) -> HubspotDouble {
        Self::start_with(token, true).await
    }

    async fn start_with(token: &str, whole_batch_400: bool) -> HubspotDouble {
        let shared = Arc::new(Shared {
            token: token.to_owned(),
            whole_batch_400,
            properties: Mutex::new(BTreeMap::new()),
            script: Mutex::new(Script::default()),
            store: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(1001),
        });
        let router = Router::new()
            .route("/crm/v3/objects/{object}", get(list))
            .route("/crm/v3/objects/{object}/batch/{action}", post(batch))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the HubSpot double to 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the HubSpot double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        HubspotDouble {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// Gives `object` only the properties named (besides `hs_object_id`): writing another is
    /// refused with `PROPERTY_DOESNT_EXIST`.
    pub fn define_properties(&self, object: &str, names: &[&str]) {
        lock(&self.shared.properties)
            .insert(object.to_owned(), names.iter().map(|n| (*n).to_owned()).collect());
    }

    /// The next `times` requests get `429` with HubSpot's rate-limit headers, the window being
    /// `interval_ms` long, and no `Retry-After`.
    pub fn throttle_next(&self, times: usize, interval_ms: u64) {
        let mut s = lock(&self.shared.script);
        s.throttle = times;
        s.throttle_interval_ms = interval_ms;
    }

    /// The next `times` requests (after any throttled ones) get `status` (a 5xx).
    pub fn fail_next(&self, times: usize, status: u16) {
        let mut s = lock(&self.shared.script);
        s.fail = times;
        s.fail_status = status;
    }

    /// Stores a record directly (as if created in HubSpot's UI); returns its id.
    pub fn seed(&self, object: &str, properties: &[(&str, &str)]) -> String {
        let id = self.shared.next_id.fetch_add(1, Ordering::SeqCst).to_string();
        let properties = properties
            .iter()
            .map(|(k, v)| ((*k).to_owned(), normalise(k, v)))
            .collect();
        lock(&self.shared.store)
            .entry(object.to_owned())
            .or_default()
            .push(StoredObject {
                id: id.clone(),
                properties,
            });
        id
    }

    /// The records of an object type, in creation order.
    pub fn objects(&self, object: &str) -> Vec<StoredObject> {
        lock(&self.shared.store).get(object).cloned().unwrap_or_default()
    }

    /// The record whose `property` is `value`, if any.
    pub fn find(&self, object: &str, property: &str, value: &str) -> Option<StoredObject> {
        let value = normalise(property, value);
        self.objects(object)
            .into_iter()
            .find(|o| o.properties.get(property) == Some(&value))
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<HubspotRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for HubspotDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn normalise(property: &str, value: &str) -> String {
    if property == "email" {
        value.to_lowercase()
    } else {
        value.to_owned()
    }
}

fn reply(status: u16, body: Value) -> (u16, Value) {
    (status, body)
}

fn error_body(category: &str, message: &str) -> Value {
    json!({
        "status": "error",
        "message": message,
        "correlationId": "00000000-0000-0000-0000-000000000000",
        "category": category,
    })
}

/// Answers before the endpoint runs: a wrong token, then the script.
fn gate(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(format!("Bearer {}", shared.token).as_str()) {
        let body = error_body(
            "INVALID_AUTHENTICATION",
            "Authentication credentials not found. This API supports OAuth 2.0 authentication.",
        );
        return Some((StatusCode::UNAUTHORIZED, axum::Json(body)).into_response());
    }
    let mut script = lock(&shared.script);
    if script.throttle > 0 {
        script.throttle -= 1;
        let body = json!({
            "status": "error",
            "message": "You have reached your secondly limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": "00000000-0000-0000-0000-000000000000",
            "policyName": "SECONDLY",
        });
        let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
        let h = response.headers_mut();
        h.insert("x-hubspot-ratelimit-max", "100".parse().expect("header"));
        h.insert("x-hubspot-ratelimit-remaining", "0".parse().expect("header"));
        h.insert(
            "x-hubspot-ratelimit-interval-milliseconds",
            script.throttle_interval_ms.to_string().parse().expect("header"),
        );
        return Some(response);
    }
    if script.fail > 0 {
        script.fail -= 1;
        let status = StatusCode::from_u16(script.fail_status).unwrap_or(StatusCode::BAD_GATEWAY);
        let body = error_body("INTERNAL_ERROR", "internal error");
        return Some((status, axum::Json(body)).into_response());
    }
    None
}

fn record(shared: &Shared, method: &str, path: String, headers: &HeaderMap, body: Value, status: u16) {
    lock(&shared.log).push(HubspotRequest {
        method: method.to_owned(),
        path,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        status,
    });
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Path(object): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/crm/v3/objects/{object}");
    if let Some(early) = gate(&shared, &headers) {
        record(
            &shared,
            "GET",
            path,
            &headers,
            Value::Null,
            early.status().as_u16(),
        );
        return early;
    }
    let known = matches!(
        object.as_str(),
        "contacts" | "companies" | "deals" | "tickets" | "products" | "line_items"
    ) || object.split_once('-').is_some_and(|(a, b)| {
        !a.is_empty() && !b.is_empty() && (a.to_owned() + b).chars().all(|c| c.is_ascii_digit())
    });
    let (status, body) = if known {
        let limit = query.get("limit").and_then(|l| l.parse().ok()).unwrap_or(10);
        let results: Vec<Value> = lock(&shared.store)
            .get(&object)
            .into_iter()
            .flatten()
            .take(limit)
            .map(|o| object_json(o, None))
            .collect();
        reply(200, json!({ "results": results }))
    } else {
        reply(
            404,
            error_body(
                "OBJECT_NOT_FOUND",
                &format!("Unable to infer object type from: {object}"),
            ),
        )
    };
    record(&shared, "GET", path, &headers, Value::Null, status);
    respond(status, body)
}

fn respond(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == 204 {
        return code.into_response();
    }
    (code, axum::Json(body)).into_response()
}

fn object_json(o: &StoredObject, new: Option<bool>) -> Value {
    let mut properties: Map<String, Value> = o
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    properties.insert("hs_object_id".into(), Value::String(o.id.clone()));
    let mut v = json!({
        "id": o.id,
        "properties": properties,
        "createdAt": "2026-01-01T00:00:00.000Z",
        "updatedAt": "2026-01-01T00:00:00.000Z",
        "archived": false,
    });
    if let Some(new) = new {
        v["new"] = json!(new);
    }
    v
}

async fn batch(
    State(shared): State<Arc<Shared>>,
    Path((object, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/crm/v3/objects/{object}/batch/{action}");
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(early) = gate(&shared, &headers) {
        record(&shared, "POST", path, &headers, json, early.status().as_u16());
        return early;
    }
    let (status, answer) = run_batch(&shared, &object, &action, &json);
    record(&shared, "POST", path, &headers, json, status);
    respond(status, answer)
}

/// Strings of a `properties` object.
fn properties_of(input: &Value) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for (k, v) in input["properties"].as_object().into_iter().flatten() {
        match v {
            Value::String(s) => {
                out.insert(k.clone(), normalise(k, s));
            }
            other => return Err(format!("Property {k:?} must be a string, got {other}")),
        }
    }
    Ok(out)
}

fn bad_email(object: &str, properties: &BTreeMap<String, String>) -> Option<String> {
    let email = properties.get("email")?;
    (object == "contacts" && !email.contains('@')).then(|| format!("Email address {email} is invalid"))
}

fn run_batch(shared: &Shared, object: &str, action: &str, body: &Value) -> (u16, Value) {
    let Some(inputs) = body["inputs"].as_array() else {
        return reply(
            400,
            error_body("VALIDATION_ERROR", "Invalid input JSON: inputs is required"),
        );
    };
    if inputs.len() > MAX_INPUTS {
        return reply(
            400,
            error_body(
                "VALIDATION_ERROR",
                &format!(
                    "Batch input size {} exceeds the limit of {MAX_INPUTS}",
                    inputs.len()
                ),
            ),
        );
    }
    if matches!(action, "upsert" | "update" | "create")
        && let Some(defined) = lock(&shared.properties).get(object)
    {
        let unknown: Vec<String> = inputs
            .iter()
            .flat_map(|i| i["properties"].as_object().into_iter().flatten())
            .map(|(k, _)| k.clone())
            .filter(|k| k != "hs_object_id" && !defined.contains(k))
            .collect();
        if let Some(name) = unknown.first() {
            let message = format!(
                "Property values were not valid: [{{\"isValid\":false,\"message\":\"Property \\\"{name}\\\" does not exist\",\"error\":\"PROPERTY_DOESNT_EXIST\",\"name\":\"{name}\",\"localizedErrorMessage\":\"Property \\\"{name}\\\" does not exist\",\"portalId\":12345}}]"
            );
            return reply(400, error_body("VALIDATION_ERROR", &message));
        }
    }
    let mut store = lock(&shared.store);
    let records = store.entry(object.to_owned()).or_default();
    let mut results = Vec::new();
    let mut errors = Vec::new();
    let id_property_of = |input: &Value| {
        input["idProperty"]
            .as_str()
            .or_else(|| body["idProperty"].as_str())
            .map(str::to_owned)
    };
    match action {
        "upsert" | "update" => {
            // Validate first: a whole-batch 400 writes nothing.
            let mut parsed = Vec::new();
            for input in inputs {
                let Some(id_property) = id_property_of(input) else {
                    return reply(400, error_body("VALIDATION_ERROR", "idProperty is required"));
                };
                let id = normalise(&id_property, input["id"].as_str().unwrap_or_default());
                let mut properties = match properties_of(input) {
                    Ok(p) => p,
                    Err(e) => return reply(400, error_body("VALIDATION_ERROR", &e)),
                };
                let mut check = properties.clone();
                check.insert(id_property.clone(), id.clone());
                if let Some(message) = bad_email(object, &check) {
                    if shared.whole_batch_400 {
                        let message = format!(
                            "Property values were not valid: [{{\"isValid\":false,\"message\":\"{message}\",\"error\":\"INVALID_EMAIL\",\"name\":\"email\"}}]"
                        );
                        return reply(400, error_body("VALIDATION_ERROR", &message));
                    }
                    errors.push(json!({"status": "error", "category": "VALIDATION_ERROR",
                        "message": message, "context": {"ids": [id]}}));
                    continue;
                }
                properties.remove("hs_object_id");
                parsed.push((id_property, id, properties));
            }
            for (id_property, id, properties) in parsed {
                let existing = records
                    .iter_mut()
                    .find(|o| o.properties.get(&id_property) == Some(&id));
                match existing {
                    Some(o) => {
                        o.properties.extend(properties);
                        results.push(object_json(o, Some(false)));
                    }
                    None if action == "upsert" => {
                        let mut o = StoredObject {
                            id: shared.next_id.fetch_add(1, Ordering::SeqCst).to_string(),
                            properties,
                        };
                        o.properties.insert(id_property.clone(), id.clone());
                        results.push(object_json(&o, Some(true)));
                        records.push(o);
                    }
                    None => errors.push(json!({"status": "error", "category": "OBJECT_NOT_FOUND",
                        "message": format!("Could not find a record with {id_property}={id}"),
                        "context": {"ids": [id]}})),
                }
            }
        }
        "create" => {
            let mut parsed = Vec::new();
            for input in inputs {
                let properties = match properties_of(input) {
                    Ok(p) => p,
                    Err(e) => return reply(400, error_body("VALIDATION_ERROR", &e)),
                };
                if let Some(message) = bad_email(object, &properties) {
                    return reply(400, error_body("VALIDATION_ERROR", &message));
                }
                if let Some(email) = properties.get("email")
                    && let Some(o) = records.iter().find(|o| o.properties.get("email") == Some(email))
                {
                    return reply(
                        409,
                        error_body(
                            "CONFLICT",
                            &format!("Contact already exists. Existing ID: {}", o.id),
                        ),
                    );
                }
                parsed.push(properties);
            }
            for properties in parsed {
                let o = StoredObject {
                    id: shared.next_id.fetch_add(1, Ordering::SeqCst).to_string(),
                    properties,
                };
                results.push(object_json(&o, None));
                records.push(o);
            }
            return reply(201, json!({"status": "COMPLETE", "results": results}));
        }
        "read" => {
            let id_property = body["idProperty"].as_str().unwrap_or("hs_object_id");
            for input in inputs {
                let id = normalise(id_property, input["id"].as_str().unwrap_or_default());
                let hit = records.iter().find(|o| {
                    if id_property == "hs_object_id" {
                        o.id == id
                    } else {
                        o.properties.get(id_property) == Some(&id)
                    }
                });
                match hit {
                    Some(o) => results.push(object_json(o, None)),
                    None => errors.push(json!({"status": "error", "category": "OBJECT_NOT_FOUND",
                        "message": "Could not get some CONTACT objects, they may be deleted or not exist. Check that ids are valid.",
                        "context": {"ids": [id]}})),
                }
            }
        }
        "archive" => {
            for input in inputs {
                let id = input["id"].as_str().unwrap_or_default();
                records.retain(|o| o.id != id);
            }
            return reply(204, Value::Null);
        }
        _ => return reply(404, error_body("NOT_FOUND", "unknown batch action")),
    }
    let status = if errors.is_empty() { 200 } else { 207 };
    let mut answer = json!({"status": "COMPLETE", "results": results});
    if !errors.is_empty() {
        answer["numErrors"] = json!(errors.len());
        answer["errors"] = Value::Array(errors);
    }
    reply(status, answer)
}
