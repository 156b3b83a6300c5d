//! An in-process stand-in for a Salesforce org: the OAuth 2.0 token endpoint, the sObject
//! Collections upsert and delete resources, SOQL queries on an External ID field, describe,
//! and an in-memory store.
//!
//! Reproduced from the published contract:
//! - <https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_client_credentials_flow.htm>:
//!   `POST /services/oauth2/token` with the form `grant_type=client_credentials&client_id&
//!   client_secret` answers `{"access_token","instance_url","token_type":"Bearer",…}` (the
//!   instance is the double itself); wrong credentials get
//!   `400 {"error":"invalid_client","error_description":"invalid client credentials"}`.
//! - <https://help.salesforce.com/s/articleView?id=sf.remoteaccess_oauth_jwt_flow.htm>:
//!   `grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>` for the username
//!   [`SalesforceDouble::accept_jwt_for`] names: the header must say `RS256`, and the claims
//!   `iss` (the consumer key), `sub` (the username), `aud` and a future `exp` must be present;
//!   else `400 {"error":"invalid_grant",…}`. **The signature is not verified.**
//! - <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/errorcodes.htm>:
//!   a data call without a token the double issued (or one [`SalesforceDouble::expire_tokens`]
//!   revoked) gets `401 [{"message":"Session expired or invalid","errorCode":"INVALID_SESSION_ID"}]`;
//!   `403 [{"errorCode":"REQUEST_LIMIT_EXCEEDED",…}]` and `503 [{"errorCode":"SERVER_UNAVAILABLE",…}]`
//!   on scripted counts.
//! - <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_upsert.htm>:
//!   `PATCH /services/data/{v}/composite/sobjects/{object}/{field}` with
//!   `{"allOrNone":false,"records":[{"attributes":{"type":…},…}]}`; more than 200 records is
//!   refused whole with `400 [{"errorCode":"EXCEEDED_ID_LIMIT",…}]`; records are matched on
//!   the External ID field; the answer is one result per record, in order:
//!   `{"id","success":true,"created":bool,"errors":[]}` or `{"success":false,"errors":
//!   [{"statusCode":"REQUIRED_FIELD_MISSING","message":…,"fields":["LastName"]}]}` for a new
//!   Contact without `LastName`; a `Birthdate` that is not `YYYY-MM-DD`, or a `Last_Order__c`
//!   (a dateTime field) that is not `yyyy-MM-ddTHH:mm:ss` with an optional three-digit
//!   `.SSS` and a `Z` or `±HH:mm` offset
//!   (<https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/intro_valid_date_formats.htm>),
//!   refuses the whole request with `400 [{"errorCode":"JSON_PARSER_ERROR",…}]`, as
//!   Salesforce does for a value it cannot deserialize. A record naming a field `Contact`
//!   does not have (see [`CONTACT_FIELDS`]) refuses the whole request with
//!   `400 [{"errorCode":"INVALID_FIELD","message":"No such column 'X' on sobject of type
//!   Contact"}]`, an External ID field it does not have with `400 INVALID_FIELD` too, and an
//!   unknown object with `400 INVALID_TYPE` (errors about the request, not a record).
//! - <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_query.htm>:
//!   `GET /services/data/{v}/query?q=SELECT Id, F FROM O WHERE F IN ('a', 'b')` (only that
//!   shape; quotes and backslashes escaped with a backslash).
//! - <https://developer.salesforce.com/docs/atlas.en-us.api_rest.meta/api_rest/resources_composite_sobjects_collections_delete.htm>:
//!   `DELETE /services/data/{v}/composite/sobjects?ids=…&allOrNone=false`, at most 200 ids;
//!   an unknown id fails with `ENTITY_IS_DELETED`.
//! - `GET /services/data/{v}/sobjects/{object}/describe`: `Contact` exists, any other object
//!   is `404 [{"errorCode":"NOT_FOUND",…}]`.
//! - Bulk API 2.0 ingest jobs
//!   (<https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/bulk_api_2_0.htm>):
//!   `POST /services/data/{v}/jobs/ingest` ([create](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/create_job.htm))
//!   with `{object, operation: insert|upsert|update|delete, externalIdFieldName (upsert),
//!   contentType: "CSV", lineEnding}` answers the job info with `state: "Open"`;
//!   `PUT …/jobs/ingest/{id}/batches` ([upload](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/upload_job_data.htm))
//!   with `Content-Type: text/csv` answers `201` with no body, and is refused (`409`) unless
//!   the job is `Open`; `PATCH …/jobs/ingest/{id}` ([close](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/close_job.htm),
//!   [abort](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/abort_job.htm))
//!   with `{state: "UploadComplete"}` (refused without uploaded data) or `{state: "Aborted"}`;
//!   `GET …/jobs/ingest/{id}` ([job info](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/get_job_info.htm))
//!   moves a closed job on one [state](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/bulk_api_2_job_states.htm)
//!   per poll, `UploadComplete` → `InProgress` → `JobComplete` (or `Failed`), processing the
//!   data on the second poll ([`SalesforceDouble::hold_jobs`] keeps them `InProgress`). The
//!   CSV is parsed per RFC 4180; a header naming a field `Contact` does not have (see
//!   [`CONTACT_FIELDS`]; dotted relationship columns are not checked) fails the job with
//!   `errorMessage: "InvalidBatch : Field name not found : X"`. Per row: an empty cell leaves
//!   the field as is and `#N/A` sets it to null; a `Last_Order__c` cell that is not a valid
//!   dateTime (same rule as above; the Bulk API 2.0 format page,
//!   <https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/valid_date_format_in_records__2_0.htm>)
//!   fails the row with `INVALID_TYPE_ON_FIELD_IN_RECORD:Last Order: value not of required
//!   type: <value>:Last_Order__c --` (Salesforce echoes the value); upserts match on the External ID column and a
//!   new Contact without `LastName` fails with
//!   `REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --`; deletes
//!   take an `Id` column and an unknown Id fails with `ENTITY_IS_DELETED:entity is deleted:--`;
//!   rows whose key [`SalesforceDouble::reject_bulk_row`] names fail with the error given.
//!   `GET …/failedResults/` ([docs](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/get_job_failed_results.htm))
//!   answers `"sf__Id","sf__Error",<uploaded columns>` and `GET …/successfulResults/`
//!   ([docs](https://developer.salesforce.com/docs/atlas.en-us.api_asynch.meta/api_asynch/get_job_successful_results.htm))
//!   `"sf__Id","sf__Created",<uploaded columns>`, every field quoted, rows in reverse upload
//!   order (Salesforce does not keep the upload's order); both are refused (`409`) before the
//!   job ends.
//!
//! Not reproduced: JWT signature verification, other OAuth flows, token expiry by time, field-level
//! security and object permissions, field types other than `Birthdate` (bulk rows store every
//! value as text and do not check dates), SOQL beyond the one shape, query pagination,
//! duplicate rules, triggers, `allOrNone: true`, real request-rate accounting (limits and 503
//! are scripted by count), and the exact wording of Salesforce's messages. Of Bulk API 2.0:
//! the 150 MB upload limit and base64 accounting, several uploads to one job (the double
//! refuses a second), delimiters other than comma, CRLF line endings, `insert`/`update`/
//! `hardDelete` semantics beyond accepting the job, `unprocessedRecords/`, job lists and
//! deletion, query jobs, the daily record and batch allocations, Salesforce's own internal
//! retries, and jobs failing for reasons other than an unknown column.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

/// Most records (or ids) Salesforce accepts per collections call.
pub const MAX_RECORDS: usize = 200;

/// The fields the double's `Contact` has, checked against bulk job headers.
pub const CONTACT_FIELDS: &[&str] = &[
    "Id",
    "Email__c",
    "FirstName",
    "LastName",
    "Birthdate",
    "LTV__c",
    "Phone",
    "Description",
    "Last_Order__c",
];

/// Whether `text` is a dateTime Salesforce reads: `yyyy-MM-ddTHH:mm:ss`, an optional
/// three-digit `.SSS`, then `Z` or an offset `±HH:mm`.
pub fn is_salesforce_date_time(text: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let Some((date, time)) = text.split_once('T') else {
        return false;
    };
    let date_ok =
        date.len() == 10 && date.split('-').map(str::len).eq([4, 2, 2]) && digits(&date.replace('-', ""));
    let (clock, zone) = match time.find(['Z', '+', '-']) {
        Some(at) => time.split_at(at),
        None => return false,
    };
    let zone_ok =
        zone == "Z" || (zone.len() == 6 && digits(&zone[1..3]) && &zone[3..4] == ":" && digits(&zone[4..]));
    let (hms, fraction) = match clock.split_once('.') {
        Some((hms, f)) => (hms, Some(f)),
        None => (clock, None),
    };
    let hms_ok =
        hms.len() == 8 && hms.split(':').map(str::len).eq([2, 2, 2]) && digits(&hms.replace(':', ""));
    date_ok && zone_ok && hms_ok && fraction.is_none_or(|f| f.len() == 3 && digits(f))
}

/// One stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    /// The 18-character Id.
    pub id: String,
    /// Its fields as last written.
    pub fields: Map<String, Value>,
}

impl StoredRecord {
    /// A field as text (strings without quotes), or `""`.
    pub fn text(&self, name: &str) -> String {
        match self.fields.get(name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        }
    }
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct SalesforceRequest {
    /// HTTP method.
    pub method: String,
    /// Path, like `/services/data/v61.0/composite/sobjects/Contact/Email__c`.
    pub path: String,
    /// Query string pairs.
    pub query: BTreeMap<String, String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The `Content-Type` header, if any.
    pub content_type: Option<String>,
    /// The raw body.
    pub body: String,
    /// The status answered.
    pub status: u16,
    /// When the double received it.
    pub at: std::time::Instant,
}

impl SalesforceRequest {
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// How many records a collections upsert carried.
    pub fn records(&self) -> usize {
        self.json()["records"].as_array().map_or(0, Vec::len)
    }

    /// True for a token request.
    pub fn is_token(&self) -> bool {
        self.path == "/services/oauth2/token"
    }

    /// True for a collections upsert.
    pub fn is_upsert(&self) -> bool {
        self.method == "PATCH" && self.path.contains("/composite/sobjects/")
    }

    /// True for a call to a Bulk API 2.0 ingest resource.
    pub fn is_bulk(&self) -> bool {
        self.path.contains("/jobs/ingest")
    }

    /// The bulk step this request is: `create`, `upload`, `close`, `abort`, `poll`,
    /// `failedResults` or `successfulResults` (`None` for other requests).
    pub fn bulk_step(&self) -> Option<&'static str> {
        let rest = self.path.split("/jobs/ingest").nth(1)?;
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        match (self.method.as_str(), parts.as_slice()) {
            ("POST", []) => Some("create"),
            ("PUT", [_, "batches"]) => Some("upload"),
            ("PATCH", [_]) if self.json()["state"] == "Aborted" => Some("abort"),
            ("PATCH", [_]) => Some("close"),
            ("GET", [_]) => Some("poll"),
            ("GET", [_, "failedResults"]) => Some("failedResults"),
            ("GET", [_, "successfulResults"]) => Some("successfulResults"),
            _ => None,
        }
    }
}

/// A Bulk API 2.0 ingest job as the double holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct BulkJob {
    /// The job id (`750…`).
    pub id: String,
    /// `upsert`, `delete`, …
    pub operation: String,
    /// The sObject.
    pub object: String,
    /// The External ID field of an upsert job.
    pub external_id_field: Option<String>,
    /// `Open`, `UploadComplete`, `InProgress`, `JobComplete`, `Failed` or `Aborted`.
    pub state: String,
    /// The uploaded CSV.
    pub data: Option<String>,
    /// Why the job failed.
    pub error_message: Option<String>,
    /// Rows processed.
    pub processed: usize,
    /// `(sf__Id, sf__Created, row)` of each successful row, in upload order.
    successful: Vec<(String, bool, Vec<String>)>,
    /// `(sf__Id, sf__Error, row)` of each failed row, in upload order.
    failed: Vec<(String, String, Vec<String>)>,
    header: Vec<String>,
}

impl BulkJob {
    /// Rows that failed.
    pub fn failed_rows(&self) -> usize {
        self.failed.len()
    }
}

#[derive(Default)]
struct Script {
    limit_exceeded: usize,
    limit_exceeded_polls: usize,
    fail: usize,
    expire_after: Option<usize>,
    hold_jobs: bool,
}

struct Shared {
    url: Mutex<String>,
    client_id: String,
    client_secret: String,
    jwt_username: Mutex<Option<String>>,
    tokens: Mutex<Vec<String>>,
    issued: AtomicUsize,
    script: Mutex<Script>,
    store: Mutex<BTreeMap<String, Vec<StoredRecord>>>,
    log: Mutex<Vec<SalesforceRequest>>,
    next_id: AtomicUsize,
    jobs: Mutex<BTreeMap<String, BulkJob>>,
    bulk_rejects: Mutex<BTreeMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock already failed; keep reading.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running double; the server stops when it is dropped.
pub struct SalesforceDouble {
    /// Base URL, like `http://127.0.0.1:41234`: both the login URL and the instance URL.
    pub url: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl SalesforceDouble {
    /// Starts a double whose connected app has the consumer key and secret given.
    pub async fn start(client_id: &str, client_secret: &str) -> SalesforceDouble {
        let shared = Arc::new(Shared {
            url: Mutex::new(String::new()),
            client_id: client_id.to_owned(),
            client_secret: client_secret.to_owned(),
            jwt_username: Mutex::new(None),
            tokens: Mutex::new(Vec::new()),
            issued: AtomicUsize::new(0),
            script: Mutex::new(Script::default()),
            store: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(1),
            jobs: Mutex::new(BTreeMap::new()),
            bulk_rejects: Mutex::new(BTreeMap::new()),
        });
        let router = Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(160 * 1024 * 1024))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the Salesforce double to 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("read the Salesforce double's address");
        let url = format!("http://{addr}");
        *lock(&shared.url) = url.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        SalesforceDouble { url, shared, server }
    }

    /// Also accepts JWT bearer assertions for `username` (claims checked, signature not).
    pub fn accept_jwt_for(&self, username: &str) {
        *lock(&self.shared.jwt_username) = Some(username.to_owned());
    }

    /// Revokes every token issued so far: the next data call gets `INVALID_SESSION_ID`.
    pub fn expire_tokens(&self) {
        lock(&self.shared.tokens).clear();
    }

    /// Lets the next `calls` data calls through, then revokes every token: the call after
    /// them gets `INVALID_SESSION_ID` (an expiry in the middle of a bulk job).
    pub fn expire_tokens_after(&self, calls: usize) {
        lock(&self.shared.script).expire_after = Some(calls);
    }

    /// While `hold` is true, polls leave closed bulk jobs `InProgress`.
    pub fn hold_jobs(&self, hold: bool) {
        lock(&self.shared.script).hold_jobs = hold;
    }

    /// Bulk rows whose key (External ID value, or `Id` for deletes) is `key` fail with
    /// `sf_error` (like `INVALID_EMAIL_ADDRESS:Email: invalid email address:Email --`).
    pub fn reject_bulk_row(&self, key: &str, sf_error: &str) {
        lock(&self.shared.bulk_rejects).insert(key.to_owned(), sf_error.to_owned());
    }

    /// Every bulk job created, by id.
    pub fn jobs(&self) -> Vec<BulkJob> {
        lock(&self.shared.jobs).values().cloned().collect()
    }

    /// How many tokens the token endpoint issued.
    pub fn tokens_issued(&self) -> usize {
        self.shared.issued.load(Ordering::SeqCst)
    }

    /// The next `times` data calls get `403 REQUEST_LIMIT_EXCEEDED`.
    pub fn limit_exceeded_next(&self, times: usize) {
        lock(&self.shared.script).limit_exceeded = times;
    }

    /// The next `times` polls of a bulk job (`GET …/jobs/ingest/{id}`) get `403
    /// REQUEST_LIMIT_EXCEEDED`: the org's allowance runs out while a job runs.
    pub fn limit_exceeded_on_polls(&self, times: usize) {
        lock(&self.shared.script).limit_exceeded_polls = times;
    }

    /// The next `times` data calls (after any limited ones) get `503 SERVER_UNAVAILABLE`.
    pub fn fail_next(&self, times: usize) {
        lock(&self.shared.script).fail = times;
    }

    /// Stores a record directly, as if created in Salesforce; returns its Id.
    pub fn insert(&self, object: &str, fields: Value) -> String {
        let id = new_id(&self.shared);
        let fields = fields.as_object().cloned().unwrap_or_default();
        lock(&self.shared.store)
            .entry(object.to_owned())
            .or_default()
            .push(StoredRecord {
                id: id.clone(),
                fields,
            });
        id
    }

    /// Deletes a stored record directly, as if deleted in Salesforce; false if it is not there.
    pub fn remove(&self, id: &str) -> bool {
        lock(&self.shared.store)
            .values_mut()
            .any(|rows| match rows.iter().position(|r| r.id == id) {
                Some(p) => {
                    rows.remove(p);
                    true
                }
                None => false,
            })
    }

    /// The stored records of `object`, in creation order.
    pub fn records(&self, object: &str) -> Vec<StoredRecord> {
        lock(&self.shared.store).get(object).cloned().unwrap_or_default()
    }

    /// The record of `object` whose field `name` is `value`.
    pub fn find(&self, object: &str, name: &str, value: &str) -> Option<StoredRecord> {
        self.records(object).into_iter().find(|r| r.text(name) == value)
    }

    /// Every request received, in arrival order.
    pub fn requests(&self) -> Vec<SalesforceRequest> {
        lock(&self.shared.log).clone()
    }

    /// Requests other than token requests, in arrival order.
    pub fn calls(&self) -> Vec<SalesforceRequest> {
        self.requests().into_iter().filter(|r| !r.is_token()).collect()
    }
}

impl Drop for SalesforceDouble {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn new_id(shared: &Shared) -> String {
    let n = shared.next_id.fetch_add(1, Ordering::SeqCst);
    format!("003Dn{n:010}AAA")
}

fn respond(status: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

fn error(status: u16, code: &str, message: &str) -> Response {
    respond(status, json!([{"message": message, "errorCode": code}]))
}

/// The fields of a form (or query string) body.
pub fn form(text: &str) -> BTreeMap<String, String> {
    pairs(text)
}

fn pairs(text: &str) -> BTreeMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{text}"))
        .map(|u| u.query_pairs().into_owned().collect())
        .unwrap_or_default()
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let query = pairs(uri.query().unwrap_or_default());
    let text = String::from_utf8_lossy(&body).into_owned();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let authorization = header("authorization");
    let content_type = header("content-type");
    let request = Request {
        method: &method,
        path: &path,
        query: &query,
        authorization: authorization.as_deref(),
        content_type: content_type.as_deref(),
        body: &text,
    };
    let at = std::time::Instant::now();
    let response = answer(&shared, &request);
    lock(&shared.log).push(SalesforceRequest {
        at,
        method: method.to_string(),
        path,
        query,
        authorization,
        content_type,
        body: text,
        status: response.status().as_u16(),
    });
    response
}

/// The parts of a request the double answers from.
struct Request<'a> {
    method: &'a Method,
    path: &'a str,
    query: &'a BTreeMap<String, String>,
    authorization: Option<&'a str>,
    content_type: Option<&'a str>,
    body: &'a str,
}

fn answer(shared: &Shared, request: &Request<'_>) -> Response {
    let Request {
        method,
        path,
        query,
        authorization,
        content_type,
        body,
    } = *request;
    if path == "/services/oauth2/token" && method == Method::POST {
        return token(shared, body);
    }
    let valid = authorization
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| lock(&shared.tokens).iter().any(|k| k == t));
    if !valid {
        return error(401, "INVALID_SESSION_ID", "Session expired or invalid");
    }
    {
        let mut script = lock(&shared.script);
        match script.expire_after {
            Some(0) => {
                script.expire_after = None;
                lock(&shared.tokens).clear();
                return error(401, "INVALID_SESSION_ID", "Session expired or invalid");
            }
            Some(n) => script.expire_after = Some(n - 1),
            None => {}
        }
        if script.limit_exceeded > 0 {
            script.limit_exceeded -= 1;
            return error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.");
        }
        let is_poll = method == Method::GET
            && path
                .split("/jobs/ingest/")
                .nth(1)
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
        if is_poll && script.limit_exceeded_polls > 0 {
            script.limit_exceeded_polls -= 1;
            return error(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.");
        }
        if script.fail > 0 {
            script.fail -= 1;
            return error(503, "SERVER_UNAVAILABLE", "Server is temporarily unavailable");
        }
    }
    let Some(rest) = path.strip_prefix("/services/data/") else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method.as_str(), parts.as_slice()) {
        ("GET", [_, "sobjects", object, "describe"]) => {
            if *object == "Contact" {
                respond(
                    200,
                    json!({"name": "Contact", "fields": [{"name": "Id"}, {"name": "LastName"}]}),
                )
            } else {
                error(404, "NOT_FOUND", "The requested resource does not exist")
            }
        }
        ("PATCH", [_, "composite", "sobjects", object, field]) => upsert(shared, object, field, body),
        ("GET", [_, "query"]) => soql(shared, query.get("q").map(String::as_str).unwrap_or_default()),
        ("DELETE", [_, "composite", "sobjects"]) => destroy(shared, query),
        ("POST", [version, "jobs", "ingest"]) => create_job(shared, version, body),
        ("PUT", [_, "jobs", "ingest", id, "batches"]) => upload(shared, id, content_type, body),
        ("PATCH", [_, "jobs", "ingest", id]) => change_state(shared, id, body),
        ("GET", [_, "jobs", "ingest", id]) => poll(shared, id),
        ("GET", [_, "jobs", "ingest", id, kind] | [_, "jobs", "ingest", id, kind, ""])
            if *kind == "failedResults" || *kind == "successfulResults" =>
        {
            results(shared, id, kind)
        }
        _ => error(404, "NOT_FOUND", "The requested resource does not exist"),
    }
}

fn token(shared: &Shared, body: &str) -> Response {
    let form = pairs(body);
    if form.get("grant_type").map(String::as_str) == Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        let username = lock(&shared.jwt_username).clone();
        let valid = form
            .get("assertion")
            .is_some_and(|a| username.is_some_and(|u| assertion_ok(a, &shared.client_id, &u)));
        if !valid {
            return respond(
                400,
                json!({"error": "invalid_grant", "error_description": "invalid assertion"}),
            );
        }
        return issue(shared);
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return respond(
            400,
            json!({"error": "unsupported_grant_type", "error_description": "grant type not supported"}),
        );
    }
    if form.get("client_id") != Some(&shared.client_id)
        || form.get("client_secret") != Some(&shared.client_secret)
    {
        return respond(
            400,
            json!({"error": "invalid_client", "error_description": "invalid client credentials"}),
        );
    }
    issue(shared)
}

/// Checks a JWT's header and claims (not its signature).
fn assertion_ok(assertion: &str, client_id: &str, username: &str) -> bool {
    use base64::Engine as _;
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    };
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, claims, signature] = parts.as_slice() else {
        return false;
    };
    let (Some(header), Some(claims)) = (decode(header), decode(claims)) else {
        return false;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    header["alg"] == "RS256"
        && !signature.is_empty()
        && claims["iss"] == client_id
        && claims["sub"] == username
        && claims["aud"].as_str().is_some_and(|a| !a.is_empty())
        && claims["exp"].as_u64().is_some_and(|e| e > now)
}

fn issue(shared: &Shared) -> Response {
    let n = shared.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let access = format!("00Dxx0000001gEH!AQ4AQtoken{n:04}");
    lock(&shared.tokens).push(access.clone());
    respond(
        200,
        json!({"access_token": access, "instance_url": lock(&shared.url).clone(),
               "id": "https://login.salesforce.com/id/00Dxx0000001gEH/005xx000001Sv6e",
               "token_type": "Bearer", "issued_at": "1700000000000", "signature": "c2lnbmF0dXJl"}),
    )
}

fn upsert(shared: &Shared, object: &str, field: &str, body: &str) -> Response {
    let Ok(json) = serde_json::from_str::<Value>(body) else {
        return error(
            400,
            "JSON_PARSER_ERROR",
            "Unexpected character in the request body",
        );
    };
    let Some(records) = json["records"].as_array() else {
        return error(400, "INVALID_INPUT", "records is required");
    };
    if records.len() > MAX_RECORDS {
        return error(
            400,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    if object != "Contact" {
        return error(
            400,
            "INVALID_TYPE",
            &format!("sObject type '{object}' is not supported."),
        );
    }
    if !CONTACT_FIELDS.contains(&field) {
        return error(
            400,
            "INVALID_FIELD",
            &format!("Field name provided, {field} is not an External ID or indexed field for {object}"),
        );
    }
    // Fields the object does not have refuse the whole request.
    for record in records {
        let unknown = record
            .as_object()
            .into_iter()
            .flat_map(|r| r.keys())
            .find(|k| *k != "attributes" && !CONTACT_FIELDS.contains(&k.as_str()));
        if let Some(name) = unknown {
            return error(
                400,
                "INVALID_FIELD",
                &format!("No such column '{name}' on sobject of type {object}"),
            );
        }
    }
    // Values Salesforce cannot deserialize refuse the whole request.
    for record in records {
        if let Some(stamp) = record.get("Last_Order__c").and_then(Value::as_str)
            && !is_salesforce_date_time(stamp)
        {
            return error(
                400,
                "JSON_PARSER_ERROR",
                &format!("Cannot deserialize instance of datetime from VALUE_STRING value {stamp}"),
            );
        }
        if let Some(date) = record.get("Birthdate").and_then(Value::as_str) {
            let ok = date.len() == 10
                && date.chars().enumerate().all(|(i, c)| {
                    if i == 4 || i == 7 {
                        c == '-'
                    } else {
                        c.is_ascii_digit()
                    }
                });
            if !ok {
                return error(
                    400,
                    "JSON_PARSER_ERROR",
                    &format!(
                        "Cannot deserialize instance of date from VALUE_STRING value {date} or request may be missing a required field"
                    ),
                );
            }
        }
    }
    let mut results = Vec::with_capacity(records.len());
    let mut store = lock(&shared.store);
    let rows = store.entry(object.to_owned()).or_default();
    for record in records {
        let Some(fields) = record.as_object() else {
            results.push(json!({"success": false, "errors": [{"statusCode": "INVALID_INPUT", "message": "not an object", "fields": []}]}));
            continue;
        };
        if record["attributes"]["type"].as_str() != Some(object) {
            results.push(json!({"success": false, "errors": [{"statusCode": "INVALID_TYPE", "message": "attributes.type must name the object", "fields": []}]}));
            continue;
        }
        let key = match fields.get(field) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                results.push(
                    json!({"success": false, "errors": [{"statusCode": "MISSING_ARGUMENT",
                    "message": format!("{field} not specified"), "fields": [field]}]}),
                );
                continue;
            }
        };
        let mut clean = fields.clone();
        clean.remove("attributes");
        if let Some(existing) = rows.iter_mut().find(|r| r.text(field) == key) {
            for (k, v) in clean {
                existing.fields.insert(k, v);
            }
            results.push(json!({"id": existing.id, "success": true, "created": false, "errors": []}));
        } else if object == "Contact"
            && !matches!(clean.get("LastName"), Some(Value::String(s)) if !s.is_empty())
        {
            results.push(
                json!({"success": false, "errors": [{"statusCode": "REQUIRED_FIELD_MISSING",
                "message": "Required fields are missing: [LastName]", "fields": ["LastName"]}]}),
            );
        } else {
            let id = new_id(shared);
            rows.push(StoredRecord {
                id: id.clone(),
                fields: clean,
            });
            results.push(json!({"id": id, "success": true, "created": true, "errors": []}));
        }
    }
    respond(200, Value::Array(results))
}

/// Reads `SELECT Id, F FROM O WHERE F IN ('a', 'b')`.
fn parse_soql(q: &str) -> Option<(String, String, Vec<String>)> {
    let rest = q.strip_prefix("SELECT Id, ")?;
    let (field, rest) = rest.split_once(" FROM ")?;
    let (object, rest) = rest.split_once(" WHERE ")?;
    let rest = rest
        .strip_prefix(field)?
        .strip_prefix(" IN (")?
        .strip_suffix(')')?;
    let mut values = Vec::new();
    let mut chars = rest.chars();
    loop {
        match chars.next() {
            None => break,
            Some(' ' | ',') => continue,
            Some('\'') => {
                let mut value = String::new();
                loop {
                    match chars.next()? {
                        '\\' => match chars.next()? {
                            'n' => value.push('\n'),
                            'r' => value.push('\r'),
                            't' => value.push('\t'),
                            other => value.push(other),
                        },
                        '\'' => break,
                        other => value.push(other),
                    }
                }
                values.push(value);
            }
            Some(_) => return None,
        }
    }
    Some((field.to_owned(), object.to_owned(), values))
}

fn soql(shared: &Shared, q: &str) -> Response {
    let Some((field, object, values)) = parse_soql(q) else {
        return error(400, "MALFORMED_QUERY", "unexpected token");
    };
    let store = lock(&shared.store);
    let records: Vec<Value> = store
        .get(&object)
        .into_iter()
        .flatten()
        .filter(|r| values.contains(&r.text(&field)))
        .map(|r| {
            json!({"attributes": {"type": object, "url": format!("/services/data/v61.0/sobjects/{object}/{}", r.id)},
                   "Id": r.id, field.clone(): r.fields.get(&field).cloned().unwrap_or(Value::Null)})
        })
        .collect();
    respond(
        200,
        json!({"totalSize": records.len(), "done": true, "records": records}),
    )
}

fn destroy(shared: &Shared, query: &BTreeMap<String, String>) -> Response {
    let ids: Vec<&str> = query
        .get("ids")
        .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return error(400, "MISSING_ARGUMENT", "ids not specified");
    }
    if ids.len() > MAX_RECORDS {
        return error(
            400,
            "EXCEEDED_ID_LIMIT",
            "record limit reached. cannot submit more than 200 records into this call",
        );
    }
    let mut store = lock(&shared.store);
    let results: Vec<Value> = ids
        .iter()
        .map(|id| {
            let found = store.values_mut().find_map(|rows| {
                rows.iter().position(|r| r.id == *id).map(|p| rows.remove(p))
            });
            match found {
                Some(_) => json!({"id": id, "success": true, "errors": []}),
                None => json!({"id": id, "success": false, "errors": [{"statusCode": "ENTITY_IS_DELETED", "message": "entity is deleted", "fields": []}]}),
            }
        })
        .collect();
    respond(200, Value::Array(results))
}

fn job_info(job: &BulkJob, version: &str) -> Value {
    let mut info = json!({
        "id": job.id, "operation": job.operation, "object": job.object,
        "createdById": "005xx000001Sv6eAAC", "createdDate": "2024-06-01T12:00:00.000+0000",
        "systemModstamp": "2024-06-01T12:00:00.000+0000", "state": job.state,
        "concurrencyMode": "Parallel", "contentType": "CSV",
        "apiVersion": version.trim_start_matches('v').parse::<f64>().unwrap_or(61.0),
        "jobType": "V2Ingest", "lineEnding": "LF", "columnDelimiter": "COMMA",
        "numberRecordsProcessed": job.processed, "numberRecordsFailed": job.failed.len(),
        "retries": 0, "totalProcessingTime": 0,
    });
    if let Some(field) = &job.external_id_field {
        info["externalIdFieldName"] = json!(field);
    }
    if let Some(message) = &job.error_message {
        info["errorMessage"] = json!(message);
    }
    info
}

fn create_job(shared: &Shared, version: &str, body: &str) -> Response {
    let Ok(spec) = serde_json::from_str::<Value>(body) else {
        return error(
            400,
            "JSON_PARSER_ERROR",
            "Unexpected character in the request body",
        );
    };
    let text = |name: &str| spec.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(object), Some(operation)) = (text("object"), text("operation")) else {
        return error(400, "INVALIDJOB", "object and operation are required");
    };
    if !["insert", "upsert", "update", "delete", "hardDelete"].contains(&operation.as_str()) {
        return error(400, "INVALIDJOB", &format!("Invalid operation: {operation}"));
    }
    if text("contentType").is_some_and(|c| c != "CSV") {
        return error(400, "INVALIDJOB", "contentType must be CSV");
    }
    if text("lineEnding").is_some_and(|l| l != "LF") {
        return error(400, "INVALIDJOB", "the double reads LF line endings only");
    }
    let external_id_field = text("externalIdFieldName");
    if operation == "upsert" && external_id_field.is_none() {
        return error(400, "INVALIDJOB", "externalIdFieldName is required for upsert");
    }
    let n = shared.next_id.fetch_add(1, Ordering::SeqCst);
    let job = BulkJob {
        id: format!("750Dn{n:010}AAA"),
        operation,
        object,
        external_id_field,
        state: "Open".to_owned(),
        data: None,
        error_message: None,
        processed: 0,
        successful: Vec::new(),
        failed: Vec::new(),
        header: Vec::new(),
    };
    let info = job_info(&job, version);
    lock(&shared.jobs).insert(job.id.clone(), job);
    respond(200, info)
}

fn upload(shared: &Shared, id: &str, content_type: Option<&str>, body: &str) -> Response {
    let mut jobs = lock(&shared.jobs);
    let Some(job) = jobs.get_mut(id) else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    if job.state != "Open" || job.data.is_some() {
        return error(409, "INVALIDJOBSTATE", "Job is not open for data upload");
    }
    if content_type.is_none_or(|c| !c.starts_with("text/csv")) {
        return error(400, "INVALIDCONTENTTYPE", "Content-Type must be text/csv");
    }
    if body.is_empty() {
        return error(400, "INVALIDBATCH", "The uploaded data is empty");
    }
    job.data = Some(body.to_owned());
    StatusCode::CREATED.into_response()
}

fn change_state(shared: &Shared, id: &str, body: &str) -> Response {
    let state = serde_json::from_str::<Value>(body).unwrap_or(Value::Null)["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut jobs = lock(&shared.jobs);
    let Some(job) = jobs.get_mut(id) else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    match state.as_str() {
        "UploadComplete" if job.state != "Open" => {
            return error(409, "INVALIDJOBSTATE", "Job is not open");
        }
        "UploadComplete" if job.data.is_none() => {
            return error(400, "INVALIDJOBSTATE", "No data was uploaded for the job");
        }
        "Aborted" if matches!(job.state.as_str(), "JobComplete" | "Failed" | "Aborted") => {
            return error(409, "INVALIDJOBSTATE", "Job has already ended");
        }
        "UploadComplete" | "Aborted" => job.state = state,
        _ => return error(400, "INVALIDJOBSTATE", "Invalid state change"),
    }
    respond(200, job_info(job, "v61.0"))
}

fn poll(shared: &Shared, id: &str) -> Response {
    let hold = lock(&shared.script).hold_jobs;
    let mut jobs = lock(&shared.jobs);
    let Some(job) = jobs.get_mut(id) else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    match job.state.as_str() {
        "UploadComplete" => job.state = "InProgress".to_owned(),
        "InProgress" if !hold => process(shared, job),
        _ => {}
    }
    respond(200, job_info(job, "v61.0"))
}

/// Runs a job's data against the store: the header is checked, then each row.
fn process(shared: &Shared, job: &mut BulkJob) {
    let rows = parse_csv(job.data.as_deref().unwrap_or_default());
    let mut rows = rows.into_iter();
    let header = rows.next().unwrap_or_default();
    let unknown = header.iter().find(|column| {
        !column.contains('.') && job.object == "Contact" && !CONTACT_FIELDS.contains(&column.as_str())
    });
    let key_column = match job.operation.as_str() {
        "delete" | "hardDelete" => "Id".to_owned(),
        _ => job.external_id_field.clone().unwrap_or_else(|| "Id".to_owned()),
    };
    let missing_key = (job.operation != "insert" && !header.contains(&key_column)).then_some(&key_column);
    if let Some(column) = unknown.or(missing_key) {
        job.state = "Failed".to_owned();
        job.error_message = Some(format!("InvalidBatch : Field name not found : {column}"));
        return;
    }
    job.header = header.clone();
    let key_at = header.iter().position(|c| *c == key_column);
    let rejects = lock(&shared.bulk_rejects).clone();
    let mut store = lock(&shared.store);
    for row in rows {
        job.processed += 1;
        let key = key_at.and_then(|k| row.get(k)).cloned().unwrap_or_default();
        if let Some(sf_error) = rejects.get(&key) {
            job.failed.push((String::new(), sf_error.clone(), row));
            continue;
        }
        if matches!(job.operation.as_str(), "delete" | "hardDelete") {
            let found = store
                .values_mut()
                .find_map(|rows| rows.iter().position(|r| r.id == key).map(|p| rows.remove(p)));
            match found {
                Some(_) => job.successful.push((key, false, row)),
                None => job
                    .failed
                    .push((key, "ENTITY_IS_DELETED:entity is deleted:--".to_owned(), row)),
            }
            continue;
        }
        let bad_stamp = header.iter().zip(&row).find(|(column, cell)| {
            *column == "Last_Order__c"
                && !cell.is_empty()
                && *cell != "#N/A"
                && !is_salesforce_date_time(cell)
        });
        if let Some((_, cell)) = bad_stamp {
            let error = format!(
                "INVALID_TYPE_ON_FIELD_IN_RECORD:Last Order: value not of required type: {cell}:Last_Order__c --"
            );
            job.failed.push((String::new(), error, row));
            continue;
        }
        // An empty cell leaves the field as it is; `#N/A` clears it.
        let mut fields = Map::new();
        for (column, cell) in header.iter().zip(&row) {
            match cell.as_str() {
                "" => {}
                "#N/A" => {
                    fields.insert(column.clone(), Value::Null);
                }
                text => {
                    fields.insert(column.clone(), Value::String(text.to_owned()));
                }
            }
        }
        let records = store.entry(job.object.clone()).or_default();
        if key.is_empty() {
            let error = format!("MISSING_ARGUMENT:{key_column} not specified:{key_column} --");
            job.failed.push((String::new(), error, row));
        } else if let Some(existing) = records.iter_mut().find(|r| r.text(&key_column) == key) {
            existing.fields.extend(fields);
            job.successful.push((existing.id.clone(), false, row));
        } else if job.object == "Contact"
            && !matches!(fields.get("LastName"), Some(Value::String(s)) if !s.is_empty())
        {
            let error = "REQUIRED_FIELD_MISSING:Required fields are missing: [LastName]:LastName --";
            job.failed.push((String::new(), error.to_owned(), row));
        } else {
            let id = new_id(shared);
            records.push(StoredRecord {
                id: id.clone(),
                fields,
            });
            job.successful.push((id, true, row));
        }
    }
    job.state = "JobComplete".to_owned();
}

fn results(shared: &Shared, id: &str, kind: &str) -> Response {
    let jobs = lock(&shared.jobs);
    let Some(job) = jobs.get(id) else {
        return error(404, "NOT_FOUND", "The requested resource does not exist");
    };
    if !matches!(job.state.as_str(), "JobComplete" | "Failed" | "Aborted") {
        return error(409, "INVALIDJOBSTATE", "Job has not ended");
    }
    let quote = |field: &str| format!("\"{}\"", field.replace('"', "\"\""));
    let line = |fields: Vec<String>| {
        let quoted: Vec<String> = fields.iter().map(|f| quote(f)).collect();
        format!("{}\n", quoted.join(","))
    };
    let second = if kind == "failedResults" {
        "sf__Error"
    } else {
        "sf__Created"
    };
    let mut header = vec!["sf__Id".to_owned(), second.to_owned()];
    header.extend(job.header.iter().cloned());
    let mut out = line(header);
    // Salesforce does not keep the upload's order; the double reverses it.
    if kind == "failedResults" {
        for (sf_id, sf_error, row) in job.failed.iter().rev() {
            let mut fields = vec![sf_id.clone(), sf_error.clone()];
            fields.extend(row.iter().cloned());
            out.push_str(&line(fields));
        }
    } else {
        for (sf_id, created, row) in job.successful.iter().rev() {
            let mut fields = vec![sf_id.clone(), created.to_string()];
            fields.extend(row.iter().cloned());
            out.push_str(&line(fields));
        }
    }
    (StatusCode::OK, [("content-type", "text/csv")], out).into_response()
}

/// Reads RFC 4180 CSV with LF line endings into rows of fields.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, other) => field.push(other),
            (false, '"') => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, other) => field.push(other),
        }
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}
