//! A stand-in for Snowflake's SQL API v2, built on the shared [`StatementDouble`] (results
//! registered per statement text, polling, cancellation, scripted token expiry and
//! throttling) over `HttpDouble` (its request log and scripted `429`/`503` failures).
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

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::http_server::{Behaviour, RecordedRequest, Reply};
use super::statement_double::{Outcome, Poll, ResultRows, Service, StatementDouble, lock};

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
    rows: ResultRows<Vec<Option<String>>>,
}

impl SfResult {
    /// A result holding these rows (values in the SQL API's string forms), two a partition.
    pub fn rows(row_type: Vec<Value>, rows: Vec<Vec<Option<&str>>>) -> Self {
        let rows = rows
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.map(str::to_owned)).collect())
            .collect();
        SfResult {
            row_type,
            rows: ResultRows::fixed(rows, 2),
        }
    }

    /// A result of `count` rows made on demand, so a million rows cost no memory here.
    pub fn generated(row_type: Vec<Value>, count: u64, make: RowMaker) -> Self {
        SfResult {
            row_type,
            rows: ResultRows::made(count, make, 10_000),
        }
    }

    /// Sets the rows per partition.
    pub fn partitioned(mut self, rows: usize) -> Self {
        self.rows.part_rows = rows.max(1);
        self
    }
}

/// What the double keeps besides its statements.
#[derive(Default)]
pub struct Snowflake {
    oauth_token: Option<String>,
}

type State = Service<SfResult, (), Snowflake>;

/// A running Snowflake double: the shared statement double (`url`, `serve`, `fail`,
/// `running_polls`, `run_forever`, `expire_tokens`, `cancelled`, `requests`) and what is
/// Snowflake's own.
pub struct SnowflakeDouble(StatementDouble<SfResult, (), Snowflake>);

impl Deref for SnowflakeDouble {
    type Target = StatementDouble<SfResult, (), Snowflake>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl SnowflakeDouble {
    /// Starts a double; `behaviour` may script failures of the first requests.
    pub async fn start_with(behaviour: Behaviour) -> SnowflakeDouble {
        SnowflakeDouble(StatementDouble::start(behaviour, Snowflake::default(), answer).await)
    }

    /// Starts a double without scripted failures.
    pub async fn start() -> SnowflakeDouble {
        Self::start_with(Behaviour::accept_all()).await
    }

    /// The connection URL of the source (no secret in it).
    pub fn source_url(&self) -> String {
        format!("snowflake://{USER}@{ACCOUNT}/ANALYTICS/MARTS?warehouse={WAREHOUSE}&role={ROLE}")
    }

    /// The next `times` partition fetches get `429`.
    pub fn throttle_partitions(&self, times: usize) {
        self.throttle_fetches(times);
    }

    /// Accepts this OAuth access token.
    pub fn accept_oauth(&self, token: &str) {
        self.state().own.oauth_token = Some(token.to_owned());
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

fn answer(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
    if let Err(reply) = authenticate(state, request) {
        return reply;
    }
    let path = request.path.as_str();
    let Some(rest) = path.strip_prefix("/api/v2/statements") else {
        return Reply::new(404, r#"{"message":"not found"}"#);
    };
    match (request.method.as_str(), rest) {
        ("POST", "") => submit(state, request),
        ("POST", tail) if tail.ends_with("/cancel") => {
            let handle = tail
                .trim_start_matches('/')
                .trim_end_matches("/cancel")
                .to_owned();
            if lock(state).statements.cancel(&handle) {
                Reply::new(
                    200,
                    json!({"code": "000604", "message": "successfully canceled", "statementHandle": handle})
                        .to_string(),
                )
            } else {
                failure(404, "000709", "Statement not found", Some(&handle))
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
    if state.statements.take_expiry() {
        return Err(unauthorized("390318", "The JWT token has expired."));
    }
    match token_type {
        "KEYPAIR_JWT" => check_jwt(token).map_err(|m| unauthorized("390144", &m)),
        "OAUTH" if state.own.oauth_token.as_deref() == Some(token) => Ok(()),
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

fn submit(state: &Mutex<State>, request: &RecordedRequest) -> Reply {
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
    let text = body["statement"].as_str().unwrap_or_default();
    let handle = {
        let mut guard = lock(state);
        let handle = format!("01b2c3d4-0000-0000-0000-{:012}", guard.statements.next_number());
        let outcome = guard
            .statements
            .registered(text)
            .unwrap_or_else(|| Outcome::Fail {
                code: "002003".to_owned(),
                message: "SQL compilation error:\nObject does not exist or not authorized.".to_owned(),
            });
        guard.statements.insert(handle.clone(), outcome, ());
        handle
    };
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
    if partition.is_some() && guard.statements.take_throttle() {
        return Reply::new(429, r#"{"message":"Too many requests"}"#).header("retry-after", "0");
    }
    let result = match guard.statements.poll(handle) {
        Poll::Unknown => return failure(404, "000709", "Statement not found", Some(handle)),
        Poll::Cancelled => return failure(422, "000604", "SQL execution canceled", Some(handle)),
        Poll::Running => return Reply::new(202, running(handle)),
        Poll::Done(Outcome::Fail { code, message }) => {
            return failure(422, &code, &message, Some(handle));
        }
        Poll::Done(Outcome::Rows(result)) => result,
    };
    drop(guard);
    match partition {
        None => {
            let partition_info: Vec<Value> = (0..result.rows.parts())
                .map(|i| {
                    let (start, end) = result.rows.part_range(i);
                    json!({"rowCount": end - start, "uncompressedSize": 0})
                })
                .collect();
            let head = json!({
                "resultSetMetaData": {
                    "numRows": result.rows.len(),
                    "format": "jsonv2",
                    "rowType": result.row_type,
                    "partitionInfo": partition_info,
                },
                "code": "090001",
                "statementHandle": handle,
                "message": "Statement executed successfully.",
            });
            Reply::new(200, with_data(head, &result.rows.part(0)))
        }
        Some(index) if index < result.rows.parts() => {
            Reply::new(200, with_data(json!({}), &result.rows.part(index)))
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
