//! Secrets for local runs: from Secret manifests, or from the environment.

use std::collections::BTreeMap;

use super::manifests::Manifests;
use crate::destination::SecretData;
use crate::engine::setup::SetupError;

/// The environment variable holding key `key` of Secret `name` when no manifest defines it:
/// `BACKFLOW_SECRET_<NAME>_<KEY>`, upper case, every other character than a letter or a
/// digit turned into `_` (Secret `warehouse`, key `url` → `BACKFLOW_SECRET_WAREHOUSE_URL`).
pub fn env_var_name(name: &str, key: &str) -> String {
    let clean = |s: &str| {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_uppercase()
                } else {
                    '_'
                }
            })
            .collect::<String>()
    };
    format!("BACKFLOW_SECRET_{}_{}", clean(name), clean(key))
}

/// The Secret `name` of `namespace`: its manifest, or else every `BACKFLOW_SECRET_<NAME>_*`
/// environment variable. Only the sync's own namespace is ever searched.
pub fn resolve(manifests: &Manifests, namespace: &str, name: &str) -> Result<SecretData, SetupError> {
    if let Some(s) = manifests.secrets.get(&(namespace.to_owned(), name.to_owned())) {
        return Ok(s.clone());
    }
    let prefix = env_var_name(name, "");
    let values: BTreeMap<String, String> = std::env::vars()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|key| (key.to_ascii_lowercase(), v)))
        .collect();
    if values.is_empty() {
        return Err(SetupError::SecretNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            hint: format!(": add a Secret manifest or set {}", env_var_name(name, "KEY")),
        });
    }
    Ok(SecretData::new(values).with_name(name))
}
