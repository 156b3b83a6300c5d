//! Turning a `ReverseSync` into a ready-to-run [`SyncRun`](crate::engine::run::SyncRun): validate, find its Destination and
//! Secrets (same namespace only), build the connector behind the shared delivery layers.
//!
//! Where objects come from is the caller's business ([`Resolver`]): manifests for local runs,
//! the API server for the operator and Job-mode runs.

use std::sync::Arc;

use async_trait::async_trait;

use crate::api::reverse_sync::SyncMode;
use crate::api::validation::{effective_match_fields, validate_destination, validate_reverse_sync};
use crate::api::{Destination, DestinationType, ReverseSync, ReverseSyncSpec, SecretKeyRef};
use crate::destination::delivery::rate_limit::Limiters;
use crate::destination::delivery::{Delivery, DeliveryConfig};
use crate::destination::{Connector, SendError};
use crate::model::record::Operation;
use crate::model::secret::SecretData;
use crate::source::Credentials;

/// Finds the objects a sync refers to, in one namespace.
#[async_trait]
pub trait Resolver: Send + Sync {
    /// The Destination `name` of `namespace`.
    async fn destination(&self, namespace: &str, name: &str) -> Result<Destination, SetupError>;
    /// The decoded Secret `name` of `namespace`, read on behalf of `user` (the object whose
    /// spec names it): a cluster resolver refuses a Secret that does not grant `user` its use.
    async fn secret(&self, namespace: &str, name: &str, user: &SecretUser) -> Result<SecretData, SetupError>;
    /// A connector to use for `destination` instead of the one its type builds; `None` (the
    /// default) builds it from its spec.
    fn custom_connector(&self, _destination: &Destination) -> Option<Arc<dyn Connector>> {
        None
    }
    /// False where `sqlite://` files would live in a shared process (the operator's pod): a
    /// SQLite source, state connection or destination is then refused.
    fn allows_sqlite(&self) -> bool {
        true
    }
}

/// Refuses a `sqlite://` URL of `field` where the resolver does not allow SQLite.
fn check_sqlite(resolver: &dyn Resolver, field: &str, url: &str) -> Result<(), SetupError> {
    if !resolver.allows_sqlite() && url.trim_start().to_ascii_lowercase().starts_with("sqlite:") {
        return Err(SetupError::InvalidSync(format!(
            "{field}: sqlite:// databases are files inside the operator's pod and are refused in a \
             cluster; use them with `backflow run -f`"
        )));
    }
    Ok(())
}

/// The function behind [`CustomConnectors`].
type ConnectorFor = dyn Fn(&Destination) -> Option<Arc<dyn Connector>> + Send + Sync;

/// Connectors an embedder of the operator supplies for some Destinations instead of the ones
/// their type builds: the integration tests inject faulty connectors through it (one that
/// panics, say). Empty by default; `backflow operator` never sets it.
#[derive(Clone, Default)]
pub struct CustomConnectors(Option<Arc<ConnectorFor>>);

impl CustomConnectors {
    /// Connectors chosen by `pick`: `Some` replaces the Destination's own connector.
    pub fn new(pick: impl Fn(&Destination) -> Option<Arc<dyn Connector>> + Send + Sync + 'static) -> Self {
        CustomConnectors(Some(Arc::new(pick)))
    }

    /// The connector supplied for `destination`, if any.
    pub fn get(&self, destination: &Destination) -> Option<Arc<dyn Connector>> {
        self.0.as_ref().and_then(|pick| pick(destination))
    }
}

impl std::fmt::Debug for CustomConnectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "CustomConnectors(set)"
        } else {
            "CustomConnectors(none)"
        })
    }
}

/// The object on whose behalf a Secret is read: the Destination of `credentialsSecretRef`, the
/// ReverseSync of `source.connectionSecretRef` and `state.connectionSecretRef`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretUser {
    /// `Destination` or `ReverseSync`.
    pub kind: &'static str,
    /// Its name (same namespace as the Secret).
    pub name: String,
}

impl SecretUser {
    /// The Destination `name`.
    pub fn destination(name: &str) -> SecretUser {
        SecretUser {
            kind: "Destination",
            name: name.to_owned(),
        }
    }

    /// The ReverseSync `name`.
    pub fn reverse_sync(name: &str) -> SecretUser {
        SecretUser {
            kind: "ReverseSync",
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for SecretUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// Why a sync cannot start. Messages name objects and keys, never values.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetupError {
    /// The ReverseSync's spec is invalid.
    #[error("invalid ReverseSync: {0}")]
    InvalidSync(String),
    /// A reference names another namespace.
    #[error(
        "{field} refers to namespace {namespace:?}: only objects in the sync's own namespace {own:?} are read"
    )]
    CrossNamespace {
        /// The referring field.
        field: String,
        /// The namespace it names.
        namespace: String,
        /// The sync's namespace.
        own: String,
    },
    /// The Destination does not exist.
    #[error("failed to find Destination {name:?} in namespace {namespace:?}")]
    DestinationNotFound {
        /// Namespace searched.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The Destination's spec is invalid.
    #[error("invalid Destination {name:?}: {reason}")]
    InvalidDestination {
        /// Name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A Secret does not exist.
    #[error("failed to find Secret {name:?} in namespace {namespace:?}{}", secret_hint(env_prefix.as_deref(), keys))]
    SecretNotFound {
        /// Namespace searched.
        namespace: String,
        /// Name.
        name: String,
        /// Local runs: the prefix of the environment variables that can stand in for the
        /// Secret (`BACKFLOW_SECRET_WAREHOUSE_`); `None` in a cluster.
        env_prefix: Option<String>,
        /// The keys the sync reads from it, when known (`url` for a connection Secret).
        keys: Vec<String>,
    },
    /// A Secret lacks a key.
    #[error("failed to read key {key:?} of Secret {name:?}: no such key")]
    SecretKeyMissing {
        /// Secret name.
        name: String,
        /// Missing key.
        key: String,
    },
    /// The Secret exists but does not grant its use to the object that names it.
    #[error(
        "failed to use Secret {name:?} of namespace {namespace:?} for {user}: the Secret does not grant it; \
         add the annotation {annotation}: \"{user}\" to the Secret (a comma-separated list of Kind/name, name may be *)"
    )]
    SecretNotGranted {
        /// Namespace of the Secret.
        namespace: String,
        /// Name of the Secret.
        name: String,
        /// Who asked (`Destination/webhook`).
        user: String,
        /// The annotation that grants use.
        annotation: String,
    },
    /// The Destination's connection check failed.
    #[error("Destination {name:?} is not ready: {reason}")]
    DestinationNotReady {
        /// Name.
        name: String,
        /// The check's answer.
        reason: String,
        /// True when retrying cannot help (credentials rejected, bad configuration).
        permanent: bool,
    },
    /// The Destination cannot find records by the sync's match fields (a table without a
    /// unique index on them).
    #[error("Destination {name:?} cannot upsert by the match fields ({fields}): {reason}")]
    MatchNotUnique {
        /// Name of the Destination.
        name: String,
        /// The sync's match fields, comma-separated.
        fields: String,
        /// What the destination lacks and what to create.
        reason: String,
        /// True when retrying unchanged cannot help (the index is missing, not unreadable).
        permanent: bool,
    },
    /// Reading objects failed for a reason that may pass (API server unavailable).
    #[error("failed to read {what}: {reason}")]
    Unavailable {
        /// What was being read.
        what: String,
        /// Why.
        reason: String,
    },
}

/// The environment variable standing in for key `key` of a Secret in local runs, after the
/// Secret's prefix (`BACKFLOW_SECRET_WAREHOUSE_`): the key upper case, every other
/// character than a letter or a digit turned into `_`.
pub fn secret_env_var(prefix: &str, key: &str) -> String {
    let key: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("{prefix}{key}")
}

/// How to provide a missing Secret in a local run: a manifest or one variable per key.
fn secret_hint(env_prefix: Option<&str>, keys: &[String]) -> String {
    let Some(prefix) = env_prefix else {
        return String::new();
    };
    if keys.is_empty() {
        return format!(": add a Secret manifest or set {prefix}<KEY> for each of its keys");
    }
    let vars: Vec<String> = keys.iter().map(|k| secret_env_var(prefix, k)).collect();
    format!(": add a Secret manifest or set {}", vars.join(" and "))
}

impl SetupError {
    /// Says which keys of a missing Secret the caller reads, so the hint names the variables
    /// that work; other errors pass unchanged.
    pub fn reading_keys(self, wanted: &[&str]) -> SetupError {
        match self {
            SetupError::SecretNotFound {
                namespace,
                name,
                env_prefix,
                keys: _,
            } => SetupError::SecretNotFound {
                namespace,
                name,
                env_prefix,
                keys: wanted.iter().map(|k| (*k).to_owned()).collect(),
            },
            other => other,
        }
    }

    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            SetupError::InvalidSync(_) => "InvalidSpec",
            SetupError::CrossNamespace { .. } => "CrossNamespaceReference",
            SetupError::DestinationNotFound { .. } => "DestinationNotFound",
            SetupError::InvalidDestination { .. } => "InvalidDestination",
            SetupError::SecretNotFound { .. } => "SecretNotFound",
            SetupError::SecretKeyMissing { .. } => "SecretInvalid",
            SetupError::SecretNotGranted { .. } => "SecretNotGranted",
            SetupError::DestinationNotReady { .. } => "DestinationNotReady",
            SetupError::MatchNotUnique { .. } => "MatchIndexMissing",
            SetupError::Unavailable { .. } => "ApiUnavailable",
        }
    }

    /// True when retrying unchanged cannot help: a person must create or fix something.
    /// A missing object is permanent until it is created, which a watch notices.
    pub fn is_permanent(&self) -> bool {
        match self {
            SetupError::DestinationNotReady { permanent, .. }
            | SetupError::MatchNotUnique { permanent, .. } => *permanent,
            SetupError::Unavailable { .. } => false,
            _ => true,
        }
    }
}

/// Refuses a reference that names a namespace other than `own`.
pub fn check_namespace(field: &str, referenced: Option<&str>, own: &str) -> Result<(), SetupError> {
    match referenced {
        Some(ns) if !ns.is_empty() && ns != own => Err(SetupError::CrossNamespace {
            field: field.to_owned(),
            namespace: ns.to_owned(),
            own: own.to_owned(),
        }),
        _ => Ok(()),
    }
}

/// A Destination resolved with its credentials and connector settings.
pub struct ReadyDestination {
    /// The Destination object.
    pub destination: Destination,
    /// The connector behind the shared delivery layers.
    pub delivery: Delivery,
}

/// Validates a Destination, reads its credentials Secret and builds its connector; with
/// `check`, runs the connection check too.
pub async fn destination(
    resolver: &dyn Resolver,
    namespace: &str,
    destination: Destination,
    limiters: &Limiters,
    check: bool,
) -> Result<ReadyDestination, SetupError> {
    let name = destination.metadata.name.clone().unwrap_or_default();
    validate_destination(&destination.spec).map_err(|e| SetupError::InvalidDestination {
        name: name.clone(),
        reason: e.to_string(),
    })?;
    if !resolver.allows_sqlite() && destination.spec.destination_type == DestinationType::Sqlite {
        return Err(SetupError::InvalidDestination {
            name,
            reason: "type sqlite writes a file inside the operator's pod and is refused in a cluster; \
                     use it with `backflow run -f`"
                .to_owned(),
        });
    }
    let secret = match &destination.spec.credentials_secret_ref {
        Some(r) => {
            check_namespace(
                "spec.credentialsSecretRef.namespace",
                r.namespace.as_deref(),
                namespace,
            )?;
            let user = SecretUser::destination(&name);
            Some(resolver.secret(namespace, &r.name, &user).await?)
        }
        None => None,
    };
    let connector = match resolver.custom_connector(&destination) {
        Some(custom) => custom,
        None => crate::destination::build(&destination.spec, secret.as_ref())
            .await
            .map_err(|e| SetupError::InvalidDestination {
                name: name.clone(),
                reason: e.to_string(),
            })?,
    };
    let caps = connector.capabilities();
    let config = DeliveryConfig::resolve(&destination.spec, &caps).map_err(|reason| {
        SetupError::InvalidDestination {
            name: name.clone(),
            reason,
        }
    })?;
    if check {
        connector
            .check()
            .await
            .map_err(|e| SetupError::DestinationNotReady {
                name: name.clone(),
                permanent: matches!(e, SendError::Fatal(_)),
                reason: e.to_string(),
            })?;
    }
    let limiter = limiters.get(
        &format!("{namespace}/{name}"),
        config.requests_per_second,
        config.burst,
    );
    Ok(ReadyDestination {
        destination,
        delivery: Delivery::new(connector, limiter, config),
    })
}

/// A sync with everything it needs to run, except the state store.
pub struct Prepared {
    /// The source connection URL (from its Secret; never logged).
    pub source_url: String,
    /// The source Secret's other keys (never logged).
    pub source_credentials: Credentials,
    /// The destination, ready to deliver.
    pub destination: ReadyDestination,
    /// What the fingerprints are about.
    pub scope: String,
    /// The Warehouse store's connection URL when `spec.state.connectionSecretRef` names one
    /// (never logged); otherwise the store uses the source URL.
    pub state_url: Option<String>,
}

/// Validates a sync and resolves its Destination and Secrets. `check` runs the Destination's
/// connection check (skipped for dry runs).
pub async fn prepare(
    resolver: &dyn Resolver,
    namespace: &str,
    sync: &ReverseSync,
    limiters: &Limiters,
    check: bool,
) -> Result<Prepared, SetupError> {
    let spec = &sync.spec;
    validate_reverse_sync(spec).map_err(|e| SetupError::InvalidSync(e.to_string()))?;
    check_namespace(
        "spec.destinationRef.namespace",
        spec.destination_ref.namespace.as_deref(),
        namespace,
    )?;
    let source_ref = &spec.source.connection_secret_ref;
    check_namespace(
        "spec.source.connectionSecretRef.namespace",
        source_ref.namespace.as_deref(),
        namespace,
    )?;
    let found = resolver
        .destination(namespace, &spec.destination_ref.name)
        .await?;
    let destination = destination(resolver, namespace, found, limiters, check).await?;
    if spec.mode == SyncMode::Mirror && !destination.delivery.supports(Operation::Delete) {
        let ready = &destination.destination;
        return Err(SetupError::InvalidSync(format!(
            "spec.mode: mirror deletes records, and Destination {:?} (type {}) cannot delete; use mode upsert",
            ready.metadata.name.as_deref().unwrap_or_default(),
            ready.spec.destination_type.as_str()
        )));
    }
    if check && matches!(spec.mode, SyncMode::Upsert | SyncMode::Mirror) {
        // Validation above accepted the match fields, so they resolve.
        let fields = effective_match_fields(&spec.mappings, &spec.source.primary_key, &spec.match_fields)
            .map_err(SetupError::InvalidSync)?;
        destination
            .delivery
            .check_match(&fields)
            .await
            .map_err(|e| SetupError::MatchNotUnique {
                name: spec.destination_ref.name.clone(),
                fields: fields.join(", "),
                permanent: matches!(e, SendError::Fatal(_)),
                reason: e.to_string(),
            })?;
    }
    let user = SecretUser::reverse_sync(sync.metadata.name.as_deref().unwrap_or_default());
    let (source_url, source_credentials) = connection(resolver, namespace, source_ref, &user).await?;
    check_sqlite(resolver, "spec.source.connectionSecretRef", &source_url)?;
    let state_url = match spec.state.as_ref().and_then(|s| s.connection_secret_ref.as_ref()) {
        Some(state_ref) => {
            check_namespace(
                "spec.state.connectionSecretRef.namespace",
                state_ref.namespace.as_deref(),
                namespace,
            )?;
            let url = connection_url(resolver, namespace, state_ref, &user).await?;
            check_sqlite(resolver, "spec.state.connectionSecretRef", &url)?;
            Some(url)
        }
        None => None,
    };
    let scope = scope(namespace, &destination.destination);
    Ok(Prepared {
        source_url,
        source_credentials,
        destination,
        scope,
        state_url,
    })
}

/// The connection URL a Secret key holds (key default `url`); the caller checked the namespace.
async fn connection_url(
    resolver: &dyn Resolver,
    namespace: &str,
    reference: &SecretKeyRef,
    user: &SecretUser,
) -> Result<String, SetupError> {
    connection(resolver, namespace, reference, user)
        .await
        .map(|(url, _)| url)
}

/// The connection URL a Secret key holds (key default `url`), and the Secret's other keys
/// (private keys, client secrets) for the sources that need them; the caller checked the
/// namespace.
async fn connection(
    resolver: &dyn Resolver,
    namespace: &str,
    reference: &SecretKeyRef,
    user: &SecretUser,
) -> Result<(String, Credentials), SetupError> {
    let key = reference.key.as_deref().unwrap_or("url");
    let secret = resolver
        .secret(namespace, &reference.name, user)
        .await
        .map_err(|e| e.reading_keys(&[key]))?;
    let url = secret
        .get(key)
        .map(str::to_owned)
        .ok_or_else(|| SetupError::SecretKeyMissing {
            name: reference.name.clone(),
            key: key.to_owned(),
        })?;
    let mut others = secret.entries().clone();
    others.remove(key);
    Ok((url, Credentials::new(others)))
}

/// The Warehouse store's connection URL: the one of `spec.state.connectionSecretRef` when set,
/// the source's otherwise. Reads only those Secrets, nothing else a run needs, so that it works
/// while the sync is being deleted (its Destination may be gone already).
pub async fn warehouse_state_url(
    resolver: &dyn Resolver,
    namespace: &str,
    name: &str,
    spec: &ReverseSyncSpec,
) -> Result<String, SetupError> {
    let (field, reference) = match spec.state.as_ref().and_then(|s| s.connection_secret_ref.as_ref()) {
        Some(r) => ("spec.state.connectionSecretRef.namespace", r),
        None => (
            "spec.source.connectionSecretRef.namespace",
            &spec.source.connection_secret_ref,
        ),
    };
    check_namespace(field, reference.namespace.as_deref(), namespace)?;
    connection_url(resolver, namespace, reference, &SecretUser::reverse_sync(name)).await
}

/// What a sync's fingerprints are about: the destination's name and target.
fn scope(namespace: &str, destination: &Destination) -> String {
    let name = destination.metadata.name.as_deref().unwrap_or_default();
    format!("{namespace}/{name}/{}", destination.spec.target())
}
