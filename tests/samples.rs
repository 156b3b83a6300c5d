//! Every example manifest in the repository loads and passes validation.

use std::path::Path;

use backflow::api::validation::{validate_destination, validate_reverse_sync};
use backflow::local::manifests::{Manifests, load_text};

#[test]
fn every_example_and_sample_manifest_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut checked = 0;
    for dir in ["examples/quickstart", "config/samples"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let mut m = Manifests::default();
            load_text(
                &std::fs::read_to_string(&path).unwrap(),
                &path.display().to_string(),
                &mut m,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            for d in m.destinations.values() {
                validate_destination(&d.spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            for s in m.syncs.values() {
                validate_reverse_sync(&s.spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                checked += 1;
            }
        }
    }
    assert!(
        checked >= 2,
        "expected the quick start and the samples, checked {checked}"
    );
}
