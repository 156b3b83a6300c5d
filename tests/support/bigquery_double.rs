//! A stand-in for BigQuery's REST API v2, Google's OAuth token endpoint and the GKE metadata
//! server, built on the shared [`StatementDouble`] (results registered per query text,
//! polling, cancellation, scripted token expiry and throttling) over `HttpDouble` (its
//! request log and scripted `429`/`503`s).
//!
//! Reproduced from the published contract:
//! - <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/insert> with
//!   `configuration.dryRun`: a `Job` whose `statistics.query.statementType` names the
//!   statement and `statistics.totalBytesProcessed` the bytes it would read.
//! - <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/query> and
//!   <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/getQueryResults>:
//!   `jobComplete: false` with a `jobReference` until the job is done, then `schema`, `rows`
//!   as `{"f":[{"v":…}]}`, `totalRows`, and a `pageToken` while rows remain; `maxResults`;
//!   `startIndex` (a page from that row on, instead of a `pageToken`); a page cut short as
//!   BigQuery cuts one at about 10 MB (scripted by rows: `page_cap`);
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
//! `requestId`, page size limits in bytes (a cap in rows stands for them), the Storage Read API, and Google's
//! exact messages.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::http_server::{Behaviour, RecordedRequest, Reply};
use super::statement_double::{Outcome, Poll, ResultRows, Service, StatementDouble, lock};

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
    /// Rows as the API sends them: `{"f":[{"v":…}]}` (pages are cut by `maxResults`).
    rows: ResultRows<Value>,
    /// Bytes the dry run reports.
    pub bytes: u64,
}

/// A row as the API sends it.
fn row(cells: Vec<Value>) -> Value {
    json!({"f": cells.into_iter().map(|v| json!({"v": v})).collect::<Vec<_>>()})
}

impl BqResult {
    /// A result holding these rows, each a list of cell values (`v`).
    pub fn rows(fields: Vec<Value>, rows: Vec<Vec<Value>>) -> Self {
        BqResult {
            fields,
            rows: ResultRows::fixed(rows.into_iter().map(row).collect(), 10_000),
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
            rows: ResultRows::made(count, Arc::new(move |i| row(make(i))), 10_000),
            bytes: 1024,
        }
    }

    /// Sets the bytes the dry run reports.
    pub fn processing(mut self, bytes: u64) -> Self {
        self.bytes = bytes;
        self
    }
}

/// What the double keeps besides its jobs.
#[derive(Default)]
pub struct BigQuery {
    tokens: BTreeSet<String>,
    issued: usize,
    page_cap: Option<u64>,
    without_total_rows: bool,
}

/// The query's `maximumBytesBilled`, kept per job.
pub type MaxBytes = Option<u64>;

type State = Service<BqResult, MaxBytes, BigQuery>;

/// A running BigQuery double: the shared statement double (`url`, `serve`, `running_polls`,
/// `run_forever`, `expire_tokens`, `cancelled`, `requests`) and what is BigQuery's own.
/// Expired tokens are all tokens issued so far.
pub struct BigQueryDouble(StatementDouble<BqResult, MaxBytes, BigQuery>);

impl Deref for BigQueryDouble {
    type Target = StatementDouble<BqResult, MaxBytes, BigQuery>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl BigQueryDouble {
    /// Starts a double; `behaviour` may script failures of the first requests.
    pub async fn start_with(behaviour: Behaviour) -> BigQueryDouble {
        BigQueryDouble(StatementDouble::start(behaviour, BigQuery::default(), answer).await)
    }

    /// Starts a double without scripted failures.
    pub async fn start() -> BigQueryDouble {
        Self::start_with(Behaviour::accept_all()).await
    }

    /// The source URL.
    pub fn source_url(&self) -> String {
        format!("bigquery://{PROJECT}/{DATASET}?location=EU")
    }

    /// The next `times` page requests get `403 rateLimitExceeded`.
    pub fn throttle_pages(&self, times: usize) {
        self.throttle_fetches(times);
    }

    /// No page holds more than `rows` rows, whatever `maxResults` asks (BigQuery cuts a page
    /// at about 10 MB).
    pub fn page_cap(&self, rows: u64) {
        self.state().own.page_cap = Some(rows.max(1));
    }

    /// Answers leave out `totalRows` (the source then pages by `pageToken`).
    pub fn without_total_rows(&self) {
        self.state().own.without_total_rows = true;
    }
}

fn error(status: u16, reason: &str, message: &str) -> Reply {
    Reply::new(
        status,
        json!({"error": {"code": status, "message": message, "errors": [{"reason": reason, "message": message}]}}).to_string(),
    )
}

fn answer(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
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
        ("POST", ["queries"]) => query(state, request),
        ("GET", ["queries", job]) => results(state, job, &params),
        ("POST", ["jobs", job, "cancel"]) => {
            lock(state).statements.cancel(job);
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
    // Numbered by issue, so a token issued after an expiry never repeats an expired one.
    guard.own.issued += 1;
    let value = format!("ya29.test-{}", guard.own.issued);
    guard.own.tokens.insert(value.clone());
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
    if guard.statements.take_expiry() {
        guard.own.tokens.clear();
        return Err(error(
            401,
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        ));
    }
    if guard.own.tokens.contains(token) {
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
    let (statement_type, bytes) = match guard.statements.registered(text) {
        Some(Outcome::Rows(result)) => ("SELECT".to_owned(), result.bytes),
        Some(Outcome::Fail { .. }) => ("SELECT".to_owned(), 0),
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

fn query(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
    let body = request.json.clone().unwrap_or(Value::Null);
    if let Some(reply) = dataset_error(&body) {
        return reply;
    }
    let text = body["query"].as_str().unwrap_or_default();
    let job = {
        let mut guard = lock(state);
        let Some(outcome) = guard.statements.registered(text) else {
            return error(
                400,
                "invalidQuery",
                "Syntax error: Unexpected identifier at [1:1]",
            );
        };
        let job = format!("job_{:06}", guard.statements.next_number());
        let max_bytes = body["maximumBytesBilled"].as_str().and_then(|b| b.parse().ok());
        guard.statements.insert(job.clone(), outcome, max_bytes);
        job
    };
    let max = body["maxResults"].as_u64().unwrap_or(10_000);
    page(state, &job, None, max)
}

fn results(state: &Mutex<State>, job: &str, params: &BTreeMap<String, String>) -> Reply {
    if params.get("formatOptions.useInt64Timestamp").map(String::as_str) != Some("true") {
        return error(400, "invalid", "this double only serves int64 timestamps");
    }
    {
        let mut guard = lock(state);
        if (params.contains_key("pageToken") || params.contains_key("startIndex"))
            && guard.statements.take_throttle()
        {
            return error(
                403,
                "rateLimitExceeded",
                "Exceeded rate limits: too many api requests per user per method for this user_method.",
            );
        }
    }
    let start = match params.get("startIndex") {
        Some(index) => match index.parse() {
            Ok(index) => Some(index),
            Err(_) => return error(400, "invalid", "Invalid value for startIndex"),
        },
        None => params
            .get("pageToken")
            .and_then(|t| t.strip_prefix("tok"))
            .and_then(|n| n.parse().ok()),
    };
    let max = params
        .get("maxResults")
        .and_then(|m| m.parse().ok())
        .unwrap_or(10_000);
    page(state, job, start, max)
}

fn page(state: &Mutex<State>, job: &str, start: Option<u64>, max: u64) -> Reply {
    let mut guard = lock(state);
    let reference = json!({"projectId": PROJECT, "jobId": job, "location": "EU"});
    let result = match guard.statements.poll(job) {
        Poll::Unknown => return error(404, "notFound", &format!("Not found: Job {PROJECT}:EU.{job}")),
        Poll::Cancelled => {
            return Reply::new(200, json!({"jobReference": reference, "jobComplete": true, "errors": [{"reason": "stopped", "message": "Job execution was cancelled: User requested cancellation"}]}).to_string());
        }
        Poll::Running => {
            return Reply::new(
                200,
                json!({"kind": "bigquery#queryResponse", "jobReference": reference, "jobComplete": false})
                    .to_string(),
            );
        }
        Poll::Done(Outcome::Fail { code, message }) => return error(400, &code, &message),
        Poll::Done(Outcome::Rows(result)) => result,
    };
    let max_bytes = guard.statements.get(job).and_then(|j| j.details);
    if let Some(max_bytes) = max_bytes
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
    let max = guard.own.page_cap.map_or(max, |cap| max.min(cap));
    let without_total_rows = guard.own.without_total_rows;
    drop(guard);
    let count = result.rows.len();
    let start = start.unwrap_or(0).min(count);
    let end = (start + max.max(1)).min(count);
    let rows = result.rows.range(start, end);
    let mut body = json!({
        "kind": "bigquery#getQueryResultsResponse",
        "jobReference": reference,
        "jobComplete": true,
        "schema": {"fields": result.fields},
        "totalRows": count.to_string(),
        "rows": rows,
    });
    if end < count {
        body["pageToken"] = json!(format!("tok{end}"));
    }
    if without_total_rows {
        body.as_object_mut().map(|o| o.remove("totalRows"));
    }
    Reply::new(200, body.to_string())
}
