//! The engine end to end on a real SQLite warehouse and a scripted destination:
//! first run, incremental runs, modes, bad keys, rejections, fatal errors, dry runs.

mod support;

use std::sync::Arc;

use backflow::api::ReverseSyncSpec;
use backflow::destination::SendError;
use backflow::engine::run::{RunOptions, RunReport, RunResult, SyncRun, run};
use backflow::state::file::FileStore;
use support::fake_connector::{BadRecords, FakeConnector, fast_delivery};
use support::sqlite::TempSqlite;

const SETUP: &str = "
CREATE TABLE customers (id INTEGER PRIMARY KEY, email TEXT, plan TEXT, score REAL);
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250)
INSERT INTO customers SELECT i, 'user' || i || '@example.com', 'free', i * 1.5 FROM n;
";

fn spec(mode: &str, query: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{query}", primaryKey: [id]}}
destinationRef: {{name: fake}}
mode: {mode}
mappings:
  - {{from: id, to: id}}
  - {{from: email, to: properties.email, transforms: [lowercase]}}
  - {{from: plan, to: properties.plan}}
  - {{from: score, to: score}}
"#
    ))
    .unwrap()
}

struct Harness {
    db: TempSqlite,
    state: tempfile::TempDir,
}

impl Harness {
    async fn new() -> Harness {
        Harness {
            db: TempSqlite::new(SETUP).await,
            state: tempfile::tempdir().unwrap(),
        }
    }

    async fn run_with(
        &self,
        spec: &ReverseSyncSpec,
        fake: Arc<FakeConnector>,
        options: RunOptions,
    ) -> RunReport {
        let job = SyncRun {
            namespace: "default",
            name: "customers",
            spec,
            source_url: &self.db.url,
            source_credentials: Default::default(),
            delivery: fast_delivery(fake, 3),
            scope: "default/fake".into(),
        };
        let mut store = FileStore::new(self.state.path(), "default", "customers");
        run(job, &mut store, &options).await
    }

    async fn run(&self, spec: &ReverseSyncSpec, fake: Arc<FakeConnector>) -> RunReport {
        self.run_with(spec, fake, RunOptions::default()).await
    }
}

fn all(mode: &str) -> ReverseSyncSpec {
    spec(mode, "SELECT id, email, plan, score FROM customers")
}

#[tokio::test]
async fn first_run_sends_every_row_and_second_run_without_changes_sends_nothing() {
    let h = Harness::new().await;
    let fake = Arc::new(FakeConnector::new(100));
    let first = h.run(&all("upsert"), fake.clone()).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.result, RunResult::Succeeded);
    assert_eq!(
        (first.plan.rows_in_model, first.plan.added, first.accepted),
        (250, 250, 250)
    );
    assert_eq!(first.requests, 3);
    assert_eq!(
        fake.store.lock().unwrap()["7"],
        r#"{"id":7,"properties":{"email":"user7@example.com","plan":"free"},"score":10.5}"#
    );

    let second_fake = Arc::new(FakeConnector::new(100));
    let second = h.run(&all("upsert"), second_fake.clone()).await;
    assert_eq!(
        (second.plan.unchanged, second.plan.added, second.plan.changed),
        (250, 0, 0)
    );
    assert_eq!(second_fake.call_count(), 0);
    assert_eq!(second.result_fingerprint, first.result_fingerprint);
}

#[tokio::test]
async fn the_connector_hears_what_a_run_will_send_before_the_first_batch_but_not_in_a_dry_run() {
    use backflow::model::record::Operation;
    let h = Harness::new().await;
    let fake = Arc::new(FakeConnector::new(100));
    h.run(&all("mirror"), fake.clone()).await;
    h.db.exec("UPDATE customers SET plan = 'pro' WHERE id = 42").await;
    h.db.exec("DELETE FROM customers WHERE id IN (3, 4)").await;
    h.run(&all("mirror"), fake.clone()).await;
    let dry = RunOptions {
        dry_run: true,
        ..RunOptions::default()
    };
    h.run_with(&all("mirror"), fake.clone(), dry).await;

    let planned = fake.planned.lock().unwrap().clone();
    let seen: Vec<(u64, u64, u64, usize)> = planned
        .iter()
        .map(|(p, calls)| {
            (
                p.count(Operation::Upsert),
                p.count(Operation::Delete),
                p.total(),
                *calls,
            )
        })
        .collect();
    assert_eq!(seen, [(250, 0, 250, 0), (1, 2, 3, 3)]);
}

#[tokio::test]
async fn changing_one_row_sends_exactly_that_row() {
    let h = Harness::new().await;
    h.run(&all("upsert"), Arc::new(FakeConnector::new(100))).await;
    h.db.exec("UPDATE customers SET plan = 'pro' WHERE id = 42").await;
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&all("upsert"), fake.clone()).await;
    assert_eq!((report.plan.changed, report.plan.unchanged), (1, 249));
    assert_eq!(fake.sent_keys(), vec!["42"]);
}

#[tokio::test]
async fn mirror_deletes_rows_that_left_the_model_and_other_modes_do_not() {
    let h = Harness::new().await;
    h.run(&all("mirror"), Arc::new(FakeConnector::new(100))).await;
    h.db.exec("DELETE FROM customers WHERE id IN (3, 4)").await;
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&all("mirror"), fake.clone()).await;
    assert_eq!((report.plan.removed, report.deleted), (2, 2));
    let calls = fake.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, backflow::model::record::Operation::Delete);
    // Deleted records are forgotten: a third run sends nothing.
    let third = Arc::new(FakeConnector::new(100));
    let report = h.run(&all("mirror"), third.clone()).await;
    assert_eq!((report.plan.removed, third.call_count()), (0, 0));

    h.db.exec("DELETE FROM customers WHERE id = 5").await;
    let upsert_fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&all("upsert"), upsert_fake.clone()).await;
    assert_eq!(report.plan.removed, 1);
    assert_eq!(upsert_fake.call_count(), 0, "upsert mode never deletes");
}

#[tokio::test]
async fn a_mirror_run_whose_deletes_outgrow_memory_sends_every_one_in_key_order() {
    // 60,000 rows with 300-character keys; the 27,000 deleted (45%, under the delete guard's
    // default share) hold about 18 MB of keys and identities, past the 8 MiB the removed
    // rows keep in memory: they are listed in sorted runs on disk and merged.
    let h = Harness {
        db: TempSqlite::new(
            "CREATE TABLE wide (id TEXT PRIMARY KEY, email TEXT, plan TEXT, score REAL);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 60000)
             INSERT INTO wide SELECT 'key-' || printf('%0300d', (i * 7919) % 60000), 'u' || i, 'free', i FROM n;",
        )
        .await,
        state: tempfile::tempdir().unwrap(),
    };
    let wide = spec("mirror", "SELECT id, email, plan, score FROM wide");
    let first = h.run(&wide, Arc::new(FakeConnector::new(100))).await;
    assert!(first.error.is_none(), "{:?}", first.error);
    assert_eq!(first.accepted, 60_000);
    h.db.exec("DELETE FROM wide WHERE CAST(substr(id, 5) AS INTEGER) % 20 < 9")
        .await;

    let dry = h
        .run_with(
            &wide,
            Arc::new(FakeConnector::new(100)),
            RunOptions {
                dry_run: true,
                ..RunOptions::default()
            },
        )
        .await;
    let samples: Vec<&str> = dry
        .plan_samples
        .iter()
        .filter(|s| s.operation == "delete")
        .map(|s| s.key.as_str())
        .collect();
    let first_deleted = format!("key-{:0300}", 0);
    assert_eq!(
        samples.first().copied(),
        Some(first_deleted.as_str()),
        "samples start at the lowest key"
    );

    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&wide, fake.clone()).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.plan.removed, report.deleted), (27_000, 27_000));
    let calls = fake.calls.lock().unwrap().clone();
    let mut sent: Vec<String> = Vec::new();
    for (operation, keys) in &calls {
        assert_eq!(*operation, backflow::model::record::Operation::Delete);
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "each batch in key order");
        sent.extend(keys.iter().cloned());
    }
    sent.sort();
    let expected: Vec<String> = (0..60_000)
        .filter(|i| i % 20 < 9)
        .map(|i| format!("key-{i:0300}"))
        .collect();
    assert!(sent == expected, "every deleted key once: {} sent", sent.len());
    // Deleted records are forgotten: the next run sends nothing.
    let next = Arc::new(FakeConnector::new(100));
    let again = h.run(&wide, next.clone()).await;
    assert_eq!((again.plan.removed, next.call_count()), (0, 0));
}

#[tokio::test]
async fn insert_mode_sends_new_rows_only_and_update_mode_changed_rows_only() {
    let h = Harness::new().await;
    let some = spec(
        "insert",
        "SELECT id, email, plan, score FROM customers WHERE id <= 10",
    );
    let fake = Arc::new(FakeConnector::new(100));
    h.run(&some, fake.clone()).await;
    assert_eq!(fake.call_count(), 1);
    assert_eq!(
        fake.calls.lock().unwrap()[0].0,
        backflow::model::record::Operation::Insert
    );

    h.db.exec("UPDATE customers SET plan = 'pro' WHERE id IN (1, 20)")
        .await;
    let update = spec(
        "update",
        "SELECT id, email, plan, score FROM customers WHERE id <= 30",
    );
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&update, fake.clone()).await;
    // Row 1 was synced before and changed; 11..=30 were never synced: update mode skips them.
    assert_eq!(fake.sent_keys(), vec!["1"]);
    assert_eq!(
        fake.calls.lock().unwrap()[0].0,
        backflow::model::record::Operation::Update
    );
    assert_eq!(report.plan.skipped, 20);
}

#[tokio::test]
async fn null_and_duplicate_keys_reject_those_rows_and_the_run_goes_on() {
    let h = Harness::new().await;
    let query = "SELECT id, email, plan, score FROM customers WHERE id <= 5 \
                 UNION ALL SELECT 3, 'dup@example.com', 'x', 1 \
                 UNION ALL SELECT NULL, 'nokey@example.com', 'x', 1";
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&spec("upsert", query), fake.clone()).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.result, RunResult::PartiallySucceeded);
    assert_eq!(report.plan.rejected, 3, "both rows of key 3 and the NULL key");
    let mut sent = fake.sent_keys();
    sent.sort();
    assert_eq!(sent, vec!["1", "2", "4", "5"]);
    let reasons: Vec<_> = report
        .rejected_samples
        .iter()
        .map(|r| r.reason.as_str())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("duplicate primary key")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("\"id\" is NULL")),
        "{reasons:?}"
    );
    assert!(
        report
            .rejected_samples
            .iter()
            .all(|r| !r.reason.contains("dup@example.com")),
        "reasons never carry payload values"
    );
}

#[tokio::test]
async fn a_rejected_row_is_sent_again_next_run_and_accepted_rows_are_not() {
    let h = Harness::new().await;
    let fake = Arc::new(FakeConnector::new(100).with_bad(&["9"], BadRecords::RejectEach));
    let report = h.run(&all("upsert"), fake).await;
    assert_eq!(
        (report.rejected, report.accepted, report.result),
        (1, 249, RunResult::PartiallySucceeded)
    );
    assert_eq!(report.rejected_samples[0].reason, "record 9 is invalid");

    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&all("upsert"), fake.clone()).await;
    assert_eq!(fake.sent_keys(), vec!["9"]);
    assert_eq!(report.result, RunResult::Succeeded);
}

#[tokio::test]
async fn a_fatal_destination_error_stops_the_run_and_keeps_what_was_accepted() {
    let h = Harness::new().await;
    let fatal = SendError::Fatal("credentials rejected by crm (HTTP 401)".into());
    let fake = Arc::new(FakeConnector::new(50).with_script(vec![Ok(()), Ok(()), Err(fatal)]));
    let report = h
        .run_with(
            &all("upsert"),
            fake.clone(),
            RunOptions {
                checkpoint_records: 1,
                ..RunOptions::default()
            },
        )
        .await;
    assert_eq!(report.result, RunResult::Failed);
    assert!(
        report
            .error
            .as_ref()
            .unwrap()
            .to_string()
            .contains("credentials rejected")
    );
    let accepted = report.accepted;
    assert!(accepted >= 50, "at least the first batch landed: {accepted}");

    let fake = Arc::new(FakeConnector::new(50));
    let report = h.run(&all("upsert"), fake.clone()).await;
    assert_eq!(report.plan.unchanged, accepted, "accepted rows were committed");
    assert_eq!(report.accepted + accepted, 250);
}

#[tokio::test]
async fn a_dry_run_sends_nothing_changes_no_state_and_shows_samples() {
    let h = Harness::new().await;
    let fake = Arc::new(FakeConnector::new(100));
    let report = h
        .run_with(
            &all("upsert"),
            fake.clone(),
            RunOptions {
                dry_run: true,
                ..RunOptions::default()
            },
        )
        .await;
    assert_eq!(report.plan.added, 250);
    assert_eq!(fake.call_count(), 0);
    assert_eq!(report.plan_samples.len(), 5);
    assert!(report.plan_samples[0].record.contains("\"properties\""));
    let real = h.run(&all("upsert"), fake.clone()).await;
    assert_eq!(real.plan.added, 250, "the dry run stored nothing");
}

#[tokio::test]
async fn full_resync_sends_unchanged_rows_again() {
    let h = Harness::new().await;
    h.run(&all("upsert"), Arc::new(FakeConnector::new(100))).await;
    let fake = Arc::new(FakeConnector::new(100));
    let report = h
        .run_with(
            &all("upsert"),
            fake.clone(),
            RunOptions {
                full_resync: true,
                ..RunOptions::default()
            },
        )
        .await;
    assert_eq!((report.plan.changed, report.accepted), (250, 250));
}

#[tokio::test]
async fn a_mapping_that_names_a_missing_column_fails_before_sending() {
    let h = Harness::new().await;
    let spec = spec("upsert", "SELECT id, email, plan FROM customers");
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&spec, fake.clone()).await;
    let err = report.error.unwrap().to_string();
    assert!(
        err.contains("spec.mappings[3].from") && err.contains("score"),
        "{err}"
    );
    assert_eq!(fake.call_count(), 0);
}

fn templated(query: &str, mappings: &str) -> ReverseSyncSpec {
    serde_yaml_ng::from_str(&format!(
        r#"
source: {{connectionSecretRef: {{name: wh}}, query: "{query}", primaryKey: [id]}}
destinationRef: {{name: fake}}
mappings:
  - {{from: id, to: id}}
{mappings}
"#
    ))
    .unwrap()
}

#[tokio::test]
async fn jinja_mappings_shape_text_and_json_fields_end_to_end() {
    let h = Harness::new().await;
    let spec = templated(
        "SELECT id, email, plan, score FROM customers",
        r#"  - template: "{{ email | upper }}"
    to: properties.email
  - template: "{% if plan == 'enterprise' %}customer{% else %}lead{% endif %}"
    to: properties.lifecyclestage
  - template: '{"score": {{ score | round(0) }}, "tier": {{ plan | default("none") }}}'
    templateType: json
    to: facts
"#,
    );
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&spec, fake.clone()).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(report.accepted, 250);
    assert_eq!(
        fake.store.lock().unwrap()["7"],
        r#"{"facts":{"score":11,"tier":"free"},"id":7,"properties":{"email":"USER7@EXAMPLE.COM","lifecyclestage":"lead"}}"#
    );
}

#[tokio::test]
async fn a_jinja_template_naming_a_missing_column_fails_before_sending_naming_the_mapping() {
    let h = Harness::new().await;
    let spec = templated(
        "SELECT id, email FROM customers",
        "  - {template: \"{{ first_name | title }}\", to: name}\n",
    );
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&spec, fake.clone()).await;
    let err = report.error.unwrap().to_string();
    assert!(
        err.contains("spec.mappings[1].template") && err.contains("first_name"),
        "{err}"
    );
    assert_eq!(fake.call_count(), 0);
}

#[tokio::test]
async fn a_row_whose_template_fails_is_rejected_naming_the_mapping_and_the_run_goes_on() {
    let h = Harness::new().await;
    let spec = templated(
        "SELECT id, email FROM customers WHERE id <= 10",
        r#"  - template: '{% if id == 7 %}{{ email | safe }}{% else %}{{ email }}{% endif %}'
    templateType: json
    to: email
"#,
    );
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&spec, fake.clone()).await;
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!((report.plan.rejected, report.accepted), (1, 9));
    let reason = &report.rejected_samples[0].reason;
    assert!(
        reason.contains("mapping to \"email\": the template did not render valid JSON"),
        "{reason}"
    );
    assert!(!reason.contains("user7"), "{reason}");
}

/// Every `{{name}}` template in the repository's examples, samples, charts and docs, as
/// (file, field, text).
fn repository_templates() -> Vec<(String, String, String)> {
    fn walk(value: &serde_yaml_ng::Value, path: &str, file: &str, out: &mut Vec<(String, String, String)>) {
        use serde_yaml_ng::Value as Y;
        match value {
            Y::Mapping(map) => {
                for (k, v) in map {
                    let key = k.as_str().unwrap_or_default();
                    let here = format!("{path}.{key}");
                    let templated = key == "template"
                        || (path.ends_with(".http") || path.ends_with(".http.delete"))
                            && matches!(key, "url" | "body" | "record" | "checkUrl")
                        || path.ends_with(".http.headers");
                    match v.as_str() {
                        Some(text) if templated => out.push((file.to_owned(), here, text.to_owned())),
                        _ => walk(v, &here, file, out),
                    }
                }
            }
            Y::Sequence(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), file, out);
                }
            }
            _ => {}
        }
    }
    fn yaml_documents(text: &str, file: &str, out: &mut Vec<(String, String, String)>) {
        use serde::Deserialize;
        for document in serde_yaml_ng::Deserializer::from_str(text) {
            // Helm templates and other non-YAML files hold no Backflow template; the
            // documents after a syntax error cannot be read either.
            match serde_yaml_ng::Value::deserialize(document) {
                Ok(value) => walk(&value, "", file, out),
                Err(_) => break,
            }
        }
    }
    fn visit(dir: &std::path::Path, root: &std::path::Path, out: &mut Vec<(String, String, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                visit(&path, root, out);
                continue;
            }
            let file = path.strip_prefix(root).unwrap().display().to_string();
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            match path.extension().and_then(|e| e.to_str()) {
                Some("yaml" | "yml") => yaml_documents(&text, &file, out),
                Some("md") => {
                    for block in text.split("```yaml").skip(1) {
                        let block = block.split("```").next().unwrap_or_default();
                        yaml_documents(block, &file, out);
                    }
                }
                _ => {}
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["examples", "config/samples", "charts", "docs"] {
        visit(&root.join(dir), root, &mut out);
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for block in readme.split("```yaml").skip(1) {
        yaml_documents(
            block.split("```").next().unwrap_or_default(),
            "README.md",
            &mut out,
        );
    }
    out
}

/// How the engine before Jinja rendered a `{{name}}` template: each name's value as text
/// (`Value::as_text`), NULL empty.
fn render_old(text: &str, value_of: impl Fn(&str) -> backflow::model::value::Value) -> String {
    backflow::template::Template::parse(text)
        .unwrap()
        .render(|name| {
            let value = value_of(name);
            Some(if value.is_null() {
                String::new()
            } else {
                value.as_text().into_owned()
            })
        })
        .unwrap()
}

/// The same template through the new engine: its default path (plain holes) and, with a
/// trailing comment that keeps it off that path, the Jinja machine.
fn render_new(text: &str, value_of: impl Fn(&str) -> backflow::model::value::Value) -> [String; 2] {
    use backflow::model::value::{Document, Value};
    use backflow::template::{Jinja, Limits, Mode};
    [text.to_owned(), format!("{text}{{# through the machine #}}")].map(|source| {
        let template = Jinja::compile(&source, Mode::Text, Limits::RECORD).unwrap();
        // `{{secret.KEY}}` is an attribute of the `secret` map in Jinja.
        let secret: Document = backflow::template::Template::parse(text)
            .unwrap()
            .variables()
            .filter_map(|name| name.strip_prefix("secret."))
            .map(|key| (key.to_owned(), value_of(&format!("secret.{key}"))))
            .collect();
        let bound: Vec<Value> = template
            .variables()
            .iter()
            .map(|name| match name.as_str() {
                "secret" => Value::Object(secret.clone()),
                other => value_of(other),
            })
            .collect();
        template.render(|i| &bound[i]).unwrap()
    })
}

#[test]
fn every_template_in_the_repository_renders_as_before() {
    use backflow::model::value::Value;
    use bigdecimal::BigDecimal;
    use std::str::FromStr;
    let templates = repository_templates();
    let legacy: Vec<_> = templates
        .iter()
        // Templates the old engine accepted; `{%` and `{#` were literal text to it, and
        // start Jinja tags now (docs/templates.md says so).
        .filter(|(_, _, text)| {
            backflow::template::Template::parse(text).is_ok() && !text.contains("{%") && !text.contains("{#")
        })
        .collect();
    let texts: Vec<&str> = legacy.iter().map(|(_, _, t)| t.as_str()).collect();
    for expected in [
        "{{first_name}} {{last_name}}",
        "https://hooks.example.com/customers/{{operation}}",
        "Bearer {{secret.token}}",
    ] {
        assert!(texts.contains(&expected), "{expected:?} not found in {texts:?}");
    }
    let samples = [
        Value::Null,
        Value::Text("Ada".into()),
        Value::Text("Zoë \"Z\" O'Neil\n\t{{not a hole}}".into()),
        Value::Text(String::new()),
        Value::Bool(true),
        Value::Int(-7),
        Value::Int(i64::MAX),
        Value::Decimal(BigDecimal::from_str("10.50").unwrap()),
        Value::Decimal(BigDecimal::from_str("12345678901234567890.123456789").unwrap()),
        Value::Float(2.675),
        Value::Float(1e21),
        Value::Json(serde_json::json!({"b": [1, 2.5, null], "a": "x"})),
        Value::Json(serde_json::json!("json text")),
        Value::Array(vec![Value::Int(1), Value::Text("a".into())]),
    ];
    let records = Value::Text(r#"[{"email":"a@b.c","id":1}]"#.into());
    for (file, field, text) in &legacy {
        for sample in &samples {
            let value_of = |name: &str| match name {
                "operation" => Value::Text("upsert".into()),
                "records" => records.clone(),
                _ => sample.clone(),
            };
            let old = render_old(text, value_of);
            for new in render_new(text, value_of) {
                assert_eq!(new, old, "{file} {field} {text:?} with {sample:?}");
            }
        }
    }
}

#[test]
fn dates_times_timestamps_and_uuids_now_print_without_the_json_quotes_of_before() {
    use backflow::model::value::Value;
    let cases = [
        (
            Value::Date(chrono::NaiveDate::from_ymd_opt(2024, 1, 2).unwrap()),
            "2024-01-02",
        ),
        (
            Value::Time(chrono::NaiveTime::from_hms_opt(7, 8, 9).unwrap()),
            "07:08:09",
        ),
        (
            Value::Timestamp("2024-05-06T07:08:09Z".parse().unwrap()),
            "2024-05-06T07:08:09Z",
        ),
        (
            Value::Uuid(uuid::Uuid::from_u128(1)),
            "00000000-0000-0000-0000-000000000001",
        ),
    ];
    for (value, text) in cases {
        let old = render_old("since {{d}}", |_| value.clone());
        assert_eq!(old, format!("since \"{text}\""));
        for new in render_new("since {{d}}", |_| value.clone()) {
            assert_eq!(new, format!("since {text}"));
        }
    }
}

fn deletes_sent(fake: &FakeConnector) -> usize {
    fake.calls
        .lock()
        .unwrap()
        .iter()
        .filter(|(op, _)| *op == backflow::model::record::Operation::Delete)
        .map(|(_, keys)| keys.len())
        .sum()
}

#[tokio::test]
async fn a_collapsed_model_holds_its_deletes_back_sends_the_rest_and_plans_them_again() {
    let h = Harness::new().await;
    h.run(&all("mirror"), Arc::new(FakeConnector::new(100))).await;
    // A broken upstream: 200 of 250 rows gone, and one real change.
    h.db.exec("DELETE FROM customers WHERE id > 50; UPDATE customers SET plan = 'pro' WHERE id = 1")
        .await;
    let fake = Arc::new(FakeConnector::new(100));
    let report = h.run(&all("mirror"), fake.clone()).await;
    assert!(report.deletes_held_back());
    assert_eq!(report.result, RunResult::Failed, "the plan was not carried out");
    assert!(report.error.is_none(), "{:?}", report.error);
    assert_eq!(
        (report.plan.removed, report.deleted, deletes_sent(&fake)),
        (200, 0, 0)
    );
    assert_eq!(
        (report.plan.changed, report.accepted),
        (1, 1),
        "the update still went out"
    );
    let check = report.delete_check.clone().unwrap();
    assert_eq!((check.deletes, check.stored_records), (200, 250));
    assert!(
        check
            .exceeded
            .as_deref()
            .unwrap()
            .contains("200 of 250 stored records (80%)"),
        "{check:?}"
    );

    // The held-back rows stay in the state: the next run plans the same deletes again.
    let fake = Arc::new(FakeConnector::new(100));
    let again = h.run(&all("mirror"), fake.clone()).await;
    assert_eq!((again.plan.removed, deletes_sent(&fake)), (200, 0));
    assert_eq!(
        again.delete_check.as_ref().unwrap().plan_id,
        check.plan_id,
        "same plan, same id"
    );

    // An approval of another plan does not let this one through.
    h.db.exec("DELETE FROM customers WHERE id = 50").await;
    let fake = Arc::new(FakeConnector::new(100));
    let approve_old = RunOptions {
        approved_deletes: Some(check.plan_id.clone()),
        ..RunOptions::default()
    };
    let other = h.run_with(&all("mirror"), fake.clone(), approve_old).await;
    assert!(other.deletes_held_back());
    assert_eq!(deletes_sent(&fake), 0);

    // Approving the plan it printed lets exactly those deletes through.
    let plan_id = other.delete_check.unwrap().plan_id;
    assert!(plan_id.starts_with("201-"), "{plan_id}");
    let fake = Arc::new(FakeConnector::new(100));
    let approved = RunOptions {
        approved_deletes: Some(plan_id),
        ..RunOptions::default()
    };
    let done = h.run_with(&all("mirror"), fake.clone(), approved).await;
    assert!(!done.deletes_held_back());
    assert_eq!(
        (done.result, done.deleted, deletes_sent(&fake)),
        (RunResult::Succeeded, 201, 201)
    );
}

#[tokio::test]
async fn an_emptied_model_deletes_nothing_with_either_planner() {
    for in_memory in [false, true] {
        let h = Harness::new().await;
        let spec_of = |q: &str| spec("mirror", q);
        let store = |h: &Harness| -> Box<dyn backflow::state::StateStore> {
            let file = FileStore::new(h.state.path(), "default", "customers");
            if in_memory {
                Box::new(support::in_memory_store::InMemory(file))
            } else {
                Box::new(file)
            }
        };
        let run_on = |spec: ReverseSyncSpec, fake: Arc<FakeConnector>, dry_run: bool| {
            let mut store = store(&h);
            let url = h.db.url.clone();
            async move {
                let job = SyncRun {
                    namespace: "default",
                    name: "customers",
                    spec: &spec,
                    source_url: &url,
                    source_credentials: Default::default(),
                    delivery: fast_delivery(fake, 3),
                    scope: "default/fake".into(),
                };
                let options = RunOptions {
                    dry_run,
                    ..RunOptions::default()
                };
                run(job, store.as_mut(), &options).await
            }
        };
        run_on(all("mirror"), Arc::new(FakeConnector::new(100)), false).await;
        let empty = spec_of("SELECT id, email, plan, score FROM customers WHERE 0");
        // A dry run shows the guard before anything is sent.
        let preview = run_on(empty.clone(), Arc::new(FakeConnector::new(100)), true).await;
        assert!(preview.deletes_held_back(), "in memory: {in_memory}");
        assert_eq!(
            preview.result,
            RunResult::Succeeded,
            "a preview is not a failed run"
        );
        let fake = Arc::new(FakeConnector::new(100));
        let report = run_on(empty, fake.clone(), false).await;
        assert!(report.deletes_held_back(), "in memory: {in_memory}");
        let check = report.delete_check.unwrap();
        assert_eq!(
            (check.deletes, check.stored_records),
            (250, 250),
            "in memory: {in_memory}"
        );
        assert!(
            check
                .exceeded
                .unwrap()
                .contains("every one of the 250 stored records")
        );
        assert_eq!(deletes_sent(&fake), 0);
    }
}

#[tokio::test]
async fn ordinary_churn_and_tiny_syncs_pass_the_default_limit_and_a_sync_sets_its_own() {
    let h = Harness::new().await;
    h.run(&all("mirror"), Arc::new(FakeConnector::new(100))).await;
    h.db.exec("DELETE FROM customers WHERE id > 200").await;
    let report = h.run(&all("mirror"), Arc::new(FakeConnector::new(100))).await;
    assert_eq!(
        (report.deleted, report.result),
        (50, RunResult::Succeeded),
        "20% is churn"
    );

    // A tighter limit of the sync's own.
    let mut strict = all("mirror");
    strict.delete_limit = Some(backflow::api::reverse_sync::DeleteLimit {
        max_count: Some(5),
        ..Default::default()
    });
    h.db.exec("DELETE FROM customers WHERE id > 190").await;
    let report = h.run(&strict, Arc::new(FakeConnector::new(100))).await;
    assert!(report.deletes_held_back());
    assert!(
        report
            .delete_check
            .unwrap()
            .exceeded
            .unwrap()
            .contains("maxCount of 5")
    );

    // Below the floor of stored records, the share is not checked.
    let tiny = Harness::new().await;
    let query = "SELECT id, email, plan, score FROM customers WHERE id <= 5";
    tiny.run(&spec("mirror", query), Arc::new(FakeConnector::new(100)))
        .await;
    tiny.db.exec("DELETE FROM customers WHERE id IN (1, 2, 3)").await;
    let report = tiny
        .run(&spec("mirror", query), Arc::new(FakeConnector::new(100)))
        .await;
    assert_eq!((report.deleted, report.result), (3, RunResult::Succeeded));
}

#[tokio::test]
async fn a_runs_counters_move_through_its_phases_while_it_goes_on() {
    use backflow::engine::progress::{Phase, Progress};
    let h = Harness::new().await;
    let mut fake = FakeConnector::new(10);
    fake.delay = std::time::Duration::from_millis(40);
    let fake = Arc::new(fake.with_bad(&["3"], BadRecords::RejectEach));
    let progress = Arc::new(Progress::new());
    let options = RunOptions {
        progress: Arc::clone(&progress),
        ..RunOptions::default()
    };
    let done = tokio_util::sync::CancellationToken::new();
    let watch = async {
        let mut seen = Vec::new();
        while !done.is_cancelled() {
            seen.push(progress.snapshot());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        seen
    };
    let run = async {
        let report = h.run_with(&all("upsert"), fake.clone(), options).await;
        done.cancel();
        report
    };
    let (report, seen) = tokio::join!(run, watch);
    assert_eq!(report.result, RunResult::PartiallySucceeded);

    let phases: Vec<Phase> = seen.iter().map(|s| s.phase).collect();
    let order = |p: Phase| phases.iter().position(|q| *q == p);
    assert!(order(Phase::Delivering).is_some(), "{phases:?}");
    assert!(
        phases.windows(2).all(|w| order(w[0]) <= order(w[1])),
        "phases only move forward: {phases:?}"
    );
    let sent: Vec<u64> = seen
        .iter()
        .filter(|s| s.phase == Phase::Delivering)
        .map(|s| s.records_sent())
        .collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
    assert!(
        sent.iter().any(|n| (1..250).contains(n)),
        "watched delivery half-way: {sent:?}"
    );

    let end = progress.snapshot();
    assert_eq!(end.phase, Phase::Committing);
    assert_eq!(
        (end.rows_read, end.rows_planned, end.records_to_send),
        (250, 250, 250)
    );
    assert_eq!(
        (end.records_sent(), end.records_accepted(), end.rejected),
        (250, 249, 1)
    );
    assert_eq!(end.estimated_seconds_left(), Some(0));
    assert_eq!(end.ratio(), 1.0);
}
