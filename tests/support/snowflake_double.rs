//! A stand-in for Snowflake's SQL API v2, built on [`HttpDouble`] (its request log and
//! scripted `429`/`503` failures), serving results the test registers per statement text.
//!
//! Reproduced from the published contract:
//! - <https://docs.snowflake.com/en/developer-guide/sql-api/reference>: `POST
//!   /api/v2/statements` (body `statement`, `timeout`, `warehouse`, `role`, `database`,
//!   `schema`, `parameters`; query `requestId`, `async=true` answers `202` with a
//!   `QueryStatus`), `GET /api/v2/statements/{handle}` (`202` while running, `200` with a
//!   `ResultSet` holding `resultSetMetaData.rowType`, `partitionInfo` and partition 0's
//!   `data`; `?partition=N` for the others), `POST /api/v2/statements/{handle}/cancel`,
//!   `422` `QueryFailureStatus` bodies (`code`, `sqlState`, `message`, `statementHandle`).
//! - <https://docs.snowflake.com/en/developer-guide/sql-api/handling-responses>: values as
//!   strings (`FIXED` digits, `DATE` days, `TIME` seconds, `TIMESTAMP_*` epoch seconds,
//!   `TIMESTAMP_TZ` with the offset in minutes plus 1440), `000630` for a statement stopped
//!   by its timeout, `000604` for a cancelled one.
//! - <https://docs.snowflake.com/en/developer-guide/sql-api/authenticating>: a key-pair JWT
//!   is checked for real (RS256 signature against the registered public key, `iss`
//!   `ACCOUNT.USER.SHA256:<fingerprint>`, `sub` `ACCOUNT.USER`, `exp` at most an hour after
//!   `iat`), with `X-Snowflake-Authorization-Token-Type: KEYPAIR_JWT`; an OAuth token must
//!   match exactly with type `OAUTH`. `401` bodies carry code `390144` (invalid JWT) or
//!   `390318` (expired token).
//!
//! Not reproduced: SQL itself (a statement is looked up by its exact text; an unknown one is a
//! `002003` compilation error), gzip-compressed partitions, multiple statements, bindings,
//! session parameters other than the ones checked, result expiry, `requestId`
//! de-duplication, real time limits (a timeout is scripted per statement) and the exact
//! wording of Snowflake's messages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::http_server::{Behaviour, HttpDouble, RecordedRequest, Reply};

/// The account and user the double serves.
pub const ACCOUNT: &str = "myorg-acct";
/// The user whose public key is registered.
pub const USER: &str = "LOADER";
/// The warehouse that exists.
pub const WAREHOUSE: &str = "COMPUTE_WH";
/// The role that exists.
pub const ROLE: &str = "REPORTER";
/// The test key pair (tests/fixtures/keys) and its fingerprint as Snowflake's docs compute it.
pub const PRIVATE_KEY: &str = include_str!("../fixtures/keys/test-rsa.pem");
/// The same key in PKCS#1 form.
pub const PRIVATE_KEY_PKCS1: &str = include_str!("../fixtures/keys/test-rsa-pkcs1.pem");
/// A key Snowflake does not know.
pub const OTHER_PRIVATE_KEY: &str = include_str!("../fixtures/keys/other-rsa.pem");
const PUBLIC_KEY: &str = include_str!("../fixtures/keys/test-rsa.pub.pem");
const FINGERPRINT: &str = "FZva96uy87qlUvghv6wEmVHcjptRwrO2kFyk/75llTk=";

/// Makes row `i` of a generated result.
pub type RowMaker = Arc<dyn Fn(u64) -> Vec<Option<String>> + Send + Sync>;

/// A result the double serves for one statement text.
#[derive(Clone)]
pub struct SfResult {
    /// `rowType` entries, like `{"name":"ID","type":"fixed","scale":0,"precision":38}`.
    pub row_type: Vec<Value>,
    rows: Rows,
    /// Rows per partition.
    pub partition_rows: usize,
}

#[derive(Clone)]
enum Rows {
    Fixed(Arc<Vec<Vec<Option<String>>>>),
    Made(u64, RowMaker),
}

impl SfResult {
    /// A result holding these rows (values in the SQL API's string forms).
    pub fn rows(row_type: Vec<Value>, rows: Vec<Vec<Option<&str>>>) -> Self {
        let rows = rows
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.map(str::to_owned)).collect())
            .collect();
        SfResult {
            row_type,
            rows: Rows::Fixed(Arc::new(rows)),
            partition_rows: 2,
        }
    }

    /// A result of `count` rows made on demand, so a million rows cost no memory here.
    pub fn generated(row_type: Vec<Value>, count: u64, make: RowMaker) -> Self {
        SfResult {
            row_type,
            rows: Rows::Made(count, make),
            partition_rows: 10_000,
        }
    }

    /// Sets the rows per partition.
    pub fn partitioned(mut self, rows: usize) -> Self {
        self.partition_rows = rows.max(1);
        self
    }

    fn len(&self) -> u64 {
        match &self.rows {
            Rows::Fixed(rows) => rows.len() as u64,
            Rows::Made(count, _) => *count,
        }
    }

    fn partitions(&self) -> usize {
        (self.len() as usize).div_ceil(self.partition_rows).max(1)
    }

    fn partition_len(&self, index: usize) -> u64 {
        let start = (index * self.partition_rows) as u64;
        (start + self.partition_rows as u64)
            .min(self.len())
            .saturating_sub(start)
    }

    fn partition(&self, index: usize) -> Vec<Vec<Option<String>>> {
        let start = (index * self.partition_rows) as u64;
        let end = (start + self.partition_rows as u64).min(self.len());
        match &self.rows {
            Rows::Fixed(rows) => rows[start as usize..end as usize].to_vec(),
            Rows::Made(_, make) => (start..end).map(|i| make(i)).collect(),
        }
    }
}

/// What happens to a statement.
#[derive(Clone)]
enum Outcome {
    Rows(SfResult),
    Fail { code: String, message: String },
}

struct Statement {
    outcome: Outcome,
    polls_left: usize,
    cancelled: bool,
    forever: bool,
}

#[derive(Default)]
struct State {
    results: BTreeMap<String, Outcome>,
    statements: BTreeMap<String, Statement>,
    running_polls: usize,
    run_forever: bool,
    expire_next: usize,
    throttle_partitions: usize,
    oauth_token: Option<String>,
    cancelled: Vec<String>,
}

/// A running Snowflake double.
pub struct SnowflakeDouble {
    /// Its base URL: the endpoint override the tests give the source.
    pub url: String,
    http: HttpDouble,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl SnowflakeDouble {
    /// Starts a double; `behaviour` may script failures of the first requests.
    pub async fn start_with(behaviour: Behaviour) -> SnowflakeDouble {
        let state = Arc::new(Mutex::new(State {
            running_polls: 1,
            ..State::default()
        }));
        let handler_state = state.clone();
        let next = Arc::new(AtomicUsize::new(1));
        let http =
            HttpDouble::start(behaviour.handler(move |request| answer(&handler_state, &next, request))).await;
        SnowflakeDouble {
            url: http.url.clone(),
            http,
            state,
        }
    }

    /// Starts a double without scripted failures.
    pub async fn start() -> SnowflakeDouble {
        Self::start_with(Behaviour::accept_all()).await
    }

    /// The connection URL of the source (no secret in it).
    pub fn source_url(&self) -> String {
        format!("snowflake://{USER}@{ACCOUNT}/ANALYTICS/MARTS?warehouse={WAREHOUSE}&role={ROLE}")
    }

    /// Serves `result` for the statement `query`.
    pub fn serve(&self, query: &str, result: SfResult) {
        lock(&self.state)
            .results
            .insert(query.to_owned(), Outcome::Rows(result));
    }

    /// Fails the statement `query` with a `422` of this code and message.
    pub fn fail(&self, query: &str, code: &str, message: &str) {
        lock(&self.state).results.insert(
            query.to_owned(),
            Outcome::Fail {
                code: code.to_owned(),
                message: message.to_owned(),
            },
        );
    }

    /// Answers this many `202`s to status polls before a statement ends.
    pub fn running_polls(&self, polls: usize) {
        lock(&self.state).running_polls = polls;
    }

    /// Statements never end (until cancelled).
    pub fn run_forever(&self) {
        lock(&self.state).run_forever = true;
    }

    /// The next `times` authenticated requests get `401` "token expired".
    pub fn expire_tokens(&self, times: usize) {
        lock(&self.state).expire_next = times;
    }

    /// The next `times` partition fetches get `429`.
    pub fn throttle_partitions(&self, times: usize) {
        lock(&self.state).throttle_partitions = times;
    }

    /// Accepts this OAuth access token.
    pub fn accept_oauth(&self, token: &str) {
        lock(&self.state).oauth_token = Some(token.to_owned());
    }

    /// The handles of the statements cancelled so far.
    pub fn cancelled(&self) -> Vec<String> {
        lock(&self.state).cancelled.clone()
    }

    /// Every request received.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.http.requests()
    }

    /// The bodies of the statements submitted.
    pub fn submitted(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.method == "POST" && r.path == "/api/v2/statements")
            .filter_map(|r| r.json)
            .collect()
    }
}

fn failure(status: u16, code: &str, message: &str, handle: Option<&str>) -> Reply {
    Reply::new(
        status,
        json!({"code": code, "message": message, "sqlState": "42000", "statementHandle": handle}).to_string(),
    )
}

fn answer(state: &Mutex<State>, next: &AtomicUsize, request: &RecordedRequest) -> Reply {
    if let Err(reply) = authenticate(state, request) {
        return reply;
    }
    let path = request.path.as_str();
    let Some(rest) = path.strip_prefix("/api/v2/statements") else {
        return Reply::new(404, r#"{"message":"not found"}"#);
    };
    match (request.method.as_str(), rest) {
        ("POST", "") => submit(state, next, request),
        ("POST", tail) if tail.ends_with("/cancel") => {
            let handle = tail
                .trim_start_matches('/')
                .trim_end_matches("/cancel")
                .to_owned();
            let mut state = lock(state);
            match state.statements.get_mut(&handle) {
                Some(statement) => {
                    statement.cancelled = true;
                    state.cancelled.push(handle.clone());
                    Reply::new(200, json!({"code": "000604", "message": "successfully canceled", "statementHandle": handle}).to_string())
                }
                None => failure(404, "000709", "Statement not found", Some(&handle)),
            }
        }
        ("GET", tail) => {
            let handle = tail.trim_start_matches('/');
            let partition = request
                .query
                .as_deref()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("partition=")))
                .map(|p| p.parse::<usize>().unwrap_or(usize::MAX));
            status(state, handle, partition)
        }
        _ => Reply::new(405, r#"{"message":"method not allowed"}"#),
    }
}

fn authenticate(state: &Mutex<State>, request: &RecordedRequest) -> Result<(), Reply> {
    let unauthorized = |code: &str, message: &str| failure(401, code, message, None);
    let token = request
        .header("authorization")
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("390101", "Authorization header not found"))?;
    let token_type = request
        .header("x-snowflake-authorization-token-type")
        .unwrap_or("");
    let mut state = lock(state);
    if state.expire_next > 0 {
        state.expire_next -= 1;
        return Err(unauthorized("390318", "The JWT token has expired."));
    }
    match token_type {
        "KEYPAIR_JWT" => check_jwt(token).map_err(|m| unauthorized("390144", &m)),
        "OAUTH" if state.oauth_token.as_deref() == Some(token) => Ok(()),
        "OAUTH" => Err(unauthorized("390303", "Invalid OAuth access token.")),
        _ => Err(unauthorized("390101", "Unknown token type")),
    }
}

fn check_jwt(token: &str) -> Result<(), String> {
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).map_err(|e| e.to_string())?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_required_spec_claims(&["exp", "iss", "sub", "iat"]);
    let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|_| "JWT token is invalid.".to_owned())?;
    let claims = data.claims;
    let qualified = format!("{}.{}", ACCOUNT.to_ascii_uppercase(), USER);
    if claims["sub"] != json!(qualified)
        || claims["iss"] != json!(format!("{qualified}.SHA256:{FINGERPRINT}"))
    {
        return Err("JWT token is invalid.".to_owned());
    }
    let lifetime = claims["exp"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(claims["iat"].as_u64().unwrap_or(0));
    if lifetime > 3600 {
        return Err("JWT token is invalid: it lives longer than an hour.".to_owned());
    }
    Ok(())
}

fn submit(state: &Mutex<State>, next: &AtomicUsize, request: &RecordedRequest) -> Reply {
    let body = request.json.clone().unwrap_or(Value::Null);
    let async_mode = request.query.as_deref().is_some_and(|q| q.contains("async=true"));
    if body["parameters"]["MULTI_STATEMENT_COUNT"] != json!("1") {
        return failure(
            422,
            "000008",
            "Actual statement count 1 did not match the desired statement count 0.",
            None,
        );
    }
    if body["warehouse"] != json!(WAREHOUSE) {
        return failure(
            422,
            "000606",
            "No active warehouse selected in the current session. Select an active warehouse with the 'use warehouse' command.",
            None,
        );
    }
    if body["role"] != json!(ROLE) {
        return failure(
            422,
            "390189",
            "Role specified in the connect string does not exist or not authorized. Contact your local system administrator, or attempt to login with another role, e.g. PUBLIC.",
            None,
        );
    }
    let text = body["statement"].as_str().unwrap_or_default().to_owned();
    let handle = format!(
        "01b2c3d4-0000-0000-0000-{:012}",
        next.fetch_add(1, Ordering::SeqCst)
    );
    {
        let mut guard = lock(state);
        let outcome = guard
            .results
            .get(&text)
            .cloned()
            .unwrap_or_else(|| Outcome::Fail {
                code: "002003".to_owned(),
                message: "SQL compilation error:\nObject does not exist or not authorized.".to_owned(),
            });
        let statement = Statement {
            outcome,
            polls_left: guard.running_polls,
            cancelled: false,
            forever: guard.run_forever,
        };
        guard.statements.insert(handle.clone(), statement);
    }
    if async_mode {
        Reply::new(202, running(&handle))
    } else {
        status(state, &handle, None)
    }
}

fn running(handle: &str) -> String {
    json!({
        "code": "333334",
        "message": "Asynchronous execution in progress. Use provided query id to perform query monitoring and management.",
        "statementHandle": handle,
        "statementStatusUrl": format!("/api/v2/statements/{handle}"),
    })
    .to_string()
}

fn status(state: &Mutex<State>, handle: &str, partition: Option<usize>) -> Reply {
    let mut guard = lock(state);
    let throttle = partition.is_some() && guard.throttle_partitions > 0;
    if throttle {
        guard.throttle_partitions -= 1;
        return Reply::new(429, r#"{"message":"Too many requests"}"#).header("retry-after", "0");
    }
    let Some(statement) = guard.statements.get_mut(handle) else {
        return failure(404, "000709", "Statement not found", Some(handle));
    };
    if statement.cancelled {
        return failure(422, "000604", "SQL execution canceled", Some(handle));
    }
    if statement.forever || statement.polls_left > 0 {
        statement.polls_left = statement.polls_left.saturating_sub(1);
        return Reply::new(202, running(handle));
    }
    let result = match &statement.outcome {
        Outcome::Fail { code, message } => return failure(422, code, message, Some(handle)),
        Outcome::Rows(result) => result.clone(),
    };
    drop(guard);
    match partition {
        None => {
            let partition_info: Vec<Value> = (0..result.partitions())
                .map(|i| json!({"rowCount": result.partition_len(i), "uncompressedSize": 0}))
                .collect();
            let head = json!({
                "resultSetMetaData": {
                    "numRows": result.len(),
                    "format": "jsonv2",
                    "rowType": result.row_type,
                    "partitionInfo": partition_info,
                },
                "code": "090001",
                "statementHandle": handle,
                "message": "Statement executed successfully.",
            });
            Reply::new(200, with_data(head, &result.partition(0)))
        }
        Some(index) if index < result.partitions() => {
            Reply::new(200, with_data(json!({}), &result.partition(index)))
        }
        _ => failure(422, "000709", "Partition index out of range", Some(handle)),
    }
}

/// `head` with a `data` member, serialized straight from the rows (a `Value` tree of a
/// large partition would dominate the double's serving time).
fn with_data(head: Value, rows: &[Vec<Option<String>>]) -> String {
    let mut text = head.to_string();
    text.pop();
    if text.len() > 1 {
        text.push(',');
    }
    text.push_str("\"data\":");
    text.push_str(&serde_json::to_string(rows).unwrap_or_default());
    text.push('}');
    text
}
