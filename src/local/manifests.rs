//! Manifests for local runs: Secrets, Destinations and ReverseSyncs from YAML files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use crate::api::{API_VERSION, Destination, ReverseSync};
use crate::model::secret::SecretData;

/// Everything read from the manifests, keyed by (namespace, name).
#[derive(Debug, Default)]
pub struct Manifests {
    /// Secrets, decoded.
    pub secrets: BTreeMap<(String, String), SecretData>,
    /// Destinations.
    pub destinations: BTreeMap<(String, String), Destination>,
    /// ReverseSyncs.
    pub syncs: BTreeMap<(String, String), ReverseSync>,
}

/// A manifest that cannot be used. Messages name the file and the document.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// A file or directory could not be read.
    #[error("failed to read {path}: {reason}")]
    Read {
        /// The path.
        path: String,
        /// The operating system's reason.
        reason: String,
    },
    /// A document is not valid YAML or does not match its kind's schema.
    #[error("failed to load {location}: {}{reason}", field.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Invalid {
        /// File and document number.
        location: String,
        /// Path of the field at fault, like `spec.mode`, when known.
        field: Option<String>,
        /// What is wrong.
        reason: String,
    },
    /// A kind Backflow does not read.
    #[error(
        "failed to load {location}: unsupported apiVersion/kind {api_version}/{kind} (expected v1/Secret, {API_VERSION}/Destination or {API_VERSION}/ReverseSync)"
    )]
    UnsupportedKind {
        /// File and document number.
        location: String,
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
    /// Two documents define the same object.
    #[error("failed to load {location}: {kind} {namespace}/{name} is defined twice")]
    Duplicate {
        /// File and document number.
        location: String,
        /// Kind.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// No ReverseSync was found.
    #[error("no ReverseSync found in {0}")]
    NoSyncs(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypeMeta {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SecretManifest {
    metadata: Metadata,
    #[serde(default)]
    data: BTreeMap<String, String>,
    #[serde(default)]
    string_data: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// The namespace of objects whose manifest names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Loads every `.yaml`/`.yml` file under the paths (directories recursively, in name order).
pub fn load(paths: &[PathBuf]) -> Result<Manifests, ManifestError> {
    let mut files = Vec::new();
    for p in paths {
        collect_files(p, &mut files)?;
    }
    let mut manifests = Manifests::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| ManifestError::Read {
            path: file.display().to_string(),
            reason: e.to_string(),
        })?;
        load_text(&text, &file.display().to_string(), &mut manifests)?;
    }
    if manifests.syncs.is_empty() {
        let names = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ManifestError::NoSyncs(names));
    }
    Ok(manifests)
}

/// Adds `path` to `out` if it is a file, or every `.yaml`/`.yml` file under it (recursively, in
/// name order) if it is a directory.
pub fn collect_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    let read_err = |e: std::io::Error| ManifestError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(read_err)?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(read_err)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            let is_yaml = e.extension().is_some_and(|x| x == "yaml" || x == "yml");
            if e.is_dir() || is_yaml {
                collect_files(&e, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Loads the documents of one YAML text into `manifests`.
pub fn load_text(text: &str, origin: &str, manifests: &mut Manifests) -> Result<(), ManifestError> {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let location = format!("{origin} (document {})", i + 1);
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| ManifestError::Invalid {
            location: location.clone(),
            field: None,
            reason: e.to_string(),
        })?;
        load_document(value, &location, manifests)?;
    }
    Ok(())
}

/// Loads one document into `manifests`: a Secret, a Destination or a ReverseSync, checked
/// against its type, its name and the objects already loaded. `location` names the document
/// in errors. An empty document is skipped; any other kind is refused.
pub fn load_document(
    value: serde_yaml_ng::Value,
    location: &str,
    manifests: &mut Manifests,
) -> Result<(), ManifestError> {
    let location = location.to_owned();
    if value.is_null() {
        return Ok(());
    }
    let meta: TypeMeta = serde_yaml_ng::from_value(value.clone()).map_err(|e| ManifestError::Invalid {
        location: location.clone(),
        field: None,
        reason: e.to_string(),
    })?;
    match (meta.api_version.as_str(), meta.kind.as_str()) {
        ("v1", "Secret") => {
            let s: SecretManifest = typed(value, &location)?;
            let ns = s
                .metadata
                .namespace
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
            let mut values = BTreeMap::new();
            for (k, v) in s.data {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(v.trim())
                    .map_err(|_| ManifestError::Invalid {
                        location: location.clone(),
                        field: Some(format!("data.{k}")),
                        reason: "is not valid base64".to_owned(),
                    })?;
                let text = String::from_utf8(bytes).map_err(|_| ManifestError::Invalid {
                    location: location.clone(),
                    field: Some(format!("data.{k}")),
                    reason: "is not UTF-8 text".to_owned(),
                })?;
                values.insert(k, text);
            }
            values.extend(s.string_data);
            let data = SecretData::new(values).with_name(&s.metadata.name);
            insert(
                &mut manifests.secrets,
                &location,
                "Secret",
                ns,
                s.metadata.name,
                data,
            )?;
        }
        (API_VERSION, "Destination") => {
            let d: Destination = typed(value, &location)?;
            let key = object_key(&d.metadata, &location)?;
            insert(
                &mut manifests.destinations,
                &location,
                "Destination",
                key.0,
                key.1,
                d,
            )?;
        }
        (API_VERSION, "ReverseSync") => {
            let s: ReverseSync = typed(value, &location)?;
            let key = object_key(&s.metadata, &location)?;
            insert(&mut manifests.syncs, &location, "ReverseSync", key.0, key.1, s)?;
        }
        (api_version, kind) => {
            return Err(ManifestError::UnsupportedKind {
                location,
                api_version: api_version.to_owned(),
                kind: kind.to_owned(),
            });
        }
    }
    Ok(())
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml_ng::Value,
    location: &str,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let reason = e.into_inner().to_string();
        ManifestError::Invalid {
            location: location.to_owned(),
            field: (path != ".").then_some(path),
            reason,
        }
    })
}

fn object_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    location: &str,
) -> Result<(String, String), ManifestError> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ManifestError::Invalid {
            location: location.to_owned(),
            field: Some("metadata.name".to_owned()),
            reason: "is required".to_owned(),
        })?;
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned());
    // Names become file names under --state-dir: only what Kubernetes accepts, so that no
    // name (`../../x`) reaches outside it.
    if !is_dns_subdomain(&name) {
        return Err(ManifestError::Invalid {
            location: location.to_owned(),
            field: Some("metadata.name".to_owned()),
            reason: format!(
                "{name:?} is not a valid name: lower-case letters, digits, '-' and '.', \
                 starting and ending with a letter or digit, at most 253 characters"
            ),
        });
    }
    if !is_dns_label(&namespace) {
        return Err(ManifestError::Invalid {
            location: location.to_owned(),
            field: Some("metadata.namespace".to_owned()),
            reason: format!(
                "{namespace:?} is not a valid namespace: lower-case letters, digits \
                 and '-', starting and ending with a letter or digit, at most 63 characters"
            ),
        });
    }
    Ok((namespace, name))
}

/// An RFC 1123 label, as Kubernetes requires of namespaces.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain, as Kubernetes requires of most object names.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn insert<T>(
    map: &mut BTreeMap<(String, String), T>,
    location: &str,
    kind: &str,
    namespace: String,
    name: String,
    value: T,
) -> Result<(), ManifestError> {
    let key = (namespace, name);
    if map.contains_key(&key) {
        return Err(ManifestError::Duplicate {
            location: location.to_owned(),
            kind: kind.to_owned(),
            namespace: key.0,
            name: key.1,
        });
    }
    map.insert(key, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_reach_outside_the_state_directory_are_refused() {
        for meta in [
            "{name: ../../x}",
            "{name: x, namespace: ../..}",
            "{name: a/b}",
            "{name: ..}",
            "{name: Upper}",
        ] {
            let doc = format!(
                "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {meta}\nspec:\n  source: {{connectionSecretRef: {{name: a}}, query: q, primaryKey: [id]}}\n  destinationRef: {{name: d}}\n  mappings: [{{from: id, to: id}}]\n"
            );
            let err = load_text(&doc, "f.yaml", &mut Manifests::default()).unwrap_err();
            assert!(err.to_string().contains("is not a valid"), "{meta}: {err}");
        }
    }

    #[test]
    fn secrets_decode_data_and_string_data() {
        let mut m = Manifests::default();
        load_text(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: ns}\ndata: {a: aGVsbG8=}\nstringData: {b: world}\n",
            "x.yaml",
            &mut m,
        )
        .unwrap();
        let s = &m.secrets[&("ns".to_owned(), "s".to_owned())];
        assert_eq!((s.get("a"), s.get("b")), (Some("hello"), Some("world")));
        assert_eq!(format!("{s:?}"), "{\"a\", \"b\"}", "Debug must not show values");
    }

    #[test]
    fn a_wrong_kind_or_api_version_is_named() {
        let mut m = Manifests::default();
        let err = load_text(
            "apiVersion: backflow.dev/v1\nkind: ReverseSync\nmetadata: {name: x}\n",
            "f.yaml",
            &mut m,
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("unsupported apiVersion/kind backflow.dev/v1/ReverseSync"),
            "{err}"
        );
    }

    #[test]
    fn schema_errors_name_the_field_path() {
        let mut m = Manifests::default();
        let doc = "apiVersion: backflow.dev/v1alpha1\nkind: ReverseSync\nmetadata: {name: x}\nspec:\n  source: {connectionSecretRef: {name: a}, query: q, primaryKey: [id]}\n  destinationRef: {name: d}\n  mode: sometimes\n  mappings: [{from: id, to: id}]\n";
        let err = load_text(doc, "f.yaml", &mut m).unwrap_err().to_string();
        assert!(err.contains("spec.mode") && err.contains("sometimes"), "{err}");
    }

    #[test]
    fn malformed_yaml_names_the_file_and_document() {
        let mut m = Manifests::default();
        let err = load_text(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n---\nkind: [\n",
            "bad.yaml",
            &mut m,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("bad.yaml (document 2)"), "{err}");
    }
}
