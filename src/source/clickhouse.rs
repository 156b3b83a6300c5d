//! ClickHouse source, over the HTTP interface.
//!
//! `clickhouse://user:password@host:8123/database` (HTTP) or `clickhouses://…:8443/…`
//! (HTTPS). Each extraction asks the server's version first (which also checks the login
//! and the database), then POSTs the model query with, as URL settings:
//!
//! - `readonly=2`: the query may read and set query settings, never write or change
//!   `readonly` itself (<https://clickhouse.com/docs/operations/settings/permissions-for-queries>);
//! - `max_execution_time`: the statement timeout in whole seconds, rounded up; the client
//!   also stops reading a few seconds after it, should the query raise its own limit;
//! - the output format `RowBinaryWithNamesAndTypes` (columns and types, then rows; see
//!   [`rowbinary`] for why this format). Servers older than that format (ClickHouse 18.x)
//!   answer "unknown format": the columns are then learnt with `DESCRIBE TABLE (query)` and
//!   the rows read in plain `RowBinary`;
//! - from 24.10, `output_format_binary_write_json_as_string=1`, so `JSON` columns arrive as
//!   JSON text; from 21.1, `cancel_http_readonly_queries_on_client_close=1`, so a dropped
//!   stream stops the query at once (older servers stop at their next block of output).
//!
//! Reference: <https://clickhouse.com/docs/interfaces/http>. The `clickhouse` crate (by
//! ClickHouse Inc.) is not used: it reads RowBinary into compile-time row types, and a model
//! query's columns are only known at run time.

mod rowbinary;
mod types;

use std::time::Duration;

use percent_encoding::percent_decode_str;
use reqwest::{StatusCode, Url};
use tokio::time::Instant;

use self::rowbinary::{RowReader, Step, StreamError};
use self::types::ChType;
use super::{Column, RowSender, RowSink, RowStream, SourceError, SourceOptions};

/// Default HTTP port of `clickhouse://`.
const HTTP_PORT: u16 = 8123;
/// Default HTTPS port of `clickhouses://` (ClickHouse Cloud's too).
const HTTPS_PORT: u16 = 8443;
/// How long to wait for a TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long past the statement timeout the client keeps reading before it gives up itself.
const CLIENT_GRACE: Duration = Duration::from_secs(5);
/// Most bytes read from an error response.
const MAX_ERROR_BYTES: usize = 64 << 10;

/// ClickHouse error codes (`src/Common/ErrorCodes.cpp`).
mod code {
    pub const UNKNOWN_DATABASE: u32 = 81;
    pub const UNKNOWN_FORMAT: u32 = 73;
    pub const TIMEOUT_EXCEEDED: u32 = 159;
    pub const READONLY: u32 = 164;
    pub const UNKNOWN_USER: u32 = 192;
    pub const WRONG_PASSWORD: u32 = 193;
    pub const REQUIRED_PASSWORD: u32 = 194;
    pub const AUTHENTICATION_FAILED: u32 = 516;
}

/// Runs `query` on the ClickHouse server of `url` and streams its rows.
pub(super) async fn extract(
    url: &str,
    query: &str,
    options: &SourceOptions,
) -> Result<RowStream, SourceError> {
    let server = Server::from_url(url)?;
    crate::egress::check_endpoint(&server.host, server.port).await?;
    let timeout = options.statement_timeout;
    let version = server.version(timeout).await?;
    let settings = settings(version, timeout);
    let started = Instant::now();
    // A timeout too large for the clock is as good as none.
    let deadline = started
        .checked_add(timeout.saturating_add(CLIENT_GRACE))
        .unwrap_or_else(|| started + Duration::from_secs(100 * 365 * 86_400));

    let (columns, reader, response) = server.start(query, &settings, timeout, deadline).await?;
    let types = plan(&columns, json_as_string(version))?;
    let (tx, rx) = super::row_channel(options);
    tokio::spawn(stream(response, reader, types, tx, deadline, timeout));
    Ok(RowStream::new(columns, rx))
}

/// A server and the login to use on it.
struct Server {
    client: reqwest::Client,
    /// `http(s)://host:port/`, without credentials.
    base: Url,
    /// Host and port, for the egress check.
    host: String,
    port: u16,
    user: String,
    password: String,
    database: Option<String>,
    /// The URL as given, for messages (never shown whole).
    url: String,
}

impl Server {
    fn from_url(url: &str) -> Result<Server, SourceError> {
        let invalid = |reason: &str| super::connect_error(url, reason);
        let parsed = Url::parse(url).map_err(|e| invalid(&format!("invalid URL: {e}")))?;
        let (scheme, default_port) = match parsed.scheme() {
            "clickhouse" => ("http", HTTP_PORT),
            "clickhouses" => ("https", HTTPS_PORT),
            other => return Err(SourceError::UnsupportedUrl(other.to_owned())),
        };
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| invalid("the URL has no host"))?;
        if let Some((name, _)) = parsed.query_pairs().next() {
            return Err(invalid(&format!(
                "unknown URL parameter {name:?} (the URL takes no parameters; use clickhouses:// for TLS)"
            )));
        }
        let port = parsed.port().unwrap_or(default_port);
        let base = Url::parse(&format!("{scheme}://{host}:{port}/"))
            .map_err(|e| invalid(&format!("invalid host: {e}")))?;
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let user = match parsed.username() {
            "" => "default".to_owned(),
            u => decode(u),
        };
        let password = parsed.password().map(decode).unwrap_or_default();
        let database = match parsed.path().trim_matches('/') {
            "" => None,
            db => Some(decode(db)),
        };
        // DNS through the egress policy's resolver: a name that resolves into a denied range
        // is refused as well.
        let client = crate::egress::http_client()
            .connect_timeout(CONNECT_TIMEOUT)
            // Credentials go with every request: never follow a redirect elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| invalid(&e.to_string()))?;
        Ok(Server {
            client,
            host: host.to_owned(),
            port,
            base,
            user,
            password,
            database,
            url: url.to_owned(),
        })
    }

    /// POSTs `sql` with `params` as URL settings.
    async fn post(
        &self,
        sql: &str,
        params: &[(&str, String)],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<reqwest::Response, SourceError> {
        let mut url = self.base.clone();
        {
            let mut pairs = url.query_pairs_mut();
            if let Some(db) = &self.database {
                pairs.append_pair("database", db);
            }
            for (k, v) in params {
                pairs.append_pair(k, v);
            }
        }
        let request = self
            .client
            .post(url)
            .basic_auth(&self.user, Some(&self.password))
            .body(sql.to_owned())
            .send();
        match tokio::time::timeout_at(deadline, request).await {
            Err(_) => Err(SourceError::Timeout(timeout)),
            // No status means the server was not reached (or the connection broke).
            Ok(Err(e)) => Err(super::connect_error(&self.url, without_url(&e))),
            Ok(Ok(response)) if response.status() == StatusCode::OK => Ok(response),
            Ok(Ok(response)) => Err(self.error_response(response, timeout).await),
        }
    }

    /// The error a non-200 answer stands for.
    async fn error_response(&self, mut response: reqwest::Response, timeout: Duration) -> SourceError {
        let status = response.status();
        let mut body = Vec::new();
        while body.len() < MAX_ERROR_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                _ => break,
            }
        }
        body.truncate(MAX_ERROR_BYTES);
        let text = String::from_utf8_lossy(&body).trim().to_owned();
        if rowbinary::looks_like_exception(text.as_bytes()) {
            return self.server_error(&text, timeout);
        }
        // Not ClickHouse speaking (a proxy, a load balancer, a wrong port).
        super::connect_error(&self.url, format!("HTTP {status}: {}", first_line(&text)))
    }

    /// Sorts an exception text by its code.
    fn server_error(&self, text: &str, timeout: Duration) -> SourceError {
        let message = self.scrub(&exception_message(text));
        match exception_code(text) {
            Some(code::TIMEOUT_EXCEEDED) => SourceError::Timeout(timeout),
            Some(code::READONLY) => SourceError::ReadOnly(message),
            Some(
                code::UNKNOWN_USER
                | code::WRONG_PASSWORD
                | code::REQUIRED_PASSWORD
                | code::AUTHENTICATION_FAILED
                | code::UNKNOWN_DATABASE,
            ) => super::connect_error(&self.url, message),
            _ => SourceError::Query(message),
        }
    }

    fn scrub(&self, text: &str) -> String {
        let mut scrubber = crate::redact::Scrubber::new().with_url(&self.url);
        if self.password.len() >= 3 {
            scrubber = scrubber.with_url(&format!("x://u:{}@h", self.password));
        }
        scrubber.scrub(text)
    }

    /// The server's version, `(major, minor)`; also proves the login, the database, and
    /// that the login may take the settings every query carries.
    async fn version(&self, timeout: Duration) -> Result<(u32, u32), SourceError> {
        let deadline = Instant::now() + CONNECT_TIMEOUT.max(timeout.min(Duration::from_secs(60)));
        let mut params = settings((0, 0), timeout);
        params.push(("default_format", "TabSeparated".to_owned()));
        let response = self
            .post("SELECT version()", &params, deadline, timeout)
            .await
            .map_err(|e| match e {
                // Nothing but the settings can be refused here.
                SourceError::ReadOnly(m) | SourceError::Query(m) if m.contains("setting") => {
                    SourceError::Query(format!(
                        "the ClickHouse user may not change the settings Backflow sends with \
                         every query (readonly, max_execution_time): give it a profile with \
                         readonly = 2 ({m})"
                    ))
                }
                other => other,
            })?;
        let text = tokio::time::timeout_at(deadline, response.text())
            .await
            .map_err(|_| SourceError::Timeout(timeout))?
            .map_err(|e| super::connect_error(&self.url, without_url(&e)))?;
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => Ok((major, minor)),
            _ => Err(super::connect_error(
                &self.url,
                format!("the server answered {:?} for its version", first_line(&text)),
            )),
        }
    }

    /// Starts the query and learns its columns, from the header of
    /// `RowBinaryWithNamesAndTypes` or, on servers without it, from `DESCRIBE`.
    async fn start(
        &self,
        query: &str,
        settings: &[(&str, String)],
        timeout: Duration,
        deadline: Instant,
    ) -> Result<(Vec<Column>, RowReader, reqwest::Response), SourceError> {
        let with_format = |format: &str| {
            let mut params = settings.to_vec();
            params.push(("default_format", format.to_owned()));
            params
        };
        match self
            .post(
                query,
                &with_format("RowBinaryWithNamesAndTypes"),
                deadline,
                timeout,
            )
            .await
        {
            Ok(mut response) => {
                let mut reader = RowReader::new();
                let header = loop {
                    if reader.at_end() {
                        // A statement without a result, or a `FORMAT Null` clause.
                        return Err(SourceError::Query(
                            "it returns no columns (a model is a SELECT whose columns the mappings \
                             read, without a FORMAT clause)"
                                .to_owned(),
                        ));
                    }
                    if let Some(header) = reader
                        .next_with(rowbinary::read_header)
                        .map_err(|e| self.stream_error(e, timeout))?
                    {
                        break header;
                    }
                    self.read_more(&mut response, &mut reader, deadline, timeout)
                        .await?;
                };
                let columns = header
                    .into_iter()
                    .map(|(name, type_name)| Column { name, type_name })
                    .collect();
                Ok((columns, reader, response))
            }
            Err(SourceError::Query(m)) if m.ends_with(&format!("(code {})", code::UNKNOWN_FORMAT)) => {
                let columns = self.describe(query, settings, deadline, timeout).await?;
                let response = self
                    .post(query, &with_format("RowBinary"), deadline, timeout)
                    .await?;
                Ok((columns, RowReader::new(), response))
            }
            Err(e) => Err(e),
        }
    }

    /// The columns of `query` by `DESCRIBE TABLE (query)`, for servers older than
    /// `RowBinaryWithNamesAndTypes`.
    async fn describe(
        &self,
        query: &str,
        settings: &[(&str, String)],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Vec<Column>, SourceError> {
        // The line breaks keep a trailing `-- comment` from swallowing the parenthesis.
        let trimmed = query.trim_end().trim_end_matches(';');
        let describe = format!("DESCRIBE TABLE (\n{trimmed}\n)");
        let mut params = settings.to_vec();
        params.push(("default_format", "TabSeparated".to_owned()));
        let response = self.post(&describe, &params, deadline, timeout).await?;
        let text = tokio::time::timeout_at(deadline, response.text())
            .await
            .map_err(|_| SourceError::Timeout(timeout))?
            .map_err(|e| SourceError::Query(format!("failed to read the columns: {}", without_url(&e))))?;
        if rowbinary::looks_like_exception(text.as_bytes()) {
            return Err(self.server_error(&text, timeout));
        }
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let mut fields = line.split('\t').map(unescape_tsv);
                match (fields.next(), fields.next()) {
                    (Some(name), Some(type_name)) => Ok(Column { name, type_name }),
                    _ => Err(SourceError::Query(format!(
                        "failed to read the columns: unexpected DESCRIBE line {:?}",
                        first_line(line)
                    ))),
                }
            })
            .collect()
    }

    /// Reads the next chunk of `response` into `reader`.
    async fn read_more(
        &self,
        response: &mut reqwest::Response,
        reader: &mut RowReader,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), SourceError> {
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Err(_) => Err(SourceError::Timeout(timeout)),
            Ok(Ok(Some(chunk))) => reader.push(&chunk).map_err(|e| self.stream_error(e, timeout)),
            Ok(Ok(None)) => {
                reader.finish();
                Ok(())
            }
            Ok(Err(e)) => Err(SourceError::Query(format!(
                "failed to read the result: {}",
                without_url(&e)
            ))),
        }
    }

    fn stream_error(&self, e: StreamError, timeout: Duration) -> SourceError {
        match e {
            StreamError::Server(text) => self.server_error(&text, timeout),
            StreamError::Invalid(reason) => {
                SourceError::Query(format!("failed to read the result: {reason}"))
            }
        }
    }
}

/// The settings sent with the model query on a server of `version`.
fn settings(version: (u32, u32), timeout: Duration) -> Vec<(&'static str, String)> {
    // Whole seconds: servers before 22.x take no fraction. Rounded up, and at least 1
    // because 0 means no limit.
    let seconds = super::timeout_millis(timeout).div_ceil(1000);
    let mut settings = vec![
        ("readonly", "2".to_owned()),
        ("max_execution_time", seconds.to_string()),
    ];
    if version >= (21, 1) {
        settings.push(("cancel_http_readonly_queries_on_client_close", "1".to_owned()));
    }
    if json_as_string(version) {
        settings.push(("output_format_binary_write_json_as_string", "1".to_owned()));
    }
    settings
}

/// Whether a server of `version` takes `output_format_binary_write_json_as_string`.
fn json_as_string(version: (u32, u32)) -> bool {
    version >= (24, 10)
}

/// The decoder type of every column, or the first column Backflow cannot read. `JSON`
/// values are read only when the server writes them as text (`json_as_string`): the binary
/// form of 24.8 and 24.9 is not decoded.
fn plan(columns: &[Column], json_as_string: bool) -> Result<Vec<ChType>, SourceError> {
    columns
        .iter()
        .map(|c| {
            types::parse(&c.type_name)
                .ok()
                .filter(|t| json_as_string || !t.has_json())
                .ok_or_else(|| SourceError::UnsupportedType {
                    column: c.name.clone(),
                    type_name: c.type_name.clone(),
                })
        })
        .collect()
}

/// The streaming task: read chunks, cut rows, send them.
///
/// A row with a value that has no canonical form travels as
/// [`SourceRow::Undecodable`](super::SourceRow::Undecodable)
/// (NULL in the value's place); only a broken body, a server error or the timeout ends the
/// stream.
async fn stream(
    mut response: reqwest::Response,
    mut reader: RowReader,
    types: Vec<ChType>,
    tx: RowSender,
    deadline: Instant,
    timeout: Duration,
) {
    let mut sink = RowSink::new(tx);
    let body_error = |e| match e {
        StreamError::Server(text) => classify_mid_stream(&text, timeout),
        StreamError::Invalid(reason) => SourceError::Query(format!("failed to read the result: {reason}")),
    };
    loop {
        match reader.next_row(&types) {
            Ok(Step::Row(row)) => {
                if !sink.push(row).await {
                    return;
                }
                continue;
            }
            Ok(Step::End) => {
                sink.finish().await;
                return;
            }
            Ok(Step::NeedMore) => {}
            Err(e) => {
                sink.fail(body_error(e)).await;
                return;
            }
        }
        // Waiting for the body also watches the receiver, so a slow query is dropped (and,
        // from 21.1, cancelled) as soon as nobody listens.
        let chunk = tokio::select! {
            chunk = tokio::time::timeout_at(deadline, response.chunk()) => chunk,
            () = sink.closed() => return,
        };
        let more = match chunk {
            Err(_) => Err(SourceError::Timeout(timeout)),
            Ok(Ok(Some(chunk))) => reader.push(&chunk).map_err(body_error),
            Ok(Ok(None)) => {
                reader.finish();
                Ok(())
            }
            Ok(Err(e)) => Err(SourceError::Query(format!(
                "failed to read the result: {}",
                without_url(&e)
            ))),
        };
        if let Err(e) = more {
            sink.fail(e).await;
            return;
        }
    }
}

/// An exception written into a started body. Logins and databases were checked before the
/// query started, so only the query's own failures can appear here.
fn classify_mid_stream(text: &str, timeout: Duration) -> SourceError {
    match exception_code(text) {
        Some(code::TIMEOUT_EXCEEDED) => SourceError::Timeout(timeout),
        _ => SourceError::Query(exception_message(text)),
    }
}

/// The code of `Code: 60, e.displayText() = …` or `Code: 60. DB::Exception: …`.
fn exception_code(text: &str) -> Option<u32> {
    let rest = text
        .trim_start()
        .strip_prefix("__exception__")
        .map_or(text, |r| r.trim_start());
    let rest = rest.get(rest.find("Code: ")? + 6..)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// An exception text made readable: `Code: 60, e.displayText() = DB::Exception: Table x
/// doesn't exist, e.what() = DB::Exception` becomes `DB::Exception: Table x doesn't exist
/// (code 60)`.
fn exception_message(text: &str) -> String {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.contains("Code: "))
        .unwrap_or_else(|| text.trim());
    let message = line
        .split_once("e.displayText() = ")
        .map(|(_, m)| m)
        .or_else(|| line.split_once(". ").map(|(_, m)| m))
        .unwrap_or(line);
    let message = message.split(", e.what() = ").next().unwrap_or(message).trim();
    let mut out: String = message.chars().take(2000).collect();
    if let Some(code) = exception_code(text) {
        out.push_str(&format!(" (code {code})"));
    }
    out
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").chars().take(300).collect()
}

/// A reqwest error without the URL it carries (which holds no credentials, but keeps the
/// message short and stable).
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        text = text.replace(&format!(" for url ({url})"), "");
    }
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Undoes TabSeparated escaping (`\t`, `\n`, `\\`, …).
fn unescape_tsv(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_choose_the_transport_and_keep_credentials_out_of_the_base() {
        let s = Server::from_url("clickhouse://reader:p%40ss@127.0.0.1/analytics").unwrap();
        assert_eq!(s.base.as_str(), "http://127.0.0.1:8123/");
        assert_eq!((s.user.as_str(), s.password.as_str()), ("reader", "p@ss"));
        assert_eq!(s.database.as_deref(), Some("analytics"));
        let s = Server::from_url("clickhouses://h.example.com").unwrap();
        assert_eq!(s.base.as_str(), "https://h.example.com:8443/");
        assert_eq!(s.user, "default");
        assert_eq!(s.database, None);
        let err = Server::from_url("clickhouse://u:secret@h/db?secure=true")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("clickhouses://") && !err.contains("secret"), "{err}");
    }

    #[test]
    fn exceptions_of_old_and_new_servers_read_the_same() {
        let old = "Code: 60, e.displayText() = DB::Exception: Table default.x doesn't exist., e.what() = DB::Exception\n";
        let new =
            "Code: 60. DB::Exception: Table default.x doesn't exist. (UNKNOWN_TABLE) (version 24.3.1.1)\n";
        assert_eq!(exception_code(old), Some(60));
        assert_eq!(exception_code(new), Some(60));
        assert_eq!(
            exception_message(old),
            "DB::Exception: Table default.x doesn't exist. (code 60)"
        );
        assert!(exception_message(new).starts_with("DB::Exception: Table default.x"));
    }

    #[test]
    fn settings_follow_the_server_version() {
        let old = settings((18, 16), Duration::from_millis(1500));
        assert_eq!(
            old,
            vec![
                ("readonly", "2".to_owned()),
                ("max_execution_time", "2".to_owned())
            ]
        );
        let new = settings((25, 3), Duration::from_secs(600));
        assert!(new.contains(&("output_format_binary_write_json_as_string", "1".to_owned())));
        assert!(new.contains(&("cancel_http_readonly_queries_on_client_close", "1".to_owned())));
    }

    #[test]
    fn json_columns_need_a_server_that_writes_them_as_text() {
        let columns = vec![Column {
            name: "doc".into(),
            type_name: "Array(Nullable(JSON))".into(),
        }];
        assert!(matches!(
            plan(&columns, false),
            Err(SourceError::UnsupportedType { column, .. }) if column == "doc"
        ));
        assert!(plan(&columns, true).is_ok());
    }

    #[test]
    fn tab_separated_names_are_unescaped() {
        assert_eq!(unescape_tsv(r"a\tb\\c\n"), "a\tb\\c\n");
    }
}
