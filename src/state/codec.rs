//! The binary records shared by the state stores: one encoding of an entry (a delivered row)
//! and of a change (a checkpointed put or remove), written by the File store into its state
//! file and journal and by the ConfigMap store into its shards and journal ConfigMaps.
//!
//! Numbers are little-endian; strings are a `u32` byte length and UTF-8 bytes.
//! - entry: `fingerprint u64, key str, identity str`
//! - change: `1u8, key str, fingerprint u64, identity str` (put) or `2u8, key str` (remove)

use std::collections::HashSet;
use std::io::{BufRead, Read};

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

/// Strings up to this length are read in one `read_exact`; longer ones (only a damaged
/// length, in practice) through `take`, so a bad length cannot allocate gigabytes.
const DIRECT_READ: usize = 1 << 16;

/// Reads a length-prefixed UTF-8 string into `out` (reusing its allocation).
pub(crate) fn read_string(r: &mut impl Read, out: &mut String) -> std::io::Result<()> {
    let len = read_u32(r)? as usize;
    let mut bytes = std::mem::take(out).into_bytes();
    bytes.clear();
    if len <= DIRECT_READ {
        bytes.resize(len, 0);
        r.read_exact(&mut bytes)?;
    } else {
        r.take(len as u64).read_to_end(&mut bytes)?;
        if bytes.len() != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    *out = String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(())
}

/// Skips a length-prefixed string without decoding it, consuming it from the reader's buffer.
pub(crate) fn skip_string(r: &mut impl BufRead) -> std::io::Result<()> {
    let mut left = read_u32(r)? as usize;
    while left > 0 {
        let buffered = r.fill_buf()?.len();
        if buffered == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = buffered.min(left);
        r.consume(n);
        left -= n;
    }
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
    encode_change_ref(c.as_change_ref(), out);
}

/// Appends one change record, from borrowed parts.
pub(crate) fn encode_change_ref(c: ChangeRef<'_>, out: &mut Vec<u8>) {
    match c {
        ChangeRef::Put {
            key,
            fingerprint,
            identity,
        } => {
            out.push(1);
            put_str(out, key);
            out.extend_from_slice(&fingerprint.to_le_bytes());
            put_str(out, identity);
        }
        ChangeRef::Remove { key } => {
            out.push(2);
            put_str(out, key);
        }
    }
}

impl StateChange {
    /// The change with borrowed parts.
    pub(crate) fn as_change_ref(&self) -> ChangeRef<'_> {
        match self {
            StateChange::Put {
                key,
                fingerprint,
                identity,
            } => ChangeRef::Put {
                key,
                fingerprint: *fingerprint,
                identity,
            },
            StateChange::Remove { key } => ChangeRef::Remove { key },
        }
    }
}

/// A change decoded in place from a byte slice (see [`decode_change_ref`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChangeRef<'a> {
    /// A delivered row.
    Put {
        /// Canonical primary key.
        key: &'a str,
        /// Fingerprint of the accepted record.
        fingerprint: u64,
        /// Match fields as canonical JSON.
        identity: &'a str,
    },
    /// A deleted record.
    Remove {
        /// Canonical primary key.
        key: &'a str,
    },
}

/// One change record's parts, its text not yet checked.
struct RawChange<'a> {
    key: &'a [u8],
    /// A put's fingerprint and identity; `None` for a remove.
    put: Option<(u64, &'a [u8])>,
}

fn take_bytes<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_le_bytes(r.get(..4)?.try_into().ok()?) as usize;
    let bytes = r.get(4..4usize.checked_add(len)?)?;
    *r = &r[4 + len..];
    Some(bytes)
}

fn take_u64(r: &mut &[u8]) -> Option<u64> {
    let n = u64::from_le_bytes(r.get(..8)?.try_into().ok()?);
    *r = &r[8..];
    Some(n)
}

/// Splits one change written by [`encode_change`] into its parts, advancing `r` past it;
/// `None` when it is cut short or of an unknown kind.
fn split_change<'a>(r: &mut &'a [u8]) -> Option<RawChange<'a>> {
    let (&tag, rest) = r.split_first()?;
    *r = rest;
    let key = take_bytes(r)?;
    let put = match tag {
        1 => Some((take_u64(r)?, take_bytes(r)?)),
        2 => None,
        _ => return None,
    };
    Some(RawChange { key, put })
}

/// Decodes one change written by [`encode_change`] without copying, advancing `r` past it.
pub(crate) fn decode_change_ref<'a>(r: &mut &'a [u8]) -> Option<ChangeRef<'a>> {
    let RawChange { key, put } = split_change(r)?;
    let key = std::str::from_utf8(key).ok()?;
    Some(match put {
        Some((fingerprint, identity)) => ChangeRef::Put {
            key,
            fingerprint,
            identity: std::str::from_utf8(identity).ok()?,
        },
        None => ChangeRef::Remove { key },
    })
}

/// Steps over one change written by [`encode_change`], advancing `r` past it, without
/// checking its text: `Some(true)` for a put, `Some(false)` for a remove, `None` when it is
/// cut short or of an unknown kind. For records this process wrote and already checked.
pub(crate) fn skip_change(r: &mut &[u8]) -> Option<bool> {
    split_change(r).map(|change| change.put.is_some())
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
            match decode_change_ref(&mut payload).ok_or(())? {
                ChangeRef::Put {
                    key,
                    fingerprint,
                    identity,
                } => {
                    self.removed.remove(key);
                    set.insert(EntryRef {
                        key,
                        fingerprint,
                        identity,
                    });
                }
                ChangeRef::Remove { key } => {
                    self.removed.insert(key.to_owned());
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
        assert_eq!(
            decode_change_ref(&mut p),
            Some(ChangeRef::Put {
                key: "k1",
                fingerprint: u64::MAX,
                identity: "{\"id\":1}"
            })
        );
        assert_eq!(decode_change_ref(&mut p), Some(ChangeRef::Remove { key: "k2" }));
        assert!(p.is_empty());
        // Stepping over the same records lands where decoding does, without reading text.
        let mut p: &[u8] = &bytes;
        assert_eq!(skip_change(&mut p), Some(true));
        assert_eq!(skip_change(&mut p), Some(false));
        assert!(p.is_empty());
        for cut in 0..bytes.len() - 7 {
            if cut != 0 {
                assert_eq!(skip_change(&mut &bytes[..cut]), None, "cut at {cut}");
            }
        }
        assert_eq!(skip_change(&mut &[3u8, 0, 0, 0, 0][..]), None, "an unknown kind");

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
        let mut r = &out[8..];
        skip_string(&mut r).unwrap();
        skip_string(&mut r).unwrap();
        assert!(r.is_empty());
        assert!(
            skip_string(&mut &out[8..10]).is_err(),
            "a short string is an error"
        );
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
