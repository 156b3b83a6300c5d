//! A stand-in for BigQuery's REST API v2, Google's OAuth token endpoint and the GKE metadata
//! server, built on [`HttpDouble`] (its request log and scripted `429`/`503`s), serving
//! results the test registers per query text.
//!
//! Reproduced from the published contract:
//! - <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/insert> with
//!   `configuration.dryRun`: a `Job` whose `statistics.query.statementType` names the
//!   statement and `statistics.totalBytesProcessed` the bytes it would read.
//! - <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/query> and
//!   <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/getQueryResults>:
//!   `jobComplete: false` with a `jobReference` until the job is done, then `schema`, `rows`
//!   as `{"f":[{"v":…}]}` and a `pageToken` while rows remain; `maxResults`;
//!   `formatOptions.useInt64Timestamp`; `maximumBytesBilled` (over it, the job fails with
//!   `bytesBilledLimitExceeded`); `defaultDataset` (an unknown one is `404 notFound`).
//! - <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/cancel>.
//! - <https://cloud.google.com/bigquery/docs/error-messages>: `{"error":{"code","message",
//!   "errors":[{"reason","message"}]}}`, `403 rateLimitExceeded`, `401`.
//! - <https://developers.google.com/identity/protocols/oauth2/service-account#httprest>: the
//!   JWT-bearer grant, its RS256 assertion checked for real against the test key (`iss`,
//!   `scope`, `aud`, one hour at most).
//! - <https://cloud.google.com/compute/docs/access/authenticate-workloads#applications>: the
//!   metadata server's token, only with `Metadata-Flavor: Google`.
//!
//! Not reproduced: SQL (queries are looked up by exact text; the statement type of an
//! unknown one is its first word), locations and multi-region routing, job retries by
//! `requestId`, page size limits in bytes, `startIndex`, the Storage Read API, and Google's
//! exact messages.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::http_server::{Behaviour, HttpDouble, RecordedRequest, Reply};

/// The project jobs run in.
pub const PROJECT: &str = "acme-analytics";
/// The dataset that exists.
pub const DATASET: &str = "marts";
/// The service account whose key the tests use.
pub const CLIENT_EMAIL: &str = "backflow-reader@acme-analytics.iam.gserviceaccount.com";
const PUBLIC_KEY: &str = include_str!("../fixtures/keys/test-rsa.pub.pem");

/// A service-account key file for [`CLIENT_EMAIL`], signed with the test key.
pub fn service_account_json() -> String {
    json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "0123abcd",
        "private_key": super::snowflake_double::PRIVATE_KEY,
        "client_email": CLIENT_EMAIL,
        "token_uri": "https://oauth2.googleapis.com/token",
    })
    .to_string()
}

/// A result the double serves for one query.
#[derive(Clone)]
pub struct BqResult {
    /// `schema.fields`, like `{"name":"id","type":"INTEGER","mode":"NULLABLE"}`.
    pub fields: Vec<Value>,
    /// Rows as the API sends them: `{"f":[{"v":…}]}`.
    rows: Arc<dyn Fn(u64) -> Value + Send + Sync>,
    count: u64,
    /// Bytes the dry run reports.
    pub bytes: u64,
}

impl BqResult {
    /// A result holding these rows, each a list of cell values (`v`).
    pub fn rows(fields: Vec<Value>, rows: Vec<Vec<Value>>) -> Self {
        let rows = Arc::new(rows);
        let count = rows.len() as u64;
        BqResult {
            fields,
            rows: Arc::new(
                move |i| json!({"f": rows[i as usize].iter().map(|v| json!({"v": v})).collect::<Vec<_>>()}),
            ),
            count,
            bytes: 1024,
        }
    }

    /// A result of `count` rows made on demand (cell values).
    pub fn generated(
        fields: Vec<Value>,
        count: u64,
        make: Arc<dyn Fn(u64) -> Vec<Value> + Send + Sync>,
    ) -> Self {
        BqResult {
            fields,
            rows: Arc::new(
                move |i| json!({"f": make(i).into_iter().map(|v| json!({"v": v})).collect::<Vec<_>>()}),
            ),
            count,
            bytes: 1024,
        }
    }

    /// Sets the bytes the dry run reports.
    pub fn processing(mut self, bytes: u64) -> Self {
        self.bytes = bytes;
        self
    }
}

struct Job {
    query: String,
    polls_left: usize,
    cancelled: bool,
    max_bytes: Option<u64>,
}

#[derive(Default)]
struct State {
    results: BTreeMap<String, BqResult>,
    jobs: BTreeMap<String, Job>,
    running_polls: usize,
    run_forever: bool,
    tokens: BTreeSet<String>,
    expire_next: usize,
    throttle_pages: usize,
    cancelled: Vec<String>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running BigQuery double.
pub struct BigQueryDouble {
    /// Its base URL: the endpoint override the tests give the source.
    pub url: String,
    http: HttpDouble,
    state: Arc<Mutex<State>>,
}

impl BigQueryDouble {
    /// Starts a double; `behaviour` may script failures of the first requests.
    pub async fn start_with(behaviour: Behaviour) -> BigQueryDouble {
        let state = Arc::new(Mutex::new(State {
            running_polls: 1,
            ..State::default()
        }));
        let handler_state = state.clone();
        let next = Arc::new(AtomicUsize::new(1));
        let http = HttpDouble::start(behaviour.handler(move |r| answer(&handler_state, &next, r))).await;
        BigQueryDouble {
            url: http.url.clone(),
            http,
            state,
        }
    }

    /// Starts a double without scripted failures.
    pub async fn start() -> BigQueryDouble {
        Self::start_with(Behaviour::accept_all()).await
    }

    /// The source URL.
    pub fn source_url(&self) -> String {
        format!("bigquery://{PROJECT}/{DATASET}?location=EU")
    }

    /// Serves `result` for `query`.
    pub fn serve(&self, query: &str, result: BqResult) {
        lock(&self.state).results.insert(query.to_owned(), result);
    }

    /// Answers `jobComplete: false` this many times before a job completes.
    pub fn running_polls(&self, polls: usize) {
        lock(&self.state).running_polls = polls;
    }

    /// Jobs never complete (until cancelled).
    pub fn run_forever(&self) {
        lock(&self.state).run_forever = true;
    }

    /// The next `times` API requests get `401`, and every token issued so far stops working.
    pub fn expire_tokens(&self, times: usize) {
        lock(&self.state).expire_next = times;
    }

    /// The next `times` page requests get `403 rateLimitExceeded`.
    pub fn throttle_pages(&self, times: usize) {
        lock(&self.state).throttle_pages = times;
    }

    /// The ids of the jobs cancelled so far.
    pub fn cancelled(&self) -> Vec<String> {
        lock(&self.state).cancelled.clone()
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.http.requests()
    }
}

fn error(status: u16, reason: &str, message: &str) -> Reply {
    Reply::new(
        status,
        json!({"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}).to_string(),
    )
}

fn answer(state: &Mutex<State>, next: &AtomicUsize, request: &RecordedRequest) -> Reply {
    let path = request.path.clone();
    if path == "/token" {
        return token(state, request);
    }
    if path == "/computeMetadata/v1/instance/service-accounts/default/token" {
        if request.header("metadata-flavor") != Some("Google") {
            return Reply::new(403, "Missing Metadata-Flavor:Google header.");
        }
        return issue(state);
    }
    if let Err(reply) = authenticate(state, request) {
        return reply;
    }
    let Some(rest) = path.strip_prefix(&format!("/bigquery/v2/projects/{PROJECT}/")) else {
        return error(404, "notFound", "Not found: project");
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let params: BTreeMap<String, String> = request
        .query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    match (request.method.as_str(), parts.as_slice()) {
        ("POST", ["jobs"]) => dry_run(state, request),
        ("POST", ["queries"]) => query(state, next, request),
        ("GET", ["queries", job]) => results(state, job, &params),
        ("POST", ["jobs", job, "cancel"]) => {
            let mut guard = lock(state);
            if let Some(j) = guard.jobs.get_mut(*job) {
                j.cancelled = true;
                guard.cancelled.push((*job).to_owned());
            }
            Reply::new(
                200,
                json!({"kind": "bigquery#jobCancelResponse", "job": {"jobReference": {"jobId": job}}})
                    .to_string(),
            )
        }
        _ => error(404, "notFound", "Not found"),
    }
}

fn token(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
    let body = request.body_text();
    let form: BTreeMap<String, String> = body
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_owned(),
                percent_encoding::percent_decode_str(v)
                    .decode_utf8_lossy()
                    .into_owned(),
            )
        })
        .collect();
    if form.get("grant_type").map(String::as_str) != Some("urn:ietf:params:oauth:grant-type:jwt-bearer") {
        return Reply::new(400, r#"{"error":"unsupported_grant_type"}"#);
    }
    let assertion = form.get("assertion").cloned().unwrap_or_default();
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).expect("the test public key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&["https://oauth2.googleapis.com/token"]);
    let Ok(data) = jsonwebtoken::decode::<Value>(&assertion, &key, &validation) else {
        return Reply::new(
            400,
            r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
        );
    };
    let claims = data.claims;
    let lifetime = claims["exp"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(claims["iat"].as_u64().unwrap_or(0));
    if claims["iss"] != json!(CLIENT_EMAIL)
        || claims["scope"] != json!("https://www.googleapis.com/auth/bigquery")
        || lifetime > 3600
    {
        return Reply::new(
            400,
            r#"{"error":"invalid_grant","error_description":"Invalid JWT: claims"}"#,
        );
    }
    issue(state)
}

fn issue(state: &Mutex<State>) -> Reply {
    let mut guard = lock(state);
    let value = format!(
        "ya29.test-{}",
        guard.tokens.len() + guard.cancelled.len() * 1000 + 1
    );
    guard.tokens.insert(value.clone());
    Reply::new(
        200,
        json!({"access_token": value, "expires_in": 3599, "token_type": "Bearer"}).to_string(),
    )
}

fn authenticate(state: &Mutex<State>, request: &RecordedRequest) -> Result<(), Reply> {
    let token = request
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    let mut guard = lock(state);
    if guard.expire_next > 0 {
        guard.expire_next -= 1;
        guard.tokens.clear();
        return Err(error(
            401,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        ));
    }
    if guard.tokens.contains(token) {
        Ok(())
    } else {
        Err(error(
            401,
            "authError",
            "Request had invalid authentication credentials.",
        ))
    }
}

fn dataset_error(body: &Value) -> Option<Reply> {
    let dataset = body["defaultDataset"]["datasetId"].as_str()?;
    (dataset != DATASET).then(|| {
        error(
            404,
            "notFound",
            &format!("Not found: Dataset {PROJECT}:{dataset} was not found in location EU"),
        )
    })
}

fn dry_run(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
    let body = request.json.clone().unwrap_or(Value::Null);
    if body["configuration"]["dryRun"] != json!(true) {
        return error(400, "invalid", "only dry runs are served on jobs.insert");
    }
    let query = &body["configuration"]["query"];
    if let Some(reply) = dataset_error(query) {
        return reply;
    }
    let text = query["query"].as_str().unwrap_or_default();
    let guard = lock(state);
    let (statement_type, bytes) = match guard.results.get(text) {
        Some(result) => ("SELECT".to_owned(), result.bytes),
        None => {
            let first = text.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
            if first == "SELECT" {
                return error(
                    404,
                    "notFound",
                    &format!("Not found: Table {PROJECT}:{DATASET}.nowhere was not found in location EU"),
                );
            }
            (first, 0)
        }
    };
    Reply::new(
        200,
        json!({
            "kind": "bigquery#job",
            "status": {"state": "DONE"},
            "statistics": {"totalBytesProcessed": bytes.to_string(), "query": {"statementType": statement_type, "totalBytesProcessed": bytes.to_string()}},
            "configuration": body["configuration"],
        })
        .to_string(),
    )
}

fn query(state: &Mutex<State>, next: &AtomicUsize, request: &RecordedRequest) -> Reply {
    let body = request.json.clone().unwrap_or(Value::Null);
    if let Some(reply) = dataset_error(&body) {
        return reply;
    }
    let text = body["query"].as_str().unwrap_or_default().to_owned();
    let job = format!("job_{:06}", next.fetch_add(1, Ordering::SeqCst));
    {
        let mut guard = lock(state);
        if !guard.results.contains_key(&text) {
            return error(
                400,
                "invalidQuery",
                "Syntax error: Unexpected identifier at [1:1]",
            );
        }
        let polls_left = if guard.run_forever {
            usize::MAX
        } else {
            guard.running_polls
        };
        guard.jobs.insert(
            job.clone(),
            Job {
                query: text,
                polls_left,
                cancelled: false,
                max_bytes: body["maximumBytesBilled"].as_str().and_then(|b| b.parse().ok()),
            },
        );
    }
    let max = body["maxResults"].as_u64().unwrap_or(10_000);
    page(state, &job, None, max)
}

fn results(state: &Mutex<State>, job: &str, params: &BTreeMap<String, String>) -> Reply {
    if params.get("formatOptions.useInt64Timestamp").map(String::as_str) != Some("true") {
        return error(400, "invalid", "this double only serves int64 timestamps");
    }
    {
        let mut guard = lock(state);
        if params.contains_key("pageToken") && guard.throttle_pages > 0 {
            guard.throttle_pages -= 1;
            return error(
                403,
                "rateLimitExceeded",
                "Exceeded rate limits: too many api requests per user per method for this user_method.",
            );
        }
    }
    let start = params
        .get("pageToken")
        .and_then(|t| t.strip_prefix("tok"))
        .and_then(|n| n.parse().ok());
    let max = params
        .get("maxResults")
        .and_then(|m| m.parse().ok())
        .unwrap_or(10_000);
    page(state, job, start, max)
}

fn page(state: &Mutex<State>, job: &str, start: Option<u64>, max: u64) -> Reply {
    let mut guard = lock(state);
    let shared = &mut *guard;
    let Some(j) = shared.jobs.get_mut(job) else {
        return error(404, "notFound", &format!("Not found: Job {PROJECT}:EU.{job}"));
    };
    let reference = json!({"projectId": PROJECT, "jobId": job, "location": "EU"});
    if j.cancelled {
        return Reply::new(200, json!({"jobReference": reference, "jobComplete": true, "errors": [{"reason": "stopped", "message": "Job execution was cancelled: User requested cancellation"}]}).to_string());
    }
    if j.polls_left > 0 {
        j.polls_left -= 1;
        return Reply::new(
            200,
            json!({"kind": "bigquery#queryResponse", "jobReference": reference, "jobComplete": false})
                .to_string(),
        );
    }
    let result = shared.results.get(&j.query).cloned().expect("a served query");
    if let Some(max_bytes) = j.max_bytes
        && result.bytes > max_bytes
    {
        return error(
            400,
            "bytesBilledLimitExceeded",
            &format!(
                "Query exceeded limit for bytes billed: {max_bytes}. {} or higher required.",
                result.bytes
            ),
        );
    }
    drop(guard);
    let start = start.unwrap_or(0).min(result.count);
    let end = (start + max.max(1)).min(result.count);
    let rows: Vec<Value> = (start..end).map(|i| (result.rows)(i)).collect();
    let mut body = json!({
        "kind": "bigquery#getQueryResultsResponse",
        "jobReference": reference,
        "jobComplete": true,
        "schema": {"fields": result.fields},
        "totalRows": result.count.to_string(),
        "rows": rows,
    });
    if end < result.count {
        body["pageToken"] = json!(format!("tok{end}"));
    }
    Reply::new(200, body.to_string())
}
