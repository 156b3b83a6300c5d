//! Turning a `ReverseSync` into a ready-to-run [`SyncRun`]: validate, find its Destination and
//! Secrets (same namespace only), build the connector behind the shared delivery layers.
//!
//! Where objects come from is the caller's business ([`Resolver`]): manifests for local runs,
//! the API server for the operator and Job-mode runs.

use async_trait::async_trait;

use crate::api::validation::{validate_destination, validate_reverse_sync};
use crate::api::{Destination, ReverseSync, ReverseSyncSpec, SecretKeyRef};
use crate::destination::delivery::rate_limit::Limiters;
use crate::destination::delivery::{Delivery, DeliveryConfig};
use crate::destination::{SecretData, SendError};
use crate::source::Credentials;

/// Finds the objects a sync refers to, in one namespace.
#[async_trait]
pub trait Resolver: Send + Sync {
    /// The Destination `name` of `namespace`.
    async fn destination(&self, namespace: &str, name: &str) -> Result<Destination, SetupError>;
    /// The decoded Secret `name` of `namespace`.
    async fn secret(&self, namespace: &str, name: &str) -> Result<SecretData, SetupError>;
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
    #[error("failed to find Secret {name:?} in namespace {namespace:?}{hint}")]
    SecretNotFound {
        /// Namespace searched.
        namespace: String,
        /// Name.
        name: String,
        /// How to provide it (local runs), empty in a cluster.
        hint: String,
    },
    /// A Secret lacks a key.
    #[error("failed to read key {key:?} of Secret {name:?}: no such key")]
    SecretKeyMissing {
        /// Secret name.
        name: String,
        /// Missing key.
        key: String,
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
    /// Reading objects failed for a reason that may pass (API server unavailable).
    #[error("failed to read {what}: {reason}")]
    Unavailable {
        /// What was being read.
        what: String,
        /// Why.
        reason: String,
    },
}

impl SetupError {
    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            SetupError::InvalidSync(_) => "InvalidSpec",
            SetupError::CrossNamespace { .. } => "CrossNamespaceReference",
            SetupError::DestinationNotFound { .. } => "DestinationNotFound",
            SetupError::InvalidDestination { .. } => "InvalidDestination",
            SetupError::SecretNotFound { .. } => "SecretNotFound",
            SetupError::SecretKeyMissing { .. } => "SecretInvalid",
            SetupError::DestinationNotReady { .. } => "DestinationNotReady",
            SetupError::Unavailable { .. } => "ApiUnavailable",
        }
    }

    /// True when retrying unchanged cannot help: a person must create or fix something.
    /// A missing object is permanent until it is created, which a watch notices.
    pub fn is_permanent(&self) -> bool {
        match self {
            SetupError::DestinationNotReady { permanent, .. } => *permanent,
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
    let secret = match &destination.spec.credentials_secret_ref {
        Some(r) => {
            check_namespace(
                "spec.credentialsSecretRef.namespace",
                r.namespace.as_deref(),
                namespace,
            )?;
            Some(resolver.secret(namespace, &r.name).await?)
        }
        None => None,
    };
    let connector = crate::destination::build(&destination.spec, secret.as_ref())
        .await
        .map_err(|e| SetupError::InvalidDestination {
            name: name.clone(),
            reason: e.to_string(),
        })?;
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
    let (source_url, source_credentials) = connection(resolver, namespace, source_ref).await?;
    let state_url = match spec.state.as_ref().and_then(|s| s.connection_secret_ref.as_ref()) {
        Some(state_ref) => {
            check_namespace(
                "spec.state.connectionSecretRef.namespace",
                state_ref.namespace.as_deref(),
                namespace,
            )?;
            Some(connection_url(resolver, namespace, state_ref).await?)
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
) -> Result<String, SetupError> {
    connection(resolver, namespace, reference)
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
) -> Result<(String, Credentials), SetupError> {
    let secret = resolver.secret(namespace, &reference.name).await?;
    let key = reference.key.as_deref().unwrap_or("url");
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
    connection_url(resolver, namespace, reference).await
}

/// What a sync's fingerprints are about: the destination's name and target.
fn scope(namespace: &str, destination: &Destination) -> String {
    let name = destination.metadata.name.as_deref().unwrap_or_default();
    format!("{namespace}/{name}/{}", destination.spec.target())
}
