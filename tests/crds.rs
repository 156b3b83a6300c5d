//! The committed CRDs in `crds/` are exactly what the Rust types generate.
//! `make crds` (BACKFLOW_WRITE_CRDS=1) rewrites them.

use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let write = std::env::var_os("BACKFLOW_WRITE_CRDS").is_some();
    for (name, yaml) in backflow::api::crds::files().unwrap() {
        let path = dir.join(&name);
        if write {
            std::fs::write(&path, &yaml).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{} is missing ({e}); run `make crds`", path.display()));
        assert!(
            committed == yaml,
            "{} drifted from the Rust types; run `make crds` and commit the result",
            path.display()
        );
    }
}

#[test]
fn crds_carry_printer_columns_short_names_and_cel_rules() {
    let all = backflow::api::crds::render().unwrap();
    for needle in [
        "shortNames:\n    - rsync",
        "name: Last Sync",
        "jsonPath: .status.lastRun.rowsInModel",
        "x-kubernetes-validations",
        "has(self.from) != has(self.template)",
        "has(self.http) == (self.type == 'http')",
        "subresources:\n      status: {}",
    ] {
        assert!(all.contains(needle), "CRDs lack {needle:?}");
    }
}
