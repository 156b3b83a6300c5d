//! An in-process stand-in for Mailchimp's Marketing API 3.0 audience members, with an
//! in-memory store.
//!
//! Reproduced from the published contract:
//! - <https://mailchimp.com/developer/marketing/docs/fundamentals/>: every path under `/3.0`;
//!   HTTP Basic auth with any user name and the API key as password (or `Bearer <key>`); a
//!   missing or wrong key gets `401` `{"title":"API Key Invalid",…}`.
//! - <https://mailchimp.com/developer/marketing/api/ping/>: `GET /3.0/ping` answers
//!   `{"health_status":"Everything's Chimpy!"}`.
//! - <https://mailchimp.com/developer/marketing/api/lists/get-list-info/>: `GET /3.0/lists/{id}`,
//!   `404 Resource Not Found` for an unknown audience.
//! - <https://mailchimp.com/developer/marketing/api/lists/batch-subscribe-or-unsubscribe/>:
//!   `POST /3.0/lists/{id}` with `{"members":[…],"update_existing":bool}`; more than 500
//!   members is refused whole with `400 Invalid Resource`; `200` with `new_members`,
//!   `updated_members`, `errors` (`email_address`, `error`, `error_code`) and `error_count`.
//!   An email without `@` gets a per-member `ERROR_GENERIC` "looks fake or invalid" error (or,
//!   with [`MailchimpDouble::whole_batch_400`], the whole request is refused with `400`); an
//!   existing member with `update_existing: false` gets `ERROR_CONTACT_EXISTS`. New members get
//!   `status_if_new`; merge fields are merged; tags are added.
//! - <https://mailchimp.com/developer/marketing/api/list-members/>: `GET` and `DELETE
//!   /3.0/lists/{id}/members/{subscriber_hash}` (the MD5 of the lower-cased email); `DELETE`
//!   archives (`204`), an unknown member is `404`.
//! - <https://mailchimp.com/developer/marketing/docs/errors/>: error bodies `{"type","title",
//!   "status","detail","instance"}`; `429 Too Many Requests` and `5xx` (scripted by count).
//!
//! Not reproduced: OAuth, merge field definitions and their types (every merge tag is accepted),
//! interests, the compliance state of cleaned or unsubscribed members, the 10-connection limit
//! itself (429 is scripted, not counted), tag removal (`status: inactive`), `fields`
//! filtering, and the exact wording of Mailchimp's messages. An archived member is removed from
//! the store rather than kept with status `archived`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use md5::{Digest, Md5};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Most members Mailchimp accepts per batch subscribe call.
pub const MAX_MEMBERS: usize = 500;

/// One stored audience member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The email address as last written.
    pub email: String,
    /// `subscribed`, `pending`, `transactional`, …
    pub status: String,
    /// Merge field values.
    pub merge_fields: Map<String, Value>,
    /// Tag names.
    pub tags: Vec<String>,
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct MailchimpRequest {
    /// HTTP method.
    pub method: String,
    /// Path, like `/3.0/lists/a1b2c3d4e5`.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub body: Value,
    /// The status answered.
    pub status: u16,
}

impl MailchimpRequest {
    /// How many members the body carried.
    pub fn members(&self) -> usize {
        self.body["members"].as_array().map_or(0, Vec::len)
    }
}

#[derive(Default)]
struct Script {
    throttle: usize,
    fail: usize,
    fail_status: u16,
}

struct Shared {
    api_key: String,
    list_id: String,
    whole_batch_400: bool,
    script: Mutex<Script>,
    /// Members by subscriber hash.
    store: Mutex<BTreeMap<String, Member>>,
    log: Mutex<Vec<MailchimpRequest>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The subscriber hash of an email address.
pub fn subscriber_hash(email: &str) -> String {
    Md5::digest(email.to_lowercase().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A running double; the server stops when it is dropped.
pub struct MailchimpDouble {
    /// Base URL including `/3.0`, like `http://127.0.0.1:41234/3.0` (the Destination's
    /// `baseUrl`).
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl MailchimpDouble {
    /// Starts a double with one audience, accepting `api_key`.
    pub async fn start(api_key: &str, list_id: &str) -> MailchimpDouble {
        Self::start_with(api_key, list_id, false).await
    }

    /// Starts a double that refuses a whole batch with `400 Invalid Resource` when one of its
    /// members has an invalid email, instead of a per-member error.
    pub async fn whole_batch_400(api_key: &str, list_id: &str) -> MailchimpDouble {
        Self::start_with(api_key, list_id, true).await
    }

    async fn start_with(api_key: &str, list_id: &str, whole_batch_400: bool) -> MailchimpDouble {
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            list_id: list_id.to_owned(),
            whole_batch_400,
            script: Mutex::new(Script::default()),
            store: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
        });
        let router = Router::new()
            .route("/3.0/ping", get(ping))
            .route("/3.0/lists/{list}", get(list_info).post(batch))
            .route("/3.0/lists/{list}/members/{hash}", get(member).delete(member))
            .fallback(not_found)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Mailchimp double to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("read the Mailchimp double's address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        MailchimpDouble {
            url: format!("http://{addr}/3.0"),
            shared,
            server,
        }
    }

    /// The next `times` requests get `429 Too Many Requests`.
    pub fn throttle_next(&self, times: usize) {
        lock(&self.shared.script).throttle = times;
    }

    /// The next `times` requests (after any throttled ones) get `status` (a 5xx).
    pub fn fail_next(&self, times: usize, status: u16) {
        let mut s = lock(&self.shared.script);
        s.fail = times;
        s.fail_status = status;
    }

    /// Adds a member directly (as if added in Mailchimp's UI).
    pub fn seed(&self, email: &str, merge_fields: &[(&str, &str)]) {
        let member = Member {
            email: email.to_owned(),
            status: "subscribed".into(),
            merge_fields: merge_fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
                .collect(),
            tags: Vec::new(),
        };
        lock(&self.shared.store).insert(subscriber_hash(email), member);
    }

    /// The member with this email, if the audience has it.
    pub fn member(&self, email: &str) -> Option<Member> {
        lock(&self.shared.store).get(&subscriber_hash(email)).cloned()
    }

    /// How many members the audience has.
    pub fn count(&self) -> usize {
        lock(&self.shared.store).len()
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<MailchimpRequest> {
        lock(&self.shared.log).clone()
    }
}

impl Drop for MailchimpDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn error(status: u16, title: &str, detail: &str) -> (u16, Value) {
    (
        status,
        json!({
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": title,
            "status": status,
            "detail": detail,
            "instance": "00000000-0000-0000-0000-000000000000",
        }),
    )
}

fn respond(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == 204 {
        return code.into_response();
    }
    let content_type = if status >= 400 {
        "application/problem+json"
    } else {
        "application/json"
    };
    (code, [("content-type", content_type)], body.to_string()).into_response()
}

/// The key a request carries: the password of Basic auth, or a Bearer token.
fn key_of(headers: &HeaderMap) -> Option<String> {
    let auth = headers.get("authorization")?.to_str().ok()?;
    if let Some(token) = auth.strip_prefix("Bearer ") {
        return Some(token.to_owned());
    }
    let encoded = auth.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    let text = String::from_utf8(decoded).ok()?;
    text.split_once(':').map(|(_, key)| key.to_owned())
}

/// Answers before the endpoint runs: a wrong key, then the script.
fn gate(shared: &Shared, headers: &HeaderMap) -> Option<(u16, Value)> {
    if key_of(headers).as_deref() != Some(shared.api_key.as_str()) {
        return Some(error(
            401,
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
        ));
    }
    let mut script = lock(&shared.script);
    if script.throttle > 0 {
        script.throttle -= 1;
        return Some(error(
            429,
            "Too Many Requests",
            "You have exceeded the limit of 10 simultaneous connections.",
        ));
    }
    if script.fail > 0 {
        script.fail -= 1;
        return Some(error(
            script.fail_status,
            "Internal Server Error",
            "An unexpected internal error has occurred. Please contact Support for more information.",
        ));
    }
    None
}

/// Runs `handle` unless the gate answers first, and logs the request.
fn serve(
    shared: &Shared,
    method: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Value,
    handle: impl FnOnce(&Shared, &Value) -> (u16, Value),
) -> Response {
    let (status, answer) = gate(shared, headers).unwrap_or_else(|| handle(shared, &body));
    lock(&shared.log).push(MailchimpRequest {
        method: method.to_owned(),
        path: uri.path().to_owned(),
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        status,
    });
    respond(status, answer)
}

async fn ping(State(shared): State<Arc<Shared>>, uri: Uri, headers: HeaderMap) -> Response {
    serve(&shared, "GET", &uri, &headers, Value::Null, |_, _| {
        (200, json!({"health_status": "Everything's Chimpy!"}))
    })
}

async fn not_found(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    serve(&shared, method.as_str(), &uri, &headers, Value::Null, |_, _| {
        error(
            404,
            "Resource Not Found",
            "The requested resource could not be found.",
        )
    })
}

fn unknown_list() -> (u16, Value) {
    error(
        404,
        "Resource Not Found",
        "The requested resource could not be found.",
    )
}

async fn list_info(
    State(shared): State<Arc<Shared>>,
    Path(list): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    serve(&shared, "GET", &uri, &headers, Value::Null, |shared, _| {
        if list != shared.list_id {
            return unknown_list();
        }
        let count = lock(&shared.store).len();
        (
            200,
            json!({"id": list, "name": "Customers", "stats": {"member_count": count}}),
        )
    })
}

async fn member(
    State(shared): State<Arc<Shared>>,
    Path((list, hash)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let deleting = method == Method::DELETE;
    serve(
        &shared,
        method.as_str(),
        &uri,
        &headers,
        Value::Null,
        |shared, _| {
            if list != shared.list_id {
                return unknown_list();
            }
            let mut store = lock(&shared.store);
            let found = if deleting {
                store.remove(&hash)
            } else {
                store.get(&hash).cloned()
            };
            match (found, deleting) {
                (None, _) => error(
                    404,
                    "Resource Not Found",
                    "The requested resource could not be found.",
                ),
                (Some(_), true) => (204, Value::Null),
                (Some(m), false) => (200, member_json(&hash, &m)),
            }
        },
    )
}

fn member_json(hash: &str, m: &Member) -> Value {
    json!({
        "id": hash,
        "email_address": m.email,
        "status": m.status,
        "merge_fields": m.merge_fields,
        "tags": m.tags.iter().map(|t| json!({"name": t})).collect::<Vec<_>>(),
    })
}

async fn batch(
    State(shared): State<Arc<Shared>>,
    Path(list): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    serve(&shared, "POST", &uri, &headers, json, |shared, body| {
        if list != shared.list_id {
            return unknown_list();
        }
        run_batch(shared, body)
    })
}

fn invalid_resource(field: &str, message: &str) -> (u16, Value) {
    let (status, mut body) = error(
        400,
        "Invalid Resource",
        "The resource submitted could not be validated. For field-specific details, see the 'errors' array.",
    );
    body["errors"] = json!([{"field": field, "message": message}]);
    (status, body)
}

fn run_batch(shared: &Shared, body: &Value) -> (u16, Value) {
    let Some(members) = body["members"].as_array() else {
        return invalid_resource("members", "Required property members was not present.");
    };
    if members.len() > MAX_MEMBERS {
        return invalid_resource(
            "members",
            &format!(
                "Schema describes array, too many items: {} > {MAX_MEMBERS}",
                members.len()
            ),
        );
    }
    let update_existing = body["update_existing"].as_bool().unwrap_or(false);
    if shared.whole_batch_400 {
        for m in members {
            let email = m["email_address"].as_str().unwrap_or_default();
            if !email.contains('@') {
                return invalid_resource(
                    "members.item:email_address",
                    &format!("{email} looks fake or invalid, please enter a real email address."),
                );
            }
        }
    }
    let mut store = lock(&shared.store);
    let (mut new, mut updated, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for m in members {
        let email = m["email_address"].as_str().unwrap_or_default().to_owned();
        if !email.contains('@') {
            errors.push(json!({"email_address": email, "error_code": "ERROR_GENERIC",
                "error": format!("{email} looks fake or invalid, please enter a real email address."),
                "field": "email_address", "field_message": ""}));
            continue;
        }
        let hash = subscriber_hash(&email);
        let merge = m["merge_fields"].as_object().cloned().unwrap_or_default();
        let tags: Vec<String> = m["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        match store.get_mut(&hash) {
            Some(_) if !update_existing => {
                errors.push(json!({"email_address": email, "error_code": "ERROR_CONTACT_EXISTS",
                    "error": format!("{email} is already a list member, do you want to update? please provide update_existing:true in the request body"),
                    "field": "", "field_message": ""}));
            }
            Some(existing) => {
                existing.email = email;
                existing.merge_fields.extend(merge);
                for t in tags {
                    if !existing.tags.contains(&t) {
                        existing.tags.push(t);
                    }
                }
                if let Some(status) = m["status"].as_str() {
                    existing.status = status.to_owned();
                }
                updated.push(member_json(&hash, existing));
            }
            None => {
                let status = m["status"]
                    .as_str()
                    .or_else(|| m["status_if_new"].as_str())
                    .unwrap_or("subscribed")
                    .to_owned();
                let member = Member {
                    email,
                    status,
                    merge_fields: merge,
                    tags,
                };
                new.push(member_json(&hash, &member));
                store.insert(hash, member);
            }
        }
    }
    (
        200,
        json!({
            "new_members": new,
            "updated_members": updated,
            "errors": errors,
            "total_created": new.len(),
            "total_updated": updated.len(),
            "error_count": errors.len(),
        }),
    )
}
