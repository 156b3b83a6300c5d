//! The Redis destination (`type: redis`): one hash per record, for apps that read features
//! or segments straight from Redis.
//!
//! Each record's hash key is rendered from `spec.redis.key` (`customer:{{id}}`) with the
//! record's match fields and mapped fields. Every top-level mapped field becomes a hash
//! field: text as it is, numbers in their exact canonical text, booleans as `true`/`false`,
//! dates, times, timestamps and UUIDs as their canonical text, nested objects, arrays and
//! JSON as canonical JSON. A field whose value is NULL is removed from the hash (`HDEL`), so
//! a value that became NULL never keeps its old one.
//!
//! A batch is one pipeline. Upserts, updates and inserts run a small Lua script per record,
//! so the existence check of an update or insert, the `HSET`, the `HDEL` and the `PEXPIRE`
//! of one record are atomic; deletes are `DEL`. A command that fails for its own key (a key
//! holding another type: `WRONGTYPE`) rejects that record only.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, ServerErrorKind};
use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{Capabilities, Connector, DestinationError, RecordOutcome, SendError};
use crate::api::DestinationSpec;
use crate::model::record::{Operation, Record};
use crate::model::secret::SecretData;
use crate::model::value::{Document, Value};
use crate::redact::Scrubber;
use crate::template::Template;

/// Most records in one pipeline.
pub const MAX_BATCH_SIZE: usize = 500;

/// Default pipelines per second: Redis serves far more; this keeps a sync from crowding out
/// the apps that read the hashes.
const DEFAULT_REQUESTS_PER_SECOND: f64 = 1000.0;

/// Default pipelines in flight at once.
const DEFAULT_CONCURRENCY: usize = 4;

/// How long connecting (TCP, `AUTH`, `SELECT`) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one pipeline may wait for its replies.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The reason given for an update of a hash that does not exist.
pub const NO_HASH_REASON: &str = "no existing hash under this key to update";

/// The reason given for an insert of a hash that already exists.
pub const EXISTS_REASON: &str = "a hash already exists under this key";

/// Writes one record's hash. `KEYS[1]`: the hash. `ARGV[1]`: `upsert`, `update` or `insert`.
/// `ARGV[2]`: TTL in milliseconds, `0` for none. `ARGV[3]`: the number of field/value pairs to
/// set, then those pairs, then the names of the fields to remove. Returns 1 when written, 0
/// for an update of a missing hash, -1 for an insert of an existing one.
const WRITE_SCRIPT: &str = r#"
local key = KEYS[1]
local mode = ARGV[1]
if mode ~= 'upsert' then
  local exists = redis.call('EXISTS', key) == 1
  if mode == 'update' and not exists then return 0 end
  if mode == 'insert' and exists then return -1 end
end
local last_set = 3 + 2 * tonumber(ARGV[3])
if last_set > 3 then redis.call('HSET', key, unpack(ARGV, 4, last_set)) end
if #ARGV > last_set then redis.call('HDEL', key, unpack(ARGV, last_set + 1, #ARGV)) end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
return 1
"#;

/// Builds the Redis connector for a `type: redis` Destination.
///
/// The URL is read from the credentials Secret (key `url` unless `credentialsSecretRef.key`
/// names another) and parsed here; the connection is opened on first use, and
/// [`Connector::check`] is what proves the server answers and accepts the credentials.
pub fn build(
    spec: &DestinationSpec,
    secret: Option<&SecretData>,
) -> Result<Arc<dyn Connector>, DestinationError> {
    let block = spec
        .redis
        .as_ref()
        .ok_or(DestinationError::MissingBlock("redis"))?;

    let key =
        Template::parse(&block.key).map_err(|e| DestinationError::Invalid(format!("spec.redis.key: {e}")))?;
    if key.variables().next().is_none() {
        return Err(DestinationError::Invalid(
            "spec.redis.key must use at least one field, like customer:{{id}}; otherwise every record writes the same hash"
                .to_owned(),
        ));
    }
    let ttl = match block.ttl.as_deref() {
        None => None,
        Some(text) => {
            let ttl = crate::api::duration::parse(text)
                .map_err(|e| DestinationError::Invalid(format!("spec.redis.ttl: {e}")))?;
            if ttl.as_millis() == 0 {
                return Err(DestinationError::Invalid(
                    "spec.redis.ttl must be at least 1ms; leave it out for hashes that never expire"
                        .to_owned(),
                ));
            }
            Some(ttl)
        }
    };

    let secret_ref = spec
        .credentials_secret_ref
        .as_ref()
        .ok_or(DestinationError::MissingCredentials("redis"))?;
    let secret_key = secret_ref.key.as_deref().unwrap_or("url");
    let url = secret
        .and_then(|s| s.get(secret_key))
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| DestinationError::MissingSecretKey {
            secret: secret_ref.name.clone(),
            key: secret_key.to_owned(),
        })?;
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        "redis" => {}
        "rediss" => {
            return Err(DestinationError::Invalid(format!(
                "key {secret_key:?} of Secret {:?} asks for TLS (rediss://), which this build of the redis destination does not support; use redis:// over a trusted network or a TLS sidecar",
                secret_ref.name
            )));
        }
        _ => {
            return Err(DestinationError::Invalid(format!(
                "type redis needs a redis:// URL in key {secret_key:?} of Secret {:?}",
                secret_ref.name
            )));
        }
    }
    // The driver's parse errors may quote the URL: say which Secret key is wrong instead.
    let client = Client::open(url).map_err(|_| {
        DestinationError::Invalid(format!(
            "key {secret_key:?} of Secret {:?} is not a valid Redis connection URL (redis://[user:password@]host:port/db)",
            secret_ref.name
        ))
    })?;

    Ok(Arc::new(RedisConnector {
        client,
        connection: Mutex::new(None),
        key,
        ttl_millis: ttl.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        scrubber: Scrubber::new().with_url(url).with_secret(secret),
        location: crate::redact::describe_url(url),
        credentials_hint: format!("key {secret_key:?} of Secret {:?}", secret_ref.name),
    }))
}

/// Writes records as Redis hashes. Its `Debug` shows no credentials.
pub struct RedisConnector {
    /// Holds the parsed URL, password included: never printed.
    client: Client,
    /// The shared multiplexed connection, opened on first use and dropped when it breaks.
    connection: Mutex<Option<MultiplexedConnection>>,
    /// The hash key template.
    key: Template,
    /// `PEXPIRE` after each write; 0 for none.
    ttl_millis: u64,
    /// Removes the URL, its password and every Secret value from messages.
    scrubber: Scrubber,
    /// Scheme, host, port and database, without credentials.
    location: String,
    /// Where the credentials came from, for the message when they are refused.
    credentials_hint: String,
}

impl std::fmt::Debug for RedisConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnector")
            .field("location", &self.location)
            .field("key", &self.key.as_str())
            .field("ttl_millis", &self.ttl_millis)
            .finish_non_exhaustive()
    }
}

/// What a Redis error means for the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// May pass on retry: connection refused or lost, timeout, `LOADING`, `BUSY`, a failover.
    Transient,
    /// The server refused the credentials or the user lacks a permission.
    Auth,
    /// The server is a cluster node redirecting keys, which this connector does not follow.
    Cluster,
    /// About this record's key only (`WRONGTYPE`, a script error): reject the record.
    Record,
    /// Anything else a person must look at.
    Fatal,
}

/// Sorts a Redis error.
fn classify(error: &RedisError) -> Failure {
    let code = error.code().unwrap_or_default();
    let detail = error.detail().unwrap_or_default();
    match error.kind() {
        ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm) => return Failure::Auth,
        ErrorKind::Io => return Failure::Transient,
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::ClusterDown,
        ) => return Failure::Transient,
        ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::CrossSlot) => {
            return Failure::Cluster;
        }
        ErrorKind::InvalidClientConfig | ErrorKind::Client | ErrorKind::RESP3NotSupported => {
            return Failure::Fatal;
        }
        _ => {}
    }
    if error.is_timeout() || error.is_connection_refusal() || error.is_connection_dropped() {
        return Failure::Transient;
    }
    match code {
        "NOAUTH" | "WRONGPASS" | "NOPERM" => Failure::Auth,
        "LOADING" | "BUSY" | "MASTERDOWN" | "TRYAGAIN" | "READONLY" | "OOM" => Failure::Transient,
        // A password given to a server that has none configured.
        "ERR" if detail.contains("without any password configured") => Failure::Auth,
        _ => Failure::Record,
    }
}

/// Redis's own wording of an error: `WRONGTYPE Operation against a key holding …`.
fn server_message(error: &RedisError) -> String {
    match (error.code(), error.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_owned(),
        _ => error.to_string(),
    }
}

/// A hash field's value: text as it is, strings of other types unquoted, everything else
/// (numbers, booleans, objects, arrays, JSON) in canonical JSON form. `None` for NULL.
fn hash_value(value: &Value) -> Option<String> {
    match value {
        v if v.is_null() => None,
        Value::Text(s) | Value::Json(serde_json::Value::String(s)) => Some(s.clone()),
        other => {
            let mut out = Vec::new();
            other.write_canonical(&mut out);
            // Dates, times, timestamps and UUIDs are canonical JSON strings: write them bare.
            if out.first() == Some(&b'"')
                && let Ok(text) = serde_json::from_slice::<String>(&out)
            {
                return Some(text);
            }
            Some(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// A key-template variable's value in a record: a match field, a mapped field, or a dotted
/// path into a mapped object (`properties.plan`). `None` when absent or NULL.
fn lookup(record: &Record, name: &str) -> Option<String> {
    let found = record
        .identity
        .get(name)
        .or_else(|| record.fields.get(name))
        .or_else(|| {
            let mut parts = name.split('.');
            let mut current = record.fields.get(parts.next()?)?;
            for part in parts {
                match current {
                    Value::Object(doc) => current = doc.get(part)?,
                    _ => return None,
                }
            }
            Some(current)
        })?;
    hash_value(found)
}

impl RedisConnector {
    /// The record's hash key, or why it has none.
    fn key_of(&self, record: &Record) -> Result<String, String> {
        let mut missing = None;
        let key = self
            .key
            .render(|name| {
                let value = lookup(record, name);
                if value.is_none() {
                    missing = Some(name.to_owned());
                }
                value
            })
            .map_err(|_| {
                format!(
                    "the key template {:?} needs field {:?}, which this record lacks or holds NULL",
                    self.key.as_str(),
                    missing.unwrap_or_default()
                )
            })?;
        Ok(key)
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<MultiplexedConnection, SendError> {
        let mut slot = self.connection.lock().await;
        if let Some(conn) = slot.as_ref() {
            return Ok(conn.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        if let redis::ConnectionAddr::Tcp(host, port) | redis::ConnectionAddr::TcpTls { host, port, .. } =
            self.client.get_connection_info().addr()
        {
            crate::egress::check_endpoint(host, *port)
                .await
                .map_err(SendError::from)?;
        }
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| self.batch_error(&e, classify(&e), "connect to"))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Forgets the connection after an error that may have broken it.
    async fn forget_connection(&self, error: &RedisError) {
        if error.is_unrecoverable_error() || error.is_io_error() || error.is_timeout() {
            *self.connection.lock().await = None;
        }
    }

    /// The batch-level error for a Redis error of class `failure`.
    fn batch_error(&self, error: &RedisError, failure: Failure, doing: &str) -> SendError {
        let message = match failure {
            Failure::Auth => {
                return SendError::Fatal(format!(
                    "credentials rejected by Redis at {}: check the URL in {} and the user's ACL permissions",
                    self.location, self.credentials_hint
                ));
            }
            Failure::Transient => {
                return self.scrubber.error(SendError::Retryable {
                    reason: format!(
                        "failed to {doing} Redis at {}: {}",
                        self.location,
                        server_message(error)
                    ),
                    retry_after: None,
                    throttled: false,
                });
            }
            Failure::Cluster => format!(
                "failed to {doing} Redis at {}: the server is a cluster node redirecting keys ({}); the redis destination supports standalone servers only",
                self.location,
                server_message(error)
            ),
            Failure::Record | Failure::Fatal => {
                format!(
                    "failed to {doing} Redis at {}: {}",
                    self.location,
                    server_message(error)
                )
            }
        };
        SendError::Fatal(self.scrubber.scrub(&message))
    }

    /// Queues one record's write: the script's arguments.
    fn queue_write(&self, pipe: &mut ::redis::Pipeline, operation: Operation, key: &str, fields: &Document) {
        let mut set: Vec<(&str, String)> = Vec::with_capacity(fields.len());
        let mut remove: Vec<&str> = Vec::new();
        for (name, value) in fields {
            match hash_value(value) {
                Some(text) => set.push((name, text)),
                None => remove.push(name),
            }
        }
        let cmd = pipe
            .cmd("EVAL")
            .arg(WRITE_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(operation.as_str())
            .arg(self.ttl_millis)
            .arg(set.len());
        for (name, text) in &set {
            cmd.arg(*name).arg(text.as_str());
        }
        for name in remove {
            cmd.arg(name);
        }
    }
}

#[async_trait]
impl Connector for RedisConnector {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            max_batch_size: MAX_BATCH_SIZE,
            operations: vec![
                Operation::Upsert,
                Operation::Update,
                Operation::Insert,
                Operation::Delete,
            ],
            default_requests_per_second: DEFAULT_REQUESTS_PER_SECOND,
            default_concurrency: DEFAULT_CONCURRENCY,
        }
    }

    async fn check(&self) -> Result<(), SendError> {
        let mut conn = self.connection().await?;
        let pong: Result<String, RedisError> = ::redis::cmd("PING").query_async(&mut conn).await;
        match pong {
            Ok(_) => Ok(()),
            Err(e) => {
                self.forget_connection(&e).await;
                Err(self.batch_error(&e, classify(&e), "ping"))
            }
        }
    }

    async fn send(&self, operation: Operation, batch: &[Record]) -> Result<Vec<RecordOutcome>, SendError> {
        let mut outcomes = vec![RecordOutcome::Accepted; batch.len()];
        // Which record each queued command answers for.
        let mut sent: Vec<usize> = Vec::with_capacity(batch.len());
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        for (i, record) in batch.iter().enumerate() {
            let key = match self.key_of(record) {
                Ok(key) => key,
                Err(reason) => {
                    outcomes[i] = RecordOutcome::Rejected(reason);
                    continue;
                }
            };
            match operation {
                Operation::Delete => {
                    pipe.cmd("DEL").arg(&key);
                }
                Operation::Upsert | Operation::Update | Operation::Insert => {
                    self.queue_write(&mut pipe, operation, &key, &record.fields);
                }
            }
            sent.push(i);
        }
        if sent.is_empty() {
            return Ok(outcomes);
        }

        let mut conn = self.connection().await?;
        let replies: Vec<Result<::redis::Value, RedisError>> = match pipe.query_async(&mut conn).await {
            Ok(replies) => replies,
            Err(e) => {
                self.forget_connection(&e).await;
                return Err(self.batch_error(&e, classify(&e), "write to"));
            }
        };
        if replies.len() != sent.len() {
            return Err(SendError::Retryable {
                reason: format!(
                    "failed to write to Redis at {}: {} replies for {} commands",
                    self.location,
                    replies.len(),
                    sent.len()
                ),
                retry_after: None,
                throttled: false,
            });
        }
        for (i, reply) in sent.into_iter().zip(replies) {
            outcomes[i] = match reply {
                Ok(::redis::Value::Int(0)) if operation == Operation::Update => {
                    RecordOutcome::Rejected(NO_HASH_REASON.to_owned())
                }
                Ok(::redis::Value::Int(-1)) if operation == Operation::Insert => {
                    RecordOutcome::Rejected(EXISTS_REASON.to_owned())
                }
                Ok(_) => RecordOutcome::Accepted,
                Err(e) => match classify(&e) {
                    Failure::Record => RecordOutcome::Rejected(self.scrubber.scrub(&server_message(&e))),
                    failure => {
                        self.forget_connection(&e).await;
                        return Err(self.batch_error(&e, failure, "write to"));
                    }
                },
            };
        }
        Ok(outcomes)
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use bigdecimal::BigDecimal;
    use chrono::NaiveDate;

    use super::*;

    fn doc(pairs: &[(&str, Value)]) -> Document {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    #[test]
    fn hash_values_are_exact_text_and_null_has_none() {
        assert_eq!(
            hash_value(&Value::Text("a \"b\"".into())).as_deref(),
            Some("a \"b\"")
        );
        assert_eq!(
            hash_value(&Value::Decimal(
                BigDecimal::from_str("12345678901234567890.10").unwrap()
            ))
            .as_deref(),
            Some("12345678901234567890.1")
        );
        assert_eq!(hash_value(&Value::Int(-7)).as_deref(), Some("-7"));
        assert_eq!(hash_value(&Value::Bool(true)).as_deref(), Some("true"));
        assert_eq!(
            hash_value(&Value::Date(NaiveDate::from_ymd_opt(2024, 2, 29).unwrap())).as_deref(),
            Some("2024-02-29")
        );
        assert_eq!(
            hash_value(&Value::Object(doc(&[
                ("z", Value::Int(1)),
                ("a", Value::Text("x".into()))
            ])))
            .as_deref(),
            Some(r#"{"a":"x","z":1}"#)
        );
        assert_eq!(hash_value(&Value::Null), None);
        assert_eq!(hash_value(&Value::Json(serde_json::Value::Null)), None);
    }

    #[test]
    fn key_variables_come_from_identity_fields_and_dotted_paths() {
        let record = Record {
            key: "1".into(),
            identity: doc(&[("id", Value::Int(1))]).into(),
            fields: doc(&[(
                "properties",
                Value::Object(doc(&[("plan", Value::Text("pro".into()))])),
            )])
            .into(),
        };
        assert_eq!(lookup(&record, "id").as_deref(), Some("1"));
        assert_eq!(lookup(&record, "properties.plan").as_deref(), Some("pro"));
        assert_eq!(lookup(&record, "properties.missing"), None);
        assert_eq!(lookup(&record, "nope"), None);
    }
}
