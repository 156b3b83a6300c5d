//! Reading a sync's Destination and Secrets from the API server, in the sync's namespace only.

use async_trait::async_trait;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::api::Destination;
use crate::destination::SecretData;
use crate::engine::setup::{Resolver, SetupError};

/// A [`Resolver`] over the API server. Every read is namespaced: it cannot reach another
/// namespace whatever a spec says.
#[derive(Clone)]
pub struct ApiResolver {
    client: Client,
}

impl ApiResolver {
    /// A resolver using `client`.
    pub fn new(client: Client) -> ApiResolver {
        ApiResolver { client }
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

    async fn secret(&self, namespace: &str, name: &str) -> Result<SecretData, SetupError> {
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
        decode(name, secret)
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
