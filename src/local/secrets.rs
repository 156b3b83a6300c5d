//! Secrets for local runs: from Secret manifests, or from the environment.

use std::collections::BTreeMap;

use super::manifests::Manifests;
use crate::engine::setup::{SetupError, secret_env_var};
use crate::model::secret::SecretData;

/// The environment variable holding key `key` of Secret `name` when no manifest defines it:
/// `BACKFLOW_SECRET_<NAME>_<KEY>`, upper case, every other character than a letter or a
/// digit turned into `_` (Secret `warehouse`, key `url` → `BACKFLOW_SECRET_WAREHOUSE_URL`).
pub fn env_var_name(name: &str, key: &str) -> String {
    secret_env_var(&env_prefix(name), key)
}

/// `BACKFLOW_SECRET_<NAME>_`: what every variable of Secret `name` starts with.
pub fn env_prefix(name: &str) -> String {
    secret_env_var("BACKFLOW_SECRET_", &format!("{name}_"))
}

/// The Secret `name` of `namespace`: its manifest, or else every `BACKFLOW_SECRET_<NAME>_*`
/// environment variable. Only the sync's own namespace is ever searched.
pub fn resolve(manifests: &Manifests, namespace: &str, name: &str) -> Result<SecretData, SetupError> {
    if let Some(s) = manifests.secrets.get(&(namespace.to_owned(), name.to_owned())) {
        return Ok(s.clone());
    }
    let prefix = env_prefix(name);
    let values: BTreeMap<String, String> = std::env::vars()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|key| (key.to_ascii_lowercase(), v)))
        .collect();
    if values.is_empty() {
        return Err(SetupError::SecretNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            env_prefix: Some(prefix),
            keys: Vec::new(),
        });
    }
    Ok(SecretData::new(values).with_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_connection_secret_names_the_variable_of_its_key() {
        let err = SetupError::SecretNotFound {
            namespace: "default".into(),
            name: "warehouse".into(),
            env_prefix: Some(env_prefix("warehouse")),
            keys: Vec::new(),
        };
        assert!(
            err.to_string()
                .ends_with("set BACKFLOW_SECRET_WAREHOUSE_<KEY> for each of its keys"),
            "{err}"
        );
        let err = err.reading_keys(&["url"]);
        assert!(
            err.to_string().ends_with("or set BACKFLOW_SECRET_WAREHOUSE_URL"),
            "{err}"
        );
        assert_eq!(env_var_name("my-db", "dsn.url"), "BACKFLOW_SECRET_MY_DB_DSN_URL");
    }
}
