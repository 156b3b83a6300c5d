//! BigQuery source, through the REST API v2.
//!
//! - `POST /bigquery/v2/projects/{project}/jobs` with `dryRun: true` first: the statement
//!   type must be `SELECT`, and the bytes it would process must fit `maximumBytesBilled`.
//! - `POST /bigquery/v2/projects/{project}/queries` (`jobs.query`) runs it, with
//!   `maximumBytesBilled`, `location`, the default dataset, a `requestId` and
//!   `formatOptions.useInt64Timestamp`.
//! - `GET /bigquery/v2/projects/{project}/queries/{jobId}` (`jobs.getQueryResults`) is polled
//!   while `jobComplete` is false. Its `startIndex` parameter ("zero-based index of the
//!   starting row") lets the pages after the first be asked for by row offset rather than
//!   by the `pageToken` of the page before, so they are fetched [`PREFETCH`] ahead in
//!   parallel, in order, against the `totalRows` of the first page. A page BigQuery cuts
//!   short (it caps pages at about 10 MB) is completed from where it stopped. An answer
//!   without `totalRows` falls back to `pageToken` chaining, one page ahead.
//! - `POST /bigquery/v2/projects/{project}/jobs/{jobId}/cancel` when the run stops first.
//! - Tokens: a service-account key's JWT exchanged at `https://oauth2.googleapis.com/token`,
//!   or, where the operator allows it, the GKE metadata server (Workload Identity).
//!
//! Docs: <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/query>,
//! <https://cloud.google.com/bigquery/docs/reference/rest/v2/jobs/getQueryResults>,
//! <https://cloud.google.com/bigquery/docs/reference/rest/v2/Job>,
//! <https://developers.google.com/identity/protocols/oauth2/service-account#httprest>,
//! <https://cloud.google.com/kubernetes-engine/docs/concepts/workload-identity>.

mod decode;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Url;
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio::time::Instant;

use self::decode::{Field, Kind};
use super::rest::{self, CallError, Http, HttpError, Mint, Progress, Token, Tokens};
use super::{Column, Connection, Credentials, RowSender, RowStream, SourceError, SourceOptions, StreamEnd};

/// The API, Google's token endpoint and the metadata server.
const API: &str = "https://bigquery.googleapis.com";
const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
const METADATA: &str = "http://metadata.google.internal";
/// The OAuth scope jobs need (`bigquery.readonly` cannot create query jobs).
const SCOPE: &str = "https://www.googleapis.com/auth/bigquery";
/// Rows asked for per page (BigQuery also caps a page at about 10 MB).
const PAGE_ROWS: u32 = 10_000;
/// Pages fetched ahead of the one being read.
const PREFETCH: usize = 3;
/// How long one `jobs.query`/`getQueryResults` call waits for the job.
const WAIT_MS: u64 = 10_000;
/// Secret key of a service-account key file (JSON).
const SERVICE_ACCOUNT: &str = "service_account_json";
/// The operator environment variable that allows the metadata server's credentials.
pub const METADATA_AUTH_ENV: &str = "BACKFLOW_GCP_METADATA_AUTH";

/// Runs `query` in the BigQuery project of the connection URL and streams its rows.
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
    let http = Http::new(connection)?;
    let tokens = Tokens::new(Auth {
        method: auth,
        token_url: format!("{}/token", http.base("https://oauth2.googleapis.com")),
        metadata_url: format!(
            "{}/computeMetadata/v1/instance/service-accounts/default/token",
            http.base(METADATA)
        ),
        target: target.clone(),
    });
    let client = Arc::new(Client {
        base: format!("{}/bigquery/v2/projects/{}", http.base(API), config.project),
        http,
        tokens,
        target,
        timeout: options.statement_timeout,
        location: config.location.clone(),
    });

    client.dry_run(query, &config).await?;
    let first = client.query(query, &config).await?;
    let job = first
        .job_reference
        .as_ref()
        .map(|j| j.job_id.clone())
        .filter(|id| {
            !id.is_empty()
                && id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        })
        .ok_or_else(|| SourceError::Query("BigQuery answered without a usable job id".to_owned()))?;
    let guard = CancelOnDrop {
        client: client.clone(),
        job: Some(job.clone()),
    };
    let deadline = Instant::now() + options.statement_timeout;
    let page = client.wait(first, &job, deadline).await?;
    guard.disarm();
    let schema = page
        .schema
        .as_ref()
        .ok_or_else(|| SourceError::Query("the answer has no schema".to_owned()))?;
    let plan = decode::plan(&schema.fields)?;

    let (tx, rx) = super::row_channel(options);
    let columns = plan.iter().map(|(c, _)| c.clone()).collect();
    tokio::spawn(stream(client, job, page, plan, tx));
    Ok(RowStream::new(columns, rx))
}

/// Where the query runs and as whom.
struct Config {
    project: String,
    dataset: Option<String>,
    location: Option<String>,
    maximum_bytes_billed: Option<u64>,
}

/// How tokens are made.
enum Method {
    /// A service-account key: its email, private key and key id.
    ServiceAccount {
        email: String,
        key: Box<EncodingKey>,
        key_id: Option<String>,
    },
    /// The GKE metadata server (Workload Identity).
    Metadata,
}

#[derive(Deserialize)]
struct KeyFile {
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    #[serde(default)]
    token_uri: Option<String>,
}

impl Config {
    /// `bigquery://PROJECT[/DATASET][?location=L&maximumBytesBilled=N&auth=metadata]`.
    fn parse(url: &str, credentials: &Credentials) -> Result<(Config, Method), String> {
        let parsed = Url::parse(url).map_err(|e| format!("the URL is not valid ({e})"))?;
        let project = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("the URL names no project: use bigquery://PROJECT/DATASET")?
            .to_owned();
        if !project
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'))
        {
            return Err(format!("{project:?} is not a Google Cloud project id"));
        }
        let dataset = parsed
            .path_segments()
            .into_iter()
            .flatten()
            .find(|s| !s.is_empty())
            .map(str::to_owned);
        let maximum_bytes_billed = match rest::query_param(&parsed, "maximumBytesBilled") {
            Some(text) => Some(
                text.parse::<u64>()
                    .map_err(|_| format!("maximumBytesBilled {text:?} is not a whole number of bytes"))?,
            ),
            None => None,
        };
        let auth = match (
            credentials.get(SERVICE_ACCOUNT),
            rest::query_param(&parsed, "auth").as_deref(),
        ) {
            (Some(json), _) => service_account(json)?,
            (None, Some("metadata")) => {
                if std::env::var(METADATA_AUTH_ENV).as_deref() != Ok("enabled") {
                    return Err(format!(
                        "auth=metadata would read as the operator's own Google service account, which this operator does not allow ({METADATA_AUTH_ENV} is not \"enabled\"); put a key under {SERVICE_ACCOUNT:?}"
                    ));
                }
                Method::Metadata
            }
            (None, _) => {
                return Err(format!(
                    "the Secret has no {SERVICE_ACCOUNT:?} key (a service-account key file), and the URL does not ask for auth=metadata"
                ));
            }
        };
        Ok((
            Config {
                project,
                dataset,
                location: rest::query_param(&parsed, "location"),
                maximum_bytes_billed,
            },
            auth,
        ))
    }
}

fn service_account(json: &str) -> Result<Method, String> {
    let key: KeyFile = serde_json::from_str(json)
        .map_err(|_| format!("the {SERVICE_ACCOUNT} key does not hold a service-account key file"))?;
    // The token endpoint never comes from the Secret: a key naming another one is refused
    // rather than followed, so a signed assertion only ever goes to Google.
    if let Some(uri) = key.token_uri.as_deref()
        && uri != TOKEN_URL
    {
        return Err(format!(
            "the service-account key names token_uri {uri:?}; only {TOKEN_URL} is used"
        ));
    }
    let encoding = EncodingKey::from_rsa_pem(key.private_key.as_bytes())
        .map_err(|_| "the service-account key's private_key is not an RSA private key".to_owned())?;
    Ok(Method::ServiceAccount {
        email: key.client_email,
        key: Box::new(encoding),
        key_id: key.private_key_id,
    })
}

struct Auth {
    method: Method,
    token_url: String,
    metadata_url: String,
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
        let answer = match &self.method {
            Method::ServiceAccount { email, key, key_id } => {
                let iat = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let claims = json!({
                    "iss": email, "scope": SCOPE, "aud": TOKEN_URL,
                    "iat": iat, "exp": iat.saturating_add(3600),
                });
                let mut header = Header::new(Algorithm::RS256);
                header.kid = key_id.clone();
                let assertion =
                    jsonwebtoken::encode(&header, &claims, key).map_err(|e| SourceError::Auth {
                        target: self.target.clone(),
                        reason: format!("failed to sign the service-account JWT: {e}"),
                    })?;
                http.json::<TokenAnswer>(|client| {
                    client.post(&self.token_url).form(&[
                        ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                        ("assertion", assertion.as_str()),
                    ])
                })
                .await
            }
            Method::Metadata => {
                http.json::<TokenAnswer>(|client| {
                    client.get(&self.metadata_url).header("Metadata-Flavor", "Google")
                })
                .await
            }
        };
        let (_, answer) = answer.map_err(|e| match e {
            HttpError::Egress(e) => SourceError::Egress(e),
            HttpError::Transport(reason) => SourceError::Connect {
                target: self.target.clone(),
                reason: format!("failed to get a Google token: {reason}"),
            },
            other => SourceError::Auth {
                target: self.target.clone(),
                reason: format!("Google refused the credentials ({other})"),
            },
        })?;
        Ok(Token {
            expires_at: rest::expires_in(answer.expires_in.unwrap_or(3600)),
            value: answer.access_token,
        })
    }
}

/// The jobs API of one project.
struct Client {
    http: Http,
    tokens: Tokens,
    base: String,
    target: String,
    timeout: Duration,
    location: Option<String>,
}

/// A `QueryResponse` / `GetQueryResultsResponse`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Page {
    #[serde(default)]
    job_reference: Option<JobReference>,
    #[serde(default)]
    job_complete: Option<bool>,
    #[serde(default)]
    schema: Option<Schema>,
    #[serde(default)]
    rows: Vec<Row>,
    #[serde(default)]
    page_token: Option<String>,
    /// Rows in the whole result (a decimal string).
    #[serde(default)]
    total_rows: Option<String>,
    #[serde(default)]
    errors: Vec<ErrorProto>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobReference {
    job_id: String,
}

#[derive(Debug, Deserialize)]
struct Schema {
    #[serde(default)]
    fields: Vec<Field>,
}

#[derive(Debug, Deserialize)]
struct Row {
    #[serde(default)]
    f: Vec<Cell>,
}

#[derive(Debug, Deserialize)]
struct Cell {
    #[serde(default)]
    v: Json,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorProto {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
}

/// An error answer: `{"error": {"code", "message", "errors": [{"reason", "message"}]}}`.
#[derive(Debug, Default, Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error: ErrorBody,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    errors: Vec<ErrorProto>,
}

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

    fn query_body(&self, query: &str, config: &Config) -> Json {
        let mut body = json!({"query": query, "useLegacySql": false});
        if let Some(location) = &config.location {
            body["location"] = json!(location);
        }
        if let Some(dataset) = &config.dataset {
            body["defaultDataset"] = json!({"projectId": config.project, "datasetId": dataset});
        }
        body
    }

    /// A dry run: refuses anything but a `SELECT`, and a query over the byte limit.
    async fn dry_run(&self, query: &str, config: &Config) -> Result<(), SourceError> {
        let mut job = json!({"configuration": {"dryRun": true, "query": self.query_body(query, config)}});
        if let Some(location) = &config.location {
            job["jobReference"] = json!({"location": location});
        }
        let url = format!("{}/jobs", self.base);
        let answer: Json = self.request(|client| client.post(&url).json(&job)).await?;
        let statistics = &answer["statistics"];
        let statement_type = statistics["query"]["statementType"].as_str().unwrap_or("");
        if statement_type != "SELECT" {
            return Err(SourceError::ReadOnly(format!(
                "the dry run found a {} statement; only a single SELECT is allowed",
                if statement_type.is_empty() {
                    "non-query"
                } else {
                    statement_type
                }
            )));
        }
        let processed = statistics["totalBytesProcessed"]
            .as_str()
            .and_then(|b| b.parse::<u64>().ok())
            .unwrap_or(0);
        if let Some(limit) = config.maximum_bytes_billed
            && processed > limit
        {
            return Err(SourceError::Query(format!(
                "the query would process {processed} bytes, more than maximumBytesBilled {limit}; it was not run"
            )));
        }
        Ok(())
    }

    async fn query(&self, query: &str, config: &Config) -> Result<Page, SourceError> {
        let mut body = self.query_body(query, config);
        body["requestId"] = json!(uuid::Uuid::new_v4().to_string());
        body["timeoutMs"] = json!(WAIT_MS);
        body["maxResults"] = json!(PAGE_ROWS);
        body["formatOptions"] = json!({"useInt64Timestamp": true});
        if let Some(limit) = config.maximum_bytes_billed {
            body["maximumBytesBilled"] = json!(limit.to_string());
        }
        let url = format!("{}/queries", self.base);
        self.request(|client| client.post(&url).json(&body)).await
    }

    fn page_params(&self, page_token: Option<&str>, wait: bool) -> Vec<(&'static str, String)> {
        self.params(PAGE_ROWS.into(), page_token, wait)
    }

    fn params(&self, max_results: u64, page_token: Option<&str>, wait: bool) -> Vec<(&'static str, String)> {
        let mut params = vec![
            ("formatOptions.useInt64Timestamp", "true".to_owned()),
            ("maxResults", max_results.to_string()),
        ];
        if wait {
            params.push(("timeoutMs", WAIT_MS.to_string()));
        }
        if let Some(location) = &self.location {
            params.push(("location", location.clone()));
        }
        if let Some(token) = page_token {
            params.push(("pageToken", token.to_owned()));
        }
        params
    }

    /// Polls until the job is complete; returns its first page. BigQuery itself waits up to
    /// `timeoutMs` per call; the pause spares a service that answers at once.
    async fn wait(&self, page: Page, job: &str, deadline: Instant) -> Result<Page, SourceError> {
        let url = format!("{}/queries/{job}", self.base);
        let params = self.page_params(None, true);
        let progress = |page: Page| {
            check_errors(&page)?;
            Ok(if page.job_complete == Some(true) {
                Progress::Done(page)
            } else {
                Progress::Running
            })
        };
        rest::poll(page, deadline, self.timeout, progress, || {
            self.request(|client| client.get(&url).query(&params))
        })
        .await
    }

    async fn page(&self, job: &str, token: &str) -> Result<Page, SourceError> {
        let url = format!("{}/queries/{job}", self.base);
        let params = self.page_params(Some(token), false);
        let page: Page = self.request(|client| client.get(&url).query(&params)).await?;
        check_errors(&page)?;
        Ok(page)
    }

    /// Rows `start..end` of the result, by `startIndex`: as many pages as BigQuery needs to
    /// send them (it cuts a page at about 10 MB).
    async fn rows_at(&self, job: &str, start: u64, end: u64) -> Result<Vec<Row>, SourceError> {
        let url = format!("{}/queries/{job}", self.base);
        let mut rows = Vec::new();
        let mut at = start;
        while at < end {
            let mut params = self.params(end - at, None, false);
            params.push(("startIndex", at.to_string()));
            let page: Page = self.request(|client| client.get(&url).query(&params)).await?;
            check_errors(&page)?;
            let got = page.rows.len() as u64;
            if got == 0 || got > end - at {
                return Err(SourceError::Query(format!(
                    "BigQuery sent {got} rows from row {at} where {} were asked for; the result changed while it was read",
                    end - at
                )));
            }
            at += got;
            if rows.is_empty() {
                rows = page.rows;
            } else {
                rows.extend(page.rows);
            }
        }
        Ok(rows)
    }

    async fn cancel(&self, job: &str) {
        let url = format!("{}/jobs/{job}/cancel", self.base);
        let location: Vec<(&str, String)> = self.location.iter().map(|l| ("location", l.clone())).collect();
        match self
            .request::<Json>(|client| client.post(&url).query(&location))
            .await
        {
            Ok(_) => tracing::info!(job, "cancelled the BigQuery job"),
            Err(e) => tracing::warn!(job, error = %e, "failed to cancel the BigQuery job"),
        }
    }

    fn error(&self, e: HttpError) -> SourceError {
        let target = self.target.clone();
        match e {
            HttpError::Transport(reason) => SourceError::Connect { target, reason },
            HttpError::Body(reason) => SourceError::Query(reason),
            HttpError::Egress(e) => SourceError::Egress(e),
            HttpError::Status { status, body, .. } => {
                let answer: ErrorAnswer = serde_json::from_str(&body).unwrap_or_default();
                let reason_code = answer
                    .error
                    .errors
                    .first()
                    .map(|e| e.reason.clone())
                    .unwrap_or_default();
                let reason = if answer.error.message.is_empty() {
                    format!("HTTP {status}: {body}")
                } else {
                    format!("{} ({reason_code})", answer.error.message)
                };
                match (status, reason_code.as_str()) {
                    (401, _) | (403, "accessDenied" | "forbidden") => SourceError::Auth { target, reason },
                    (403, "rateLimitExceeded") | (429 | 500..=599, _) => SourceError::Connect {
                        target,
                        reason: format!("{reason} (still failing after retries)"),
                    },
                    (_, "bytesBilledLimitExceeded") => SourceError::Query(reason),
                    _ => SourceError::Query(reason),
                }
            }
        }
    }
}

/// Errors of a job that ended badly, as `getQueryResults` reports them.
fn check_errors(page: &Page) -> Result<(), SourceError> {
    match page.errors.first() {
        Some(error) if error.reason == "timeout" => Err(SourceError::Query(error.message.clone())),
        Some(error) => Err(SourceError::Query(format!(
            "{} ({})",
            error.message, error.reason
        ))),
        None => Ok(()),
    }
}

struct CancelOnDrop {
    client: Arc<Client>,
    job: Option<String>,
}

impl CancelOnDrop {
    fn disarm(mut self) {
        self.job = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let client = self.client.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { client.cancel(&job).await });
            }
        }
    }
}

/// The streaming task: the first page, then the others by row offset, [`PREFETCH`] ahead in
/// parallel and in order (or by `pageToken`, one ahead, when the answer gave no row count).
async fn stream(client: Arc<Client>, job: String, first: Page, plan: Vec<(Column, Kind)>, tx: RowSender) {
    let more = first.page_token.as_deref().is_some_and(|t| !t.is_empty());
    let total = first.total_rows.as_deref().and_then(|t| t.parse::<u64>().ok());
    let read = first.rows.len() as u64;
    let rest: BoxStream<'static, Result<Vec<Row>, SourceError>> = match (more, total) {
        (false, _) => stream::empty().boxed(),
        (true, Some(total)) => {
            let client = client.clone();
            let job = job.clone();
            // Windows of PAGE_ROWS rows after the first page; `step_by` needs a usize step.
            stream::iter((read..total).step_by(PAGE_ROWS as usize))
                .map(move |start| {
                    let client = client.clone();
                    let job = job.clone();
                    async move {
                        let end = start.saturating_add(PAGE_ROWS.into()).min(total);
                        client.rows_at(&job, start, end).await
                    }
                })
                .buffered(PREFETCH)
                .boxed()
        }
        (true, None) => by_token(client, job.clone(), first.page_token.clone()).boxed(),
    };
    let pages = stream::once(async { Ok(first.rows) }).chain(rest);
    let end = super::pump_parts(pages, &tx, |row: &Row| decode_row(row, &plan)).await;
    if end == StreamEnd::ReceiverGone {
        tracing::debug!(job, "the run stopped reading the BigQuery result");
    }
}

/// The pages after the first by `pageToken`, each asked for as soon as the one before
/// arrived (a task of its own), so the next page is on its way while the current one is
/// decoded.
fn by_token(
    client: Arc<Client>,
    job: String,
    token: Option<String>,
) -> impl futures::Stream<Item = Result<Vec<Row>, SourceError>> + Send + 'static {
    let fetch = move |token: String| {
        let client = client.clone();
        let job = job.clone();
        Ahead(tokio::spawn(async move { client.page(&job, &token).await }))
    };
    let first = token.filter(|t| !t.is_empty()).map(&fetch);
    stream::unfold((first, fetch), |(pending, fetch)| async move {
        let mut pending = pending?;
        let page = (&mut pending.0).await.unwrap_or_else(|e| {
            Err(SourceError::Query(format!(
                "failed to fetch a BigQuery result page: {e}"
            )))
        });
        match page {
            Err(e) => Some((Err(e), (None, fetch))),
            Ok(page) => {
                let next = page.page_token.clone().filter(|t| !t.is_empty()).map(&fetch);
                Some((Ok(page.rows), (next, fetch)))
            }
        }
    })
}

/// A page fetch running ahead, stopped when the stream is dropped.
struct Ahead(tokio::task::JoinHandle<Result<Page, SourceError>>);

impl Drop for Ahead {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn decode_row(row: &Row, plan: &[(Column, Kind)]) -> Result<super::SourceRow, SourceError> {
    super::decode_planned_row(row.f.len(), plan, |i, kind| decode::value(kind, &row.f[i].v))
}
