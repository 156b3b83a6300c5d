//! The CustomResourceDefinitions generated from the Rust types (`backflow crds`, `crds/`).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use super::{Destination, ReverseSync};

/// Every CRD of the API, generated from the types.
pub fn definitions() -> [CustomResourceDefinition; 2] {
    [Destination::crd(), ReverseSync::crd()]
}

/// The CRDs as one multi-document YAML stream, in the form committed under `crds/`.
pub fn render() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in definitions() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

/// The file name under `crds/` and the YAML of each CRD, one file per resource.
pub fn files() -> Result<Vec<(String, String)>, serde_yaml_ng::Error> {
    let mut files = Vec::new();
    for crd in definitions() {
        let name = format!("{}.yaml", crd.metadata.name.clone().unwrap_or_default());
        files.push((name, serde_yaml_ng::to_string(&crd)?));
    }
    Ok(files)
}
