//! `backflow validate`: every kind of finding named with its file, document, field and line,
//! every CEL rule of the generated CRDs exercised, and the binary's exit codes and JSON.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use backflow::controller::resolve::SecretAccess;
use backflow::validate::{Check, Finding, Options, Report, Severity, validate};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> PathBuf {
    root().join("tests/fixtures/validate").join(name)
}

fn check(name: &str, options: &Options) -> Report {
    validate(&[fixture(name)], options)
}

/// The one finding at `path` of check `check`, with the whole report on failure.
fn at<'a>(report: &'a Report, check: Check, path: &str) -> &'a Finding {
    let found: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.check == check && f.path.as_deref() == Some(path))
        .collect();
    assert_eq!(found.len(), 1, "{check:?} at {path} in {:#?}", report.findings);
    found[0]
}

/// (document, kind/name, line, column) of a finding.
fn place(f: &Finding) -> (Option<usize>, String, Option<usize>, Option<usize>) {
    let object = format!(
        "{}/{}",
        f.kind.as_deref().unwrap_or("?"),
        f.name.as_deref().unwrap_or("?")
    );
    (f.document, object, f.line, f.column)
}

#[test]
fn every_example_sample_and_valid_fixture_passes_without_a_finding() {
    for dir in ["examples/quickstart", "config/samples"] {
        let report = validate(&[root().join(dir)], &Options::default());
        assert!(report.findings.is_empty(), "{dir}: {:#?}", report.findings);
        assert!(report.objects >= 2, "{dir}: {report:?}");
    }
    let report = check("valid", &Options::default());
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(
        (report.files, report.documents, report.objects),
        (3, 7, 2),
        "the ConfigMap, the Deployment and the Kustomization are read and skipped"
    );
}

/// The Markdown files of the documentation.
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            markdown_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

#[test]
fn every_backflow_object_in_a_yaml_block_of_the_docs_passes_all_but_reference_checks() {
    let mut pages = vec![root().join("README.md")];
    markdown_files(&root().join("docs"), &mut pages);
    let dir = tempfile::tempdir().unwrap();
    let mut blocks = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let mut rest = text.as_str();
        while let Some(start) = rest.find("```yaml\n") {
            let body = &rest[start + "```yaml\n".len()..];
            let end = body.find("```").unwrap_or(body.len());
            rest = &body[end..];
            if !body[..end].contains("apiVersion: backflow.dev/") {
                continue;
            }
            blocks += 1;
            // One file per block: blocks are fragments, and several reuse a name.
            let name = page.strip_prefix(root()).unwrap().display().to_string();
            let file = dir.path().join(format!("{blocks}.yaml"));
            std::fs::write(&file, &body[..end]).unwrap();
            let report = validate(&[file], &Options::default());
            let wrong: Vec<String> = report
                .findings
                .iter()
                .filter(|f| !matches!(f.check, Check::Reference | Check::SecretGrant))
                .map(backflow::validate::output::line)
                .collect();
            assert!(wrong.is_empty(), "a block of {name}: {wrong:#?}");
            assert!(report.objects > 0, "a block of {name} holds no Backflow object");
        }
    }
    assert!(blocks >= 10, "found {blocks} blocks");
}

#[test]
fn schema_type_errors_missing_required_fields_enums_and_unknown_fields_name_their_line() {
    let report = check("errors/schema.yaml", &Options::default());
    let f = at(&report, Check::Schema, "spec.batchSize");
    assert!(f.file.ends_with("errors/schema.yaml"), "{f:?}");
    assert_eq!(place(f), (Some(1), "Destination/crm".into(), Some(6), Some(3)));
    assert_eq!(f.message, "must be integer, not string \"ten\"");
    let f = at(&report, Check::Schema, "spec.source.query");
    assert_eq!(
        place(f),
        (Some(2), "ReverseSync/no-query".into(), Some(13), Some(3)),
        "a missing field points at the object that lacks it"
    );
    assert_eq!(f.message, "is required");
    let f = at(&report, Check::Schema, "spec.mode");
    assert_eq!((f.line, f.column), (Some(17), Some(3)));
    assert!(
        f.message.contains("\"sometimes\" is not one of \"upsert\""),
        "{f:?}"
    );
    let f = at(&report, Check::Schema, "spec.mappings[0].tpyo");
    assert_eq!((f.line, f.column), (Some(19), Some(26)));
    assert!(f.message.starts_with("unknown field \"tpyo\""), "{f:?}");
    assert!(
        report
            .findings
            .iter()
            .all(|f| f.severity == Severity::Error || f.check == Check::Reference)
    );
}

/// Every `x-kubernetes-validations` rule of the CRDs this binary generates.
fn generated_rules() -> BTreeSet<String> {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                if let Some(rules) = map.get("x-kubernetes-validations").and_then(|r| r.as_array()) {
                    out.extend(rules.iter().filter_map(|r| r["rule"].as_str().map(str::to_owned)));
                }
                map.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = BTreeSet::new();
    for crd in backflow::api::crds::definitions() {
        walk(&serde_json::to_value(&crd).unwrap(), &mut out);
    }
    out
}

#[test]
fn every_cel_rule_of_the_generated_crds_fails_in_a_fixture_with_its_path_and_line() {
    let rules = generated_rules();
    assert!(rules.len() >= 16, "{rules:?}");
    let report = check("rules", &Options::default());
    let failed: BTreeSet<String> = report
        .findings
        .iter()
        .filter(|f| f.check == Check::Rule)
        .inspect(|f| assert!(f.path.is_some() && f.line.is_some(), "{f:?}"))
        .filter_map(|f| f.rule.clone())
        .collect();
    let untested: Vec<&String> = rules.difference(&failed).collect();
    assert!(
        untested.is_empty(),
        "add a document breaking each of these rules to tests/fixtures/validate/rules/: {untested:#?}"
    );
    let f = at(&report, Check::Rule, "spec.schedule");
    assert_eq!(place(f), (Some(2), "ReverseSync/rules".into(), Some(22), Some(3)));
    assert_eq!(f.message, "set interval or cron, not both");
    let f = at(&report, Check::Rule, "spec.mappings[1]");
    assert_eq!((f.line, f.column), (Some(20), Some(7)));
    assert_eq!(
        report
            .findings
            .iter()
            .filter(|f| f.path.as_deref() == Some("spec.mappings[2].templateType"))
            .count(),
        0,
        "the field check saying what the failed rule said is not repeated"
    );
}

#[test]
fn the_field_checks_of_run_report_transforms_templates_targets_and_cron_with_their_line() {
    let report = check("errors/fields.yaml", &Options::default());
    for (path, line, column, message) in [
        (
            "spec.mappings[1].transforms[0]",
            19,
            45,
            "unknown transform \"shout\"",
        ),
        ("spec.mappings[2].template", 20, 8, "failed to compile template"),
        (
            "spec.mappings[3].to",
            21,
            20,
            "is already the target of spec.mappings[0]",
        ),
        ("spec.schedule.cron", 23, 5, "is not a cron expression"),
    ] {
        let f = at(&report, Check::Field, path);
        assert_eq!(
            place(f),
            (Some(2), "ReverseSync/fields".into(), Some(line), Some(column))
        );
        assert!(f.message.contains(message), "{f:?}");
    }
    assert_eq!(report.count(Severity::Error), 4, "{:#?}", report.findings);
}

#[test]
fn a_missing_destination_is_an_error_and_a_missing_secret_a_warning_unless_required() {
    let report = check("errors/references.yaml", &Options::default());
    let f = at(&report, Check::Reference, "spec.destinationRef.name");
    assert_eq!(
        (f.severity, place(f)),
        (
            Severity::Error,
            (Some(2), "ReverseSync/orphan".into(), Some(18), Some(20))
        )
    );
    assert!(
        f.message
            .contains("Destination default/missing is not in the given files")
    );
    let f = at(&report, Check::Reference, "spec.credentialsSecretRef.name");
    assert_eq!((f.severity, f.line), (Severity::Warning, Some(27)));
    let required = Options {
        require_secrets: true,
        ..Options::default()
    };
    let report = check("errors/references.yaml", &required);
    let f = at(&report, Check::Reference, "spec.credentialsSecretRef.name");
    assert_eq!(f.severity, Severity::Error);
    let f = at(&report, Check::Reference, "spec.source.connectionSecretRef.key");
    assert_eq!(
        (f.severity, f.line, f.column),
        (Severity::Error, Some(35), Some(44))
    );
    assert_eq!(
        f.message,
        "Secret default/warehouse has no key \"password\" (keys: url)"
    );
    let f = at(&report, Check::Reference, "spec.destinationRef.namespace");
    assert_eq!(
        place(f),
        (Some(4), "ReverseSync/someone-else".into(), Some(38), Some(31))
    );
    let report = check("warnings", &Options::default());
    assert_eq!(
        (report.count(Severity::Error), report.count(Severity::Warning)),
        (0, 2)
    );
    assert!(report.is_valid());
}

#[test]
fn a_secret_that_does_not_grant_its_user_is_an_error_unless_the_cluster_trusts_the_namespace() {
    let report = check("errors/references.yaml", &Options::default());
    let f = at(
        &report,
        Check::SecretGrant,
        "spec.source.connectionSecretRef.name",
    );
    assert_eq!(
        (f.severity, place(f)),
        (
            Severity::Error,
            (Some(2), "ReverseSync/orphan".into(), Some(15), Some(27))
        )
    );
    assert!(
        f.message
            .contains("add \"ReverseSync/orphan\" to its backflow.dev/allowed-references annotation"),
        "{f:?}"
    );
    assert!(!f.message.contains("postgres://"), "no Secret value in a finding");
    let trusting = Options {
        secret_access: SecretAccess::Namespace,
        ..Options::default()
    };
    let report = check("errors/references.yaml", &trusting);
    assert!(
        report.findings.iter().all(|f| f.check != Check::SecretGrant),
        "{report:?}"
    );
}

#[test]
fn unknown_backflow_kinds_and_versions_are_errors_and_broken_yaml_names_its_line() {
    let report = check("errors/kinds.yaml", &Options::default());
    let f = at(&report, Check::Kind, "kind");
    assert_eq!(place(f), (Some(1), "Pipeline/p".into(), Some(2), Some(1)));
    let f = at(&report, Check::Kind, "apiVersion");
    assert_eq!(place(f), (Some(2), "ReverseSync/s".into(), Some(5), Some(1)));
    assert!(f.message.contains("served: backflow.dev/v1alpha1"), "{f:?}");
    let report = check("errors/syntax.yaml", &Options::default());
    let [f] = report.findings.as_slice() else {
        panic!("{:#?}", report.findings)
    };
    assert_eq!((f.check, f.document, f.line), (Check::Yaml, Some(2), Some(8)));
    assert_eq!(report.documents, 1, "the document before the error is still read");
}

#[test]
fn an_object_defined_twice_across_files_is_named_at_its_second_definition() {
    let dir = tempfile::tempdir().unwrap();
    let destination = "apiVersion: backflow.dev/v1alpha1\nkind: Destination\nmetadata:\n  name: crm\nspec: {type: sqlite, sqlite: {table: t}}\n";
    std::fs::write(dir.path().join("a.yaml"), destination).unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        format!("# the same again\n{destination}"),
    )
    .unwrap();
    let report = validate(&[dir.path().to_path_buf()], &Options::default());
    let f = at(&report, Check::Field, "metadata.name");
    assert!(f.file.ends_with("b.yml"), "{f:?}");
    assert_eq!((f.line, f.column), (Some(5), Some(3)));
    assert_eq!(f.message, "Destination default/crm is defined twice in the set");
}

fn backflow(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .arg("validate")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn the_binary_exits_1_on_errors_only_and_prints_lines_for_people_and_json_for_bots() {
    let (code, out) = backflow(&[
        "-f",
        "tests/fixtures/validate/valid",
        "-f",
        "examples/quickstart/sync.yaml",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.ends_with("valid: 0 errors, 0 warnings in 4 files (11 documents, 4 Backflow objects)\n"),
        "{out}"
    );
    let (code, out) = backflow(&["-f", "tests/fixtures/validate/warnings"]);
    assert_eq!(code, 0, "warnings alone pass: {out}");
    assert!(out.starts_with(
        "tests/fixtures/validate/warnings/secrets-elsewhere.yaml:7:26: warning: Destination/crm (document 1) spec.credentialsSecretRef.name: Secret default/crm-url"
    ), "{out}");
    let (code, _) = backflow(&["-f", "tests/fixtures/validate/warnings", "--require-secrets"]);
    assert_eq!(code, 1);
    let (code, out) = backflow(&[
        "-f",
        "tests/fixtures/validate/errors/schema.yaml",
        "--output",
        "json",
    ]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (
            json["valid"].as_bool(),
            json["files"].as_u64(),
            json["documents"].as_u64()
        ),
        (Some(false), Some(1), Some(2))
    );
    let first = &json["findings"][0];
    assert_eq!(
        first,
        &serde_json::json!({
            "severity": "error",
            "check": "schema",
            "file": "tests/fixtures/validate/errors/schema.yaml",
            "document": 1,
            "kind": "Destination",
            "name": "crm",
            "path": "spec.batchSize",
            "line": 6,
            "column": 3,
            "message": "must be integer, not string \"ten\""
        })
    );
    assert_eq!(
        json["errors"].as_u64(),
        Some(
            json["findings"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["severity"] == "error")
                .count() as u64
        )
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .args(["validate", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rendered = std::fs::read(fixture("errors/schema.yaml")).unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &rendered).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .starts_with("<stdin>:6:3: error: Destination/crm (document 1) spec.batchSize:"),
        "standard input, as from kustomize build, is read with its lines"
    );
    let (code, out) = backflow(&["-f", "tests/fixtures/validate/no-such-dir"]);
    assert_eq!(code, 1);
    assert!(out.contains("no-such-dir: error: failed to read"), "{out}");
}
