//! The decoded data of a Kubernetes Secret, shared by whoever reads credentials.

use std::collections::BTreeMap;

/// The keys and values of a Secret, decoded, and its name. Its `Debug` never shows values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretData {
    name: String,
    values: BTreeMap<String, String>,
}

impl SecretData {
    /// Wraps decoded Secret data.
    pub fn new(values: BTreeMap<String, String>) -> Self {
        SecretData {
            name: String::new(),
            values,
        }
    }

    /// The same data, with the Secret's name (used in messages about missing keys).
    pub fn with_name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// The Secret's name, empty when unknown.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// Every key and value (for templates).
    pub fn entries(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    /// Every value, to scrub them out of error messages.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.values.values().map(String::as_str)
    }
}

impl std::fmt::Debug for SecretData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.values.keys()).finish()
    }
}
