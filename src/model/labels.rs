//! The labels Backflow puts on the objects it creates, and the rule that fits a name into a
//! label value or an object name.

use xxhash_rust::xxh3::xxh3_64;

/// Label naming the tool that manages an object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`] on every object Backflow creates (state ConfigMaps, Jobs).
pub const MANAGED_BY: &str = "backflow";
/// Label holding the sync's name ([`sync_label_value`]) on every object created for a sync.
pub const SYNC_LABEL: &str = "backflow.dev/sync";
/// Label telling what a state ConfigMap holds: `index`, `shard` or `journal`. A controller
/// watching ConfigMaps can leave these out with `!backflow.dev/state`.
pub const STATE_LABEL: &str = "backflow.dev/state";
/// The longest a label value may be.
const MAX_LABEL: usize = 63;

/// Value of [`SYNC_LABEL`] for a sync: its name, or a cut name and a hash when longer than a
/// label value may be (63 characters).
pub fn sync_label_value(sync_name: &str) -> String {
    shorten(sync_name, MAX_LABEL)
}

/// `name` itself when it fits in `max` bytes; otherwise its head and a 16-digit hash of all
/// of it. The head is cut back to an alphanumeric character, so the result stays a valid DNS
/// subdomain or label value when `name` was one.
pub fn shorten(name: &str, max: usize) -> String {
    if name.len() <= max {
        return name.to_owned();
    }
    let hash = format!("{:016x}", xxh3_64(name.as_bytes()));
    let mut end = max.saturating_sub(hash.len() + 1);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let head = name[..end].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if head.is_empty() {
        hash
    } else {
        format!("{head}-{hash}")
    }
}
