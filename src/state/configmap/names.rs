//! What the ConfigMap store calls its objects: their names, the labels and annotations that
//! tell them apart, the data keys they hold, and the owner reference they carry.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::api::ReverseSync;
use crate::model::labels::shorten;

pub(super) const GENERATION_LABEL: &str = "backflow.dev/generation";
pub(super) const SEQ_LABEL: &str = "backflow.dev/seq";
pub(super) const SYNC_NAME_ANNOTATION: &str = "backflow.dev/sync-name";
pub(super) const CHECKSUM_ANNOTATION: &str = "backflow.dev/checksum";
pub(super) const WRITER_ANNOTATION: &str = "backflow.dev/writer";

pub(super) const INDEX_KEY: &str = "index.json";
pub(super) const SHARD_KEY: &str = "entries.zst";
pub(super) const JOURNAL_KEY: &str = "changes.zst";

pub(super) const MAX_NAME: usize = 253;
/// The longest suffix added to the index name: `-GEN-jSEQ` with two 20-digit numbers.
pub(super) const LONGEST_SUFFIX: usize = 1 + 20 + 2 + 20;

/// Name of a sync's index ConfigMap, `<sync>-state`; the names of its shards and journals
/// add a suffix to it. A sync name too long for the longest of them (253 characters) is cut
/// and ends with a hash of the whole name, so two long names never share objects.
pub fn index_name(sync_name: &str) -> String {
    format!(
        "{}-state",
        shorten(sync_name, MAX_NAME - "-state".len() - LONGEST_SUFFIX)
    )
}

pub(super) fn shard_name(index: &str, generation: u64, n: usize) -> String {
    format!("{index}-{generation}-{n}")
}

pub(super) fn journal_name(index: &str, generation: u64, seq: u64) -> String {
    format!("{index}-{generation}-j{seq}")
}

/// The owner reference to give [`ConfigMapStore::new`](super::ConfigMapStore::new) for a sync: `controller: false`,
/// since the state is data the sync keeps, not objects its controller reconciles (a
/// controller reference would also claim the one controller slot of the object), and no
/// `blockOwnerDeletion`, which needs update rights on `reversesyncs/finalizers` that a
/// Job-mode run's service account has no reason to hold. Garbage collection deletes
/// dependents of a deleted owner either way; the finalizer's [`delete_all`](super::gc::delete_all) does it first.
/// `None` when the sync has no uid yet (it was never stored).
pub fn owner_reference(sync: &ReverseSync) -> Option<OwnerReference> {
    use kube::Resource;
    Some(OwnerReference {
        api_version: ReverseSync::api_version(&()).into_owned(),
        kind: ReverseSync::kind(&()).into_owned(),
        name: sync.metadata.name.clone()?,
        uid: sync.metadata.uid.clone()?,
        controller: Some(false),
        block_owner_deletion: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::labels::sync_label_value;

    fn is_dns_subdomain(s: &str) -> bool {
        s.len() <= 253
            && s.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && label.as_bytes()[0].is_ascii_alphanumeric()
                    && label.as_bytes()[label.len() - 1].is_ascii_alphanumeric()
            })
    }

    #[test]
    fn short_names_are_kept_and_long_ones_cut_with_a_hash_into_valid_names() {
        assert_eq!(index_name("customers"), "customers-state");
        assert_eq!(sync_label_value("customers"), "customers");

        let long = format!("{}.b-{}", "a".repeat(200), "c".repeat(45));
        let other = format!("{}.b-{}", "a".repeat(200), "d".repeat(45));
        let index = index_name(&long);
        assert_ne!(index, index_name(&other));
        let longest = journal_name(&index, u64::MAX, u64::MAX);
        assert_eq!(longest.len(), 253, "{longest}");
        for name in [&index, &longest, &shard_name(&index, u64::MAX, 99)] {
            assert!(is_dns_subdomain(name), "{name}");
        }

        // A cut that would end on a dot or a dash backs up to an alphanumeric character.
        let dotted = format!("{}.{}", "x".repeat(45), "y".repeat(30));
        let label = sync_label_value(&dotted);
        assert!(label.len() <= 63, "{label}");
        assert!(
            label.starts_with(&"x".repeat(45)) && !label.contains('.'),
            "{label}"
        );
        assert_ne!(
            label,
            sync_label_value(&format!("{}.{}", "x".repeat(45), "z".repeat(30)))
        );
    }
}
