//! Reading a sync's Destination and Secrets from the API server, in the sync's namespace only,
//! and only the Secrets that grant their use to the object naming them.
//!
//! Secret grants: whoever may edit a Destination or ReverseSync must not thereby read every
//! Secret of the namespace (a `checkUrl` of `https://elsewhere/?d={{secret.password}}` would
//! send it away). A Secret opts in with the annotation [`ALLOWED_REFERENCES`], a
//! comma-separated list of `Kind/name` (`Destination/webhook, ReverseSync/*`); `*` stands for
//! any name, `*/*` for any object. The operator flag `--secret-access=namespace` turns the
//! check off for clusters that accept namespace-level trust.

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::api::Destination;
use crate::destination::Connector;
use crate::engine::setup::{CustomConnectors, Resolver, SecretUser, SetupError};
use crate::model::secret::SecretData;

/// The annotation by which a Secret names the objects that may use it.
pub const ALLOWED_REFERENCES: &str = "backflow.dev/allowed-references";

/// Which Secrets of its namespace a Destination or ReverseSync may use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SecretAccess {
    /// Only Secrets whose [`ALLOWED_REFERENCES`] annotation names the object (the default).
    #[default]
    Granted,
    /// Any Secret of the object's namespace: whoever may edit Backflow objects there may read
    /// every Secret there.
    Namespace,
}

impl SecretAccess {
    /// The flag value (`granted`, `namespace`).
    pub fn as_str(self) -> &'static str {
        match self {
            SecretAccess::Granted => "granted",
            SecretAccess::Namespace => "namespace",
        }
    }
}

/// True when the annotation value `grants` lets `user` use the Secret. Entries are
/// `Kind/name` separated by commas or whitespace; the kind matches case-insensitively, the
/// name exactly; either may be `*`. Unparseable entries grant nothing.
pub fn grants(annotation: &str, user: &SecretUser) -> bool {
    annotation
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|e| !e.is_empty())
        .filter_map(|entry| entry.split_once('/'))
        .any(|(kind, name)| {
            (kind == "*" || kind.eq_ignore_ascii_case(user.kind)) && (name == "*" || name == user.name)
        })
}

/// A [`Resolver`] over the API server. Every read is namespaced: it cannot reach another
/// namespace whatever a spec says.
#[derive(Clone)]
pub struct ApiResolver {
    client: Client,
    access: SecretAccess,
    custom: CustomConnectors,
    allow_sqlite: bool,
}

impl ApiResolver {
    /// A resolver using `client`, reading the Secrets `access` allows.
    pub fn new(client: Client, access: SecretAccess) -> ApiResolver {
        ApiResolver {
            client,
            access,
            custom: CustomConnectors::default(),
            allow_sqlite: false,
        }
    }

    /// The same resolver, allowing `sqlite://` sources and destinations when `allow` (a
    /// development cluster, the operator's own tests).
    pub fn allowing_sqlite(mut self, allow: bool) -> ApiResolver {
        self.allow_sqlite = allow;
        self
    }

    /// The same resolver, handing out `custom` connectors where they are set.
    pub fn with_custom_connectors(mut self, custom: CustomConnectors) -> ApiResolver {
        self.custom = custom;
        self
    }
}

fn unavailable(what: String, e: kube::Error) -> SetupError {
    SetupError::Unavailable {
        what,
        reason: e.to_string(),
    }
}

#[async_trait]
impl Resolver for ApiResolver {
    async fn destination(&self, namespace: &str, name: &str) -> Result<Destination, SetupError> {
        Api::<Destination>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| unavailable(format!("Destination {namespace}/{name}"), e))?
            .ok_or_else(|| SetupError::DestinationNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
    }

    async fn secret(&self, namespace: &str, name: &str, user: &SecretUser) -> Result<SecretData, SetupError> {
        let secret = Api::<Secret>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(|e| unavailable(format!("Secret {namespace}/{name}"), e))?
            .ok_or_else(|| SetupError::SecretNotFound {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                env_prefix: None,
                keys: Vec::new(),
            })?;
        if self.access == SecretAccess::Granted {
            let annotation = secret
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ALLOWED_REFERENCES))
                .map_or("", String::as_str);
            if !grants(annotation, user) {
                return Err(SetupError::SecretNotGranted {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    user: user.to_string(),
                    annotation: ALLOWED_REFERENCES.to_owned(),
                });
            }
        }
        decode(name, secret)
    }

    fn custom_connector(&self, destination: &Destination) -> Option<std::sync::Arc<dyn Connector>> {
        self.custom.get(destination)
    }

    fn allows_sqlite(&self) -> bool {
        self.allow_sqlite
    }
}

/// The text values of a Secret (`data`, base64-decoded by the client, then `stringData`).
fn decode(name: &str, secret: Secret) -> Result<SecretData, SetupError> {
    let mut values = std::collections::BTreeMap::new();
    for (key, bytes) in secret.data.unwrap_or_default() {
        let text = String::from_utf8(bytes.0).map_err(|_| SetupError::SecretKeyMissing {
            name: name.to_owned(),
            key: format!("{key} (as UTF-8 text)"),
        })?;
        values.insert(key, text);
    }
    values.extend(secret.string_data.unwrap_or_default());
    Ok(SecretData::new(values).with_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn a_grant_names_kinds_and_names_with_wildcards_and_nothing_else() {
        let webhook = SecretUser::destination("webhook");
        let sync = SecretUser::reverse_sync("customers");
        assert!(grants("Destination/webhook", &webhook));
        assert!(grants(" destination/webhook ,ReverseSync/other", &webhook));
        assert!(grants("ReverseSync/*", &sync));
        assert!(grants("*/*", &sync));
        assert!(!grants("ReverseSync/*", &webhook));
        assert!(!grants("Destination/webhook2", &webhook));
        assert!(!grants("Destination/web*", &webhook), "no partial wildcards");
        assert!(!grants("", &webhook));
        assert!(!grants("*", &webhook), "an entry needs a kind and a name");
    }

    #[test]
    fn data_and_string_data_are_read_and_binary_values_are_refused_without_showing_them() {
        let secret = Secret {
            data: Some([("url".to_owned(), ByteString(b"postgres://x".to_vec()))].into()),
            string_data: Some([("token".to_owned(), "t".to_owned())].into()),
            ..Secret::default()
        };
        let data = decode("s", secret).unwrap();
        assert_eq!(
            (data.get("url"), data.get("token"), data.name()),
            (Some("postgres://x"), Some("t"), "s")
        );
        let binary = Secret {
            data: Some([("key".to_owned(), ByteString(vec![0xff, 0xfe]))].into()),
            ..Secret::default()
        };
        let err = decode("s", binary).unwrap_err().to_string();
        assert!(err.contains("key (as UTF-8 text)"), "{err}");
    }
}
