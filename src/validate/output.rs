//! The report as text for people (one line per finding, `file:line:column: severity: …`, the
//! form editors and CI annotations pick up) and as JSON for bots.

use std::fmt::Write as _;

use super::{Finding, Report, Severity};

/// One line per finding and a closing summary.
pub fn text(report: &Report) -> String {
    let mut out = String::new();
    for f in &report.findings {
        let _ = writeln!(out, "{}", line(f));
    }
    let (errors, warnings) = (report.count(Severity::Error), report.count(Severity::Warning));
    let _ = writeln!(
        out,
        "{}: {} {}, {} {} in {} {} ({} {}, {} Backflow {})",
        if errors == 0 { "valid" } else { "invalid" },
        errors,
        plural(errors, "error"),
        warnings,
        plural(warnings, "warning"),
        report.files,
        plural(report.files, "file"),
        report.documents,
        plural(report.documents, "document"),
        report.objects,
        plural(report.objects, "object"),
    );
    out
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// `file:line:column: error: Kind/name (document N) path: message`.
pub fn line(f: &Finding) -> String {
    let mut out = f.file.clone();
    if let Some(line) = f.line {
        let _ = write!(out, ":{line}");
        if let Some(column) = f.column {
            let _ = write!(out, ":{column}");
        }
    }
    let severity = match f.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    };
    let _ = write!(out, ": {severity}:");
    match (&f.kind, &f.name) {
        (Some(kind), Some(name)) => {
            let _ = write!(out, " {kind}/{name}");
        }
        (Some(kind), None) => {
            let _ = write!(out, " {kind}");
        }
        _ => {}
    }
    if let Some(d) = f.document {
        let _ = write!(out, " (document {d})");
    }
    if let Some(path) = &f.path {
        let _ = write!(out, " {path}:");
    }
    let _ = write!(out, " {}", f.message);
    out
}

/// `{"valid", "errors", "warnings", "files", "documents", "objects", "findings": [...]}`.
pub fn json(report: &Report) -> serde_json::Value {
    serde_json::json!({
        "valid": report.is_valid(),
        "errors": report.count(Severity::Error),
        "warnings": report.count(Severity::Warning),
        "files": report.files,
        "documents": report.documents,
        "objects": report.objects,
        "findings": report.findings,
    })
}
