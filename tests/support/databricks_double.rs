//! A stand-in for the Databricks SQL Statement Execution API 2.0 and the cloud storage behind
//! its external links, built on the shared [`StatementDouble`] (results registered per
//! statement text, polling, cancellation, scripted token expiry and throttling) over
//! `HttpDouble` (its request log and scripted `429`/`503`s).
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

use std::collections::BTreeSet;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{Value, json};

use super::http_server::{Behaviour, RecordedRequest, Reply};
use super::statement_double::{Outcome, Poll, ResultRows, Service, StatementDouble, lock};

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
    rows: ResultRows<Vec<Option<String>>>,
}

impl DbResult {
    /// A result holding these rows (values in their `JSON_ARRAY` string forms), two a chunk.
    pub fn rows(columns: Vec<Value>, rows: Vec<Vec<Option<&str>>>) -> Self {
        let rows = rows
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.map(str::to_owned)).collect())
            .collect();
        DbResult {
            columns,
            rows: ResultRows::fixed(rows, 2),
        }
    }

    /// A result of `count` rows made on demand.
    pub fn generated(columns: Vec<Value>, count: u64, make: RowMaker) -> Self {
        DbResult {
            columns,
            rows: ResultRows::made(count, make, 10_000),
        }
    }

    /// Sets the rows per chunk.
    pub fn chunked(mut self, rows: usize) -> Self {
        self.rows.part_rows = rows.max(1);
        self
    }
}

/// What the double keeps besides its statements.
pub struct Databricks {
    tokens: BTreeSet<String>,
    issued: usize,
    expire_links: usize,
    token_lifetime: u64,
}

/// Whether a statement's result is inline (`INLINE`) rather than behind links.
pub type Inline = bool;

type State = Service<DbResult, Inline, Databricks>;

/// A running Databricks double: the shared statement double (`url`, `serve`, `fail`,
/// `running_polls`, `run_forever`, `expire_tokens`, `cancelled`, `requests`) and what is
/// Databricks' own. Expired tokens are all OAuth tokens issued so far (the personal access
/// token too, for the scripted requests only).
pub struct DatabricksDouble(StatementDouble<DbResult, Inline, Databricks>);

impl Deref for DatabricksDouble {
    type Target = StatementDouble<DbResult, Inline, Databricks>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl DatabricksDouble {
    /// Starts a double; `behaviour` may script failures of the first requests.
    pub async fn start_with(behaviour: Behaviour) -> DatabricksDouble {
        let own = Databricks {
            tokens: BTreeSet::from([PAT.to_owned()]),
            issued: 0,
            expire_links: 0,
            token_lifetime: 3600,
        };
        DatabricksDouble(StatementDouble::start(behaviour, own, answer).await)
    }

    /// Starts a double without scripted failures.
    pub async fn start() -> DatabricksDouble {
        Self::start_with(Behaviour::accept_all()).await
    }

    /// The source URL, as copied from a warehouse's connection details.
    pub fn source_url(&self) -> String {
        format!("databricks://{HOST}/sql/1.0/warehouses/{WAREHOUSE_ID}?catalog=main&schema=marts")
    }

    /// The next `times` downloads of an external link get `403` (the link expired).
    pub fn expire_links(&self, times: usize) {
        self.state().own.expire_links = times;
    }

    /// The next `times` chunk requests get `429`.
    pub fn throttle_chunks(&self, times: usize) {
        self.throttle_fetches(times);
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

fn answer(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
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
        ("POST", [""]) => submit(state, request),
        ("GET", [id]) => status(state, id),
        ("GET", [id, "result", "chunks", index]) => chunk(state, id, index.parse().unwrap_or(usize::MAX)),
        ("POST", [id, "cancel"]) => {
            lock(state).statements.cancel(id);
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
    // Numbered by issue, so a token issued after an expiry never repeats an expired one.
    guard.own.issued += 1;
    let value = format!("oauth-token-{}", guard.own.issued);
    guard.own.tokens.insert(value.clone());
    Reply::new(
        200,
        json!({"access_token": value, "token_type": "Bearer", "expires_in": guard.own.token_lifetime, "scope": "all-apis"}).to_string(),
    )
}

fn authenticate(state: &Mutex<State>, request: &RecordedRequest) -> Result<(), Reply> {
    let token = request
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    let mut guard = lock(state);
    if guard.statements.take_expiry() {
        guard.own.tokens.retain(|t| t == PAT);
        return Err(error(401, "UNAUTHENTICATED", "Token is expired."));
    }
    if guard.own.tokens.contains(token) {
        Ok(())
    } else {
        Err(error(401, "UNAUTHENTICATED", "Invalid access token."))
    }
}

fn submit(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
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
    let text = body["statement"].as_str().unwrap_or_default();
    let id = {
        let mut guard = lock(state);
        let id = format!("01ef-{:08}", guard.statements.next_number());
        let outcome = guard
            .statements
            .registered(text)
            .unwrap_or_else(|| Outcome::Fail {
                code: "BAD_REQUEST".to_owned(),
                message: "[TABLE_OR_VIEW_NOT_FOUND] The table or view cannot be found.".to_owned(),
            });
        let inline = body["disposition"] == json!("INLINE");
        guard.statements.insert(id.clone(), outcome, inline);
        id
    };
    status(state, &id)
}

fn status(state: &Mutex<State>, id: &str) -> Reply {
    let mut guard = lock(state);
    let base = guard.base.clone();
    let result = match guard.statements.poll(id) {
        Poll::Unknown => return error(404, "RESOURCE_DOES_NOT_EXIST", "Statement not found"),
        Poll::Cancelled => {
            return Reply::new(
                200,
                json!({"statement_id": id, "status": {"state": "CANCELED"}}).to_string(),
            );
        }
        Poll::Running => {
            return Reply::new(
                200,
                json!({"statement_id": id, "status": {"state": "RUNNING"}}).to_string(),
            );
        }
        Poll::Done(Outcome::Fail { code, message }) => {
            return Reply::new(
                200,
                json!({"statement_id": id, "status": {"state": "FAILED", "error": {"error_code": code, "message": message}}}).to_string(),
            );
        }
        Poll::Done(Outcome::Rows(result)) => result,
    };
    let inline = guard.statements.get(id).is_some_and(|s| s.details);
    drop(guard);
    let chunks: Vec<Value> = (0..result.rows.parts())
        .map(|i| {
            let (start, end) = result.rows.part_range(i);
            json!({"chunk_index": i, "row_offset": start, "row_count": end - start})
        })
        .collect();
    let response = json!({
        "statement_id": id,
        "status": {"state": "SUCCEEDED"},
        "manifest": {
            "format": "JSON_ARRAY",
            "schema": {"column_count": result.columns.len(), "columns": result.columns},
            "total_chunk_count": result.rows.parts(),
            "chunks": chunks,
            "total_row_count": result.rows.len(),
            "truncated": false,
        },
        "result": chunk_body(&base, id, &result, 0, inline),
    });
    Reply::new(200, response.to_string())
}

fn chunk_body(base: &str, id: &str, result: &DbResult, index: usize, inline: bool) -> Value {
    let (start, end) = result.rows.part_range(index);
    let mut body = json!({"chunk_index": index, "row_offset": start, "row_count": end - start});
    if inline {
        body["data_array"] = json!(result.rows.part(index));
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
    if index + 1 < result.rows.parts() {
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
    if guard.statements.take_throttle() {
        return error(429, "TOO_MANY_REQUESTS", "Too many requests").header("retry-after", "0");
    }
    let base = guard.base.clone();
    let Some((Outcome::Rows(result), inline)) =
        guard.statements.get(id).map(|s| (s.outcome.clone(), s.details))
    else {
        return error(404, "RESOURCE_DOES_NOT_EXIST", "Statement not found");
    };
    drop(guard);
    if index >= result.rows.parts() {
        return error(400, "INVALID_PARAMETER_VALUE", "chunk index out of range");
    }
    Reply::new(200, chunk_body(&base, id, &result, index, inline).to_string())
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
    if guard.own.expire_links > 0 {
        guard.own.expire_links -= 1;
        return Reply::new(
            403,
            "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
        )
        .header("content-type", "application/xml");
    }
    let (id, index) = rest.split_once('/').unwrap_or((rest, "x"));
    let Some(Outcome::Rows(result)) = guard.statements.get(id).map(|s| s.outcome.clone()) else {
        return Reply::new(404, "<Error><Code>NoSuchKey</Code></Error>");
    };
    drop(guard);
    let index: usize = index.parse().unwrap_or(usize::MAX);
    if index >= result.rows.parts() {
        return Reply::new(404, "<Error><Code>NoSuchKey</Code></Error>");
    }
    Reply::new(
        200,
        serde_json::to_string(&result.rows.part(index)).unwrap_or_default(),
    )
}
