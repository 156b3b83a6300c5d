//! State stores: where a sync keeps the fingerprint of every row it delivered.
//!
//! One engine, several homes implementing the same [`StateStore`] trait: the [`file`](mod@file) store
//! (local runs) and the [`configmap`] store (in the cluster), which both write the binary
//! records of `codec`, and the [`warehouse`] store (tables in the source database).
//! [`migrate::Migrating`] puts one store in front of another so that switching stores
//! imports the previous state instead of resending every row.
//!
//! A run never loads a state: each store compares it with the run's rows through disk
//! buckets ([`hash_buckets`], `change_buckets`), so memory does not grow with the rows
//! stored. [`Fingerprints`], the compact in-memory set, is what `load` returns: a migration
//! reads the previous store's state with it.

mod change_buckets;
mod codec;
pub mod configmap;
pub mod file;
pub mod hash_buckets;
pub mod migrate;
mod removed_rows;
pub mod stored_pairs;
pub mod warehouse;

pub use removed_rows::RemovedRows;

use async_trait::async_trait;
use xxhash_rust::xxh3::xxh3_64;

/// One row's entry: its key, the fingerprint of what was delivered, and its identity (the
/// match fields as canonical JSON, needed to delete the record once the row is gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRef<'a> {
    /// Canonical primary key.
    pub key: &'a str,
    /// xxh3 fingerprint of the canonical mapped record.
    pub fingerprint: u64,
    /// Match fields as canonical JSON.
    pub identity: &'a str,
}

/// A change to commit: a row delivered, or a record deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateChange {
    /// The destination accepted this version of the row.
    Put {
        /// Canonical primary key.
        key: String,
        /// Fingerprint of the accepted record.
        fingerprint: u64,
        /// Match fields as canonical JSON.
        identity: String,
    },
    /// The destination deleted the record of this key.
    Remove {
        /// Canonical primary key.
        key: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    key_hash: u64,
    fingerprint: u64,
    offset: u64,
    key_len: u32,
    identity_len: u32,
}

/// Fingerprints of every delivered row, held compactly: fixed-width slots (32 bytes) in the
/// order rows were added, over one text arena, plus an open-addressing index of 4-byte slot
/// numbers, instead of a map of strings.
///
/// Insertion order can save lookups: when a set was built in the model's order, the
/// in-memory planner's [`Fingerprints::position_near`] finds most keys in the slot right after
/// the previous one, without touching the index (whose random probes miss the cache on large
/// sets). The File and ConfigMap stores write their states in key-hash order, so a set loaded
/// from them gets no such help; only a migration's first run plans in memory now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    slots: Vec<Slot>,
    arena: String,
    /// Slot numbers by hash; `EMPTY` marks a free bucket. Its length is a power of two.
    index: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;

impl Fingerprints {
    /// Builds the set from entries in any order; a later entry for the same key wins.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = EntryRef<'a>>) -> Fingerprints {
        let mut set = Fingerprints::default();
        for e in entries {
            set.insert(e);
        }
        set
    }

    /// An empty set with room for `rows` entries and `arena_bytes` of keys and identities.
    pub fn with_capacity(rows: usize, arena_bytes: usize) -> Fingerprints {
        Fingerprints {
            slots: Vec::with_capacity(rows),
            arena: String::with_capacity(arena_bytes),
            index: Vec::new(),
        }
    }

    /// Adds an entry, or replaces the entry of the same key in place.
    pub fn insert(&mut self, e: EntryRef<'_>) {
        if (self.slots.len() + 1) * 3 > self.index.len() * 2 {
            self.grow();
        }
        let slot = self.append_to_arena(e);
        let hash = slot.key_hash;
        let mask = self.index.len() - 1;
        let mut bucket = hash as usize & mask;
        loop {
            let at = self.index[bucket];
            if at == EMPTY {
                self.index[bucket] = u32::try_from(self.slots.len()).unwrap_or(EMPTY - 1);
                self.slots.push(slot);
                return;
            }
            if self.slots[at as usize].key_hash == hash && self.entry_at(at as usize).key == e.key {
                // The old key and identity stay in the arena unused until the next rebuild.
                self.slots[at as usize] = slot;
                return;
            }
            bucket = (bucket + 1) & mask;
        }
    }

    /// Appends an entry known to have a distinct key (a state file's) without indexing it;
    /// [`Fingerprints::build_index`] must follow before any lookup. Indexing in one pass at
    /// the end touches the cache far less than inserting one by one.
    pub(crate) fn push_unindexed(&mut self, e: EntryRef<'_>) {
        let slot = self.append_to_arena(e);
        self.slots.push(slot);
    }

    /// Copies an entry's key and identity into the arena and returns its slot (not yet stored).
    fn append_to_arena(&mut self, e: EntryRef<'_>) -> Slot {
        let offset = self.arena.len() as u64;
        self.arena.push_str(e.key);
        self.arena.push_str(e.identity);
        Slot {
            key_hash: xxh3_64(e.key.as_bytes()),
            fingerprint: e.fingerprint,
            offset,
            key_len: u32::try_from(e.key.len()).unwrap_or(u32::MAX),
            identity_len: u32::try_from(e.identity.len()).unwrap_or(u32::MAX),
        }
    }

    /// Indexes every slot (after [`Fingerprints::push_unindexed`]).
    pub(crate) fn build_index(&mut self) {
        let mut size = 16;
        while size * 2 < (self.slots.len() + 1) * 3 {
            size *= 2;
        }
        self.rebuild_index(size);
    }

    fn grow(&mut self) {
        self.rebuild_index((self.index.len() * 2).max(16));
    }

    fn rebuild_index(&mut self, size: usize) {
        self.index = vec![EMPTY; size];
        let mask = size - 1;
        for (i, slot) in self.slots.iter().enumerate() {
            let mut bucket = slot.key_hash as usize & mask;
            while self.index[bucket] != EMPTY {
                bucket = (bucket + 1) & mask;
            }
            self.index[bucket] = i as u32;
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no row was ever delivered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes held in memory (slots, index and arena), for benchmarks and logs.
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.index.capacity() * 4
            + self.arena.capacity()
    }

    fn entry_at(&self, i: usize) -> EntryRef<'_> {
        let s = &self.slots[i];
        let start = s.offset as usize;
        let key_end = start + s.key_len as usize;
        EntryRef {
            key: &self.arena[start..key_end],
            fingerprint: s.fingerprint,
            identity: &self.arena[key_end..key_end + s.identity_len as usize],
        }
    }

    /// Position of a key, for marking rows seen during a plan.
    pub fn position(&self, key: &str) -> Option<usize> {
        if self.index.is_empty() {
            return None;
        }
        let hash = xxh3_64(key.as_bytes());
        let mask = self.index.len() - 1;
        let mut bucket = hash as usize & mask;
        loop {
            let at = self.index[bucket];
            if at == EMPTY {
                return None;
            }
            if self.slots[at as usize].key_hash == hash && self.entry_at(at as usize).key == key {
                return Some(at as usize);
            }
            bucket = (bucket + 1) & mask;
        }
    }

    /// Like [`Fingerprints::position`], trying `hint` (usually the slot after the previous
    /// row's) first.
    pub fn position_near(&self, key: &str, hint: usize) -> Option<usize> {
        match self.slots.get(hint) {
            Some(s) if s.key_len as usize == key.len() && self.entry_at(hint).key == key => Some(hint),
            _ => self.position(key),
        }
    }

    /// The entry at a position returned by [`Fingerprints::position`].
    pub fn get(&self, position: usize) -> Option<EntryRef<'_>> {
        (position < self.slots.len()).then(|| self.entry_at(position))
    }

    /// Every entry, in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        (0..self.slots.len()).map(|i| self.entry_at(i))
    }

    /// A new set without these keys.
    pub fn without(&self, keys: &std::collections::HashSet<String>) -> Fingerprints {
        let mut next = Fingerprints::with_capacity(self.len(), self.arena.len());
        for e in self.iter().filter(|e| !keys.contains(e.key)) {
            next.push_unindexed(e);
        }
        next.build_index();
        next
    }
}

/// Failures of a state store. Messages name the store's location.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing the store failed.
    #[error("failed to access sync state at {location}: {reason}")]
    Io {
        /// Where the state lives.
        location: String,
        /// The operating system's reason.
        reason: String,
    },
    /// The stored state does not decode.
    #[error("failed to read sync state at {location}: {reason}; move it aside to resync every row")]
    Corrupt {
        /// Where the state lives.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// Another run of the same sync holds the state.
    #[error("failed to lock sync state at {0}: another run of this sync is in progress")]
    Locked(String),
    /// The store cannot work as configured (an unsupported database, missing rights): a
    /// person must change the spec or the grants.
    #[error("failed to use sync state at {location}: {reason}")]
    Unusable {
        /// Where the state lives.
        location: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
}

impl StateError {
    /// A store's diff used before `begin`: a bug in the engine.
    pub(crate) fn diff_not_begun(location: String) -> StateError {
        StateError::Io {
            location,
            reason: "the diff was used before it began (a bug: please report it)".to_owned(),
        }
    }

    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            StateError::Io { .. } => "StateUnavailable",
            StateError::Corrupt { .. } => "StateCorrupt",
            StateError::Locked(_) => "RunInProgress",
            StateError::Unusable { .. } => "StateMisconfigured",
        }
    }
}

/// Where one sync's fingerprints live.
#[async_trait]
pub trait StateStore: Send {
    /// Loads the fingerprints of the last committed state. `scope` identifies what they were
    /// delivered to (the destination); state of another scope is ignored, so pointing a sync
    /// at a new destination sends every row.
    async fn load(&mut self, scope: &str) -> Result<Fingerprints, StateError>;

    /// Durably records a checkpoint of accepted changes. After it returns, a crash keeps them.
    async fn commit(&mut self, scope: &str, changes: &[StateChange]) -> Result<(), StateError>;

    /// Ends the run: folds checkpoints into the compact state (optional work; a crash before
    /// it loses nothing).
    async fn finish(&mut self, scope: &str) -> Result<(), StateError>;

    /// Writes a whole state taken from another store (a migration) under `scope`, durably,
    /// all or nothing where the store can.
    async fn import(&mut self, scope: &str, set: &Fingerprints) -> Result<(), StateError> {
        let changes: Vec<StateChange> = set
            .iter()
            .map(|e| StateChange::Put {
                key: e.key.to_owned(),
                fingerprint: e.fingerprint,
                identity: e.identity.to_owned(),
            })
            .collect();
        self.commit(scope, &changes).await
    }

    /// True when the store keeps a log of rejected rows: the engine then hands every
    /// rejection to [`StateStore::record_rejections`] (in batches), not only a few samples.
    fn logs_rejections(&self) -> bool {
        false
    }

    /// Records rows rejected during this run (sync logs). Called in batches as the run goes.
    async fn record_rejections(&mut self, _rejections: &[RejectedRow]) -> Result<(), StateError> {
        Ok(())
    }

    /// Called once, last, whatever happened (dry runs too): records the run (sync logs) and
    /// releases what the store holds for it (a lock). A store dropped without it releases
    /// them when dropped.
    async fn end_run(&mut self, _run: &RunLog) -> Result<(), StateError> {
        Ok(())
    }

    /// Deletes this sync's state: it was imported into another store, and leaving it would
    /// make a later switch back start from a stale copy.
    async fn discard(&mut self) -> Result<(), StateError> {
        Ok(())
    }

    /// The cursor record committed for `scope` (cursor mode: the high-water mark and when the
    /// last full diff ran, as the engine wrote it), if any. Called after the run's first
    /// store call, so the store's lock is held.
    async fn cursor(&mut self, _scope: &str) -> Result<Option<String>, StateError> {
        Ok(None)
    }

    /// Durably replaces the cursor record of `scope` (at most [`MAX_CURSOR_RECORD`] bytes).
    /// The engine calls it only once the run's last checkpoint is committed, so the mark
    /// never gets ahead of the fingerprints: a crash before it leaves the previous mark.
    async fn commit_cursor(&mut self, _scope: &str, _record: &str) -> Result<(), StateError> {
        Err(StateError::Unusable {
            location: "this state store".to_owned(),
            reason: "it keeps no cursor: remove spec.cursor or use the File, ConfigMap or Warehouse store"
                .to_owned(),
        })
    }

    /// The store's own diff, when it can compare fingerprints without loading them all into
    /// memory (every store here streams them through local disk buckets): the engine then
    /// holds only the changed rows. `None`: load and plan in memory.
    fn store_diff(&mut self) -> Option<&mut dyn StoreDiff> {
        None
    }
}

/// A diff computed by the store without loading its state: the engine hands over each row's
/// key hash and fingerprint, the store compares them with what it holds and returns only what
/// differs.
#[async_trait]
pub trait StoreDiff: Send {
    /// Opens the diff for `scope`. `Ok(false)` declines it for this run (the engine then
    /// loads the state and plans in memory), e.g. to import another store's state first.
    async fn begin(&mut self, scope: &str) -> Result<bool, StateError>;

    /// After `begin`: true when the store holds fingerprints for `scope`.
    fn holds_state(&mut self, scope: &str) -> bool;

    /// Hands over a chunk of this run's rows: [`stored_key_hash`] of the key, and fingerprint.
    async fn stage(&mut self, rows: &[(u128, u64)]) -> Result<(), StateError>;

    /// After `begin`, before the first `stage`: what the diff does with the stored keys this
    /// run does not stage ([`Removed::List`] until told otherwise). A run that reads part of
    /// the model (cursor mode) did not remove them (`Ignore`: neither counted nor looked up);
    /// one that will not delete (every mode but `mirror`) needs only their number (`Count`).
    /// A store that ignores it lists them anyway and still diffs correctly: the engine drops
    /// what it does not need.
    fn removed_keys(&mut self, _removed: Removed) {}

    /// Some of the stored pairs, for the planner to leave rows it knows are unchanged out of
    /// the spill ([`stored_pairs`]): `Some` once, when the store has read them while the model
    /// is read; `None` before, after, and from a store that does not offer them.
    fn stored_pairs(&mut self) -> Option<stored_pairs::StoredPairs> {
        None
    }

    /// Compares the staged rows with the stored ones. With `full_resync`, every staged key
    /// counts as changed (or added when not stored).
    async fn diff(&mut self, scope: &str, full_resync: bool) -> Result<RemoteDiff, StateError>;
}

/// Largest cursor record a store keeps (the engine's records are a few hundred bytes).
pub const MAX_CURSOR_RECORD: usize = 4096;

/// The 128-bit hash that identifies a key in a state store's diff and in the Warehouse
/// store's table (xxh3-128 of the key's bytes).
pub fn stored_key_hash(key: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128(key.as_bytes())
}

pub use hash_buckets::Removed;

/// What a store's diff found, by [`stored_key_hash`]. It holds changed keys only, never
/// every row.
#[derive(Debug, Default)]
pub struct RemoteDiff {
    /// When true, nothing is stored for the scope: every staged key is new and `changed` is
    /// left empty rather than listing them all.
    pub all_added: bool,
    /// When true (a full resync), staged keys missing from `changed` are changed too.
    pub full_resync: bool,
    /// Staged keys that are new or whose fingerprint differs; shared with the reader of the
    /// rows to send (see `RowIndex`), which looks them up as it goes.
    pub changed: std::sync::Arc<hash_buckets::ChangedKeys>,
    /// Keys staged more than once, with how many times; they are in no other field.
    pub duplicates: std::collections::HashMap<u128, u64>,
    /// Stored keys that were not staged, with their identity JSON (for mirror deletes), in
    /// key order; empty when the store was asked to count them only.
    pub removed: RemovedRows,
    /// How many stored keys were not staged, listed in `removed` or not.
    pub removed_rows: u64,
}

impl RemoteDiff {
    /// How a staged key changed: `Some(true)` added, `Some(false)` changed, `None` unchanged
    /// (duplicated keys are the caller's to drop first).
    pub fn change(&self, hash: u128) -> Option<bool> {
        if self.all_added {
            return Some(true);
        }
        match self.changed.get(hash) {
            Some(added) => Some(added),
            None if self.full_resync => Some(false),
            None => None,
        }
    }
}

/// A rejected row as the sync logs keep it: key, operation and reason, never payload values.
pub use crate::api::reverse_sync::RejectedRow;

/// What a run did, for the sync logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunLog {
    /// When the run started.
    pub started: chrono::DateTime<chrono::Utc>,
    /// When it ended.
    pub finished: chrono::DateTime<chrono::Utc>,
    /// `Succeeded`, `PartiallySucceeded` or `Failed`.
    pub result: String,
    /// A dry run (nothing is logged for it).
    pub dry_run: bool,
    /// Rows the model returned.
    pub rows_in_model: u64,
    /// Rows added.
    pub rows_added: u64,
    /// Rows changed.
    pub rows_changed: u64,
    /// Rows removed (mirror).
    pub rows_removed: u64,
    /// Rows unchanged.
    pub rows_unchanged: u64,
    /// Rows rejected by the planner or the destination.
    pub rows_rejected: u64,
    /// Rows that failed after every retry.
    pub rows_failed: u64,
    /// Requests sent.
    pub requests: u64,
    /// Why the run failed, if it did (never a secret).
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_find_every_key_and_later_entries_win() {
        let set = Fingerprints::from_entries([
            EntryRef {
                key: "a",
                fingerprint: 1,
                identity: "{\"id\":\"a\"}",
            },
            EntryRef {
                key: "b",
                fingerprint: 2,
                identity: "{}",
            },
            EntryRef {
                key: "a",
                fingerprint: 3,
                identity: "{\"id\":\"a2\"}",
            },
        ]);
        assert_eq!(set.len(), 2);
        let a = set.get(set.position("a").unwrap()).unwrap();
        assert_eq!((a.fingerprint, a.identity), (3, "{\"id\":\"a2\"}"));
        assert!(set.position("c").is_none());
    }

    #[test]
    fn inserting_replaces_in_place_and_without_drops_keys() {
        let mut set = Fingerprints::from_entries([
            EntryRef {
                key: "a",
                fingerprint: 1,
                identity: "",
            },
            EntryRef {
                key: "b",
                fingerprint: 2,
                identity: "",
            },
        ]);
        set.insert(EntryRef {
            key: "c",
            fingerprint: 9,
            identity: "x",
        });
        set.insert(EntryRef {
            key: "b",
            fingerprint: 5,
            identity: "y",
        });
        let next = set.without(&["a".to_owned()].into());
        assert!(next.position("a").is_none());
        assert_eq!(next.get(next.position("b").unwrap()).unwrap().fingerprint, 5);
        assert_eq!(next.get(next.position("c").unwrap()).unwrap().identity, "x");
        assert_eq!(next.iter().map(|e| e.key).collect::<Vec<_>>(), vec!["b", "c"]);
    }

    #[test]
    fn every_key_of_a_large_set_is_found_and_absent_keys_are_not() {
        let keys: Vec<String> = (0..50_000).map(|i| format!("key-{i}")).collect();
        let set = Fingerprints::from_entries(keys.iter().map(|k| EntryRef {
            key: k,
            fingerprint: 7,
            identity: "",
        }));
        for k in &keys {
            let p = set.position(k).unwrap_or_else(|| panic!("{k} not found"));
            assert_eq!(set.get(p).unwrap().key, k);
        }
        for i in 0..1000 {
            assert!(set.position(&format!("absent-{i}")).is_none());
        }
    }

    #[test]
    fn slots_are_32_bytes_so_a_row_costs_little_more_than_its_key() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[test]
    fn entries_keep_the_order_they_were_added_in_and_hints_find_the_next_row() {
        let set = Fingerprints::from_entries(["c", "a", "b"].map(|k| EntryRef {
            key: k,
            fingerprint: 1,
            identity: "",
        }));
        assert_eq!(set.iter().map(|e| e.key).collect::<Vec<_>>(), vec!["c", "a", "b"]);
        assert_eq!(set.position_near("a", 1), Some(1));
        assert_eq!(
            set.position_near("b", 0),
            Some(2),
            "a wrong hint falls back to the index"
        );
        assert_eq!(set.position_near("z", 2), None);
        assert_eq!(set.position_near("c", 99), Some(0));
    }
}
