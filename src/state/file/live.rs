//! The File store's live state read in key-hash order: the state file's entries with a small
//! journal's changes applied as they are read, without folding them first.
//!
//! A run that changes few rows leaves its journal beside the state file
//! ([`journal_may_stay`]); the next diff, fold or read merges it here. The journal's
//! changes are held in memory (the last change of each key, sorted by key hash), so this is
//! only done for journals of at most [`MERGE_JOURNAL_BYTES`].

use std::path::Path;

use super::format::{JournalReader, StateFileReader, corrupt, io_error};
use crate::state::codec::{ChangeRef, decode_change_ref};
use crate::state::{EntryRef, StateError, stored_key_hash};

/// Journals up to this size are merged from memory (their records, and 24 bytes per change,
/// about 13 MB at most); larger ones are folded through disk buckets, so a sync of any size
/// holds no more than this for its journal.
pub(super) const MERGE_JOURNAL_BYTES: u64 = 8 << 20;

/// A journal's change records, read whole.
pub(super) struct JournalChanges {
    /// The change records of every whole checkpoint, back to back.
    records: Vec<u8>,
    /// The last change of each key: (key hash, where its record starts in `records`),
    /// sorted by key hash.
    last: Vec<(u128, usize)>,
    /// The journal ends right after its last whole checkpoint (nothing torn).
    pub(super) clean: bool,
}

impl JournalChanges {
    /// No journal.
    fn none() -> JournalChanges {
        JournalChanges {
            records: Vec::new(),
            last: Vec::new(),
            clean: true,
        }
    }

    /// True when the journal changes no key.
    pub(super) fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// The change at `start` of the records, as an entry when it is a put.
    fn put_at(&self, start: usize) -> Option<EntryRef<'_>> {
        match decode_change_ref(&mut &self.records[start..])? {
            ChangeRef::Put {
                key,
                fingerprint,
                identity,
            } => Some(EntryRef {
                key,
                fingerprint,
                identity,
            }),
            ChangeRef::Remove { .. } => None,
        }
    }
}

/// The changes of the journal at `path` when it is of `scope` (none when it is of another
/// scope, has no header, or does not exist); `None` when it is larger than
/// [`MERGE_JOURNAL_BYTES`].
pub(super) fn read_journal(path: &Path, scope: &str) -> Result<Option<JournalChanges>, StateError> {
    let len = match std::fs::metadata(path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(JournalChanges::none())),
        Err(e) => return Err(io_error(path, &e)),
    };
    if len > MERGE_JOURNAL_BYTES {
        return Ok(None);
    }
    let Some(mut checkpoints) = JournalReader::open(path)? else {
        return Ok(Some(JournalChanges::none()));
    };
    if checkpoints.scope() != scope {
        return Ok(Some(JournalChanges::none()));
    }
    let (mut records, mut changes) = (Vec::new(), Vec::new());
    let mut payload = Vec::new();
    while checkpoints.next_payload(&mut payload) {
        let mut rest = payload.as_slice();
        while !rest.is_empty() {
            let start = payload.len() - rest.len();
            let Some(ChangeRef::Put { key, .. } | ChangeRef::Remove { key }) = decode_change_ref(&mut rest)
            else {
                return Err(corrupt(path, "undecodable checkpoint"));
            };
            changes.push((stored_key_hash(key), records.len() + start));
        }
        records.extend_from_slice(&payload);
    }
    // Stable: the changes of one key keep their order, and the last one is kept.
    changes.sort_by_key(|&(hash, _)| hash);
    let mut last: Vec<(u128, usize)> = Vec::with_capacity(changes.len());
    for change in changes {
        match last.last_mut() {
            Some(kept) if kept.0 == change.0 => *kept = change,
            _ => last.push(change),
        }
    }
    Ok(Some(JournalChanges {
        records,
        last,
        clean: checkpoints.ended_cleanly(),
    }))
}

/// What [`LiveEntries::next`] found.
pub(super) enum Live<'a> {
    /// The next live entry, with its key hash.
    Entry(u128, EntryRef<'a>),
    /// No more entries (the state file's checksum matched).
    End,
    /// The state file's entries are not in key-hash order, so the journal cannot be merged
    /// into them as they are read: fold it instead. Never returned without journal changes.
    OutOfOrder,
}

/// The live entries of a state file and a journal of the same scope, in key-hash order.
pub(super) struct LiveEntries {
    state: Option<StateFileReader>,
    journal: JournalChanges,
    /// Index in `journal.last` of the next change to merge.
    next_change: usize,
    /// The state entry read and not returned yet (its key and identity are in the buffers).
    held: Option<(u128, u64)>,
    previous: Option<u128>,
    with_identity: bool,
    key: String,
    identity: String,
}

impl LiveEntries {
    /// The state file at `state` (when it is of `scope`) and the journal's `changes`. With
    /// `with_identity` false, entries of the state file come with an empty identity (a diff
    /// needs only key hashes and fingerprints).
    pub(super) fn open(
        state: &Path,
        scope: &str,
        journal: JournalChanges,
        with_identity: bool,
    ) -> Result<LiveEntries, StateError> {
        let state = StateFileReader::open(state)?.filter(|reader| reader.scope() == scope);
        Ok(LiveEntries {
            state,
            journal,
            next_change: 0,
            held: None,
            previous: None,
            with_identity,
            key: String::new(),
            identity: String::new(),
        })
    }

    /// Rows of the state file, before the journal's changes.
    pub(super) fn stored_rows(&self) -> u64 {
        self.state.as_ref().map_or(0, StateFileReader::count)
    }

    /// The next live entry.
    pub(super) fn next(&mut self) -> Result<Live<'_>, StateError> {
        loop {
            if self.held.is_none()
                && let Some(reader) = self.state.as_mut()
            {
                let read = if self.with_identity {
                    reader.next(&mut self.key, &mut self.identity)?
                } else {
                    reader.next_key(&mut self.key)?
                };
                match read {
                    Some(fingerprint) => {
                        let hash = stored_key_hash(&self.key);
                        if !self.journal.is_empty() && self.previous.is_some_and(|p| p >= hash) {
                            return Ok(Live::OutOfOrder);
                        }
                        self.previous = Some(hash);
                        self.held = Some((hash, fingerprint));
                    }
                    None => self.state = None,
                }
            }
            let change = self.journal.last.get(self.next_change).copied();
            let state_first = match (self.held, change) {
                (None, None) => return Ok(Live::End),
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some((held, _)), Some((changed, _))) => {
                    if changed == held {
                        // The journal's change replaces the stored entry.
                        self.held = None;
                    }
                    held < changed
                }
            };
            if state_first {
                let Some((hash, fingerprint)) = self.held.take() else {
                    continue;
                };
                return Ok(Live::Entry(
                    hash,
                    EntryRef {
                        key: &self.key,
                        fingerprint,
                        identity: &self.identity,
                    },
                ));
            }
            self.next_change += 1;
            if let Some((hash, start)) = change
                && let Some(entry) = self.journal.put_at(start)
            {
                return Ok(Live::Entry(hash, entry));
            }
        }
    }
}

/// Reads the live state through `read`, which gets a [`LiveEntries`] and returns `None` when
/// it met [`Live::OutOfOrder`]. When the journal cannot be merged (larger than
/// [`MERGE_JOURNAL_BYTES`], or the state file is not in key-hash order), it is folded into the
/// state file first and `read` runs on the folded file alone.
pub(super) fn read_live<T>(
    state: &Path,
    journal: &Path,
    scope: &str,
    with_identity: bool,
    mut read: impl FnMut(&mut LiveEntries) -> Result<Option<T>, StateError>,
) -> Result<T, StateError> {
    if let Some(changes) = read_journal(journal, scope)? {
        let mut live = LiveEntries::open(state, scope, changes, with_identity)?;
        if let Some(found) = read(&mut live)? {
            return Ok(found);
        }
    }
    super::fold::fold(state, journal, scope)?;
    let mut live = LiveEntries::open(state, scope, JournalChanges::none(), with_identity)?;
    // Without journal changes nothing is merged, so nothing is out of order.
    read(&mut live)?.ok_or_else(|| corrupt(state, "entries out of order after a fold"))
}

/// Whether the journal at `journal` may stay beside the state file at `state` instead of
/// being folded into it: both are of `scope`, the journal ends with a whole checkpoint, and it
/// is at most 1/[`KEEP_JOURNAL_SHARE`] of the state file's size and [`MERGE_JOURNAL_BYTES`].
pub(super) fn journal_may_stay(state: &Path, journal: &Path, scope: &str) -> Result<bool, StateError> {
    let journal_len = match std::fs::metadata(journal) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io_error(journal, &e)),
    };
    let Some(reader) = StateFileReader::open(state)? else {
        return Ok(false);
    };
    if reader.scope() != scope || journal_len > reader.len() / KEEP_JOURNAL_SHARE {
        return Ok(false);
    }
    if JournalReader::open(journal)?.is_none_or(|j| j.scope() != scope) {
        return Ok(false);
    }
    Ok(read_journal(journal, scope)?.is_some_and(|changes| changes.clean))
}

/// A journal stays beside the state file while it is at most this share (1/N) of the state
/// file's bytes: a run that changed under 1/8 of the rows does not rewrite the state file,
/// and the runs after it merge the journal as they read.
pub(super) const KEEP_JOURNAL_SHARE: u64 = 8;
