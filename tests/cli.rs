//! `backflow run -f` as a user runs it: a real process, real SQLite databases, exit codes,
//! summaries, and bad input that fails clearly without touching state.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::sqlite::TempSqlite;

const WAREHOUSE: &str = "
CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT NOT NULL, plan TEXT);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'free' FROM n;
";

const CRM: &str = "CREATE TABLE contacts (id INTEGER PRIMARY KEY, email TEXT NOT NULL, plan TEXT);";

fn manifests(warehouse_url: &str, crm_url: &str, query: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: warehouse}}
stringData: {{url: "{warehouse_url}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: crm}}
stringData: {{url: "{crm_url}"}}
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: crm}}
spec:
  type: sqlite
  credentialsSecretRef: {{name: crm}}
  sqlite: {{table: contacts}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: customers}}
spec:
  source:
    connectionSecretRef: {{name: warehouse}}
    query: "{query}"
    primaryKey: [id]
  destinationRef: {{name: crm}}
  mode: mirror
  mappings:
    - {{from: id, to: id}}
    - {{from: email, to: email}}
    - {{from: plan, to: plan, transforms: [uppercase]}}
"#
    )
}

struct Setup {
    warehouse: TempSqlite,
    crm: TempSqlite,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        Setup {
            warehouse: TempSqlite::new(WAREHOUSE).await,
            crm: TempSqlite::new(CRM).await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, text: &str) -> std::path::PathBuf {
        let path = self.dir.path().join("sync.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn good(&self) -> std::path::PathBuf {
        self.write(&manifests(
            &self.warehouse.url,
            &self.crm.url,
            "SELECT id, email, plan FROM customers",
        ))
    }

    fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn run(&self, file: &Path, extra: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_backflow"))
            .arg("run")
            .arg("-f")
            .arg(file)
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(extra)
            .env_remove("BACKFLOW_LOG")
            .output()
            .unwrap()
    }

    fn run_json(&self, file: &Path, extra: &[&str]) -> (bool, serde_json::Value, String) {
        let mut args = vec!["--output", "json"];
        args.extend_from_slice(extra);
        let out = self.run(file, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\n{stderr}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.success(), json, stderr)
    }

    fn state_files(&self) -> Vec<String> {
        let dir = self.state_dir().join("default");
        let mut files: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        files.retain(|f| !f.ends_with(".lock"));
        files.sort();
        files
    }
}

#[tokio::test]
async fn a_sync_runs_then_sends_nothing_then_sends_exactly_the_changed_row() {
    let s = Setup::new().await;
    let file = s.good();
    let (ok, first, stderr) = s.run_json(&file, &[]);
    assert!(ok, "{first}\n{stderr}");
    assert_eq!(first[0]["added"], 300);
    assert_eq!(first[0]["accepted"], 300);
    assert_eq!(first[0]["result"], "Succeeded");

    let (ok, second, _) = s.run_json(&file, &[]);
    assert!(ok);
    assert_eq!(
        (second[0]["unchanged"].as_u64(), second[0]["requests"].as_u64()),
        (Some(300), Some(0))
    );

    s.warehouse
        .exec("UPDATE customers SET plan = 'pro' WHERE id = 42; DELETE FROM customers WHERE id = 7")
        .await;
    let (ok, third, _) = s.run_json(&file, &[]);
    assert!(ok);
    assert_eq!(
        (third[0]["changed"].as_u64(), third[0]["deleted"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(third[0]["unchanged"], 298);
}

#[tokio::test]
async fn a_text_summary_names_the_sync_and_its_counts() {
    let s = Setup::new().await;
    let out = s.run(&s.good(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("default/customers: Succeeded: 300 rows, added 300"),
        "{stdout}"
    );
    // Standard error is a pipe here, not a terminal: its log lines carry no colour codes.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("plan ready"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

#[tokio::test]
async fn a_dry_run_prints_samples_and_leaves_no_state() {
    let s = Setup::new().await;
    let out = s.run(&s.good(), &["--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("would upsert 1: {\"email\":\"user1@example.com\",\"id\":1,\"plan\":\"FREE\"}"),
        "{stdout}"
    );
    assert!(s.state_files().is_empty(), "{:?}", s.state_files());
}

async fn assert_fails_cleanly(s: &Setup, file: &Path, expected: &[&str]) {
    let before = s.state_files();
    let out = s.run(file, &[]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "should fail: {all}");
    for e in expected {
        assert!(all.contains(e), "expected {e:?} in:\n{all}");
    }
    assert_eq!(s.state_files(), before, "state untouched");
}

#[tokio::test]
async fn malformed_yaml_fails_with_the_file_and_document() {
    let s = Setup::new().await;
    let file = s.write("apiVersion: v1\nkind: Secret\nmetadata: {name: a}\n---\nspec: [unclosed\n");
    assert_fails_cleanly(&s, &file, &["sync.yaml (document 2)"]).await;
}

#[tokio::test]
async fn a_wrong_api_version_or_kind_is_named() {
    let s = Setup::new().await;
    let text = manifests(&s.warehouse.url, &s.crm.url, "SELECT 1").replace(
        "backflow.dev/v1alpha1\nkind: ReverseSync",
        "backflow.dev/v2\nkind: ReverseSync",
    );
    assert_fails_cleanly(
        &s,
        &s.write(&text),
        &["unsupported apiVersion/kind backflow.dev/v2/ReverseSync"],
    )
    .await;
}

#[tokio::test]
async fn a_missing_secret_is_named_and_nothing_runs() {
    let s = Setup::new().await;
    let text = manifests(
        &s.warehouse.url,
        &s.crm.url,
        "SELECT id, email, plan FROM customers",
    )
    .replace(
        "connectionSecretRef: {name: warehouse}",
        "connectionSecretRef: {name: nowhere}",
    );
    assert_fails_cleanly(
        &s,
        &s.write(&text),
        &[
            "failed to find Secret \"nowhere\"",
            "or set BACKFLOW_SECRET_NOWHERE_URL\n",
        ],
    )
    .await;
}

#[tokio::test]
async fn bad_sql_fails_with_the_database_message_and_state_untouched() {
    let s = Setup::new().await;
    let (ok, _, _) = s.run_json(&s.good(), &[]);
    assert!(ok);
    let text = manifests(&s.warehouse.url, &s.crm.url, "SELEKT id FROM customers");
    assert_fails_cleanly(
        &s,
        &s.write(&text),
        &["failed to run model query", "syntax error"],
    )
    .await;
}

#[tokio::test]
async fn an_unreachable_database_fails_without_showing_its_password() {
    let s = Setup::new().await;
    let text = manifests(
        "postgres://app:hunter2-secret@127.0.0.1:1/warehouse",
        &s.crm.url,
        "SELECT 1 AS id",
    );
    let out = s.run(&s.write(&text), &[]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());
    assert!(all.contains("failed to connect to source"), "{all}");
    assert!(!all.contains("hunter2-secret"), "the password leaked: {all}");
}

#[tokio::test]
async fn an_invalid_spec_names_the_field() {
    let s = Setup::new().await;
    let text = manifests(
        &s.warehouse.url,
        &s.crm.url,
        "SELECT id, email, plan FROM customers",
    )
    .replace(
        "- {from: plan, to: plan, transforms: [uppercase]}",
        "- {from: plan, to: email}",
    );
    assert_fails_cleanly(
        &s,
        &s.write(&text),
        &["spec.mappings[2].to", "already the target of spec.mappings[1]"],
    )
    .await;
}

// The destination double runs on this test's runtime while the process blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credentials_fail_the_run_without_the_token_in_any_output_and_logs_are_json() {
    use support::http_server::{Behaviour, HttpDouble};
    let s = Setup::new().await;
    let double = HttpDouble::start(Behaviour::unauthorized()).await;
    let text = format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: warehouse}}
stringData: {{url: "{}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: hook-token}}
stringData: {{token: "tok-SECRET-4242"}}
---
apiVersion: backflow.dev/v1alpha1
kind: Destination
metadata: {{name: hook}}
spec:
  type: http
  credentialsSecretRef: {{name: hook-token}}
  http:
    url: "{}/ingest?key={{{{secret.token}}}}"
    headers: {{Authorization: "Bearer {{{{secret.token}}}}"}}
---
apiVersion: backflow.dev/v1alpha1
kind: ReverseSync
metadata: {{name: customers}}
spec:
  source: {{connectionSecretRef: {{name: warehouse}}, query: "SELECT id, email FROM customers", primaryKey: [id]}}
  destinationRef: {{name: hook}}
  mappings: [{{from: id, to: id}}, {{from: email, to: email}}]
"#,
        s.warehouse.url, double.url
    );
    let out = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .args(["--log-format", "json", "run", "--output", "json", "-f"])
        .arg(s.write(&text))
        .arg("--state-dir")
        .arg(s.state_dir())
        .env("BACKFLOW_LOG", "debug")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stdout.contains("credentials rejected"), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("tok-SECRET-4242") && !stderr.contains("tok-SECRET-4242"),
        "the token leaked:\n{stdout}\n{stderr}"
    );
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
    assert!(
        s.state_files().is_empty(),
        "nothing was accepted, so nothing was committed"
    );
}

#[tokio::test]
async fn a_template_that_does_not_compile_is_named_with_its_field_before_anything_runs() {
    let s = Setup::new().await;
    let text = manifests(
        &s.warehouse.url,
        &s.crm.url,
        "SELECT id, email, plan FROM customers",
    )
    .replace(
        "- {from: plan, to: plan, transforms: [uppercase]}",
        "- {template: \"{% if plan %}{{ plan | upcase }}{% endif %}\", to: plan}",
    );
    assert_fails_cleanly(
        &s,
        &s.write(&text),
        &["spec.mappings[2].template", "unknown filter", "upcase"],
    )
    .await;
}

#[tokio::test]
async fn a_summary_shows_what_was_accepted_and_lists_a_duplicated_key_once_with_its_rows() {
    let s = Setup::new().await;
    let text = manifests(
        &s.warehouse.url,
        &s.crm.url,
        "SELECT id, email, plan FROM customers UNION ALL SELECT 3, 'x@example.com', 'p' UNION ALL SELECT 3, 'y@example.com', 'q'",
    );
    let out = s.run(&s.write(&text), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("default/customers: PartiallySucceeded: 302 rows, added 299, changed 0, removed 0, unchanged 0, rejected 3; sent: accepted 299, deleted 0, failed 0"),
        "{stdout}"
    );
    let duplicates: Vec<_> = stdout
        .lines()
        .filter(|l| l.contains("duplicate primary key"))
        .collect();
    assert_eq!(duplicates.len(), 1, "{stdout}");
    assert!(
        duplicates[0].contains("rejected 3 (plan)") && duplicates[0].contains("3 times"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_manifest_error_is_one_line_even_with_rust_backtrace_set() {
    let s = Setup::new().await;
    let file = s.write("apiVersion: v1\nkind: Secret\nmetadata: {name: a}\n---\nspec: [unclosed\n");
    let out = Command::new(env!("CARGO_BIN_EXE_backflow"))
        .args(["run", "-f"])
        .arg(&file)
        .arg("--state-dir")
        .arg(s.state_dir())
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env_remove("BACKFLOW_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("Error: ") && stderr.contains("sync.yaml (document 2)"),
        "{stderr}"
    );
    assert!(!stderr.contains("backtrace"), "{stderr}");
}

#[tokio::test]
async fn a_plain_delete_model_says_it_tried_to_write_and_deletes_nothing() {
    let s = Setup::new().await;
    let text = manifests(&s.warehouse.url, &s.crm.url, "DELETE FROM customers");
    assert_fails_cleanly(&s, &s.write(&text), &["it tried to write"]).await;
    assert_eq!(s.warehouse.scalar("SELECT count(*) FROM customers").await, 300);
}

#[tokio::test]
async fn deletes_past_the_limit_exit_non_zero_with_the_counts_until_the_plan_is_approved() {
    let s = Setup::new().await;
    let good = s.good();
    assert!(s.run(&good, &[]).status.success());
    s.warehouse.exec("DELETE FROM customers WHERE id > 100").await;

    let preview = s.run(&good, &["--dry-run"]);
    let text = String::from_utf8_lossy(&preview.stdout).into_owned();
    assert!(
        !preview.status.success(),
        "a preview that would be held back fails CI: {text}"
    );
    assert!(
        text.contains("deletes would be held back: the run would delete 200 of 300 stored records (66%)"),
        "{text}"
    );

    let out = s.run(&good, &[]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("deletes held back: nothing was deleted"), "{text}");
    assert!(text.contains("accepted 0, deleted 0"), "{text}");
    assert_eq!(s.crm.scalar("SELECT count(*) FROM contacts").await, 300);
    let plan_id = text
        .split("--approve-deletes ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no plan id in {text}"))
        .to_owned();
    assert!(plan_id.starts_with("200-"), "{plan_id}");

    let (ok, json, stderr) = s.run_json(&good, &["--approve-deletes", &plan_id]);
    assert!(ok, "{json}\n{stderr}");
    assert_eq!(json[0]["deleted"], 200);
    assert!(json[0].get("deletesHeldBack").is_none(), "{json}");
    assert_eq!(s.crm.scalar("SELECT count(*) FROM contacts").await, 100);
}
