//! Snowflake source, through the SQL API v2.
//!
//! - `POST /api/v2/statements?requestId=…&async=true` submits the model query with its
//!   warehouse, role, database, schema, `timeout` and `MULTI_STATEMENT_COUNT=1`; the answer is
//!   `202` with a statement handle.
//! - `GET /api/v2/statements/{handle}` is polled: `202` while it runs, `200` with the result
//!   set (its `resultSetMetaData.rowType` and partition 0), `422` when it failed.
//! - `GET /api/v2/statements/{handle}?partition=N` fetches the other partitions, a few ahead
//!   of the planner in parallel ([`PREFETCH`]), in order.
//! - `POST /api/v2/statements/{handle}/cancel` when the run stops before the statement ends.
//!
//! Docs: <https://docs.snowflake.com/en/developer-guide/sql-api/reference>,
//! <https://docs.snowflake.com/en/developer-guide/sql-api/handling-responses>,
//! <https://docs.snowflake.com/en/developer-guide/sql-api/authenticating>.
//!
//! The SQL API has no read-only session: the query is refused before it is sent unless its
//! text is a single `SELECT` ([`super::statement`]), and `MULTI_STATEMENT_COUNT=1` makes
//! Snowflake itself refuse a second statement. The role's grants are the real guarantee
//! (docs/sources/snowflake.md).

mod auth;
mod decode;

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, stream};
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use self::auth::{Auth, KeyPair};
use self::decode::{Kind, RowType};
use super::rest::{self, CallError, Http, HttpError, Progress, Tokens};
use super::{Column, Connection, Credentials, RowSender, RowStream, SourceError, SourceOptions, StreamEnd};

/// Partitions fetched ahead of the one being read.
const PREFETCH: usize = 3;
/// How long past the statement timeout the client waits before giving up on its own.
const DEADLINE_MARGIN: Duration = Duration::from_secs(60);
/// Snowflake's error codes for a statement stopped by its timeout.
const TIMEOUT_CODES: &[&str] = &["000630", "000604"];
/// Secret keys read besides the URL.
const PRIVATE_KEY: &str = "private_key";
const TOKEN: &str = "token";

/// Runs `query` in the Snowflake account of `url` and streams its rows.
pub(super) async fn extract(
    connection: Connection<'_>,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let target = crate::redact::describe_url(connection.url);
    let config =
        Config::parse(connection.url, connection.credentials).map_err(|reason| SourceError::Config {
            target: target.clone(),
            reason,
        })?;
    super::statement::check_read_only(query).map_err(SourceError::ReadOnly)?;
    let http = Http::new(connection)?;
    let client = Arc::new(Client {
        base: http.base(&format!("https://{}.snowflakecomputing.com", config.account)),
        token_type: config.auth.token_type(),
        tokens: Tokens::new(config.auth),
        http,
        target,
        timeout: options.statement_timeout,
    });

    let handle = client.submit(query, &config.session).await?;
    let guard = CancelOnDrop {
        client: client.clone(),
        handle: Some(handle.clone()),
    };
    let deadline = Instant::now() + options.statement_timeout + DEADLINE_MARGIN;
    let first = client.wait(&handle, deadline).await?;
    let meta = first
        .result_set_meta_data
        .ok_or_else(|| SourceError::Query("the answer has no resultSetMetaData".to_owned()))?;
    let plan = decode::plan(&meta.row_type)?;
    let expected: Vec<Option<u64>> = if meta.partition_info.is_empty() {
        vec![None]
    } else {
        meta.partition_info.iter().map(|p| p.row_count).collect()
    };
    check_partition(0, &first.data, expected[0])?;
    // The statement has finished: nothing is left to cancel.
    guard.disarm();

    let (tx, rx) = super::row_channel(options);
    let columns = plan.iter().map(|(c, _)| c.clone()).collect();
    tokio::spawn(stream(client, handle, first.data, expected, plan, tx));
    Ok(RowStream::new(columns, rx))
}

/// Where and as whom the statement runs.
struct Config {
    account: String,
    auth: Auth,
    session: Session,
}

/// The session fields of the request body.
#[derive(Debug, Default)]
struct Session {
    warehouse: Option<String>,
    role: Option<String>,
    database: Option<String>,
    schema: Option<String>,
}

impl Config {
    /// `snowflake://USER@ACCOUNT[/DATABASE[/SCHEMA]][?warehouse=W&role=R]`.
    fn parse(url: &str, credentials: &Credentials) -> Result<Config, String> {
        let parsed = Url::parse(url).map_err(|e| format!("the URL is not valid ({e})"))?;
        let account = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the URL names no account: use snowflake://USER@ACCOUNT/DATABASE/SCHEMA")?
            .to_owned();
        if !account
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!("{account:?} is not a Snowflake account identifier"));
        }
        if parsed.password().is_some() {
            return Err(format!(
                "the SQL API does not accept passwords: remove it from the URL and put a key-pair private key under the Secret key {PRIVATE_KEY:?} (or an OAuth token under {TOKEN:?})"
            ));
        }
        let user = percent_encoding::percent_decode_str(parsed.username())
            .decode_utf8_lossy()
            .into_owned();
        let mut path = parsed
            .path_segments()
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            });
        let session = Session {
            warehouse: rest::query_param(&parsed, "warehouse"),
            role: rest::query_param(&parsed, "role"),
            database: path.next().or_else(|| rest::query_param(&parsed, "database")),
            schema: path.next().or_else(|| rest::query_param(&parsed, "schema")),
        };
        let auth = match (credentials.get(PRIVATE_KEY), credentials.get(TOKEN)) {
            (Some(pem), _) => {
                if user.is_empty() {
                    return Err(
                        "key-pair authentication needs the user: snowflake://USER@ACCOUNT/…".to_owned(),
                    );
                }
                Auth::KeyPair(KeyPair::new(pem, &account, &user)?)
            }
            (None, Some(token)) => Auth::OAuth(token.trim().to_owned()),
            (None, None) => {
                return Err(format!(
                    "the Secret has neither {PRIVATE_KEY:?} (a PEM private key for key-pair authentication) nor {TOKEN:?} (an OAuth access token)"
                ));
            }
        };
        if let Auth::KeyPair(pair) = &auth {
            tracing::debug!(issuer = pair.issuer(), "Snowflake key-pair authentication");
        }
        Ok(Config {
            account,
            auth,
            session,
        })
    }
}

/// The statements API of one account, as one user.
struct Client {
    http: Http,
    tokens: Tokens,
    token_type: &'static str,
    base: String,
    target: String,
    timeout: Duration,
}

/// `QueryStatus` and `ResultSet` share these fields; `data` is a partition's rows.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    #[serde(default)]
    statement_handle: Option<String>,
    #[serde(default)]
    result_set_meta_data: Option<Meta>,
    #[serde(default)]
    data: Vec<Vec<Option<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    row_type: Vec<RowType>,
    #[serde(default)]
    partition_info: Vec<PartitionInfo>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PartitionInfo {
    #[serde(default)]
    row_count: Option<u64>,
}

/// The body of a `4xx` answer (`QueryFailureStatus`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Failure {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

type Rows = Vec<Vec<Option<String>>>;

impl Client {
    async fn request(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Answer), SourceError> {
        rest::json_authorized(&self.http, &self.tokens, |client, token| {
            build(client)
                .bearer_auth(token)
                .header("X-Snowflake-Authorization-Token-Type", self.token_type)
                .header("Accept", "application/json")
        })
        .await
        .map_err(|e| match e {
            CallError::Http(e) => self.error(e),
            CallError::Token(e) => e,
        })
    }

    /// Submits the statement and returns its handle.
    async fn submit(&self, query: &str, session: &Session) -> Result<String, SourceError> {
        let timeout_secs = self.timeout.as_secs_f64().ceil().max(1.0) as u64;
        let mut body = json!({
            "statement": query,
            "timeout": timeout_secs,
            "parameters": {"MULTI_STATEMENT_COUNT": "1", "QUERY_TAG": "backflow"},
        });
        for (field, value) in [
            ("warehouse", &session.warehouse),
            ("role", &session.role),
            ("database", &session.database),
            ("schema", &session.schema),
        ] {
            if let Some(v) = value {
                body[field] = json!(v);
            }
        }
        // A resubmission (after a 503, or with a renewed token) carries the same request id
        // and `retry=true`, so Snowflake runs the statement once.
        let request_id = uuid::Uuid::new_v4().to_string();
        let sent = std::sync::atomic::AtomicBool::new(false);
        let url = format!("{}/api/v2/statements", self.base);
        let (_, answer) = self
            .request(|client| {
                let mut query = vec![("requestId", request_id.as_str()), ("async", "true")];
                if sent.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    query.push(("retry", "true"));
                }
                client.post(&url).query(&query).json(&body)
            })
            .await?;
        answer
            .statement_handle
            .filter(|h| !h.is_empty())
            .ok_or_else(|| SourceError::Query("Snowflake answered without a statement handle".to_owned()))
    }

    /// Polls the statement until it ends; returns its first result set.
    async fn wait(&self, handle: &str, deadline: Instant) -> Result<Answer, SourceError> {
        let url = self.statement_url(handle)?;
        let first = self.request(|client| client.get(&url)).await?;
        let progress = |(status, answer): (reqwest::StatusCode, Answer)| {
            Ok(if status == reqwest::StatusCode::ACCEPTED {
                Progress::Running
            } else {
                Progress::Done(answer)
            })
        };
        rest::poll(first, deadline, self.timeout, progress, || {
            self.request(|client| client.get(&url))
        })
        .await
    }

    /// Partition `index` of a finished statement.
    async fn partition(&self, handle: &str, index: usize) -> Result<Rows, SourceError> {
        let url = self.statement_url(handle)?;
        let index_text = index.to_string();
        let (_, answer) = self
            .request(|client| client.get(&url).query(&[("partition", index_text.as_str())]))
            .await?;
        Ok(answer.data)
    }

    async fn cancel(&self, handle: &str) {
        let Ok(url) = self.statement_url(handle) else {
            return;
        };
        let url = format!("{url}/cancel");
        match self.request(|client| client.post(&url)).await {
            Ok(_) => tracing::info!(statement = handle, "cancelled the Snowflake statement"),
            Err(e) => {
                tracing::warn!(statement = handle, error = %e, "failed to cancel the Snowflake statement")
            }
        }
    }

    fn statement_url(&self, handle: &str) -> Result<String, SourceError> {
        // The handle goes into a path: refuse anything but the UUID-like text Snowflake sends.
        if handle.is_empty() || !handle.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(SourceError::Query(format!(
                "Snowflake sent an unusable statement handle {handle:?}"
            )));
        }
        Ok(format!("{}/api/v2/statements/{handle}", self.base))
    }

    /// Sorts a failed exchange by what the user can do about it.
    fn error(&self, e: HttpError) -> SourceError {
        let target = self.target.clone();
        match e {
            HttpError::Transport(reason) => SourceError::Connect { target, reason },
            HttpError::Body(reason) => SourceError::Query(reason),
            HttpError::Egress(e) => SourceError::Egress(e),
            HttpError::Status { status, body, .. } => {
                let failure: Failure = serde_json::from_str(&body).unwrap_or_default();
                let reason = if failure.message.is_empty() {
                    format!("HTTP {status}: {body}")
                } else if failure.code.is_empty() {
                    failure.message.clone()
                } else {
                    format!("{} (code {})", failure.message, failure.code)
                };
                match status {
                    401 | 403 => SourceError::Auth { target, reason },
                    404 => SourceError::Config {
                        target,
                        reason: format!("{reason}: check the account identifier"),
                    },
                    408 => SourceError::Timeout(self.timeout),
                    422 if TIMEOUT_CODES.contains(&failure.code.as_str()) => {
                        SourceError::Timeout(self.timeout)
                    }
                    429 | 500..=599 => SourceError::Connect {
                        target,
                        reason: format!("{reason} (still failing after retries)"),
                    },
                    _ => SourceError::Query(reason),
                }
            }
        }
    }
}

/// Cancels the statement when dropped armed: the run stopped (or failed) while it ran.
struct CancelOnDrop {
    client: Arc<Client>,
    handle: Option<String>,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.handle = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            let client = self.client.clone();
            // Dropped inside the runtime (an extraction is a future on it); without one
            // there is nothing to cancel with.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { client.cancel(&handle).await });
            }
        }
    }
}

/// A partition whose row count differs from what the metadata announced was cut short.
fn check_partition(index: usize, rows: &Rows, expected: Option<u64>) -> Result<(), SourceError> {
    match expected {
        Some(n) if n != rows.len() as u64 => Err(SourceError::Query(format!(
            "result partition {index} holds {} rows where Snowflake announced {n}",
            rows.len()
        ))),
        _ => Ok(()),
    }
}

/// The streaming task: partition 0, then the others fetched ahead, decoded row by row.
async fn stream(
    client: Arc<Client>,
    handle: String,
    first: Rows,
    expected: Vec<Option<u64>>,
    plan: Vec<(Column, Kind)>,
    tx: RowSender,
) {
    let rest = {
        let client = client.clone();
        let handle = handle.clone();
        stream::iter(1..expected.len())
            .map(move |index| {
                let client = client.clone();
                let handle = handle.clone();
                let expected = expected[index];
                async move {
                    let rows = client.partition(&handle, index).await?;
                    check_partition(index, &rows, expected)?;
                    Ok::<_, SourceError>(rows)
                }
            })
            .buffered(PREFETCH)
    };
    let partitions = stream::once(async { Ok(first) }).chain(rest);
    let end = super::pump_parts(partitions, &tx, |row: &Vec<Option<String>>| {
        decode_row(row, &plan)
    })
    .await;
    if end == StreamEnd::ReceiverGone {
        tracing::debug!(statement = %handle, "the run stopped reading the Snowflake result");
    }
}

fn decode_row(row: &[Option<String>], plan: &[(Column, Kind)]) -> Result<super::SourceRow, SourceError> {
    super::decode_planned_row(row.len(), plan, |i, kind| decode::value(*kind, row[i].as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        Credentials::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    #[test]
    fn the_url_names_account_user_database_schema_warehouse_and_role() {
        let c = Config::parse(
            "snowflake://loader@myorg-acct/ANALYTICS/MARTS?warehouse=WH&role=REPORTER",
            &creds(&[("token", "t0k")]),
        )
        .unwrap();
        assert_eq!(c.account, "myorg-acct");
        assert_eq!(c.session.database.as_deref(), Some("ANALYTICS"));
        assert_eq!(c.session.schema.as_deref(), Some("MARTS"));
        assert_eq!(c.session.warehouse.as_deref(), Some("WH"));
        assert_eq!(c.session.role.as_deref(), Some("REPORTER"));
        assert_eq!(c.auth.token_type(), "OAUTH");
    }

    #[test]
    fn missing_credentials_and_passwords_are_explained() {
        let err = Config::parse("snowflake://u@acct/db", &creds(&[])).err().unwrap();
        assert!(err.contains("private_key") && err.contains("token"), "{err}");
        let err = Config::parse("snowflake://u:hunter2@acct/db", &creds(&[("token", "x")]))
            .err()
            .unwrap();
        assert!(err.contains("passwords") && !err.contains("hunter2"), "{err}");
        let err = Config::parse("snowflake://u@ac%2Fct/db", &creds(&[("token", "x")])).err();
        assert!(err.is_some());
    }
}
