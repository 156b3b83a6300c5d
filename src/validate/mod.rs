//! `backflow validate`: manifests checked offline, as the API server and the operator would
//! check them, for a pull request in a GitOps repository. No cluster, database or network.
//!
//! For every YAML document under the given paths:
//! 1. Backflow objects (`backflow.dev/*`) are walked against the `openAPIV3Schema` of the CRD
//!    this binary generates, with its `x-kubernetes-validations` CEL rules ([`schema`],
//!    [`rules`]); an unknown Backflow kind or version is an error.
//! 2. Secrets and Backflow objects go through the loader of `backflow run`
//!    ([`crate::local::manifests`]: names, Secret data, duplicates) and the field checks the
//!    operator runs before a sync starts ([`crate::api::validation`]: mappings, transforms,
//!    templates, match fields, cron, durations).
//! 3. References inside the set are followed ([`references`]): a sync's Destination must be
//!    there; a named Secret should be, and must grant the object using it.
//!
//! Other documents (ConfigMaps, Deployments, Kustomizations, files with no `kind`) are skipped.
//! Each finding names the file, the document, the object, the field path and, where the YAML
//! parser knows it, the line and column.

pub mod output;
mod references;
mod rules;
mod schema;
mod yaml;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value as Json;

use crate::api::validation::{InvalidSpec, validate_destination, validate_reverse_sync};
use crate::api::{Destination, GROUP, ReverseSync};
use crate::controller::resolve::SecretAccess;
use crate::local::manifests::{self, ManifestError, Manifests};

/// Files larger than this are refused rather than read (manifests are kilobytes).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// How bad a finding is: errors fail the check, warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The API server or the operator would refuse the object.
    Error,
    /// Worth a look; the object may still work.
    Warning,
}

/// Which check raised a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// A path that cannot be read.
    File,
    /// YAML that does not parse.
    Yaml,
    /// A Backflow kind or version this binary does not know.
    Kind,
    /// The CRD's OpenAPI schema.
    Schema,
    /// A CEL rule of the CRD (`x-kubernetes-validations`).
    Rule,
    /// The operator's field checks and the manifest loader.
    Field,
    /// A reference to an object of the set.
    Reference,
    /// A Secret's `backflow.dev/allowed-references` grant.
    SecretGrant,
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// Which check found it.
    pub check: Check,
    /// The file.
    pub file: String,
    /// The document in the file, from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<usize>,
    /// The object's kind, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The object's name, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The field path, like `spec.mappings[1].to`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Line of the field (or of its nearest written ancestor), from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// Column, from 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
    /// The CEL rule that failed, for [`Check::Rule`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// What `backflow validate` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A Secret named but absent from the set is an error, not a warning.
    pub require_secrets: bool,
    /// How the operator checks Secret grants: an ungranted Secret is an error under
    /// [`SecretAccess::Granted`] and not checked under [`SecretAccess::Namespace`].
    pub secret_access: SecretAccess,
}

/// Everything found.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// Files read.
    pub files: usize,
    /// Non-empty documents read.
    pub documents: usize,
    /// Backflow objects checked.
    pub objects: usize,
    /// Findings, by file, document and line.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Number of findings of `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == severity).count()
    }

    /// True when no finding is an error.
    pub fn is_valid(&self) -> bool {
        self.count(Severity::Error) == 0
    }
}

/// Where a finding is: a document of a file, the object it holds, and its field positions.
pub(crate) struct Place<'a> {
    file: &'a str,
    document: usize,
    kind: Option<String>,
    name: Option<String>,
    /// `metadata.namespace`, or the namespace `backflow run` gives objects that name none.
    namespace: String,
    positions: &'a yaml::Positions,
}

impl Place<'_> {
    /// A finding at `path` of this document.
    fn finding(&self, severity: Severity, check: Check, path: &str, message: String) -> Finding {
        let position = self.positions.find(path);
        Finding {
            severity,
            check,
            file: self.file.to_owned(),
            document: Some(self.document),
            kind: self.kind.clone(),
            name: self.name.clone(),
            path: (!path.is_empty()).then(|| path.to_owned()),
            line: position.map(|p| p.line),
            column: position.map(|p| p.column),
            message,
            rule: None,
        }
    }
}

/// The schemas of the Backflow CRDs, by kind and version.
struct Schemas(HashMap<String, Vec<(String, Json)>>);

impl Schemas {
    fn generated() -> Schemas {
        let mut by_kind: HashMap<String, Vec<(String, Json)>> = HashMap::new();
        for crd in crate::api::crds::definitions() {
            let kind = crd.spec.names.kind.clone();
            for version in crd.spec.versions {
                let schema = version
                    .schema
                    .and_then(|s| s.open_api_v3_schema)
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or_else(|| serde_json::json!({"x-kubernetes-preserve-unknown-fields": true}));
                by_kind
                    .entry(kind.clone())
                    .or_default()
                    .push((version.name, schema::with_object_fields(schema)));
            }
        }
        Schemas(by_kind)
    }
}

/// Checks every document under `paths` (files, or directories searched for `.yaml`/`.yml`).
pub fn validate(paths: &[PathBuf], options: &Options) -> Report {
    let mut report = Report::default();
    let mut files = Vec::new();
    for path in paths {
        if path.as_os_str() == STDIN {
            files.push(path.clone());
        } else if let Err(e) = manifests::collect_files(path, &mut files) {
            report
                .findings
                .push(file_finding(&path.display().to_string(), e.to_string()));
        }
    }
    let schemas = Schemas::generated();
    let mut rules = rules::Rules::new();
    let mut manifests = Manifests::default();
    let mut index = references::Index::default();
    for file in &files {
        let name = if file.as_os_str() == STDIN {
            "<stdin>".to_owned()
        } else {
            file.display().to_string()
        };
        let text = match read(file) {
            Ok(t) => t,
            Err(message) => {
                report.findings.push(file_finding(&name, message));
                continue;
            }
        };
        report.files += 1;
        let (documents, syntax) = yaml::documents(&text);
        for (i, doc) in documents.into_iter().enumerate() {
            if doc.value.is_null() {
                continue;
            }
            report.documents += 1;
            let mut checker = Document {
                schemas: &schemas,
                rules: &mut rules,
                manifests: &mut manifests,
                index: &mut index,
                report: &mut report,
            };
            checker.check(&name, i + 1, doc);
        }
        if let Some(e) = syntax {
            report.findings.push(Finding {
                severity: Severity::Error,
                check: Check::Yaml,
                file: name.clone(),
                document: Some(e.document + 1),
                kind: None,
                name: None,
                path: None,
                line: e.position.map(|p| p.line),
                column: e.position.map(|p| p.column),
                message: format!("failed to parse YAML: {}", e.message),
                rule: None,
            });
        }
    }
    report.findings.extend(index.check(options));
    report.findings.sort_by(|a, b| {
        (&a.file, a.document, a.line, a.column).cmp(&(&b.file, b.document, b.line, b.column))
    });
    report
}

/// The path that stands for standard input (`kustomize build | backflow validate -f -`).
pub const STDIN: &str = "-";

fn read(file: &std::path::Path) -> Result<String, String> {
    if file.as_os_str() == STDIN {
        use std::io::Read as _;
        let mut text = String::new();
        std::io::stdin()
            .lock()
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("failed to read standard input: {e}"))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(format!(
                "failed to read standard input: more than the {MAX_FILE_BYTES} bytes a manifest may have"
            ));
        }
        return Ok(text);
    }
    let size = std::fs::metadata(file)
        .map_err(|e| format!("failed to read the file: {e}"))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(format!(
            "failed to read the file: {size} bytes, more than the {MAX_FILE_BYTES} a manifest may have"
        ));
    }
    std::fs::read_to_string(file).map_err(|e| format!("failed to read the file: {e}"))
}

fn file_finding(file: &str, message: String) -> Finding {
    Finding {
        severity: Severity::Error,
        check: Check::File,
        file: file.to_owned(),
        document: None,
        kind: None,
        name: None,
        path: None,
        line: None,
        column: None,
        message,
        rule: None,
    }
}

/// The paths the schema already reported, so that a field check does not say it again.
#[derive(Default)]
struct Reported {
    paths: BTreeSet<String>,
    rules: BTreeSet<String>,
}

impl Reported {
    fn add(&mut self, path: &str, by_rule: bool) {
        self.paths.insert(path.to_owned());
        if by_rule {
            self.rules.insert(path.to_owned());
        }
    }

    /// True for the same field, and for a field directly under one whose CEL rule failed (a
    /// rule of `spec` about `spec.http` explains the field check of `spec.http`).
    fn explains(&self, field: &str) -> bool {
        let parent = field.rfind(['.', '[']).map_or("", |at| &field[..at]);
        self.paths.contains(field) || self.rules.contains(parent)
    }
}

/// The checks of one document.
struct Document<'a> {
    schemas: &'a Schemas,
    rules: &'a mut rules::Rules,
    manifests: &'a mut Manifests,
    index: &'a mut references::Index,
    report: &'a mut Report,
}

impl Document<'_> {
    fn check(&mut self, file: &str, number: usize, doc: yaml::Document) {
        let mut place = Place {
            file,
            document: number,
            kind: None,
            name: None,
            namespace: manifests::DEFAULT_NAMESPACE.to_owned(),
            positions: &doc.positions,
        };
        let json = match serde_json::to_value(&doc.value) {
            Ok(j) => j,
            Err(e) => {
                let message = format!("failed to read the document as a Kubernetes object: {e}");
                self.report
                    .findings
                    .push(place.finding(Severity::Error, Check::Yaml, "", message));
                return;
            }
        };
        let text = |field: &str| json.get(field).and_then(Json::as_str).map(str::to_owned);
        let (api_version, kind) = (text("apiVersion").unwrap_or_default(), text("kind"));
        place.kind = kind.clone();
        place.name = json
            .pointer("/metadata/name")
            .and_then(Json::as_str)
            .map(str::to_owned);
        if let Some(ns) = json.pointer("/metadata/namespace").and_then(Json::as_str) {
            place.namespace = ns.to_owned();
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version.as_str()));
        let is_backflow = group == GROUP;
        match (group, version, kind.as_deref()) {
            ("", "v1", Some("Secret")) => {
                self.index.add_secret(&place, &json);
                self.load(&place, &json, false);
            }
            _ if is_backflow => self.backflow(&place, version, json),
            // Not Backflow's: another controller checks it.
            _ => {}
        }
    }

    fn backflow(&mut self, place: &Place, version: &str, json: Json) {
        let Some(kind) = place.kind.as_deref() else {
            let message = "a backflow.dev object needs a kind".to_owned();
            self.report
                .findings
                .push(place.finding(Severity::Error, Check::Kind, "kind", message));
            return;
        };
        let Some(versions) = self.schemas.0.get(kind) else {
            let mut known: Vec<&str> = self.schemas.0.keys().map(String::as_str).collect();
            known.sort_unstable();
            let message = format!("unknown Backflow kind {kind:?} (known: {})", known.join(", "));
            self.report
                .findings
                .push(place.finding(Severity::Error, Check::Kind, "kind", message));
            return;
        };
        let Some((_, schema)) = versions.iter().find(|(v, _)| v == version) else {
            let served: Vec<String> = versions.iter().map(|(v, _)| format!("{GROUP}/{v}")).collect();
            let message = format!(
                "{kind} is not served as {GROUP}/{version} by this version of Backflow (served: {})",
                served.join(", ")
            );
            self.report
                .findings
                .push(place.finding(Severity::Error, Check::Kind, "apiVersion", message));
            return;
        };
        self.report.objects += 1;
        let (stored, issues) = schema::check(schema, json, self.rules);
        let mut reported = Reported::default();
        for issue in issues {
            let check = if issue.rule.is_some() {
                Check::Rule
            } else {
                Check::Schema
            };
            let mut finding = place.finding(Severity::Error, check, &issue.path, issue.message);
            reported.add(&issue.path, issue.rule.is_some());
            finding.rule = issue.rule;
            self.report.findings.push(finding);
        }
        match kind {
            "Destination" => self.index.add_destination(place, &stored),
            "ReverseSync" => self.index.add_sync(place, &stored),
            _ => {}
        }
        if self.load(place, &stored, !reported.paths.is_empty()) {
            let spec_errors = self.field_checks(place, kind);
            for e in spec_errors.into_iter().filter(|e| !reported.explains(&e.field)) {
                let finding = place.finding(Severity::Error, Check::Field, &e.field, e.message);
                self.report.findings.push(finding);
            }
        }
    }

    /// Loads the object as `backflow run` does; true when it loaded. A type error already
    /// explained by the schema (`quiet`) is not reported twice.
    fn load(&mut self, place: &Place, json: &Json, quiet: bool) -> bool {
        let location = format!("{} (document {})", place.file, place.document);
        let value = match serde_yaml_ng::to_value(json) {
            Ok(v) => v,
            Err(e) => {
                let message = format!("failed to read the object: {e}");
                self.report
                    .findings
                    .push(place.finding(Severity::Error, Check::Field, "", message));
                return false;
            }
        };
        let error = match manifests::load_document(value, &location, self.manifests) {
            Ok(()) => return true,
            Err(e) => e,
        };
        let (path, message) = match error {
            // A type error the schema already explained; the loader's own checks of the
            // metadata (names, namespaces) are still reported.
            ManifestError::Invalid { field, .. }
                if quiet && !field.as_deref().is_some_and(|f| f.starts_with("metadata.")) =>
            {
                return false;
            }
            ManifestError::Invalid { field, reason, .. } => (field.unwrap_or_default(), reason),
            ManifestError::Duplicate {
                kind,
                namespace,
                name,
                ..
            } => (
                "metadata.name".to_owned(),
                format!("{kind} {namespace}/{name} is defined twice in the set"),
            ),
            other => (String::new(), other.to_string()),
        };
        self.report
            .findings
            .push(place.finding(Severity::Error, Check::Field, &path, message));
        false
    }

    /// The operator's field checks of the object just loaded.
    fn field_checks(&self, place: &Place, kind: &str) -> Vec<crate::api::validation::FieldError> {
        let key = (place.namespace.clone(), place.name.clone().unwrap_or_default());
        let result: Result<(), InvalidSpec> = match kind {
            "Destination" => self
                .manifests
                .destinations
                .get(&key)
                .map_or(Ok(()), |d: &Destination| validate_destination(&d.spec)),
            "ReverseSync" => self
                .manifests
                .syncs
                .get(&key)
                .map_or(Ok(()), |s: &ReverseSync| validate_reverse_sync(&s.spec)),
            _ => Ok(()),
        };
        result.err().map(|e| e.0).unwrap_or_default()
    }
}
