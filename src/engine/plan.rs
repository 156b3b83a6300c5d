//! The planner: compares each mapped row's fingerprint with the stored one and decides what
//! to send. Pure and streaming: rows go in one at a time; the planner keeps one byte per
//! stored row and one hash per new key, never the rows themselves.

use std::collections::HashMap;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed, xxh3_128};

use crate::api::SyncMode;
use crate::model::record::Operation;
use crate::state::Fingerprints;

/// How a row compares with what was last delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Never delivered.
    Added,
    /// Delivered before with other values.
    Changed,
    /// Identical to what was delivered.
    Unchanged,
}

/// What to do with one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send it with this operation.
    Send(Operation, Change),
    /// Nothing to send (unchanged, or the mode does not apply to it).
    Skip(Change),
    /// The key was already seen in this result: every row of the key is rejected.
    Duplicate,
}

/// Counts of a plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanCounts {
    /// Rows the model returned.
    pub rows_in_model: u64,
    /// New rows to send.
    pub added: u64,
    /// Changed rows to send.
    pub changed: u64,
    /// Keys gone from the model (deleted in mirror mode).
    pub removed: u64,
    /// Rows identical to what was delivered.
    pub unchanged: u64,
    /// Rows the mode does not send (new rows in update mode, changed rows in insert mode).
    pub skipped: u64,
    /// Rows rejected before sending (NULL or duplicate key, failed transform).
    pub rejected: u64,
}

const UNSEEN: u8 = 0;

/// Streaming diff of a model against stored fingerprints.
#[derive(Debug)]
pub struct Planner<'a> {
    state: &'a Fingerprints,
    mode: SyncMode,
    full_resync: bool,
    /// Per stored row: UNSEEN, or 1 + the decision code of its first occurrence.
    seen_stored: Vec<u8>,
    /// Each new key's hash with its decision code in the low byte. Duplicates among new keys
    /// are found once, by sorting, when the plan finishes: a hash map of a million keys cost
    /// more time and memory than the rest of the planner.
    new_keys: Vec<u128>,
    /// Keys found more than once (hashes with the low byte cleared), with their rows.
    duplicates: HashMap<u128, u64>,
    counts: PlanCounts,
    result_fingerprint: u64,
    /// The stored slot after the previous row's: where the next row most likely is.
    hint: usize,
}

/// What a mode does with a row that compares as `change`.
pub fn decide(change: Change, mode: SyncMode) -> Decision {
    match (change, mode) {
        (Change::Unchanged, _) => Decision::Skip(Change::Unchanged),
        (Change::Added, SyncMode::Upsert | SyncMode::Mirror) => Decision::Send(Operation::Upsert, change),
        (Change::Added, SyncMode::Insert) => Decision::Send(Operation::Insert, change),
        (Change::Added, SyncMode::Update) => Decision::Skip(change),
        (Change::Changed, SyncMode::Upsert | SyncMode::Mirror) => Decision::Send(Operation::Upsert, change),
        (Change::Changed, SyncMode::Update) => Decision::Send(Operation::Update, change),
        (Change::Changed, SyncMode::Insert) => Decision::Skip(change),
    }
}

/// The contribution of one row to the result-set fingerprint (summed, so order-independent).
pub fn row_digest(key: &str, fingerprint: u64) -> u64 {
    xxh3_64_with_seed(key.as_bytes(), fingerprint)
}

/// The xxh3 fingerprint of a mapped record's canonical JSON.
pub fn fingerprint(canonical: &[u8]) -> u64 {
    xxh3_64(canonical)
}

/// The fingerprint of a record holding JSON nulls in `json_nulls` (targets, in mapping
/// order), from its canonical JSON's: canonical JSON writes a JSON null and SQL NULL alike,
/// so the targets are folded in. A record without JSON nulls keeps [`fingerprint`], so
/// stored fingerprints stay valid.
pub fn fingerprint_with_json_nulls(canonical_fingerprint: u64, json_nulls: &[impl AsRef<str>]) -> u64 {
    if json_nulls.is_empty() {
        return canonical_fingerprint;
    }
    let mut marked = Vec::with_capacity(64);
    marked.extend_from_slice(b"json null:");
    for target in json_nulls {
        marked.extend_from_slice(target.as_ref().as_bytes());
        marked.push(0);
    }
    xxh3_64_with_seed(&marked, canonical_fingerprint)
}

/// The 128-bit hash of a key, used to spot duplicates; its low byte is left free (zero).
pub fn key_hash(key: &str) -> u128 {
    key_hash_from_stored(xxh3_128(key.as_bytes()))
}

/// [`key_hash`] of a key, from the state stores' hash of it ([`crate::state::stored_key_hash`]).
pub fn key_hash_from_stored(hash: u128) -> u128 {
    hash & !0xFF
}

impl<'a> Planner<'a> {
    /// A planner over stored fingerprints. `full_resync` sends every row whatever its
    /// fingerprint.
    pub fn new(state: &'a Fingerprints, mode: SyncMode, full_resync: bool) -> Planner<'a> {
        Planner {
            state,
            mode,
            full_resync,
            seen_stored: vec![UNSEEN; state.len()],
            new_keys: Vec::new(),
            duplicates: Default::default(),
            counts: PlanCounts::default(),
            result_fingerprint: 0,
            hint: 0,
        }
    }

    /// Counts a row rejected before planning (undecodable value, NULL key, failed
    /// transform). A stored key is marked seen, so mirror mode does not delete its record
    /// for a row that is still in the model; any other row of the same key makes it a
    /// duplicate, whether it comes before or after. Returns true when a row of this stored
    /// key came before: the key is a duplicate, which the caller names (that row may not
    /// have been spilled).
    pub fn reject(&mut self, key: Option<&str>) -> bool {
        self.counts.rows_in_model += 1;
        self.counts.rejected += 1;
        let Some(key) = key else { return false };
        let Some(p) = self.state.position_near(key, self.hint) else {
            // Counted as rejected already: `finish` moves nothing if the key is duplicated.
            self.new_keys
                .push(key_hash(key) | u128::from(encode(Decision::Duplicate)));
            return false;
        };
        self.hint = p + 1;
        if self.seen_stored[p] == UNSEEN {
            self.seen_stored[p] = encode(Decision::Duplicate);
            false
        } else {
            self.repeated_stored_key(key, self.seen_stored[p]);
            true
        }
    }

    /// Decides for one row.
    pub fn plan(&mut self, key: &str, fingerprint: u64) -> Decision {
        self.counts.rows_in_model += 1;
        // Every row the model returned, a duplicated key's included, as the stores' diffs sum it.
        self.result_fingerprint = self.result_fingerprint.wrapping_add(row_digest(key, fingerprint));
        let position = self.state.position_near(key, self.hint);
        if let Some(p) = position {
            self.hint = p + 1;
        }
        if let Some(p) = position {
            let previous = self.seen_stored[p];
            if previous != UNSEEN {
                self.repeated_stored_key(key, previous);
                self.counts.rejected += 1;
                return Decision::Duplicate;
            }
        }
        let stored = position.and_then(|p| self.state.get(p));
        let change = match stored {
            None => Change::Added,
            Some(e) if e.fingerprint == fingerprint && !self.full_resync => Change::Unchanged,
            Some(_) => Change::Changed,
        };
        let decision = decide(change, self.mode);
        self.count(decision);
        let code = encode(decision);
        match position {
            Some(p) => self.seen_stored[p] = code,
            None => self.new_keys.push(key_hash(key) | u128::from(code)),
        }
        decision
    }

    /// Counts another row of a stored key seen before (whose first row was decided
    /// `previous`); the caller counts the row itself.
    fn repeated_stored_key(&mut self, key: &str, previous: u8) {
        match self.duplicates.entry(key_hash(key)) {
            std::collections::hash_map::Entry::Occupied(mut rows) => *rows.get_mut() += 1,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(2);
                // The first occurrence was counted as planned: move it to rejected too.
                self.uncount(decode(previous));
                self.counts.rejected += 1;
            }
        }
    }

    fn count(&mut self, d: Decision) {
        let c = &mut self.counts;
        match d {
            Decision::Send(_, Change::Added) => c.added += 1,
            Decision::Send(_, _) => c.changed += 1,
            Decision::Skip(Change::Unchanged) => c.unchanged += 1,
            Decision::Skip(_) => c.skipped += 1,
            Decision::Duplicate => c.rejected += 1,
        }
    }

    fn uncount(&mut self, d: Decision) {
        let c = &mut self.counts;
        let field = match d {
            Decision::Send(_, Change::Added) => &mut c.added,
            Decision::Send(_, _) => &mut c.changed,
            Decision::Skip(Change::Unchanged) => &mut c.unchanged,
            Decision::Skip(_) => &mut c.skipped,
            Decision::Duplicate => &mut c.rejected,
        };
        *field = field.saturating_sub(1);
    }

    /// Ends the plan: the positions of stored rows gone from the model, and the counts.
    pub fn finish(mut self) -> PlanOutcome {
        // Every occurrence of a key that came more than once is rejected, the first included.
        self.new_keys.sort_unstable_by_key(|h| *h >> 8);
        let mut i = 0;
        while i < self.new_keys.len() {
            let hash = self.new_keys[i] & !0xFF;
            let mut j = i + 1;
            while j < self.new_keys.len() && self.new_keys[j] & !0xFF == hash {
                j += 1;
            }
            if j - i > 1 {
                self.duplicates.insert(hash, (j - i) as u64);
                for k in i..j {
                    self.uncount(decode((self.new_keys[k] & 0xFF) as u8));
                    self.counts.rejected += 1;
                }
            }
            i = j;
        }
        self.new_keys = Vec::new();
        let removed: Vec<usize> = self
            .seen_stored
            .iter()
            .enumerate()
            .filter(|(_, s)| **s == UNSEEN)
            .map(|(i, _)| i)
            .collect();
        self.counts.removed = removed.len() as u64;
        PlanOutcome {
            counts: self.counts,
            removed,
            duplicates: self.duplicates,
            result_fingerprint: format!("{:016x}", self.result_fingerprint),
        }
    }
}

/// The result of a finished plan.
#[derive(Debug)]
pub struct PlanOutcome {
    /// Counts per category.
    pub counts: PlanCounts,
    /// Positions in the stored fingerprints of rows gone from the model (the in-memory
    /// planner's; a store's diff lists its own).
    pub removed: Vec<usize>,
    /// Hashes of duplicated keys, with the number of rows of each.
    pub duplicates: HashMap<u128, u64>,
    /// Order-independent fingerprint of the model's keys and fingerprints.
    pub result_fingerprint: String,
}

impl PlanOutcome {
    /// True when the key was found more than once.
    pub fn is_duplicate(&self, key: &str) -> bool {
        !self.duplicates.is_empty() && self.duplicates.contains_key(&key_hash(key))
    }

    /// How many rows the model returned for a duplicated key (0 for a key that is not).
    pub fn duplicate_rows(&self, key: &str) -> u64 {
        self.duplicates.get(&key_hash(key)).copied().unwrap_or(0)
    }

    /// [`Self::is_duplicate`], from the key's [`crate::state::stored_key_hash`].
    pub fn is_duplicate_stored(&self, stored_hash: u128) -> bool {
        !self.duplicates.is_empty() && self.duplicates.contains_key(&key_hash_from_stored(stored_hash))
    }
}

fn encode(d: Decision) -> u8 {
    match d {
        Decision::Send(Operation::Upsert, Change::Added) => 1,
        Decision::Send(Operation::Upsert, _) => 2,
        Decision::Send(Operation::Insert, _) => 3,
        Decision::Send(Operation::Update, _) => 4,
        Decision::Send(Operation::Delete, _) => 5,
        Decision::Skip(Change::Unchanged) => 6,
        Decision::Skip(Change::Added) => 7,
        Decision::Skip(Change::Changed) => 8,
        Decision::Duplicate => 9,
    }
}

fn decode(code: u8) -> Decision {
    match code {
        1 => Decision::Send(Operation::Upsert, Change::Added),
        2 => Decision::Send(Operation::Upsert, Change::Changed),
        3 => Decision::Send(Operation::Insert, Change::Added),
        4 => Decision::Send(Operation::Update, Change::Changed),
        5 => Decision::Send(Operation::Delete, Change::Changed),
        6 => Decision::Skip(Change::Unchanged),
        7 => Decision::Skip(Change::Added),
        8 => Decision::Skip(Change::Changed),
        _ => Decision::Duplicate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::EntryRef;

    fn state() -> Fingerprints {
        Fingerprints::from_entries([
            EntryRef {
                key: "same",
                fingerprint: 1,
                identity: "",
            },
            EntryRef {
                key: "edited",
                fingerprint: 2,
                identity: "",
            },
            EntryRef {
                key: "gone",
                fingerprint: 3,
                identity: "",
            },
        ])
    }

    fn run(mode: SyncMode, full: bool) -> (Vec<Decision>, PlanOutcome) {
        let s = state();
        let mut p = Planner::new(&s, mode, full);
        let d = vec![p.plan("same", 1), p.plan("edited", 20), p.plan("new", 5)];
        let out = p.finish();
        (d, out)
    }

    #[test]
    fn upsert_sends_added_and_changed_and_skips_unchanged() {
        let (d, out) = run(SyncMode::Upsert, false);
        assert_eq!(
            d,
            vec![
                Decision::Skip(Change::Unchanged),
                Decision::Send(Operation::Upsert, Change::Changed),
                Decision::Send(Operation::Upsert, Change::Added)
            ]
        );
        assert_eq!(
            (
                out.counts.added,
                out.counts.changed,
                out.counts.unchanged,
                out.counts.removed
            ),
            (1, 1, 1, 1)
        );
        assert_eq!(out.removed.len(), 1);
    }

    #[test]
    fn update_sends_only_rows_synced_before() {
        let (d, out) = run(SyncMode::Update, false);
        assert_eq!(d[1], Decision::Send(Operation::Update, Change::Changed));
        assert_eq!(d[2], Decision::Skip(Change::Added));
        assert_eq!(out.counts.skipped, 1);
    }

    #[test]
    fn insert_sends_only_new_rows() {
        let (d, _) = run(SyncMode::Insert, false);
        assert_eq!(d[1], Decision::Skip(Change::Changed));
        assert_eq!(d[2], Decision::Send(Operation::Insert, Change::Added));
    }

    #[test]
    fn full_resync_sends_unchanged_rows_too() {
        let (d, _) = run(SyncMode::Upsert, true);
        assert_eq!(d[0], Decision::Send(Operation::Upsert, Change::Changed));
    }

    #[test]
    fn every_row_of_a_duplicated_key_is_rejected() {
        let s = state();
        let mut p = Planner::new(&s, SyncMode::Upsert, false);
        // New keys: duplicates show when the plan finishes.
        assert_eq!(p.plan("new", 1), Decision::Send(Operation::Upsert, Change::Added));
        assert_eq!(p.plan("new", 2), Decision::Send(Operation::Upsert, Change::Added));
        assert_eq!(p.plan("new", 3), Decision::Send(Operation::Upsert, Change::Added));
        assert_eq!(
            p.plan("other", 3),
            Decision::Send(Operation::Upsert, Change::Added)
        );
        // Stored keys: the second occurrence is refused at once.
        assert_eq!(p.plan("same", 1), Decision::Skip(Change::Unchanged));
        assert_eq!(p.plan("same", 1), Decision::Duplicate);
        let out = p.finish();
        assert!(out.is_duplicate("new") && out.is_duplicate("same"));
        assert!(!out.is_duplicate("edited") && !out.is_duplicate("other"));
        assert_eq!((out.duplicate_rows("new"), out.duplicate_rows("same")), (3, 2));
        assert_eq!(out.counts.rejected, 5);
        assert_eq!((out.counts.added, out.counts.unchanged), (1, 0));
        assert_eq!(out.counts.rows_in_model, 6);
        // "same" was seen, so it is not removed even though it was rejected.
        assert_eq!(out.counts.removed, 2);
    }

    #[test]
    fn a_rejected_row_of_a_stored_key_keeps_its_record_from_deletion() {
        let s = state();
        let mut p = Planner::new(&s, SyncMode::Mirror, false);
        p.plan("same", 1);
        p.reject(Some("edited"));
        p.reject(None);
        let out = p.finish();
        assert_eq!(out.counts.removed, 1, "only \"gone\" is removed");
        assert_eq!((out.counts.rejected, out.counts.rows_in_model), (2, 3));
    }

    #[test]
    fn a_key_both_rejected_and_planned_is_a_duplicate() {
        let s = state();
        let mut p = Planner::new(&s, SyncMode::Upsert, false);
        p.reject(Some("edited"));
        assert_eq!(p.plan("edited", 5), Decision::Duplicate);
        p.plan("same", 1);
        assert!(
            p.reject(Some("same")),
            "a stored key seen before: named by the caller"
        );
        assert!(!p.reject(Some("brand-new")));
        p.plan("brand-new", 9);
        p.plan("also-new", 9);
        assert!(!p.reject(Some("also-new")));
        assert!(!p.reject(Some("rejected-only")));
        let out = p.finish();
        assert!(out.is_duplicate("edited") && out.is_duplicate("same"));
        assert!(out.is_duplicate("brand-new") && out.is_duplicate("also-new"));
        assert!(!out.is_duplicate("rejected-only"));
        assert_eq!(
            (out.duplicate_rows("brand-new"), out.duplicate_rows("also-new")),
            (2, 2)
        );
        assert_eq!(out.counts.rejected, 9);
        assert_eq!((out.counts.unchanged, out.counts.added), (0, 0));
    }

    #[test]
    fn json_nulls_change_the_fingerprint_only_of_records_that_hold_them() {
        let canonical = fingerprint(br#"{"j":null}"#);
        // Stored fingerprints of records without a JSON null stay valid.
        assert_eq!(fingerprint_with_json_nulls(canonical, &[] as &[&str]), canonical);
        let json_null = fingerprint_with_json_nulls(canonical, &["j"]);
        assert_ne!(json_null, canonical);
        assert_ne!(fingerprint_with_json_nulls(canonical, &["k"]), json_null);
    }

    #[test]
    fn the_result_fingerprint_ignores_row_order() {
        let s = Fingerprints::default();
        let mut a = Planner::new(&s, SyncMode::Upsert, false);
        a.plan("x", 1);
        a.plan("y", 2);
        let mut b = Planner::new(&s, SyncMode::Upsert, false);
        b.plan("y", 2);
        b.plan("x", 1);
        assert_eq!(a.finish().result_fingerprint, b.finish().result_fingerprint);
    }
}
