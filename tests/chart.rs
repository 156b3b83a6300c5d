//! Checks of the install files that need the Rust side: the CRD copies in the Helm chart and
//! in kustomize's `config/crd` are the generated `crds/`, and every metric the alert rules and
//! the Grafana dashboard query is one the operator registers. (`make test-chart` renders and
//! validates the chart itself; see tests/chart/.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use backflow::metrics::Metrics;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn yaml_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml"))
        .collect()
}

/// `make crds` (BACKFLOW_WRITE_CRDS=1) refreshes the copies.
#[test]
fn chart_and_kustomize_crds_are_copies_of_the_generated_crds() {
    let source = root().join("crds");
    let write = std::env::var_os("BACKFLOW_WRITE_CRDS").is_some();
    let names = yaml_files(&source);
    assert!(names.len() >= 2, "crds/ holds {names:?}");
    for copy in ["charts/backflow/crds", "config/crd/bases"] {
        let dir = root().join(copy);
        for name in &names {
            let generated = std::fs::read(source.join(name)).unwrap();
            if write {
                std::fs::write(dir.join(name), &generated).unwrap();
                continue;
            }
            let copied = std::fs::read(dir.join(name))
                .unwrap_or_else(|e| panic!("{copy}/{name} is missing ({e}); run `make crds`"));
            assert!(
                copied == generated,
                "{copy}/{name} differs from crds/{name}; run `make crds` and commit the result"
            );
        }
        assert_eq!(
            yaml_files(&dir),
            names,
            "{copy}/ must hold exactly the files of crds/"
        );
    }
}

/// Every `backflow_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("backflow_") {
        let preceded_by_word = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !preceded_by_word {
            out.insert(tail[..len].to_owned());
        }
        rest = &tail[len..];
    }
    out
}

#[test]
fn alerts_and_dashboard_query_only_registered_metrics() {
    let metrics = Metrics::new().unwrap();
    let registered: BTreeSet<String> = metrics.names().into_iter().collect();
    // Histograms are exported as NAME_bucket, NAME_sum and NAME_count; a histogram with a
    // series shows its type in the exposition.
    metrics
        .sync_duration
        .with_label_values(&["ns", "sync"])
        .observe(1.0);
    let exposition = metrics.render();
    let is_histogram = |name: &str| exposition.contains(&format!("# TYPE {name} histogram\n"));
    let known = |name: &str| {
        registered.contains(name)
            || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| registered.contains(base) && is_histogram(base))
            })
    };

    let files = [
        "charts/backflow/files/dashboard.json",
        "charts/backflow/templates/prometheusrule.yaml",
        "charts/backflow/ci/all-on-values.yaml",
        "config/prometheus/prometheus_rule.yaml",
        "docs/operations.md",
    ];
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(root().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} queries no backflow_* metric");
        for name in names {
            if !known(&name) {
                problems.push(format!("{file}: {name}"));
            }
            used.insert(name);
        }
    }
    assert!(
        problems.is_empty(),
        "metrics the operator does not register (Metrics::new().names() = {registered:?}):\n  {}",
        problems.join("\n  ")
    );

    // What the dashboard must show: runs, rows by operation and outcome, run duration,
    // throttling and rejects per sync.
    let dashboard = std::fs::read_to_string(root().join("charts/backflow/files/dashboard.json")).unwrap();
    for needle in [
        "backflow_sync_runs_total",
        "sum by (op, outcome) (rate(backflow_sync_rows_total",
        "backflow_sync_duration_seconds_bucket",
        "backflow_destination_throttled_total",
        // JSON-escaped quotes.
        r#"outcome=~\"rejected|failed\""#,
    ] {
        assert!(dashboard.contains(needle), "the dashboard lacks {needle:?}");
    }
    // What the alerts must cover: failing, stale for 3 schedule periods, rows rejected, deletes
    // held back by the delete limit, down.
    let rule = std::fs::read_to_string(root().join("config/prometheus/prometheus_rule.yaml")).unwrap();
    for needle in [
        "backflow_sync_consecutive_failures",
        "3 * max by (namespace, sync) (backflow_sync_schedule_period_seconds)",
        "outcome=\"rejected\"",
        "backflow_sync_deletes_held_back) > 0",
        "absent(backflow_build_info",
    ] {
        assert!(rule.contains(needle), "the PrometheusRule lacks {needle:?}");
    }
    assert!(used.len() >= 10, "only {used:?} are used");
}

#[test]
fn metric_names_are_found_in_promql() {
    let names = metric_names(
        r#"rate(backflow_sync_rows_total{outcome="x"}[5m]) / my_backflow_x + backflow_build_info"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["backflow_build_info", "backflow_sync_rows_total"]
    );
}
