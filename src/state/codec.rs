//! The binary records shared by the state stores: one encoding of an entry (a delivered row)
//! and of a change (a checkpointed put or remove), written by the File store into its state
//! file and journal and by the ConfigMap store into its shards and journal ConfigMaps.
//!
//! Numbers are little-endian; strings are a `u32` byte length and UTF-8 bytes.
//! - entry: `fingerprint u64, key str, identity str`
//! - change: `1u8, key str, fingerprint u64, identity str` (put) or `2u8, key str` (remove)

use std::collections::HashSet;
use std::io::Read;

use super::{EntryRef, Fingerprints, StateChange};

pub(crate) fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Reads a length-prefixed UTF-8 string into `out` (reusing its allocation).
pub(crate) fn read_string(r: &mut impl Read, out: &mut String) -> std::io::Result<()> {
    let len = read_u32(r)?;
    let mut bytes = std::mem::take(out).into_bytes();
    bytes.clear();
    r.take(u64::from(len)).read_to_end(&mut bytes)?;
    if bytes.len() != len as usize {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    *out = String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(())
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Appends one entry record.
pub(crate) fn put_entry(out: &mut Vec<u8>, e: EntryRef<'_>) {
    out.extend_from_slice(&e.fingerprint.to_le_bytes());
    put_str(out, e.key);
    put_str(out, e.identity);
}

/// Reads one entry record written by [`put_entry`] into reused buffers; returns its fingerprint.
pub(crate) fn read_entry(r: &mut impl Read, key: &mut String, identity: &mut String) -> std::io::Result<u64> {
    let fingerprint = read_u64(r)?;
    read_string(r, key)?;
    read_string(r, identity)?;
    Ok(fingerprint)
}

/// Appends one change record.
pub(crate) fn encode_change(c: &StateChange, out: &mut Vec<u8>) {
    match c {
        StateChange::Put {
            key,
            fingerprint,
            identity,
        } => {
            out.push(1);
            put_str(out, key);
            out.extend_from_slice(&fingerprint.to_le_bytes());
            put_str(out, identity);
        }
        StateChange::Remove { key } => {
            out.push(2);
            put_str(out, key);
        }
    }
}

/// Decodes one change written by [`encode_change`].
pub(crate) fn decode_change(r: &mut &[u8]) -> Option<StateChange> {
    let mut tag = [0u8; 1];
    r.read_exact(&mut tag).ok()?;
    let mut key = String::new();
    read_string(r, &mut key).ok()?;
    match tag[0] {
        1 => {
            let fingerprint = read_u64(r).ok()?;
            let mut identity = String::new();
            read_string(r, &mut identity).ok()?;
            Some(StateChange::Put {
                key,
                fingerprint,
                identity,
            })
        }
        2 => Some(StateChange::Remove { key }),
        _ => None,
    }
}

/// Replays checkpoints onto a loaded state: puts land in place at once; removals are
/// collected and applied in one pass at the end (removing from the compact set means a copy).
#[derive(Debug, Default)]
pub(crate) struct Replay {
    removed: HashSet<String>,
}

impl Replay {
    /// Applies every change of one checkpoint payload, in order. `Err` when it does not decode
    /// (the changes before the bad one are applied).
    pub(crate) fn apply_payload(&mut self, set: &mut Fingerprints, mut payload: &[u8]) -> Result<(), ()> {
        while !payload.is_empty() {
            match decode_change(&mut payload).ok_or(())? {
                StateChange::Put {
                    key,
                    fingerprint,
                    identity,
                } => {
                    self.removed.remove(&key);
                    set.insert(EntryRef {
                        key: &key,
                        fingerprint,
                        identity: &identity,
                    });
                }
                StateChange::Remove { key } => {
                    self.removed.insert(key);
                }
            }
        }
        Ok(())
    }

    /// The set with every finally removed key dropped.
    pub(crate) fn finish(self, set: Fingerprints) -> Fingerprints {
        if self.removed.is_empty() {
            set
        } else {
            set.without(&self.removed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_and_entries_round_trip() {
        let changes = [
            StateChange::Put {
                key: "k1".into(),
                fingerprint: u64::MAX,
                identity: "{\"id\":1}".into(),
            },
            StateChange::Remove { key: "k2".into() },
        ];
        let mut bytes = Vec::new();
        for c in &changes {
            encode_change(c, &mut bytes);
        }
        let mut p: &[u8] = &bytes;
        assert_eq!(decode_change(&mut p).as_ref(), Some(&changes[0]));
        assert_eq!(decode_change(&mut p).as_ref(), Some(&changes[1]));
        assert!(p.is_empty());

        let mut out = Vec::new();
        put_entry(
            &mut out,
            EntryRef {
                key: "é",
                fingerprint: 7,
                identity: "{}",
            },
        );
        let (mut k, mut i) = (String::new(), String::new());
        assert_eq!(read_entry(&mut &out[..], &mut k, &mut i).unwrap(), 7);
        assert_eq!((k.as_str(), i.as_str()), ("é", "{}"));
    }

    #[test]
    fn a_replay_applies_puts_and_removals_in_order() {
        let mut bytes = Vec::new();
        for c in [
            StateChange::Remove { key: "a".into() },
            StateChange::Put {
                key: "a".into(),
                fingerprint: 2,
                identity: String::new(),
            },
            StateChange::Remove { key: "b".into() },
        ] {
            encode_change(&c, &mut bytes);
        }
        let mut set = Fingerprints::from_entries(["a", "b", "c"].map(|key| EntryRef {
            key,
            fingerprint: 1,
            identity: "",
        }));
        let mut replay = Replay::default();
        replay.apply_payload(&mut set, &bytes).unwrap();
        assert!(replay.apply_payload(&mut set, &[9, 9]).is_err());
        let set = replay.finish(set);
        assert_eq!(
            set.iter().map(|e| (e.key, e.fingerprint)).collect::<Vec<_>>(),
            [("a", 2), ("c", 1)]
        );
    }
}
