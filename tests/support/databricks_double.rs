//! A stand-in for the Databricks SQL Statement Execution API 2.0 and the cloud storage behind
//! its external links, built on [`HttpDouble`] (its request log and scripted `429`/`503`s),
//! serving results the test registers per statement text.
//!
//! Reproduced from the published contract:
//! - <https://docs.databricks.com/api/workspace/statementexecution>: `POST
//!   /api/2.0/sql/statements` (`statement`, `warehouse_id`, `catalog`, `schema`,
//!   `wait_timeout`, `on_wait_timeout`, `disposition`, `format`), answering a
//!   `StatementResponse` whose `status.state` is `PENDING`/`RUNNING` until it is
//!   `SUCCEEDED` (with `manifest.schema.columns`, `total_chunk_count`, `chunks` and chunk 0 in
//!   `result`), `FAILED` (with `status.error`) or `CANCELED`; `GET .../statements/{id}`;
//!   `GET .../statements/{id}/result/chunks/{index}`; `POST .../statements/{id}/cancel`;
//!   `JSON_ARRAY` values as strings; `INLINE` (`data_array`) and `EXTERNAL_LINKS`
//!   dispositions; error bodies `{"error_code":…,"message":…}`.
//! - <https://docs.databricks.com/en/dev-tools/sql-execution-tutorial.html>: external links
//!   are pre-signed URLs fetched without Databricks credentials; like S3, this storage
//!   refuses a request that also carries an `Authorization` header (`400`), and answers
//!   `403` to an expired link.
//! - <https://docs.databricks.com/en/dev-tools/auth/oauth-m2m.html>: `POST /oidc/v1/token`
//!   with HTTP basic client credentials, `grant_type=client_credentials&scope=all-apis`,
//!   answering `{"access_token","token_type":"Bearer","expires_in"}`.
//!
//! Not reproduced: SQL itself (statements are looked up by exact text; an unknown one fails
//! with `TABLE_OR_VIEW_NOT_FOUND`), `ARROW_STREAM`/`CSV` formats, byte limits and the 25 MiB
//! inline cap, parameters, real link expiry times (expiry is scripted), warehouse start-up,
//! and the exact wording of Databricks' messages.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use base64::Engine as _;
use serde_json::{Value, json};

use super::http_server::{Behaviour, HttpDouble, RecordedRequest, Reply};

/// The workspace host in the source URL (requests go to the double through the override).
pub const HOST: &str = "dbc-a1b2c3d4-e5f6.cloud.databricks.com";
/// The SQL warehouse that exists.
pub const WAREHOUSE_ID: &str = "abc123def456";
/// The personal access token accepted.
pub const PAT: &str = "dapi0123456789abcdef";
/// The service principal accepted for OAuth M2M.
pub const CLIENT_ID: &str = "5a6b7c8d-sp";
/// Its OAuth secret.
pub const CLIENT_SECRET: &str = "dose0123secret";

/// Makes row `i` of a generated result.
pub type RowMaker = Arc<dyn Fn(u64) -> Vec<Option<String>> + Send + Sync>;

/// A result the double serves for one statement text.
#[derive(Clone)]
pub struct DbResult {
    /// `manifest.schema.columns` entries, like `{"name":"id","type_name":"LONG"}`.
    pub columns: Vec<Value>,
    rows: Rows,
    /// Rows per chunk.
    pub chunk_rows: usize,
}

#[derive(Clone)]
enum Rows {
    Fixed(Arc<Vec<Vec<Option<String>>>>),
    Made(u64, RowMaker),
}

impl DbResult {
    /// A result holding these rows (values in their `JSON_ARRAY` string forms).
    pub fn rows(columns: Vec<Value>, rows: Vec<Vec<Option<&str>>>) -> Self {
        let rows = rows
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.map(str::to_owned)).collect())
            .collect();
        DbResult {
            columns,
            rows: Rows::Fixed(Arc::new(rows)),
            chunk_rows: 2,
        }
    }

    /// A result of `count` rows made on demand.
    pub fn generated(columns: Vec<Value>, count: u64, make: RowMaker) -> Self {
        DbResult {
            columns,
            rows: Rows::Made(count, make),
            chunk_rows: 10_000,
        }
    }

    /// Sets the rows per chunk.
    pub fn chunked(mut self, rows: usize) -> Self {
        self.chunk_rows = rows.max(1);
        self
    }

    fn len(&self) -> u64 {
        match &self.rows {
            Rows::Fixed(rows) => rows.len() as u64,
            Rows::Made(count, _) => *count,
        }
    }

    fn chunks(&self) -> usize {
        (self.len() as usize).div_ceil(self.chunk_rows).max(1)
    }

    fn chunk_range(&self, index: usize) -> (u64, u64) {
        let start = (index * self.chunk_rows) as u64;
        (
            start.min(self.len()),
            (start + self.chunk_rows as u64).min(self.len()),
        )
    }

    fn chunk(&self, index: usize) -> Vec<Vec<Option<String>>> {
        let (start, end) = self.chunk_range(index);
        match &self.rows {
            Rows::Fixed(rows) => rows[start as usize..end as usize].to_vec(),
            Rows::Made(_, make) => (start..end).map(|i| make(i)).collect(),
        }
    }
}

#[derive(Clone)]
enum Outcome {
    Rows(DbResult),
    Fail { code: String, message: String },
}

struct Statement {
    outcome: Outcome,
    polls_left: usize,
    cancelled: bool,
    forever: bool,
    inline: bool,
}

#[derive(Default)]
struct State {
    base: OnceLock<String>,
    results: BTreeMap<String, Outcome>,
    statements: BTreeMap<String, Statement>,
    running_polls: usize,
    run_forever: bool,
    tokens: BTreeSet<String>,
    expire_next: usize,
    expire_links: usize,
    throttle_chunks: usize,
    token_lifetime: u64,
    cancelled: Vec<String>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running Databricks double.
pub struct DatabricksDouble {
    /// Its base URL: the endpoint override the tests give the source.
    pub url: String,
    http: HttpDouble,
    state: Arc<Mutex<State>>,
}

impl DatabricksDouble {
    /// Starts a double; `behaviour` may script failures of the first requests.
    pub async fn start_with(behaviour: Behaviour) -> DatabricksDouble {
        let state = Arc::new(Mutex::new(State {
            running_polls: 1,
            token_lifetime: 3600,
            tokens: BTreeSet::from([PAT.to_owned()]),
            ..State::default()
        }));
        let handler_state = state.clone();
        let next = Arc::new(AtomicUsize::new(1));
        let http =
            HttpDouble::start(behaviour.handler(move |request| answer(&handler_state, &next, request))).await;
        let _ = lock(&state).base.set(http.url.clone());
        DatabricksDouble {
            url: http.url.clone(),
            http,
            state,
        }
    }

    /// Starts a double without scripted failures.
    pub async fn start() -> DatabricksDouble {
        Self::start_with(Behaviour::accept_all()).await
    }

    /// The source URL, as copied from a warehouse's connection details.
    pub fn source_url(&self) -> String {
        format!("databricks://{HOST}/sql/1.0/warehouses/{WAREHOUSE_ID}?catalog=main&schema=marts")
    }

    /// Serves `result` for the statement `query`.
    pub fn serve(&self, query: &str, result: DbResult) {
        lock(&self.state)
            .results
            .insert(query.to_owned(), Outcome::Rows(result));
    }

    /// Fails the statement `query` with this error code and message.
    pub fn fail(&self, query: &str, code: &str, message: &str) {
        lock(&self.state).results.insert(
            query.to_owned(),
            Outcome::Fail {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        );
    }

    /// Answers `RUNNING` to this many polls before a statement ends.
    pub fn running_polls(&self, polls: usize) {
        lock(&self.state).running_polls = polls;
    }

    /// Statements never end (until cancelled).
    pub fn run_forever(&self) {
        lock(&self.state).run_forever = true;
    }

    /// The next `times` authenticated requests get `401`, and every token issued so far
    /// stops working (the personal access token too, for `times` requests only).
    pub fn expire_tokens(&self, times: usize) {
        lock(&self.state).expire_next = times;
    }

    /// The next `times` downloads of an external link get `403` (the link expired).
    pub fn expire_links(&self, times: usize) {
        lock(&self.state).expire_links = times;
    }

    /// The next `times` chunk requests get `429`.
    pub fn throttle_chunks(&self, times: usize) {
        lock(&self.state).throttle_chunks = times;
    }

    /// The ids of the statements cancelled so far.
    pub fn cancelled(&self) -> Vec<String> {
        lock(&self.state).cancelled.clone()
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.http.requests()
    }

    /// The requests to the cloud storage behind the external links.
    pub fn downloads(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/storage/"))
            .collect()
    }

    /// The signature of every external link handed out so far (a credential: it must
    /// appear nowhere in the source's output).
    pub fn link_signature_prefix() -> &'static str {
        "X-Amz-Signature=sig"
    }
}

fn error(status: u16, code: &str, message: &str) -> Reply {
    Reply::new(
        status,
        json!({"error_code": code, "message": message}).to_string(),
    )
}

fn answer(state: &Mutex<State>, next: &AtomicUsize, request: &RecordedRequest) -> Reply {
    let path = request.path.clone();
    if path == "/oidc/v1/token" {
        return token(state, request);
    }
    if let Some(rest) = path.strip_prefix("/storage/") {
        return download(state, rest, request);
    }
    if let Err(reply) = authenticate(state, request) {
        return reply;
    }
    let Some(rest) = path.strip_prefix("/api/2.0/sql/statements") else {
        return error(404, "ENDPOINT_NOT_FOUND", "No API found");
    };
    let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    match (request.method.as_str(), parts.as_slice()) {
        ("POST", [""]) => submit(state, next, request),
        ("GET", [id]) => status(state, id),
        ("GET", [id, "result", "chunks", index]) => chunk(state, id, index.parse().unwrap_or(usize::MAX)),
        ("POST", [id, "cancel"]) => {
            let mut guard = lock(state);
            if let Some(statement) = guard.statements.get_mut(*id) {
                statement.cancelled = true;
                guard.cancelled.push((*id).to_owned());
            }
            Reply::new(200, "{}")
        }
        _ => error(404, "ENDPOINT_NOT_FOUND", "No API found"),
    }
}

fn token(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let body = request.body_text();
    if request.header("authorization") != Some(expected.as_str()) {
        return Reply::new(
            401,
            r#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
        );
    }
    if !body.contains("grant_type=client_credentials") || !body.contains("scope=all-apis") {
        return Reply::new(400, r#"{"error":"invalid_request"}"#);
    }
    let mut guard = lock(state);
    let value = format!("oauth-token-{}", guard.tokens.len());
    guard.tokens.insert(value.clone());
    Reply::new(
        200,
        json!({"access_token": value, "token_type": "Bearer", "expires_in": guard.token_lifetime, "scope": "all-apis"}).to_string(),
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
        guard.tokens.retain(|t| t == PAT);
        return Err(error(401, "UNAUTHENTICATED", "Token is expired."));
    }
    if guard.tokens.contains(token) {
        Ok(())
    } else {
        Err(error(401, "UNAUTHENTICATED", "Invalid access token."))
    }
}

fn submit(state: &Mutex<State>, next: &AtomicUsize, request: &RecordedRequest) -> Reply {
    let body = request.json.clone().unwrap_or(Value::Null);
    if body["warehouse_id"] != json!(WAREHOUSE_ID) {
        return error(
            404,
            "RESOURCE_DOES_NOT_EXIST",
            &format!(
                "SQL warehouse {} does not exist.",
                body["warehouse_id"].as_str().unwrap_or("")
            ),
        );
    }
    let wait = body["wait_timeout"].as_str().unwrap_or("10s");
    let seconds: u64 = wait.trim_end_matches('s').parse().unwrap_or(u64::MAX);
    if seconds != 0 && !(5..=50).contains(&seconds) {
        return error(
            400,
            "INVALID_PARAMETER_VALUE",
            "wait_timeout must be 0 or between 5s and 50s",
        );
    }
    let text = body["statement"].as_str().unwrap_or_default().to_owned();
    let id = format!("01ef-{:08}", next.fetch_add(1, Ordering::SeqCst));
    {
        let mut guard = lock(state);
        let outcome = guard
            .results
            .get(&text)
            .cloned()
            .unwrap_or_else(|| Outcome::Fail {
                code: "BAD_REQUEST".to_owned(),
                message: "[TABLE_OR_VIEW_NOT_FOUND] The table or view cannot be found.".to_owned(),
            });
        let statement = Statement {
            outcome,
            polls_left: guard.running_polls,
            cancelled: false,
            forever: guard.run_forever,
            inline: body["disposition"] == json!("INLINE"),
        };
        guard.statements.insert(id.clone(), statement);
    }
    status(state, &id)
}

fn status(state: &Mutex<State>, id: &str) -> Reply {
    let mut guard = lock(state);
    let base = guard.base.get().cloned().unwrap_or_default();
    let Some(statement) = guard.statements.get_mut(id) else {
        return error(404, "RESOURCE_DOES_NOT_EXIST", "Statement not found");
    };
    if statement.cancelled {
        return Reply::new(
            200,
            json!({"statement_id": id, "status": {"state": "CANCELED"}}).to_string(),
        );
    }
    if statement.forever || statement.polls_left > 0 {
        statement.polls_left = statement.polls_left.saturating_sub(1);
        return Reply::new(
            200,
            json!({"statement_id": id, "status": {"state": "RUNNING"}}).to_string(),
        );
    }
    let result = match &statement.outcome {
        Outcome::Fail { code, message } => {
            return Reply::new(
                200,
                json!({"statement_id": id, "status": {"state": "FAILED", "error": {"error_code": code, "message": message}}}).to_string(),
            );
        }
        Outcome::Rows(result) => result.clone(),
    };
    let inline = statement.inline;
    drop(guard);
    let chunks: Vec<Value> = (0..result.chunks())
        .map(|i| {
            let (start, end) = result.chunk_range(i);
            json!({"chunk_index": i, "row_offset": start, "row_count": end - start})
        })
        .collect();
    let response = json!({
        "statement_id": id,
        "status": {"state": "SUCCEEDED"},
        "manifest": {
            "format": "JSON_ARRAY",
            "schema": {"column_count": result.columns.len(), "columns": result.columns},
            "total_chunk_count": result.chunks(),
            "chunks": chunks,
            "total_row_count": result.len(),
            "truncated": false,
        },
        "result": chunk_body(&base, id, &result, 0, inline),
    });
    Reply::new(200, response.to_string())
}

fn chunk_body(base: &str, id: &str, result: &DbResult, index: usize, inline: bool) -> Value {
    let (start, end) = result.chunk_range(index);
    let mut body = json!({"chunk_index": index, "row_offset": start, "row_count": end - start});
    if inline {
        body["data_array"] = json!(result.chunk(index));
    } else {
        body["external_links"] = json!([{
            "chunk_index": index,
            "row_offset": start,
            "row_count": end - start,
            "external_link": format!("{base}/storage/{id}/{index}?X-Amz-Expires=900&X-Amz-Signature=sig{id}x{index}"),
            "expiration": "2099-01-01T00:00:00.000Z",
            "http_headers": {"x-amz-server-side-encryption-customer-algorithm": "AES256"},
        }]);
    }
    if index + 1 < result.chunks() {
        body["next_chunk_index"] = json!(index + 1);
        body["next_chunk_internal_link"] = json!(format!(
            "/api/2.0/sql/statements/{id}/result/chunks/{}",
            index + 1
        ));
    }
    body
}

fn chunk(state: &Mutex<State>, id: &str, index: usize) -> Reply {
    let mut guard = lock(state);
    if guard.throttle_chunks > 0 {
        guard.throttle_chunks -= 1;
        return error(429, "TOO_MANY_REQUESTS", "Too many requests").header("retry-after", "0");
    }
    let base = guard.base.get().cloned().unwrap_or_default();
    let Some(Statement {
        outcome: Outcome::Rows(result),
        inline,
        ..
    }) = guard.statements.get(id)
    else {
        return error(404, "RESOURCE_DOES_NOT_EXIST", "Statement not found");
    };
    if index >= result.chunks() {
        return error(400, "INVALID_PARAMETER_VALUE", "chunk index out of range");
    }
    Reply::new(200, chunk_body(&base, id, result, index, *inline).to_string())
}

fn download(state: &Mutex<State>, rest: &str, request: &RecordedRequest) -> Reply {
    if request.header("authorization").is_some() {
        return Reply::new(
            400,
            "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
        )
        .header("content-type", "application/xml");
    }
    let mut guard = lock(state);
    if guard.expire_links > 0 {
        guard.expire_links -= 1;
        return Reply::new(
            403,
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )
        .header("content-type", "application/xml");
    }
    let (id, index) = rest.split_once('/').unwrap_or((rest, "x"));
    let Some(Statement {
        outcome: Outcome::Rows(result),
        ..
    }) = guard.statements.get(id)
    else {
        return Reply::new(404, "<Error><Code>NoSuchKey</Code></Error>");
    };
    let result = result.clone();
    drop(guard);
    let index: usize = index.parse().unwrap_or(usize::MAX);
    if index >= result.chunks() {
        return Reply::new(404, "<Error><Code>NoSuchKey</Code></Error>");
    }
    Reply::new(
        200,
        serde_json::to_string(&result.chunk(index)).unwrap_or_default(),
    )
}
