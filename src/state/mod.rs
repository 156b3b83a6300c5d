//! State stores: where a sync keeps the fingerprint of every row it delivered.
//!
//! One engine, several homes: the [`file`] store (local runs) here; the ConfigMap and
//! Warehouse stores implement the same [`StateStore`] trait.

pub mod file;

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

impl StateChange {
    /// The key the change is about.
    pub fn key(&self) -> &str {
        match self {
            StateChange::Put { key, .. } | StateChange::Remove { key } => key,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    key_hash: u64,
    fingerprint: u64,
    offset: u64,
    key_len: u32,
    identity_len: u32,
}

/// Fingerprints of every delivered row, held compactly: a sorted array of fixed-width slots
/// (32 bytes) over one text arena, instead of a map of strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    slots: Vec<Slot>,
    arena: String,
}

impl Fingerprints {
    /// Builds the set from entries in any order; a later entry for the same key wins.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = EntryRef<'a>>) -> Fingerprints {
        let mut set = Fingerprints::default();
        for e in entries {
            set.push_unsorted(e);
        }
        set.seal();
        set
    }

    fn push_unsorted(&mut self, e: EntryRef<'_>) {
        let offset = self.arena.len() as u64;
        self.arena.push_str(e.key);
        self.arena.push_str(e.identity);
        self.slots.push(Slot {
            key_hash: xxh3_64(e.key.as_bytes()),
            fingerprint: e.fingerprint,
            offset,
            key_len: u32::try_from(e.key.len()).unwrap_or(u32::MAX),
            identity_len: u32::try_from(e.identity.len()).unwrap_or(u32::MAX),
        });
    }

    /// Sorts by (hash, key) and keeps the last entry of each key.
    fn seal(&mut self) {
        let arena = &self.arena;
        let key_of = |s: &Slot| &arena[s.offset as usize..s.offset as usize + s.key_len as usize];
        // A stable sort keeps insertion order among equal keys, so the last one is the newest.
        self.slots
            .sort_by(|a, b| a.key_hash.cmp(&b.key_hash).then_with(|| key_of(a).cmp(key_of(b))));
        let mut deduped: Vec<Slot> = Vec::with_capacity(self.slots.len());
        for slot in self.slots.drain(..) {
            match deduped.last_mut() {
                Some(last) if last.key_hash == slot.key_hash && key_of(last) == key_of(&slot) => *last = slot,
                _ => deduped.push(slot),
            }
        }
        self.slots = deduped;
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no row was ever delivered.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Bytes held in memory (slots and arena), for benchmarks and logs.
    pub fn memory_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>() + self.arena.capacity()
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
        let hash = xxh3_64(key.as_bytes());
        let start = self.slots.partition_point(|s| s.key_hash < hash);
        (start..self.slots.len())
            .take_while(|&i| self.slots[i].key_hash == hash)
            .find(|&i| self.entry_at(i).key == key)
    }

    /// The entry at a position returned by [`Fingerprints::position`].
    pub fn get(&self, position: usize) -> Option<EntryRef<'_>> {
        (position < self.slots.len()).then(|| self.entry_at(position))
    }

    /// Every entry, in storage order.
    pub fn iter(&self) -> impl Iterator<Item = EntryRef<'_>> {
        (0..self.slots.len()).map(|i| self.entry_at(i))
    }

    /// A new set with the changes applied (later changes win).
    pub fn apply(&self, changes: &[StateChange]) -> Fingerprints {
        let mut touched: std::collections::HashMap<&str, &StateChange> = std::collections::HashMap::new();
        for c in changes {
            touched.insert(c.key(), c);
        }
        let mut next = Fingerprints::default();
        for e in self.iter() {
            if !touched.contains_key(e.key) {
                next.push_unsorted(e);
            }
        }
        for c in touched.values() {
            if let StateChange::Put {
                key,
                fingerprint,
                identity,
            } = c
            {
                next.push_unsorted(EntryRef {
                    key,
                    fingerprint: *fingerprint,
                    identity,
                });
            }
        }
        next.seal();
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
}

impl StateError {
    /// A stable short label for metrics, condition and event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            StateError::Io { .. } => "StateUnavailable",
            StateError::Corrupt { .. } => "StateCorrupt",
            StateError::Locked(_) => "RunInProgress",
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
    fn applying_changes_puts_and_removes() {
        let set = Fingerprints::from_entries([
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
        let next = set.apply(&[
            StateChange::Remove { key: "a".into() },
            StateChange::Put {
                key: "c".into(),
                fingerprint: 9,
                identity: "x".into(),
            },
            StateChange::Put {
                key: "b".into(),
                fingerprint: 5,
                identity: "y".into(),
            },
        ]);
        assert!(next.position("a").is_none());
        assert_eq!(next.get(next.position("b").unwrap()).unwrap().fingerprint, 5);
        assert_eq!(next.get(next.position("c").unwrap()).unwrap().identity, "x");
        assert_eq!(next.len(), 2);
    }

    #[test]
    fn slots_are_32_bytes_so_a_row_costs_little_more_than_its_key() {
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }
}
