//! Databricks SQL source, through the Statement Execution API 2.0.
//!
//! - `POST /api/2.0/sql/statements` with the warehouse, catalog, schema, `wait_timeout`
//!   (`on_wait_timeout: CONTINUE`), `disposition: EXTERNAL_LINKS` and `format: JSON_ARRAY`.
//! - `GET /api/2.0/sql/statements/{id}` is polled while the state is `PENDING` or `RUNNING`.
//! - `GET /api/2.0/sql/statements/{id}/result/chunks/{index}` gives each chunk after the
//!   first; chunks are fetched a few ahead in parallel ([`PREFETCH`]), in order.
//! - A chunk's rows are inline (`data_array`) or behind `external_links`: pre-signed cloud
//!   storage URLs, which are credentials. They are fetched without the `Authorization`
//!   header (with only the `http_headers` Databricks lists), never logged, and masked from
//!   every message; an expired link is asked for again once.
//! - `POST /api/2.0/sql/statements/{id}/cancel` when the run stops before the statement ends.
//! - OAuth machine-to-machine: `POST /oidc/v1/token` on the workspace with the service
//!   principal's client id and secret (`grant_type=client_credentials`, `scope=all-apis`).
//!
//! Docs: <https://docs.databricks.com/api/workspace/statementexecution>,
//! <https://docs.databricks.com/en/dev-tools/sql-execution-tutorial.html>,
//! <https://docs.databricks.com/en/dev-tools/auth/oauth-m2m.html>.
//!
//! Databricks SQL has no read-only statement mode: the query must be a single `SELECT`
//! ([`super::statement`]), and the grants are the real guarantee (docs/sources/databricks.md).

mod decode;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, stream};
use reqwest::Url;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use self::decode::{ColumnInfo, Kind};
use super::rest::{self, CallError, Http, HttpError, Mint, Progress, Token, Tokens};
use super::{Column, Connection, RowSender, RowStream, SourceError, SourceOptions, StreamEnd};

/// Chunks fetched ahead of the one being read.
const PREFETCH: usize = 3;
/// How long the submission waits for a quick statement (Databricks takes 5 to 50 seconds).
const WAIT_TIMEOUT: &str = "10s";
/// Secret keys read besides the URL.
const TOKEN: &str = "token";
const CLIENT_ID: &str = "client_id";
const CLIENT_SECRET: &str = "client_secret";

/// Runs `query` on the SQL warehouse of the connection URL and streams its rows.
pub(super) async fn extract(
    connection: Connection<'_>,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let target = crate::redact::describe_url(connection.url);
    let (config, auth) =
        Config::parse(connection.url, connection.credentials).map_err(|reason| SourceError::Config {
            target: target.clone(),
            reason,
        })?;
    super::statement::check_read_only(query).map_err(SourceError::ReadOnly)?;
    let http = Http::new(connection)?;
    let base = http.base(&format!("https://{}", config.host));
    let tokens = Tokens::new(Auth {
        method: auth,
        token_url: format!("{base}/oidc/v1/token"),
        target: target.clone(),
    });
    let client = Arc::new(Client {
        http,
        tokens,
        base,
        target,
        timeout: options.statement_timeout,
    });

    let first = client.submit(query, &config).await?;
    let id = first.statement_id.clone().unwrap_or_default();
    let guard = CancelOnDrop {
        client: client.clone(),
        id: Some(id.clone()),
    };
    let deadline = Instant::now() + options.statement_timeout;
    let done = client.wait(first, &id, deadline).await?;
    guard.disarm();
    let manifest = done
        .manifest
        .ok_or_else(|| SourceError::Query("the answer has no result manifest".to_owned()))?;
    let plan = decode::plan(&manifest.schema.columns)?;
    let chunks = usize::try_from(manifest.total_chunk_count.unwrap_or(1))
        .unwrap_or(usize::MAX)
        .max(1);
    let expected: BTreeMap<u64, u64> = manifest
        .chunks
        .iter()
        .filter_map(|c| Some((c.chunk_index?, c.row_count?)))
        .collect();

    let (tx, rx) = super::row_channel(options);
    let columns = plan.iter().map(|(c, _)| c.clone()).collect();
    tokio::spawn(stream(client, id, done.result, chunks, expected, plan, tx));
    Ok(RowStream::new(columns, rx))
}

/// Where the statement runs and as whom.
struct Config {
    host: String,
    warehouse_id: String,
    catalog: Option<String>,
    schema: Option<String>,
}

/// How the workspace is authenticated to.
enum Method {
    /// A personal access token (or any token the workspace accepts as is).
    Token(String),
    /// OAuth M2M: a service principal's client id and secret.
    ClientCredentials { id: String, secret: String },
}

impl Config {
    /// `databricks://[CLIENT_ID@]HOST/sql/1.0/warehouses/WAREHOUSE_ID?catalog=C&schema=S`
    /// (the HTTP path of the warehouse's connection details, or just `/WAREHOUSE_ID`).
    fn parse(url: &str, credentials: &super::Credentials) -> Result<(Config, Method), String> {
        let parsed = Url::parse(url).map_err(|e| format!("the URL is not valid ({e})"))?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the URL names no workspace host: use databricks://HOST/sql/1.0/warehouses/ID")?
            .to_owned();
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        {
            return Err(format!("{host:?} is not a workspace host name"));
        }
        if parsed.port().is_some() {
            return Err("the workspace host takes no port".to_owned());
        }
        if parsed.password().is_some() {
            return Err(format!(
                "put the token under the Secret key {TOKEN:?}, not in the URL"
            ));
        }
        let segments: Vec<&str> = parsed
            .path_segments()
            .into_iter()
            .flatten()
            .filter(|s| !s.is_empty())
            .collect();
        let warehouse_id = segments
            .last()
            .copied()
            .filter(|id| id.chars().all(|c| c.is_ascii_alphanumeric()))
            .ok_or("the URL names no SQL warehouse: use databricks://HOST/sql/1.0/warehouses/ID")?
            .to_owned();
        let user = parsed.username();
        let auth = match (
            credentials.get(TOKEN),
            credentials.get(CLIENT_SECRET),
            credentials.get(CLIENT_ID).or((!user.is_empty()).then_some(user)),
        ) {
            (Some(token), _, _) => Method::Token(token.trim().to_owned()),
            (None, Some(secret), Some(id)) => Method::ClientCredentials {
                id: id.trim().to_owned(),
                secret: secret.trim().to_owned(),
            },
            (None, Some(_), None) => {
                return Err(format!(
                    "OAuth needs the service principal's client id: databricks://CLIENT_ID@HOST/… or the Secret key {CLIENT_ID:?}"
                ));
            }
            (None, None, _) => {
                return Err(format!(
                    "the Secret has neither {TOKEN:?} (a personal access token) nor {CLIENT_SECRET:?} (a service principal's OAuth secret)"
                ));
            }
        };
        Ok((
            Config {
                host,
                warehouse_id,
                catalog: rest::query_param(&parsed, "catalog"),
                schema: rest::query_param(&parsed, "schema"),
            },
            auth,
        ))
    }
}

/// Makes the bearer tokens: the personal access token as is, or an OAuth token.
struct Auth {
    method: Method,
    token_url: String,
    target: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[async_trait]
impl Mint for Auth {
    async fn mint(&self, http: &Http) -> Result<Token, SourceError> {
        match &self.method {
            Method::Token(token) => Ok(Token {
                value: token.clone(),
                expires_at: rest::expires_in(365 * 86_400),
            }),
            Method::ClientCredentials { id, secret } => {
                let (_, answer) = http
                    .json::<TokenAnswer>(|client| {
                        client
                            .post(&self.token_url)
                            .basic_auth(id, Some(secret))
                            .form(&[("grant_type", "client_credentials"), ("scope", "all-apis")])
                    })
                    .await
                    .map_err(|e| match e {
                        HttpError::Egress(e) => SourceError::Egress(e),
                        HttpError::Transport(reason) => SourceError::Connect {
                            target: self.target.clone(),
                            reason: format!("failed to get an OAuth token: {reason}"),
                        },
                        other => SourceError::Auth {
                            target: self.target.clone(),
                            reason: format!(
                                "the OAuth token endpoint refused the client credentials ({other})"
                            ),
                        },
                    })?;
                Ok(Token {
                    expires_at: rest::expires_in(answer.expires_in.unwrap_or(3600)),
                    value: answer.access_token,
                })
            }
        }
    }
}

/// The statement execution API of one workspace.
struct Client {
    http: Http,
    tokens: Tokens,
    base: String,
    target: String,
    timeout: Duration,
}

/// A `StatementResponse`.
#[derive(Debug, Deserialize)]
struct Answer {
    #[serde(default)]
    statement_id: Option<String>,
    #[serde(default)]
    status: Status,
    #[serde(default)]
    manifest: Option<Manifest>,
    #[serde(default)]
    result: Option<Chunk>,
}

#[derive(Debug, Default, Deserialize)]
struct Status {
    #[serde(default)]
    state: String,
    #[serde(default)]
    error: Option<ServiceError>,
}

#[derive(Debug, Default, Deserialize)]
struct ServiceError {
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Deserialize)]
struct Manifest {
    schema: Schema,
    #[serde(default)]
    total_chunk_count: Option<u64>,
    #[serde(default)]
    chunks: Vec<ChunkInfo>,
}

#[derive(Debug, Deserialize)]
struct Schema {
    #[serde(default)]
    columns: Vec<ColumnInfo>,
}

#[derive(Debug, Deserialize)]
struct ChunkInfo {
    #[serde(default)]
    chunk_index: Option<u64>,
    #[serde(default)]
    row_count: Option<u64>,
}

/// A `ResultData`: a chunk's rows inline, or the links to them.
#[derive(Debug, Default, Deserialize)]
struct Chunk {
    #[serde(default)]
    data_array: Option<Rows>,
    #[serde(default)]
    external_links: Vec<ExternalLink>,
}

/// A pre-signed link to (part of) a chunk. `Debug` never shows the link.
#[derive(Deserialize)]
struct ExternalLink {
    external_link: String,
    #[serde(default)]
    http_headers: BTreeMap<String, String>,
}

impl std::fmt::Debug for ExternalLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalLink").finish_non_exhaustive()
    }
}

type Rows = Vec<Vec<Option<String>>>;

impl Client {
    async fn request<T: serde::de::DeserializeOwned>(
        &self,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<T, SourceError> {
        rest::json_authorized(&self.http, &self.tokens, |client, token| {
            build(client).bearer_auth(token)
        })
        .await
        .map(|(_, answer)| answer)
        .map_err(|e| match e {
            CallError::Http(e) => self.error(e),
            CallError::Token(e) => e,
        })
    }

    async fn submit(&self, query: &str, config: &Config) -> Result<Answer, SourceError> {
        let mut body = json!({
            "statement": query,
            "warehouse_id": config.warehouse_id,
            "wait_timeout": WAIT_TIMEOUT,
            "on_wait_timeout": "CONTINUE",
            "disposition": "EXTERNAL_LINKS",
            "format": "JSON_ARRAY",
        });
        if let Some(catalog) = &config.catalog {
            body["catalog"] = json!(catalog);
        }
        if let Some(schema) = &config.schema {
            body["schema"] = json!(schema);
        }
        let url = format!("{}/api/2.0/sql/statements", self.base);
        let answer: Answer = self.request(|client| client.post(&url).json(&body)).await?;
        match answer.statement_id.as_deref() {
            Some(id) if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                Ok(answer)
            }
            _ => Err(SourceError::Query(
                "Databricks answered without a usable statement id".to_owned(),
            )),
        }
    }

    /// Polls until the statement leaves `PENDING`/`RUNNING`; its answer when it succeeded.
    async fn wait(&self, answer: Answer, id: &str, deadline: Instant) -> Result<Answer, SourceError> {
        let url = format!("{}/api/2.0/sql/statements/{id}", self.base);
        let progress = |answer: Answer| match answer.status.state.as_str() {
            "SUCCEEDED" => Ok(Progress::Done(answer)),
            "PENDING" | "RUNNING" => Ok(Progress::Running),
            "FAILED" => {
                let error = answer.status.error.unwrap_or_default();
                Err(SourceError::Query(
                    self.http
                        .scrub(&format!("{} ({})", error.message, error.error_code)),
                ))
            }
            other => Err(SourceError::Query(format!(
                "the statement ended in state {other}"
            ))),
        };
        rest::poll(answer, deadline, self.timeout, progress, || {
            self.request(|client| client.get(&url))
        })
        .await
    }

    /// The rows of chunk `index`: `first` for chunk 0, the chunk endpoint for the others.
    async fn chunk(&self, id: &str, index: usize, first: Option<Chunk>) -> Result<Rows, SourceError> {
        let chunk = match first {
            Some(chunk) => chunk,
            None => self.chunk_answer(id, index).await?,
        };
        self.rows_of(id, index, chunk).await
    }

    async fn chunk_answer(&self, id: &str, index: usize) -> Result<Chunk, SourceError> {
        let url = format!("{}/api/2.0/sql/statements/{id}/result/chunks/{index}", self.base);
        self.request(|client| client.get(&url)).await
    }

    async fn rows_of(&self, id: &str, index: usize, chunk: Chunk) -> Result<Rows, SourceError> {
        if let Some(rows) = chunk.data_array {
            return Ok(rows);
        }
        let mut rows = Vec::new();
        for (part, link) in chunk.external_links.iter().enumerate() {
            let mut fetched = self.download(link).await;
            if matches!(
                &fetched,
                Err(HttpError::Status {
                    status: 403 | 404,
                    ..
                })
            ) {
                // Links expire (after about 15 minutes): ask for the chunk's links again.
                tracing::debug!(
                    chunk = index,
                    "an external link was refused; asking for a fresh one"
                );
                let fresh = self.chunk_answer(id, index).await?;
                fetched = match fresh.external_links.get(part) {
                    Some(link) => self.download(link).await,
                    None => fetched,
                };
            }
            let mut part_rows = fetched.map_err(|e| {
                SourceError::Query(format!(
                    "failed to download result chunk {index} from cloud storage: {e}"
                ))
            })?;
            rows.append(&mut part_rows);
        }
        Ok(rows)
    }

    /// One external link's rows: no `Authorization` header (the link carries its own
    /// signature, and a bearer token must never reach cloud storage), and no link in any
    /// message.
    async fn download(&self, link: &ExternalLink) -> Result<Rows, HttpError> {
        let hide = |text: String| mask_link(&self.http.scrub(&text), &link.external_link);
        let response = self
            .http
            .send(|client| {
                let mut request = client.get(&link.external_link);
                for (name, value) in &link.http_headers {
                    if !name.eq_ignore_ascii_case("authorization") {
                        request = request.header(name, value);
                    }
                }
                request
            })
            .await
            .map_err(|e| match e {
                HttpError::Status {
                    status,
                    body,
                    retry_after,
                } => HttpError::Status {
                    status,
                    body: hide(body),
                    retry_after,
                },
                HttpError::Transport(reason) => HttpError::Transport(hide(reason)),
                HttpError::Body(reason) => HttpError::Body(hide(reason)),
                HttpError::Egress(e) => HttpError::Egress(e),
            })?;
        let body = self.http.read_body(response, rest::MAX_BODY).await?;
        serde_json::from_slice(&body)
            .map_err(|e| HttpError::Body(format!("failed to parse a result chunk: {e}")))
    }

    async fn cancel(&self, id: &str) {
        let url = format!("{}/api/2.0/sql/statements/{id}/cancel", self.base);
        let sent = rest::send_authorized(&self.http, &self.tokens, |client, token| {
            client.post(&url).bearer_auth(token)
        })
        .await;
        match sent {
            Ok(_) => tracing::info!(statement = id, "cancelled the Databricks statement"),
            Err(CallError::Http(e)) => {
                tracing::warn!(statement = id, error = %e, "failed to cancel the Databricks statement")
            }
            Err(CallError::Token(e)) => {
                tracing::warn!(statement = id, error = %e, "failed to cancel the Databricks statement")
            }
        }
    }

    fn error(&self, e: HttpError) -> SourceError {
        let target = self.target.clone();
        match e {
            HttpError::Transport(reason) => SourceError::Connect { target, reason },
            HttpError::Body(reason) => SourceError::Query(reason),
            HttpError::Egress(e) => SourceError::Egress(e),
            HttpError::Status { status, body, .. } => {
                let error: ServiceError = serde_json::from_str(&body).unwrap_or_default();
                let reason = if error.message.is_empty() {
                    format!("HTTP {status}: {body}")
                } else {
                    format!("{} ({})", error.message, error.error_code)
                };
                match status {
                    401 | 403 => SourceError::Auth { target, reason },
                    404 => SourceError::Config {
                        target,
                        reason: format!("{reason}: check the workspace host and the warehouse id"),
                    },
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

/// `text` with the link, and its query string (the signature), masked.
fn mask_link(text: &str, link: &str) -> String {
    let mut out = text.replace(link, crate::redact::MASK);
    if let Some((_, query)) = link.split_once('?')
        && !query.is_empty()
    {
        out = out.replace(query, crate::redact::MASK);
    }
    out
}

/// Cancels the statement when dropped armed: the run stopped (or failed) while it ran.
struct CancelOnDrop {
    client: Arc<Client>,
    id: Option<String>,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.id = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let client = self.client.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { client.cancel(&id).await });
            }
        }
    }
}

/// The streaming task: chunks fetched ahead, in order, decoded row by row.
async fn stream(
    client: Arc<Client>,
    id: String,
    first: Option<Chunk>,
    chunks: usize,
    expected: BTreeMap<u64, u64>,
    plan: Vec<(Column, Kind)>,
    tx: RowSender,
) {
    let mut first = Some(first.unwrap_or_default());
    let fetches = {
        let id = id.clone();
        stream::iter(0..chunks)
            .map(move |index| {
                let client = client.clone();
                let id = id.clone();
                let given = if index == 0 { first.take() } else { None };
                let expected = expected.get(&(index as u64)).copied();
                async move {
                    let rows = client.chunk(&id, index, given).await?;
                    if let Some(n) = expected
                        && n != rows.len() as u64
                    {
                        return Err(SourceError::Query(format!(
                            "result chunk {index} holds {} rows where Databricks announced {n}",
                            rows.len()
                        )));
                    }
                    Ok::<_, SourceError>(rows)
                }
            })
            .buffered(PREFETCH)
    };
    let end = super::pump_parts(fetches, &tx, |row: &Vec<Option<String>>| decode_row(row, &plan)).await;
    if end == StreamEnd::ReceiverGone {
        tracing::debug!(statement = %id, "the run stopped reading the Databricks result");
    }
}

fn decode_row(row: &[Option<String>], plan: &[(Column, Kind)]) -> Result<super::SourceRow, SourceError> {
    super::decode_planned_row(row.len(), plan, |i, kind| decode::value(*kind, row[i].as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Credentials;

    fn creds(pairs: &[(&str, &str)]) -> Credentials {
        Credentials::new(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn the_url_names_host_warehouse_catalog_and_schema() {
        let (c, _) = Config::parse(
            "databricks://dbc-a1b2.cloud.databricks.com/sql/1.0/warehouses/abc123?catalog=main&schema=marts",
            &creds(&[("token", "dapi1")]),
        )
        .unwrap();
        assert_eq!(c.host, "dbc-a1b2.cloud.databricks.com");
        assert_eq!(c.warehouse_id, "abc123");
        assert_eq!(c.catalog.as_deref(), Some("main"));
        assert_eq!(c.schema.as_deref(), Some("marts"));
        let (_, auth) = Config::parse(
            "databricks://sp-id@h.example/abc",
            &creds(&[("client_secret", "s")]),
        )
        .unwrap();
        assert!(matches!(auth, Method::ClientCredentials { ref id, .. } if id == "sp-id"));
    }

    #[test]
    fn missing_pieces_are_explained() {
        assert!(
            Config::parse("databricks://h/abc", &creds(&[]))
                .err()
                .unwrap()
                .contains("client_secret")
        );
        assert!(
            Config::parse("databricks://h/", &creds(&[("token", "t")]))
                .err()
                .unwrap()
                .contains("warehouse")
        );
        assert!(
            Config::parse("databricks://h/abc", &creds(&[("client_secret", "s")]))
                .err()
                .unwrap()
                .contains("client id")
        );
        assert!(Config::parse("databricks://h:8443/abc", &creds(&[("token", "t")])).is_err());
    }

    #[test]
    fn links_and_their_signatures_are_masked() {
        let link = "https://bucket.s3.amazonaws.com/chunk?X-Amz-Signature=abc123secret";
        let text = format!("GET {link} failed; signature X-Amz-Signature=abc123secret");
        let masked = mask_link(&text, link);
        assert!(!masked.contains("abc123secret"), "{masked}");
    }
}
