//! An in-process stand-in for Zendesk Support's users and organizations bulk API, with its
//! asynchronous jobs and an in-memory store.
//!
//! Reproduced from the published contract:
//! - <https://developer.zendesk.com/api-reference/introduction/security-and-auth/>: API-token
//!   auth, `Authorization: Basic base64("{email}/token:{api_token}")`; anything else gets
//!   `401 {"error":"Couldn't authenticate you"}`.
//! - <https://developer.zendesk.com/api-reference/ticketing/users/users/#create-or-update-many-users>
//!   and the organizations equivalent: `POST /api/v2/{users,organizations}/create_or_update_many`
//!   with `{"users":[…]}` / `{"organizations":[…]}`, at most 100 objects (more is refused with
//!   `400`); users are matched on `external_id`, else `email` (case-insensitive),
//!   organizations on `external_id`, else `name`; the answer is `200 {"job_status":{"id","url",
//!   "status":"queued",…}}` and nothing is written yet.
//! - <https://developer.zendesk.com/api-reference/ticketing/ticket-management/job_statuses/>:
//!   `GET /api/v2/job_statuses/{id}.json`; a job moves `queued` → `working` → `completed` over
//!   successive polls and does its writes when it completes; `results` hold one entry per
//!   object: `{"index":i,"id":…,"status":"Created"|"Updated"}` or
//!   `{"index":i,"status":"Failed","error":"EmailNotValid","details":…}` for a user whose email
//!   has no `@`.
//! - <https://developer.zendesk.com/api-reference/ticketing/users/users/#bulk-delete-users>:
//!   `DELETE /api/v2/{users,organizations}/destroy_many?external_ids=a,b` (at most 100), also a
//!   job; its results say `Deleted`, or `Failed` with `RecordNotFound` for an unknown id.
//! - `GET /api/v2/users/me.json` answers the token's agent.
//! - <https://developer.zendesk.com/api-reference/introduction/rate-limits/>: `429` with
//!   `Retry-After` (seconds), `X-Rate-Limit` and `X-Rate-Limit-Remaining` on a scripted count
//!   ([`ZendeskDouble::throttle_next`]; [`ZendeskDouble::throttle_polls`] throttles job polls
//!   only); 5xx on a scripted count; [`ZendeskDouble::hold_jobs`] keeps jobs `working`.
//! - With [`ZendeskDouble::whole_request_422`], a bad email refuses the whole call
//!   synchronously with `422 {"error":"RecordInvalid","description":…,"details":…}`.
//!
//! Not reproduced: OAuth and password auth, roles and permissions (any valid token may do
//! anything), user identities, secondary emails and merges, user and organization field
//! definitions (any `user_fields` key is accepted), soft-deleted users' later purge (a deleted
//! record is removed), `ids=` on destroy_many, the job's `progress`/`total` counters beyond a
//! plain count, job expiry, real request-rate throttling (429 and 5xx are scripted by request
//! count), and the exact wording of Zendesk's messages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Most objects Zendesk accepts per bulk call.
pub const MAX_OBJECTS: usize = 100;

/// One stored user or organization.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// Zendesk's numeric id.
    pub id: u64,
    /// Its attributes as last written (`user_fields` merged key by key).
    pub attributes: Map<String, Value>,
}

impl StoredRecord {
    /// An attribute as text (strings without quotes), or `""`.
    pub fn text(&self, name: &str) -> String {
        match self.attributes.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    }
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct ZendeskRequest {
    /// HTTP method.
    pub method: String,
    /// Path, like `/api/v2/users/create_or_update_many`.
    pub path: String,
    /// Query string, if any.
    pub query: BTreeMap<String, String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

impl ZendeskRequest {
    /// How many objects a bulk write carried.
    pub fn objects(&self) -> usize {
        ["users", "organizations"]
            .iter()
            .filter_map(|k| self.body[*k].as_array())
            .map(Vec::len)
            .sum()
    }

    /// True for a job status poll.
    pub fn is_poll(&self) -> bool {
        self.path.starts_with("/api/v2/job_statuses/")
    }
}

#[derive(Debug, Clone)]
enum Work {
    Upsert {
        object: String,
        items: Vec<Value>,
    },
    Destroy {
        object: String,
        external_ids: Vec<String>,
    },
}

#[derive(Debug, Clone)]
struct JobEntry {
    polls: usize,
    work: Work,
    results: Option<Vec<Value>>,
}

#[derive(Default)]
struct Script {
    throttle: usize,
    retry_after_secs: u64,
    fail: usize,
    fail_status: u16,
    throttle_polls: usize,
}

struct Shared {
    authorization: String,
    hold_jobs: std::sync::atomic::AtomicBool,
    whole_request_422: bool,
    script: Mutex<Script>,
    store: Mutex<BTreeMap<String, Vec<StoredRecord>>>,
    jobs: Mutex<BTreeMap<String, JobEntry>>,
    log: Mutex<Vec<ZendeskRequest>>,
    next_id: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; the server stops when it is dropped.
pub struct ZendeskDouble {
    /// Base URL, like `http://127.0.0.1:41234` (the Destination's `baseUrl`).
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ZendeskDouble {
    /// Starts a double accepting the API token `token` of the agent `email`.
    pub async fn start(email: &str, token: &str) -> ZendeskDouble {
        Self::start_with(email, token, false).await
    }

    /// Starts a double that refuses a whole bulk call with `422` when one of its users has a
    /// bad email, instead of failing that user in the job's results.
    pub async fn whole_request_422(email: &str, token: &str) -> ZendeskDouble {
        Self::start_with(email, token, true).await
    }

    async fn start_with(email: &str, token: &str, whole_request_422: bool) -> ZendeskDouble {
        let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{email}/token:{token}"));
        let shared = Arc::new(Shared {
            authorization: format!("Basic {encoded}"),
            hold_jobs: std::sync::atomic::AtomicBool::new(false),
            whole_request_422,
            script: Mutex::new(Script::default()),
            store: Mutex::new(BTreeMap::new()),
            jobs: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(360_001),
        });
        let router = Router::new()
            .route("/api/v2/users/me.json", get(me))
            .route("/api/v2/{object}/create_or_update_many", post(bulk_write))
            .route("/api/v2/{object}/destroy_many", delete(bulk_destroy))
            .route("/api/v2/job_statuses/{id}", get(job_status))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Zendesk double to 127.0.0.1:0");
        let addr = listener.local_addr().expect("read the Zendesk double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        ZendeskDouble {
            url: format!("http://{addr}"),
            shared,
            server,
        }
    }

    /// The next `times` requests get `429` with `Retry-After: retry_after_secs`.
    pub fn throttle_next(&self, times: usize, retry_after_secs: u64) {
        let mut s = lock(&self.shared.script);
        s.throttle = times;
        s.retry_after_secs = retry_after_secs;
    }

    /// The next `times` requests (after any throttled ones) get `status` (a 5xx).
    pub fn fail_next(&self, times: usize, status: u16) {
        let mut s = lock(&self.shared.script);
        s.fail = times;
        s.fail_status = status;
    }

    /// The next `times` job polls get `429` with `Retry-After: 0` (other requests pass).
    pub fn throttle_polls(&self, times: usize) {
        lock(&self.shared.script).throttle_polls = times;
    }

    /// While `hold` is true, jobs stay `working` however often they are polled.
    pub fn hold_jobs(&self, hold: bool) {
        self.shared.hold_jobs.store(hold, Ordering::SeqCst);
    }

    /// The stored records of `users` or `organizations`, in creation order.
    pub fn records(&self, object: &str) -> Vec<StoredRecord> {
        lock(&self.shared.store).get(object).cloned().unwrap_or_default()
    }

    /// The record whose attribute `name` is `value` (emails without regard to case).
    pub fn find(&self, object: &str, name: &str, value: &str) -> Option<StoredRecord> {
        self.records(object)
            .into_iter()
            .find(|r| same(name, &r.text(name), value))
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<ZendeskRequest> {
        lock(&self.shared.log).clone()
    }

    /// Requests other than job polls, in arrival order.
    pub fn calls(&self) -> Vec<ZendeskRequest> {
        self.requests().into_iter().filter(|r| !r.is_poll()).collect()
    }
}

impl Drop for ZendeskDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn same(name: &str, a: &str, b: &str) -> bool {
    if name == "email" {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

fn respond(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

/// Answers before the endpoint runs: wrong credentials, then the script.
fn gate(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(shared.authorization.as_str()) {
        return Some(respond(401, json!({"error": "Couldn't authenticate you"})));
    }
    let mut script = lock(&shared.script);
    if script.throttle > 0 {
        script.throttle -= 1;
        let mut response = respond(
            429,
            json!({"error": "TooManyRequests", "description": "You have exceeded the rate limit"}),
        );
        let h = response.headers_mut();
        h.insert(
            "retry-after",
            script.retry_after_secs.to_string().parse().expect("header"),
        );
        h.insert("x-rate-limit", "200".parse().expect("header"));
        h.insert("x-rate-limit-remaining", "0".parse().expect("header"));
        return Some(response);
    }
    if script.fail > 0 {
        script.fail -= 1;
        let status = script.fail_status;
        return Some(respond(status, json!({"error": "InternalError"})));
    }
    None
}

fn record(
    shared: &Shared,
    method: &str,
    path: String,
    query: BTreeMap<String, String>,
    headers: &HeaderMap,
    body: Value,
    status: u16,
) {
    lock(&shared.log).push(ZendeskRequest {
        method: method.to_owned(),
        path,
        query,
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        status,
    });
}

async fn me(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let response = gate(&shared, &headers).unwrap_or_else(|| {
        respond(
            200,
            json!({"user": {"id": 1, "name": "Agent", "role": "admin", "email": "agent@example.com"}}),
        )
    });
    let status = response.status().as_u16();
    record(
        &shared,
        "GET",
        "/api/v2/users/me.json".into(),
        BTreeMap::new(),
        &headers,
        Value::Null,
        status,
    );
    response
}

fn known(object: &str) -> bool {
    matches!(object, "users" | "organizations")
}

fn new_job(shared: &Shared, work: Work) -> Value {
    let id = format!("V3-{:x}", shared.next_id.fetch_add(1, Ordering::SeqCst));
    lock(&shared.jobs).insert(
        id.clone(),
        JobEntry {
            polls: 0,
            work,
            results: None,
        },
    );
    json!({"job_status": {"id": id, "url": format!("https://acme.zendesk.com/api/v2/job_statuses/{id}.json"),
        "total": null, "progress": null, "status": "queued", "message": null, "results": null}})
}

fn bad_email(object: &str, item: &Value) -> Option<String> {
    let email = item["email"].as_str()?;
    (object == "users" && !email.contains('@')).then(|| format!("Email: {email} is not properly formatted"))
}

async fn bulk_write(
    State(shared): State<Arc<Shared>>,
    Path(object): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/api/v2/{object}/create_or_update_many");
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let (status, answer) = match gate(&shared, &headers) {
        Some(early) => {
            let status = early.status().as_u16();
            record(&shared, "POST", path, BTreeMap::new(), &headers, json, status);
            return early;
        }
        None => plan_write(&shared, &object, &json),
    };
    record(&shared, "POST", path, BTreeMap::new(), &headers, json, status);
    respond(status, answer)
}

fn plan_write(shared: &Shared, object: &str, body: &Value) -> (u16, Value) {
    if !known(object) {
        return (
            404,
            json!({"error": "InvalidEndpoint", "description": "Not found"}),
        );
    }
    let Some(items) = body[object].as_array() else {
        return (
            400,
            json!({"error": "InvalidValue", "description": format!("{object} parameter is required")}),
        );
    };
    if items.len() > MAX_OBJECTS {
        return (
            400,
            json!({"error": "InvalidValue",
                   "description": format!("Too many {object}: {} given, at most {MAX_OBJECTS} allowed", items.len())}),
        );
    }
    if shared.whole_request_422
        && let Some(message) = items.iter().find_map(|i| bad_email(object, i))
    {
        return (
            422,
            json!({"error": "RecordInvalid", "description": "Record validation errors",
                   "details": {"email": [{"description": message, "error": "InvalidFormat"}]}}),
        );
    }
    let work = Work::Upsert {
        object: object.to_owned(),
        items: items.clone(),
    };
    (200, new_job(shared, work))
}

async fn bulk_destroy(
    State(shared): State<Arc<Shared>>,
    Path(object): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/api/v2/{object}/destroy_many");
    if let Some(early) = gate(&shared, &headers) {
        let status = early.status().as_u16();
        record(&shared, "DELETE", path, query, &headers, Value::Null, status);
        return early;
    }
    let ids: Vec<String> = query
        .get("external_ids")
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let (status, answer) = if !known(&object) {
        (
            404,
            json!({"error": "InvalidEndpoint", "description": "Not found"}),
        )
    } else if ids.is_empty() {
        (
            400,
            json!({"error": "InvalidValue", "description": "ids or external_ids is required"}),
        )
    } else if ids.len() > MAX_OBJECTS {
        (
            400,
            json!({"error": "InvalidValue", "description": format!("Too many external_ids: at most {MAX_OBJECTS} allowed")}),
        )
    } else {
        let work = Work::Destroy {
            object: object.clone(),
            external_ids: ids,
        };
        (200, new_job(&shared, work))
    };
    record(&shared, "DELETE", path, query, &headers, Value::Null, status);
    respond(status, answer)
}

async fn job_status(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/api/v2/job_statuses/{id}");
    if let Some(early) = gate(&shared, &headers) {
        let status = early.status().as_u16();
        record(
            &shared,
            "GET",
            path,
            BTreeMap::new(),
            &headers,
            Value::Null,
            status,
        );
        return early;
    }
    {
        let mut script = lock(&shared.script);
        if script.throttle_polls > 0 {
            script.throttle_polls -= 1;
            drop(script);
            let mut response = respond(429, json!({"error": "TooManyRequests"}));
            response
                .headers_mut()
                .insert("retry-after", "0".parse().expect("header"));
            record(&shared, "GET", path, BTreeMap::new(), &headers, Value::Null, 429);
            return response;
        }
    }
    let key = id.trim_end_matches(".json").to_owned();
    let (status, answer) = {
        let mut jobs = lock(&shared.jobs);
        match jobs.get_mut(&key) {
            None => (
                404,
                json!({"error": "RecordNotFound", "description": "Not found"}),
            ),
            Some(job) => {
                job.polls += 1;
                let url = format!("https://acme.zendesk.com/api/v2/job_statuses/{key}.json");
                let held = shared.hold_jobs.load(Ordering::SeqCst);
                match job.polls {
                    _ if held => (
                        200,
                        json!({"job_status": {"id": key, "url": url, "status": "working",
                            "total": null, "progress": 0, "message": null, "results": null}}),
                    ),
                    1 => (
                        200,
                        json!({"job_status": {"id": key, "url": url, "status": "working",
                            "total": null, "progress": 0, "message": null, "results": null}}),
                    ),
                    _ => {
                        let results = match &job.results {
                            Some(r) => r.clone(),
                            None => {
                                let r = execute(&shared, &job.work);
                                job.results = Some(r.clone());
                                r
                            }
                        };
                        let total = results.len();
                        (
                            200,
                            json!({"job_status": {"id": key, "url": url, "status": "completed",
                                "total": total, "progress": total, "message": "Completed at 2026-01-01 00:00:00 +0000",
                                "results": results}}),
                        )
                    }
                }
            }
        }
    };
    record(
        &shared,
        "GET",
        path,
        BTreeMap::new(),
        &headers,
        Value::Null,
        status,
    );
    respond(status, answer)
}

/// Does a job's writes and returns its results.
fn execute(shared: &Shared, work: &Work) -> Vec<Value> {
    let mut store = lock(&shared.store);
    match work {
        Work::Upsert { object, items } => {
            let records = store.entry(object.clone()).or_default();
            let second = if object == "users" { "email" } else { "name" };
            let mut results = Vec::new();
            for (index, item) in items.iter().enumerate() {
                if let Some(message) = bad_email(object, item) {
                    results.push(json!({"index": index, "status": "Failed",
                        "error": "EmailNotValid", "details": message}));
                    continue;
                }
                let Some(attributes) = item.as_object() else {
                    results.push(json!({"index": index, "status": "Failed",
                        "error": "InvalidValue", "details": "not an object"}));
                    continue;
                };
                let key = ["external_id", second]
                    .into_iter()
                    .find_map(|k| item[k].as_str().map(|v| (k, v.to_owned())));
                let Some((key_name, key_value)) = key else {
                    results.push(
                        json!({"index": index, "status": "Failed", "error": "InvalidValue",
                        "details": format!("external_id or {second} is required")}),
                    );
                    continue;
                };
                let fields_key = if object == "users" {
                    "user_fields"
                } else {
                    "organization_fields"
                };
                let existing = records
                    .iter_mut()
                    .find(|r| same(key_name, &r.text(key_name), &key_value));
                match existing {
                    Some(r) => {
                        for (k, v) in attributes {
                            match (k.as_str(), v, r.attributes.get_mut(k)) {
                                (f, Value::Object(new), Some(Value::Object(old))) if f == fields_key => {
                                    old.extend(new.clone());
                                }
                                _ => {
                                    r.attributes.insert(k.clone(), v.clone());
                                }
                            }
                        }
                        results.push(json!({"index": index, "id": r.id, "status": "Updated",
                            key_name: key_value}));
                    }
                    None => {
                        let id = shared.next_id.fetch_add(1, Ordering::SeqCst) as u64;
                        records.push(StoredRecord {
                            id,
                            attributes: attributes.clone(),
                        });
                        results.push(json!({"index": index, "id": id, "status": "Created",
                            key_name: key_value}));
                    }
                }
            }
            results
        }
        Work::Destroy { object, external_ids } => {
            let records = store.entry(object.clone()).or_default();
            external_ids
                .iter()
                .enumerate()
                .map(|(index, external_id)| {
                    match records.iter().position(|r| r.text("external_id") == *external_id) {
                        Some(at) => {
                            let gone = records.remove(at);
                            json!({"index": index, "id": gone.id, "action": "delete",
                                "success": true, "status": "Deleted"})
                        }
                        None => json!({"index": index, "external_id": external_id,
                            "action": "delete", "success": false, "status": "Failed",
                            "error": "RecordNotFound",
                            "details": format!("No record with external_id {external_id}")}),
                    }
                })
                .collect()
        }
    }
}
