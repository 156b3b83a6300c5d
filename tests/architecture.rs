//! The layers of the crate stay stacked: every `crate::…` path (and every `super::` path that
//! climbs out of its top-level module) in `src/` names a module its own may depend on.
//!
//! ```text
//! controller, local          (run syncs; the operator and `backflow run -f`)
//!   metrics
//!     engine                 (extract → plan → deliver → commit)
//!       source, state, destination
//!         api                (the custom resources and their validation)
//!           egress, redact, template
//!             model          (the vocabulary every layer shares)
//! ```
//!
//! A module that is not in [`ALLOWED`] fails the test too, so a new one says where it sits.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module of `src/` and the top-level modules it may import.
const ALLOWED: &[(&str, &[&str])] = &[
    ("model", &[]),
    ("egress", &[]),
    ("redact", &["model"]),
    ("template", &["model"]),
    ("api", &["model", "template"]),
    ("source", &["model", "egress", "redact", "api"]),
    ("state", &["model", "egress", "redact", "api"]),
    ("destination", &["model", "egress", "redact", "template", "api"]),
    (
        "engine",
        &[
            "model",
            "egress",
            "redact",
            "template",
            "api",
            "source",
            "state",
            "destination",
        ],
    ),
    (
        "metrics",
        &[
            "model",
            "egress",
            "redact",
            "template",
            "api",
            "source",
            "state",
            "destination",
            "engine",
        ],
    ),
    (
        "controller",
        &[
            "model",
            "egress",
            "redact",
            "template",
            "api",
            "source",
            "state",
            "destination",
            "engine",
            "metrics",
        ],
    ),
    (
        "local",
        &[
            "model",
            "egress",
            "redact",
            "template",
            "api",
            "source",
            "state",
            "destination",
            "engine",
            "metrics",
        ],
    ),
    (
        "cli",
        &[
            "model",
            "egress",
            "redact",
            "template",
            "api",
            "source",
            "state",
            "destination",
            "engine",
            "metrics",
            "controller",
        ],
    ),
    (
        "validate",
        &[
            "model",
            "egress",
            "redact",
            "template",
            "api",
            "source",
            "state",
            "destination",
            "engine",
            "metrics",
            "controller",
            "local",
        ],
    ),
];

/// Files at the root that wire the modules together rather than sit in a layer.
const ROOTS: &[&str] = &["lib.rs", "main.rs"];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `src/`: `destination/salesforce/mod.rs` is
/// `["destination", "salesforce"]`, `destination/http.rs` is `["destination", "http"]`.
fn module_path(relative: &Path) -> Vec<String> {
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap();
    if file != "mod.rs" {
        parts.push(file.trim_end_matches(".rs").to_owned());
    }
    parts
}

/// The code of a line without its `//` comment (doc links are not imports).
fn code(line: &str) -> &str {
    line.split("//").next().unwrap_or("")
}

/// The top-level modules a file's code names: `crate::X`, and `super::…::X` where the
/// `super`s climb to the crate root.
fn imported_modules(text: &str, depth: usize) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    for line in text.lines().map(code) {
        for (i, _) in line.match_indices("crate::") {
            let before = line[..i].chars().last();
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let name = ident(&line[i + "crate::".len()..]);
            if !name.is_empty() {
                found.insert(name);
            }
        }
        for (i, _) in line.match_indices("super::") {
            if line[..i].ends_with("super::") {
                continue;
            }
            let mut rest = &line[i..];
            let mut climbs = 0;
            while let Some(r) = rest.strip_prefix("super::") {
                climbs += 1;
                rest = r;
            }
            if climbs >= depth {
                let name = ident(rest);
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let allowed: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 50,
        "found only {} files under {}",
        files.len(),
        src.display()
    );

    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        if ROOTS.iter().any(|r| relative == Path::new(r)) {
            continue;
        }
        let path = module_path(relative);
        let own = path[0].as_str();
        let Some(may) = allowed.get(own) else {
            violations.push(format!(
                "{}: module {own} has no row in ALLOWED; add it with the modules it may import",
                relative.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for module in imported_modules(&text, path.len()) {
            checked += 1;
            let known = allowed.contains_key(module.as_str());
            if module != own && known && !may.contains(module.as_str()) {
                violations.push(format!("{}: {own} imports {module}", relative.display()));
            }
        }
    }
    assert!(
        checked > 100,
        "only {checked} imports found: is the scan reading the files?"
    );
    assert!(
        violations.is_empty(),
        "upward imports:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_scan_finds_crate_paths_and_super_paths_that_leave_the_module() {
    let text = "use crate::engine::run;\n\
                let x = crate::model::value::Value::Null; // crate::state in a comment\n\
                use super::super::api::Spec;\n\
                use super::vendor::answer;\n\
                let y = $crate::ignored;";
    let found = imported_modules(text, 2);
    let expected: BTreeSet<String> = ["engine", "model", "api"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected);
    // From a top-level file (depth 1) one `super` reaches the crate root.
    let found = imported_modules("use super::destination::SendError;", 1);
    assert!(found.contains("destination"));
}

#[test]
fn the_table_is_a_stack_without_circles() {
    let mut left: BTreeMap<&str, BTreeSet<&str>> = ALLOWED
        .iter()
        .map(|(m, deps)| (*m, deps.iter().copied().collect()))
        .collect();
    for (module, deps) in &left {
        for dep in deps {
            assert!(
                left.contains_key(dep),
                "{module} may import {dep}, which has no row"
            );
        }
    }
    assert!(
        left["model"].is_empty(),
        "the vocabulary imports nothing of the crate"
    );
    // Peel off the modules whose allowed imports are all peeled already; a circle never peels.
    while !left.is_empty() {
        let ready: Vec<&str> = left
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !left.contains_key(d)))
            .map(|(m, _)| *m)
            .collect();
        assert!(
            !ready.is_empty(),
            "the allowed imports go round in a circle among {:?}",
            left.keys()
        );
        for m in ready {
            left.remove(m);
        }
    }
}
