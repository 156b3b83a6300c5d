//! The custom resources: `ReverseSync` and `Destination` (group `backflow.dev`, `v1alpha1`).
//!
//! The doc comments on every field become the `kubectl explain` text of the generated CRDs.

pub mod crds;
pub mod destination;
pub mod duration;
pub mod limits;
pub mod reverse_sync;
pub mod validation;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use destination::{Destination, DestinationSpec, DestinationStatus, DestinationType};
pub use reverse_sync::{ReverseSync, ReverseSyncSpec, ReverseSyncStatus, SyncMode};

/// The API group of every Backflow resource.
pub const GROUP: &str = "backflow.dev";
/// The API version of every Backflow resource.
pub const VERSION: &str = "v1alpha1";
/// `apiVersion` as written in manifests.
pub const API_VERSION: &str = "backflow.dev/v1alpha1";

/// A key in a Secret in the same namespace as the object that refers to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// Name of the Secret. It must be in the same namespace; other namespaces are never read.
    pub name: String,
    /// Key inside the Secret. Defaults depend on the referring field (`url` for connection
    /// strings, `token` for API credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Leave unset. Accepted only when equal to the referring object's namespace; any other
    /// namespace is refused, so a sync can never read another team's Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A reference by name to another object in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalObjectRef {
    /// Name of the object, in the same namespace.
    pub name: String,
    /// Leave unset. Accepted only when equal to the referring object's namespace; any other
    /// namespace is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}
